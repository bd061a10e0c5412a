//! The policy socket: persistent Postfix connections, one request answered at
//! a time, limits read per request so a reload applies at once. A client has
//! the query socket's bounds: `client_idle_timeout` to begin a request,
//! `request_timeout` to finish it, `WRITE_TIMEOUT` to read each answer, at most
//! `max_clients` at once. Without them idle or trickling clients would hold
//! every place and real Postfix requests would be refused, so Postfix would
//! apply its default action and the limits would stop working.

use std::{
    collections::HashMap,
    os::unix::net::UnixStream,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use crate::{
    adapters::{
        lua_policy::LuaPolicy,
        postfix::connection::{answer_requests, Ended, Timeouts},
    },
    counting::state::SharedState,
    serving::{server::accept_loop, shutdown::Shutdown},
    sys::socket::QuerySocket,
};

/// Serves policy requests until `shutdown` fires, on a thread of its own
/// with a single-threaded runtime that accepts, and a blocking thread per
/// connection (`connection`) that answers.
pub fn serve_on_own_thread(
    socket: QuerySocket,
    state: Arc<SharedState>,
    shutdown: Shutdown,
    scripts: Option<Arc<LuaPolicy>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let max = state.setup().config.max_clients.max(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("postfix-policy")
        .max_blocking_threads(max)
        .build()?;
    std::thread::Builder::new()
        .name("postfix-policy".into())
        .spawn(move || runtime.block_on(serve(socket, state, shutdown, scripts)))
}

/// Serves policy requests until `shutdown` fires; then closes every
/// connection, so no thread is left blocked in a read.
pub async fn serve(
    socket: QuerySocket,
    state: Arc<SharedState>,
    shutdown: Shutdown,
    scripts: Option<Arc<LuaPolicy>>,
) {
    let max = state.setup().config.max_clients;
    let refuse = move |_stream| async move {
        // The protocol has no busy answer: Postfix applies its default action.
        log::warn!("policy socket: too many clients (max_clients = {max}); dropping one");
    };
    let open = Arc::new(Open::default());
    {
        let open = open.clone();
        accept_loop(&socket, max, shutdown, refuse, move |stream, place| {
            let (state, scripts, open) = (state.clone(), scripts.clone(), open.clone());
            async move {
                let stream = match stream.into_std().and_then(|s| {
                    s.set_nonblocking(false)?;
                    Ok(s)
                }) {
                    Ok(stream) => stream,
                    Err(e) => return log::warn!("policy socket: taking a connection: {e}"),
                };
                let (id, stream) = open.add(stream);
                // Read at connect time, like the query socket: a reload
                // applies to the connections that follow.
                let timeouts = Timeouts::of(&state);
                let _ = tokio::task::spawn_blocking(move || {
                    let ended = answer_requests(&stream, &state, timeouts, scripts.as_deref());
                    // Free before the close (the last Arc, below): the task
                    // awaiting this thread may be woken only after the client
                    // has seen the end and connected again.
                    drop(place);
                    open.remove(id);
                    if !open.closing.load(Ordering::Relaxed) {
                        log_end(ended);
                    }
                })
                .await;
            }
        })
        .await;
    }
    open.close_all();
}

fn log_end(ended: Result<(), Ended>) {
    match ended {
        Ok(()) => {}
        Err(e @ Ended::Idle(_)) => log::debug!("postfix policy client dropped: {e}"),
        Err(e @ (Ended::SlowRequest(_) | Ended::SlowReader(_))) => {
            log::info!("postfix policy client dropped: {e}")
        }
        Err(e) => log::warn!("postfix policy client dropped: {e}"),
    }
}

/// The open connections: shutting one down wakes the thread blocked reading
/// it, which then sees the end. Shared, not a second descriptor each, so a
/// client holds one descriptor as the open-file budget assumes.
#[derive(Default)]
struct Open {
    next: AtomicU64,
    streams: Mutex<HashMap<u64, Arc<UnixStream>>>,
    closing: AtomicBool,
}

impl Open {
    fn add(&self, stream: UnixStream) -> (u64, Arc<UnixStream>) {
        let stream = Arc::new(stream);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, stream.clone());
        (id, stream)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn close_all(&self) {
        self.closing.store(true, Ordering::Relaxed);
        for stream in self.lock().values() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<UnixStream>>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        path::PathBuf,
        time::Duration,
    };

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        time::{sleep, timeout, Instant},
    };

    use super::*;
    use crate::{
        adapters::postfix::test_support::{state, ANSWER, REQUEST},
        config::Config,
        serving::shutdown,
    };

    /// A private directory for a socket (bind refuses world-writable ones
    /// such as /tmp itself).
    struct SocketDir(PathBuf);

    impl SocketDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("inbound-audit-unit-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
                .create(&dir)
                .unwrap();
            Self(dir)
        }
    }

    impl Drop for SocketDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// What a client gets within `limit`: the bytes until EOF (or a reset),
    /// None if it is still connected then.
    async fn outcome(stream: &mut tokio::net::UnixStream, limit: Duration) -> Option<Vec<u8>> {
        let mut got = Vec::new();
        match timeout(limit, stream.read_to_end(&mut got)).await {
            Ok(_) => Some(got),
            Err(_) => None,
        }
    }

    fn state_with(config: impl FnOnce(Config) -> Config) -> Arc<SharedState> {
        Arc::new(SharedState::new(
            config(state().setup().config.clone()),
            HashMap::from([("SMTP".to_string(), 0u8)]),
        ))
    }

    #[tokio::test]
    async fn idle_clients_cannot_keep_postfix_out_for_long() {
        let dir = SocketDir::new("policy-cap");
        let path = dir.0.join("policy.sock");
        let socket = QuerySocket::bind(&path, 0o600, None).unwrap();
        let idle = Duration::from_millis(600);
        let state = state_with(|c| Config {
            max_clients: 2,
            client_idle_timeout: idle,
            request_timeout: Duration::from_millis(300),
            ..c
        });
        let (trigger, stop) = shutdown::channel();
        let server = tokio::spawn(serve(socket, state, stop, None));

        let began = Instant::now();
        let mut holders = Vec::new();
        for _ in 0..2 {
            holders.push(tokio::net::UnixStream::connect(&path).await.unwrap());
        }
        // Both are accepted before the third arrives (accepts are in order).
        sleep(Duration::from_millis(100)).await;
        let mut third = tokio::net::UnixStream::connect(&path).await.unwrap();
        let _ = third.write_all(REQUEST).await;
        assert_eq!(
            outcome(&mut third, Duration::from_millis(300)).await,
            Some(Vec::new()),
            "the client over max_clients is dropped unanswered"
        );
        assert!(
            began.elapsed() < idle,
            "refused at once, not after a timeout"
        );

        // The idle holders are dropped after the idle timeout, unanswered...
        for holder in &mut holders {
            assert_eq!(
                outcome(holder, idle + Duration::from_secs(2)).await,
                Some(Vec::new())
            );
        }
        assert!(began.elapsed() >= idle, "{:?}", began.elapsed());
        // ...and Postfix's next connection is answered.
        let mut postfix = tokio::net::UnixStream::connect(&path).await.unwrap();
        postfix.write_all(REQUEST).await.unwrap();
        let mut answer = vec![0; ANSWER.len()];
        timeout(Duration::from_secs(2), postfix.read_exact(&mut answer))
            .await
            .expect("an answer in time")
            .unwrap();
        assert_eq!(answer, ANSWER);

        trigger.trigger();
        timeout(Duration::from_secs(5), server)
            .await
            .expect("serve stops on shutdown")
            .unwrap();
    }

    #[tokio::test]
    async fn a_dropped_client_that_reconnects_at_once_finds_its_place_free() {
        let dir = SocketDir::new("policy-place");
        let path = dir.0.join("policy.sock");
        let socket = QuerySocket::bind(&path, 0o600, None).unwrap();
        let state = state_with(|c| Config {
            max_clients: 1,
            client_idle_timeout: Duration::from_millis(20),
            ..c
        });
        let (trigger, stop) = shutdown::channel();
        let server = tokio::spawn(serve(socket, state, stop, None));
        // Each round: answered, then dropped for idling, then straight back
        // (as the CI run that found this: the place was given back only after
        // the client had seen the close, so the next connect was refused).
        let mut refused = 0;
        for _ in 0..200 {
            let mut client = tokio::net::UnixStream::connect(&path).await.unwrap();
            client.write_all(REQUEST).await.unwrap();
            let mut answer = vec![0; ANSWER.len()];
            match timeout(Duration::from_secs(2), client.read_exact(&mut answer)).await {
                Ok(Ok(_)) => assert_eq!(answer, ANSWER),
                Ok(Err(_)) => refused += 1,
                Err(_) => panic!("no answer nor close in 2 s"),
            }
            assert_eq!(
                outcome(&mut client, Duration::from_secs(2)).await,
                Some(Vec::new())
            );
        }
        assert_eq!(refused, 0, "of 200 reconnections");
        trigger.trigger();
        timeout(Duration::from_secs(5), server)
            .await
            .expect("serve stops on shutdown")
            .unwrap();
    }

    #[test]
    fn shutdown_closes_connections_that_would_idle_for_minutes() {
        let dir = SocketDir::new("policy-stop");
        let path = dir.0.join("policy.sock");
        let state = state_with(|c| Config {
            client_idle_timeout: Duration::from_secs(600),
            ..c
        });
        let (trigger, stop) = shutdown::channel();
        let (bound, ready) = std::sync::mpsc::channel();
        let serving = {
            let path = path.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let socket = QuerySocket::bind(&path, 0o600, None).unwrap();
                    bound.send(()).unwrap();
                    serve(socket, state, stop, None).await
                });
                // Dropping the runtime waits for every connection's thread.
                drop(runtime);
            })
        };
        ready.recv().unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(REQUEST).unwrap();
        let mut answer = vec![0; ANSWER.len()];
        client.read_exact(&mut answer).unwrap();
        assert_eq!(answer, ANSWER);

        let stopped = std::time::Instant::now();
        trigger.trigger();
        serving.join().unwrap();
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "a connection idle for 600 s held the shutdown for {:?}",
            stopped.elapsed()
        );
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "closed without another answer");
    }
}
