//! Tests of the monitors: windows, ranges against per-window sums, expiry and retirement.

use super::*;

fn at(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn net(text: &str) -> IpNet {
    text.parse().unwrap()
}

fn spec(text: &str) -> MonitorSpec {
    text.parse().unwrap()
}

#[test]
fn specs_parse_and_print() {
    assert_eq!(
        spec("300,6"),
        MonitorSpec {
            window_secs: 300,
            kept: 6
        }
    );
    assert_eq!(spec(" 60 , 1 ").to_string(), "60,1");
    for bad in ["", "60", "0,1", "60,0", "x,1", "60,-1", "60,1,2"] {
        assert!(bad.parse::<MonitorSpec>().is_err(), "{bad}");
    }
}

#[test]
fn windows_align_roll_and_sum() {
    let mut monitors = Monitors::new(&[spec("60,2")], 1000);
    // 119 s is window 1 (60..120); 120 s starts window 2.
    monitors.record(Series::Connections, ip("10.0.0.1"), 1, at(119));
    monitors.record(Series::Connections, ip("10.0.0.2"), 2, at(120));
    monitors.record(Series::Connections, ip("10.0.1.1"), 4, at(179));
    let m = monitors.by_key("60,2").unwrap();
    assert_eq!(
        m.sum(Series::Connections, &net("10.0.0.0/16"), 0, 0, at(179)),
        6
    );
    assert_eq!(
        m.sum(Series::Connections, &net("10.0.0.0/24"), 0, 0, at(179)),
        2
    );
    assert_eq!(
        m.sum(Series::Connections, &net("10.0.0.0/24"), 1, 1, at(179)),
        1
    );
    assert_eq!(
        m.sum(Series::Connections, &net("10.0.0.0/24"), 0, 1, at(179)),
        3
    );
    // Rolled over by time alone: what was current is now window 1.
    assert_eq!(
        m.sum(Series::Connections, &net("10.0.0.0/16"), 0, 0, at(185)),
        0
    );
    assert_eq!(
        m.sum(Series::Connections, &net("10.0.0.0/16"), 1, 1, at(185)),
        6
    );
    assert_eq!(
        m.sum(Series::Connections, &net("10.0.0.0/16"), 2, 2, at(185)),
        1
    );
    // endv beyond N is clamped; reversed ranges are the same range.
    assert_eq!(
        m.sum(Series::Connections, &net("0.0.0.0/0"), 0, 99, at(185)),
        7
    );
    assert_eq!(
        m.sum(Series::Connections, &net("0.0.0.0/0"), 2, 0, at(185)),
        7
    );
    // Three windows later nothing is left.
    assert_eq!(
        m.sum(Series::Connections, &net("0.0.0.0/0"), 0, 2, at(400)),
        0
    );
    assert_eq!(
        m.sum(Series::Receptions, &net("0.0.0.0/0"), 0, 2, at(185)),
        0
    );
}

/// The sum as the windows alone give it, for comparison.
fn sum_by_windows(
    m: &Monitor,
    series: Series,
    net: &IpNet,
    first: u32,
    last: u32,
    now: Duration,
) -> u64 {
    let (first, last) = (first.min(last), first.max(last).min(m.spec.kept));
    let epoch = m.epoch(now);
    m.windows
        .iter()
        .filter(|w| w.epoch <= epoch && (first as u64..=last as u64).contains(&(epoch - w.epoch)))
        .map(|w| w.series[series.slot()].count(net))
        .sum()
}

/// Every key of the totals equals the sum over held and retiring windows.
fn check_totals(m: &Monitor) {
    for series in Series::ALL {
        let slot = series.slot();
        let held = || m.windows.iter().chain(&m.retiring);
        let keys: usize = held().map(|w| w.series[slot].len()).sum();
        assert!(m.totals[slot].len() <= keys);
        for (ip, count) in m.totals[slot].iter() {
            assert_eq!(count, held().map(|w| w.series[slot].get(ip)).sum::<u64>());
        }
        for w in held() {
            for (ip, _) in w.series[slot].iter() {
                assert_ne!(m.totals[slot].get(ip), 0);
            }
        }
    }
}

#[test]
fn sums_through_the_totals_equal_the_windows_sums() {
    let mut monitors = Monitors::new(&[spec("10,3")], 10_000);
    let nets = [
        net("10.0.0.0/8"),
        net("10.1.0.0/16"),
        net("10.1.2.0/24"),
        net("10.1.2.3/32"),
        net("2001:db8::/64"),
        net("0.0.0.0/0"),
    ];
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut now = 1_000u64;
    for step in 0..3_000 {
        // Mostly a second at a time, sometimes a jump over several windows
        // or back in time by a few seconds.
        now = match next() % 50 {
            0 => now + 25 + next() % 40,
            1 => now.saturating_sub(next() % 15),
            _ => now + next() % 2,
        };
        let r = next();
        let ip = if r % 5 == 0 {
            IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, (r >> 8) as u16 % 4])
        } else {
            IpAddr::from([10, 1, (r >> 8) as u8 % 3, (r >> 16) as u8 % 5])
        };
        let series = Series::ALL[(r >> 24) as usize % 3];
        monitors.record(series, ip, 1 + (r >> 32) % 3, at(now));
        if step % 7 == 0 {
            monitors.expire(at(now));
        }
        let m = monitors.by_position(0).unwrap();
        for series in Series::ALL {
            for net in &nets {
                for first in 0..=4 {
                    for last in first..=5 {
                        assert_eq!(
                            m.sum(series, net, first, last, at(now)),
                            sum_by_windows(m, series, net, first, last, at(now)),
                            "step {step} {series:?} {net} {first}..={last}"
                        );
                    }
                }
            }
        }
        if step % 100 == 0 {
            check_totals(m);
        }
    }
}

