//! Reconciling: the index and the kernel's per-IP maps kept equal to the
//! kernel's socket records, whatever happened to the events in between; and
//! the room in a full per-IP table made at once, for sessions it refused.

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
    kernel::{api::Kernel, loader::LoadError},
    serving::shutdown::Shutdown,
    sys::{caps, memory::release_freed_memory},
};

use super::startup::{release_close_backstop, seeded_records};

/// What one reconcile pass read from the kernel, and did to it.
pub(super) struct KernelPass {
    pub truth: Tally,
    pub sessions: u64,
    pub seeded_sessions: u64,
    pub backstop_attached: bool,
    pub lost: u64,
    pub ip_table_full: u64,
    pub socket_table_full: u64,
    pub collected: usize,
    pub healed: usize,
    /// Sessions a full table had refused, counted now.
    pub adopted: usize,
    /// Sessions a full table refused that still wait for room.
    pub uncounted: usize,
    /// Whether a per-IP map still holds as many counting entries as it can.
    pub ip_table_at_capacity: bool,
}

impl KernelPass {
    /// Sessions the kernel refused since it was loaded (both tables).
    fn refusals(&self) -> u64 {
        self.ip_table_full + self.socket_table_full
    }
}

/// Reads the kernel's socket records (the truth: SOCKETS and the accepted
/// sessions' socket storage) and per-IP maps, heals per-IP counts that differ
/// from the records twice in a row, removes zero entries, then counts the
/// sessions a full table refused where there is room now.
pub(super) fn kernel_pass<K: Kernel>(
    program: &Mutex<K>,
    reconciler: &mut Reconciler,
) -> Result<KernelPass, LoadError> {
    let mut program = program.lock().unwrap_or_else(|p| p.into_inner());
    let tracked = program.snapshot_tracked()?;
    let live = program.snapshot_live()?;
    let mut truth = tally_records(&tracked.counted);
    let mut healed = 0;
    for mismatch in reconciler.confirm(diff_tallies(&truth, &tally_live(&live))) {
        let delta = mismatch.truth as i64 - mismatch.seen as i64;
        if program.adjust_live(mismatch.ip, mismatch.slot, delta)? == sync_result::APPLIED {
            healed += 1;
        }
    }
    let collected = program.collect_zero_entries(&live);
    let adopted = if tracked.uncounted.is_empty() {
        Vec::new()
    } else {
        program.adopt_uncounted(&tracked.uncounted)?
    };
    // Adopted sessions reach the index as open events: part of the truth now.
    for (key, count) in tally_records(&adopted) {
        *truth.entry(key).or_default() += count;
    }
    // Entries in use after the pass: those counting something, and those
    // the adoptions created (no second read of a map of up to 1M entries).
    let mut in_use: std::collections::HashSet<std::net::IpAddr> = live
        .iter()
        .filter(|(_, counts)| counts.sessions.iter().any(|&c| c != 0))
        .map(|&(ip, _)| ip)
        .collect();
    in_use.extend(
        adopted
            .iter()
            .map(|r| crate::counting::state::record_ip(r.family, &r.addr)),
    );
    let capacity = program.ip_capacity();
    let ip_table_at_capacity = [true, false]
        .into_iter()
        .any(|v4| in_use.iter().filter(|ip| ip.is_ipv4() == v4).count() as u64 >= capacity);
    let seeded_sessions = seeded_records(&tracked.counted);
    release_close_backstop(&mut *program, seeded_sessions)?;
    Ok(KernelPass {
        truth,
        sessions: (tracked.counted.len() + adopted.len()) as u64,
        seeded_sessions: seeded_sessions as u64,
        backstop_attached: program.close_backstop_attached(),
        lost: program.stat(stat::EVENTS_LOST),
        ip_table_full: program.stat(stat::IP_TABLE_FULL),
        socket_table_full: program.stat(stat::SOCKET_TABLE_FULL),
        collected,
        healed,
        adopted: adopted.len(),
        uncounted: tracked.uncounted.len() - adopted.len(),
        ip_table_at_capacity,
    })
}

