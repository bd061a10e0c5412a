//! Loads the kernel program, attaches it, and pins maps and links so that counting
//! goes on while the agent is stopped and a new agent takes over the same state.
//!
//! Pinned layout under the pin directory (default /sys/fs/bpf/inbound-audit):
//! one file per map (by name) and `link-sock-ops`, plus `link-set-state` while
//! the close backstop is attached (only as long as seeded sessions remain).

use std::{
    collections::HashMap as StdHashMap,
    fs, io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use audit_common::{
    control, map_names, program_names, session_state, LiveCounts, ServiceName, SessionEvent,
    SocketRecord, FAMILY_V4, FAMILY_V6, LAYOUT_VERSION, MAX_SERVICES, PORT_NOT_WATCHED,
    SYNC_ADJUST,
};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::{
        links::{CgroupAttachMode, FdLink, PinnedLink},
        BtfTracePoint, SockOps, Xdp,
    },
    Btf, Ebpf, EbpfLoader,
};

use crate::domain::ServicePorts;

/// The compiled kernel program, embedded by build.rs (empty when it was not built).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/audit-ebpf.o"));

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/inbound-audit";
const SOCK_OPS_LINK: &str = "link-sock-ops";
const SET_STATE_LINK: &str = "link-set-state";

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
    Sync(io::Error),
    #[error("reading the sessions' socket storage: {0}")]
    SockDiag(#[from] super::sock_diag::SockDiagError),
    #[error("too many services: {count} configured and in use, at most {max}")]
    TooManyServices { count: usize, max: usize },
}