#[test]
fn dropped_windows_leave_the_totals_in_batches() {
    let mut monitors = Monitors::new(&[spec("10,3")], 1_000_000);
    let keys = 3 * RETIRE_BATCH + 17;
    for i in 0..keys as u32 {
        let ip = IpAddr::from(std::net::Ipv4Addr::from((10u32 << 24) | i));
        monitors.record(Series::Connections, ip, 2, at(5));
    }
    for secs in [15, 25, 35, 45] {
        monitors.record(Series::Connections, ip("10.0.0.1"), 1, at(secs));
    }
    // At 45 s the window of 5 s left the history; its first batch left
    // the totals. All four windows held are in 0..=3, so the sum is the
    // totals minus what is still retiring.
    let everything = net("0.0.0.0/0");
    {
        let m = monitors.by_position(0).unwrap();
        assert_eq!(m.retiring.len(), 1);
        assert_eq!(m.retiring[0].keys(), keys - RETIRE_BATCH);
        assert_eq!(m.sum(Series::Connections, &everything, 0, 3, at(45)), 4);
        assert_eq!(
            m.sum(Series::Connections, &net("10.0.0.1/32"), 0, 3, at(45)),
            4
        );
        check_totals(m);
    }
    assert!(monitors.retire(RETIRE_BATCH));
    assert!(!monitors.retire(keys));
    let m = monitors.by_position(0).unwrap();
    assert!(m.retiring.is_empty());
    assert_eq!(m.totals[Series::Connections.slot()].len(), 1);
    assert_eq!(m.sum(Series::Connections, &everything, 0, 3, at(45)), 4);
    check_totals(m);
}

#[test]
fn expired_windows_are_freed_without_events() {
    let mut monitors = Monitors::new(&[spec("10,1")], 1000);
    for i in 0..50u8 {
        monitors.record(Series::Receptions, IpAddr::from([10, 0, 0, i]), 1, at(5));
    }
    assert_eq!(monitors.iter().next().unwrap().tracked(), 50);
    monitors.expire(at(15));
    assert_eq!(monitors.iter().next().unwrap().tracked(), 50);
    monitors.expire(at(25));
    let m = monitors.iter().next().unwrap();
    assert_eq!(m.tracked(), 0);
    assert!(m.windows.is_empty());
}

#[test]
fn cap_drops_new_ips_and_counts_them() {
    let mut monitors = Monitors::new(&[spec("60,1")], 2);
    assert_eq!(
        monitors.record(Series::Connections, ip("10.0.0.1"), 1, at(0)),
        1
    );
    assert_eq!(
        monitors.record(Series::Connections, ip("10.0.0.2"), 1, at(0)),
        1
    );
    assert_eq!(
        monitors.record(Series::Connections, ip("10.0.0.3"), 5, at(0)),
        0
    );
    // Known IPs still count.
    assert_eq!(
        monitors.record(Series::Connections, ip("10.0.0.1"), 1, at(0)),
        2
    );
    assert_eq!(monitors.dropped(), 5);
    // Room again once the window expires.
    assert_eq!(
        monitors.record(Series::Connections, ip("10.0.0.3"), 1, at(200)),
        1
    );
}

#[test]
fn v4_mapped_and_ipv6() {
    let mut monitors = Monitors::new(&[spec("60,1"), spec("300,6")], 100);
    assert_eq!(
        monitors.record(Series::Rejections, ip("::ffff:10.0.0.1"), 2, at(0)),
        2
    );
    monitors.record(Series::Rejections, ip("2001:db8::1"), 3, at(0));
    let second = monitors.by_position(1).unwrap();
    assert_eq!(
        second.sum(Series::Rejections, &net("10.0.0.1/32"), 0, 0, at(1)),
        2
    );
    assert_eq!(
        second.sum(Series::Rejections, &net("2001:db8::/64"), 0, 0, at(1)),
        3
    );
    assert!(monitors.by_key("60,2").is_none());
    assert!(monitors.by_key(" 60, 1").is_some());
}

