//! Tests of request parsing: every call form, client contexts, framing, and
//! the error codes (one test per call form, hence the length).

use super::*;
use proptest::prelude::*;

fn parse(text: &str) -> Request {
    parse_request(text.as_bytes()).unwrap_or_else(|error| panic!("{text:?}: {error}"))
}

fn rejected(text: &str) -> QueryError {
    parse_request(text.as_bytes()).expect_err("should be rejected")
}

fn syntax(message: &str) -> QueryError {
    QueryError::new(ErrorCode::Syntax, message)
}

fn session_count(cidr: CidrArg, service: ServiceArg) -> Request {
    Request {
        client: None,
        query: Query::SessionCount { cidr, service },
    }
}

fn named(service: &str) -> ServiceArg {
    ServiceArg::Named(service.to_owned())
}

fn network(text: &str) -> CidrArg {
    CidrArg::Network(text.parse().expect("test network"))
}

fn context(ip: &str, port: Option<u16>) -> Option<ClientContext> {
    Some(ClientContext {
        ip: ip.parse().expect("test address"),
        port,
    })
}

#[test]
fn msys_audit_inbound_session_count_forms() {
    assert_eq!(
        parse("msys.audit.inbound_session_count()"),
        session_count(CidrArg::Client, named("SMTP"))
    );
    assert_eq!(
        parse("msys.audit.inbound_session_count(\"/24\")"),
        session_count(CidrArg::ClientPrefix(24), named("SMTP"))
    );
    assert_eq!(
        parse("msys.audit.inbound_session_count(\"10.0.0.0/8\", \"ECStream\")"),
        session_count(network("10.0.0.0/8"), named("ECStream"))
    );
    assert_eq!(
        parse("msys.audit.inbound_session_count(nil, 'Control');"),
        session_count(CidrArg::Client, named("Control"))
    );
    assert_eq!(
        parse("msys.audit.inbound_session_count('/32', nil)"),
        session_count(CidrArg::ClientPrefix(32), named("SMTP"))
    );
    assert_eq!(
        parse("  msys.audit.inbound_session_count ( \"[2001:db8::]/64\" , \"smtp\" ) ; \t"),
        session_count(network("2001:db8::/64"), named("smtp"))
    );
    assert_eq!(
        parse("msys.audit.inbound_session_count(\"localhost\", \"\")"),
        session_count(network("127.0.0.1/32"), named(""))
    );
}

#[test]
fn ac_inbound_session_count_forms() {
    assert_eq!(
        parse("ac:inbound_session_count()"),
        session_count(CidrArg::Client, ServiceArg::Listener)
    );
    assert_eq!(
        parse("ac:inbound_session_count(nil)"),
        session_count(CidrArg::Client, ServiceArg::Listener)
    );
    assert_eq!(
        parse("ac:inbound_session_count(\"localhost/32\")"),
        session_count(network("127.0.0.1/32"), named("SMTP"))
    );
    assert_eq!(
        parse("ac:inbound_session_count(\"/24\", \"ECStream\")"),
        session_count(CidrArg::ClientPrefix(24), named("ECStream"))
    );
    assert_eq!(
        parse("ac:inbound_session_count(nil, \"Control\")"),
        session_count(CidrArg::Client, named("Control"))
    );
}

#[test]
fn sieve_forms() {
    assert_eq!(
        parse("audit_connections_on_service \"/24\""),
        session_count(CidrArg::ClientPrefix(24), named("SMTP"))
    );
    assert_eq!(
        parse("audit_connections_on_service"),
        session_count(CidrArg::Client, named("SMTP"))
    );
    assert_eq!(
        parse("audit_connections_on_listener \"/24\";"),
        session_count(CidrArg::ClientPrefix(24), ServiceArg::Listener)
    );
    assert_eq!(
        parse("audit_connections_on_listener"),
        session_count(CidrArg::Client, ServiceArg::Listener)
    );
    assert_eq!(
        parse("audit_service \"SMTP\" \"10.0.0.0/8\""),
        session_count(network("10.0.0.0/8"), named("SMTP"))
    );
    assert_eq!(
        parse("audit_service \"Control\""),
        session_count(CidrArg::Client, named("Control"))
    );
    assert_eq!(
        parse("audit_service [\"SMTP\"] [\"/16\"]"),
        session_count(CidrArg::ClientPrefix(16), named("SMTP"))
    );
    assert_eq!(
        parse("AUDIT_Connections_On_Service [\"/24\"]"),
        session_count(CidrArg::ClientPrefix(24), named("SMTP"))
    );
    assert_eq!(
        parse("audit_service\"SMTP\"\"10.1.2.3/24\""),
        session_count(network("10.1.2.0/24"), named("SMTP"))
    );
}

