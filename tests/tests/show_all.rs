//! End to end, as root: `show all` (Momentum's console CSV of every tracked
//! IP) from a real agent against the connections really held, through the
//! CLI and on the socket.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, TcpStream},
    os::unix::net::UnixStream,
    process::Command,
    time::Duration,
};

use integration_tests::{
    agent_binary, connect_from, eventually, require_ebpf, sock_diag_count, Agent, SmtpFixture,
};

/// The CSV `inbound-audit show all` prints: the header, then IP → row.
fn show_all_cli(agent: &Agent) -> (Vec<String>, BTreeMap<IpAddr, Vec<u64>>) {
    let output = Command::new(agent_binary())
        .args(["show", "all", "--socket"])
        .arg(&agent.socket)
        .output()
        .expect("run inbound-audit show all");
    assert!(
        output.status.success(),
        "show all: {:?}\n{}\nagent log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        agent.log_text()
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8 CSV");
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .expect("a header")
        .split(',')
        .map(String::from)
        .collect();
    let mut rows = BTreeMap::new();
    let mut last = None;
    for line in lines {
        let mut fields = line.split(',');
        let ip: IpAddr = fields.next().unwrap().parse().expect("an IP first");
        assert!(last < Some(ip), "rows in ascending IP order, once each");
        last = Some(ip);
        let counts: Vec<u64> = fields.map(|f| f.parse().expect("a count")).collect();
        assert_eq!(counts.len() + 1, header.len(), "{line}");
        rows.insert(ip, counts);
    }
    (header, rows)
}

fn column(header: &[String], name: &str) -> usize {
    header
        .iter()
        .position(|c| c == name)
        .unwrap_or_else(|| panic!("no column {name:?} in {header:?}"))
        - 1
}

#[test]
fn show_all_lists_every_held_connection_with_its_windows() {
    require_ebpf!();
    let mut fx = SmtpFixture::start(
        env!("CARGO_BIN_EXE_test-server"),
        "show-all",
        &["--monitor", "60,2"],
    );
    let ip = |last: u8| IpAddr::from([127, 0, 0, last]);
    // Held per source, and opened per source (one of 53's is closed again).
    let mut held: Vec<(IpAddr, TcpStream)> = Vec::new();
    for (source, n) in [(51, 3), (52, 1), (53, 2)] {
        for _ in 0..n {
            held.push((ip(source), connect_from(ip(source), fx.smtp)));
        }
    }
    let closed = held.pop().expect("one of 127.0.0.53's");
    fx.agent.expect_count("127.0.0.53", "SMTP", 2);
    drop(closed);
    fx.agent.expect_count("127.0.0.0/8", "SMTP", 5);
    // A source with reports only, no session.
    assert_eq!(fx.agent.query("add receptions 127.0.0.54 5"), "OK 5");
    eventually("the server holds the 5 left", || fx.server.held() == 5);

    let (header, rows) = show_all_cli(&fx.agent);
    assert_eq!(
        header,
        [
            "IP",
            "Connections 60/0",
            "Connections 60/1",
            "Connections 60/2",
            "Receptions 60/0",
            "Receptions 60/1",
            "Receptions 60/2",
            "Rejections 60/0",
            "Rejections 60/1",
            "Rejections 60/2",
            "Sessions SMTP"
        ]
    );
    let sessions = column(&header, "Sessions SMTP");
    let connections = column(&header, "Connections 60/0")..=column(&header, "Connections 60/2");
    let receptions = column(&header, "Receptions 60/0")..=column(&header, "Receptions 60/2");
    assert_eq!(
        rows.keys().copied().collect::<Vec<_>>(),
        [ip(51), ip(52), ip(53), ip(54)],
        "{rows:?}"
    );
    let port = fx.smtp.port();
    for (source, opened, live) in [(51, 3, 3), (52, 1, 1), (53, 2, 1), (54, 0, 0)] {
        let row = &rows[&ip(source)];
        let held_now = held.iter().filter(|(s, _)| *s == ip(source)).count() as u64;
        assert_eq!(held_now, live);
        assert_eq!(row[sessions], live, "127.0.0.{source}: {row:?}");
        // The kernel's own sockets say the same.
        let net = ipnet::IpNet::from(ip(source));
        eventually("sock_diag agrees", || {
            sock_diag_count(&[port], &fx.cgroup, &net) == live
        });
        let accepted: u64 = row[connections.clone()].iter().sum();
        assert_eq!(accepted, opened, "127.0.0.{source}: {row:?}");
        let received: u64 = row[receptions.clone()].iter().sum();
        assert_eq!(received, if source == 54 { 5 } else { 0 });
    }
    // Each row is `show <ip>`'s numbers.
    let show = inbound_audit::serving::client::query_report(&fx.agent.socket, "show 127.0.0.51")
        .unwrap()
        .unwrap();
    assert!(show.contains(&"Sessions SMTP: 3".to_string()), "{show:?}");

    // Everything closed: only the windows keep the sources.
    held.clear();
    fx.agent.expect_count("127.0.0.0/8", "SMTP", 0);
    let (_, rows) = show_all_cli(&fx.agent);
    assert_eq!(rows.len(), 4);
    assert!(rows.values().all(|row| row[sessions] == 0), "{rows:?}");
}

/// The framing on the socket: `OK csv`, header, rows, `END <rows>`; the
/// connection stays usable after it; bad forms are `ERR syntax`.
#[test]
fn show_all_on_the_socket_is_framed_and_the_connection_goes_on() {
    require_ebpf!();
    let fx = SmtpFixture::start(env!("CARGO_BIN_EXE_test-server"), "show-all-wire", &[]);
    let _a = connect_from("127.0.0.61".parse().unwrap(), fx.smtp);
    let _b = connect_from("127.0.0.62".parse().unwrap(), fx.smtp);
    fx.agent.expect_count("127.0.0.0/8", "SMTP", 2);

    let mut stream = UnixStream::connect(&fx.agent.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = || {
        let mut text = String::new();
        reader.read_line(&mut text).unwrap();
        text.trim_end().to_string()
    };
    stream
        .write_all(
            b"show all\nshow all cluster\nmsys.audit.inbound_session_count(\"127.0.0.61\")\n",
        )
        .unwrap();
    assert_eq!(line(), "OK csv");
    // No monitors configured: the live sessions only.
    assert_eq!(line(), "IP,Sessions SMTP");
    assert_eq!(line(), "127.0.0.61,1");
    assert_eq!(line(), "127.0.0.62,1");
    assert_eq!(line(), "END 2");
    assert_eq!(
        line(),
        "ERR syntax usage: show all (this node's counts; it takes no arguments)"
    );
    assert_eq!(line(), "OK 1");
}
