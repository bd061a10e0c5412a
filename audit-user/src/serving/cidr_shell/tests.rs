//! The grammar's forms and errors, and the examples of Momentum's cidr_cli
//! page (docs/web-momo4/cluster.cidr_server.md) answered as it shows them.
//! Momentum's series `spam` and `virus` are played by `rejections` and
//! `receptions` of a daily monitor; its dates by the monitor's windows
//! (`since` a day: the windows from then, `on` a day: that window).

use std::{collections::HashMap, time::Duration};

use super::*;
use crate::{
    config::Config,
    counting::state::SharedState,
    domain::ServicePorts,
    serving::{command::execute, protocol::parse_request},
};

const DAY: u64 = 86_400;
/// 2008-04-25 00:00 UTC plus an hour: "today" is window 0, 04-24 window 1.
const NOW: u64 = 1_209_081_600 + 3600;

fn state() -> SharedState {
    let config = Config {
        services: vec![
            ServicePorts {
                name: "SMTP".into(),
                ports: vec![25],
            },
            ServicePorts {
                name: "Submission".into(),
                ports: vec![587],
            },
        ],
        monitors: vec!["86400,7".parse().unwrap()],
        ..Config::default()
    };
    SharedState::new(
        config,
        HashMap::from([("SMTP".to_string(), 0u8), ("Submission".to_string(), 1u8)]),
    )
}

fn ask(state: &SharedState, line: &str) -> String {
    match parse_request(line.as_bytes()) {
        Ok(request) => execute(&request, state, Duration::from_secs(NOW)).to_line(),
        Err(error) => crate::serving::protocol::Reply::Error(error).to_line(),
    }
}

fn record(state: &SharedState, series: Series, ip: &str, n: u64, days_ago: u64) {
    state.lock_monitors().record(
        series,
        ip.parse().unwrap(),
        n,
        Duration::from_secs(NOW - days_ago * DAY),
    );
}

/// The page's data: spam and virus today (examples 1 and 2), and on the
/// previous day (examples 3 and 4).
fn momentum_state() -> SharedState {
    let state = state();
    let spam = [
        ("10.79.18.1", 35217),
        ("10.79.18.2", 25350),
        ("10.79.18.3", 21291),
        ("10.79.18.4", 21183),
        ("10.79.18.5", 20933),
        ("10.79.18.6", 21322),
        ("10.79.18.14", 21236),
        ("10.79.18.24", 21222),
        ("10.79.18.30", 21374),
        ("10.79.18.50", 21271),
        ("10.79.18.57", 21335),
        ("10.79.18.61", 21381),
        ("10.79.18.63", 21179),
        ("10.79.18.64", 12183),
        ("10.79.18.130", 5),
        ("127.0.0.1", 2),
    ];
    let virus = [
        ("10.79.18.1", 1264),
        ("10.79.18.61", 3421),
        ("10.79.18.57", 8760),
        ("10.79.18.50", 16437),
        ("10.79.18.24", 8790),
    ];
    // The previous day first: a monitor records into its newest window.
    record(&state, Series::Rejections, "10.79.18.1", 10000, 1);
    record(&state, Series::Receptions, "10.79.18.1", 4071, 1);
    record(&state, Series::Rejections, "10.79.18.2", 4421, 1);
    for (ip, n) in spam {
        record(&state, Series::Rejections, ip, n, 0);
    }
    for (ip, n) in virus {
        record(&state, Series::Receptions, ip, n, 0);
    }
    state
}

fn lines(reply: &str) -> Vec<&str> {
    let mut lines = reply.lines();
    let head = lines.next().unwrap();
    let n: usize = head
        .strip_prefix("OK ")
        .unwrap_or_else(|| panic!("{reply}"))
        .parse()
        .unwrap();
    let rest: Vec<&str> = lines.collect();
    assert_eq!(rest.len(), n, "{reply}");
    rest
}

