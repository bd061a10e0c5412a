//! The query socket: a Unix stream server with a connection limit and a shared
//! shutdown signal. A client's errors are logged and end only that client.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::FileTypeExt},
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};

use crate::{
    command,
    connection::{Connection, Incoming},
    protocol::{parse_request, ErrorCode, Query, QueryError, Reply},
    shutdown::Shutdown,
    state::{AgentStats, SharedState},
};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another agent is already serving {path}; stop it first or use --socket")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot create directory {path}: {source}")]
    Directory { path: PathBuf, source: io::Error },
    #[error(
        "{path} is writable by every user, who could replace the socket; \
         put the socket in a directory only root (or its group) can write"
    )]
    WorldWritable { path: PathBuf },
    #[error("unknown group {group} for the query socket")]
    UnknownGroup { group: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// The bound socket; the file is removed when this is dropped.
pub struct QuerySocket {
    /// Bound and listening from the start; registered with the runtime on the
    /// first accept, since binding happens before the runtime exists.
    listener: std::os::unix::net::UnixListener,
    registered: std::sync::OnceLock<UnixListener>,
    path: PathBuf,
}

impl QuerySocket {
    /// bind → chmod/chown → listen, so no client can connect before the
    /// permissions are in place. A stale socket file (no agent behind it) is replaced.
    pub fn bind(path: &Path, mode: u32, group: Option<&str>) -> Result<Self, SocketError> {
        let io_error = |action: &'static str| {
            move |source| SocketError::Io {
                action,
                path: path.to_path_buf(),
                source,
            }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| SocketError::Directory {
                path: dir.to_path_buf(),
                source,
            })?;
            // Anyone who can write the directory can replace the socket with
            // their own and answer the MTA's questions.
            let mode = std::fs::metadata(dir)
                .map_err(io_error("inspecting"))?
                .permissions();
            if std::os::unix::fs::PermissionsExt::mode(&mode) & 0o002 != 0 {
                return Err(SocketError::WorldWritable {
                    path: dir.to_path_buf(),
                });
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(SocketError::NotASocket {
                    path: path.to_path_buf(),
                })
            }
            Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(SocketError::InUse {
                        path: path.to_path_buf(),
                    })
                }
                Err(_) => std::fs::remove_file(path).map_err(io_error("removing stale socket"))?,
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("inspecting")(e)),
        }
        let gid = group.map(group_id).transpose()?;
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|e| io_error("encoding")(io::Error::new(io::ErrorKind::InvalidInput, e)))?;

        // SAFETY: plain socket(2); the result is checked and owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if fd < 0 {
            return Err(io_error("creating socket for")(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let addr = unix_sockaddr(path).map_err(io_error("binding"))?;
        // SAFETY: addr is a valid sockaddr_un of the given length.
        let rc = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io_error("binding")(io::Error::last_os_error()));
        }
        let mut remove_on_error = RemoveOnDrop(Some(path.to_path_buf()));
        // SAFETY: c_path is a valid NUL-terminated path.
        if unsafe { libc::chmod(c_path.as_ptr(), mode) } != 0 {
            return Err(io_error("chmod")(io::Error::last_os_error()));
        }
        if let Some(gid) = gid {
            // SAFETY: as above; uid -1 leaves the owner unchanged.
            if unsafe { libc::chown(c_path.as_ptr(), u32::MAX, gid) } != 0 {
                return Err(io_error("chown")(io::Error::last_os_error()));
            }
        }
        // SAFETY: fd is a bound stream socket.
        if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&fd), 1024) } != 0 {
            return Err(io_error("listening on")(io::Error::last_os_error()));
        }
        remove_on_error.0 = None;
        Ok(Self {
            listener: std::os::unix::net::UnixListener::from(fd),
            registered: std::sync::OnceLock::new(),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next client; must be called inside the runtime.
    pub async fn accept(&self) -> io::Result<UnixStream> {
        let listener = match self.registered.get() {
            Some(listener) => listener,
            None => {
                let listener = UnixListener::from_std(self.listener.try_clone()?)?;
                self.registered.get_or_init(|| listener)
            }
        };
        listener.accept().await.map(|(stream, _)| stream)
    }
}

impl Drop for QuerySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn unix_sockaddr(path: &Path) -> io::Result<libc::sockaddr_un> {
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path longer than {} bytes", addr.sun_path.len() - 1),
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    Ok(addr)
}

fn group_id(name: &str) -> Result<u32, SocketError> {
    name.parse::<u32>()
        .ok()
        .or_else(|| crate::config::group_id(name))
        .ok_or_else(|| SocketError::UnknownGroup {
            group: name.to_string(),
        })
}

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
                    log::warn!("accept on {}: {e}", socket.path.display());
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
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

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
                        crate::protocol::MAX_REQUEST_LEN
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

/// Time since the Unix epoch: monitor windows are aligned on it.
pub fn unix_now() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
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
    command::execute(&request, state, unix_now())
}