/// Forwards the kernel program's aya-log records (table-full warnings) to `log`.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Live counts read from the kernel maps, per remote IP.
pub type LiveSnapshot = Vec<(std::net::IpAddr, LiveCounts)>;

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
    logger: Option<KernelLogger>,
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

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                log::warn!("kernel program log records will not be shown: {e}");
                None
            }
        };
        Ok(Self {
            logger,
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
        let path = self.pin_dir.join(SET_STATE_LINK);
        let link = match PinnedLink::from_pin(&path) {
            Ok(link) => link,
            Err(_) if !path.exists() => return Ok(false),
            Err(e) => {
                return Err(LoadError::Link {
                    path,
                    message: e.to_string(),
                })
            }
        };
        // Dropping the last reference to the unpinned link detaches the program.
        drop(link.unpin().map_err(|e| LoadError::Link {
            path,
            message: e.to_string(),
        })?);
        Ok(true)
    }

    /// The ring buffer of session events; can be taken once.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The reader of the kernel program's log records; can be taken once.
    pub fn take_logger(&mut self) -> Option<KernelLogger> {
        self.logger.take()
    }

    /// Runs the sync program once on `request` (see audit_common::SessionEvent);
    /// returns its `sync_result`.
    pub fn sync(&self, request: &SessionEvent) -> Result<u32, LoadError> {
        Ok(self.sync_timed(request)?.0)
    }

    /// `sync`, also returning the program's own run time as the kernel timed it
    /// (nanoseconds): the benchmarks' measure of the kernel's map work.
    pub fn sync_timed(&self, request: &SessionEvent) -> Result<(u32, u32), LoadError> {
        run_test(self.sync_program_fd()?, request).map_err(LoadError::Sync)
    }

    /// Adds `delta` to the kernel's count of (`ip`, `slot`) atomically.
    pub fn adjust_live(
        &self,
        ip: std::net::IpAddr,
        slot: u8,
        delta: i64,
    ) -> Result<u32, LoadError> {
        let (family, addr) = match ip {
            std::net::IpAddr::V4(v4) => {
                let mut addr = [0u8; 16];
                addr[..4].copy_from_slice(&v4.octets());
                (FAMILY_V4, addr)
            }
            std::net::IpAddr::V6(v6) => (FAMILY_V6, v6.octets()),
        };
        self.sync(&SessionEvent {
            cookie: delta as u64,
            addr,
            kind: SYNC_ADJUST,
            family,
            service: slot,
            _pad: [0; 5],
        })
    }

    /// One record per session the kernel counts: the SOCKETS records (seeded
    /// sessions, and those accepted while the agent seeded) and the socket
    /// storage of every other accepted session still open, read through sock_diag.
    pub fn snapshot_tracked(&self) -> Result<Vec<SocketRecord>, LoadError> {
        let mut records = self.snapshot_records()?;
        let live = super::sock_diag::state_mask(&super::sock_diag::LIVE_STATES);
        records.extend(
            super::sock_diag::dump_tcp_with_sessions(live, self.sessions_fd())?
                .iter()
                .filter_map(|socket| socket.session)
                .filter(|session| session.state == session_state::COUNTED)
                .map(|session| session.record),
        );
        Ok(records)
    }

    /// Every record in SOCKETS: seeded sessions, and those accepted while the
    /// agent seeded.
    pub fn snapshot_records(&self) -> Result<Vec<SocketRecord>, LoadError> {
        self.sockets
            .iter()
            .map(|entry| entry.map(|(_, record)| record))
            .collect::<Result<_, _>>()
            .map_err(|source| LoadError::Map {
                name: map_names::SOCKETS,
                source,
            })
    }

    /// Deletes the per-IP entries that `snapshot` saw at zero. The kernel leaves
    /// them (deleting there could race an increment); an increment that races
    /// this delete is lost from the per-IP map only, and the reconciler restores
    /// it from the socket records. Returns how many were removed.
    pub fn collect_zero_entries(&mut self, snapshot: &LiveSnapshot) -> usize {
        let mut removed = 0;
        for (ip, counts) in snapshot {
            if counts.sessions.iter().any(|&c| c != 0) {
                continue;
            }
            let result = match ip {
                std::net::IpAddr::V4(v4) => self.live_v4.remove(&Key::new(32, v4.octets())),
                std::net::IpAddr::V6(v6) => self.live_v6.remove(&Key::new(128, v6.octets())),
            };
            removed += usize::from(result.is_ok());
        }
        removed
    }

    /// File descriptor of the sync program, for BPF_PROG_TEST_RUN.
    fn sync_program_fd(&self) -> Result<BorrowedFd<'_>, LoadError> {
        let program = self
            .ebpf
            .program(program_names::SYNC)
            .ok_or(LoadError::MissingProgram(program_names::SYNC))?;
        let xdp: &Xdp = program
            .try_into()
            .map_err(program_error(program_names::SYNC))?;
        let fd = xdp.fd().map_err(program_error(program_names::SYNC))?;
        Ok(fd.as_fd())
    }

    /// Gives each configured service a slot, keeping the slots services had in the
    /// pinned state (their counts stay theirs), and points the ports at them.
    /// Returns name → slot.
    pub fn configure_services(
        &mut self,
        services: &[ServicePorts],
        slot_in_use: impl Fn(u8) -> bool,
    ) -> Result<StdHashMap<String, u8>, LoadError> {
        let map_error = |source| LoadError::Map {
            name: map_names::SERVICE_NAMES,
            source,
        };
        let mut names: Vec<Option<String>> = (0..MAX_SERVICES as u32)
            .map(|slot| {
                self.service_names
                    .get(&slot, 0)
                    .map(|name| decode_name(&name))
            })
            .collect::<Result<_, _>>()
            .map_err(map_error)?;
        let mut slots = StdHashMap::new();
        for service in services {
            if let Some(slot) = names
                .iter()
                .position(|n| n.as_deref() == Some(&service.name))
            {
                slots.insert(service.name.clone(), slot as u8);
            }
        }
        for service in services {
            if slots.contains_key(&service.name) {
                continue;
            }
            // A free slot, or one whose old service is gone and counts nothing now.
            let free = (0..MAX_SERVICES).find(|&slot| {
                !slots.values().any(|&s| s as usize == slot)
                    && match &names[slot] {
                        None => true,
                        Some(_) => !slot_in_use(slot as u8),
                    }
            });
            let Some(slot) = free else {
                return Err(LoadError::TooManyServices {
                    count: services.len(),
                    max: MAX_SERVICES,
                });
            };
            names[slot] = Some(service.name.clone());
            self.service_names
                .set(slot as u32, encode_name(&service.name), 0)
                .map_err(map_error)?;
            slots.insert(service.name.clone(), slot as u8);
        }

        let map_error = |source| LoadError::Map {
            name: map_names::PORT_SERVICES,
            source,
        };
        let mut wanted = StdHashMap::new();
        for service in services {
            for &port in &service.ports {
                wanted.insert(port, u32::from(slots[&service.name]) + 1);
            }
        }
        // A previous agent may have watched other ports: the first time, read
        // the whole array (65,536 lookups); after that our copy is the truth.
        // A failed update leaves no copy, so the next call reads it all again.
        let watched = match self.watched_ports.take() {
            Some(watched) => watched,
            None => {
                let mut found = StdHashMap::new();
                for port in 0..=u16::MAX {
                    let value = self
                        .port_services
                        .get(&u32::from(port), 0)
                        .map_err(map_error)?;
                    if value != PORT_NOT_WATCHED {
                        found.insert(port, value);
                    }
                }
                found
            }
        };
        for &port in watched.keys().filter(|p| !wanted.contains_key(p)) {
            self.port_services
                .set(u32::from(port), PORT_NOT_WATCHED, 0)
                .map_err(map_error)?;
        }
        for (&port, &value) in &wanted {
            if watched.get(&port) != Some(&value) {
                self.port_services
                    .set(u32::from(port), value, 0)
                    .map_err(map_error)?;
            }
        }
        self.watched_ports = Some(wanted);
        Ok(slots)
    }

    /// Every per-IP entry of the kernel's live-count maps (zero entries included).
    pub fn snapshot_live(&self) -> Result<LiveSnapshot, LoadError> {
        let mut out = Vec::new();
        for entry in self.live_v4.iter() {
            let (key, counts) = entry.map_err(|source| LoadError::Map {
                name: map_names::LIVE_V4,
                source,
            })?;
            out.push((std::net::IpAddr::from(key.data()), counts));
        }
        for entry in self.live_v6.iter() {
            let (key, counts) = entry.map_err(|source| LoadError::Map {
                name: map_names::LIVE_V6,
                source,
            })?;
            out.push((std::net::IpAddr::from(key.data()), counts));
        }
        Ok(out)
    }

    /// A kernel-side counter from `audit_common::stat`, summed over CPUs.
    pub fn stat(&self, index: u32) -> u64 {
        self.stats
            .get(&index, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }
}

