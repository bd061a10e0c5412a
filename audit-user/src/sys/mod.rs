//! The operating system beneath the agent: users and groups, capabilities,
//! the directories it trusts, the listening socket, signal masks, file
//! descriptor limits.

pub mod caps;
pub mod fs;
pub mod limits;
pub mod memory;
pub mod signals;
pub mod socket;
pub mod users;
