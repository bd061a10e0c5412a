//! SIGHUP: the configuration read again and applied without losing a count.

use std::{collections::HashMap, sync::Mutex};

use crate::{
    counting::state::{AgentStats, Setup, SharedState},
    kernel::{loader::KernelProgram, seed},
};

use super::ConfigSource;

/// SIGHUP: services, monitors, limits, access and timeouts take effect without
/// losing a count; an invalid configuration leaves the running one in place.
pub(super) fn apply_reload(
    source: &ConfigSource,
    program: &Mutex<KernelProgram>,
    state: &SharedState,
) {
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
