//! Tests of `show all`: the CSV layout against `show`, chunking against one
//! pass, changes between chunks, and the stream's framing and backpressure.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::*;
use crate::{
    config::Config,
    counting::state::{SharedState, Tally},
    domain::{MonitorSpec, ServicePorts},
    serving::{
        command::execute,
        connection::Connection,
        protocol::{parse_request, Query, Reply},
        shutdown,
    },
};

const NOW: Duration = Duration::from_secs(1_700_000_000);

fn config() -> Config {
    Config {
        services: vec![
            ServicePorts {
                name: "SMTP".into(),
                ports: vec![25, 587],
            },
            ServicePorts {
                name: "Control".into(),
                ports: vec![2025],
            },
        ],
        monitors: vec!["60,2".parse().unwrap(), "300,1".parse().unwrap()],
        ..Config::default()
    }
}

fn state_with(config: Config) -> SharedState {
    let slots = HashMap::from([("SMTP".to_string(), 0u8), ("Control".to_string(), 3u8)]);
    SharedState::new(config, slots)
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn set_sessions(state: &SharedState, entries: &[(u8, &str, u64)]) {
    let tally: Tally = entries
        .iter()
        .map(|&(slot, addr, n)| ((slot, ip(addr)), n))
        .collect();
    state.write_sessions().load(&tally);
}

/// A small agent: sessions on both services, monitor counts in several
/// windows, an IP with windows only, an IPv6 peer.
fn small_state() -> SharedState {
    let state = state_with(config());
    set_sessions(
        &state,
        &[
            (0, "10.0.0.1", 2),
            (3, "10.0.0.1", 1),
            (0, "10.0.0.2", 1),
            (0, "2001:db8::1", 4),
        ],
    );
    let mut monitors = state.lock_monitors();
    monitors.record(
        Series::Connections,
        ip("10.0.0.1"),
        3,
        NOW - Duration::from_secs(60),
    );
    monitors.record(Series::Connections, ip("10.0.0.1"), 2, NOW);
    monitors.record(Series::Receptions, ip("10.0.0.9"), 5, NOW);
    monitors.record(Series::Rejections, ip("2001:db8::1"), 1, NOW);
    drop(monitors);
    state
}

fn dump_all(state: &SharedState, limit: usize) -> (String, usize) {
    let mut dump = Dump::new(state);
    let mut out = dump.header();
    let mut chunks = 0;
    loop {
        let before = out.lines().count();
        let more = dump.next_chunk(state, NOW, limit, &mut out).unwrap();
        chunks += 1;
        assert!(
            out.lines().count() - before <= limit,
            "a chunk over its limit"
        );
        if !more {
            break;
        }
    }
    assert!(dump.is_done());
    (out, chunks)
}

#[test]
fn header_names_shows_labels_and_rows_are_csv() {
    let state = small_state();
    let (out, _) = dump_all(&state, CHUNK_IPS);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "IP,Connections 60/0,Connections 60/1,Connections 60/2,Connections 300/0,Connections 300/1,\
         Receptions 60/0,Receptions 60/1,Receptions 60/2,Receptions 300/0,Receptions 300/1,\
         Rejections 60/0,Rejections 60/1,Rejections 60/2,Rejections 300/0,Rejections 300/1,\
         Sessions SMTP,Sessions Control"
    );
    // 1_700_000_000 s is 200 s into a 300 s window: 60 s earlier is the same one.
    assert_eq!(
        &lines[1..],
        [
            "10.0.0.1,2,3,0,5,0,0,0,0,0,0,0,0,0,0,0,2,1",
            "10.0.0.2,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,0",
            "10.0.0.9,0,0,0,0,0,5,0,0,5,0,0,0,0,0,0,0,0",
            "2001:db8::1,0,0,0,0,0,0,0,0,0,0,1,0,0,1,0,4,0",
        ]
    );
}

