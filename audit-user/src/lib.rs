//! The inbound-audit agent: counts live inbound TCP sessions per remote IP from
//! the kernel's own truth and answers Momentum-style queries for any CIDR.
//!
//! Data path: kernel (ring buffer, maps) → index/state → protocol → connection
//! → command → server.

pub mod adapters;
pub mod agent;
pub mod client;
pub mod command;
pub mod config;
pub mod connection;
pub mod index;
pub mod kernel;
pub mod monitors;
pub mod privileges;
pub mod protocol;
pub mod server;
pub mod shutdown;
pub mod state;
