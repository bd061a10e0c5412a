//! End to end, as root: a root daemon on a shared host, where local users
//! may write some directories. The agent refuses directories another user
//! could rearrange (every ancestor of its sockets, state and pins), never
//! follows a symlink planted where its socket goes, and keeps its clients
//! within the open-file limit it runs under.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        net::UnixStream,
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    agent_binary, require_ebpf, Agent, AgentOptions, TempDir, TestCgroup, TestServer,
};

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mkdir(path: &Path, mode: u32) {
    std::fs::create_dir(path).unwrap();
    chmod(path, mode);
}

fn pin_dir(name: &str) -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/inbound-audit-test-{name}-{}",
        std::process::id()
    ))
}

/// Runs the agent with `args` in its own cgroup (never the root's, should it
/// start after all), expecting it to refuse: returns its exit status and
/// stderr. An agent still running after 30 s is killed and fails the test.
fn run_refused(name: &str, dir: &TempDir, args: &[&str]) -> (ExitStatus, String) {
    let cgroup = TestCgroup::new(name);
    let pins = pin_dir(name);
    let _ = inbound_audit::kernel::loader::cleanup(&pins);
    let log = dir.path().join(format!("{name}.log"));
    let mut child = Command::new(agent_binary())
        .arg("agent")
        .args(args)
        .arg("--pin-dir")
        .arg(&pins)
        .arg("--cgroup")
        .arg(cgroup.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = inbound_audit::kernel::loader::cleanup(&pins);
            panic!(
                "the agent did not refuse to start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let pinned = pins.exists();
    let _ = inbound_audit::kernel::loader::cleanup(&pins);
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !pinned,
        "a refused start left pinned state in {}:\n{stderr}",
        pins.display()
    );
    (status, stderr)
}

#[test]
fn an_ancestor_writable_by_everyone_is_refused_and_nothing_is_pinned() {
    require_ebpf!();
    let dir = TempDir::new("open-ancestor");
    // /tmp/x 0777 with sub/ root's: whoever can write x can rename sub and
    // put their own directory (and socket) in its place.
    let open = dir.path().join("x");
    mkdir(&open, 0o777);
    let sub = open.join("sub");
    mkdir(&sub, 0o755);
    let socket = sub.join("audit.sock");
    let (status, stderr) = run_refused(
        "open-ancestor",
        &dir,
        &["--socket", socket.to_str().unwrap()],
    );
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{} (owner uid 0, mode 0777)", open.display())),
        "{stderr}"
    );
    assert!(stderr.contains("writable by every user"), "{stderr}");
    assert!(!socket.exists());
}

/// A real unprivileged user with a group of its own (useradd), removed on drop.
struct LocalUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl LocalUser {
    fn create(tag: &str) -> Option<Self> {
        let name = format!("ia-{tag}-{}", std::process::id());
        let _ = Command::new("userdel").arg(&name).output();
        let added = Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home"])
            .args(["--shell", "/usr/sbin/nologin"])
            .arg(&name)
            .output()
            .ok()?;
        if !added.status.success() {
            eprintln!(
                "SKIPPED (useradd failed): {}",
                String::from_utf8_lossy(&added.stderr)
            );
            return None;
        }
        let user = Self {
            uid: inbound_audit::sys::users::user_id(&name)?,
            gid: inbound_audit::sys::users::group_id(&name)?,
            name,
        };
        Some(user)
    }
}

impl Drop for LocalUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

#[test]
fn a_group_writable_socket_directory_is_refused() {
    require_ebpf!();
    let Some(member) = LocalUser::create("group-dir") else {
        return;
    };
    let dir = TempDir::new("group-dir");
    // Root's directory, writable by a group a local user is in: the old
    // refusal message suggested exactly this.
    let shared = dir.path().join("shared");
    mkdir(&shared, 0o770);
    std::os::unix::fs::chown(&shared, Some(0), Some(member.gid)).unwrap();
    // The member can indeed put things there (and so swap the socket).
    let planted = Command::new("touch")
        .arg(shared.join("planted"))
        .uid(member.uid)
        .gid(member.gid)
        .output()
        .unwrap();
    assert!(planted.status.success(), "{planted:?}");
    std::fs::remove_file(shared.join("planted")).unwrap();

    let socket = shared.join("audit.sock");
    let (status, stderr) = run_refused("group-dir", &dir, &["--socket", socket.to_str().unwrap()]);
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} (owner uid 0, group gid {}, mode 0770)",
            shared.display(),
            member.gid
        )),
        "{stderr}"
    );
    assert!(stderr.contains("writable by its group"), "{stderr}");
    // The old advice pointed at a group-writable directory.
    assert!(!stderr.contains("or its group) can write"), "{stderr}");
    assert!(!socket.exists());
}

