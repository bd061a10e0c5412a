//! The operating system beneath the agent: users and groups, capabilities,
//! the listening socket, signal masks.

pub mod caps;
pub mod memory;
pub mod signals;
pub mod socket;
pub mod users;
