//! The agent: loads the kernel side, builds the index from the kernel's maps,
//! seeds sessions that predate it, then serves queries while following the
//! kernel's events and reconciling with its maps.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use audit_common::{record_origin, stat, sync_result, SessionEvent, SocketRecord, MAX_SERVICES};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use crate::{
    adapters::postfix,
    config::Config,
    kernel::{
        cgroup,
        loader::{self, KernelProgram, LoadError, LoadOptions},
        seed::{self, SeedError},
    },
    monitors::{self, StateError},
    privileges,
    server::{self, QuerySocket, SocketError},
    shutdown::{self, Shutdown},
    state::{
        diff_tallies, tally_live, tally_records, AgentStats, EventSource, Reconciler, Setup,
        SharedState, Tally,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("finding the cgroup to watch: {0}")]
    Cgroup(std::io::Error),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("start-up sync of existing sessions: {0}")]
    Seed(#[from] SeedError),
    #[error("query socket: {0}")]
    Socket(#[from] SocketError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Reads the configuration again (file and flags), for SIGHUP.
pub type ConfigSource = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

pub struct AgentOptions {
    pub config: Config,
    /// Remove pinned programs and maps on exit (otherwise counting goes on).
    pub detach_on_exit: bool,
    /// Where SIGHUP reads the new configuration; None: SIGHUP is ignored.
    pub reload: Option<ConfigSource>,
}

/// Runs the agent until SIGTERM/SIGINT. Start-up (sockets, loading, attaching,
/// seeding) runs on this thread alone, so that dropping capabilities afterwards
/// covers every thread the runtime then creates: capabilities are per thread.
pub fn run(options: AgentOptions) -> Result<(), AgentError> {
    return_large_blocks_on_free();
    // Held back, not lost, while the handlers are not installed yet: a stop
    // requested during start-up is still a clean stop.
    let held = HeldSignals::block();
    let prepared = prepare(options)?;
    release_freed_memory();
    match privileges::keep_only(&[privileges::CAP_BPF]) {
        Ok(kept) => log::info!("dropped every capability but CAP_BPF (effective set {kept:#x})"),
        Err(e) => log::warn!("could not drop capabilities: {e}"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| AgentError::Io {
            what: "starting the async runtime",
            source,
        })?;
    runtime.block_on(serve(prepared, held))
}

/// Everything start-up produced, handed to the runtime.
struct Prepared {
    socket: QuerySocket,
    policy_socket: Option<QuerySocket>,
    program: KernelProgram,
    events: RingBuf<MapData>,
    state: Arc<SharedState>,
    detach_on_exit: bool,
    reload: Option<ConfigSource>,
}

fn prepare(options: AgentOptions) -> Result<Prepared, AgentError> {
    let AgentOptions {
        config,
        detach_on_exit,
        reload,
    } = options;
    let cgroup_path: PathBuf = match &config.cgroup {
        Some(path) => path.clone(),
        None => cgroup::cgroup2_root().map_err(AgentError::Cgroup)?,
    };
    // The socket first: a second agent on the same path must fail before it
    // touches the kernel. Clients that connect meanwhile wait in the backlog.
    let socket = QuerySocket::bind(
        &config.socket,
        config.socket_mode,
        config.socket_group.as_deref(),
    )?;
    let policy_socket = config
        .policy_socket
        .as_deref()
        .map(|path| {
            QuerySocket::bind(
                path,
                config.policy_socket_mode,
                config.policy_socket_group.as_deref(),
            )
        })
        .transpose()?;
    let mut program = KernelProgram::load(&LoadOptions {
        pin_dir: &config.pin_dir,
        cgroup: &cgroup_path,
        max_tracked_ips: config.max_tracked_ips,
        max_tracked_sessions: config.max_tracked_sessions,
        event_ring_bytes: config.event_ring_bytes,
    })?;

    // Events queued while no agent ran are already in the kernel's records: drop
    // them, then take the records as the starting point (one snapshot: at 1M
    // sessions reading them takes seconds).
    let mut events = program
        .take_events()
        .ok_or(LoadError::MissingMap("EVENTS"))?;
    while events.next().is_some() {}
    let records = program.snapshot_tracked()?;

    // A slot whose service is gone can be reused only once no session holds it.
    let mut slot_in_use = [false; MAX_SERVICES];
    for record in &records {
        if let Some(used) = slot_in_use.get_mut(record.service as usize) {
            *used = true;
        }
    }
    let slots = program.configure_services(&config.services, |slot| slot_in_use[slot as usize])?;
    let ports: HashMap<u16, u8> = config
        .services
        .iter()
        .flat_map(|s| s.ports.iter().map(|&p| (p, slots[&s.name])))
        .collect();
    let state = Arc::new(SharedState::new(config, slots));
    state.write_sessions().load(&tally_records(&records));
    load_monitor_state(&state);

    // Seeded sessions reach the index as ordinary events, read once the
    // runtime follows the ring buffer.
    let report = seed::seed_existing(&program, &ports, state.setup().config.cgroup.as_deref())?;
    // Seeding is over: from here on an accepted session needs no SOCKETS record.
    program.stop_mirroring()?;
    // An upper bound (a seeded session may have closed since the snapshot):
    // the first reconcile pass detaches the backstop if it was one too many.
    let seeded = seeded_records(&records) + report.seeded;
    release_close_backstop(&mut program, seeded)?;
    AgentStats::set(&state.stats.kernel_seeded_sessions, seeded as u64);
    AgentStats::set(
        &state.stats.close_backstop_attached,
        program.close_backstop_attached().into(),
    );
    log::info!(
        "watching cgroup {}; services {}; {} sessions from pinned state; start-up sync: {} seeded, {} already tracked, {} closed meanwhile",
        cgroup_path.display(),
        state.setup().config.services.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
        records.len(),
        report.seeded,
        report.already_tracked,
        report.vanished,
    );
    if seeded > 0 {
        log::info!(
            "{seeded} sessions predate the kernel program: the tp_btf close backstop stays attached until they close"
        );
    }
    Ok(Prepared {
        socket,
        policy_socket,
        program,
        events,
        state,
        detach_on_exit,
        reload,
    })
}

async fn serve(prepared: Prepared, held: HeldSignals) -> Result<(), AgentError> {
    let Prepared {
        socket,
        policy_socket,
        mut program,
        events,
        state,
        detach_on_exit,
        reload,
    } = prepared;
    let mut signals = Signals::install()?;
    held.release();

    let (trigger, shutdown) = shutdown::channel();
    if let Some(logger) = program.take_logger() {
        tokio::spawn(forward_kernel_logs(logger, shutdown.clone()));
    }
    let events_task = tokio::spawn(follow_events(events, state.clone(), shutdown.clone()));
    let program = Arc::new(Mutex::new(program));
    let reconcile_task = tokio::spawn(reconcile(program.clone(), state.clone(), shutdown.clone()));

    log::info!("serving queries on {}", socket.path().display());
    let server_task = tokio::spawn(server::serve(socket, state.clone(), shutdown.clone()));
    let policy_task = policy_socket.map(|socket| {
        log::info!(
            "serving Postfix policy requests on {} with {} limits",
            socket.path().display(),
            state.setup().config.policy_limits.len()
        );
        tokio::spawn(postfix::serve(socket, state.clone(), shutdown.clone()))
    });

    while signals.next().await == Signal::Reload {
        match &reload {
            Some(source) => apply_reload(source, &program, &state),
            None => log::info!("SIGHUP ignored: no configuration source to read again"),
        }
    }
    log::info!("shutting down");
    trigger.trigger();
    let _ = server_task.await;
    if let Some(task) = policy_task {
        let _ = task.await;
    }
    let _ = events_task.await;
    let _ = reconcile_task.await;

    save_monitor_state(&state);
    let pin_dir = state.setup().config.pin_dir.clone();
    drop(program);
    if detach_on_exit {
        let removed = loader::cleanup(&pin_dir).map_err(|source| AgentError::Io {
            what: "removing pinned state",
            source,
        })?;
        log::info!(
            "detached: removed {} pinned objects from {}",
            removed.len(),
            pin_dir.display()
        );
    } else {
        log::info!(
            "kernel programs stay attached; counts go on in {}",
            pin_dir.display()
        );
    }
    Ok(())
}

/// The index's arenas and maps grow by doubling, and start-up and reconcile
/// passes build large tables they drop again. glibc serves such blocks from the
/// heap once its threshold has adapted upwards (up to 32 MiB), and a freed block
/// then stays resident wherever a live one sits above it: measured at 100k
/// IPs (before the index had its hash maps), 184 bytes of RSS per IP instead
/// of 50. A fixed threshold keeps every
/// block of 64 KiB or more in its own mapping, returned whole on free (and
/// grown with mremap, without copying).
fn return_large_blocks_on_free() {
    // SAFETY: mallopt only changes the allocator's tuning (under its own lock).
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024) } != 1 {
        log::warn!("could not set the malloc mmap threshold; freed memory may stay resident");
    }
}

/// Start-up and every reconcile pass build large short-lived tables (the
/// kernel's records, tallies); glibc keeps such freed memory in the heap, where
/// it would count as the agent's for good. Hand it back.
fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
    unsafe { libc::malloc_trim(0) };
}

