//! Signal masks: stop and reload signals held back during start-up.

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};

/// SIGTERM, SIGINT and SIGHUP blocked on this thread (and so on every thread
/// created from it) until the runtime's handlers exist; then unblocked here, on
/// the thread that runs `block_on`, so pending ones are delivered to them.
pub struct HeldSignals(SigSet);

impl HeldSignals {
    pub fn block() -> Self {
        let mut set = SigSet::empty();
        for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            set.add(signal);
        }
        if let Err(e) = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None) {
            log::warn!("could not hold back stop signals during start-up: {e}");
        }
        Self(set)
    }

    pub fn release(self) {
        if let Err(e) = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&self.0), None) {
            log::warn!("could not unblock stop signals: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_signals_are_blocked_until_released() {
        // Its own thread: the mask is per thread and the test harness runs others.
        std::thread::spawn(|| {
            let blocked = || {
                SigSet::thread_get_mask()
                    .expect("mask")
                    .contains(Signal::SIGHUP)
            };
            assert!(!blocked());
            let held = HeldSignals::block();
            assert!(blocked());
            held.release();
            assert!(!blocked());
        })
        .join()
        .unwrap();
    }
}
