//! What can go wrong loading the kernel program or using its maps and sync
//! program: one enum, so the agent reports every kernel failure the same way.

use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this binary was built without its eBPF program; build it with `cargo xtask build`")]
    NoObject,
    #[error("cannot create the pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("{path} is not on a bpf file system and mounting one there failed: {source}")]
    Bpffs { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object failed: {0} (root or CAP_BPF+CAP_NET_ADMIN+CAP_PERFMON are needed)")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("reading kernel BTF: {0}")]
    Btf(#[from] aya::BtfError),
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("pinning link {path}: {message}")]
    Link { path: PathBuf, message: String },
    #[error(
        "the pinned state in {dir} has layout version {found}, this agent uses {expected}; \
         run `inbound-audit cleanup --pin-dir {dir}` to start over (live counts restart from sock_diag)"
    )]
    Layout {
        dir: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("running the sync program: {0}")]
    Sync(#[source] aya::programs::ProgramError),
    #[error("reading the sessions' socket storage: {0}")]
    SockDiag(#[from] crate::kernel::sock_diag::SockDiagError),
    #[error("cannot open the agent's network namespace (/proc/self/ns/net): {source}")]
    Netns { source: io::Error },
    #[error("too many services: {count} configured and in use, at most {max}")]
    TooManyServices { count: usize, max: usize },
}