/// SIGTERM, SIGINT and SIGHUP blocked on this thread (and so on every thread
/// created from it) until the runtime's handlers exist; then unblocked here, on
/// the thread that runs `block_on`, so pending ones are delivered to them.
struct HeldSignals(libc::sigset_t);

impl HeldSignals {
    fn block() -> Self {
        // SAFETY: sigset_t is plain data, filled by sigemptyset/sigaddset.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, signal);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Self(set)
        }
    }

    fn release(self) {
        // SAFETY: unblocks the set blocked in `block`.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &self.0, std::ptr::null_mut()) };
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGHUP.
    Reload,
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, AgentError> {
        let io = |source| AgentError::Io {
            what: "installing signal handlers",
            source,
        };
        Ok(Self {
            term: signal(SignalKind::terminate()).map_err(io)?,
            int: signal(SignalKind::interrupt()).map_err(io)?,
            hup: signal(SignalKind::hangup()).map_err(io)?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

/// SIGHUP: services, monitors, limits, access and timeouts take effect without
/// losing a count; an invalid configuration leaves the running one in place.
fn apply_reload(source: &ConfigSource, program: &Mutex<KernelProgram>, state: &SharedState) {
    let mut config = match source() {
        Ok(config) => config,
        Err(e) => {
            log::error!("SIGHUP: new configuration refused, the running one stays: {e}");
            return;
        }
    };
    let running = state.setup();
    let fixed = config.keep_restart_only(&running.config);
    if !fixed.is_empty() {
        log::warn!(
            "SIGHUP: {} change only on restart; keeping the running values",
            fixed.join(", ")
        );
    }
    let watched_before: std::collections::HashSet<u16> = running
        .config
        .services
        .iter()
        .flat_map(|s| s.ports.iter().copied())
        .collect();
    let slots = {
        let mut program = program.lock().unwrap_or_else(|p| p.into_inner());
        let in_use = match program.snapshot_tracked() {
            Ok(records) => records
                .iter()
                .map(|r| r.service)
                .collect::<std::collections::HashSet<u8>>(),
            Err(e) => {
                log::error!("SIGHUP: reading the kernel's records failed, the running configuration stays: {e}");
                return;
            }
        };
        let slots = match program
            .configure_services(&config.services, |slot| in_use.contains(&slot))
        {
            Ok(slots) => slots,
            Err(e) => {
                log::error!("SIGHUP: services not applied, the running configuration stays: {e}");
                return;
            }
        };
        let newly_watched: HashMap<u16, u8> = config
            .services
            .iter()
            .flat_map(|s| s.ports.iter().map(|&p| (p, slots[&s.name])))
            .filter(|(port, _)| !watched_before.contains(port))
            .collect();
        if !newly_watched.is_empty() {
            seed_newly_watched(
                &mut program,
                &newly_watched,
                config.cgroup.as_deref(),
                state,
            );
        }
        slots
    };
    state
        .lock_monitors()
        .reconfigure(&config.monitors, config.max_tracked_ips_per_monitor);
    log::info!(
        "SIGHUP: configuration reloaded: services {}; monitors [{}]; {} policy limits",
        config
            .services
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        config
            .monitors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        config.policy_limits.len()
    );
    state.replace_setup(Setup { config, slots });
}

/// Counts the sessions already open on ports a reload started watching, as
/// the start-up does for every port: sock_ops never saw them accepted.
fn seed_newly_watched(
    program: &mut KernelProgram,
    ports: &HashMap<u16, u8>,
    cgroup: Option<&std::path::Path>,
    state: &SharedState,
) {
    let seeded = (|| -> Result<seed::SeedReport, seed::SeedError> {
        // As at start-up: the backstop before anything is seeded, and
        // sessions accepted meanwhile tracked by record, so none counts twice.
        program.start_mirroring()?;
        program.attach_close_backstop()?;
        let report = seed::seed_existing(program, ports, cgroup);
        program.stop_mirroring()?;
        report
    })();
    match seeded {
        Ok(report) => {
            AgentStats::set(
                &state.stats.close_backstop_attached,
                program.close_backstop_attached().into(),
            );
            log::info!(
                "SIGHUP: newly watched ports {:?}: {} open sessions seeded, {} already tracked, {} closed meanwhile",
                ports.keys().collect::<Vec<_>>(),
                report.seeded,
                report.already_tracked,
                report.vanished
            );
        }
        Err(e) => {
            let _ = program.stop_mirroring();
            log::error!(
                "SIGHUP: sessions already open on newly watched ports are not counted: {e}"
            );
        }
    }
}

async fn forward_kernel_logs(logger: loader::KernelLogger, mut stop: Shutdown) {
    // SAFETY: the logger owns its ring buffer fd, open and unchanged until the
    // AsyncFd that owns the logger is dropped.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let Ok(mut logger) = registered else {
        log::warn!("cannot poll the kernel program's log ring buffer");
        return;
    };
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            guard = logger.readable_mut() => match guard {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(_) => return,
            },
        }
    }
}

/// The kernel's ring buffer as the state's event source.
struct RingSource(RingBuf<MapData>);

impl EventSource for RingSource {
    fn take_available(&mut self, out: &mut Vec<SessionEvent>) {
        while let Some(item) = self.0.next() {
            if item.len() == std::mem::size_of::<SessionEvent>() {
                // SAFETY: the item holds exactly one SessionEvent written by the
                // kernel program; read_unaligned copes with any alignment.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const SessionEvent) });
            }
        }
    }
}

/// The ring buffer's descriptor, for readiness only; the ring itself belongs
/// to the shared state, which outlives this task.
struct RingFd(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for RingFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// How often pending events are applied when no query asks first, so the
/// monitors' windows see connections on time.
const DRAIN_INTERVAL: Duration = Duration::from_millis(100);

/// Hands the ring to the state (queries drain it) and drains it here when the
/// kernel wakes us (the ring is filling) or on a short timer.
async fn follow_events(events: RingBuf<MapData>, state: Arc<SharedState>, mut stop: Shutdown) {
    let fd = RingFd(std::os::fd::AsRawFd::as_raw_fd(&events));
    state.attach_events(Box::new(RingSource(events)));
    // SAFETY: the descriptor belongs to the ring now owned by `state`, which
    // this task keeps alive (Arc) for as long as the AsyncFd exists.
    let registered = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
    let ring = match registered {
        Ok(ring) => Some(ring),
        Err(e) => {
            log::warn!("cannot poll the event ring buffer ({e}); draining on the timer only");
            None
        }
    };
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            _ = tick.tick() => {}
            guard = async { ring.as_ref().expect("checked").readable().await }, if ring.is_some() => {
                if let Ok(mut guard) = guard {
                    guard.clear_ready();
                }
            }
        }
        state.drain_events(server::unix_now());
    }
}

