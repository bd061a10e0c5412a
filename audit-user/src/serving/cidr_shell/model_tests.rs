//! `show count` against a brute-force model: every order, size, series mix,
//! limit and threshold answered from a few thousand IPs equals what the model
//! computes from the raw entries, whichever path (the direct listings or the
//! chunked walk, with a tiny [`super::CHUNK`] in tests) the agent took.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use ipnet::IpNet;

use crate::{
    config::Config,
    counting::state::{SharedState, Tally},
    domain::{Series, ServicePorts},
    serving::{command::execute, protocol::parse_request},
};

const NOW: u64 = 1_700_000_000;
const W: u64 = 3600;

/// (service slot, IP, sessions) and (series, IP, n, windows ago).
struct Model {
    sessions: Vec<(u8, IpAddr, u64)>,
    events: Vec<(Series, IpAddr, u64, u64)>,
}

/// splitmix64, so the data set is the same on every run.
fn next(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn build() -> (SharedState, Model) {
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
        monitors: vec![format!("{W},4").parse().unwrap()],
        ..Config::default()
    };
    let state = SharedState::new(
        config,
        HashMap::from([("SMTP".to_string(), 0u8), ("Submission".to_string(), 1u8)]),
    );
    let mut seed = 14;
    let mut ips: Vec<IpAddr> = Vec::new();
    for _ in 0..2500 {
        let r = next(&mut seed);
        // Dense v4 in a few /16s, and v6 over a few /48s and /64s.
        ips.push(if r.is_multiple_of(5) {
            let a = 0x2001_0db8_0000_0000_0000_0000_0000_0000u128
                | (u128::from((r >> 8) % 3) << 80)
                | (u128::from((r >> 12) % 7) << 64)
                | u128::from((r >> 16) % 50);
            IpAddr::from(a.to_be_bytes())
        } else {
            IpAddr::from(
                (0x0a00_0000u32 | (((r >> 8) as u32 % 3) << 16) | ((r >> 20) as u32 % 4096))
                    .to_be_bytes(),
            )
        });
    }
    let mut tally = Tally::new();
    for (i, &ip) in ips.iter().enumerate() {
        let r = next(&mut seed);
        if i % 3 != 2 {
            *tally.entry(((r % 2) as u8, ip)).or_default() += r % 7 + 1;
        }
        if r.is_multiple_of(4) {
            // A few counts past the trie's saturated bound.
            *tally.entry((0, ip)).or_default() += 300 + r % 5;
        }
    }
    state.write_sessions().load(&tally);
    let mut events = Vec::new();
    for &ip in &ips {
        let r = next(&mut seed);
        if r.is_multiple_of(3) {
            continue;
        }
        let series = Series::ALL[(r % 3) as usize];
        let ago = (r >> 8) % 4;
        let n = (r >> 16) % 9 + 1;
        events.push((series, ip, n, ago));
    }
    // Oldest first: a monitor records into its newest window.
    events.sort_by_key(|&(_, _, _, ago)| std::cmp::Reverse(ago));
    for &(series, ip, n, ago) in &events {
        state
            .lock_monitors()
            .record(series, ip, n, Duration::from_secs(NOW - ago * W));
    }
    let sessions = tally.into_iter().map(|((s, ip), n)| (s, ip, n)).collect();
    (state, Model { sessions, events })
}

#[derive(Clone, Copy)]
enum S {
    Sessions(Option<u8>),
    Windows(Series, u64, u64),
}

impl S {
    fn name(self) -> String {
        match self {
            S::Sessions(None) => "sessions".into(),
            S::Sessions(Some(0)) => "sessions.SMTP".into(),
            S::Sessions(Some(_)) => "sessions.Submission".into(),
            S::Windows(series, a, b) => format!("{}.0@{a}-{b}", series.name()),
        }
    }

    /// Each IP's contribution.
    fn per_ip(self, model: &Model) -> HashMap<IpAddr, u64> {
        let mut out = HashMap::new();
        match self {
            S::Sessions(slot) => {
                for &(s, ip, n) in &model.sessions {
                    if slot.is_none_or(|slot| slot == s) {
                        *out.entry(ip).or_default() += n;
                    }
                }
            }
            S::Windows(series, a, b) => {
                for &(s, ip, n, ago) in &model.events {
                    if s == series && (a..=b).contains(&ago) {
                        *out.entry(ip).or_default() += n;
                    }
                }
            }
        }
        out
    }
}

