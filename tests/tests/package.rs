//! End to end, as root: the Debian package for real. `dpkg -i` the .deb that
//! `cargo xtask deb` built (INBOUND_AUDIT_DEB, set by `cargo xtask test`), run
//! the installed unit's ExecStart the way systemd would (its capability set,
//! its runtime and state directories; this machine has no systemd as PID 1),
//! query it through the installed socket path, install the same package over it
//! (an upgrade) and check that no session count was lost, then `dpkg --purge`
//! and check that nothing is left behind, the pinned kernel state included.
//!
//! The agent is pointed at a test cgroup (appended `--cgroup`, `--service`): a
//! test never attaches at the cgroup2 root. It uses the package's default pin
//! directory and socket, so it skips when a real installation is there.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{connect_from, eventually, require_ebpf, TempDir, TestCgroup, TestServer};

const PACKAGE: &str = "inbound-audit";
const UNIT: &str = "/usr/lib/systemd/system/inbound-audit.service";
const BINARY: &str = "/usr/sbin/inbound-audit";
const CONFFILE: &str = "/etc/inbound-audit/inbound-audit.toml";
const SOCKET: &str = "/run/inbound-audit/audit.sock";
const PIN_DIR: &str = "/sys/fs/bpf/inbound-audit";
const STATE_DIR: &str = "/var/lib/inbound-audit";

/// Why the package test cannot run here, if it cannot.
fn package_unavailable() -> Option<String> {
    let deb = std::env::var_os("INBOUND_AUDIT_DEB").map(PathBuf::from)?;
    if !deb.exists() {
        return Some(format!(
            "{} does not exist: build it with `cargo xtask deb`",
            deb.display()
        ));
    }
    for tool in ["dpkg", "setpriv"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    if installed() {
        return Some(format!(
            "package {PACKAGE} is installed on this machine: the test would replace it"
        ));
    }
    if Path::new(PIN_DIR).exists() || Path::new(SOCKET).exists() {
        return Some(format!(
            "{PIN_DIR} or {SOCKET} exists: an agent of this machine uses them"
        ));
    }
    None
}

fn deb() -> PathBuf {
    PathBuf::from(std::env::var_os("INBOUND_AUDIT_DEB").expect("checked"))
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PACKAGE])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn dpkg(args: &[&str]) -> String {
    let output = Command::new("dpkg")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .expect("dpkg");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "dpkg {args:?} failed:\n{text}");
    text
}

/// Purges the package (and its pinned state) however the test ends.
struct Installation;

impl Drop for Installation {
    fn drop(&mut self) {
        if installed() {
            let _ = Command::new("dpkg").args(["--purge", PACKAGE]).output();
        }
        let _ = inbound_audit::kernel::loader::cleanup(Path::new(PIN_DIR));
    }
}

/// The values of `key=` in the unit's [Service] section, in order.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().to_string())
        .collect()
}

