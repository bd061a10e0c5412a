//! Loads the kernel program, attaches it, and pins maps and links so that counting
//! goes on while the agent is stopped and a new agent takes over the same state.
//!
//! Pinned layout under the pin directory (default /sys/fs/bpf/inbound-audit):
//! one file per map (by name) and `link-sock-ops`, plus `link-set-state` while
//! the close backstop is attached (only as long as seeded sessions remain).
//! State pinned by an agent of another layout (the LAYOUT map) is replaced and
//! its sessions seeded again, never refused (see `pins::replace_other_layout`).
//!
//! Split by seam: `pins` (bpffs, layout check, links), `sync` (the sync
//! program and its test runs), `maps` (the maps' reads and writes),
//! `services` (slot assignment), `error`.

pub mod error;
mod maps;
mod pins;
pub mod services;
mod sync;

use std::{
    collections::HashMap as StdHashMap,
    fs,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
};

use audit_common::{map_names, program_names, LiveCounts, ServiceName, SocketRecord};
use aya::{
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::{
        links::{CgroupAttachMode, FdLink},
        BtfTracePoint, SockOps, Xdp,
    },
    Btf, Ebpf, EbpfLoader,
};

use self::pins::{
    attach_backstop, check_layout, detach_backstop, ensure_bpffs, program, program_error,
    replace_other_layout, replace_pinned_link, set_mirroring, take_map, SET_STATE_LINK,
    SOCK_OPS_LINK,
};
pub use self::{
    error::LoadError,
    pins::{cleanup, FreshPins},
};
use crate::{
    config::kernel_limits::KernelLimitConfig,
    kernel::refusal::{Refusal, RefusalStatus},
};

/// The compiled kernel program, embedded by build.rs (empty when it was not built).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/audit-ebpf.o"));

pub const DEFAULT_PIN_DIR: &str = crate::domain::DEFAULT_PIN_DIR;

/// The loaded program with the handles the agent keeps.
pub struct KernelProgram {
    live_v4: LpmTrie<MapData, [u8; 4], LiveCounts>,
    live_v6: LpmTrie<MapData, [u8; 16], LiveCounts>,
    sockets: HashMap<MapData, u64, SocketRecord>,
    port_services: Array<MapData, u32>,
    /// What `port_services` holds (port → slot + 1), once read or written.
    watched_ports: Option<StdHashMap<u16, u32>>,
    service_names: Array<MapData, ServiceName>,
    stats: PerCpuArray<MapData, u64>,
    control: Array<MapData, u32>,
    /// The accepted sessions' socket storage; read through sock_diag, by fd.
    sessions: MapData,
    events: Option<RingBuf<MapData>>,
    /// Kernel limits' maps and the sk_lookup link (see kernel::refusal).
    refusal: Refusal,
    pin_dir: PathBuf,
    // Keeps the sync program loaded; it is run through BPF_PROG_TEST_RUN.
    ebpf: Ebpf,
}

pub struct LoadOptions<'a> {
    pub pin_dir: &'a Path,
    pub cgroup: &'a Path,
    /// Per-IP entries per family; a new IP beyond it is not counted (STATS).
    pub max_tracked_ips: u32,
    /// SOCKETS records: seeded sessions, and those accepted while the agent seeds.
    pub max_tracked_sessions: u32,
    /// Size of the event ring buffer: a power of two, at least a page.
    pub event_ring_bytes: u32,
}

impl KernelProgram {
    /// Loads (or takes over) the pinned state, attaches the programs to `cgroup`,
    /// and replaces any links a previous agent left, new before old, so no
    /// connection goes unseen in between (the socket's storage keeps counts exact
    /// while both are attached).
    pub fn load(options: &LoadOptions<'_>) -> Result<Self, LoadError> {
        if EBPF_OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        let pin_dir = options.pin_dir.to_path_buf();
        ensure_bpffs(&pin_dir)?;
        replace_other_layout(&pin_dir)?;
        fs::create_dir_all(&pin_dir).map_err(|source| LoadError::PinDir {
            path: pin_dir.clone(),
            source,
        })?;
        let btf = Btf::from_sys_fs()?;
        // Sizes apply when the maps are created; pinned maps keep theirs.
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .default_map_pin_directory(&pin_dir)
            .map_max_entries(map_names::LIVE_V4, options.max_tracked_ips)
            .map_max_entries(map_names::LIVE_V6, options.max_tracked_ips)
            .map_max_entries(map_names::SOCKETS, options.max_tracked_sessions)
            .map_max_entries(map_names::EVENTS, options.event_ring_bytes)
            .load(EBPF_OBJECT)?;

        check_layout(&mut ebpf, &pin_dir)?;
        let mut control: Array<MapData, u32> = take_map(&mut ebpf, map_names::CONTROL)?;
        // Before attaching: every session accepted from here until the agent
        // has seeded gets a SOCKETS record, so seeding cannot count it twice.
        set_mirroring(&mut control, true)?;
        let sessions = match ebpf.take_map(map_names::SESSIONS) {
            Some(aya::maps::Map::SkStorage(data)) => data,
            _ => return Err(LoadError::MissingMap(map_names::SESSIONS)),
        };

        let sock_ops: &mut SockOps = program(&mut ebpf, program_names::SOCK_OPS)?;
        sock_ops
            .load()
            .map_err(program_error(program_names::SOCK_OPS))?;
        let cgroup = fs::File::open(options.cgroup).map_err(|source| LoadError::Cgroup {
            path: options.cgroup.to_path_buf(),
            source,
        })?;
        let link_id = sock_ops
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(program_error(program_names::SOCK_OPS))?;
        let link: FdLink = sock_ops
            .take_link(link_id)
            .map_err(program_error(program_names::SOCK_OPS))?
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| LoadError::Link {
                path: pin_dir.join(SOCK_OPS_LINK),
                message: e.to_string(),
            })?;
        replace_pinned_link(link, &pin_dir.join(SOCK_OPS_LINK))?;