#[test]
fn example_1_every_ip_in_cidr_order() {
    let state = momentum_state();
    // Momentum: show count for 0.0.0.0/0 in spam since 20080423
    let reply = ask(&state, "show count for 0.0.0.0/0 in rejections");
    let rows = lines(&reply);
    assert_eq!(rows.len(), 16);
    assert_eq!(
        rows[..3],
        [
            "10.79.18.1/32 : 35217",
            "10.79.18.2/32 : 25350",
            "10.79.18.3/32 : 21291"
        ]
    );
    assert_eq!(
        rows[12..],
        [
            "10.79.18.63/32 : 21179",
            "10.79.18.64/32 : 12183",
            "10.79.18.130/32 : 5",
            "127.0.0.1/32 : 2"
        ]
    );
    // The dated form itself is refused: there is no dated history.
    assert!(ask(
        &state,
        "show count for 0.0.0.0/0 in rejections since 20080423"
    )
    .starts_with("ERR no_history "));
}

#[test]
fn example_2_top_ten_of_two_series() {
    let state = momentum_state();
    // Momentum: show count for 0.0.0.0/0 in spam, virus since 20080423 order by count limit 10
    let reply = ask(
        &state,
        "show count for 0.0.0.0/0 in rejections, receptions order by count limit 10",
    );
    assert_eq!(
        lines(&reply),
        [
            "10.79.18.1/32 : 35217,1264",
            "10.79.18.2/32 : 25350,0",
            "10.79.18.61/32 : 21381,3421",
            "10.79.18.30/32 : 21374,0",
            "10.79.18.57/32 : 21335,8760",
            "10.79.18.6/32 : 21322,0",
            "10.79.18.3/32 : 21291,0",
            "10.79.18.50/32 : 21271,16437",
            "10.79.18.14/32 : 21236,0",
            "10.79.18.24/32 : 21222,8790",
        ]
    );
}

#[test]
fn example_3_top_slash_24_of_a_union_on_a_day() {
    let state = momentum_state();
    // Momentum: show count for 0.0.0.0/0 in union(spam, virus) on 20080424 cidrsize 24 order by count limit 1
    let reply = ask(
        &state,
        "show count for 0.0.0.0/0 in union(rejections@1, receptions@1) cidrsize 24 order by count limit 1",
    );
    assert_eq!(lines(&reply), ["10.79.18.0/24 : 18492"]);
}

#[test]
fn example_4_breakdown_of_that_slash_24() {
    let state = momentum_state();
    // Momentum: show count for 10.79.18.0/24 in union(spam, virus) on 20080424
    let reply = ask(
        &state,
        "show count for 10.79.18.0/24 in union(rejections@1, receptions@1)",
    );
    assert_eq!(
        lines(&reply),
        ["10.79.18.1/32 : 14071", "10.79.18.2/32 : 4421"]
    );
}

#[test]
fn sessions_per_service_and_prefix_sizes() {
    let state = state();
    {
        let mut sessions = state.write_sessions();
        let mut tally = crate::counting::state::Tally::new();
        for (slot, ip, n) in [
            (0u8, "192.0.2.1", 3u64),
            (0, "192.0.2.200", 1),
            (0, "198.51.100.7", 2),
            (1, "192.0.2.1", 5),
            (0, "2001:db8:1:2::9", 4),
            (0, "2001:db8:1:3::9", 1),
        ] {
            tally.insert((slot, ip.parse().unwrap()), n);
        }
        sessions.load(&tally);
    }
    assert_eq!(
        lines(&ask(
            &state,
            "show count for 0.0.0.0/0 in sessions.SMTP, sessions.submission cidrsize 24"
        )),
        ["192.0.2.0/24 : 4,5", "198.51.100.0/24 : 2,0"]
    );
    assert_eq!(
        lines(&ask(
            &state,
            "show count for 0.0.0.0/0 in sessions order by count"
        )),
        [
            "192.0.2.1/32 : 8",
            "198.51.100.7/32 : 2",
            "192.0.2.200/32 : 1"
        ]
    );
    assert_eq!(
        lines(&ask(
            &state,
            "show count for 0.0.0.0/0 in sessions cidrsize 8 to 9 threshold 3"
        )),
        ["192.0.0.0/8 : 9", "192.0.0.0/9 : 9"]
    );
    assert_eq!(
        lines(&ask(
            &state,
            "show count for ::/0 in sessions.SMTP cidrsize 64"
        )),
        ["2001:db8:1:2::/64 : 4", "2001:db8:1:3::/64 : 1"]
    );
    assert_eq!(
        lines(&ask(
            &state,
            "show count for ::/0 in sessions.SMTP cidrsize 48"
        )),
        ["2001:db8:1::/48 : 5"]
    );
    assert_eq!(
        lines(&ask(
            &state,
            "show count for [2001:db8::]/32 in sessions limit 1"
        )),
        ["2001:db8:1:2::9/128 : 4"]
    );
    // Host bits of the cidr are ignored; no rows is OK 0.
    assert_eq!(
        ask(&state, "show count for 10.1.2.3/8 in sessions"),
        "OK 0\n"
    );
}

