//! SIGHUP: the configuration read again and applied without losing a count,
//! then the Lua policy scripts.

use std::{collections::HashMap, sync::Mutex};

use crate::{
    adapters::lua_policy::LuaPolicy,
    counting::state::{AgentStats, Setup, SharedState},
    kernel::{api::Kernel, seed},
};

use super::ConfigSource;

/// SIGHUP: the configuration, then the Lua scripts it names; counted as
/// applied, or refused (either of them), once all is done, so whoever sent the signal can tell
/// when it has taken effect (`stats`: reloads, reloads_refused).
pub(super) fn sighup<K: Kernel>(
    source: &ConfigSource,
    program: &Mutex<K>,
    state: &SharedState,
    scripts: Option<&LuaPolicy>,
) {
    let applied = apply_reload(source, program, state) && reload_scripts(scripts, state);
    let counter = if applied {
        &state.stats.reloads
    } else {
        &state.stats.reloads_refused
    };
    AgentStats::add(counter, 1);
}

/// False when the scripts were refused (the running ones stay).
fn reload_scripts(host: Option<&LuaPolicy>, state: &SharedState) -> bool {
    let config = state.setup().config.lua_policy.clone();
    match host {
        Some(host) => match host.reload(&config) {
            Ok(()) => true,
            Err(e) => {
                log::error!("SIGHUP: {e}; the running scripts stay");
                false
            }
        },
        None => {
            if config.enabled() {
                log::warn!(
                    "SIGHUP: lua_policy_scripts set, but the policy host starts only with the agent; restart to run them"
                );
            }
            true
        }
    }
}

