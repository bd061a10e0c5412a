//! End to end, as root: a start that fails after the maps were pinned (here,
//! `--cgroup` naming a directory that does not exist) leaves no pinned state,
//! while a failed start over a previous agent's state leaves that state alone.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use integration_tests::{agent_binary, require_ebpf, Agent, AgentOptions, TempDir, TestCgroup};

fn start_failing(pin_dir: &Path, dir: &TempDir) -> String {
    let output = Command::new(agent_binary())
        .args(["agent", "--service", "SMTP=2597", "--pin-dir"])
        .arg(pin_dir)
        .arg("--socket")
        .arg(dir.path().join("audit.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--cgroup")
        .arg("/sys/fs/cgroup/inbound-audit-no-such-cgroup")
        .output()
        .expect("run the agent");
    assert!(!output.status.success(), "a missing cgroup is refused");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_failed_fresh_start_leaves_no_pinned_state() {
    require_ebpf!();
    let dir = TempDir::new("failed-start");
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/inbound-audit-test-failed-start-{}",
        std::process::id()
    ));
    let _ = inbound_audit::kernel::loader::cleanup(&pin_dir);
    let stderr = start_failing(&pin_dir, &dir);
    assert!(
        stderr.contains("no-such-cgroup"),
        "the error names the cgroup: {stderr}"
    );
    assert!(
        !pin_dir.exists(),
        "{} was left behind: {:?}",
        pin_dir.display(),
        std::fs::read_dir(&pin_dir).map(|d| d.count())
    );
}

#[test]
fn a_failed_start_over_running_state_keeps_it() {
    require_ebpf!();
    let cgroup = TestCgroup::new("failed-start-kept");
    let mut agent = Agent::start(AgentOptions {
        name: "failed-start-kept",
        cgroup: &cgroup,
        services: vec!["SMTP=2596".into()],
        extra_args: vec![],
    });
    agent.stop();
    let before: Vec<_> = std::fs::read_dir(&agent.pin_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(!before.is_empty());
    let dir = TempDir::new("failed-start-kept-2");
    start_failing(&agent.pin_dir, &dir);
    for name in &before {
        assert!(
            agent.pin_dir.join(name).exists(),
            "{name:?} of the previous agent was removed"
        );
    }
    let _ = inbound_audit::kernel::loader::cleanup(&agent.pin_dir);
}
