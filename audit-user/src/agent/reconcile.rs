//! Reconciling: the index and the kernel's per-IP maps kept equal to the
//! kernel's socket records, whatever happened to the events in between.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use audit_common::{stat, sync_result};

use crate::{
    counting::{
        monitors,
        state::{
            diff_tallies, tally_live, tally_records, AgentStats, Reconciler, SharedState, Tally,
        },
    },
    domain::unix_now,
    kernel::loader::{KernelProgram, LoadError},
    serving::shutdown::Shutdown,
    sys::memory::release_freed_memory,
};

use super::startup::{release_close_backstop, seeded_records};

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
pub(super) async fn reconcile(
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
        state.drain_events(unix_now());
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
        state.lock_monitors().expire(unix_now());
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
