//! One node's rounds with Redis, every `tick`: publish this node's changed
//! counts (and, when needed, a full snapshot and the heartbeat), then follow
//! every other node's heartbeat, snapshot and stream into the fleet view.
//!
//! A round that fails (Redis stopped, unreachable, failing over) changes
//! nothing that was already merged; the publisher then owes a snapshot
//! (under a skipped sequence number, so followers see the gap and reload it)
//! and the follower simply retries. Queries never wait for any of this.
//!
//! About 700 lines: the publisher and the follower share the keys, the
//! sequence rules and the round that runs them, which read best side by side.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use redis::{aio::MultiplexedConnection, RedisResult};

use crate::domain::{unix_now, valid_node_name};

use super::{
    link::{Link, Target},
    wire::{self, Entry, Header, Heartbeat},
    ClusterStats, ClusterView,
};

/// This node's counts, as the publisher reads them.
pub trait LocalShare: Send + Sync {
    /// Entries whose count changed since the last call, with their counts now.
    fn take_changes(&self) -> Vec<Entry>;
    /// Every entry with a count; leaves the changes to `take_changes`.
    fn snapshot(&self) -> Vec<Entry>;
}

/// How the node talks to Redis.
#[derive(Debug, Clone)]
pub struct Settings {
    pub target: Target,
    pub node: String,
    pub key_prefix: String,
    /// A node whose heartbeat has not moved for this long no longer counts.
    pub node_ttl: Duration,
    /// Time between rounds.
    pub tick: Duration,
    /// A full snapshot at least this often, so streams can be trimmed and a
    /// newcomer never replays more than this much.
    pub snapshot_every: Duration,
    /// Bound on one round's Redis calls.
    pub timeout: Duration,
}

impl Settings {
    pub fn new(target: Target, node: &str, key_prefix: &str, node_ttl: Duration) -> Self {
        Self {
            target,
            node: node.to_string(),
            key_prefix: key_prefix.to_string(),
            node_ttl,
            tick: Duration::from_millis(100),
            // The stream keeps 10,000 batches, over 15 minutes at 10 a
            // second; a snapshot a minute keeps the bytes down (it is the
            // largest write: about 45 bytes an entry).
            snapshot_every: Duration::from_secs(60),
            timeout: Duration::from_millis(500).min(node_ttl / 2),
        }
    }
}

/// Batches kept in each node's stream: far more than are published between
/// two snapshots, so a follower that keeps up never needs one.
const LOG_MAX_LEN: usize = 10_000;
/// Stream entries read per call.
const LOG_READ_COUNT: usize = 512;
/// Largest snapshot read back (bytes): 1M IPs take about 30 MB.
const MAX_SNAPSHOT_BYTES: i64 = 512 << 20;
/// Most node names followed.
const MAX_NODES: usize = 1024;
struct Keys {
    prefix: String,
}

impl Keys {
    fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    fn node(&self, node: &str, what: &str) -> String {
        format!("{}:node:{node}:{what}", self.prefix)
    }
}

