//! Counting state: the CIDR index of live sessions, the time-windowed
//! monitors and their state file, and the shared state that queries read and
//! events update.

pub mod index;
pub mod monitors;
pub mod observed;
pub mod persistence;
pub mod state;