#[test]
fn client_context_forms() {
    let call = " msys.audit.inbound_session_count()";
    let cases = [
        ("@203.0.113.9", context("203.0.113.9", None)),
        ("@203.0.113.9:587", context("203.0.113.9", Some(587))),
        ("@[2001:db8::1]:25", context("2001:db8::1", Some(25))),
        ("@[2001:db8::1]", context("2001:db8::1", None)),
        ("@2001:db8::1", context("2001:db8::1", None)),
        ("@2001:db8::1:25", context("2001:db8::1:25", None)),
        ("@::ffff:10.0.0.1", context("10.0.0.1", None)),
        ("@[::ffff:10.0.0.1]:2525", context("10.0.0.1", Some(2525))),
        ("@10.0.0.1:65535", context("10.0.0.1", Some(65535))),
    ];
    for (prefix, expected_client) in cases {
        let request = parse(&format!("{prefix}{call}"));
        assert_eq!(request.client, expected_client, "{prefix}");
        assert_eq!(
            request.query,
            Query::SessionCount {
                cidr: CidrArg::Client,
                service: named("SMTP")
            }
        );
    }
    assert_eq!(
        parse("\t@10.0.0.1\t\taudit_connections_on_listener").client,
        context("10.0.0.1", None)
    );
}

#[test]
fn bad_client_context() {
    for address in [
        "",
        "10.0.0",
        "10.0.0.1:",
        "10.0.0.1:0",
        "10.0.0.1:025",
        "10.0.0.1:65536",
        "10.0.0.1:+25",
        "[2001:db8::1",
        "[2001:db8::1]25",
        "[2001:db8::1]:",
        "[10.0.0.1]:25",
        "fe80::1%eth0",
        "host.example:25",
        "2001:db8::1]:25",
    ] {
        assert_eq!(
            rejected(&format!("@{address} audit_connections_on_service")),
            QueryError::new(
                ErrorCode::BadCidr,
                format!(
                    "bad client address {address:?}: expected IP, IPv4:port, [IPv6] or [IPv6]:port"
                )
            ),
            "{address}"
        );
    }
}

#[test]
fn client_context_needs_a_call_after_it() {
    assert_eq!(
        rejected("@10.0.0.1"),
        syntax("expected a call after the client address at byte 9")
    );
    assert_eq!(
        rejected("@10.0.0.1   "),
        syntax("expected a call after the client address at byte 12")
    );
}

fn windowed(series: Series, monitor: MonitorRef, cidr: CidrArg, first: u32, last: u32) -> Query {
    Query::Windowed {
        series,
        monitor,
        cidr,
        first,
        last,
        cluster: false,
    }
}

fn key(text: &str) -> MonitorRef {
    MonitorRef::Key(text.to_owned())
}

