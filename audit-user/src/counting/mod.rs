//! Counting state: the CIDR index of live sessions, the time-windowed
//! monitors, and the shared state that queries read and events update.

pub mod index;
pub mod monitors;
pub mod state;
