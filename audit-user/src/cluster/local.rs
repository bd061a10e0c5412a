//! This node's own counts as the publisher reads them: the live index and
//! the monitors' windows, by service name (slots are this node's own
//! numbering; names are what the fleet shares).

use std::collections::HashMap;

use crate::{counting::state::SharedState, domain::unix_now};

use super::{wire::Entry, LocalShare};

impl LocalShare for SharedState {
    fn take_changes(&self) -> Vec<Entry> {
        // Counts as of every event the kernel has produced, as queries see them.
        self.drain_events(unix_now());
        let names = slot_names(self);
        let mut entries: Vec<Entry> = self
            .write_sessions()
            .take_changes()
            .into_iter()
            .filter_map(|(slot, ip, count)| Some(Entry::sessions(names.get(&slot)?, ip, count)))
            .collect();
        entries.extend(self.lock_monitors().take_changes().into_iter().map(
            |((spec, epoch, series, ip), count)| Entry::window(spec, epoch, series, ip, count),
        ));
        entries
    }

    fn snapshot(&self) -> Vec<Entry> {
        let names = slot_names(self);
        let mut entries: Vec<Entry> = self
            .read_sessions()
            .entries()
            .filter_map(|(slot, ip, count)| Some(Entry::sessions(names.get(&slot)?, ip, count)))
            .collect();
        let monitors = self.lock_monitors();
        for monitor in monitors.iter() {
            let spec = monitor.spec();
            entries.extend(
                monitor.entries().map(|(epoch, series, ip, count)| {
                    Entry::window(spec, epoch, series, ip, count)
                }),
            );
        }
        entries
    }
}

/// Slot → service name, for the configuration in force.
fn slot_names(state: &SharedState) -> HashMap<u8, String> {
    state
        .setup()
        .slots
        .iter()
        .map(|(name, &slot)| (slot, name.clone()))
        .collect()
}