#[test]
fn msys_audit_windowed_forms() {
    assert_eq!(
        parse("msys.audit.connections(\"60,1\")").query,
        windowed(Series::Connections, key("60,1"), CidrArg::Client, 0, 0)
    );
    assert_eq!(
        parse("msys.audit.receptions('300,6', '10.0.0.0/8')").query,
        windowed(
            Series::Receptions,
            key("300,6"),
            network("10.0.0.0/8"),
            0,
            0
        )
    );
    assert_eq!(
        parse("msys.audit.rejections(\"300,6\", {startv=1, endv=3, cidr=\"/24\"})").query,
        windowed(
            Series::Rejections,
            key("300,6"),
            CidrArg::ClientPrefix(24),
            1,
            3
        )
    );
    assert_eq!(
        parse("msys.audit.connections(\"300,6\", {cluster=true, [\"endv\"]=2})").query,
        Query::Windowed {
            series: Series::Connections,
            monitor: key("300,6"),
            cidr: CidrArg::Client,
            first: 0,
            last: 2,
            cluster: true
        }
    );
    for bad in [
        "msys.audit.connections()",
        "msys.audit.connections(60)",
        "msys.audit.connections(\"60,1\", 5)",
        "msys.audit.connections(\"60,1\", {startv=-1})",
        "msys.audit.connections(\"60,1\", {start=1})",
        "msys.audit.connections(\"60,1\", {cidr=5})",
        "msys.audit.connections(\"60,1\", {cluster=\"yes\"})",
        "msys.audit.connections(\"60,1\", {1})",
        "msys.audit.connections(\"60,1\", nil, 3)",
    ] {
        assert_eq!(rejected(bad).code, ErrorCode::Syntax, "{bad}");
    }
    assert_eq!(
        rejected("msys.audit.connections(\"60,1\", \"10.0.0.300\")").code,
        ErrorCode::BadCidr
    );
}

#[test]
fn sieve_ec_ip_forms() {
    assert_eq!(
        parse("ec_ip_connections \"0\"").query,
        Query::Sliding {
            series: Series::Connections,
            monitor: 0,
            cidr: CidrArg::Client,
            cluster: false
        }
    );
    assert_eq!(
        parse("ec_ip_rejections 1 24").query,
        Query::Sliding {
            series: Series::Rejections,
            monitor: 1,
            cidr: CidrArg::ClientPrefix(24),
            cluster: false
        }
    );
    assert_eq!(
        parse("ec_ip_receptions {monitor=\"300,6\", period_start=1, period_end=4, mask=16}").query,
        windowed(
            Series::Receptions,
            key("300,6"),
            CidrArg::ClientPrefix(16),
            1,
            4
        )
    );
    assert_eq!(
        parse("ec_ip_connections {period_start=\"2\"}").query,
        windowed(
            Series::Connections,
            MonitorRef::First,
            CidrArg::Client,
            2,
            2
        )
    );
    assert!(matches!(
        parse("ec_ip_connections_cluster \"0\"").query,
        Query::Sliding { cluster: true, .. }
    ));
    assert_eq!(rejected("ec_ip_connections").code, ErrorCode::Syntax);
    assert_eq!(
        rejected("ec_ip_connections {colour=1}").code,
        ErrorCode::Syntax
    );
    assert_eq!(
        rejected("ec_ip_connections {mask=24} 3").code,
        ErrorCode::Syntax
    );
    assert_eq!(rejected("ec_ip_connections 0 129").code, ErrorCode::BadCidr);
}

#[test]
fn console_add_and_show() {
    assert_eq!(
        parse("add receptions 10.0.0.1").query,
        Query::Add {
            series: Series::Receptions,
            ip: "10.0.0.1".parse().unwrap(),
            n: 1
        }
    );
    assert_eq!(
        parse("add rejections ::ffff:10.0.0.1 7").query,
        Query::Add {
            series: Series::Rejections,
            ip: "10.0.0.1".parse().unwrap(),
            n: 7
        }
    );
    assert_eq!(
        parse("@10.0.0.9 show /24"),
        Request {
            client: context("10.0.0.9", None),
            query: Query::Show {
                cidr: CidrArg::ClientPrefix(24),
                scope: ShowScope::Local,
            }
        }
    );
    assert_eq!(
        parse("show 2001:db8::/64").query,
        Query::Show {
            cidr: network("2001:db8::/64"),
            scope: ShowScope::Local,
        }
    );
    assert_eq!(
        parse("show 10.0.0.0/8 cluster").query,
        Query::Show {
            cidr: network("10.0.0.0/8"),
            scope: ShowScope::Cluster,
        }
    );
    assert_eq!(
        parse("show 10.0.0.0/8 node mx2").query,
        Query::Show {
            cidr: network("10.0.0.0/8"),
            scope: ShowScope::Node("mx2".into()),
        }
    );
    for bad in [
        "show 10.0.0.0/8 clusters",
        "show 10.0.0.0/8 node",
        "add",
        "add receptions",
        "add connections 10.0.0.1",
        "add receptions 10.0.0.1 0",
        "add receptions 10.0.0.1 x",
        "add receptions 10.0.0.1 1 2",
        "show",
        "show a b",
    ] {
        assert_eq!(rejected(bad).code, ErrorCode::Syntax, "{bad}");
    }
    assert_eq!(
        rejected("add receptions 10.0.0.256").code,
        ErrorCode::BadCidr
    );
    assert_eq!(rejected("show 10.0.0.0/33").code, ErrorCode::BadCidr);
    assert_eq!(parse("stats").query, Query::Stats);
    assert_eq!(rejected("stats now").code, ErrorCode::Syntax);
    // Only whole words are console commands.
    assert_eq!(rejected("address").code, ErrorCode::UnknownFunction);
}

