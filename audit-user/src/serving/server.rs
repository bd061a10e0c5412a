//! The query socket: a Unix stream server with a connection limit and a shared
//! shutdown signal. A client's errors are logged and end only that client.
//!
//! Access is checked at accept, from the peer's credentials: a peer allowed
//! neither to query nor to report is answered `ERR forbidden` and closed
//! before it takes one of the `max_clients` places, so refused users cannot
//! crowd out allowed ones. Refusals are logged once per uid per
//! [`REFUSAL_LOG_INTERVAL`], with a count, so they cannot flood the log either.

use std::{
    collections::HashMap,
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::UnixStream,
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use crate::{
    counting::state::{AgentStats, SharedState},
    serving::{
        cidr_shell::CidrShell,
        command,
        connection::{Connection, Incoming},
        policy_host::{PolicyHook, PolicyHost},
        protocol::{parse_request, ErrorCode, PolicyCall, Query, QueryError, Reply, Request},
        show_all,
        shutdown::Shutdown,
    },
    sys::socket::QuerySocket,
};

/// Serves queries until `shutdown` fires.
pub async fn serve(
    socket: QuerySocket,
    state: Arc<SharedState>,
    shutdown: Shutdown,
    policy: PolicyHook,
) {
    let max = state.setup().config.max_clients;
    let stop = shutdown.clone();
    let refusals = Arc::new(RefusalLog::new(REFUSAL_LOG_INTERVAL));
    let admit_state = state.clone();
    let admit_refusals = refusals.clone();
    // Answering refused peers is bounded too: beyond this many at once they
    // are closed without an answer.
    let answering = Arc::new(Semaphore::new(MAX_REFUSALS_ANSWERING));
    accept_admitting(
        &socket,
        max,
        shutdown,
        move |stream| admit(stream, &admit_state, &admit_refusals, &answering),
        move |stream| refuse_busy(stream, max),
        move |stream, place| {
            let (state, stop, refusals) = (state.clone(), stop.clone(), refusals.clone());
            let policy = policy.clone();
            async move {
                let served = handle_client(stream, place, &state, &refusals, stop, &policy);
                if let Err(e) = served.await {
                    log::debug!("client connection ended: {e}");
                }
            }
        },
    )
    .await;
}

/// How often refusals of one uid are logged at most.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Refused peers answered at once; see [`serve`].
const MAX_REFUSALS_ANSWERING: usize = 64;

/// The check at accept: the stream back if its peer may query (or report,
/// which implies querying), else the task that answers the refusal.
fn admit(
    stream: UnixStream,
    state: &SharedState,
    refusals: &RefusalLog,
    answering: &Arc<Semaphore>,
) -> Result<UnixStream, Option<Answer>> {
    let peer = Peer::of(&stream);
    if state
        .setup()
        .config
        .access
        .allows(peer.uid, peer.gid, false)
    {
        return Ok(stream);
    }
    refusals.refused(&peer, Refused::Connection);
    let Ok(place) = answering.clone().try_acquire_owned() else {
        return Err(None);
    };
    Err(Some(Box::pin(async move {
        refuse_forbidden(stream, &peer).await;
        drop(place);
    })))
}

/// The task answering one refused peer (boxed: it holds read and write buffers).
type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

/// A client's place among the `max` a server admits at once. The handler
/// gives it back no later than it closes the connection: a client that sees
/// its connection end and connects again at once must find the place free
/// (Postfix reconnects and, refused, applies its default action).
pub struct Place {
    _permit: OwnedSemaphorePermit,
}

/// Accepts clients on `socket` until shutdown, each served by its own task
/// holding its [`Place`]; at most `max` at once, the others are handed to
/// `refuse`.
pub async fn accept_loop<Handle, Handled, Refuse, Refused>(
    socket: &QuerySocket,
    max: usize,
    stop: Shutdown,
    refuse: Refuse,
    handle: Handle,
) where
    Handle: Fn(UnixStream, Place) -> Handled,
    Handled: std::future::Future<Output = ()> + Send + 'static,
    Refuse: Fn(UnixStream) -> Refused,
    Refused: std::future::Future<Output = ()> + Send + 'static,
{
    accept_admitting(
        socket,
        max,
        stop,
        Ok::<_, Option<std::future::Ready<()>>>,
        refuse,
        handle,
    )
    .await;
}

/// [`accept_loop`] with a check before a client takes a place: `admit` hands
/// the stream back, or refuses it with the task that answers it (run on its
/// own; None: the stream is just closed). A refused client never holds a place.
pub async fn accept_admitting<Admit, Denied, Handle, Handled, Refuse, Refused>(
    socket: &QuerySocket,
    max: usize,
    mut stop: Shutdown,
    admit: Admit,
    refuse: Refuse,
    handle: Handle,
) where
    Admit: Fn(UnixStream) -> Result<UnixStream, Option<Denied>>,
    Denied: std::future::Future<Output = ()> + Send + 'static,
    Handle: Fn(UnixStream, Place) -> Handled,
    Handled: std::future::Future<Output = ()> + Send + 'static,
    Refuse: Fn(UnixStream) -> Refused,
    Refused: std::future::Future<Output = ()> + Send + 'static,
{
    let places = Arc::new(Semaphore::new(max));
    loop {
        let stream = tokio::select! {
            _ = stop.wait() => break,
            accepted = socket.accept() => match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    log::warn!("accept on {}: {e}", socket.path().display());
                    // EMFILE and friends: give other tasks a chance to free descriptors.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let stream = match admit(stream) {
            Ok(stream) => stream,
            Err(denied) => {
                if let Some(denied) = denied {
                    tokio::spawn(denied);
                }
                continue;
            }
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream));
            continue;
        };
        tokio::spawn(handle(stream, Place { _permit: place }));
    }
}

