//! End to end, as root: the monitor state file on the real agent. A link
//! planted at `monitors.tmp` is not written through on SIGTERM, and repeated
//! starts on a bad file keep only the newest few rejected copies, under the
//! name the README gives.

use std::os::unix::fs::symlink;

use integration_tests::{require_ebpf, SmtpFixture, TempDir};

fn start(name: &str, state_dir: &TempDir) -> SmtpFixture {
    SmtpFixture::start(
        env!("CARGO_BIN_EXE_test-server"),
        name,
        &[
            "--monitor",
            "60,2",
            "--state-dir",
            state_dir.path().to_str().unwrap(),
        ],
    )
}

const RECEPTIONS: &str = "@127.0.0.44 msys.audit.receptions(\"60,2\", {startv=0, endv=2})";

#[test]
fn a_link_at_the_temporary_is_not_followed_on_shutdown() {
    require_ebpf!();
    let state_dir = TempDir::new("state-files-link-state");
    let elsewhere = TempDir::new("state-files-victim");
    let victim = elsewhere.path().join("root-only");
    std::fs::write(&victim, b"precious").unwrap();
    let mut fixture = start("state-files-link", &state_dir);
    let agent = &mut fixture.agent;
    assert_eq!(agent.query("add receptions 127.0.0.44 3"), "OK 3");

    let temporary = state_dir.path().join("monitors.tmp");
    symlink(&victim, &temporary).unwrap();
    agent.stop();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(&temporary).is_err());
    let state = state_dir.path().join("monitors.state");
    assert!(std::fs::symlink_metadata(&state).unwrap().is_file());

    agent.start_again();
    agent.expect(RECEPTIONS, "OK 3");
    assert!(agent.log_text().contains("monitor state restored"));
}

#[test]
fn rejected_state_files_are_named_as_documented_and_capped() {
    require_ebpf!();
    let state_dir = TempDir::new("state-files-rejected-state");
    let mut fixture = start("state-files-rejected", &state_dir);
    let agent = &mut fixture.agent;
    let state = state_dir.path().join("monitors.state");
    for round in 0..5 {
        agent.stop();
        std::fs::write(&state, format!("not a state file, round {round}")).unwrap();
        // Rejected names carry the second: one a second keeps them apart.
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        agent.start_again();
        agent.expect(RECEPTIONS, "OK 0");
    }
    let log = agent.log_text();
    assert_eq!(
        log.matches("is not an inbound-audit monitor state file")
            .count(),
        5,
        "{log}"
    );
    let mut rejected: Vec<u64> = std::fs::read_dir(state_dir.path())
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(
                !name.contains("rejected") || name.starts_with("monitors.state.rejected-"),
                "{name}"
            );
            name.strip_prefix("monitors.state.rejected-")?.parse().ok()
        })
        .collect();
    rejected.sort_unstable();
    assert_eq!(rejected.len(), 3, "{rejected:?}\n{log}");
    // The newest are the ones kept: the last start's is among them.
    let last = log
        .lines()
        .rev()
        .find_map(|l| l.split("was moved to ").nth(1))
        .unwrap_or_else(|| panic!("no set-aside line:\n{log}"));
    let last_secs: u64 = last
        .split("monitors.state.rejected-")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|secs| secs.parse().ok())
        .unwrap_or_else(|| panic!("{last}"));
    assert_eq!(rejected.last(), Some(&last_secs), "{rejected:?}");
}
