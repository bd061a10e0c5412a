//! End to end, as root: `[access]` is checked when a client connects. A user
//! the configuration refuses gets `ERR forbidden` and EOF at once on every
//! connection, holds none of the `max_clients` places while it keeps its
//! connections open, and its refusals make a bounded number of log lines.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream, process::CommandExt},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{eventually, require_ebpf, SmtpFixture, TempDir};

/// Connections the refused user opens (five times `max_clients`).
const REFUSED_CONNECTIONS: usize = 20;
const MAX_CLIENTS: usize = 4;

/// A system user (and its own group) for this test, removed on drop.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl TestUser {
    fn create() -> Option<Self> {
        let name = format!("ia-access-{}", std::process::id());
        let _ = Command::new("userdel").arg(&name).output();
        let created = Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home"])
            .args(["--shell", "/usr/sbin/nologin"])
            .arg(&name)
            .status()
            .ok()?;
        if !created.success() {
            return None;
        }
        let id = |flag: &str| -> Option<u32> {
            let out = Command::new("id").arg(flag).arg(&name).output().ok()?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        let user = Self {
            name,
            uid: uid.unwrap_or(0),
            gid: gid.unwrap_or(0),
        };
        (uid.is_some() && gid.is_some()).then_some(user)
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

/// Run as the refused user by the test below (a copy of this very binary):
/// opens every connection first and keeps them all, checks each was answered
/// `ERR forbidden` and closed at once, says READY and holds them until stdin
/// closes.
#[test]
#[ignore = "a helper: run as an unprivileged user by refused_users_are_turned_away_at_accept"]
fn refused_user_connections() {
    let socket = std::env::var_os("IA_ACCESS_SOCKET").expect("IA_ACCESS_SOCKET");
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let mut held = Vec::new();
    for _ in 0..REFUSED_CONNECTIONS {
        held.push((UnixStream::connect(&socket).unwrap(), Instant::now()));
    }
    let mut slowest = Duration::ZERO;
    for (stream, opened) in &mut held {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .expect("answered and closed, not left open");
        assert!(
            answer.starts_with(&format!("ERR forbidden uid {uid} may not query")),
            "{answer:?}"
        );
        assert_eq!(answer.lines().count(), 1, "{answer:?}");
        slowest = slowest.max(opened.elapsed());
    }
    println!("READY slowest {} ms", slowest.as_millis());
    std::io::stdout().flush().unwrap();
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(held);
}

#[test]
fn refused_users_are_turned_away_at_accept() {
    require_ebpf!();
    let Some(user) = TestUser::create() else {
        eprintln!("SKIPPED: could not create a user with useradd");
        return;
    };
    let dir = TempDir::new("access-accept-config");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.path().join("access.toml");
    std::fs::write(
        &config,
        format!("max_clients = {MAX_CLIENTS}\n[access]\nquery_users = [\"root\"]\n"),
    )
    .unwrap();
    // The socket's group lets the user connect; `[access]` refuses it.
    let fixture = SmtpFixture::start(
        env!("CARGO_BIN_EXE_test-server"),
        "access-accept",
        &[
            "--config",
            config.to_str().unwrap(),
            "--socket-group",
            &user.name,
        ],
    );
    let agent = &fixture.agent;

    // The checkout may be private to root: the user runs a copy of this test.
    let helper = dir.path().join("access-helper");
    std::fs::copy(std::env::current_exe().unwrap(), &helper).unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = Command::new(&helper)
        .args([
            "--exact",
            "refused_user_connections",
            "--ignored",
            "--nocapture",
        ])
        .args(["--test-threads", "1"])
        .env("IA_ACCESS_SOCKET", &agent.socket)
        .uid(user.uid)
        .gid(user.gid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Lines of the helper's output as they come; libtest may print the
    // test's name before READY on the same line.
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = String::new();
    let mut ready = None;
    while let Ok(line) = received.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        seen.push_str(&line);
        seen.push('\n');
        if let Some((_, rest)) = line.split_once("READY slowest ") {
            ready = rest
                .trim()
                .strip_suffix(" ms")
                .and_then(|ms| ms.parse::<u64>().ok());
            break;
        }
    }
    let Some(slowest_ms) = ready else {
        let _ = child.kill();
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        let _ = child.wait();
        panic!(
            "the refused user's helper failed:\n{seen}\n{err}\n{}",
            agent.log_text()
        );
    };
    // "At once": the answer and EOF come without any timeout running out.
    assert!(slowest_ms < 2_000, "slowest refusal took {slowest_ms} ms");

    // All 20 refused connections are still open on the user's side; root
    // can still take every one of the places.
    let request = b"audit_service \"SMTP\" \"127.0.0.0/8\"\n";
    let ask = |stream: &UnixStream| -> Option<String> {
        (&*stream).write_all(request).ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).ok()?;
        Some(line)
    };
    let mut served = Vec::new();
    for _ in 0..MAX_CLIENTS {
        let mut taken = None;
        // The harness's own probe may hold a place for a moment.
        eventually("a root connection is served", || {
            let Ok(stream) = UnixStream::connect(&agent.socket) else {
                return false;
            };
            let ok = ask(&stream).as_deref() == Some("OK 0\n");
            if ok {
                taken = Some(stream);
            }
            ok
        });
        served.push(taken.unwrap());
    }
    for stream in &served {
        assert_eq!(ask(stream).as_deref(), Some("OK 0\n"));
    }
    // The limit itself still holds: a fifth allowed client is busy.
    let mut fifth = UnixStream::connect(&agent.socket).unwrap();
    let mut answer = String::new();
    fifth.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("ERR busy "), "{answer:?}");
    drop(served);

    drop(child.stdin.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "helper exit {status}");

    let log = agent.log_text();
    let refusal_lines = log
        .lines()
        .filter(|l| l.contains("refused") && l.contains(&format!("uid {}", user.uid)))
        .count();
    assert!(
        (1..=2).contains(&refusal_lines),
        "{refusal_lines} refusal lines for {REFUSED_CONNECTIONS} refusals:\n{log}"
    );
}
