//! The policy socket: persistent Postfix connections, one request answered at
//! a time, limits read per request so a reload applies at once. A client has
//! the query socket's bounds: `client_idle_timeout` to begin a request,
//! `request_timeout` to finish it, `WRITE_TIMEOUT` to read each answer, at most
//! `max_clients` at once. Without them idle or trickling clients would hold
//! every place and real Postfix requests would be refused, so Postfix would
//! apply its default action and the limits would stop working.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    time::timeout,
};

use crate::{
    adapters::{
        lua_policy::LuaPolicy,
        postfix::{
            decision::{conclude, judge, scripted, PolicyMemory},
            reader::{PolicyError, PolicyReader, PolicyRequest},
        },
    },
    counting::state::SharedState,
    domain::unix_now,
    serving::{
        protocol::{Phase, PolicyCall},
        server::{accept_loop, WRITE_TIMEOUT},
        shutdown::Shutdown,
    },
    sys::socket::QuerySocket,
};

/// How long a policy client may take at each step before it is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timeouts {
    /// From connecting, or from the last answer, to a request's first byte.
    idle: Duration,
    /// From a request's first byte to its empty line.
    request: Duration,
    /// To take one answer off our hands.
    write: Duration,
}

impl Timeouts {
    fn of(state: &SharedState) -> Self {
        let setup = state.setup();
        Self {
            idle: setup.config.client_idle_timeout,
            request: setup.config.request_timeout,
            write: WRITE_TIMEOUT,
        }
    }
}

/// Why a policy connection was closed by us.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("no request for {} s", .0.as_secs_f64())]
    Idle(Duration),
    #[error("a request took longer than {} s to arrive", .0.as_secs_f64())]
    SlowRequest(Duration),
    #[error("an answer was not read within {} s", .0.as_secs_f64())]
    SlowReader(Duration),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("writing an answer: {0}")]
    Write(#[source] std::io::Error),
}

/// Serves policy requests until `shutdown` fires, on a thread of its own
/// with a single-threaded runtime. smtpd waits for each answer, so what
/// matters is the wake-up per request: on the agent's multi-threaded runtime
/// a request woke one worker, which woke an idle sibling to share the work it
/// had just been given; on this VM every such wake of a halted vCPU is a VM
/// exit. Here a request wakes this thread alone, as a blocking reference
/// server would be woken (README "Benchmarks", mailhost).
pub fn serve_on_own_thread(
    socket: QuerySocket,
    state: Arc<SharedState>,
    shutdown: Shutdown,
    scripts: Option<Arc<LuaPolicy>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("postfix-policy".into())
        .spawn(move || runtime.block_on(serve(socket, state, shutdown, scripts)))
}

/// Serves policy requests until `shutdown` fires.
pub async fn serve(
    socket: QuerySocket,
    state: Arc<SharedState>,
    shutdown: Shutdown,
    scripts: Option<Arc<LuaPolicy>>,
) {
    let max = state.setup().config.max_clients;
    let stop = shutdown.clone();
    let refuse = move |_stream| async move {
        // The protocol has no busy answer: Postfix applies its default action.
        log::warn!("policy socket: too many clients (max_clients = {max}); dropping one");
    };
    accept_loop(&socket, max, shutdown, refuse, move |stream| {
        let (state, stop, scripts) = (state.clone(), stop.clone(), scripts.clone());
        async move {
            // Read at connect time, like the query socket: a reload applies
            // to the connections that follow.
            let timeouts = Timeouts::of(&state);
            match handle(stream, &state, stop, timeouts, scripts.as_deref()).await {
                Ok(()) => {}
                Err(e @ Ended::Idle(_)) => log::debug!("postfix policy client dropped: {e}"),
                Err(e @ (Ended::SlowRequest(_) | Ended::SlowReader(_))) => {
                    log::info!("postfix policy client dropped: {e}")
                }
                Err(e) => log::warn!("postfix policy client dropped: {e}"),
            }
        }
    })
    .await;
}

async fn handle<S: AsyncRead + AsyncWrite>(
    stream: S,
    state: &SharedState,
    mut stop: Shutdown,
    timeouts: Timeouts,
    scripts: Option<&LuaPolicy>,
) -> Result<(), Ended> {
    let (read, mut write) = tokio::io::split(stream);
    let mut requests = PolicyReader::new(BufReader::new(read));
    let mut memory = PolicyMemory::default();
    loop {
        let begun = tokio::select! {
            _ = stop.wait() => return Ok(()),
            begun = timeout(timeouts.idle, requests.wait_for_request()) => begun,
        };
        match begun {
            Err(_) => return Err(Ended::Idle(timeouts.idle)),
            Ok(Ok(false)) => return Ok(()),
            Ok(Ok(true)) => {}
            Ok(Err(e)) => return Err(e.into()),
        }
        let request = tokio::select! {
            _ = stop.wait() => return Ok(()),
            request = timeout(timeouts.request, requests.next_request()) => {
                request.map_err(|_| Ended::SlowRequest(timeouts.request))??
            }
        };
        let Some(request) = request else {
            return Ok(());
        };
        // Limits are read per request, so a SIGHUP reload applies at once.
        let setup = state.setup();
        let mut judged = judge(&request, &setup.config.policy_limits, state, unix_now())?;
        // The scripts run when no limit has refused already.
        if let (None, Some(scripts), Some(call)) = (&judged, scripts, policy_call(&request)) {
            let verdict = scripts.evaluate(call).await;
            if verdict.action != "dunno" {
                judged = Some(scripted(verdict.action));
            }
        }
        let decision = conclude(&request, judged, state, unix_now(), &mut memory);
        if decision.refuses {
            log::info!(
                "postfix policy: {} {} -> {}",
                request.get("client_address").unwrap_or("?"),
                request.get("protocol_state").unwrap_or("?"),
                decision.action
            );
        }
        let answer = format!("action={}\n\n", decision.action);
        timeout(timeouts.write, write.write_all(answer.as_bytes()))
            .await
            .map_err(|_| Ended::SlowReader(timeouts.write))?
            .map_err(Ended::Write)?;
    }
}

