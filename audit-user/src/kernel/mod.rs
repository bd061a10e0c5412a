//! Everything that talks to the kernel: the eBPF loader and its maps, the
//! start-up sync of pre-existing sessions, sock_diag, cgroup discovery, the kernel limits' refusal and cuts;
//! `api::Kernel` is what the agent uses of it (a fake stands in for tests).

pub mod api;
pub mod cgroup;
pub mod cut;
#[cfg(test)]
pub mod fake;
pub mod loader;
pub mod refusal;
pub mod seed;
pub mod sock_diag;
