//! End to end, as root: Momentum-style policy scripts, unchanged (the seed
//! example from Momentum's msys.audit.connections page and the three in
//! contrib/policy), run by the agent's Lua policy host for a real Postfix
//! (a private instance, with the README's main.cf lines) and a real Exim in
//! host-checking mode (`exim -bh`, with the README's ACL), both taken from
//! README.md as written.
//!
//! Needs root and eBPF; says `SKIPPED` without Postfix (`apt-get install
//! postfix`) or Exim (`cargo xtask test` unpacks one; INBOUND_AUDIT_EXIM).

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    connect_from,
    postfix::{Postfix, Smtp, POLICY_IN_QUEUE, POSTFIX},
    redis::free_port,
    require_ebpf, Agent, AgentOptions, SmtpFixture, TempDir, TestCgroup,
};

/// Readiness probes come from a network no limit or assertion looks at.
const PROBE_SOURCE: &str = "127.0.9.9";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The scripts in the order the agent loads them. The seed example returns
/// VALIDATE_DONE at MAIL, so it goes last there.
fn scripts() -> Vec<PathBuf> {
    [
        "contrib/policy/session_limit.lua",
        "contrib/policy/connection_tarpit.lua",
        "contrib/policy/rejection_ratio.lua",
        "tests/fixtures/policy/momentum_example.lua",
    ]
    .iter()
    .map(|p| repo(p).canonicalize().unwrap())
    .collect()
}

/// The agent's config: the scripts and the monitors they name.
fn agent_config(dir: &Path) -> PathBuf {
    let list = scripts()
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    let path = dir.join("inbound-audit.toml");
    std::fs::write(
        &path,
        format!(
            "monitors = [\"60,1\", \"3600,1\"]\npolicy_socket_mode = \"0660\"\n\
             lua_policy_scripts = [{list}]\nlua_policy_fail_action = \"dunno\"\n"
        ),
    )
    .unwrap();
    path
}

/// A fenced block of README.md: from the line `first` to the closing fence.
fn readme_block(first: &str) -> String {
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let start = readme
        .find(&format!("\n{first}\n"))
        .unwrap_or_else(|| panic!("README.md has a block starting {first:?}"))
        + 1;
    let end = start + readme[start..].find("\n```").expect("its closing fence");
    readme[start..=end].to_string()
}

/// What the agent logged about scripts that failed (none expected).
fn script_failures(agent: &Agent) -> Vec<String> {
    agent
        .log_text()
        .lines()
        .filter(|l| l.contains("lua policy:") && !l.contains("script(s) loaded"))
        .map(str::to_string)
        .collect()
}

/// A connection's first reply line, and how long it took.
fn first_line(source: &str, server: SocketAddr) -> (String, Duration) {
    let began = Instant::now();
    let stream = connect_from(ip(source), server);
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut line = String::new();
    let _ = BufReader::new(stream).read_line(&mut line);
    (line.trim_end().to_string(), began.elapsed())
}