#[allow(clippy::too_many_arguments)]
fn model_answer(
    model: &Model,
    cidr: IpNet,
    series: &[S],
    union: bool,
    sizes: (u8, u8),
    by_count: bool,
    limit: usize,
    threshold: u64,
) -> Vec<String> {
    let columns: Vec<HashMap<IpNet, u64>> = series
        .iter()
        .map(|s| {
            let mut sums = HashMap::new();
            for (ip, n) in s.per_ip(model) {
                let same = matches!(
                    (cidr, ip),
                    (IpNet::V4(_), IpAddr::V4(_)) | (IpNet::V6(_), IpAddr::V6(_))
                );
                if !same || !cidr.contains(&ip) || n == 0 {
                    continue;
                }
                for len in sizes.0..=sizes.1 {
                    *sums
                        .entry(IpNet::new(ip, len).unwrap().trunc())
                        .or_default() += n;
                }
            }
            sums
        })
        .collect();
    let nets: std::collections::BTreeSet<IpNet> =
        columns.iter().flat_map(|c| c.keys().copied()).collect();
    let mut rows: Vec<(IpNet, Vec<u64>)> = nets
        .into_iter()
        .map(|net| {
            let row: Vec<u64> = columns
                .iter()
                .map(|c| c.get(&net).copied().unwrap_or(0))
                .collect();
            (net, if union { vec![row.iter().sum()] } else { row })
        })
        .filter(|(_, row)| row[0] >= threshold)
        .collect();
    if by_count {
        rows.sort_by(|a, b| b.1[0].cmp(&a.1[0]).then(a.0.cmp(&b.0)));
    }
    rows.truncate(limit);
    rows.into_iter()
        .map(|(net, row)| {
            let counts: Vec<String> = row.iter().map(u64::to_string).collect();
            format!("{net} : {}", counts.join(","))
        })
        .collect()
}

fn ask(state: &SharedState, line: &str) -> Vec<String> {
    let request = parse_request(line.as_bytes()).unwrap_or_else(|e| panic!("{line}: {e:?}"));
    let reply = execute(&request, state, Duration::from_secs(NOW));
    match reply {
        crate::serving::protocol::Reply::Lines(lines) => lines,
        other => panic!("{line}: {}", other.to_line()),
    }
}

#[test]
fn every_form_matches_the_model() {
    let (state, model) = build();
    let mixes: Vec<(Vec<S>, bool)> = vec![
        (vec![S::Sessions(Some(0))], false),
        (vec![S::Sessions(None)], false),
        (
            vec![
                S::Sessions(Some(0)),
                S::Windows(Series::Connections, 0, 0),
                S::Windows(Series::Receptions, 0, 0),
            ],
            false,
        ),
        (
            vec![S::Windows(Series::Connections, 0, 0), S::Sessions(Some(1))],
            false,
        ),
        (
            vec![S::Windows(Series::Rejections, 1, 3), S::Sessions(Some(0))],
            false,
        ),
        (vec![S::Windows(Series::Receptions, 2, 2)], false),
        (
            vec![S::Sessions(Some(0)), S::Windows(Series::Receptions, 0, 2)],
            true,
        ),
    ];
    let v4 = [(32, 32), (24, 24), (28, 28), (16, 24)];
    let v6 = [(128, 128), (64, 64), (48, 48), (56, 64)];
    let mut checked = 0;
    for (cidr, sizes) in [
        ("0.0.0.0/0", &v4),
        ("10.1.0.0/16", &v4),
        ("::/0", &v6),
        ("2001:db8::/32", &v6),
    ] {
        let net: IpNet = cidr.parse().unwrap();
        for (mix, union) in &mixes {
            let names: Vec<String> = mix.iter().map(|s| s.name()).collect();
            let list = if *union {
                format!("union({})", names.join(", "))
            } else {
                names.join(", ")
            };
            for &size in sizes {
                for by_count in [true, false] {
                    for (limit, threshold) in [(1, 0), (15, 0), (10_000, 0), (15, 3), (15, 400)] {
                        let range = if size.0 == size.1 {
                            format!("cidrsize {}", size.0)
                        } else {
                            format!("cidrsize {} to {}", size.0, size.1)
                        };
                        let order = if by_count {
                            "order by count"
                        } else {
                            "order by cidr"
                        };
                        let line = format!(
                            "show count for {cidr} in {list} {range} {order} limit {limit} threshold {threshold}"
                        );
                        let want = model_answer(
                            &model, net, mix, *union, size, by_count, limit, threshold,
                        );
                        assert_eq!(ask(&state, &line), want, "{line}");
                        checked += 1;
                    }
                }
            }
        }
    }
    assert_eq!(checked, 4 * 7 * 4 * 2 * 5);
}
