//! The inbound-audit agent: counts live inbound TCP sessions per remote IP from
//! the kernel's own truth and answers Momentum-style queries for any CIDR.
//!
//! Layers, lowest first; every `use crate::` points to a lower one (checked by
//! `tests/layers.rs`):
//! - [`domain`]: shared types (services, monitor specs, series, limits, the clock);
//! - [`config`], [`sys`] (users, capabilities, the listening socket, signal
//!   masks), [`kernel`] (loading, seeding, sock_diag);
//! - [`counting`]: the CIDR index, monitors and their persistence, the shared
//!   state; beside it [`cluster`], the fleet-wide counts merged from every
//!   node through Redis, which the shared state holds for queries;
//! - [`serving`]: protocol → connection → command → server, and the client;
//! - [`adapters`]: the MTAs' own hooks (Postfix policy delegation);
//! - [`agent`]: start-up, signals, reload, events, reconcile.

pub mod domain;

pub mod config;
pub mod kernel;
pub mod metrics;
pub mod sys;

pub mod counting;

pub mod cluster;

pub mod serving;

pub mod adapters;

pub mod agent;