/// Runs rounds until the task is dropped.
pub async fn run(settings: Settings, view: Arc<ClusterView>, local: Arc<dyn LocalShare>) {
    let keys = Keys {
        prefix: settings.key_prefix.clone(),
    };
    let mut link = Link::new(settings.target.clone(), settings.timeout);
    let mut publisher = Publisher::new(&settings);
    let mut follower = Follower::default();
    let mut errors = ErrorLog::default();
    let mut tick = tokio::time::interval(settings.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry = Backoff::default();
    loop {
        tick.tick().await;
        if !retry.due() {
            continue;
        }
        let round = async {
            let connection = link.get().await?;
            if retry.failing() {
                // Nothing is built for a Redis that does not answer: a
                // snapshot holds the local locks while it is collected.
                redis::cmd("PING").query_async::<()>(connection).await?;
            }
            let published = publisher
                .round(connection, &keys, &settings, &*local, &view.stats)
                .await;
            if let Err(e) = published {
                ClusterStats::add(&view.stats.publish_errors, 1);
                return Err(e);
            }
            let followed = follower.round(connection, &keys, &settings, &view).await;
            if followed.is_err() {
                ClusterStats::add(&view.stats.follow_errors, 1);
            }
            followed
        };
        match tokio::time::timeout(settings.timeout * 2, round).await {
            Ok(Ok(())) => {
                view.synced();
                errors.recovered();
                retry.succeeded();
            }
            Ok(Err(e)) => {
                link.broken();
                publisher.round_failed();
                errors.failed(&e.to_string(), link.target());
                retry.failed();
            }
            Err(_) => {
                link.broken();
                publisher.round_failed();
                errors.failed("timed out", link.target());
                retry.failed();
            }
        }
        // Liveness is judged even while Redis is away: a silent node goes.
        let gone = {
            let mut fleet = view.write();
            fleet.expire_windows(unix_now());
            fleet.drop_silent(view.clock(), settings.node_ttl)
        };
        for name in gone {
            log::info!(
                "cluster: node {name} silent for {} s, no longer counted",
                settings.node_ttl.as_secs()
            );
        }
    }
}

/// After failed rounds, the next attempts come 0.2, 0.4, 0.8, then every
/// 1 s: a Redis that is down costs this node next to nothing.
#[derive(Default)]
struct Backoff {
    failures: u32,
    next: Option<Instant>,
}

impl Backoff {
    fn due(&self) -> bool {
        self.next.is_none_or(|at| Instant::now() >= at)
    }

    fn failing(&self) -> bool {
        self.failures > 0
    }

    fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let wait = Duration::from_millis(100 << self.failures.min(4)).min(Duration::from_secs(1));
        self.next = Some(Instant::now() + wait);
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.next = None;
    }
}

/// Logs the first failure and the recovery, not every failed round.
#[derive(Default)]
struct ErrorLog {
    failing_since: Option<Instant>,
    failed_rounds: u64,
}

impl ErrorLog {
    fn failed(&mut self, error: &str, target: &Target) {
        self.failed_rounds += 1;
        if self.failing_since.is_none() {
            self.failing_since = Some(Instant::now());
            log::warn!("cluster: Redis at {target:?}: {error}; local answers go on, cluster answers use the last view");
        }
    }

    fn recovered(&mut self) {
        if let Some(since) = self.failing_since.take() {
            log::info!(
                "cluster: Redis answers again after {:.1} s ({} failed rounds)",
                since.elapsed().as_secs_f64(),
                self.failed_rounds
            );
            self.failed_rounds = 0;
        }
    }
}

struct Publisher {
    header: Header,
    beat: u64,
    /// A full snapshot is owed: at start, after a failed round, when asked.
    owe_snapshot: bool,
    /// The first snapshot of this run also drops the previous run's stream.
    first: bool,
    last_snapshot: Option<Instant>,
    last_beat: Option<Instant>,
    beat_every: Duration,
    ttl_ms: u64,
    /// A publish was sent and not confirmed: if the round fails now, Redis
    /// may or may not have it.
    in_flight: bool,
}

impl Publisher {
    fn new(settings: &Settings) -> Self {
        Self {
            header: Header {
                epoch: run_epoch(),
                seq: 0,
            },
            beat: 0,
            owe_snapshot: true,
            first: true,
            last_snapshot: None,
            last_beat: None,
            beat_every: (settings.node_ttl / 5).min(Duration::from_millis(500)),
            ttl_ms: settings.node_ttl.as_millis().max(1) as u64,
            in_flight: false,
        }
    }

    /// After a failed round: if a publish was under way, what it took from
    /// the local state may never have reached Redis. Skipping a sequence
    /// number makes followers reload the snapshot that carries it.
    fn round_failed(&mut self) {
        if !std::mem::take(&mut self.in_flight) {
            return;
        }
        if !self.owe_snapshot {
            self.header.seq += 1;
        }
        self.owe_snapshot = true;
    }

