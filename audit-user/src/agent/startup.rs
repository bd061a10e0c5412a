//! Start-up: sockets bound, the kernel side loaded and attached, the index
//! built from the kernel's records, sessions that predate us seeded, and the
//! monitor windows read back.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use audit_common::{record_origin, SocketRecord};

use crate::{
    adapters::lua_policy::LuaPolicy,
    config::Config,
    counting::{
        persistence::{self, Restored},
        state::{tally_records, AgentStats, SharedState},
    },
    domain::unix_now,
    kernel::{
        api::Kernel,
        cgroup,
        loader::{FreshPins, KernelProgram, LoadError, LoadOptions},
        seed,
    },
    sys::{
        fs::Trust,
        limits::{self, LimitError, OWN_DESCRIPTORS},
        socket::{socket_dir, QuerySocket},
    },
};

use super::{AgentError, AgentOptions, Prepared};

pub(super) fn prepare(options: AgentOptions) -> Result<Prepared, AgentError> {
    let AgentOptions {
        mut config,
        detach_on_exit,
        reload,
    } = options;
    // Before anything is made, on disk or in the kernel: a refused start
    // leaves the system as it found it.
    check_directories(&config)?;
    if config.lua_policy.enabled() {
        LuaPolicy::check(&config)?;
    }
    fit_clients_to_open_files(&mut config);
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
    if !config.monitors.is_empty() {
        let path = config.state_dir.clone();
        Trust::current()
            .ensure(&path)
            .map_err(|source| AgentError::UnsafeDirectory {
                what: "the state directory",
                path,
                source,
            })?;
    }
    // Declared before the program so that it drops after it: on any error
    // below, what this start pinned is unpinned (and its programs detached).
    let fresh_pins = FreshPins::note(&config.pin_dir);
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
    let tracked = program.snapshot_tracked()?;
    let records = &tracked.counted;

    // A slot whose service is gone can be reused only once no session holds it.
    let slot_in_use = tracked.slots_in_use();
    let slots = program.configure_services(&config.services, |slot| slot_in_use.contains(&slot))?;
    let ports: HashMap<u16, u8> = config
        .services
        .iter()
        .flat_map(|s| s.ports.iter().map(|&p| (p, slots[&s.name])))
        .collect();
    // Before seeding: seeded sessions then count toward their prefixes too.
    let refusal = program.configure_refusal(&config.kernel_limits, &slots)?;
    if refusal.attached {
        log::info!(
            "{} kernel limit(s): SYNs over a limit are refused in the kernel (sk_lookup attached to this network namespace)",
            refusal.limits
        );
    }
    let state = Arc::new(SharedState::new(config, slots.clone()));
    AgentStats::set(&state.stats.kernel_limits_attached, refusal.attached.into());
    state.write_sessions().load(&tally_records(records));
    load_monitor_state(&state);

    // Seeded sessions reach the index as ordinary events, read once the
    // runtime follows the ring buffer.
    let report = seed::seed_existing(&program, &ports, state.setup().config.cgroup.as_deref())?;
    // Seeding is over: from here on an accepted session needs no SOCKETS record.
    program.stop_mirroring()?;
    // Seeded sessions count toward their prefixes now: those over a limit
    // with cut_existing can be cut (with every capability still held).
    super::cuts::cut_over_limits(
        &mut program,
        &state.setup().config.kernel_limits,
        &slots,
        &state,
        "start-up",
    );
    // An upper bound (a seeded session may have closed since the snapshot):
    // the first reconcile pass detaches the backstop if it was one too many.
    let seeded = seeded_records(records) + report.seeded;
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
    fresh_pins.keep();
    Ok(Prepared {
        socket,
        policy_socket,
        program,
        events,
        state,
        detach_on_exit,
        reload,
        lua_policy: None,
    })
}

/// Every directory the agent serves from or keeps state in, with all above
/// it, must be safe (see sys::fs); the missing ones are made later, by what
/// uses them.
fn check_directories(config: &Config) -> Result<(), AgentError> {
    let trust = Trust::current();
    let dirs = [
        Some(("the query socket's directory", socket_dir(&config.socket))),
        config
            .policy_socket
            .as_deref()
            .map(|socket| ("the policy socket's directory", socket_dir(socket))),
        Some(("the state directory", config.state_dir.clone())),
        Some(("the pin directory", config.pin_dir.clone())),
    ];
    for (what, path) in dirs.into_iter().flatten() {
        trust
            .check(&path)
            .map_err(|source| AgentError::UnsafeDirectory { what, path, source })?;
    }
    Ok(())
}

/// Raises the open-file limit to its hard limit and, where even that cannot
/// hold max_clients on each socket plus the agent's own descriptors, lowers
/// the effective max_clients (before the shared state is built from it).
fn fit_clients_to_open_files(config: &mut Config) {
    let soft = match limits::raise_open_files() {
        Ok(limit) => {
            if let Some(from) = limit.raised_from {
                log::info!("open-file limit raised from {from} to {}", limit.soft);
            }
            limit.soft
        }
        Err(e @ LimitError::Raise { soft, .. }) => {
            log::warn!("{e}");
            soft
        }
        Err(e @ LimitError::Read(_)) => {
            log::warn!("{e}; max_clients not checked against it");
            return;
        }
    };
    let sockets = 1 + usize::from(config.policy_socket.is_some());
    let fit = limits::clients_within(soft, sockets, config.max_clients);
    if fit < config.max_clients {
        log::warn!(
            "max_clients lowered from {} to {fit}: the open-file limit is {soft}, and \
             {sockets} socket(s) × {} clients + {OWN_DESCRIPTORS} for the agent itself \
             would need {}; raise the hard limit (e.g. LimitNOFILE=) to serve more",
            config.max_clients,
            config.max_clients,
            sockets as u64 * config.max_clients as u64 + OWN_DESCRIPTORS,
        );
        config.max_clients = fit;
    }
}

/// Reads back the monitor windows saved at the last shutdown. A file that does
/// not check out is set aside (renamed) with a message, never half-loaded.
pub(super) fn load_monitor_state(state: &SharedState) {
    let path = state.setup().config.monitor_state_path();
    if state.setup().config.monitors.is_empty() {
        return;
    }
    let result = persistence::restore(&mut state.lock_monitors(), &path, unix_now());
    match result {
        Restored::NoFile => {}
        Restored::Loaded(report) => {
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
        Restored::Rejected { error, aside } => {
            log::error!(
                "{error}; starting with empty monitors; the file {}",
                match aside {
                    Ok(aside) => format!(
                        "was moved to {} (the newest {} rejected files are kept)",
                        aside.display(),
                        persistence::KEPT_REJECTED
                    ),
                    Err(err) => format!("could not be moved aside ({err})"),
                }
            );
        }
        Restored::Unreadable(error) => log::error!("monitor state not restored: {error}"),
    }
}

pub(super) fn save_monitor_state(state: &SharedState) {
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
pub(super) fn seeded_records(records: &[SocketRecord]) -> usize {
    records
        .iter()
        .filter(|r| r.origin == record_origin::SEEDED)
        .count()
}

/// Detaches the tp_btf close backstop when no seeded session is left: every
/// other session's close is seen by sock_ops.
pub(super) fn release_close_backstop<K: Kernel + ?Sized>(
    program: &mut K,
    seeded: usize,
) -> Result<(), LoadError> {
    if seeded == 0 && program.detach_close_backstop()? {
        log::info!(
            "no seeded session left: tp_btf close backstop detached (sock_ops sees every close)"
        );
    }
    Ok(())
}