#[test]
fn momentum_scripts_run_unchanged_for_postfix() {
    if !Path::new(POSTFIX).exists() {
        eprintln!(
            "SKIPPED (no Postfix): {POSTFIX} is missing; install Debian's postfix package \
             (DEBIAN_FRONTEND=noninteractive apt-get install -y postfix)"
        );
        return;
    }
    require_ebpf!();
    let began = Instant::now();
    let dir = TempDir::new("lua-postfix-mta");
    let cgroup = TestCgroup::new("lua-postfix");
    let port = free_port();
    let restrictions = readme_block("smtpd_delay_reject = no")
        .replace(&format!("unix:{POLICY_IN_QUEUE}"), "@POLICY@");
    assert!(
        restrictions.contains("smtpd_client_restrictions"),
        "{restrictions}"
    );
    let smtp = SocketAddr::new(ip("127.0.0.1"), port);
    let mut postfix = Postfix::configure(
        dir.path(),
        smtp,
        cgroup.path(),
        None,
        Some(&format!("unix:{POLICY_IN_QUEUE}")),
    )
    .and_then(|postfix| postfix.with_restrictions(&restrictions))
    .unwrap_or_else(|e| panic!("configuring Postfix: {e}"));
    let config = agent_config(dir.path());
    let agent = Agent::start(AgentOptions {
        name: "lua-postfix",
        cgroup: &cgroup,
        services: vec![format!("SMTP={port}")],
        extra_args: vec![
            "--config".into(),
            config.display().to_string(),
            "--policy-socket".into(),
            postfix.policy_socket().display().to_string(),
            "--policy-socket-group".into(),
            "postfix".into(),
            "--state-dir".into(),
            dir.path().join("agent-state").display().to_string(),
        ],
    });
    postfix
        .start(|postfix| postfix.answers(ip(PROBE_SOURCE)))
        .unwrap_or_else(|e| panic!("starting Postfix: {e}"));
    agent.expect_count(PROBE_SOURCE, "SMTP", 0);
    eprintln!("Postfix and the agent serve after {:?}", began.elapsed());

    // session_limit.lua: ten live sessions from 127.0.5.0/24 are let in, the
    // eleventh gets the script's 421 instead of the greeting.
    let sessions: Vec<Smtp> = (1..=10)
        .map(|n| Smtp::open(&format!("127.0.5.{n}"), smtp))
        .collect();
    agent.expect_count("127.0.5.0/24", "SMTP", 10);
    let (refused, _) = first_line("127.0.5.11", smtp);
    assert!(refused.starts_with("421 4.7.0 "), "11th session: {refused}");
    assert!(
        refused.ends_with("Too many sessions from your network (11), try again later"),
        "11th session: {refused}"
    );
    for session in sessions {
        session.quit();
    }
    agent.expect_count("127.0.5.0/24", "SMTP", 0);
    agent.expect(
        "@127.0.5.11 msys.audit.rejections(\"60,1\", {endv=1})",
        "OK 1",
    );

    // The seed example runs at MAIL for everyone; a message goes through every
    // phase and its END-OF-MESSAGE is a reception.
    let mut good = Smtp::open("127.0.8.1", smtp);
    let reply = good.rcpt();
    assert!(reply.starts_with("250 "), "RCPT: {reply}");
    assert!(good.command("DATA").starts_with("354 "));
    let queued = good.command("Subject: lua policy\r\n\r\nhello\r\n.");
    assert!(queued.starts_with("250 2.0.0 Ok: queued"), "{queued}");
    good.quit();
    agent.expect(
        "@127.0.8.1 msys.audit.receptions(\"3600,1\", {endv=1})",
        "OK 1",
    );

    // rejection_ratio.lua: five rejections reported for 127.0.7.1 and nothing
    // received: MAIL FROM is refused, and that refusal counts too.
    assert_eq!(agent.query("add rejections 127.0.7.1 5"), "OK 5");
    let mut rejected = Smtp::open("127.0.7.1", smtp);
    assert!(rejected.command("EHLO client.example").starts_with("250 "));
    let mail = rejected.command("MAIL FROM:<a@example.org>");
    assert!(mail.starts_with("550 5.7.1 "), "MAIL: {mail}");
    assert!(
        mail.ends_with("Too many rejected messages from your address (5 of 5), mail refused"),
        "MAIL: {mail}"
    );
    rejected.quit();
    agent.expect(
        "@127.0.7.1 msys.audit.rejections(\"3600,1\", {endv=1})",
        "OK 6",
    );

    // connection_tarpit.lua: the 21st connection in two minutes from
    // 127.0.6.1 waits 3 s for its greeting, and 3 s at RCPT.
    for n in 1..=20 {
        let (banner, _) = first_line("127.0.6.1", smtp);
        assert!(banner.starts_with("220 "), "connection {n}: {banner}");
    }
    agent.expect(
        "@127.0.6.1 msys.audit.connections(\"60,1\", {endv=1})",
        "OK 20",
    );
    let opened = Instant::now();
    let mut slow = Smtp::open("127.0.6.1", smtp);
    let greeted = opened.elapsed();
    assert!(
        greeted >= Duration::from_millis(2900),
        "greeting after {greeted:?}"
    );
    let asked = Instant::now();
    let reply = slow.rcpt();
    assert!(reply.starts_with("250 "), "RCPT: {reply}");
    assert!(
        asked.elapsed() >= Duration::from_millis(2900),
        "RCPT after {:?}",
        asked.elapsed()
    );
    slow.quit();

    assert_eq!(script_failures(&agent), Vec::<String>::new());
    assert!(postfix.stop(), "postfix stop did not stop Postfix");
    eprintln!("lua policy postfix test done in {:?}", began.elapsed());
}

