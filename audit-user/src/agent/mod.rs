//! The agent: loads the kernel side, builds the index from the kernel's maps,
//! seeds sessions that predate it, then serves queries while following the
//! kernel's events and reconciling with its maps.

mod cuts;
mod events;
mod reconcile;
mod refusals;
mod reload;
mod signals;
mod startup;

use std::sync::{Arc, Mutex};

use aya::maps::{MapData, RingBuf};

use crate::{
    adapters::{lua_policy, postfix},
    cluster::{self, ClusterView, LocalShare, TargetError},
    config::Config,
    counting::state::SharedState,
    kernel::{
        loader::{self, KernelProgram, LoadError},
        seed::SeedError,
    },
    metrics,
    serving::{server, shutdown},
    sys::{
        caps as privileges,
        fs::DirError,
        memory::{release_freed_memory, return_large_blocks_on_free},
        signals::HeldSignals,
        socket::{QuerySocket, SocketError},
    },
};

use self::{
    events::follow_events,
    reconcile::reconcile,
    refusals::follow_refusals,
    reload::sighup,
    signals::{Signal, Signals},
    startup::{prepare, save_monitor_state},
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
    #[error("{what} {path} is not safe to use: {source}")]
    UnsafeDirectory {
        what: &'static str,
        path: std::path::PathBuf,
        source: DirError,
    },
    #[error("cluster: {0}")]
    Cluster(#[from] TargetError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    LuaPolicy(#[from] lua_policy::LoadError),
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

/// SIGHUP for the Lua policy host: the scripts read and checked again; any
/// failure keeps the running ones.
/// Runs the agent until SIGTERM/SIGINT. Start-up (sockets, loading, attaching,
/// seeding) runs on this thread alone, so that dropping capabilities afterwards
/// covers every thread the runtime then creates: capabilities are per thread.
pub fn run(options: AgentOptions) -> Result<(), AgentError> {
    return_large_blocks_on_free();
    // Held back, not lost, while the handlers are not installed yet: a stop
    // requested during start-up is still a clean stop.
    let held = HeldSignals::block();
    // Before anything is made: a bad URL or an unreadable password file
    // refuses the start with the system as it was.
    let cluster = options
        .config
        .cluster
        .as_ref()
        .map(cluster::settings)
        .transpose()?;
    let mut prepared = prepare(options)?;
    release_freed_memory();
    // SOCK_DESTROY needs CAP_NET_ADMIN: kept only when a limit at start-up
    // may cut sessions on a reload.
    let cuts = prepared
        .state
        .setup()
        .config
        .kernel_limits
        .iter()
        .any(|l| l.cut_existing);
    let keep: &[privileges::Capability] = if cuts {
        &[
            privileges::Capability::CAP_BPF,
            privileges::Capability::CAP_NET_ADMIN,
        ]
    } else {
        &[privileges::Capability::CAP_BPF]
    };
    match privileges::keep_only(keep) {
        Ok(kept) if cuts => log::info!(
            "dropped every capability but CAP_BPF and CAP_NET_ADMIN (kept for cut_existing; \
             effective set {kept:#x})"
        ),
        Ok(kept) => log::info!("dropped every capability but CAP_BPF (effective set {kept:#x})"),
        Err(e) => log::warn!("could not drop capabilities: {e}"),
    }
    // After the capabilities are dropped: every thread that runs the
    // operator's scripts (a Postfix connection's, the blocking pool's) is
    // made after this, with only what was kept.
    let lua_config = prepared.state.setup().config.lua_policy.clone();
    if lua_config.enabled() {
        prepared.lua_policy = Some(lua_policy::LuaPolicy::start(
            prepared.state.clone(),
            &lua_config,
        )?);
    }
    // Start-up is complete: the programs are attached, open sessions seeded
    // and the sockets listening (clients wait in the backlog until the runtime
    // accepts). Type=notify units start what depends on us from here; outside
    // systemd (no NOTIFY_SOCKET) this does nothing.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        log::warn!("could not tell systemd that start-up is complete: {e}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| AgentError::Io {
            what: "starting the async runtime",
            source,
        })?;
    runtime.block_on(serve(prepared, cluster, held))
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
    lua_policy: Option<Arc<lua_policy::LuaPolicy>>,
}

async fn serve(
    prepared: Prepared,
    cluster: Option<cluster::Settings>,
    held: HeldSignals,
) -> Result<(), AgentError> {
    let Prepared {
        socket,
        policy_socket,
        program,
        events,
        state,
        detach_on_exit,
        reload,
        lua_policy,
    } = prepared;
    let mut signals = Signals::install()?;
    held.release();
    // Bound before any task starts, so a taken port fails start-up cleanly.
    let metrics_listener = match state.setup().config.metrics_listen {
        Some(addr) => {
            let listener = metrics::bind(addr).await?;
            log::info!("serving Prometheus metrics on http://{addr}/metrics");
            Some(listener)
        }
        None => None,
    };

    let (trigger, shutdown) = shutdown::channel();
    let events_task = tokio::spawn(follow_events(events, state.clone(), shutdown.clone()));
    let program = Arc::new(Mutex::new(program));
    let reconcile_task = tokio::spawn(reconcile(program.clone(), state.clone(), shutdown.clone()));
    let refusals_task = tokio::spawn(follow_refusals(
        program.clone(),
        state.clone(),
        shutdown.clone(),
    ));

    log::info!("serving queries on {}", socket.path().display());
    let hook: crate::serving::policy_host::PolicyHook = lua_policy
        .clone()
        .map(|host| host as Arc<dyn crate::serving::policy_host::PolicyHost>);
    let server_task = tokio::spawn(server::serve(socket, state.clone(), shutdown.clone(), hook));
    let cluster_task = cluster.map(|settings| {
        log::info!(
            "cluster: node {} on {:?} under prefix {}, node_ttl {} s",
            settings.node,
            settings.target,
            settings.key_prefix,
            settings.node_ttl.as_secs()
        );
        let view = Arc::new(ClusterView::new(&settings.node, settings.node_ttl));
        state.enable_cluster(view.clone());
        let local: Arc<dyn LocalShare> = state.clone();
        tokio::spawn(cluster::run(settings, view, local))
    });
    let policy_task = policy_socket.map(|socket| {
        log::info!(
            "serving Postfix policy requests on {} with {} limits",
            socket.path().display(),
            state.setup().config.policy_limits.len()
        );
        postfix::serve_on_own_thread(socket, state.clone(), shutdown.clone(), lua_policy.clone())
    });
    let policy_task = policy_task.transpose().map_err(|source| AgentError::Io {
        what: "starting the Postfix policy server's thread",
        source,
    })?;
    let metrics_task = metrics_listener
        .map(|listener| tokio::spawn(metrics::serve(listener, state.clone(), shutdown.clone())));

    while signals.next().await == Signal::Reload {
        match &reload {
            Some(source) => {
                sighup(source, &program, &state, lua_policy.as_deref());
            }
            None => log::info!("SIGHUP ignored: no configuration source to read again"),
        }
    }
    log::info!("shutting down");
    trigger.trigger();
    let _ = server_task.await;
    if let Some(thread) = policy_task {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    let _ = events_task.await;
    let _ = reconcile_task.await;
    // Its rounds hold nothing that needs a clean end: the other nodes drop
    // this one after node_ttl (the kernel goes on counting meanwhile).
    if let Some(task) = cluster_task {
        task.abort();
    }
    let _ = refusals_task.await;

    save_monitor_state(&state);
    drop(lua_policy);
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