#[test]
fn unknown_functions() {
    let unknown = |name: &str| {
        QueryError::new(
            ErrorCode::UnknownFunction,
            format!("unknown function '{name}'"),
        )
    };
    assert_eq!(
        rejected("msys.audit.connection(\"60,1\")"),
        unknown("msys.audit.connection")
    );
    assert_eq!(rejected("print()"), unknown("print"));
    assert_eq!(rejected("ac:session_count()"), unknown("ac:session_count"));
    assert_eq!(
        rejected("audit_service(\"SMTP\")"),
        unknown("audit_service")
    );
    assert_eq!(
        rejected("ec_ip_connection \"0\""),
        unknown("ec_ip_connection")
    );
    assert_eq!(rejected("foo"), unknown("foo"));
    assert_eq!(rejected("foo;"), unknown("foo"));
}

#[test]
fn malformed_calls() {
    let cases = [
        (
            "msys.audit.inbound_session_count(",
            "expected value at byte 33",
        ),
        (
            "msys.audit.inbound_session_count(\"/24\"",
            "expected ',' or ')' at byte 38",
        ),
        (
            "msys.audit.inbound_session_count(\"/24\",)",
            "expected value at byte 39",
        ),
        (
            "msys.audit.inbound_session_count \"/24\"",
            "expected '(' after 'msys.audit.inbound_session_count' at byte 33",
        ),
        (
            "msys.audit.inbound_session_count",
            "expected '(' after 'msys.audit.inbound_session_count' at byte 32",
        ),
        ("msys.audit.(\"x\")", "expected name after '.' at byte 11"),
        ("ac:(\"x\")", "expected method name after ':' at byte 3"),
        ("ac:a:b()", "expected '(' after 'ac:a' at byte 4"),
        ("foo bar baz(", "expected value at byte 4"),
        (
            "ac:inbound_session_count() extra",
            "expected end of request at byte 27",
        ),
        (
            "ac:inbound_session_count();;",
            "expected end of request at byte 27",
        ),
        (
            "ac:inbound_session_count(); ac:inbound_session_count()",
            "expected end of request at byte 28",
        ),
        ("(\"x\")", "expected function name at byte 0"),
        ("\"/24\"", "expected function name at byte 0"),
        ("@10.0.0.1 42", "expected function name at byte 10"),
        (
            "audit_service \"SMTP\" \"/24",
            "unterminated string starting at byte 21",
        ),
        ("audit_service \"SMTP\" {{{", "expected '}' at byte 24"),
    ];
    for (text, message) in cases {
        assert_eq!(rejected(text), syntax(message), "{text}");
    }
}

