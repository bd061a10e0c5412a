//! End to end, as root: a small per-IP table (`max_tracked_ips = 64`) filled
//! by short connections. A session refused meanwhile is counted within one
//! reconcile pass, the kernel logs nothing per refused session, and the
//! saturation flag clears once the table has room, saying when it was set.

use std::time::{Duration, Instant};

use integration_tests::{require_ebpf, SmtpFixture, TempDir};

const INTERVAL_SECS: u64 = 2;

fn stats(fixture: &SmtpFixture) -> Vec<String> {
    inbound_audit::serving::client::query_report(&fixture.agent.socket, "stats")
        .expect("stats request")
        .expect("stats report")
}

fn stat<'a>(report: &'a [String], name: &str) -> &'a str {
    report
        .iter()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in {report:?}"))
}

#[test]
fn a_session_refused_by_a_table_of_zero_entries_is_counted_within_one_pass() {
    require_ebpf!();
    let dir = TempDir::new("full-table-config");
    let config = dir.path().join("full.toml");
    std::fs::write(
        &config,
        format!("max_tracked_ips = 64\nreconcile_interval_secs = {INTERVAL_SECS}\n"),
    )
    .unwrap();
    let fixture = SmtpFixture::start(
        env!("CARGO_BIN_EXE_test-server"),
        "fulltable",
        &["--config", config.to_str().unwrap()],
    );
    let agent = &fixture.agent;
    let before = stats(&fixture);
    assert_eq!(stat(&before, "kernel_tables_last_saturated"), "never");

    // 64 short sessions from 64 new IPs: counted, then closed, leaving 64
    // zero entries that fill the table until the agent collects them.
    let short: Vec<_> = (1..=64u8)
        .map(|i| {
            integration_tests::connect_from(format!("127.0.1.{i}").parse().unwrap(), fixture.smtp)
        })
        .collect();
    agent.expect_count("127.0.1.0/24", "SMTP", 64);
    drop(short);
    // At once, before any pass can collect them: refused by the full table.
    let held = integration_tests::connect_from("127.0.2.1".parse().unwrap(), fixture.smtp);
    let refused_at = Instant::now();
    let truth = integration_tests::sock_diag_count(
        &[fixture.server.ports[0]],
        &fixture.cgroup,
        &"127.0.2.1/32".parse().unwrap(),
    );
    assert_eq!(truth, 1);
    integration_tests::eventually("the kernel counted the refusal", || {
        agent.stat("kernel_ip_table_full") >= 1
    });

    // Counted within one reconcile pass (the refusal wakes the reconciler).
    agent.expect_count("127.0.2.1", "SMTP", 1);
    let took = refused_at.elapsed();
    println!("counted {took:?} after the refusal");
    assert!(
        took <= Duration::from_secs(INTERVAL_SECS + 1),
        "counted after {took:?}, more than one pass ({INTERVAL_SECS} s)"
    );
    assert!(agent.stat("kernel_refused_counted_later") >= 1);
    agent.expect_count("127.0.1.0/24", "SMTP", 0);

    // The table has room again: the flag clears, the time it was set stays.
    integration_tests::eventually("the saturation flag clears", || {
        stat(&stats(&fixture), "kernel_tables_saturated") == "no"
    });
    let after = stats(&fixture);
    let last: u64 = stat(&after, "kernel_tables_last_saturated")
        .parse()
        .expect("a Unix time once saturated");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        last <= now && now - last < 60,
        "last saturated {last}, now {now}"
    );
    let show = inbound_audit::serving::client::query_report(&agent.socket, "show 127.0.0.0/8")
        .unwrap()
        .unwrap();
    assert!(
        !show
            .iter()
            .any(|l| l.starts_with("Kernel tables saturated")),
        "{show:?}"
    );
    agent.expect_count("127.0.2.1", "SMTP", 1);

    // No kernel log line per refused session; the agent's own line comes at
    // most once per interval.
    let log = agent.log_text();
    assert_eq!(
        log.lines().filter(|l| l.contains("is not counted")).count(),
        0,
        "{log}"
    );
    let elapsed_intervals = refused_at.elapsed().as_secs() / INTERVAL_SECS + 1;
    let full_lines = log
        .lines()
        .filter(|l| l.contains("kernel tables full"))
        .count() as u64;
    assert!(
        (1..=elapsed_intervals).contains(&full_lines),
        "{full_lines} lines in {elapsed_intervals} intervals:\n{log}"
    );
    drop(held);
    agent.expect_count("127.0.2.1", "SMTP", 0);
}

#[test]
fn a_session_refused_by_a_table_of_live_ips_is_counted_once_one_leaves() {
    require_ebpf!();
    let dir = TempDir::new("full-live-config");
    let config = dir.path().join("full.toml");
    std::fs::write(
        &config,
        format!("max_tracked_ips = 2\nreconcile_interval_secs = {INTERVAL_SECS}\n"),
    )
    .unwrap();
    let fixture = SmtpFixture::start(
        env!("CARGO_BIN_EXE_test-server"),
        "fulllive",
        &["--config", config.to_str().unwrap()],
    );
    let agent = &fixture.agent;
    let from = |ip: &str| integration_tests::connect_from(ip.parse().unwrap(), fixture.smtp);
    let a = from("127.0.3.1");
    let b = from("127.0.3.2");
    agent.expect_count("127.0.3.0/24", "SMTP", 2);
    // Refused while both IPs are live; it waits, uncounted, through passes.
    let c = from("127.0.3.3");
    integration_tests::eventually("the refusal is seen", || {
        agent.stat("kernel_ip_table_full") >= 1
    });
    std::thread::sleep(Duration::from_secs(INTERVAL_SECS + 1));
    agent.expect_count("127.0.3.3", "SMTP", 0);
    assert_eq!(stat(&stats(&fixture), "kernel_tables_saturated"), "yes");
    // One IP leaves: its entry falls to zero, is collected, and c is counted.
    drop(b);
    let left_at = Instant::now();
    agent.expect_count("127.0.3.3", "SMTP", 1);
    assert!(
        left_at.elapsed() <= Duration::from_secs(INTERVAL_SECS + 1),
        "counted {:?} after the IP left",
        left_at.elapsed()
    );
    agent.expect_count("127.0.3.0/24", "SMTP", 2);
    // c's close is uncounted through its adopted record, exactly once.
    drop(c);
    agent.expect_count("127.0.3.3", "SMTP", 0);
    agent.expect_count("127.0.3.1", "SMTP", 1);
    drop(a);
    agent.expect_count("127.0.3.0/24", "SMTP", 0);
    assert_eq!(agent.stat("index_repairs"), 0);
    assert_eq!(agent.stat("kernel_repairs"), 0);
}