    async fn round(
        &mut self,
        connection: &mut MultiplexedConnection,
        keys: &Keys,
        settings: &Settings,
        local: &dyn LocalShare,
        stats: &ClusterStats,
    ) -> RedisResult<()> {
        let node = &settings.node;
        let changes = local.take_changes();
        let snapshot_due = self.owe_snapshot
            || self
                .last_snapshot
                .is_none_or(|at| at.elapsed() >= settings.snapshot_every);
        let beat_due = self
            .last_beat
            .is_none_or(|at| at.elapsed() >= self.beat_every);
        if changes.is_empty() && !snapshot_due && !beat_due {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        // Where the two commands that fail on a key of the wrong type sit.
        let mut log_at = None;
        if !changes.is_empty() {
            log_at = Some(pipe.len());
            self.header.seq += 1;
            pipe.cmd("XADD")
                .arg(keys.node(node, "log"))
                .arg("MAXLEN")
                .arg("~")
                .arg(LOG_MAX_LEN)
                .arg("*")
                .arg("epoch")
                .arg(format!("{:016x}", self.header.epoch))
                .arg("seq")
                .arg(self.header.seq)
                .arg("data")
                .arg(wire::encode(&changes))
                .ignore();
        }
        if snapshot_due {
            if self.first {
                pipe.cmd("DEL").arg(keys.node(node, "log")).ignore();
            }
            pipe.cmd("SET")
                .arg(keys.node(node, "snap"))
                .arg(wire::encode_snapshot(self.header, &local.snapshot()))
                .ignore();
        }
        self.beat += 1;
        pipe.cmd("SET")
            .arg(keys.node(node, "hb"))
            .arg(
                Heartbeat {
                    header: self.header,
                    beat: self.beat,
                }
                .encode(),
            )
            .arg("PX")
            .arg(self.ttl_ms)
            .ignore();
        let nodes_at = pipe.len();
        pipe.cmd("SADD").arg(keys.nodes()).arg(node).ignore();
        // Redis restarted empty, or a follower found a gap: a snapshot is owed.
        pipe.cmd("EXISTS").arg(keys.node(node, "snap"));
        pipe.cmd("DEL").arg(keys.node(node, "want"));
        self.in_flight = true;
        let (snapshot_exists, wanted): (bool, bool) = match pipe.query_async(connection).await {
            Ok(answers) => answers,
            Err(e) => {
                // Another client put a key of another type where this node's
                // stream or the set of nodes belongs: the commands before and
                // after it took effect (a transaction does not roll back), so
                // the round counts as failed (a snapshot is owed under a
                // skipped sequence number) and the key is removed for the
                // next round to make it again.
                let wrong: Vec<String> = wrong_typed(&e)
                    .filter_map(|at| {
                        if Some(at) == log_at {
                            Some(keys.node(node, "log"))
                        } else if at == nodes_at {
                            Some(keys.nodes())
                        } else {
                            None
                        }
                    })
                    .collect();
                if !wrong.is_empty() {
                    ClusterStats::add(&stats.refused, wrong.len() as u64);
                    log::warn!("cluster: {} held another type than ours (written by another client): removed", wrong.join(", "));
                    let _ = redis::cmd("DEL")
                        .arg(&wrong)
                        .query_async::<()>(connection)
                        .await;
                }
                return Err(e);
            }
        };
        self.in_flight = false;
        if !changes.is_empty() {
            ClusterStats::add(&stats.batches_published, 1);
        }
        if snapshot_due {
            ClusterStats::add(&stats.snapshots_published, 1);
            self.owe_snapshot = false;
            self.first = false;
            self.last_snapshot = Some(Instant::now());
        }
        self.last_beat = Some(Instant::now());
        if !snapshot_exists || wanted {
            self.owe_snapshot = true;
        }
        Ok(())
    }
}

/// Positions in a failed pipeline of the commands refused with WRONGTYPE.
fn wrong_typed(error: &redis::RedisError) -> impl Iterator<Item = usize> {
    error
        .clone()
        .into_server_errors()
        .into_iter()
        .flat_map(|errors| errors.to_vec())
        .filter(|(_, e)| e.code() == "WRONGTYPE")
        .map(|(at, _)| at)
}

/// A single command refused because the key holds another type: another
/// client wrote it, and it is refused like any malformed entry.
fn is_wrong_type(error: &redis::RedisError) -> bool {
    error.code() == Some("WRONGTYPE")
}

/// A random number per agent run: a restarted node is told apart from its
/// earlier self, whatever its sequence numbers say.
fn run_epoch() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(unix_now().as_nanos());
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// Where this node is in another node's data.
struct Followed {
    epoch: u64,
    beat: u64,
    /// The last stream entry read ("-": from the start).
    last_id: String,
    /// The share is out of step and waits for a new snapshot.
    stale: bool,
    asked_at: Option<Instant>,
}

#[derive(Default)]
struct Follower {
    followed: HashMap<String, Followed>,
}

impl Follower {
    async fn round(
        &mut self,
        connection: &mut MultiplexedConnection,
        keys: &Keys,
        settings: &Settings,
        view: &ClusterView,
    ) -> RedisResult<()> {
        let stats = &view.stats;
        let members: Vec<Vec<u8>> = match redis::cmd("SMEMBERS")
            .arg(keys.nodes())
            .query_async(connection)
            .await
        {
            // Not a set: refused; this node's publisher removes it.
            Err(e) if is_wrong_type(&e) => {
                ClusterStats::add(&stats.refused, 1);
                Vec::new()
            }
            answer => answer?,
        };
        let mut names = Vec::new();
        for member in members.into_iter().take(MAX_NODES) {
            match String::from_utf8(member) {
                Ok(name) if valid_node_name(&name) => {
                    if name != settings.node {
                        names.push(name);
                    }
                }
                _ => ClusterStats::add(&stats.refused, 1),
            }
        }
        if names.is_empty() {
            return Ok(());
        }
        let beats: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(names.iter().map(|n| keys.node(n, "hb")).collect::<Vec<_>>())
            .query_async(connection)
            .await?;
        for (name, beat) in names.iter().zip(beats) {
            let Some(beat) = beat else { continue };
            let Some(beat) = std::str::from_utf8(&beat).ok().and_then(Heartbeat::parse) else {
                ClusterStats::add(&stats.refused, 1);
                continue;
            };
            self.follow(connection, keys, settings, view, name, beat)
                .await?;
        }
        let fleet = view.read();
        self.followed
            .retain(|name, _| fleet.node(name).is_some() || names.contains(name));
        Ok(())
    }