async fn refuse_busy(stream: UnixStream, max: usize) {
    let mut connection = Connection::new(stream);
    let reply = Reply::Error(QueryError::new(
        ErrorCode::Busy,
        format!("too many clients (max_clients = {max}); try again later"),
    ));
    let _ = connection.write_reply(&reply, WRITE_TIMEOUT).await;
    let _ = connection.close_draining().await;
}

async fn refuse_forbidden(stream: UnixStream, peer: &Peer) {
    let mut connection = Connection::new(stream);
    let reply = Reply::Error(QueryError::new(
        ErrorCode::Forbidden,
        format!(
            "uid {} may not query; closing",
            peer.uid.map_or("?".to_string(), |u| u.to_string())
        ),
    ));
    // The answer fits in the socket's buffer: a peer that does not read
    // cannot hold this task for long.
    let _ = connection.write_reply(&reply, REFUSAL_WRITE_TIMEOUT).await;
    let _ = connection.close_draining().await;
}

/// How long a client may take to read one answer before it is dropped.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The same for a refused peer's one answer.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refused {
    /// The connection, at accept: neither query nor add access.
    Connection,
    /// A report (`add`) on a connection allowed to query.
    Add,
}

/// Rate-limited refusal logging: the first refusal of a uid (per kind) is
/// logged at once; later ones are counted and logged as one line with the
/// count when the next refusal comes at least `interval` after the last line.
pub struct RefusalLog {
    interval: Duration,
    peers: Mutex<HashMap<(Option<u32>, Refused), Pending>>,
}

struct Pending {
    logged_at: Instant,
    /// Refusals since the last line.
    unlogged: u64,
}

/// Peers remembered before idle ones are forgotten (a uid forgotten is just
/// logged again at its next refusal).
const MAX_REMEMBERED_PEERS: usize = 4096;

