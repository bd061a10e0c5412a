//! Following the kernel: its session events (ring buffer) into the shared
//! state. The kernel program logs nothing itself (a full table would log a
//! line per session); the reconciler logs its counters once per interval.

use std::{sync::Arc, time::Duration};

use audit_common::SessionEvent;
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::{
    counting::state::{EventSource, SharedState},
    domain::unix_now,
    serving::shutdown::Shutdown,
};

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
pub(super) async fn follow_events(
    events: RingBuf<MapData>,
    state: Arc<SharedState>,
    mut stop: Shutdown,
) {
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
        state.drain_events(unix_now());
    }
}