/// Services, monitors, limits, access and timeouts take effect without
/// losing a count; an invalid configuration leaves the running one in place
/// (false).
pub(super) fn apply_reload<K: Kernel>(
    source: &ConfigSource,
    program: &Mutex<K>,
    state: &SharedState,
) -> bool {
    let mut config = match source() {
        Ok(config) => config,
        Err(e) => {
            log::error!("SIGHUP: new configuration refused, the running one stays: {e}");
            return false;
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
            Ok(tracked) => tracked.slots_in_use(),
            Err(e) => {
                log::error!("SIGHUP: reading the kernel's records failed, the running configuration stays: {e}");
                return false;
            }
        };
        let slots = match program
            .configure_services(&config.services, &|slot| in_use.contains(&slot))
        {
            Ok(slots) => slots,
            Err(e) => {
                log::error!("SIGHUP: services not applied, the running configuration stays: {e}");
                return false;
            }
        };
        let limits_applied = match program.configure_refusal(&config.kernel_limits, &slots) {
            Ok(status) => {
                AgentStats::set(&state.stats.kernel_limits_attached, status.attached.into());
                log::info!(
                    "SIGHUP: {} kernel limit(s), sk_lookup {}",
                    status.limits,
                    if status.attached {
                        "attached"
                    } else {
                        "not attached"
                    }
                );
                true
            }
            Err(e) => {
                log::error!("SIGHUP: kernel limits not applied: {e}");
                false
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
                &mut *program,
                &newly_watched,
                config.cgroup.as_deref(),
                state,
            );
        }
        // After the seeding: sessions on newly watched ports are candidates too.
        if limits_applied {
            super::cuts::cut_over_limits(
                &mut *program,
                &config.kernel_limits,
                &slots,
                state,
                "SIGHUP",
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
    true
}

/// Counts the sessions already open on ports a reload started watching, as
/// the start-up does for every port: sock_ops never saw them accepted.
fn seed_newly_watched<K: Kernel>(
    program: &mut K,
    ports: &HashMap<u16, u8>,
    cgroup: Option<&std::path::Path>,
    state: &SharedState,
) {
    let seeded = (|| -> Result<seed::SeedReport, seed::SeedError> {
        // As at start-up: the backstop before anything is seeded, and
        // sessions accepted meanwhile tracked by record, so none counts twice.
        program.start_mirroring()?;
        program.attach_close_backstop()?;
        let report = program.seed(ports, cgroup);
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

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, sync::Mutex};

    use audit_common::record_origin;

    use super::apply_reload;
    use crate::{
        agent::ConfigSource,
        config::Config,
        counting::state::SharedState,
        domain::ServicePorts,
        kernel::{
            api::Kernel,
            fake::{record, FakeKernel, Unwatched},
        },
    };

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn service(name: &str, ports: &[u16]) -> ServicePorts {
        ServicePorts {
            name: name.into(),
            ports: ports.to_vec(),
        }
    }

    fn config(services: Vec<ServicePorts>) -> Config {
        Config {
            services,
            ..Config::default()
        }
    }

    /// A fake kernel and state as start-up leaves them for `running`.
    fn started(mut fake: FakeKernel, running: Config) -> (Mutex<FakeKernel>, SharedState) {
        let slots = fake
            .configure_services(&running.services, &|_| true)
            .expect("start-up slots");
        (Mutex::new(fake), SharedState::new(running, slots))
    }

    fn source(next: Config) -> ConfigSource {
        Box::new(move || Ok(next.clone()))
    }

    fn service_names(state: &SharedState) -> Vec<String> {
        state
            .setup()
            .config
            .services
            .iter()
            .map(|s| s.name.clone())
            .collect()
    }

    #[test]
    fn a_count_keeps_its_service_slot_across_a_service_change() {
        let (kernel, state) = started(FakeKernel::default(), config(vec![service("SMTP", &[25])]));
        let smtp = state.setup().slots["SMTP"];
        kernel.lock().unwrap().accept(1, ip("10.0.0.1"), smtp);
        let next = config(vec![
            service("Submission", &[587]),
            service("SMTP", &[25, 2525]),
        ]);
        apply_reload(&source(next), &kernel, &state);
        let setup = state.setup();
        assert_eq!(setup.slots["SMTP"], smtp);
        assert_ne!(setup.slots["Submission"], smtp);
        let fake = kernel.lock().unwrap();
        assert_eq!(fake.count(ip("10.0.0.1"), smtp), 1);
        assert_eq!(fake.ports[&2525], u32::from(smtp) + 1);
        assert_eq!(fake.ports[&587], u32::from(setup.slots["Submission"]) + 1);
    }

    #[test]
    fn a_gone_services_slot_is_reused_only_once_no_session_holds_it() {
        let running = config(
            (0..8)
                .map(|i| service(&format!("S{i}"), &[1000 + i]))
                .collect(),
        );
        let (kernel, state) = started(FakeKernel::default(), running);
        {
            let mut fake = kernel.lock().unwrap();
            for slot in 0..8u8 {
                if slot != 5 {
                    fake.accept(u64::from(slot), ip("10.0.0.1"), slot);
                }
            }
        }
        // S5's slot is free (nothing counts in it); every other is held.
        let mut next: Vec<ServicePorts> = (0..8)
            .filter(|&i| i != 5)
            .map(|i| service(&format!("S{i}"), &[1000 + i]))
            .collect();
        next.push(service("New", &[2525]));
        let mut with_s3_gone = next.clone();
        with_s3_gone.retain(|s| s.name != "S3");
        apply_reload(&source(config(next)), &kernel, &state);
        assert_eq!(state.setup().slots["New"], 5);
        // S3 gone, but a session holds its slot: a second new service finds no slot.
        with_s3_gone.push(service("Newer", &[2526]));
        apply_reload(&source(config(with_s3_gone)), &kernel, &state);
        assert!(service_names(&state).contains(&"S3".to_string()));
        assert!(!state.setup().slots.contains_key("Newer"));
    }

    #[test]
    fn sessions_open_on_a_newly_watched_port_are_seeded() {
        let fake = FakeKernel {
            backstop: false,
            unwatched: vec![Unwatched {
                cookie: 9,
                ip: ip("10.0.0.9"),
                port: 2525,
            }],
            ..FakeKernel::default()
        };
        let (kernel, state) = started(fake, config(vec![service("SMTP", &[25])]));
        apply_reload(
            &source(config(vec![service("SMTP", &[25, 2525])])),
            &kernel,
            &state,
        );
        let fake = kernel.lock().unwrap();
        let smtp = state.setup().slots["SMTP"];
        // Only the new port is seeded, with the backstop attached first.
        assert_eq!(
            fake.seed_calls,
            vec![std::collections::HashMap::from([(2525, smtp)])]
        );
        assert_eq!(
            fake.counted[&9],
            record(ip("10.0.0.9"), smtp, record_origin::SEEDED)
        );
        assert_eq!(fake.count(ip("10.0.0.9"), smtp), 1);
        assert!(fake.backstop);
        assert!(!fake.mirroring);
        drop(fake);
        // A reload that watches nothing new seeds nothing.
        apply_reload(
            &source(config(vec![service("SMTP", &[25, 2525])])),
            &kernel,
            &state,
        );
        assert_eq!(kernel.lock().unwrap().seed_calls.len(), 1);
    }

    #[test]
    fn the_running_configuration_stays_when_the_kernel_refuses() {
        let (kernel, state) = started(FakeKernel::default(), config(vec![service("SMTP", &[25])]));
        kernel.lock().unwrap().refuse_services = true;
        apply_reload(
            &source(config(vec![service("Other", &[2525])])),
            &kernel,
            &state,
        );
        assert_eq!(service_names(&state), vec!["SMTP".to_string()]);
        assert!(state.setup().slots.contains_key("SMTP"));
        assert!(kernel.lock().unwrap().seed_calls.is_empty());
        // And an unreadable file changes nothing either.
        let broken: ConfigSource = Box::new(|| Err("syntax error".to_string()));
        kernel.lock().unwrap().refuse_services = false;
        apply_reload(&broken, &kernel, &state);
        assert_eq!(service_names(&state), vec!["SMTP".to_string()]);
    }
}