/// Exim from INBOUND_AUDIT_EXIM (cargo xtask test unpacks one), or the system's.
fn exim() -> Option<String> {
    std::env::var("INBOUND_AUDIT_EXIM").ok().or_else(|| {
        Path::new("/usr/sbin/exim4")
            .exists()
            .then(|| "/usr/sbin/exim4".into())
    })
}

/// One SMTP dialogue from `client` (its port `client_port`) to the listener
/// on 127.0.0.1:`port` through Exim; Exim's replies and its -bh commentary.
fn dialogue(
    exim: &str,
    config: &Path,
    client: &str,
    client_port: u16,
    port: u16,
    input: &str,
) -> String {
    let mut child = Command::new(exim)
        .arg("-C")
        .arg(config)
        .arg("-oMi")
        .arg(format!("127.0.0.1.{port}"))
        .arg("-bh")
        .arg(format!("{client}.{client_port}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

const MESSAGE: &str = "EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nSubject: lua policy\r\n\r\nhello\r\n.\r\nQUIT\r\n";

#[test]
fn momentum_scripts_run_unchanged_for_exim() {
    require_ebpf!();
    let Some(exim) = exim() else {
        eprintln!("SKIPPED (no Exim): set INBOUND_AUDIT_EXIM or run `cargo xtask test`, which unpacks Debian's exim4-daemon-light");
        return;
    };
    let dir = TempDir::new("lua-exim-mta");
    let config = agent_config(dir.path());
    let fixture = SmtpFixture::start(
        env!("CARGO_BIN_EXE_test-server"),
        "lua-exim",
        &[
            "--config",
            config.to_str().unwrap(),
            "--socket-group",
            "Debian-exim",
        ],
    );
    let (agent, smtp) = (&fixture.agent, fixture.smtp);
    let port = smtp.port();

    let acl = readme_block("acl_smtp_connect = acl_policy_connect").replace(
        "/run/inbound-audit/audit.sock",
        agent.socket.to_str().unwrap(),
    );
    let exim_config = dir.path().join("exim.conf");
    std::fs::create_dir_all(dir.path().join("spool")).unwrap();
    // Exim receives the messages (-bh runs DATA) as its own user.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let chown = Command::new("chown")
        .arg("Debian-exim")
        .arg(dir.path().join("spool"))
        .status()
        .unwrap();
    assert!(chown.success());
    std::fs::write(
        &exim_config,
        format!(
            "primary_hostname = mx.test.example\nspool_directory = {dir}/spool\n\
             log_file_path = {dir}/%slog\n{acl}",
            dir = dir.path().display()
        ),
    )
    .unwrap();

    // session_limit.lua: eleven live sessions from 127.0.5.0/24: the
    // connect ACL defers with the script's 421.
    let busy: Vec<_> = (1..=11)
        .map(|n| connect_from(ip(&format!("127.0.5.{n}")), smtp))
        .collect();
    agent.expect_count("127.0.5.0/24", "SMTP", 11);
    let replies = dialogue(&exim, &exim_config, "127.0.5.200", 4000, port, MESSAGE);
    assert!(
        replies.contains("421 4.7.0 Too many sessions from your network (11), try again later"),
        "{replies}"
    );
    drop(busy);

    // A quiet client: every phase asked, the message accepted, a reception.
    let replies = dialogue(&exim, &exim_config, "127.0.8.1", 4001, port, MESSAGE);
    assert!(replies.contains("250 Accepted"), "{replies}");
    assert!(
        replies.contains("250 OK id="),
        "the message was accepted: {replies}"
    );
    agent.expect(
        "@127.0.8.1 msys.audit.receptions(\"3600,1\", {endv=1})",
        "OK 1",
    );

    // rejection_ratio.lua: MAIL FROM denied with the script's 550.
    assert_eq!(agent.query("add rejections 127.0.7.1 5"), "OK 5");
    let replies = dialogue(&exim, &exim_config, "127.0.7.1", 4002, port, MESSAGE);
    assert!(
        replies.contains(
            "550 5.7.1 Too many rejected messages from your address (5 of 5), mail refused"
        ),
        "{replies}"
    );
    agent.expect(
        "@127.0.7.1 msys.audit.rejections(\"3600,1\", {endv=1})",
        "OK 6",
    );

    // connection_tarpit.lua: the 21st connection is answered `OK sleep 3`,
    // which the ACL turns into a delay (skipped, and said so, under -bh).
    for _ in 0..21 {
        drop(connect_from(ip("127.0.6.1"), smtp));
    }
    agent.expect(
        "@127.0.6.1 msys.audit.connections(\"60,1\", {endv=1})",
        "OK 21",
    );
    let replies = dialogue(&exim, &exim_config, "127.0.6.1", 4003, port, MESSAGE);
    assert!(
        replies.contains("delay modifier requests 3-second delay"),
        "{replies}"
    );
    assert!(
        replies.contains("250 OK id="),
        "tarpitted, not refused: {replies}"
    );
    assert_eq!(
        agent.query(&format!(
            "@127.0.6.1 policy CONNECT client_port=4004 server_port={port}"
        )),
        "OK sleep 3"
    );

    // The request's own errors.
    assert!(agent
        .query("@127.0.6.1 policy QUIT")
        .starts_with("ERR unknown_phase "));
    assert!(agent.query("policy RCPT").starts_with("ERR no_client "));
    assert_eq!(script_failures(agent), Vec::<String>::new());
}

/// SIGHUP reads the scripts again: an edited script answers from the next
/// request on; a broken one is refused (logged, counted in `reloads_refused`)
/// and the running one goes on answering.
#[test]
fn sighup_reloads_the_scripts_and_a_broken_one_leaves_the_running_ones() {
    require_ebpf!();
    let dir = TempDir::new("lua-reload-scripts");
    let script = dir.path().join("greeting.lua");
    let write_script = |code: u32, text: &str| {
        std::fs::write(
            &script,
            format!(
                "require(\"msys.core\");\nrequire(\"msys.extended.vctx\");\nlocal mod = {{}};\n\
                 function mod:validate_connect(ac, vctx)\n  vctx:set_code({code}, \"{text}\");\n  \
                 return msys.core.VALIDATE_DONE;\nend\nmsys.registerModule(\"greeting\", mod);\n"
            ),
        )
        .unwrap()
    };
    write_script(421, "4.7.0 first version");
    let config = dir.path().join("inbound-audit.toml");
    std::fs::write(
        &config,
        format!(
            "lua_policy_scripts = [{:?}]\n",
            script.display().to_string()
        ),
    )
    .unwrap();
    let cgroup = TestCgroup::new("lua-reload");
    let agent = Agent::start(AgentOptions {
        name: "lua-reload",
        cgroup: &cgroup,
        services: vec!["SMTP=2599".into()],
        extra_args: vec!["--config".into(), config.display().to_string()],
    });
    let ask = || agent.query("@192.0.2.1 policy CONNECT client_port=4000 server_port=2599");
    assert_eq!(ask(), "OK 421 4.7.0 first version");

    // A reload is counted once it is complete, scripts included.
    let reloaded = |name: &str, to: u64| {
        integration_tests::eventually_within(name, Duration::from_secs(10), || {
            agent.stat(name) == to
        });
    };
    write_script(450, "4.7.1 second version");
    agent.signal(libc::SIGHUP);
    reloaded("reloads", 1);
    assert_eq!(ask(), "OK 450 4.7.1 second version");

    std::fs::write(&script, "this is not lua (\n").unwrap();
    agent.signal(libc::SIGHUP);
    reloaded("reloads_refused", 1);
    assert_eq!(agent.stat("reloads"), 1);
    assert_eq!(
        ask(),
        "OK 450 4.7.1 second version",
        "the running script stays"
    );
    assert!(
        agent.log_text().contains("the running scripts stay"),
        "{}",
        agent.log_text()
    );
}