impl RefusalLog {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// Notes a refusal of `peer`; logs it when due.
    pub fn refused(&self, peer: &Peer, what: Refused) {
        if let Some(count) = self.note(peer.uid, what, Instant::now()) {
            let gid = peer.gid.map_or("?".to_string(), |g| g.to_string());
            let (refused, access) = match what {
                Refused::Connection => ("a connection", "query"),
                Refused::Add => ("a report (add)", "add"),
            };
            if count == 1 {
                log::warn!(
                    "refused {refused} from {peer} (gid {gid}): not in the configured {access} access; \
                     more from this uid are logged at most once in {} s",
                    self.interval.as_secs()
                );
            } else {
                log::warn!(
                    "refused {count} times {refused} from {peer} (gid {gid}) since the last such line: \
                     not in the configured {access} access"
                );
            }
        }
    }

    /// Counts a refusal at `now`; Some(refusals to report) when a line is due.
    fn note(&self, uid: Option<u32>, what: Refused, now: Instant) -> Option<u64> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if peers.len() >= MAX_REMEMBERED_PEERS && !peers.contains_key(&(uid, what)) {
            let interval = self.interval;
            peers.retain(|_, p| now.duration_since(p.logged_at) < interval);
        }
        match peers.get_mut(&(uid, what)) {
            None => {
                peers.insert(
                    (uid, what),
                    Pending {
                        logged_at: now,
                        unlogged: 0,
                    },
                );
                Some(1)
            }
            Some(pending) => {
                pending.unlogged += 1;
                if now.duration_since(pending.logged_at) < self.interval {
                    return None;
                }
                pending.logged_at = now;
                Some(std::mem::take(&mut pending.unlogged))
            }
        }
    }
}

async fn handle_client(
    stream: UnixStream,
    place: Place,
    state: &SharedState,
    refusals: &RefusalLog,
    mut stop: Shutdown,
    policy: &PolicyHook,
) -> io::Result<()> {
    let peer = Peer::of(&stream);
    let (idle, partial) = (
        state.setup().config.client_idle_timeout,
        state.setup().config.request_timeout,
    );
    let mut connection = Connection::new(stream);
    // Declared after the connection, so dropped before it on every return.
    let place = place;
    loop {
        let incoming = tokio::select! {
            _ = stop.wait() => return Ok(()),
            incoming = connection.read_request(idle, partial) => incoming?,
        };
        let (line, last) = match incoming {
            Incoming::Request(line) => (line, false),
            Incoming::LastRequest(line) => (line, true),
            Incoming::TooLong => {
                let reply = Reply::Error(QueryError::new(
                    ErrorCode::TooLong,
                    format!(
                        "request longer than {} bytes; closing",
                        crate::serving::protocol::MAX_REQUEST_LEN
                    ),
                ));
                connection.write_reply(&reply, WRITE_TIMEOUT).await?;
                drop(place);
                return connection.close_draining().await;
            }
            Incoming::Closed => return Ok(()),
            Incoming::Idle => {
                log::debug!("dropping {peer}: no request for {} s", idle.as_secs());
                return Ok(());
            }
            Incoming::TimedOut => {
                log::info!(
                    "dropping {peer}: a request took longer than {} s to arrive",
                    partial.as_secs()
                );
                return Ok(());
            }
        };
        match (policy, policy_call(&line)) {
            (Some(host), Some(call)) => {
                let reply = answer_policy(host.as_ref(), call, state).await;
                connection.write_reply(&reply, WRITE_TIMEOUT).await?
            }
            _ => match answer_as(&line, state, &peer, refusals) {
                Outcome::Reply(reply) => connection.write_reply(&reply, WRITE_TIMEOUT).await?,
                Outcome::ShowAll => {
                    show_all::stream(&mut connection, state, &mut stop, WRITE_TIMEOUT).await?
                }
            },
        }
        if last {
            drop(place);
            return connection.close().await;
        }
    }
}

/// The call of a well-formed `policy` request; anything else (malformed
/// ones included) goes the usual way, which answers its error.
fn policy_call(line: &[u8]) -> Option<PolicyCall> {
    match parse_request(line) {
        Ok(Request {
            query: Query::Policy(call),
            ..
        }) => Some(call),
        _ => None,
    }
}