/// Every row is `show <ip>`'s numbers in `show`'s order, under its labels.
#[test]
fn every_row_is_show_of_its_ip() {
    let state = small_state();
    let (out, _) = dump_all(&state, 2);
    let mut lines = out.lines();
    let columns: Vec<&str> = lines.next().unwrap().split(',').collect();
    let mut rows = 0;
    for row in lines {
        let fields: Vec<&str> = row.split(',').collect();
        assert_eq!(fields.len(), columns.len());
        let request = parse_request(format!("show {}", fields[0]).as_bytes()).unwrap();
        let Reply::Lines(show) = execute(&request, &state, NOW) else {
            panic!("show answers lines");
        };
        // `show` starts with a `Network` line; the rest are `label: count`.
        let shown: Vec<String> = show[1..].to_vec();
        let dumped: Vec<String> = columns[1..]
            .iter()
            .zip(&fields[1..])
            .map(|(label, count)| format!("{label}: {count}"))
            .collect();
        assert_eq!(dumped, shown, "{row}");
        rows += 1;
    }
    assert_eq!(rows, 4);
}

#[test]
fn refusal_columns_only_with_kernel_limits() {
    let mut config = config();
    config.monitors = vec!["60,1".parse().unwrap()];
    config.kernel_limits = vec![crate::config::kernel_limits::KernelLimitConfig {
        service: "SMTP".into(),
        ipv4_prefix: 32,
        ipv6_prefix: 64,
        max: 10,
        exempt: Vec::new(),
        dry_run: false,
        cut_existing: false,
        count_pending: true,
    }];
    let state = state_with(config);
    let header = Dump::new(&state).header();
    assert!(
        header.contains(",Refusals 60/0,Refusals 60/1,Sessions SMTP"),
        "{header}"
    );
}

#[test]
fn no_monitors_and_nothing_tracked() {
    let mut config = config();
    config.monitors.clear();
    let state = state_with(config);
    let (out, chunks) = dump_all(&state, 10);
    assert_eq!(out, "IP,Sessions SMTP,Sessions Control\n");
    assert_eq!(chunks, 1);
}

/// IPs only some sources hold, IPv4 and IPv6: any chunk size gives the one
/// pass's rows, each chunk within its size.
#[test]
fn chunks_of_any_size_give_the_same_dump() {
    let state = state_with(config());
    let mut entries = Vec::new();
    let texts: Vec<String> = (0..3000u32)
        .map(|i| {
            if i % 7 == 0 {
                format!("2001:db8::{:x}", i)
            } else {
                IpAddr::from((0x0a00_0000u32 + i * 13).to_be_bytes()).to_string()
            }
        })
        .collect();
    for (i, text) in texts.iter().enumerate() {
        if i % 3 != 0 {
            entries.push(((i % 2 * 3) as u8, text.as_str(), i as u64 % 4 + 1));
        }
    }
    set_sessions(&state, &entries);
    {
        let mut monitors = state.lock_monitors();
        for (i, text) in texts.iter().enumerate().filter(|(i, _)| i % 5 < 2) {
            let series = [Series::Connections, Series::Receptions, Series::Rejections][i % 3];
            monitors.record(series, ip(text), 1 + i as u64 % 3, NOW);
        }
    }
    let (whole, chunks) = dump_all(&state, usize::MAX);
    assert_eq!(chunks, 1);
    let rows: Vec<&str> = whole.lines().skip(1).collect();
    let expected = texts
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0 || i % 5 < 2)
        .count();
    assert_eq!(rows.len(), expected);
    let ips: Vec<IpAddr> = rows
        .iter()
        .map(|r| ip(r.split(',').next().unwrap()))
        .collect();
    assert!(ips.windows(2).all(|w| w[0] < w[1]), "ascending, no repeats");
    for limit in [1, 2, 7, 100, 2999, 3000, 3001] {
        let (chunked, chunks) = dump_all(&state, limit);
        assert_eq!(chunked, whole, "limit {limit}");
        assert!(
            chunks >= expected.div_ceil(limit),
            "limit {limit}: {chunks} chunks"
        );
    }
}