/// Removes everything the agent pinned: links (which detaches the programs) and maps.
pub fn cleanup(pin_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(pin_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        fs::remove_file(&path)?;
        removed.push(path);
    }
    fs::remove_dir(pin_dir)?;
    Ok(removed)
}

const BPFFS_MOUNT_POINT: &str = "/sys/fs/bpf";

/// Pinning needs bpffs. Most systems mount it at /sys/fs/bpf at boot; where none
/// is mounted (minimal VMs, containers), mount it there as systemd would.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), LoadError> {
    use nix::mount::{mount, MsFlags};
    let parent = pin_dir.parent().unwrap_or(pin_dir);
    if is_bpffs(parent) || is_bpffs(pin_dir) {
        return Ok(());
    }
    let bpffs_error = |source| LoadError::Bpffs {
        path: parent.to_path_buf(),
        source,
    };
    if parent != Path::new(BPFFS_MOUNT_POINT) {
        return Err(bpffs_error(io::Error::new(
            io::ErrorKind::Unsupported,
            "only /sys/fs/bpf is mounted automatically; mount bpffs at the pin directory's parent",
        )));
    }
    mount(
        Some("bpffs"),
        BPFFS_MOUNT_POINT,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|errno| bpffs_error(errno.into()))?;
    log::info!("mounted bpffs at {BPFFS_MOUNT_POINT} for pinning");
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    use nix::sys::statfs::{statfs, BPF_FS_MAGIC};
    statfs(path).is_ok_and(|stat| stat.filesystem_type() == BPF_FS_MAGIC)
}