#[test]
fn errors_have_their_codes() {
    let state = state();
    let code = |line: &str| {
        let reply = ask(&state, line);
        reply
            .strip_prefix("ERR ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("{line}: {reply}"))
            .to_string()
    };
    assert_eq!(code("show count for 0.0.0.0/0 in spam"), "unknown_series");
    assert_eq!(code("show count for 0.0.0.0/33 in sessions"), "bad_cidr");
    assert_eq!(code("show count for 10.0.0.1 in sessions"), "bad_cidr");
    assert_eq!(
        code("show count for 10.0.0.0/16 in sessions cidrsize 8"),
        "bad_cidr"
    );
    assert_eq!(
        code("show count for 10.0.0.0/16 in sessions cidrsize 24 to 40"),
        "bad_cidr"
    );
    assert_eq!(
        code("show count for 0.0.0.0/0 in sessions.IMAP"),
        "unknown_service"
    );
    assert_eq!(
        code("show count for 0.0.0.0/0 in receptions.3"),
        "unknown_monitor"
    );
    assert_eq!(
        code("show count for 0.0.0.0/0 in sessions on 20080424"),
        "no_history"
    );
    assert_eq!(
        code("show count for 0.0.0.0/0 in sessions aggregate daily"),
        "no_history"
    );
    assert_eq!(code("show count for 0.0.0.0/0 in sessions@1"), "syntax");
    assert_eq!(code("show count for 0.0.0.0/0 in union(sessions"), "syntax");
    assert_eq!(
        code("show count for 0.0.0.0/0 in sessions order by size"),
        "syntax"
    );
    assert_eq!(code("show count for 0.0.0.0/0 sessions"), "syntax");
    assert_eq!(
        code("show count for 0.0.0.0/0 in sessions limit ten"),
        "syntax"
    );
    assert_eq!(code("show available now"), "syntax");
    let unmonitored = SharedState::new(Config::default(), HashMap::from([("SMTP".into(), 0)]));
    assert!(ask(&unmonitored, "show count for 0.0.0.0/0 in receptions")
        .starts_with("ERR not_configured "));
    // `show <ip>` is still the console's show.
    assert!(ask(&state, "show 10.0.0.1").starts_with("OK "));
}

#[test]
fn available_lists_every_series() {
    let state = state();
    assert_eq!(
        lines(&ask(&state, "show available")),
        [
            "sessions : live, every service",
            "sessions.SMTP : live",
            "sessions.Submission : live",
            "connections.0 : monitor \"86400,7\" @0-7 : 20080418T000000 => 20080425T010000",
            "receptions.0 : monitor \"86400,7\" @0-7 : 20080418T000000 => 20080425T010000",
            "rejections.0 : monitor \"86400,7\" @0-7 : 20080418T000000 => 20080425T010000",
            "refusals.0 : monitor \"86400,7\" @0-7 : 20080418T000000 => 20080425T010000",
        ]
    );
}

#[test]
fn series_parse_to_their_parts() {
    let Some(Ok(CidrShell::Count(request))) = parse(
        "show count for 10.0.0.0/8 in union(receptions.1@2-0, sessions.SMTP) cidrsize 24 to 16",
    ) else {
        panic!("parses");
    };
    assert!(request.union);
    assert_eq!(request.sizes, Some((16, 24)));
    assert_eq!(request.limit, MAX_ROWS);
    assert_eq!(
        request.series,
        [
            SeriesRef::Monitored {
                series: Series::Receptions,
                monitor: 1,
                first: 0,
                last: 2
            },
            SeriesRef::Sessions(Some("SMTP".into()))
        ]
    );
    assert_eq!(request.series[0].to_string(), "receptions.1@0-2");
    assert!(parse("show 10.0.0.1").is_none());
    assert!(parse("stats").is_none());
}