/// Between chunks the counts change: IPs behind the cursor are not
/// revisited, IPs ahead are read as they are when their chunk is taken.
#[test]
fn changes_between_chunks_are_seen_ahead_of_the_cursor_only() {
    let state = state_with(config());
    set_sessions(
        &state,
        &[
            (0, "10.0.0.1", 1),
            (0, "10.0.0.2", 1),
            (0, "10.0.0.3", 1),
            (0, "10.0.0.4", 1),
        ],
    );
    let mut dump = Dump::new(&state);
    let mut out = String::new();
    assert!(dump.next_chunk(&state, NOW, 2, &mut out).unwrap());
    assert_eq!(out.lines().count(), 2);
    // Behind the cursor: a new IP and a changed one; ahead: one gone, one new, one changed.
    set_sessions(
        &state,
        &[
            (0, "10.0.0.0", 9),
            (0, "10.0.0.2", 5),
            (0, "10.0.0.3", 7),
            (0, "10.0.0.5", 1),
        ],
    );
    while dump.next_chunk(&state, NOW, 2, &mut out).unwrap() {}
    let ips: Vec<&str> = out.lines().map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(ips, ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.5"]);
    let sessions: Vec<&str> = out.lines().map(|l| l.rsplit(',').nth(1).unwrap()).collect();
    assert_eq!(sessions, ["1", "1", "7", "1"]);
    assert_eq!(dump.rows(), 4);
}

#[test]
fn a_reload_during_the_dump_ends_it_with_reconfigured() {
    let state = small_state();
    let mut dump = Dump::new(&state);
    let mut out = String::new();
    assert!(dump.next_chunk(&state, NOW, 1, &mut out).unwrap());
    let setup = state.setup();
    let mut config = setup.config.clone();
    config.monitors = vec![MonitorSpec {
        window_secs: 10,
        kept: 1,
    }];
    state.replace_setup(crate::counting::state::Setup {
        config,
        slots: setup.slots.clone(),
    });
    let error = dump.next_chunk(&state, NOW, 1, &mut out).unwrap_err();
    assert_eq!(error.code, ErrorCode::Reconfigured);
}

#[test]
fn ips_whose_windows_all_left_the_history_are_not_rows() {
    let state = state_with(config());
    state
        .lock_monitors()
        .record(Series::Receptions, ip("10.0.0.7"), 3, NOW);
    let later = NOW + Duration::from_secs(3600);
    let mut dump = Dump::new(&state);
    let mut out = String::new();
    while dump.next_chunk(&state, later, 10, &mut out).unwrap() {}
    assert_eq!(out, "");
    assert_eq!(dump.rows(), 0);
}

#[test]
fn show_all_parses_and_takes_no_arguments() {
    assert_eq!(parse_request(b"show all").unwrap().query, Query::ShowAll);
    assert_eq!(
        parse_request(b"  show   all ").unwrap().query,
        Query::ShowAll
    );
    for bad in ["show all cluster", "show all 10.0.0.0/8"] {
        let error = parse_request(bad.as_bytes()).unwrap_err();
        assert_eq!(error.code, ErrorCode::Syntax, "{bad}");
    }
    // Not streamed where there is no stream: an error, never a giant reply.
    let state = small_state();
    let request = parse_request(b"show all").unwrap();
    assert!(
        matches!(execute(&request, &state, NOW), Reply::Error(e) if e.code == ErrorCode::Syntax)
    );
}

/// Over a socket-sized pipe read slowly: the whole dump, framed.
#[tokio::test]
async fn the_stream_is_framed_and_follows_a_slow_reader() {
    let state = Arc::new(state_with(config()));
    let entries: Vec<(u8, String, u64)> = (0..5000u32)
        .map(|i| {
            (
                0,
                IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()).to_string(),
                1,
            )
        })
        .collect();
    let borrowed: Vec<(u8, &str, u64)> = entries
        .iter()
        .map(|(s, t, n)| (*s, t.as_str(), *n))
        .collect();
    set_sessions(&state, &borrowed);
    let (client, server) = tokio::io::duplex(4096);
    let (_trigger, mut stop) = shutdown::channel();
    let writer_state = state.clone();
    let writer = tokio::spawn(async move {
        let mut connection = Connection::new(server);
        stream(
            &mut connection,
            &writer_state,
            &mut stop,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    });
    let mut lines = BufReader::new(client).lines();
    let mut got = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        if got.len() % 1000 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            // Between reads the writer holds no lock.
            assert!(state.sessions.try_write().is_ok());
            assert!(state.monitors.try_lock().is_ok());
        }
        let end = line.starts_with(END_PREFIX);
        got.push(line);
        if end {
            break;
        }
    }
    writer.await.unwrap();
    assert_eq!(got[0], START_LINE);
    assert!(got[1].starts_with("IP,Connections 60/0"));
    assert_eq!(got.len(), 5000 + 3);
    assert_eq!(got[2].split(',').next(), Some("10.0.0.0"));
    assert_eq!(got.last().unwrap(), "END 5000");
}

