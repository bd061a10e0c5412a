//! Reference sock_ops programs the bench measures ours against, side by side
//! in the same runs. They are aya-ebpf programs in bench-ebpf/, built by
//! `cargo xtask bench` with the same toolchain as ours, with none of our maps,
//! and attached to the bench cgroup like ours:
//!
//! - **Floor**: at PASSIVE_ESTABLISHED it asks for state callbacks, as ours
//!   does, and otherwise returns at once. What the invocations alone cost: the
//!   floor of any sock_ops design that learns of closes.
//! - **LPM counter**: the least the design asks for. At accept, the remote
//!   IPv4 address's counter in an LPM trie (created at zero when absent) gets
//!   +1; at TCP_CLOSE, -1. No port filter, no per-socket state, no events, no
//!   agent: a lower bound of any program that keeps per-IP counts in an LPM
//!   trie, as ours must.
//! - **Hash counter**: the same with an exact-match hash map (preallocated),
//!   to show what the trie itself costs.
//! - **LPM counter with events**: the LPM counter, and per accept and close a
//!   40-byte event (the socket's cookie, the address, the change) into a ring
//!   buffer without waking anyone, which a thread of the bench drains every
//!   100 ms as our agent does. What getting each connection to user space
//!   costs on top of the counter, with none of our agent's work on it.

use std::{
    fs::File,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{lpm_trie, HashMap, LpmTrie, MapData, RingBuf},
    programs::{CgroupAttachMode, SockOps},
    Ebpf,
};

use crate::kernel::ProgramStats;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reference {
    Floor,
    LpmCounter,
    HashCounter,
    LpmCounterEvents,
}

impl Reference {
    pub fn label(self) -> &'static str {
        match self {
            Reference::Floor => "floor: a sock_ops program that only asks for state callbacks",
            Reference::LpmCounter => {
                "LPM counter: per-IP count in an LPM trie, +1 at accept, -1 at close, nothing else"
            }
            Reference::HashCounter => "hash counter: the same in an exact-match hash map",
            Reference::LpmCounterEvents => {
                "LPM counter with events: the same, plus a 40-byte ring-buffer event per accept \
                 and close, drained every 100 ms by a reader thread"
            }
        }
    }

    /// The object and the program's name in it.
    fn object(self) -> (&'static [u8], &'static str) {
        match self {
            Reference::Floor => (FLOOR, "ref_floor"),
            Reference::LpmCounter => (LPM_COUNTER, "ref_lpm_count"),
            Reference::HashCounter => (HASH_COUNTER, "ref_hash_count"),
            Reference::LpmCounterEvents => (LPM_EVENTS, "ref_lpm_events"),
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Reference::Floor => "floor",
            Reference::LpmCounter => "LPM counter",
            Reference::HashCounter => "hash counter",
            Reference::LpmCounterEvents => "LPM counter with events",
        }
    }
}

// bench-ebpf's objects, one per reference (embedded by build.rs).
static FLOOR: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ref-floor.o"));
static LPM_COUNTER: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ref-lpm-counter.o"));
static HASH_COUNTER: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ref-hash-counter.o"));
static LPM_EVENTS: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ref-lpm-events.o"));

/// As bench-ebpf's events.
const EVENT_BYTES: usize = 40;

/// A reference program attached to a cgroup; detached (and its maps freed)
/// when dropped.
pub struct ReferenceSockOps {
    reference: Reference,
    // Field order is drop order: the program (detach) before the reader.
    ebpf: Ebpf,
    reader: Option<EventReader>,
}

/// Drains a reference program's ring buffer every 100 ms (as the agent does
/// on its timer) and counts the events.
struct EventReader {
    stop: Arc<AtomicBool>,
    read: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const DRAIN_EVERY: Duration = Duration::from_millis(100);

impl EventReader {
    fn start(mut ring: RingBuf<MapData>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let read = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, read) = (stop.clone(), read.clone());
            std::thread::spawn(move || loop {
                let done = stop.load(Ordering::Relaxed);
                let mut n = 0;
                while let Some(event) = ring.next() {
                    n += u64::from(event.len() == EVENT_BYTES);
                }
                read.fetch_add(n, Ordering::Relaxed);
                if done {
                    return;
                }
                std::thread::sleep(DRAIN_EVERY);
            })
        };
        Self {
            stop,
            read,
            thread: Some(thread),
        }
    }
}