/// The Lua scripts' view of a request: its phase, client and attributes;
/// None for a phase no callout runs at (VRFY, ETRN) or without a client.
pub fn policy_call(request: &PolicyRequest) -> Option<PolicyCall> {
    let phase = Phase::parse(request.get("protocol_state")?)?;
    Some(PolicyCall {
        phase,
        client: request.client().ok()?,
        local_port: request.get("server_port").and_then(|p| p.parse().ok()),
        attributes: request.attributes.clone(),
    })
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, path::PathBuf};

    use tokio::{
        io::{duplex, AsyncReadExt},
        net::UnixStream,
        task::JoinHandle,
        time::{sleep, Instant},
    };

    use super::*;
    use crate::{adapters::postfix::test_support::state, config::Config, serving::shutdown};

    const REQUEST: &[u8] =
        b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=198.51.100.1\n\n";
    const ANSWER: &[u8] = b"action=dunno\n\n";

    const TIMEOUTS: Timeouts = Timeouts {
        idle: Duration::from_secs(5),
        request: Duration::from_secs(2),
        write: Duration::from_secs(3),
    };

    /// How `handle` ended, and when.
    type Handled = (Result<(), Ended>, Instant);

    /// `handle` on the server end of an in-memory connection of `capacity`
    /// bytes each way; the result comes with when it ended.
    fn spawn_handle(capacity: usize) -> (tokio::io::DuplexStream, JoinHandle<Handled>) {
        let (client, server) = duplex(capacity);
        let state = Arc::new(state());
        let (trigger, stop) = shutdown::channel();
        let task = tokio::spawn(async move {
            let _trigger = trigger;
            let result = handle(server, &state, stop, TIMEOUTS, None).await;
            (result, Instant::now())
        });
        (client, task)
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_client_is_dropped_after_the_idle_timeout() {
        let (mut client, task) = spawn_handle(1024);
        client.write_all(REQUEST).await.unwrap();
        let mut answer = vec![0; ANSWER.len()];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, ANSWER);
        let answered = Instant::now();
        let (result, ended) = task.await.unwrap();
        assert!(matches!(result, Err(Ended::Idle(idle)) if idle == TIMEOUTS.idle));
        assert_eq!(ended - answered, TIMEOUTS.idle);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "dropped unanswered");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_sending_a_byte_a_second_is_dropped_after_the_request_timeout() {
        let (client, task) = spawn_handle(1024);
        let (mut read, mut write) = tokio::io::split(client);
        let began = Instant::now();
        let trickle = tokio::spawn(async move {
            for byte in REQUEST {
                if write.write_all(&[*byte]).await.is_err() {
                    break;
                }
                sleep(Duration::from_secs(1)).await;
            }
        });
        let (result, ended) = task.await.unwrap();
        // Each byte is well within the idle timeout; the request as a whole is not.
        assert!(matches!(result, Err(Ended::SlowRequest(r)) if r == TIMEOUTS.request));
        assert_eq!(ended - began, TIMEOUTS.request);
        let mut rest = Vec::new();
        read.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "dropped unanswered");
        trickle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_reads_its_answers_is_dropped() {
        // Room for four answers: the fifth cannot be written.
        let (client, task) = spawn_handle(4 * ANSWER.len() + 1);
        let (_read, mut write) = tokio::io::split(client);
        let began = Instant::now();
        let requests = tokio::spawn(async move {
            for _ in 0..10 {
                if write.write_all(REQUEST).await.is_err() {
                    break;
                }
            }
        });
        let (result, ended) = task.await.unwrap();
        assert!(matches!(result, Err(Ended::SlowReader(w)) if w == TIMEOUTS.write));
        assert_eq!(ended - began, TIMEOUTS.write);
        requests.abort();
    }

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
    async fn outcome(stream: &mut UnixStream, limit: Duration) -> Option<Vec<u8>> {
        let mut got = Vec::new();
        match timeout(limit, stream.read_to_end(&mut got)).await {
            Ok(_) => Some(got),
            Err(_) => None,
        }
    }

    #[tokio::test]
    async fn idle_clients_cannot_keep_postfix_out_for_long() {
        let dir = SocketDir::new("policy-cap");
        let path = dir.0.join("policy.sock");
        let socket = QuerySocket::bind(&path, 0o600, None).unwrap();
        let idle = Duration::from_millis(600);
        let config = Config {
            max_clients: 2,
            client_idle_timeout: idle,
            request_timeout: Duration::from_millis(300),
            ..state().setup().config.clone()
        };
        let state = Arc::new(SharedState::new(
            config,
            HashMap::from([("SMTP".to_string(), 0u8)]),
        ));
        let (trigger, stop) = shutdown::channel();
        let server = tokio::spawn(serve(socket, state, stop, None));

        let began = Instant::now();
        let mut holders = Vec::new();
        for _ in 0..2 {
            holders.push(UnixStream::connect(&path).await.unwrap());
        }
        // Both are accepted before the third arrives (accepts are in order).
        sleep(Duration::from_millis(100)).await;
        let mut third = UnixStream::connect(&path).await.unwrap();
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
        let mut postfix = UnixStream::connect(&path).await.unwrap();
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
}
