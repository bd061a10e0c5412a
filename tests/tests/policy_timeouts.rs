//! End to end, as root: the Postfix policy socket of the real agent drops
//! clients that idle, trickle or never read their answers, so they cannot
//! fill `max_clients` and keep Postfix's own requests out (Postfix would then
//! apply its default action and the limits would stop working).

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use integration_tests::{require_ebpf, SmtpFixture, TempDir};

/// A request as Postfix's smtpd sends it (abridged); no limits are
/// configured, so the answer is `dunno`.
const REQUEST: &[u8] = b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n\
client_address=127.0.0.1\nclient_name=localhost\nserver_port=25\ninstance=1.2.3\n\n";
const ANSWER: &[u8] = b"action=dunno\n\n";

/// An agent whose policy socket (returned) has 2 s idle and 1 s request
/// timeouts, and `max_clients` places.
fn start(name: &str, max_clients: usize) -> (TempDir, SmtpFixture, PathBuf) {
    let dir = TempDir::new(&format!("{name}-config"));
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "client_idle_timeout_secs = 2\nrequest_timeout_secs = 1\nmax_clients = {max_clients}\n"
        ),
    )
    .unwrap();
    let policy = dir.path().join("policy.sock");
    let fixture = SmtpFixture::start(
        env!("CARGO_BIN_EXE_test-server"),
        name,
        &[
            "--config",
            config.to_str().unwrap(),
            "--policy-socket",
            policy.to_str().unwrap(),
        ],
    );
    (dir, fixture, policy)
}

/// One request on a new connection; its answer.
fn ask(policy: &Path) -> Vec<u8> {
    let mut stream = UnixStream::connect(policy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(REQUEST).unwrap();
    let mut answer = vec![0; ANSWER.len()];
    stream.read_exact(&mut answer).unwrap();
    answer
}

/// Reads until the agent closes the connection (Ok: what came before EOF, or
/// Err: reset) within `limit`; panics if it is still open then.
fn closed_within(stream: &mut UnixStream, limit: Duration) -> std::io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    match stream.read_to_end(&mut got) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            panic!("still connected after {limit:?}")
        }
        Err(e) => Err(e),
        Ok(_) => Ok(got),
    }
}

#[test]
fn idle_trickling_and_deaf_policy_clients_are_dropped_while_postfix_is_answered() {
    require_ebpf!();
    let (_dir, fixture, policy) = start("policy-timeouts", 16);
    let agent = &fixture.agent;

    let mut idle = UnixStream::connect(&policy).unwrap();
    let mut trickle = UnixStream::connect(&policy).unwrap();
    let started = Instant::now();
    // One byte every 200 ms: never a whole request within the 1 s limit.
    let mut dropped = false;
    for byte in REQUEST.iter().cycle().take(40) {
        // Meanwhile Postfix's requests are answered at once.
        assert_eq!(ask(&policy), ANSWER);
        if trickle.write_all(&[*byte]).is_err() {
            dropped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(dropped, "the trickling policy client was never dropped");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // The silent client is closed after the 2 s idle limit, unanswered.
    assert!(closed_within(&mut idle, Duration::from_secs(10))
        .unwrap()
        .is_empty());
    assert!(started.elapsed() >= Duration::from_secs(2));

    // A client that sends requests but never reads the answers: once they no
    // longer fit in the socket's buffer it is dropped after the write
    // timeout, and its writes fail.
    let deaf = UnixStream::connect(&policy).unwrap();
    let writer = {
        let mut deaf = deaf.try_clone().unwrap();
        std::thread::spawn(move || {
            let began = Instant::now();
            for _ in 0..100_000 {
                if deaf.write_all(REQUEST).is_err() {
                    return Some(began.elapsed());
                }
            }
            None
        })
    };
    let began = Instant::now();
    while !writer.is_finished() && began.elapsed() < Duration::from_secs(40) {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Unblocks the writer if the agent never dropped the client.
    let _ = deaf.shutdown(std::net::Shutdown::Both);
    let failed_after = writer.join().unwrap();
    let failed_after = failed_after.expect("the deaf client's writes never failed");
    assert!(
        failed_after >= Duration::from_secs(9) && failed_after < Duration::from_secs(30),
        "dropped after {failed_after:?}"
    );
    assert_eq!(ask(&policy), ANSWER);
    let log = agent.log_text();
    assert!(log.contains("a request took longer than 1 s"), "{log}");
    assert!(log.contains("an answer was not read within 10 s"), "{log}");
}

#[test]
fn idle_policy_clients_over_max_clients_give_way_to_postfix() {
    require_ebpf!();
    let (_dir, fixture, policy) = start("policy-cap", 2);

    let mut holders: Vec<UnixStream> = (0..2)
        .map(|_| UnixStream::connect(&policy).unwrap())
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    // Over max_clients: dropped at once, unanswered (the protocol has no
    // busy answer).
    let mut third = UnixStream::connect(&policy).unwrap();
    let _ = third.write_all(REQUEST);
    let got = closed_within(&mut third, Duration::from_secs(1)).unwrap_or_default();
    assert!(got.is_empty(), "{got:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // The idle holders are dropped after 2 s...
    for holder in &mut holders {
        assert!(closed_within(holder, Duration::from_secs(10))
            .unwrap()
            .is_empty());
    }
    assert!(started.elapsed() >= Duration::from_secs(2));
    // ...and Postfix gets its answer again.
    assert_eq!(ask(&policy), ANSWER);
    assert!(
        fixture
            .agent
            .log_text()
            .contains("too many clients (max_clients = 2)"),
        "{}",
        fixture.agent.log_text()
    );
}