/// Reads back the monitor windows saved at the last shutdown. A file that does
/// not check out is set aside (renamed) with a message, never half-loaded.
fn load_monitor_state(state: &SharedState) {
    let path = state.setup().config.monitor_state_path();
    if state.setup().config.monitors.is_empty() || !path.exists() {
        return;
    }
    let result = state.lock_monitors().load(&path, server::unix_now());
    match result {
        Ok(report) => {
            log::info!(
                "monitor state restored from {} ({} monitors{})",
                path.display(),
                report.restored.len(),
                if report.ignored.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; no longer configured, ignored: {:?}",
                        report
                            .ignored
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                    )
                }
            );
        }
        Err(e @ (StateError::Corrupt { .. } | StateError::Foreign { .. })) => {
            let aside = path.with_extension(format!("rejected-{}", server::unix_now().as_secs()));
            let moved = std::fs::rename(&path, &aside);
            log::error!(
                "{e}; starting with empty monitors; the file {}",
                match moved {
                    Ok(()) => format!("was moved to {}", aside.display()),
                    Err(err) => format!("could not be moved aside ({err})"),
                }
            );
        }
        Err(e) => log::error!("monitor state not restored: {e}"),
    }
}

fn save_monitor_state(state: &SharedState) {
    if state.setup().config.monitors.is_empty() {
        return;
    }
    let path = state.setup().config.monitor_state_path();
    match state.lock_monitors().save(&path) {
        Ok(()) => log::info!("monitor state saved to {}", path.display()),
        Err(e) => log::error!("monitor state not saved: {e}"),
    }
}

