//! End to end, as root: the agent tells systemd it is ready (READY=1 on
//! NOTIFY_SOCKET, as a Type=notify unit expects) once start-up is complete,
//! so that by then its kernel programs count and its socket answers.

use std::{
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    time::Duration,
};

use integration_tests::{agent_binary, require_ebpf, TempDir, TestCgroup};

#[test]
fn ready_is_sent_once_start_up_is_complete() {
    require_ebpf!();
    let dir = TempDir::new("notify");
    let cgroup = TestCgroup::new("notify");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let socket = dir.path().join("audit.sock");
    let pin_dir = format!(
        "/sys/fs/bpf/inbound-audit-test-notify-{}",
        std::process::id()
    );
    let mut child = Command::new(agent_binary())
        .args(["agent", "--service", "SMTP=2595", "--pin-dir", &pin_dir])
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--cgroup")
        .arg(cgroup.path())
        .arg("--detach-on-exit")
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut message = [0u8; 256];
    let received = notify.recv(&mut message);
    let answer = inbound_audit::serving::client::query_report(&socket, "stats");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let _ = inbound_audit::kernel::loader::cleanup(std::path::Path::new(&pin_dir));
    let n = received.expect("READY=1 within 30 s");
    let text = String::from_utf8_lossy(&message[..n]);
    assert!(text.lines().any(|l| l == "READY=1"), "{text:?}");
    let lines = answer
        .expect("the agent answers once it said ready")
        .expect("stats is answered");
    assert!(
        lines.iter().any(|l| l.contains("kernel_sessions")),
        "{lines:?}"
    );
    assert!(status.success(), "{status}");
}
