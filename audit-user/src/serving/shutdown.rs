//! A level-triggered shutdown signal: a task that starts listening after the
//! signal was given still sees it (a broadcast message sent before a task
//! subscribed would be missed, and that task would never stop).

use tokio::sync::watch;

/// Gives the signal; dropping it gives it too.
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Waits for the signal; clone one per task.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Returns once shutdown was triggered (at once if it already was).
    pub async fn wait(&mut self) {
        // An error means the trigger is gone, which also means: stop.
        let _ = self.0.wait_for(|&stop| stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn late_listeners_see_an_earlier_trigger() {
        let (trigger, shutdown) = channel();
        trigger.trigger();
        let mut late = shutdown.clone();
        tokio::time::timeout(std::time::Duration::from_secs(1), late.wait())
            .await
            .expect("sees the earlier trigger");
        drop(trigger);
        let mut after_drop = shutdown;
        after_drop.wait().await;
    }
}
