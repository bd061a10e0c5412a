//! End to end, as root: `inbound-audit top` against a real agent counting
//! real connections, as `--once` text and as the live screen under tmux
//! (send-keys to switch the prefix and the sort column, capture-pane to read
//! it). Skips, saying why, without eBPF or without tmux.

use std::{
    net::IpAddr,
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{agent_binary, connect_from, require_ebpf, SmtpFixture, TempDir};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Sessions from three addresses in two /24s, and receptions reported for
/// one of them: 127.0.0.0/24 holds 4 sessions, 127.0.1.0/24 2 and 7 receptions.
fn fixture(name: &str) -> (SmtpFixture, Vec<std::net::TcpStream>) {
    let fixture = SmtpFixture::start(
        env!("CARGO_BIN_EXE_test-server"),
        name,
        &["--monitor", "60,2"],
    );
    let mut held = Vec::new();
    for (from, n) in [("127.0.0.1", 3), ("127.0.0.2", 1), ("127.0.1.5", 2)] {
        for _ in 0..n {
            held.push(connect_from(ip(from), fixture.smtp));
        }
    }
    fixture.agent.expect_count("127.0.0.0/16", "SMTP", 6);
    assert_eq!(fixture.agent.query("add receptions 127.0.1.5 7"), "OK 7");
    (fixture, held)
}

fn cells(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[test]
fn once_prints_the_table() {
    require_ebpf!();
    let (fixture, _held) = fixture("top-once");
    let out = Command::new(agent_binary())
        .args(["top", "--once", "--socket"])
        .arg(&fixture.agent.socket)
        .output()
        .expect("run top --once");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "SMTP", "{text}");
    assert_eq!(
        cells(lines[1]),
        [
            "NETWORK",
            "SESSIONS",
            "CONNECTIONS",
            "RECEPTIONS",
            "REJECTIONS"
        ]
    );
    assert_eq!(
        cells(lines[2]),
        ["127.0.0.0/24", "4", "4", "0", "0"],
        "{text}"
    );
    assert_eq!(
        cells(lines[3]),
        ["127.0.1.0/24", "2", "2", "7", "0"],
        "{text}"
    );

    let out = Command::new(agent_binary())
        .args([
            "top",
            "--once",
            "--hosts",
            "--sort",
            "receptions",
            "--socket",
        ])
        .arg(&fixture.agent.socket)
        .output()
        .expect("run top --once --hosts");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        cells(lines[2]),
        ["127.0.1.5/32", "2", "2", "7", "0"],
        "{text}"
    );
    assert_eq!(
        cells(lines[3]),
        ["127.0.0.1/32", "3", "3", "0", "0"],
        "{text}"
    );
    assert_eq!(
        cells(lines[4]),
        ["127.0.0.2/32", "1", "1", "0", "0"],
        "{text}"
    );
}

/// A tmux server of its own (`-S`, its socket in a scratch directory), killed
/// on drop.
struct Tmux {
    dir: TempDir,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-S")
            .arg(self.dir.path().join("tmux.sock"))
            .args(args)
            .output()
            .expect("run tmux")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    /// The screen once `check` holds (10 s at most).
    fn wait_for(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let screen = self.screen();
            if check(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {what}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The first data row under the table header.
fn first_row(screen: &str) -> Vec<String> {
    screen
        .lines()
        .skip_while(|l| !l.contains("NETWORK"))
        .nth(1)
        .map(|l| cells(l).into_iter().map(str::to_string).collect())
        .unwrap_or_default()
}

#[test]
fn live_screen_switches_prefix_and_sort_under_tmux() {
    require_ebpf!();
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("SKIPPED (no tmux on PATH): install tmux (cargo xtask test does)");
        return;
    }
    let (fixture, _held) = fixture("top-tmux");
    let tmux = Tmux {
        dir: TempDir::new("top-tmux-screen"),
    };
    let command = format!(
        "{} top --socket {}",
        agent_binary().display(),
        fixture.agent.socket.display()
    );
    let started = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "120",
        "-y",
        "30",
        &command,
    ]);
    assert!(started.status.success(), "{started:?}");

    let screen = tmux.wait_for("the /24 rows", |s| s.contains("127.0.0.0/24"));
    assert!(screen.contains("prefixes /24 and /64"), "{screen}");
    assert_eq!(
        first_row(&screen),
        ["127.0.0.0/24", "4", "4", "0", "0"],
        "{screen}"
    );

    assert!(tmux.run(&["send-keys", "-t", "top", "p"]).status.success());
    let screen = tmux.wait_for("the /32 rows", |s| s.contains("127.0.0.1/32"));
    assert!(screen.contains("prefixes /32 and /48"), "{screen}");
    assert_eq!(
        first_row(&screen),
        ["127.0.0.1/32", "3", "3", "0", "0"],
        "{screen}"
    );

    // 4: sort by receptions.
    assert!(tmux.run(&["send-keys", "-t", "top", "4"]).status.success());
    let screen = tmux.wait_for("the receptions order", |s| {
        s.contains("sorted by receptions")
            && first_row(s).first().map(String::as_str) == Some("127.0.1.5/32")
    });
    assert_eq!(
        first_row(&screen),
        ["127.0.1.5/32", "2", "2", "7", "0"],
        "{screen}"
    );

    // The view refreshes on its own: a new session shows up.
    let _more = connect_from(ip("127.0.0.9"), fixture.smtp);
    tmux.wait_for("the new session", |s| s.contains("127.0.0.9/32"));

    assert!(tmux.run(&["send-keys", "-t", "top", "q"]).status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.run(&["has-session", "-t", "top"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "q did not quit:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