        // Attached before the agent seeds anything, so that no seeded session
        // can close unseen; the agent detaches it once none remains.
        let set_state: &mut BtfTracePoint = program(&mut ebpf, program_names::SET_STATE)?;
        set_state
            .load("inet_sock_set_state", &btf)
            .map_err(program_error(program_names::SET_STATE))?;
        attach_backstop(&mut ebpf, &pin_dir)?;

        let sync: &mut Xdp = program(&mut ebpf, program_names::SYNC)?;
        sync.load().map_err(program_error(program_names::SYNC))?;

        Ok(Self {
            live_v4: take_map(&mut ebpf, map_names::LIVE_V4)?,
            live_v6: take_map(&mut ebpf, map_names::LIVE_V6)?,
            sockets: take_map(&mut ebpf, map_names::SOCKETS)?,
            port_services: take_map(&mut ebpf, map_names::PORT_SERVICES)?,
            watched_ports: None,
            service_names: take_map(&mut ebpf, map_names::SERVICE_NAMES)?,
            stats: take_map(&mut ebpf, map_names::STATS)?,
            control,
            sessions,
            events: Some(take_map(&mut ebpf, map_names::EVENTS)?),
            refusal: Refusal::take(&mut ebpf)?,
            pin_dir,
            ebpf,
        })
    }

    /// Has accepted sessions tracked by SOCKETS records while the agent seeds
    /// (see `control::MIRROR_TO_SOCKETS`); the start-up does it from `load`.
    pub fn start_mirroring(&mut self) -> Result<(), LoadError> {
        set_mirroring(&mut self.control, true)
    }

    /// Ends that mirroring: call once the seeding is done.
    pub fn stop_mirroring(&mut self) -> Result<(), LoadError> {
        set_mirroring(&mut self.control, false)
    }

    /// Attaches the tp_btf close backstop again, before sessions are seeded
    /// after start-up (newly watched ports). Returns whether it was detached.
    pub fn attach_close_backstop(&mut self) -> Result<bool, LoadError> {
        if self.close_backstop_attached() {
            return Ok(false);
        }
        attach_backstop(&mut self.ebpf, &self.pin_dir)?;
        Ok(true)
    }

    /// The SESSIONS map, for sock_diag requests that read sockets' storage.
    pub fn sessions_fd(&self) -> BorrowedFd<'_> {
        self.sessions.fd().as_fd()
    }

    /// Whether the tp_btf close backstop is attached (its link is pinned).
    pub fn close_backstop_attached(&self) -> bool {
        self.pin_dir.join(SET_STATE_LINK).exists()
    }

    /// Detaches the tp_btf close backstop. It runs on every TCP state change of
    /// the host and is needed only for seeded sessions (their sockets never
    /// asked for sock_ops state callbacks), so once none remains it is pure
    /// cost. Only a start-up seeds, and a new agent attaches it again first.
    /// Returns whether it was attached.
    pub fn detach_close_backstop(&mut self) -> Result<bool, LoadError> {
        detach_backstop(&self.pin_dir)
    }

    /// Puts the kernel limits in place (see `Refusal::configure`), their
    /// counts rebuilt from the per-IP counts where a limit changed.
    pub fn configure_refusal(
        &mut self,
        limits: &[KernelLimitConfig],
        slots: &StdHashMap<String, u8>,
    ) -> Result<RefusalStatus, LoadError> {
        let live = if limits.is_empty() {
            Vec::new()
        } else {
            self.snapshot_live()?
        };
        self.refusal
            .configure(&mut self.ebpf, &mut self.control, limits, slots, &live)
    }

    /// The kernel limits' state, for the agent's reports.
    pub fn refusal(&mut self) -> &mut Refusal {
        &mut self.refusal
    }

    /// The ring buffer of session events; can be taken once.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }
}