    async fn follow(
        &mut self,
        connection: &mut MultiplexedConnection,
        keys: &Keys,
        settings: &Settings,
        view: &ClusterView,
        name: &str,
        beat: Heartbeat,
    ) -> RedisResult<()> {
        let now = view.clock();
        let in_step = self.followed.get(name).is_some_and(|f| {
            f.epoch == beat.header.epoch && !f.stale && view.read().node(name).is_some()
        });
        if !in_step {
            self.load_snapshot(connection, keys, settings, view, name, beat)
                .await?;
        }
        let Some(followed) = self.followed.get_mut(name) else {
            return Ok(());
        };
        if followed.stale {
            return Ok(());
        }
        if followed.beat != beat.beat {
            followed.beat = beat.beat;
            view.write().touch(name, now);
        }
        let applied = |view: &ClusterView| view.read().node(name).map_or(0, |s| s.seq);
        if beat.header.seq > applied(view) {
            self.read_log(connection, keys, view, name, false).await?;
            // The heartbeat is written with the batch it names, atomically:
            // a stream that ends short of it lost batches (a publish that
            // failed half-way, a Redis restarted empty), and the snapshot
            // written with that heartbeat carries them.
            let stale = self.followed.get(name).is_none_or(|f| f.stale);
            if stale || beat.header.seq > applied(view) {
                self.load_snapshot(connection, keys, settings, view, name, beat)
                    .await?;
                self.read_log(connection, keys, view, name, true).await?;
                if beat.header.seq > applied(view) {
                    // Snapshot and stream together still end short of the
                    // heartbeat: batches the node had written are gone (a
                    // failover to a replica they had not reached yet). Only
                    // a snapshot written from now on carries them.
                    if let Some(followed) = self.followed.get_mut(name) {
                        followed.stale = true;
                        ask_for_snapshot(connection, keys, settings, name, followed).await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn load_snapshot(
        &mut self,
        connection: &mut MultiplexedConnection,
        keys: &Keys,
        settings: &Settings,
        view: &ClusterView,
        name: &str,
        beat: Heartbeat,
    ) -> RedisResult<()> {
        let stats = &view.stats;
        let key = keys.node(name, "snap");
        // Not a string (another client's): refused, and asked for again
        // below, which the node's publisher answers by overwriting it.
        let length: i64 = match redis::cmd("STRLEN").arg(&key).query_async(connection).await {
            Err(e) if is_wrong_type(&e) => i64::MAX,
            answer => answer?,
        };
        let snapshot: Option<Vec<u8>> = if length > MAX_SNAPSHOT_BYTES {
            ClusterStats::add(&stats.refused, 1);
            None
        } else {
            redis::cmd("GET").arg(&key).query_async(connection).await?
        };
        let asked_at = self.followed.get(name).and_then(|f| f.asked_at);
        let parsed = snapshot.and_then(|bytes| {
            let parsed = std::str::from_utf8(&bytes)
                .ok()
                .and_then(wire::parse_snapshot);
            if parsed.is_none() {
                ClusterStats::add(&stats.refused, 1);
            }
            parsed
        });
        let now = view.clock();
        match parsed {
            Some((header, parsed)) if header.epoch == beat.header.epoch => {
                ClusterStats::add(&stats.refused, parsed.refused);
                ClusterStats::add(&stats.snapshots_loaded, 1);
                {
                    let mut fleet = view.write();
                    fleet.reset_node(name, header.epoch, header.seq, now);
                    fleet.apply(name, header.seq, &parsed.entries);
                }
                self.followed.insert(
                    name.to_string(),
                    Followed {
                        epoch: header.epoch,
                        beat: beat.beat,
                        last_id: "-".into(),
                        stale: false,
                        // Still rate-limited while the snapshot is behind.
                        asked_at,
                    },
                );
            }
            _ => {
                // No usable snapshot of this run yet (just started, or Redis
                // lost it): what we hold of an earlier run no longer counts.
                {
                    let mut fleet = view.write();
                    if fleet
                        .node(name)
                        .is_some_and(|s| s.epoch != beat.header.epoch)
                    {
                        fleet.drop_node(name);
                    }
                }
                let followed = self.followed.entry(name.to_string()).or_insert(Followed {
                    epoch: beat.header.epoch,
                    beat: beat.beat,
                    last_id: "-".into(),
                    stale: true,
                    asked_at: None,
                });
                followed.stale = true;
                ask_for_snapshot(connection, keys, settings, name, followed).await?;
            }
        }
        Ok(())
    }

    /// Reads the node's stream past the last entry read. `after_snapshot`:
    /// the snapshot was loaded just now, so a gap it does not cover is not
    /// the node's (see [`apply_log`]).
    async fn read_log(
        &mut self,
        connection: &mut MultiplexedConnection,
        keys: &Keys,
        view: &ClusterView,
        name: &str,
        after_snapshot: bool,
    ) -> RedisResult<()> {
        let Some(followed) = self.followed.get_mut(name) else {
            return Ok(());
        };
        loop {
            let start = if followed.last_id == "-" {
                "-".to_string()
            } else {
                format!("({}", followed.last_id)
            };
            let entries: Vec<StreamEntry> = match redis::cmd("XRANGE")
                .arg(keys.node(name, "log"))
                .arg(start)
                .arg("+")
                .arg("COUNT")
                .arg(LOG_READ_COUNT)
                .query_async(connection)
                .await
            {
                // Not a stream: refused. A share left behind by it asks for
                // a snapshot (in `follow`); the publisher removes the key
                // when it next writes the stream.
                Err(e) if is_wrong_type(&e) => {
                    ClusterStats::add(&view.stats.refused, 1);
                    return Ok(());
                }
                answer => answer?,
            };
            let read = entries.len();
            if !apply_log(view, name, followed, entries, after_snapshot) {
                return Ok(());
            }
            if read < LOG_READ_COUNT {
                return Ok(());
            }
        }
    }
}

/// Applies stream entries in order; false when the share fell out of step
/// (a gap: a batch never reached Redis, in a failed round or a failover) and
/// only a newer snapshot can make it exact again.
///
/// A publisher skips sequence numbers only after a failed round, and then
/// writes the batch after the gap in one transaction with a snapshot that
/// covers it. So right after a snapshot load (`after_snapshot`), a gap past
/// that snapshot is not the node's: another client wrote it, and it is
/// refused like a malformed entry (otherwise every round would reload the
/// snapshot and meet it again). Were it the node's after all (its round
/// failed between our two reads), the heartbeat, which names the node's last
/// batch, makes the next round reload the snapshot that carries it.
fn apply_log(
    view: &ClusterView,
    name: &str,
    followed: &mut Followed,
    entries: Vec<StreamEntry>,
    after_snapshot: bool,
) -> bool {
    let stats = &view.stats;
    let mut fleet = view.write();
    for (id, fields) in entries {
        followed.last_id = id;
        let Some(batch) = StreamBatch::parse(&fields) else {
            ClusterStats::add(&stats.refused, 1);
            continue;
        };
        let Some(share) = fleet.node(name) else {
            return false;
        };
        if batch.epoch != share.epoch || batch.seq <= share.seq {
            continue;
        }
        if batch.seq != share.seq + 1 {
            if after_snapshot {
                ClusterStats::add(&stats.refused, 1);
                continue;
            }
            followed.stale = true;
            followed.asked_at = None;
            return false;
        }
        let parsed = wire::parse_batch(batch.data);
        ClusterStats::add(&stats.refused, parsed.refused);
        fleet.apply(name, batch.seq, &parsed.entries);
    }
    true
}

/// Sets the node's `want` key (at most once a second per node): its
/// publisher then writes a fresh snapshot.
async fn ask_for_snapshot(
    connection: &mut MultiplexedConnection,
    keys: &Keys,
    settings: &Settings,
    name: &str,
    followed: &mut Followed,
) -> RedisResult<()> {
    if followed
        .asked_at
        .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
    {
        return Ok(());
    }
    redis::cmd("SET")
        .arg(keys.node(name, "want"))
        .arg(&settings.node)
        .arg("PX")
        .arg(settings.node_ttl.as_millis().max(1) as u64)
        .query_async::<()>(connection)
        .await?;
    followed.asked_at = Some(Instant::now());
    Ok(())
}

/// A stream entry as XRANGE returns it: its id and its fields.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// One stream entry's fields.
struct StreamBatch<'a> {
    epoch: u64,
    seq: u64,
    data: &'a str,
}

impl<'a> StreamBatch<'a> {
    fn parse(fields: &'a [(String, Vec<u8>)]) -> Option<Self> {
        let field = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
        };
        let epoch = field("epoch").filter(|e| e.len() == 16)?;
        Some(Self {
            epoch: u64::from_str_radix(epoch, 16).ok()?,
            seq: field("seq")?.parse().ok()?,
            data: field("data")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_batches() {
        let fields = vec![
            ("epoch".to_string(), b"00000000000000ff".to_vec()),
            ("seq".to_string(), b"7".to_vec()),
            ("data".to_string(), b"s SMTP 10.0.0.1 1\n".to_vec()),
        ];
        let batch = StreamBatch::parse(&fields).unwrap();
        assert_eq!((batch.epoch, batch.seq), (255, 7));
        let mut bad = fields.clone();
        bad[0].1 = b"ff".to_vec();
        assert!(StreamBatch::parse(&bad).is_none());
        let mut bad = fields.clone();
        bad[2].1 = vec![0xff, 0xfe];
        assert!(StreamBatch::parse(&bad).is_none());
        assert!(StreamBatch::parse(&fields[..2]).is_none());
    }
}