#[test]
fn argument_type_errors() {
    let cases = [
        ("msys.audit.inbound_session_count(24)", "msys.audit.inbound_session_count: argument 1 (cidr) must be a string or nil, got integer"),
        ("msys.audit.inbound_session_count({cidr='/24'})", "msys.audit.inbound_session_count: argument 1 (cidr) must be a string or nil, got table"),
        ("msys.audit.inbound_session_count(nil, true)", "msys.audit.inbound_session_count: argument 2 (servicename) must be a string or nil, got boolean"),
        ("msys.audit.inbound_session_count([\"/24\"])", "msys.audit.inbound_session_count: argument 1 (cidr) must be a string or nil, got string list"),
        ("msys.audit.inbound_session_count(nil, nil, nil)", "msys.audit.inbound_session_count takes at most 2 arguments (cidr, servicename), got 3"),
        ("ac:inbound_session_count('/24', 'SMTP', 'x')", "ac:inbound_session_count takes at most 2 arguments (cidr, service_type), got 3"),
        ("ac:inbound_session_count(false)", "ac:inbound_session_count: argument 1 (cidr) must be a string or nil, got boolean"),
        ("audit_connections_on_service \"/24\" \"/16\"", "audit_connections_on_service takes at most 1 argument (cidr), got 2"),
        ("audit_connections_on_service [\"/24\", \"/16\"]", "audit_connections_on_service: argument 1 (cidr) must be a single string, got a string list of 2"),
        ("audit_connections_on_listener nil", "audit_connections_on_listener: argument 1 (cidr) must be a string, got nil"),
        ("audit_connections_on_listener 24", "audit_connections_on_listener: argument 1 (cidr) must be a string, got integer"),
        ("audit_service", "audit_service: argument 1 (service) is required"),
        ("audit_service \"SMTP\" {}", "audit_service: argument 2 (cidr) must be a string, got table"),
        ("audit_service \"SMTP\" \"/24\" \"x\"", "audit_service takes at most 2 arguments (service, cidr), got 3"),
    ];
    for (text, message) in cases {
        assert_eq!(rejected(text), syntax(message), "{text}");
    }
}

#[test]
fn bad_cidr_arguments() {
    assert_eq!(
        rejected("msys.audit.inbound_session_count(\"10.0.0.1/33\")"),
        QueryError::new(
            ErrorCode::BadCidr,
            "bad cidr \"10.0.0.1/33\": prefix length 33 is out of range for IPv4 (0 to 32)"
        )
    );
    assert_eq!(
        rejected("audit_connections_on_service \"\""),
        QueryError::new(
            ErrorCode::BadCidr,
            "empty cidr: expected \"/N\", \"addr/mask\" or \"addr\""
        )
    );
    assert_eq!(
        rejected("ac:inbound_session_count(\" /24\")"),
        QueryError::new(
            ErrorCode::BadCidr,
            "bad cidr \" /24\": whitespace and control characters are not allowed"
        )
    );
}

#[test]
fn no_client_surfaces_when_resolving() {
    let request = parse("audit_connections_on_service \"/24\"");
    let Query::SessionCount { cidr, .. } = request.query else {
        panic!("a session count")
    };
    assert_eq!(
        cidr.resolve(request.client.map(|client| client.ip)),
        Err(QueryError::new(
            ErrorCode::NoClient,
            "no client address: prefix the request with @IP"
        ))
    );
    let request = parse("@::ffff:203.0.113.9 audit_connections_on_service \"/24\"");
    let Query::SessionCount { cidr, .. } = request.query else {
        panic!("a session count")
    };
    assert_eq!(
        cidr.resolve(request.client.map(|client| client.ip)),
        Ok("203.0.113.0/24".parse().unwrap())
    );
}

#[test]
fn framing_errors() {
    assert_eq!(
        parse_request(b"audit_service \"SMTP\" \"\xff\""),
        Err(syntax("request is not valid UTF-8"))
    );
    assert_eq!(
        parse_request(b"audit_service \"SM\0TP\""),
        Err(syntax("NUL byte in request at byte 17"))
    );
    assert_eq!(
        parse_request(b"ac:inbound_session_count()\r"),
        Err(syntax("carriage return in request: end lines with LF only"))
    );
    assert_eq!(
        parse_request(b"ac:inbound_session_count()\nac:inbound_session_count()"),
        Err(syntax(
            "line feed inside request: send one request per line"
        ))
    );
    assert_eq!(parse_request(b""), Err(syntax("empty request")));
    assert_eq!(parse_request(b" \t  "), Err(syntax("empty request")));
}

