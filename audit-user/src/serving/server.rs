//! The query socket: a Unix stream server with a connection limit and a shared
//! shutdown signal. A client's errors are logged and end only that client.

use std::{io, sync::Arc, time::Duration};

use tokio::{net::UnixStream, sync::Semaphore};

use crate::{
    counting::state::{AgentStats, SharedState},
    serving::{
        command,
        connection::{Connection, Incoming},
        protocol::{parse_request, ErrorCode, Query, QueryError, Reply},
        shutdown::Shutdown,
    },
    sys::socket::QuerySocket,
};

/// Serves queries until `shutdown` fires.
pub async fn serve(socket: QuerySocket, state: Arc<SharedState>, shutdown: Shutdown) {
    let max = state.setup().config.max_clients;
    let stop = shutdown.clone();
    accept_loop(
        &socket,
        max,
        shutdown,
        move |stream| refuse_busy(stream, max),
        move |stream| {
            let (state, stop) = (state.clone(), stop.clone());
            async move {
                if let Err(e) = handle_client(stream, &state, stop).await {
                    log::debug!("client connection ended: {e}");
                }
            }
        },
    )
    .await;
}

/// Accepts clients on `socket` until shutdown, each served by its own task;
/// at most `max` at once, the others are handed to `refuse`.
pub async fn accept_loop<Handle, Handled, Refuse, Refused>(
    socket: &QuerySocket,
    max: usize,
    mut stop: Shutdown,
    refuse: Refuse,
    handle: Handle,
) where
    Handle: Fn(UnixStream) -> Handled,
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
        let Ok(place) = places.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream));
            continue;
        };
        let served = handle(stream);
        tokio::spawn(async move {
            served.await;
            drop(place);
        });
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

/// How long a client may take to read one answer before it is dropped.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

async fn handle_client(
    stream: UnixStream,
    state: &SharedState,
    mut stop: Shutdown,
) -> io::Result<()> {
    let peer = Peer::of(&stream);
    let (idle, partial) = (
        state.setup().config.client_idle_timeout,
        state.setup().config.request_timeout,
    );
    let mut connection = Connection::new(stream);
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
        let reply = answer_as(&line, state, &peer);
        connection.write_reply(&reply, WRITE_TIMEOUT).await?;
        if last {
            return connection.close().await;
        }
    }
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

/// One request line from `peer` to one reply; reports (`add`) need the
/// narrower write permission.
pub fn answer_as(line: &[u8], state: &SharedState, peer: &Peer) -> Reply {
    AgentStats::add(&state.stats.queries, 1);
    let request = match parse_request(line) {
        Ok(request) => request,
        Err(error) => return Reply::Error(error),
    };
    let writes = matches!(request.query, Query::Add { .. });
    if !state
        .setup()
        .config
        .access
        .allows(peer.uid, peer.gid, writes)
    {
        log::warn!(
            "refused {} from {peer} (gid {}): not in the configured {} access",
            if writes { "a report (add)" } else { "a query" },
            peer.gid.map_or("?".to_string(), |g| g.to_string()),
            if writes { "add" } else { "query" }
        );
        return Reply::Error(QueryError::new(
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
        ));
    }
    command::execute(&request, state, crate::domain::unix_now())
}