fn check_layout(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<(), LoadError> {
    let map = ebpf
        .map_mut(map_names::LAYOUT)
        .ok_or(LoadError::MissingMap(map_names::LAYOUT))?;
    let mut layout: Array<&mut MapData, u32> =
        Array::try_from(map).map_err(|source| LoadError::Map {
            name: map_names::LAYOUT,
            source,
        })?;
    let map_error = |source| LoadError::Map {
        name: map_names::LAYOUT,
        source,
    };
    match layout.get(&0, 0).map_err(map_error)? {
        0 => layout.set(0, LAYOUT_VERSION, 0).map_err(map_error),
        LAYOUT_VERSION => Ok(()),
        found => Err(LoadError::Layout {
            dir: pin_dir.to_path_buf(),
            found,
            expected: LAYOUT_VERSION,
        }),
    }
}

/// Attaches the (loaded) tp_btf close backstop and pins its link.
fn attach_backstop(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<(), LoadError> {
    let set_state: &mut BtfTracePoint = program(ebpf, program_names::SET_STATE)?;
    let link_id = set_state
        .attach()
        .map_err(program_error(program_names::SET_STATE))?;
    let link: FdLink = set_state
        .take_link(link_id)
        .map_err(program_error(program_names::SET_STATE))?
        .into();
    replace_pinned_link(link, &pin_dir.join(SET_STATE_LINK))
}

fn set_mirroring(control: &mut Array<MapData, u32>, on: bool) -> Result<(), LoadError> {
    control
        .set(control::MIRROR_TO_SOCKETS, u32::from(on), 0)
        .map_err(|source| LoadError::Map {
            name: map_names::CONTROL,
            source,
        })
}

fn replace_pinned_link(link: FdLink, path: &Path) -> Result<(), LoadError> {
    let link_error = |message: String| LoadError::Link {
        path: path.to_path_buf(),
        message,
    };
    if path.exists() {
        // Dropping the unpinned old link detaches the previous agent's program.
        let old = PinnedLink::from_pin(path).map_err(|e| link_error(e.to_string()))?;
        drop(old.unpin().map_err(|e| link_error(e.to_string()))?);
    }
    // The pin keeps the link (and the program) attached after this process exits.
    let pinned = link.pin(path).map_err(|e| link_error(e.to_string()))?;
    drop(pinned);
    Ok(())
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(program_error(name))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    T::try_from(map).map_err(|source| LoadError::Map { name, source })
}

fn program_error(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> LoadError {
    move |source| LoadError::Program { name, source }
}

fn decode_name(name: &ServiceName) -> Option<String> {
    let len = name
        .bytes
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(name.bytes.len());
    (len > 0).then(|| String::from_utf8_lossy(&name.bytes[..len]).into_owned())
}

fn encode_name(name: &str) -> ServiceName {
    let mut out = ServiceName::default();
    let bytes = name.as_bytes();
    let len = bytes.len().min(out.bytes.len());
    out.bytes[..len].copy_from_slice(&bytes[..len]);
    out
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// BPF_PROG_TEST_RUN: runs `program` once with `request` as its packet data;
/// returns its result and run time in nanoseconds.
fn run_test(program: BorrowedFd<'_>, request: &SessionEvent) -> io::Result<(u32, u32)> {
    let mut attr = TestRunAttr {
        prog_fd: program.as_raw_fd() as u32,
        data_size_in: std::mem::size_of::<SessionEvent>() as u32,
        data_in: request as *const SessionEvent as u64,
        repeat: 1,
        ..TestRunAttr::default()
    };
    // SAFETY: attr is a valid, zero-padded bpf_attr prefix; data_in points to
    // size_of::<SessionEvent>() readable bytes that outlive the call; the kernel
    // writes only retval/duration/size fields inside attr.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>() as u32,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((attr.retval, attr.duration))
}
