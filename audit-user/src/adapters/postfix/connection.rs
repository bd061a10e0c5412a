//! One Postfix policy connection, answered on a blocking thread of its own.
//! smtpd waits for each answer, so the round trip is what Postfix feels:
//! a thread blocked in `read` is woken by smtpd's write and answers at once,
//! where a task on an event loop needed an epoll wake-up, a poll and a
//! second `read` for EAGAIN, and all of smtpd's connections queued behind one
//! thread that the scheduler kept away from their CPUs (README "Benchmarks",
//! mailhost). The timeouts are socket options, so a request costs no timer.

use std::{
    io::{self, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use crate::{
    adapters::{
        lua_policy::LuaPolicy,
        postfix::{
            decision::{conclude, judge, scripted, PolicyMemory},
            reader::{Framer, PolicyError, PolicyRequest},
        },
    },
    counting::state::SharedState,
    domain::unix_now,
    serving::{
        protocol::{Phase, PolicyCall},
        server::WRITE_TIMEOUT,
    },
};

/// How long a policy client may take at each step before it is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From connecting, or from the last answer, to a request's first byte.
    pub idle: Duration,
    /// From a request's first byte to its empty line.
    pub request: Duration,
    /// To take one answer off our hands.
    pub write: Duration,
}

impl Timeouts {
    pub fn of(state: &SharedState) -> Self {
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
pub enum Ended {
    #[error("no request for {} s", .0.as_secs_f64())]
    Idle(Duration),
    #[error("a request took longer than {} s to arrive", .0.as_secs_f64())]
    SlowRequest(Duration),
    #[error("an answer was not read within {} s", .0.as_secs_f64())]
    SlowReader(Duration),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("setting a socket timeout: {0}")]
    Timeout(#[source] io::Error),
    #[error("writing an answer: {0}")]
    Write(#[source] io::Error),
}

/// Answers requests on `stream` until the client closes it (Ok) or breaks a
/// rule or a bound (the reason). Blocks.
pub fn answer_requests(
    stream: &UnixStream,
    state: &SharedState,
    timeouts: Timeouts,
    scripts: Option<&LuaPolicy>,
) -> Result<(), Ended> {
    stream
        .set_read_timeout(Some(timeouts.idle))
        .map_err(Ended::Timeout)?;
    stream
        .set_write_timeout(Some(timeouts.write))
        .map_err(Ended::Timeout)?;
    let mut framer = Framer::default();
    let mut memory = PolicyMemory::default();
    let mut answer = Vec::with_capacity(128);
    while let Some(request) = next_request(stream, &mut framer, timeouts)? {
        let action = decide(&request, state, scripts, &mut memory)?;
        answer.clear();
        answer.extend_from_slice(b"action=");
        answer.extend_from_slice(action.as_bytes());
        answer.extend_from_slice(b"\n\n");
        let mut writer = stream;
        writer.write_all(&answer).map_err(|e| {
            if timed_out(&e) {
                Ended::SlowReader(timeouts.write)
            } else {
                Ended::Write(e)
            }
        })?;
    }
    Ok(())
}

/// The next request, None at a clean end. The read timeout is the idle one
/// between requests; once a request has begun, what is left of the request
/// timeout (set only when a request comes in several pieces, which Postfix's
/// never do).
fn next_request(
    stream: &UnixStream,
    framer: &mut Framer,
    timeouts: Timeouts,
) -> Result<Option<PolicyRequest>, Ended> {
    let mut deadline: Option<Instant> = None;
    let result = loop {
        if let Some(request) = framer.next_request()? {
            break Ok(Some(request));
        }
        if framer.is_mid_request() {
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + timeouts.request);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(Ended::SlowRequest(timeouts.request));
            }
            stream
                .set_read_timeout(Some(left))
                .map_err(Ended::Timeout)?;
        }
        let mut reader = stream;
        match framer.read_from(&mut reader) {
            Ok(0) => break framer.finish().map(|()| None).map_err(Ended::from),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => {
                break Err(if deadline.is_some() {
                    Ended::SlowRequest(timeouts.request)
                } else {
                    Ended::Idle(timeouts.idle)
                })
            }
            Err(e) => break Err(PolicyError::Io(e).into()),
        }
    };
    if deadline.is_some() {
        stream
            .set_read_timeout(Some(timeouts.idle))
            .map_err(Ended::Timeout)?;
    }
    result
}

/// The action for one request: the first limit the client is over, else
/// the scripts' answer, else `dunno`; logged when it refuses.
fn decide(
    request: &PolicyRequest,
    state: &SharedState,
    scripts: Option<&LuaPolicy>,
    memory: &mut PolicyMemory,
) -> Result<String, Ended> {
    // Limits are read per request, so a SIGHUP reload applies at once.
    let setup = state.setup();
    let client = request.client()?;
    let mut judged = judge(
        request,
        client,
        &setup.config.policy_limits,
        state,
        unix_now(),
    );
    // The scripts run when no limit has refused already.
    if let (None, Some(scripts)) = (&judged, scripts) {
        if let Some(call) = policy_call(request, client) {
            // On this thread: no hand-off to another and back.
            let verdict = scripts.run(call);
            if verdict.action != "dunno" {
                judged = Some(scripted(verdict.action));
            }
        }
    }
    let decision = conclude(request, client, judged, state, unix_now(), memory);
    if decision.refuses {
        log::info!(
            "postfix policy: {} {} -> {}",
            request.get("client_address").unwrap_or("?"),
            request.get("protocol_state").unwrap_or("?"),
            decision.action
        );
    }
    Ok(decision.action)
}

/// The Lua scripts' view of a request: its phase, client and attributes;
/// None for a phase no callout runs at (VRFY, ETRN).
fn policy_call(request: &PolicyRequest, client: IpAddr) -> Option<PolicyCall> {
    let phase = Phase::parse(request.get("protocol_state")?)?;
    Some(PolicyCall {
        phase,
        client,
        local_port: request.get("server_port").and_then(|p| p.parse().ok()),
        attributes: request.to_map(),
    })
}

/// SO_RCVTIMEO and SO_SNDTIMEO end a read or write with EAGAIN.
fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests;
