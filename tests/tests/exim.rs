//! End to end, as root: the README's Exim ACL, taken from the README as written,
//! run by a real Exim in host-checking mode (`exim -bh IP`: a whole SMTP dialogue
//! from that IP, ACLs and ${readsocket} included, with no delivery) against the
//! real agent counting real connections.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use integration_tests::{connect_from, require_ebpf, SmtpFixture, TempDir};

/// Exim from INBOUND_AUDIT_EXIM (cargo xtask test unpacks one), or the system's.
fn exim() -> Option<String> {
    std::env::var("INBOUND_AUDIT_EXIM").ok().or_else(|| {
        std::path::Path::new("/usr/sbin/exim4")
            .exists()
            .then(|| "/usr/sbin/exim4".into())
    })
}

/// The ACL block of the README's Exim section, verbatim.
fn readme_acl() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("acl_check_rcpt:\n")
        .expect("the README's Exim ACL");
    let end = start
        + readme[start..]
            .find("  # ... the rest of acl_check_rcpt")
            .expect("its end");
    readme[start..end].to_string()
}

/// Runs one SMTP dialogue from `client` through Exim; returns Exim's replies.
fn dialogue(exim: &str, config: &std::path::Path, client: &str) -> String {
    let mut child = Command::new(exim)
        .arg("-C")
        .arg(config)
        .args(["-bh", client])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nQUIT\r\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_readme_exim_acl_defers_by_network_sessions_and_connections() {
    require_ebpf!();
    let Some(exim) = exim() else {
        eprintln!("SKIPPED (no Exim): set INBOUND_AUDIT_EXIM or run `cargo xtask test`, which unpacks Debian's exim4-daemon-light");
        return;
    };
    // Exim runs its ACLs as its own user, as the README says.
    let fixture = SmtpFixture::start(
        env!("CARGO_BIN_EXE_test-server"),
        "exim-acl",
        &["--monitor", "60,1", "--socket-group", "Debian-exim"],
    );
    let (agent, smtp) = (&fixture.agent, fixture.smtp);

    // The README's ACL with this agent's socket and small limits: above 2
    // sessions per /24, above 3 connections per IP.
    let acl = readme_acl()
        .replace(
            "/run/inbound-audit/audit.sock",
            agent.socket.to_str().unwrap(),
        )
        .replace("}{10}}", "}{2}}")
        .replace("}{30}}", "}{3}}");
    assert!(
        acl.contains("}{2}}") && acl.contains("}{3}}"),
        "the README's limits moved:\n{acl}"
    );
    let dir = TempDir::new("exim-acl-config");
    let config = dir.path().join("exim.conf");
    std::fs::create_dir_all(dir.path().join("spool")).unwrap();
    std::fs::write(
        &config,
        format!(
            "primary_hostname = mx.test.example\nspool_directory = {dir}/spool\n\
             log_file_path = {dir}/%slog\nacl_smtp_rcpt = acl_check_rcpt\n\nbegin acl\n\n{acl}  accept\n",
            dir = dir.path().display()
        ),
    )
    .unwrap();

    let busy_net: Vec<_> = (0..3)
        .map(|_| connect_from("127.0.0.81".parse().unwrap(), smtp))
        .collect();
    agent.expect_count("127.0.0.0/24", "SMTP", 3);
    let replies = dialogue(&exim, &config, "127.0.0.81");
    assert!(
        replies.contains("451 Too many SMTP sessions from your network"),
        "{replies}"
    );

    // Another network, one session: accepted.
    let quiet = connect_from("127.0.1.82".parse().unwrap(), smtp);
    agent.expect_count("127.0.1.82", "SMTP", 1);
    let replies = dialogue(&exim, &config, "127.0.1.82");
    assert!(replies.contains("250 Accepted"), "{replies}");

    // Three more connections from that IP in this minute: over 3, deferred.
    for _ in 0..3 {
        drop(connect_from("127.0.1.82".parse().unwrap(), smtp));
    }
    agent.expect(
        "@127.0.1.82 msys.audit.connections(\"60,1\", {endv=1})",
        "OK 4",
    );
    let replies = dialogue(&exim, &config, "127.0.1.82");
    // The README asks about window 0 only; a minute boundary may split them.
    let connections_now = agent.query("@127.0.1.82 msys.audit.connections(\"60,1\")");
    if connections_now == "OK 4" {
        assert!(replies.contains("451 Too many connections"), "{replies}");
    }
    drop((busy_net, quiet));
}