/// A policy request, run by the scripts; observed like other requests.
async fn answer_policy(host: &dyn PolicyHost, call: PolicyCall, state: &SharedState) -> Reply {
    let started = std::time::Instant::now();
    AgentStats::add(&state.stats.queries, 1);
    let action = host.answer(call).await;
    state
        .stats
        .observed
        .query("policy", "ok", started.elapsed());
    Reply::Action(action)
}

/// Who is on the other end, from SO_PEERCRED (None if the kernel would not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pid: Option<i32>,
}

impl Peer {
    fn of(stream: &UnixStream) -> Self {
        match stream.peer_cred() {
            Ok(cred) => Self {
                uid: Some(cred.uid()),
                gid: Some(cred.gid()),
                pid: cred.pid(),
            },
            Err(_) => Self {
                uid: None,
                gid: None,
                pid: None,
            },
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.uid, self.pid) {
            (Some(uid), Some(pid)) => write!(f, "uid {uid} (pid {pid})"),
            (Some(uid), None) => write!(f, "uid {uid}"),
            _ => f.write_str("an unidentified peer"),
        }
    }
}

/// What one request line gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Reply(Reply),
    /// `show all`, allowed: the caller streams it ([`show_all::stream`]).
    ShowAll,
}

/// One request line from `peer` to one reply; reports (`add`) need the
/// narrower write permission. (Queries were checked at accept; they are
/// checked again because `[access]` may have changed since, on SIGHUP.)
pub fn answer_as(line: &[u8], state: &SharedState, peer: &Peer, refusals: &RefusalLog) -> Outcome {
    let started = std::time::Instant::now();
    let mut function = "unparsed";
    let reply = match answer_unobserved(line, state, peer, refusals, &mut function) {
        // Counted by the stream, when it ends.
        Outcome::ShowAll => return Outcome::ShowAll,
        Outcome::Reply(reply) => reply,
    };
    let code = match &reply {
        Reply::Error(error) => error.code.as_str(),
        _ => "ok",
    };
    state
        .stats
        .observed
        .query(function, code, started.elapsed());
    Outcome::Reply(reply)
}

/// [`answer_as`] before its latency and result are counted; sets `function`
/// once the request parsed.
fn answer_unobserved(
    line: &[u8],
    state: &SharedState,
    peer: &Peer,
    refusals: &RefusalLog,
    function: &mut &'static str,
) -> Outcome {
    AgentStats::add(&state.stats.queries, 1);
    let request = match parse_request(line) {
        Ok(request) => request,
        Err(error) => return Outcome::Reply(Reply::Error(error)),
    };
    *function = function_of(&request.query);
    let writes = matches!(request.query, Query::Add { .. });
    if !state
        .setup()
        .config
        .access
        .allows(peer.uid, peer.gid, writes)
    {
        refusals.refused(
            peer,
            if writes {
                Refused::Add
            } else {
                Refused::Connection
            },
        );
        return Outcome::Reply(Reply::Error(QueryError::new(
            ErrorCode::Forbidden,
            format!(
                "uid {} may not {}",
                peer.uid.map_or("?".to_string(), |u| u.to_string()),
                if writes {
                    "report events (add)"
                } else {
                    "query"
                }
            ),
        )));
    }
    if request.query == Query::ShowAll {
        return Outcome::ShowAll;
    }
    Outcome::Reply(command::execute(&request, state, crate::domain::unix_now()))
}

