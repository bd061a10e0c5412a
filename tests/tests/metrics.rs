//! End to end, as root: the agent's `/metrics` endpoint checked by `promtool`,
//! scraped by a real Prometheus server started here on loopback, and the
//! Grafana dashboard's expressions parsed by that server. Skips (saying why)
//! without eBPF, or without Debian's `prometheus` package (`cargo xtask test`
//! installs it).

use std::{
    io::{Read, Write},
    net::{IpAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    connect_from,
    http::{get, sample},
    require_ebpf, SmtpFixture, TempDir,
};

// Fixed loopback ports below 32768 (the ephemeral range), one per use.
const METRICS_PROMTOOL: u16 = 19464;
const METRICS_SCRAPED: u16 = 19465;
const PROMETHEUS_WEB: u16 = 19090;

macro_rules! require_prometheus {
    () => {
        if !has("promtool") || !has("prometheus") {
            eprintln!(
                "SKIPPED (no prometheus/promtool on PATH): install Debian's `prometheus` package \
                 (cargo xtask test does)"
            );
            return;
        }
    };
}

fn has(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn scrape_passes_promtool_and_holds_the_live_counts() {
    require_ebpf!();
    require_prometheus!();
    let listen = format!("127.0.0.1:{METRICS_PROMTOOL}");
    let fixture = SmtpFixture::start(
        env!("CARGO_BIN_EXE_test-server"),
        "metrics-promtool",
        &["--metrics-listen", &listen],
    );
    let _held: Vec<_> = (0..3)
        .map(|_| connect_from(ip("127.0.0.1"), fixture.smtp))
        .chain((0..2).map(|_| connect_from(ip("127.0.0.2"), fixture.smtp)))
        .collect();
    fixture.agent.expect_count("127.0.0.0/24", "SMTP", 5);
    assert_eq!(
        fixture.agent.query("audit_service \"SMTP\" \"10.0.0.0/33\""),
        "ERR bad_cidr bad cidr \"10.0.0.0/33\": prefix length 33 is out of range for IPv4 (0 to 32)"
    );

    let (status, content_type, body) = get(METRICS_PROMTOOL, "/metrics");
    assert!(status.contains(" 200 "), "{status}\n{body}");
    // No Accept header: Prometheus text 0.0.4, which promtool reads.
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let (ok, report) = promtool(&["check", "metrics"], Some(&body));
    assert!(
        ok,
        "promtool check metrics failed:\n{report}\n--- scrape:\n{body}"
    );

    assert_eq!(
        sample(&body, "inbound_audit_sessions{service=\"SMTP\"}"),
        Some(5.0),
        "{body}"
    );
    assert_eq!(sample(&body, "inbound_audit_tracked_ips"), Some(2.0));
    assert_eq!(
        sample(
            &body,
            "inbound_audit_accepted_connections_total{service=\"SMTP\"}"
        ),
        Some(5.0)
    );
    // One /24 holding 5 sessions.
    assert_eq!(
        sample(
            &body,
            "inbound_audit_prefixes{service=\"SMTP\",prefix=\"24\",sessions=\"2-5\"}"
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &body,
            "inbound_audit_queries_total{function=\"unparsed\",code=\"bad_cidr\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{body}"
    );
    assert!(sample(&body, "inbound_audit_query_duration_seconds_count").is_some_and(|n| n >= 2.0));
    assert!(sample(&body, "inbound_audit_resident_memory_bytes").is_some_and(|n| n > 1e6));
    assert!(get(METRICS_PROMTOOL, "/other").0.contains(" 404 "));
}

/// A Prometheus server with its own data directory, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    _dir: TempDir,
}

impl Prometheus {
    fn start(target: u16) -> Self {
        let dir = TempDir::new("prometheus");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: inbound-audit\n    static_configs:\n      \
                 - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{PROMETHEUS_WEB}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Self {
            child,
            url: format!("http://127.0.0.1:{PROMETHEUS_WEB}"),
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query through the HTTP API (by promtool): the JSON result,
    /// or the error Prometheus gave.
    fn query(&self, expr: &str) -> Result<serde_json::Value, String> {
        let (ok, out) = promtool(&["query", "instant", "-o", "json", &self.url, expr], None);
        if !ok {
            return Err(out);
        }
        serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
    }

    /// The single value of `expr`, once there is one.
    fn value(&self, expr: &str) -> Option<f64> {
        let result = self.query(expr).ok()?;
        result.as_array()?.first()?["value"][1]
            .as_str()?
            .parse()
            .ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dashboard_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/grafana/inbound-audit.json")
}

/// Every `expr` in the dashboard, with Grafana's variables replaced by what
/// Grafana would put there.
fn dashboard_expressions() -> Vec<String> {
    let text = std::fs::read_to_string(dashboard_path()).expect("read the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            out.push(
                expr.replace("$__rate_interval", "1m")
                    .replace("$instance", ".*"),
            );
        }
    }
    out
}

#[test]
fn prometheus_scrapes_the_agent_and_parses_the_dashboard() {
    require_ebpf!();
    require_prometheus!();
    let listen = format!("127.0.0.1:{METRICS_SCRAPED}");
    let fixture = SmtpFixture::start(
        env!("CARGO_BIN_EXE_test-server"),
        "metrics-prometheus",
        &["--metrics-listen", &listen],
    );
    let held: Vec<_> = (0..4)
        .map(|i| connect_from(ip(&format!("127.0.0.{}", i + 1)), fixture.smtp))
        .collect();
    fixture
        .agent
        .expect_count("127.0.0.0/8", "SMTP", held.len() as u64);
    let prometheus = Prometheus::start(METRICS_SCRAPED);

    let expr = "inbound_audit_sessions{job=\"inbound-audit\",service=\"SMTP\"}";
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = None;
    while Instant::now() < deadline {
        seen = prometheus.value(expr);
        if seen == Some(held.len() as f64) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        seen,
        Some(held.len() as f64),
        "Prometheus never reported the {} live SMTP sessions:\n{}",
        held.len(),
        prometheus.log()
    );
    assert_eq!(
        prometheus.value("up{job=\"inbound-audit\"}"),
        Some(1.0),
        "the target is up"
    );

    let expressions = dashboard_expressions();
    assert!(expressions.len() >= 10, "{expressions:?}");
    for expr in &expressions {
        if let Err(error) = prometheus.query(expr) {
            panic!("the dashboard's expression does not parse: {expr}\n{error}");
        }
    }
    // A broken expression is refused: the check above can fail.
    assert!(prometheus
        .query("sum by (service (inbound_audit_sessions)")
        .is_err());
    drop(held);
}

/// The README's picture of the dashboard: real sessions, receptions,
/// rejections and queries for about two minutes, scraped by a real
/// Prometheus, drawn by contrib/grafana/render.py with the dashboard's own
/// queries. Needs matplotlib for /usr/bin/python3 (Debian's
/// python3-matplotlib). Run by hand:
/// `cargo xtask test -- -p integration-tests --test metrics -- --ignored dashboard_picture`
#[test]
#[ignore = "draws contrib/grafana/inbound-audit.png (about two minutes)"]
fn dashboard_picture() {
    require_ebpf!();
    require_prometheus!();
    const PICTURE_METRICS: u16 = 19466;
    let listen = format!("127.0.0.1:{PICTURE_METRICS}");
    // A Postfix policy socket with one limit, asked for every new client, so
    // the policy panel shows `dunno` and, while the burst lasts, `450`.
    let dir = TempDir::new("metrics-picture-policy");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[[policy_limits]]\ncount = \"sessions\"\nipv4_prefix = 24\nmax = 8\naction = \"450 4.7.1\"\n",
    )
    .unwrap();
    let policy = dir.path().join("policy.sock");
    let fixture = SmtpFixture::start(
        env!("CARGO_BIN_EXE_test-server"),
        "metrics-picture",
        &[
            "--metrics-listen",
            &listen,
            "--monitor",
            "60,5",
            "--config",
            config.to_str().unwrap(),
            "--policy-socket",
            policy.to_str().unwrap(),
        ],
    );
    let prometheus = Prometheus::start(PICTURE_METRICS);
    let mut held: Vec<TcpStream> = Vec::new();
    let started = Instant::now();
    let mut step = 0u32;
    while started.elapsed() < Duration::from_secs(120) {
        step += 1;
        // A growing crowd from 127.0.0.0/24 and a burst from 127.0.5.0/24
        // that comes and goes; receptions for most, rejections for some.
        let from = if step % 40 < 20 {
            format!("127.0.5.{}", step % 7 + 1)
        } else {
            format!("127.0.0.{}", step % 50 + 1)
        };
        held.push(connect_from(ip(&from), fixture.smtp));
        let _ = fixture.agent.query(&format!("add receptions {from}"));
        if step.is_multiple_of(3) {
            let _ = fixture.agent.query(&format!("add rejections {from}"));
        }
        let _ = fixture
            .agent
            .query(&format!("audit_service \"SMTP\" \"{from}/24\""));
        if let Ok(mut stream) = std::os::unix::net::UnixStream::connect(&policy) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let request = format!(
                "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n\
                 client_address={from}\nserver_port={}\ninstance={step}\n\n",
                fixture.smtp.port()
            );
            let _ = stream.write_all(request.as_bytes());
            let mut answer = [0u8; 256];
            let _ = stream.read(&mut answer);
        }
        if held.len() > 60 || (step % 40 == 39) {
            let keep = held.len() / 2;
            held.truncate(keep);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_secs(3));
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/grafana/inbound-audit.png");
    let status = Command::new("/usr/bin/python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/grafana/render.py"))
        .arg(&prometheus.url)
        .arg(&out)
        .arg("2.2")
        .status()
        .expect("run render.py");
    assert!(status.success(), "render.py failed");
    assert!(std::fs::metadata(&out).unwrap().len() > 10_000);
}
