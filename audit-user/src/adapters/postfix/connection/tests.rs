//! One connection's bounds, on a real socket pair and real time: the bounds
//! are socket options, so a paused clock would not move them.

use std::{
    io::{Read, Write},
    thread::JoinHandle,
};

use super::*;
use crate::adapters::postfix::test_support::{state, ANSWER, REQUEST};

const TIMEOUTS: Timeouts = Timeouts {
    idle: Duration::from_millis(600),
    request: Duration::from_millis(400),
    write: Duration::from_millis(300),
};

/// `answer_requests` on one end of a socket pair, on a thread; the result
/// comes with when it ended.
fn spawn_answering(server: UnixStream) -> JoinHandle<(Result<(), Ended>, Instant)> {
    std::thread::spawn(move || {
        let result = answer_requests(&server, &state(), TIMEOUTS, None);
        (result, Instant::now())
    })
}

/// At least `bound`, and not much later (a loaded machine may be slow to
/// wake a thread, never early).
fn took_about(took: Duration, bound: Duration) {
    assert!(took >= bound, "{took:?} is before {bound:?}");
    assert!(took < bound + Duration::from_secs(5), "{took:?}");
}

#[test]
fn requests_are_answered_in_order_and_a_close_ends_cleanly() {
    let (mut client, server) = UnixStream::pair().unwrap();
    let answering = spawn_answering(server);
    // Two at once, then one in pieces within the request timeout.
    client.write_all(&[REQUEST, REQUEST].concat()).unwrap();
    let (head, tail) = REQUEST.split_at(20);
    client.write_all(head).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    client.write_all(tail).unwrap();
    let mut answers = vec![0; 3 * ANSWER.len()];
    client.read_exact(&mut answers).unwrap();
    assert_eq!(answers, ANSWER.repeat(3));
    drop(client);
    let (result, _) = answering.join().unwrap();
    result.unwrap();
}

#[test]
fn an_idle_client_is_dropped_after_the_idle_timeout() {
    let (mut client, server) = UnixStream::pair().unwrap();
    let answering = spawn_answering(server);
    client.write_all(REQUEST).unwrap();
    let mut answer = vec![0; ANSWER.len()];
    client.read_exact(&mut answer).unwrap();
    assert_eq!(answer, ANSWER);
    let answered = Instant::now();
    let (result, ended) = answering.join().unwrap();
    assert!(matches!(result, Err(Ended::Idle(idle)) if idle == TIMEOUTS.idle));
    took_about(ended - answered, TIMEOUTS.idle);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "dropped unanswered");
}

#[test]
fn a_client_sending_a_byte_at_a_time_is_dropped_after_the_request_timeout() {
    let (client, server) = UnixStream::pair().unwrap();
    let began = Instant::now();
    let answering = spawn_answering(server);
    let mut writer = client.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for byte in REQUEST {
            if writer.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let (result, ended) = answering.join().unwrap();
    // Each byte is well within the idle timeout; the request as a whole is not.
    assert!(matches!(result, Err(Ended::SlowRequest(r)) if r == TIMEOUTS.request));
    took_about(ended - began, TIMEOUTS.request);
    let mut rest = Vec::new();
    (&client).read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "dropped unanswered");
    trickle.join().unwrap();
}

#[test]
fn a_client_that_never_reads_its_answers_is_dropped() {
    let (client, server) = UnixStream::pair().unwrap();
    // The smallest send buffer the kernel allows holds a few answers.
    socket2::SockRef::from(&server)
        .set_send_buffer_size(1)
        .unwrap();
    let began = Instant::now();
    let answering = spawn_answering(server);
    let mut writer = client.try_clone().unwrap();
    let requests = std::thread::spawn(move || {
        for _ in 0..10_000 {
            if writer.write_all(REQUEST).is_err() {
                break;
            }
        }
    });
    let (result, ended) = answering.join().unwrap();
    assert!(matches!(result, Err(Ended::SlowReader(w)) if w == TIMEOUTS.write));
    took_about(ended - began, TIMEOUTS.write);
    drop(client);
    requests.join().unwrap();
}

#[test]
fn a_malformed_request_ends_the_connection_unanswered() {
    let (mut client, server) = UnixStream::pair().unwrap();
    let answering = spawn_answering(server);
    client.write_all(b"no equals sign\n\n").unwrap();
    let (result, _) = answering.join().unwrap();
    assert!(matches!(
        result,
        Err(Ended::Policy(PolicyError::Malformed { .. }))
    ));
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}