#[test]
fn a_state_directory_in_a_world_writable_directory_is_refused() {
    require_ebpf!();
    let dir = TempDir::new("open-state");
    let safe = dir.path().join("run");
    mkdir(&safe, 0o755);
    let open = dir.path().join("open");
    mkdir(&open, 0o777);
    let state = open.join("state");
    let (status, stderr) = run_refused(
        "open-state",
        &dir,
        &[
            "--socket",
            safe.join("audit.sock").to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--monitor",
            "60,1",
        ],
    );
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("the state directory"), "{stderr}");
    assert!(
        stderr.contains(&format!("{} (owner uid 0, mode 0777)", open.display())),
        "{stderr}"
    );
    // Refused before anything was made: no socket, no state dir.
    assert!(!safe.join("audit.sock").exists());
    assert!(!state.exists());
}

#[test]
fn a_symlink_planted_at_the_socket_path_is_not_followed() {
    require_ebpf!();
    let dir = TempDir::new("planted-link");
    let run = dir.path().join("run");
    mkdir(&run, 0o755);
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "root only\n").unwrap();
    chmod(&secret, 0o600);
    let socket = run.join("audit.sock");
    std::os::unix::fs::symlink(&secret, &socket).unwrap();
    let (status, stderr) = run_refused(
        "planted-link",
        &dir,
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--socket-group",
            "65534",
        ],
    );
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("is not a socket"), "{stderr}");
    let meta = std::fs::metadata(&secret).unwrap();
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o600, 0, 0)
    );
    assert!(std::fs::symlink_metadata(&socket)
        .unwrap()
        .file_type()
        .is_symlink());
}

/// Open descriptors of process `pid`.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn a_low_open_file_limit_lowers_max_clients_and_the_next_client_is_told_busy() {
    require_ebpf!();
    let cgroup = TestCgroup::new("nofile");
    let server = TestServer::start(env!("CARGO_BIN_EXE_test-server"), &cgroup, &["127.0.0.1:0"]);
    // As under `ulimit -n 256` with the default max_clients (1024).
    let agent = Agent::start_with_open_files(
        AgentOptions {
            name: "nofile",
            cgroup: &cgroup,
            services: vec![format!("SMTP={}", server.ports[0])],
            extra_args: vec!["--max-clients".into(), "1024".into()],
        },
        Some(256),
    );
    let effective = 256 - inbound_audit::sys::limits::OWN_DESCRIPTORS as usize;
    assert!(
        agent
            .log_text()
            .contains(&format!("max_clients lowered from 1024 to {effective}")),
        "{}",
        agent.log_text()
    );
    let idle = open_descriptors(agent.pid());
    eprintln!("the agent holds {idle} descriptors with no client");
    assert!(
        idle < inbound_audit::sys::limits::OWN_DESCRIPTORS as usize,
        "the margin must cover the agent's own descriptors ({idle})"
    );

    // Every place taken, each client seen served (one query each).
    let mut held = Vec::new();
    for _ in 0..effective {
        let mut client = UnixStream::connect(&agent.socket).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client.write_all(b"show 127.0.0.1\n").unwrap();
        let mut reader = BufReader::new(client);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("OK"), "{line}");
        // Read the report's lines so the next request starts clean.
        let lines: usize = line.trim_end()[3..].parse().unwrap_or(0);
        for _ in 0..lines {
            line.clear();
            reader.read_line(&mut line).unwrap();
        }
        held.push(reader);
    }
    // The next one is told, not left hanging.
    let started = Instant::now();
    let answer = inbound_audit::serving::client::query(&agent.socket, "show 127.0.0.1")
        .unwrap_or_else(|e| panic!("the client beyond the cap: {e}\n{}", agent.log_text()));
    assert!(answer.starts_with("ERR busy "), "{answer}");
    assert!(
        answer.contains(&format!("max_clients = {effective}")),
        "{answer}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The agent never ran out of descriptors.
    assert!(
        !agent.log_text().contains("accept on"),
        "{}",
        agent.log_text()
    );
    // A place freed is a place taken again.
    held.pop();
    integration_tests::eventually("a freed place serves again", || {
        inbound_audit::serving::client::query(&agent.socket, "show 127.0.0.1")
            .is_ok_and(|a| a.starts_with("OK"))
    });
    drop(held);
}

#[test]
fn with_the_policy_socket_each_socket_gets_half_of_what_fits() {
    require_ebpf!();
    let cgroup = TestCgroup::new("nofile-policy");
    let server = TestServer::start(env!("CARGO_BIN_EXE_test-server"), &cgroup, &["127.0.0.1:0"]);
    let dir = TempDir::new("nofile-policy-socket");
    let policy = dir.path().join("policy.sock");
    let agent = Agent::start_with_open_files(
        AgentOptions {
            name: "nofile-policy",
            cgroup: &cgroup,
            services: vec![format!("SMTP={}", server.ports[0])],
            extra_args: vec!["--policy-socket".into(), policy.display().to_string()],
        },
        Some(256),
    );
    let effective = (256 - inbound_audit::sys::limits::OWN_DESCRIPTORS as usize) / 2;
    assert!(
        agent
            .log_text()
            .contains(&format!("max_clients lowered from 1024 to {effective}")),
        "{}",
        agent.log_text()
    );
}