impl Drop for EventReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl ReferenceSockOps {
    pub fn attach(reference: Reference, cgroup: &Path) -> Result<Self> {
        let (object, name) = reference.object();
        if object.is_empty() {
            bail!(
                "the {} program was not built: run the bench with `cargo xtask bench`, which \
                 builds bench-ebpf first",
                reference.short()
            );
        }
        let mut ebpf = Ebpf::load(object)
            .with_context(|| format!("loading the {} object", reference.short()))?;
        let group = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let program: &mut SockOps = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name} in the {} object", reference.short()))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("loading the {} program", reference.short()))?;
        program
            .attach(&group, CgroupAttachMode::Single)
            .with_context(|| format!("attaching the {} program", reference.short()))?;
        let reader = match ebpf.take_map("EVENTS") {
            Some(ring) => Some(EventReader::start(
                RingBuf::try_from(ring).context("mapping the reference ring buffer")?,
            )),
            None => None,
        };
        Ok(Self {
            reference,
            ebpf,
            reader,
        })
    }

    /// The counter map's entries and the sum of their values, or None for the
    /// floor. After a run whose connections all closed, every accept made an
    /// entry and every close took its +1 back: entries > 0 and a zero sum
    /// show the program did its work.
    pub fn counters(&self) -> Result<Option<(u64, i64)>> {
        let Some(map) = self.ebpf.map("COUNTS") else {
            return Ok(None);
        };
        let context = "walking the reference counter map";
        // The programs add two's complement deltas: a wrapping sum of the
        // values as i64 is the signed sum.
        let (mut entries, mut sum) = (0u64, 0i64);
        if self.reference == Reference::HashCounter {
            let counts: HashMap<_, [u32; 2], u64> = HashMap::try_from(map)?;
            for entry in counts.iter() {
                let (_, value) = entry.context(context)?;
                entries += 1;
                sum = sum.wrapping_add(value as i64);
            }
        } else {
            let counts: LpmTrie<_, u32, u64> = LpmTrie::try_from(map)?;
            for entry in counts.iter() {
                let (_, value): (lpm_trie::Key<u32>, u64) = entry.context(context)?;
                entries += 1;
                sum = sum.wrapping_add(value as i64);
            }
        }
        Ok(Some((entries, sum)))
    }

    /// Events the reader has drained so far (None without events). It drains
    /// every 100 ms, so a caller waiting for a count polls.
    pub fn events_read(&self) -> Option<u64> {
        let reader = self.reader.as_ref()?;
        Some(reader.read.load(Ordering::Relaxed))
    }

    pub fn stats(&self) -> Result<ProgramStats> {
        let (_, name) = self.reference.object();
        let info = self
            .ebpf
            .program(name)
            .context("the reference program is gone")?
            .info()
            .context("reading the reference program's run-time statistics")?;
        Ok(ProgramStats {
            run_time_ns: info.run_time().as_nanos() as u64,
            run_count: info.run_count(),
        })
    }
}

#[cfg(test)]
mod tests {
    //! Each reference against real connections in a cgroup of its own. Needs
    //! root and the objects `cargo xtask bench` builds (or `cargo +nightly
    //! build -p bench-ebpf ...`, see xtask); skips, saying why, without them.

    use std::{
        io::Read,
        net::{Ipv4Addr, TcpListener, TcpStream},
        path::PathBuf,
        sync::Mutex,
        time::Instant,
    };

    use aya::maps::{MapInfo, MapType};
    use integration_tests::{connect_from, ebpf_unavailable, TestCgroup};

    use super::*;
    use crate::env::Sysctl;

    /// One test at a time: each moves this whole process between cgroups for
    /// a moment, and turns the kernel's run-time statistics on and back.
    static SERIAL: Mutex<()> = Mutex::new(());

    /// Distinct sources, and connections from each.
    const SOURCES: u8 = 10;
    const PER_SOURCE: usize = 2;

    fn skip_reason(reference: Reference) -> Option<String> {
        if let Some(why) = ebpf_unavailable() {
            return Some(why);
        }
        if reference.object().0.is_empty() {
            return Some(format!(
                "the {} object was not built (cargo xtask bench builds bench-ebpf)",
                reference.short()
            ));
        }
        None
    }

    /// The cgroup2 directory this process is in, to come back to.
    fn own_cgroup() -> PathBuf {
        let line = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
        let relative = line
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup2 line");
        inbound_audit::kernel::cgroup::cgroup2_root()
            .expect("cgroup2")
            .join(relative.trim_start_matches('/'))
    }

    fn move_to(cgroup: &Path) {
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
            .unwrap_or_else(|e| panic!("joining {}: {e}", cgroup.display()));
    }