/// The `function` label of the query metrics: one word per kind of request.
fn function_of(query: &Query) -> &'static str {
    match query {
        Query::SessionCount { .. } => "session_count",
        Query::Windowed { .. } => "windowed",
        Query::Sliding { .. } => "sliding",
        Query::Add { .. } => "add",
        Query::Show { .. } => "show",
        Query::ShowAll => "show_all",
        Query::Stats => "stats",
        Query::CidrShell(CidrShell::Available) => "show_available",
        Query::CidrShell(CidrShell::Count(_)) => "show_count",
        Query::Policy(_) => "policy",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::serving::shutdown;

    #[test]
    fn refusals_are_logged_once_per_uid_per_interval_with_a_count() {
        let log = RefusalLog::new(Duration::from_secs(60));
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        assert_eq!(log.note(Some(1000), Refused::Connection, at(0)), Some(1));
        for secs in 1..=59 {
            assert_eq!(log.note(Some(1000), Refused::Connection, at(secs)), None);
        }
        // Another uid, or another kind of refusal, has its own line.
        assert_eq!(log.note(Some(1001), Refused::Connection, at(5)), Some(1));
        assert_eq!(log.note(Some(1000), Refused::Add, at(5)), Some(1));
        assert_eq!(log.note(None, Refused::Connection, at(5)), Some(1));
        // 59 counted, then this one: one line for the 60.
        assert_eq!(log.note(Some(1000), Refused::Connection, at(60)), Some(60));
        assert_eq!(log.note(Some(1000), Refused::Connection, at(61)), None);
        assert_eq!(log.note(Some(1000), Refused::Connection, at(125)), Some(2));
    }

    #[test]
    fn remembered_peers_are_bounded() {
        let log = RefusalLog::new(Duration::from_secs(60));
        let start = Instant::now();
        for uid in 0..MAX_REMEMBERED_PEERS as u32 {
            log.note(Some(uid), Refused::Connection, start);
        }
        // All idle past the interval: forgotten when a new uid comes.
        let later = start + Duration::from_secs(61);
        assert_eq!(
            log.note(Some(u32::MAX), Refused::Connection, later),
            Some(1)
        );
        assert_eq!(log.peers.lock().unwrap().len(), 1);
    }

    async fn read_all(stream: &mut tokio::net::UnixStream) -> String {
        let mut text = String::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut text));
        read.await.expect("answered and closed in time").unwrap();
        text
    }

    #[tokio::test]
    async fn refused_clients_never_take_a_place() {
        let dir = std::env::temp_dir().join(format!("ia-admit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("query.sock");
        let socket = QuerySocket::bind(&path, 0o600, None).unwrap();
        let (trigger, stop) = shutdown::channel();
        // The first 20 connections are refused, the rest admitted; one place.
        let seen = Arc::new(AtomicUsize::new(0));
        let server = tokio::spawn(async move {
            accept_admitting(
                &socket,
                1,
                stop,
                move |mut stream: UnixStream| {
                    if seen.fetch_add(1, Ordering::SeqCst) >= 20 {
                        return Ok(stream);
                    }
                    Err(Some(async move {
                        let _ = stream.write_all(b"ERR forbidden\n").await;
                    }))
                },
                |mut stream: UnixStream| async move {
                    let _ = stream.write_all(b"ERR busy\n").await;
                },
                |mut stream: UnixStream, place| async move {
                    let _ = stream.write_all(b"OK\n").await;
                    let mut rest = Vec::new();
                    let _ = stream.read_to_end(&mut rest).await;
                    drop(place);
                },
            )
            .await;
        });
        // Refused connections held open by the client do not count.
        let mut refused = Vec::new();
        for _ in 0..20 {
            let mut stream = tokio::net::UnixStream::connect(&path).await.unwrap();
            assert_eq!(read_all(&mut stream).await, "ERR forbidden\n");
            refused.push(stream);
        }
        let mut served = tokio::net::UnixStream::connect(&path).await.unwrap();
        let mut line = [0u8; 3];
        served.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"OK\n");
        // The one place is taken now: the next admitted client is busy.
        let mut busy = tokio::net::UnixStream::connect(&path).await.unwrap();
        assert_eq!(read_all(&mut busy).await, "ERR busy\n");
        drop(served);
        trigger.trigger();
        server.await.unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