/// Sessions among `records` that were seeded: only the tp_btf backstop sees
/// their close.
fn seeded_records(records: &[SocketRecord]) -> usize {
    records
        .iter()
        .filter(|r| r.origin == record_origin::SEEDED)
        .count()
}

/// Detaches the tp_btf close backstop when no seeded session is left: every
/// other session's close is seen by sock_ops.
fn release_close_backstop(program: &mut KernelProgram, seeded: usize) -> Result<(), LoadError> {
    if seeded == 0 && program.detach_close_backstop()? {
        log::info!(
            "no seeded session left: tp_btf close backstop detached (sock_ops sees every close)"
        );
    }
    Ok(())
}

/// What one reconcile pass read from the kernel, and did to it.
struct KernelPass {
    truth: Tally,
    sessions: u64,
    seeded_sessions: u64,
    backstop_attached: bool,
    lost: u64,
    ip_table_full: u64,
    socket_table_full: u64,
    collected: usize,
    healed: usize,
}

/// Reads the kernel's socket records (the truth: SOCKETS and the accepted
/// sessions' socket storage) and per-IP maps, removes zero entries, and heals
/// per-IP counts that differ from the records twice in a row.
fn kernel_pass(
    program: &Mutex<KernelProgram>,
    reconciler: &mut Reconciler,
) -> Result<KernelPass, LoadError> {
    let mut program = program.lock().unwrap_or_else(|p| p.into_inner());
    let records = program.snapshot_tracked()?;
    let live = program.snapshot_live()?;
    let truth = tally_records(&records);
    let mut healed = 0;
    for mismatch in reconciler.confirm(diff_tallies(&truth, &tally_live(&live))) {
        let delta = mismatch.truth as i64 - mismatch.seen as i64;
        if program.adjust_live(mismatch.ip, mismatch.slot, delta)? == sync_result::APPLIED {
            healed += 1;
        }
    }
    let collected = program.collect_zero_entries(&live);
    let seeded_sessions = seeded_records(&records);
    release_close_backstop(&mut program, seeded_sessions)?;
    Ok(KernelPass {
        truth,
        sessions: records.len() as u64,
        seeded_sessions: seeded_sessions as u64,
        backstop_attached: program.close_backstop_attached(),
        lost: program.stat(stat::EVENTS_LOST),
        ip_table_full: program.stat(stat::IP_TABLE_FULL),
        socket_table_full: program.stat(stat::SOCKET_TABLE_FULL),
        collected,
        healed,
    })
}