    /// A listener that belongs to `cgroup` (a socket's cgroup is its
    /// creator's at creation; accepted sockets take the listener's), while
    /// this process, and so every client socket, stays where it was.
    fn listener_in(cgroup: &TestCgroup) -> TcpListener {
        let home = own_cgroup();
        move_to(cgroup.path());
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0));
        move_to(&home);
        listener.expect("listening on 127.0.0.1")
    }

    /// Polls `read` until it gives `expected` or 10 s pass (closes may wait
    /// for a last ACK; the reader drains every 100 ms).
    fn eventually<T: PartialEq + std::fmt::Debug>(
        what: &str,
        expected: T,
        mut read: impl FnMut() -> T,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = read();
            if got == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {got:?}, not {expected:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// (type, key bytes, value bytes, max entries, flags).
    type Shape = (MapType, u32, u32, u32, u32);

    /// What the hand-written programs' maps were, so the figures stay
    /// comparable: the counters keyed by (prefix length 32, IPv4 address)
    /// with u64 values, the trie allocating on demand (BPF_F_NO_PREALLOC),
    /// the hash preallocated, the ring 4 MiB.
    fn expected_maps(reference: Reference) -> Vec<Shape> {
        let trie = (MapType::LpmTrie, 8, 8, 1 << 17, 1);
        match reference {
            Reference::Floor => vec![],
            Reference::LpmCounter => vec![trie],
            Reference::HashCounter => vec![(MapType::Hash, 8, 8, 1 << 17, 0)],
            Reference::LpmCounterEvents => vec![trie, (MapType::RingBuf, 0, 0, 4 << 20, 0)],
        }
    }

    fn maps_of(program: &ReferenceSockOps) -> Vec<Shape> {
        let (_, name) = program.reference.object();
        let info = program
            .ebpf
            .program(name)
            .expect("program")
            .info()
            .expect("info");
        let mut shapes: Vec<Shape> = info
            .map_ids()
            .expect("map ids")
            .expect("this kernel reports map ids")
            .into_iter()
            .map(|id| {
                let map = MapInfo::from_id(id).expect("map info");
                (
                    map.map_type().expect("known map type"),
                    map.key_size(),
                    map.value_size(),
                    map.max_entries(),
                    map.map_flags(),
                )
            })
            .collect();
        shapes.sort_by_key(|shape| shape.0 as u32);
        shapes
    }

    fn check(reference: Reference) {
        if let Some(why) = skip_reason(reference) {
            eprintln!("skipping the {} test: {why}", reference.short());
            return;
        }
        let _serial = SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let cgroup = TestCgroup::new(&format!("bench-ref-{}", reference.object().1));
        let listener = listener_in(&cgroup);
        let server = listener.local_addr().expect("listener address");
        let program = ReferenceSockOps::attach(reference, cgroup.path()).expect("attach");
        let mut expected = expected_maps(reference);
        expected.sort_by_key(|shape| shape.0 as u32);
        assert_eq!(
            maps_of(&program),
            expected,
            "the {} maps",
            reference.short()
        );
        let _stats = Sysctl::set("kernel.bpf_stats_enabled", "1").expect("bpf stats on");
        let before = program.stats().expect("stats");

        let mut open = Vec::new();
        for source in 1..=SOURCES {
            for _ in 0..PER_SOURCE {
                let client = connect_from(Ipv4Addr::new(127, 31, 0, source).into(), server);
                let (accepted, _) = listener.accept().expect("accept");
                open.push((client, accepted));
            }
        }
        let connections = open.len() as i64;
        let expected_open = match reference {
            Reference::Floor => None,
            _ => Some((u64::from(SOURCES), connections)),
        };
        eventually("counters with every connection open", expected_open, || {
            program.counters().expect("counters")
        });

        // As in the bench: the client closes, the server reads EOF and closes.
        for (client, mut accepted) in open {
            drop::<TcpStream>(client);
            let mut rest = Vec::new();
            accepted.read_to_end(&mut rest).expect("reading to EOF");
        }
        let expected_closed = expected_open.map(|(entries, _)| (entries, 0));
        eventually("counters after every close", expected_closed, || {
            program.counters().expect("counters")
        });
        let expected_events =
            (reference == Reference::LpmCounterEvents).then_some(2 * connections as u64);
        eventually("events read", expected_events, || program.events_read());

        let after = program.stats().expect("stats");
        // PASSIVE_ESTABLISHED and the state changes through to TCP_CLOSE at least.
        assert!(
            after.run_count - before.run_count >= 2 * connections as u64,
            "the {} program ran {} times for {connections} connections",
            reference.short(),
            after.run_count - before.run_count
        );
    }

    #[test]
    fn floor_runs_for_every_connection() {
        check(Reference::Floor);
    }

    #[test]
    fn lpm_counter_counts_each_source_and_back_to_zero() {
        check(Reference::LpmCounter);
    }

    #[test]
    fn hash_counter_counts_each_source_and_back_to_zero() {
        check(Reference::HashCounter);
    }

    #[test]
    fn lpm_events_counts_and_reports_two_events_per_connection() {
        check(Reference::LpmCounterEvents);
    }
}