/// A client that never reads: the write times out, the dump holds no lock
/// meanwhile and no more than a chunk in memory.
#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_dropped_and_holds_no_lock() {
    let state = Arc::new(state_with(config()));
    let entries: Vec<(u8, String, u64)> = (0..20_000u32)
        .map(|i| {
            (
                0,
                IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()).to_string(),
                1,
            )
        })
        .collect();
    let borrowed: Vec<(u8, &str, u64)> = entries
        .iter()
        .map(|(s, t, n)| (*s, t.as_str(), *n))
        .collect();
    set_sessions(&state, &borrowed);
    let (mut client, server) = tokio::io::duplex(1024);
    let (_trigger, mut stop) = shutdown::channel();
    let writer_state = state.clone();
    let writer = tokio::spawn(async move {
        let mut connection = Connection::new(server);
        stream(
            &mut connection,
            &writer_state,
            &mut stop,
            Duration::from_secs(10),
        )
        .await
    });
    let mut first = [0u8; 16];
    client.read_exact(&mut first).await.unwrap();
    assert_eq!(&first[..7], b"OK csv\n");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        state.sessions.try_write().is_ok(),
        "stalled with the lock held"
    );
    assert!(
        state.monitors.try_lock().is_ok(),
        "stalled with the lock held"
    );
    let error = writer.await.unwrap().unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
    client.shutdown().await.unwrap();
}

/// Shutdown mid-dump ends the stream without `END`.
#[tokio::test]
async fn shutdown_cuts_the_stream_without_end() {
    let state = Arc::new(state_with(config()));
    let entries: Vec<(u8, String, u64)> = (0..20_000u32)
        .map(|i| {
            (
                0,
                IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()).to_string(),
                1,
            )
        })
        .collect();
    let borrowed: Vec<(u8, &str, u64)> = entries
        .iter()
        .map(|(s, t, n)| (*s, t.as_str(), *n))
        .collect();
    set_sessions(&state, &borrowed);
    let (client, server) = tokio::io::duplex(1024);
    let (trigger, mut stop) = shutdown::channel();
    let writer_state = state.clone();
    let writer = tokio::spawn(async move {
        let mut connection = Connection::new(server);
        stream(
            &mut connection,
            &writer_state,
            &mut stop,
            Duration::from_secs(10),
        )
        .await
    });
    let mut lines = BufReader::new(client).lines();
    assert_eq!(lines.next_line().await.unwrap().unwrap(), START_LINE);
    trigger.trigger();
    writer.await.unwrap().unwrap();
    let mut rest = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        rest.push(line);
    }
    assert!(rest.len() < 20_000, "cut short");
    assert!(rest.iter().all(|l| !l.starts_with(END_PREFIX)));
}
