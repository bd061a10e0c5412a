//! End to end, as root: the agent is SIGKILLed at random moments while clients
//! from many sources connect and close (FIN or RST); after each restart it takes
//! over the pinned kernel state, and at the end its counts equal what sock_diag
//! reports, exactly.

use std::{
    net::{IpAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use integration_tests::{
    connect_from, eventually, require_ebpf, reset, sock_diag_count, SmtpFixture,
};

/// A small deterministic generator: the test must not need a crate for this,
/// and a fixed seed makes a failure reproducible.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const SOURCES: u8 = 40;

fn source(i: u8) -> IpAddr {
    IpAddr::from([127, 0, 10 + i / 20, 1 + i % 20])
}

#[test]
fn counts_survive_repeated_sigkill_of_the_agent_during_churn() {
    require_ebpf!();
    let mut fixture = SmtpFixture::start(
        env!("CARGO_BIN_EXE_test-server"),
        "chaos",
        &["--reconcile-interval", "1"],
    );
    let SmtpFixture {
        agent,
        server,
        cgroup,
        smtp,
    } = &mut fixture;
    let smtp = *smtp;

    let churning = Arc::new(AtomicBool::new(true));
    let churn = {
        let churning = churning.clone();
        std::thread::spawn(move || {
            let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
            let mut held: Vec<TcpStream> = Vec::new();
            let mut cycles = 0u64;
            while churning.load(Ordering::Relaxed) {
                if held.len() < 150 && rng.below(3) != 0 {
                    held.push(connect_from(source(rng.below(SOURCES as u64) as u8), smtp));
                } else if !held.is_empty() {
                    let victim = held.swap_remove(rng.below(held.len() as u64) as usize);
                    if rng.below(2) == 0 {
                        drop(victim);
                    } else {
                        reset(victim);
                    }
                    cycles += 1;
                }
            }
            (held, cycles)
        })
    };

    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut kills = 0;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100 + rng.below(500)));
        agent.kill();
        kills += 1;
        std::thread::sleep(Duration::from_millis(rng.below(200)));
        agent.start_again();
    }
    churning.store(false, Ordering::Relaxed);
    let (held, cycles) = churn.join().unwrap();
    assert!(
        kills >= 8 && cycles >= 200,
        "too little chaos: {kills} kills, {cycles} closes"
    );

    // The server closes its side of FIN-closed sessions as it reads EOF, so
    // the kernel's truth settles right away; then every count must match it.
    let all: ipnet::IpNet = "127.0.0.0/8".parse().unwrap();
    eventually("the agent agrees with sock_diag on every source", || {
        let truth_total = sock_diag_count(&server.ports, cgroup, &all);
        let total = agent.query("audit_service \"SMTP\" \"127.0.0.0/8\"");
        total == format!("OK {truth_total}")
            && (0..SOURCES).all(|i| {
                let ip = source(i);
                let truth =
                    sock_diag_count(&server.ports, cgroup, &format!("{ip}/32").parse().unwrap());
                agent.query(&format!("audit_service \"SMTP\" \"{ip}\"")) == format!("OK {truth}")
            })
    });
    assert_eq!(
        agent.query("audit_service \"SMTP\" \"127.0.0.0/8\""),
        format!("OK {}", held.len()),
        "after {kills} kills and {cycles} closes"
    );
    drop(held);
    agent.expect_count("127.0.0.0/8", "SMTP", 0);
    assert_eq!(sock_diag_count(&server.ports, cgroup, &all), 0);
}
