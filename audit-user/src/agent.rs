//! The agent: loads the kernel side, builds the index from the kernel's maps,
//! seeds sessions that predate it, then serves queries while following the
//! kernel's events and reconciling with its maps.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use audit_common::{stat, SessionEvent, MAX_SERVICES};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use crate::{
    config::Config,
    kernel::{
        cgroup,
        loader::{self, KernelProgram, LoadError, LoadOptions},
        seed::{self, SeedError},
    },
    server::{self, QuerySocket, SocketError},
    shutdown::{self, Shutdown},
    state::{AgentStats, ApplyOutcome, Reconciler, SharedState},
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

pub struct AgentOptions {
    pub config: Config,
    /// Remove pinned programs and maps on exit (otherwise counting goes on).
    pub detach_on_exit: bool,
}

pub async fn run(options: AgentOptions) -> Result<(), AgentError> {
    let AgentOptions {
        config,
        detach_on_exit,
    } = options;
    // Installed first: a SIGTERM during start-up must still mean a clean stop.
    let signals = Signals::install()?;
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
    let mut program = KernelProgram::load(&LoadOptions {
        pin_dir: &config.pin_dir,
        cgroup: &cgroup_path,
    })?;

    let before = program.snapshot_live()?;
    let mut slot_totals = [0u64; MAX_SERVICES];
    for (_, counts) in &before {
        for (slot, &count) in counts.sessions.iter().enumerate() {
            slot_totals[slot] += count as u64;
        }
    }
    let slots =
        program.configure_services(&config.services, |slot| slot_totals[slot as usize] > 0)?;

    // Events queued while no agent ran are already in the maps: drop them, then
    // take the maps as the starting point.
    let mut events = program
        .take_events()
        .ok_or(LoadError::MissingMap("EVENTS"))?;
    while events.next().is_some() {}
    let snapshot = program.snapshot_live()?;
    let ports: HashMap<u16, u8> = config
        .services
        .iter()
        .flat_map(|s| s.ports.iter().map(|&p| (p, slots[&s.name])))
        .collect();
    let state = Arc::new(SharedState::new(config, slots));
    write_sessions(&state).load_snapshot(&snapshot);

    let (trigger, shutdown) = shutdown::channel();
    if let Some(logger) = program.take_logger() {
        tokio::spawn(forward_kernel_logs(logger, shutdown.clone()));
    }
    let events_task = tokio::spawn(follow_events(events, state.clone(), shutdown.clone()));

    // Seeded sessions reach the index as ordinary open events.
    let report = seed::seed_existing(&program, &ports, state.config.cgroup.as_deref())?;
    log::info!(
        "watching cgroup {}; services {}; {} tracked IPs from pinned state; start-up sync: {} seeded, {} already tracked, {} closed meanwhile",
        cgroup_path.display(),
        state.config.services.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
        snapshot.len(),
        report.seeded,
        report.already_tracked,
        report.vanished,
    );

    let program = Arc::new(Mutex::new(program));
    let reconcile_task = tokio::spawn(reconcile(program.clone(), state.clone(), shutdown.clone()));

    log::info!("serving queries on {}", socket.path().display());
    let server_task = tokio::spawn(server::serve(socket, state.clone(), shutdown.clone()));

    signals.wait().await;
    log::info!("shutting down");
    trigger.trigger();
    let _ = server_task.await;
    let _ = events_task.await;
    let _ = reconcile_task.await;

    let pin_dir = state.config.pin_dir.clone();
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

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
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
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

fn write_sessions(
    state: &SharedState,
) -> std::sync::RwLockWriteGuard<'_, crate::state::LiveSessions> {
    // A panic while holding the lock cannot leave the index half-updated in a way
    // reconciliation would not repair, so a poisoned lock is still usable.
    state
        .sessions
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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

async fn follow_events(events: RingBuf<MapData>, state: Arc<SharedState>, mut stop: Shutdown) {
    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged until
    // the AsyncFd (which owns the RingBuf) is dropped.
    let registered =
        unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) };
    let mut ring = match registered {
        Ok(ring) => ring,
        Err(e) => {
            log::error!("cannot poll the event ring buffer: {e}; counts will follow the reconcile interval only");
            return;
        }
    };
    let mut batch: Vec<SessionEvent> = Vec::with_capacity(256);
    loop {
        let mut guard = tokio::select! {
            _ = stop.wait() => return,
            guard = ring.readable_mut() => match guard {
                Ok(guard) => guard,
                Err(e) => {
                    log::error!("polling the event ring buffer: {e}");
                    return;
                }
            },
        };
        let buffer = guard.get_inner_mut();
        while let Some(item) = buffer.next() {
            if item.len() == std::mem::size_of::<SessionEvent>() {
                // SAFETY: the item holds exactly one SessionEvent written by the
                // kernel program; read_unaligned copes with any alignment.
                batch.push(unsafe {
                    std::ptr::read_unaligned(item.as_ptr() as *const SessionEvent)
                });
            }
        }
        guard.clear_ready();
        if batch.is_empty() {
            continue;
        }
        let mut outcome = ApplyOutcome::default();
        {
            let mut sessions = write_sessions(&state);
            for event in &batch {
                sessions.apply(event, &mut outcome);
            }
        }
        batch.clear();
        AgentStats::add(&state.stats.events, outcome.applied);
        if outcome.underflows + outcome.malformed > 0 {
            AgentStats::add(&state.stats.underflows, outcome.underflows);
            log::debug!(
                "{} close events without a matching open, {} malformed; the reconciler will settle them",
                outcome.underflows,
                outcome.malformed
            );
        }
    }
}

async fn reconcile(
    program: Arc<Mutex<KernelProgram>>,
    state: Arc<SharedState>,
    mut stop: Shutdown,
) {
    let mut reconciler = Reconciler::default();
    let mut lost_seen = 0u64;
    // A repair needs two passes that agree, so after start-up (where an event
    // can be both in the first snapshot and in the ring) and after lost events,
    // two passes come a second apart.
    const QUICK: Duration = Duration::from_secs(1);
    let mut quick_passes: u32 = 2;
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            _ = tokio::time::sleep(if quick_passes > 0 { QUICK } else { state.config.reconcile_interval }) => {}
        }
        let program = program.clone();
        let read = tokio::task::spawn_blocking(move || {
            let program = program.lock().unwrap_or_else(|p| p.into_inner());
            program
                .snapshot_live()
                .map(|snapshot| (snapshot, program.stat(stat::EVENTS_LOST)))
        })
        .await;
        let (snapshot, lost) = match read {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => {
                log::warn!("reconcile: reading kernel maps: {e}");
                continue;
            }
            Err(e) => {
                log::error!("reconcile task failed: {e}");
                continue;
            }
        };
        let repaired = reconciler.pass(&mut write_sessions(&state), &snapshot);
        if !repaired.is_empty() {
            AgentStats::add(&state.stats.repairs, repaired.len() as u64);
            log::info!(
                "reconcile: repaired {} per-IP counts from the kernel maps",
                repaired.len()
            );
        }
        quick_passes = quick_passes.saturating_sub(1);
        if lost > lost_seen {
            log::warn!(
                "{} session events were lost (ring buffer full); counts are repaired from the kernel maps",
                lost - lost_seen
            );
            lost_seen = lost;
            quick_passes = 2;
        }
    }
}