/// Keeps the index (and the kernel's per-IP maps) equal to the kernel's socket
/// records, whatever happened to the events in between.
async fn reconcile(
    program: Arc<Mutex<KernelProgram>>,
    state: Arc<SharedState>,
    mut stop: Shutdown,
) {
    let mut index_reconciler = Reconciler::default();
    let mut kernel_reconciler = Reconciler::default();
    let mut lost_seen = 0u64;
    // A repair needs two passes that agree, so after start-up (where an event
    // can be both in the first snapshot and in the ring) and after lost events,
    // two passes come a second apart.
    const QUICK: Duration = Duration::from_secs(1);
    let mut quick_passes: u32 = 2;
    loop {
        let pause = if quick_passes > 0 {
            QUICK
        } else {
            state.setup().config.reconcile_interval
        };
        tokio::select! {
            _ = stop.wait() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        let program = program.clone();
        let read = tokio::task::spawn_blocking(move || {
            let pass = kernel_pass(&program, &mut kernel_reconciler);
            (pass, kernel_reconciler)
        })
        .await;
        let pass = match read {
            Ok((pass, reconciler)) => {
                kernel_reconciler = reconciler;
                match pass {
                    Ok(pass) => pass,
                    Err(e) => {
                        log::warn!("reconcile: reading kernel maps: {e}");
                        continue;
                    }
                }
            }
            Err(e) => {
                log::error!("reconcile task failed: {e}");
                kernel_reconciler = Reconciler::default();
                continue;
            }
        };
        // Events the snapshot already reflects would otherwise look like
        // differences until the next pass.
        state.drain_events(server::unix_now());
        let repaired = {
            let mut sessions = state.write_sessions();
            let confirmed = index_reconciler.confirm(sessions.diff(&pass.truth));
            for mismatch in &confirmed {
                sessions.repair(mismatch);
            }
            confirmed.len()
        };
        AgentStats::add(&state.stats.repairs, repaired as u64);
        AgentStats::add(&state.stats.kernel_repairs, pass.healed as u64);
        AgentStats::add(&state.stats.collected, pass.collected as u64);
        if repaired + pass.healed > 0 {
            log::info!(
                "reconcile: repaired {repaired} index counts and {} kernel per-IP counts from the socket records",
                pass.healed
            );
        }
        state.lock_monitors().expire(server::unix_now());
        // Windows dropped without events to drive them out leave the totals
        // here, a batch per turn of the lock, so queries interleave.
        while state.lock_monitors().retire(monitors::RETIRE_BATCH) {
            tokio::task::yield_now().await;
        }
        drop(pass.truth);
        release_freed_memory();
        let stats = &state.stats;
        let full_before = stats.saturated();
        AgentStats::set(&stats.kernel_sessions, pass.sessions);
        AgentStats::set(&stats.kernel_seeded_sessions, pass.seeded_sessions);
        AgentStats::set(
            &stats.close_backstop_attached,
            pass.backstop_attached.into(),
        );
        AgentStats::set(&stats.kernel_events_lost, pass.lost);
        AgentStats::set(&stats.kernel_ip_table_full, pass.ip_table_full);
        AgentStats::set(&stats.kernel_socket_table_full, pass.socket_table_full);
        if stats.saturated() > full_before {
            // Once per pass, not once per refused session.
            log::warn!(
                "kernel tables full: {} new sessions not counted since the last pass \
                 ({} in all; per-IP table {}, socket table {}); raise max_tracked_ips",
                stats.saturated() - full_before,
                stats.saturated(),
                pass.ip_table_full,
                pass.socket_table_full
            );
        }
        quick_passes = quick_passes.saturating_sub(1);
        if pass.lost > lost_seen {
            log::warn!(
                "{} session events were lost (ring buffer full); counts are repaired from the socket records",
                pass.lost - lost_seen
            );
            lost_seen = pass.lost;
            quick_passes = 2;
        }
    }
}