/// `cut_existing` between reloads: a prefix can still go over its limit
/// after start-up, by SYNs whose handshakes outlast the pending window (or
/// any burst, with `count_pending = false`); each pass cuts it back. Costs a
/// read of the prefix counts while nothing is over, a socket dump when
/// something is. Skipped without CAP_NET_ADMIN (cut_existing enabled by a
/// reload, not at start-up): that reload already said so, once.
fn cut_where_over<K: Kernel>(program: &Mutex<K>, state: &SharedState) {
    let setup = state.setup();
    let limits = &setup.config.kernel_limits;
    if !limits.iter().any(|l| l.cut_existing) || !caps::effective(caps::Capability::CAP_NET_ADMIN) {
        return;
    }
    let mut program = program.lock().unwrap_or_else(|p| p.into_inner());
    super::cuts::cut_over_limits(&mut *program, limits, &setup.slots, state, "reconcile");
}

/// A repair needs two passes that agree, so after start-up (where an event
/// can be both in the first snapshot and in the ring) and after lost events,
/// two passes come a second apart; so does the pass a full table asks for.
pub(super) const QUICK: Duration = Duration::from_secs(1);

/// How often the reconciler looks at the kernel's refusal counter between
/// passes: a full per-IP table gets its zero entries collected within this.
const FULL_WATCH: Duration = Duration::from_millis(100);

/// The least time between the end of a pass and a pass a refusal asks for;
/// at least as long as the last pass took, too, so that a table full of live
/// IPs, refusing all the time, keeps the reconciler busy half the time at most.
const EARLY_PASS_GAP: Duration = Duration::from_millis(250);

/// The reconciler's memory from pass to pass.
#[derive(Default)]
pub(super) struct Reconcile {
    index_reconciler: Reconciler,
    pub kernel_reconciler: Reconciler,
    lost_seen: u64,
    /// The kernel's refusal counters as of the last pass (None before it).
    refusals_seen: Option<u64>,
    ip_table_full_seen: Option<u64>,
    quick_passes: u32,
    /// Refusals not logged yet, and when the last line about them went out.
    unlogged_refusals: u64,
    last_full_log: Option<Duration>,
}

impl Reconcile {
    pub fn new() -> Self {
        Self {
            quick_passes: 2,
            ..Self::default()
        }
    }

    /// Takes the kernel's refusal counters as they are at start-up, so that
    /// refusals before the first pass count as new (and wake it early), and
    /// those a previous agent saw do not.
    pub fn start_from<K: Kernel>(&mut self, program: &Mutex<K>) {
        let program = program.lock().unwrap_or_else(|p| p.into_inner());
        let ip_table_full = program.stat(stat::IP_TABLE_FULL);
        self.ip_table_full_seen = Some(ip_table_full);
        self.refusals_seen = Some(ip_table_full + program.stat(stat::SOCKET_TABLE_FULL));
    }

    /// How long to wait before the next pass.
    pub fn pause(&self, interval: Duration) -> Duration {
        if self.quick_passes > 0 {
            QUICK
        } else {
            interval
        }
    }

    /// Whether the kernel refused a session for lack of per-IP room since the
    /// last pass: collecting zero entries then cannot wait for the interval.
    pub fn refused_since_pass<K: Kernel>(&self, program: &Mutex<K>) -> bool {
        let Some(seen) = self.ip_table_full_seen else {
            return false;
        };
        let program = program.lock().unwrap_or_else(|p| p.into_inner());
        program.stat(stat::IP_TABLE_FULL) > seen
    }

    /// Applies a kernel pass to the index and the agent's counters; `now` is
    /// the Unix time.
    pub fn apply(&mut self, pass: KernelPass, state: &SharedState, now: Duration) {
        // Events the snapshot already reflects would otherwise look like
        // differences until the next pass.
        state.drain_events(now);
        let repaired = {
            let mut sessions = state.write_sessions();
            let confirmed = self.index_reconciler.confirm(sessions.diff(&pass.truth));
            for mismatch in &confirmed {
                sessions.repair(mismatch);
            }
            confirmed.len()
        };
        let stats = &state.stats;
        AgentStats::add(&stats.repairs, repaired as u64);
        AgentStats::add(&stats.kernel_repairs, pass.healed as u64);
        AgentStats::add(&stats.collected, pass.collected as u64);
        AgentStats::add(&stats.adopted, pass.adopted as u64);
        if repaired + pass.healed > 0 {
            log::info!(
                "reconcile: repaired {repaired} index counts and {} kernel per-IP counts from the socket records",
                pass.healed
            );
        }
        AgentStats::set(&stats.kernel_sessions, pass.sessions);
        AgentStats::set(&stats.kernel_seeded_sessions, pass.seeded_sessions);
        AgentStats::set(
            &stats.close_backstop_attached,
            pass.backstop_attached.into(),
        );
        AgentStats::set(&stats.kernel_events_lost, pass.lost);
        AgentStats::set(&stats.kernel_ip_table_full, pass.ip_table_full);
        AgentStats::set(&stats.kernel_socket_table_full, pass.socket_table_full);
        self.note_saturation(&pass, state, now);
        self.quick_passes = self.quick_passes.saturating_sub(1);
        if pass.lost > self.lost_seen {
            log::warn!(
                "{} session events were lost (ring buffer full); counts are repaired from the socket records",
                pass.lost - self.lost_seen
            );
            self.lost_seen = pass.lost;
            self.quick_passes = 2;
        }
    }