#[test]
fn length_limit() {
    let call = "audit_service \"SMTP\"";
    let mut longest = " ".repeat(MAX_REQUEST_LEN - call.len());
    longest.push_str(call);
    assert_eq!(longest.len(), MAX_REQUEST_LEN);
    assert_eq!(
        parse(&longest),
        session_count(CidrArg::Client, named("SMTP"))
    );
    let too_long = format!(" {longest}");
    assert_eq!(
        parse_request(too_long.as_bytes()),
        Err(QueryError::new(
            ErrorCode::TooLong,
            "request is 4097 bytes, longer than the 4096-byte limit"
        ))
    );
    // The limit comes first, even for a line that is not UTF-8.
    assert_eq!(
        parse_request(&[0xff; MAX_REQUEST_LEN + 1]).map_err(|error| error.code),
        Err(ErrorCode::TooLong)
    );
}

#[test]
fn hostile_arguments() {
    let deep = format!("msys.audit.inbound_session_count({})", "{".repeat(100_000));
    assert_eq!(
        parse_request(deep.as_bytes()),
        Err(QueryError::new(
            ErrorCode::TooLong,
            "request is 100034 bytes, longer than the 4096-byte limit"
        ))
    );
    let deep = format!("msys.audit.inbound_session_count({})", "{".repeat(4000));
    assert_eq!(rejected(&deep), syntax("nesting deeper than 32 at byte 65"));
    assert_eq!(
        rejected("msys.audit.inbound_session_count(99999999999999999999)"),
        syntax("number out of range at byte 33")
    );
    assert_eq!(
        rejected("msys.audit.inbound_session_count(1.5)"),
        syntax("only integers are supported at byte 33")
    );
    assert_eq!(
        rejected("msys.audit.inbound_session_count(\"/24)"),
        syntax("unterminated string starting at byte 33")
    );
    assert_eq!(
        rejected("audit_service \"\\q\""),
        syntax("unknown escape '\\q' at byte 15")
    );
}

#[test]
fn escapes_reach_the_arguments() {
    assert_eq!(
        parse(r#"msys.audit.inbound_session_count("\x2f\50\z   4", "S\x4dTP")"#),
        session_count(CidrArg::ClientPrefix(24), named("SMTP"))
    );
}

/// Text made mostly of the protocol's own punctuation, so the generator
/// reaches deep into the grammar instead of failing at byte 0.
fn request_like_text() -> impl Strategy<Value = String> {
    let fragments = prop::sample::select(vec![
        "msys.audit.inbound_session_count",
        "ac:inbound_session_count",
        "audit_service",
        "audit_connections_on_listener",
        "@10.0.0.1:25 ",
        "@[::1] ",
        "(",
        ")",
        ",",
        ";",
        "{",
        "}",
        "[",
        "]",
        "=",
        "\"",
        "'",
        "\\",
        "\\x",
        "\\z",
        "\\999",
        "/24",
        "10.0.0.0/8",
        "::ffff:1.2.3.4",
        "nil",
        "true",
        "-",
        "0x",
        "99999999999999999999",
        "1.5",
        " ",
        "\t",
        "é",
    ]);
    prop::collection::vec(fragments, 0..40).prop_map(|parts| parts.concat())
}

proptest! {
    #[test]
    fn parse_request_never_panics_on_bytes(line in prop::collection::vec(any::<u8>(), 0..5000)) {
        let _ = parse_request(&line);
    }

    #[test]
    fn parse_request_never_panics_on_near_requests(text in request_like_text()) {
        let _ = parse_request(text.as_bytes());
    }

    #[test]
    fn every_outcome_fits_one_reply_line(text in request_like_text()) {
        if let Err(error) = parse_request(text.as_bytes()) {
            let line = crate::serving::protocol::Reply::from(error).to_line();
            prop_assert!(line.ends_with('\n'));
            prop_assert_eq!(line.matches('\n').count(), 1);
        }
    }
}