#[test]
fn reconfigure_keeps_surviving_windows() {
    let mut monitors = Monitors::new(&[spec("60,1"), spec("300,6")], 100);
    monitors.record(Series::Receptions, ip("10.0.0.1"), 3, at(10));
    monitors.reconfigure(&[spec("300,6"), spec("10,2")], 50);
    assert!(monitors.by_key("60,1").is_none());
    assert_eq!(monitors.by_position(0).unwrap().spec(), spec("300,6"));
    assert_eq!(
        monitors
            .by_key("300,6")
            .unwrap()
            .sum(Series::Receptions, &net("10.0.0.0/8"), 0, 0, at(20)),
        3
    );
    assert_eq!(monitors.by_key("10,2").unwrap().tracked(), 0);
}

#[test]
fn sums_over_windows_saturate() {
    let window = |epoch, counts: &[(&str, u64)]| {
        let mut w = Window::new(epoch);
        for (address, count) in counts {
            w.series[Series::Connections.slot()].set(ip(address), *count);
        }
        w
    };
    let near = u64::MAX - 1;
    // Two windows of "10,3" at 95 s: epochs 9 and 8, both near u64::MAX.
    let windows = VecDeque::from([
        window(9, &[("10.0.0.1", near), ("10.0.0.2", 5)]),
        window(8, &[("10.0.0.1", near)]),
        window(7, &[("10.0.0.3", 2)]),
    ]);
    let m = Monitor::with_windows(spec("10,3"), windows);
    let all = net("10.0.0.0/24");
    for (first, last) in [(0, 0), (0, 1), (0, 3), (1, 2)] {
        assert_eq!(
            m.sum(Series::Connections, &all, first, last, at(95)),
            u64::MAX,
            "{first}..={last}"
        );
    }
    // Through the totals (most windows in range), still not wrapped.
    assert_eq!(
        m.sum(Series::Connections, &net("10.0.0.3/32"), 0, 3, at(95)),
        2
    );
    assert_eq!(m.sliding(Series::Connections, &all, at(95)), u64::MAX);
}

#[test]
fn sliding_average_weights_the_previous_window() {
    let mut monitors = Monitors::new(&[spec("100,1")], 100);
    monitors.record(Series::Connections, ip("10.0.0.1"), 10, at(50));
    monitors.record(Series::Connections, ip("10.0.0.1"), 4, at(120));
    let m = monitors.by_position(0).unwrap();
    // 25 s into the current window: 4 + 10 * 75/100.
    assert_eq!(
        m.sliding(Series::Connections, &net("10.0.0.1/32"), at(125)),
        12
    );
    assert_eq!(
        m.sliding(Series::Connections, &net("10.0.0.1/32"), at(100)),
        14
    );
    assert_eq!(
        m.sliding(Series::Connections, &net("10.0.0.1/32"), at(199)),
        4
    );
}

#[test]
fn ip_windows_equal_one_window_sums() {
    let mut monitors = Monitors::new(&[spec("60,3")], 1000);
    // Windows 0, 1 and 3 hold counts, 2 is empty, one is older than the history.
    for (secs, n) in [(10, 7), (130, 2), (250, 5), (310, 1), (315, 4)] {
        monitors.record(Series::Receptions, ip("10.0.0.1"), n, at(secs));
    }
    monitors.record(Series::Receptions, ip("10.0.0.2"), 9, at(315));
    let monitor = monitors.by_position(0).unwrap();
    for now in [315, 359, 360, 430, 600, 10_000] {
        for who in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            let mut got = Vec::new();
            monitor.ip_windows(Series::Receptions, ip(who), at(now), &mut got);
            let want: Vec<u64> = (0..=3)
                .map(|k| {
                    monitor.sum(
                        Series::Receptions,
                        &net(&format!("{who}/32")),
                        k,
                        k,
                        at(now),
                    )
                })
                .collect();
            assert_eq!(got, want, "{who} at {now}");
        }
    }
    let mut got = Vec::new();
    monitor.ip_windows(Series::Receptions, ip("10.0.0.1"), at(315), &mut got);
    assert_eq!(got, [5, 5, 0, 2]);
    // Early in the epoch (fewer windows than N since 0): the rest are 0.
    let mut got = Vec::new();
    monitor.ip_windows(Series::Connections, ip("10.0.0.1"), at(30), &mut got);
    assert_eq!(got, [0, 0, 0, 0]);
}
