//! Signal masks: stop and reload signals held back during start-up.

/// SIGTERM, SIGINT and SIGHUP blocked on this thread (and so on every thread
/// created from it) until the runtime's handlers exist; then unblocked here, on
/// the thread that runs `block_on`, so pending ones are delivered to them.
pub struct HeldSignals(libc::sigset_t);

impl HeldSignals {
    pub fn block() -> Self {
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

    pub fn release(self) {
        // SAFETY: unblocks the set blocked in `block`.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &self.0, std::ptr::null_mut()) };
    }
}