    /// Saturated now: refusals since the last pass, sessions refused that are
    /// counted only now or still wait for room, or a per-IP map at capacity.
    /// Logged once per interval.
    fn note_saturation(&mut self, pass: &KernelPass, state: &SharedState, now: Duration) {
        let refusals = pass.refusals();
        let new_refusals = self
            .refusals_seen
            .map_or(0, |seen| refusals.saturating_sub(seen));
        self.refusals_seen = Some(refusals);
        self.ip_table_full_seen = Some(pass.ip_table_full);
        // Sessions adopted now were refused since the last pass, or before it.
        let saturated =
            new_refusals > 0 || pass.adopted > 0 || pass.uncounted > 0 || pass.ip_table_at_capacity;
        let stats = &state.stats;
        AgentStats::set(&stats.kernel_tables_saturated, saturated.into());
        if saturated {
            AgentStats::set(&stats.kernel_tables_last_saturated, now.as_secs().max(1));
        }
        self.unlogged_refusals += new_refusals;
        let interval = state.setup().config.reconcile_interval;
        let due = self
            .last_full_log
            .is_none_or(|last| now.saturating_sub(last) >= interval);
        if self.unlogged_refusals > 0 && due {
            log::warn!(
                "kernel tables full: {} new sessions refused since the last report ({} in all; \
                 per-IP table {}, socket table {}); {} counted once there was room, {} still wait; \
                 raise max_tracked_ips",
                self.unlogged_refusals,
                refusals,
                pass.ip_table_full,
                pass.socket_table_full,
                AgentStats::get(&stats.adopted),
                pass.uncounted,
            );
            self.unlogged_refusals = 0;
            self.last_full_log = Some(now);
        }
    }
}

/// Keeps the index (and the kernel's per-IP maps) equal to the kernel's socket
/// records, whatever happened to the events in between.
pub(super) async fn reconcile<K: Kernel + Send + 'static>(
    program: Arc<Mutex<K>>,
    state: Arc<SharedState>,
    mut stop: Shutdown,
) {
    let mut pass_state = Reconcile::new();
    pass_state.start_from(&program);
    let mut last_took = Duration::ZERO;
    loop {
        let pause = pass_state.pause(state.setup().config.reconcile_interval);
        let deadline = tokio::time::Instant::now() + pause;
        let earliest = tokio::time::Instant::now() + EARLY_PASS_GAP.max(last_took).min(pause);
        let mut watch = tokio::time::interval(FULL_WATCH);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.wait() => return,
                _ = tokio::time::sleep_until(deadline) => break,
                _ = watch.tick() => {
                    if tokio::time::Instant::now() >= earliest
                        && pass_state.refused_since_pass(&program)
                    {
                        break;
                    }
                }
            }
        }
        let started = tokio::time::Instant::now();
        let (program, cut_state) = (program.clone(), state.clone());
        let mut kernel_reconciler = std::mem::take(&mut pass_state.kernel_reconciler);
        let read = tokio::task::spawn_blocking(move || {
            let pass = kernel_pass(&*program, &mut kernel_reconciler);
            cut_where_over(&program, &cut_state);
            (pass, kernel_reconciler)
        })
        .await;
        let pass = match read {
            Ok((pass, reconciler)) => {
                pass_state.kernel_reconciler = reconciler;
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
                continue;
            }
        };
        pass_state.apply(pass, &state, unix_now());
        last_took = started.elapsed();
        state.lock_monitors().expire(unix_now());
        // Windows dropped without events to drive them out leave the totals
        // here, a batch per turn of the lock, so queries interleave.
        while state.lock_monitors().retire(monitors::RETIRE_BATCH) {
            tokio::task::yield_now().await;
        }
        release_freed_memory();
    }
}

#[cfg(test)]
mod tests;