/// The installed unit's ExecStart, run as systemd runs it: root with exactly
/// the unit's bounding and ambient capabilities (setpriv), its
/// RuntimeDirectory and StateDirectory created first, the test's cgroup and
/// service appended.
fn start_as_the_unit(unit: &str, cgroup: &TestCgroup, port: u16, log: &Path) -> Child {
    let exec = unit_values(unit, "ExecStart");
    assert_eq!(exec.len(), 1, "one ExecStart: {exec:?}");
    let argv: Vec<&str> = exec[0].split_whitespace().collect();
    assert_eq!(argv[0], BINARY, "ExecStart runs the installed binary");
    let caps = |key: &str| -> String {
        let values = unit_values(unit, key);
        assert_eq!(values.len(), 1, "{key}: {values:?}");
        values[0]
            .split_whitespace()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect::<Vec<_>>()
            .join(",")
    };
    let bounding = caps("CapabilityBoundingSet");
    let ambient = caps("AmbientCapabilities");
    assert_eq!(bounding, ambient, "the unit grants what it bounds");
    assert_eq!(unit_values(unit, "RuntimeDirectory"), ["inbound-audit"]);
    assert_eq!(unit_values(unit, "StateDirectory"), ["inbound-audit"]);
    assert!(
        unit_values(unit, "User").is_empty(),
        "the unit runs as root"
    );
    for dir in ["/run/inbound-audit", STATE_DIR] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let out = std::fs::File::create(log).unwrap();
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=0", "--regid=0", "--clear-groups"])
        .arg(format!("--bounding-set=-all,{bounding}"))
        .arg(format!("--inh-caps=-all,{ambient}"))
        .arg(format!("--ambient-caps=-all,{ambient}"))
        .args(&argv)
        .arg("--cgroup")
        .arg(cgroup.path())
        .arg("--service")
        .arg(format!("SMTP={port}"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    let mut child = command.spawn().expect("setpriv");
    let deadline = Instant::now() + Duration::from_secs(30);
    while query("stats").is_none() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the unit's ExecStart exited with {status}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no answer on {SOCKET} within 30 s:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// Asks through the installed binary and the installed socket path.
fn query(request: &str) -> Option<String> {
    let output = Command::new(BINARY)
        .args(["query", request])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn count() -> String {
    query(r#"msys.audit.inbound_session_count("127.0.0.0/8", "SMTP")"#).unwrap_or_default()
}

fn stop(mut child: Child, log: &Path) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "agent exit {status}:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[test]
fn deb_installs_runs_as_its_unit_upgrades_without_losing_counts_and_purges_clean() {
    require_ebpf!();
    if std::env::var_os("INBOUND_AUDIT_DEB").is_none() {
        eprintln!("SKIPPED: INBOUND_AUDIT_DEB is not set (`cargo xtask test` builds the package and sets it)");
        return;
    }
    if let Some(reason) = package_unavailable() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let _installation = Installation;
    let scratch = TempDir::new("package");
    let log = scratch.path().join("agent.log");

    dpkg(&["-i", deb().to_str().unwrap()]);
    for path in [
        BINARY,
        UNIT,
        CONFFILE,
        "/usr/share/man/man8/inbound-audit.8.gz",
        "/usr/share/man/man8/inbound-audit-agent.8.gz",
        "/usr/share/bash-completion/completions/inbound-audit",
        "/usr/share/zsh/vendor-completions/_inbound-audit",
        "/usr/share/fish/vendor_completions.d/inbound-audit.fish",
        "/usr/share/lua/5.1/msys/audit.lua",
        "/usr/share/lua/5.4/msys/extended/ac.lua",
        "/usr/share/doc/inbound-audit/copyright",
        "/usr/share/doc/inbound-audit/examples/postfix-main.cf",
        "/usr/share/doc/inbound-audit/examples/exim-acl.conf",
    ] {
        assert!(Path::new(path).exists(), "the package installs {path}");
    }
    let conffiles = dpkg(&["--status", PACKAGE]);
    assert!(
        conffiles.contains(CONFFILE),
        "{CONFFILE} is a conffile:\n{conffiles}"
    );
    let version = Command::new(BINARY).arg("--version").output().unwrap();
    assert!(
        String::from_utf8_lossy(&version.stdout).contains("(commit "),
        "{version:?}"
    );
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        let verify = Command::new("systemd-analyze")
            .args(["verify", UNIT])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&verify.stderr);
        assert!(
            verify.status.success() && text.trim().is_empty(),
            "systemd-analyze verify:\n{text}"
        );
    }
    let unit = std::fs::read_to_string(UNIT).unwrap();

    let cgroup = TestCgroup::new("package");
    let server = TestServer::start(env!("CARGO_BIN_EXE_test-server"), &cgroup, &["127.0.0.1:0"]);
    let port = server.ports[0];
    let listener = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let agent = start_as_the_unit(&unit, &cgroup, port, &log);
    let agent_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        agent_log.contains("dropped every capability but CAP_BPF"),
        "the unit's set includes what the agent needs to drop the rest:\n{agent_log}"
    );
    let mut sessions: Vec<_> = (0..3)
        .map(|i| connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 7, i + 1)), listener))
        .collect();
    eventually("3 sessions counted through the installed socket", || {
        count() == "OK 3"
    });

    // An upgrade: the agent stops (as systemd's restart would), the same
    // package goes over it, the agent starts again and adopts the pinned maps.
    stop(agent, &log);
    sessions.push(connect_from(
        IpAddr::V4(Ipv4Addr::new(127, 0, 7, 9)),
        listener,
    ));
    let upgrade = dpkg(&["-i", deb().to_str().unwrap()]);
    assert!(
        Path::new(PIN_DIR).exists(),
        "an upgrade keeps the pinned state:\n{upgrade}"
    );
    let agent = start_as_the_unit(&unit, &cgroup, port, &log);
    eventually("4 sessions after the upgrade, none lost or doubled", || {
        count() == "OK 4"
    });
    drop(sessions.pop());
    eventually("a close after the upgrade is counted", || count() == "OK 3");
    stop(agent, &log);
    drop(sessions);
    drop(server);

    dpkg(&["--purge", PACKAGE]);
    assert!(!installed());
    let left: Vec<&str> = [
        BINARY,
        UNIT,
        CONFFILE,
        "/etc/inbound-audit",
        PIN_DIR,
        STATE_DIR,
        "/usr/share/doc/inbound-audit",
        "/usr/share/lua/5.4/msys/audit.lua",
    ]
    .into_iter()
    .filter(|p| Path::new(p).exists())
    .collect();
    assert!(left.is_empty(), "purge left {left:?} behind");
    // The runtime directory is systemd's (RuntimeDirectory=), removed when the
    // unit stops; here the test stands in for it.
    let _ = std::fs::remove_dir_all("/run/inbound-audit");
}
