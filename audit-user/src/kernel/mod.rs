//! Everything that talks to the kernel: the eBPF loader and its maps, the
//! start-up sync of pre-existing sessions, sock_diag, and cgroup discovery.

pub mod cgroup;
pub mod loader;
pub mod seed;
pub mod sock_diag;
