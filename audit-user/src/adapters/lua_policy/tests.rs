//! The host with real scripts (the seed example and contrib/policy) on an
//! agent state with known counts; bounds, errors, contexts, series, reload.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use audit_common::{SessionEvent, EVENT_OPEN, FAMILY_V4};

use super::{
    context::session_key,
    interp::{Bounds, Interp, Outcome, ScriptError},
    LuaPolicy, Shared,
};
use crate::{
    adapters::postfix::test_support::state,
    config::LuaPolicyConfig,
    counting::state::{ApplyOutcome, SharedState},
    domain::{unix_now, Series},
    serving::protocol::{Phase, PolicyCall},
};

const SEED: &str = include_str!("../../../../tests/fixtures/policy/momentum_example.lua");
const SESSION_LIMIT: &str = include_str!("../../../../contrib/policy/session_limit.lua");
const TARPIT: &str = include_str!("../../../../contrib/policy/connection_tarpit.lua");
const RATIO: &str = include_str!("../../../../contrib/policy/rejection_ratio.lua");

const BOUNDS: Bounds = Bounds {
    max_instructions: 1_000_000,
    max_memory: 16 << 20,
    timeout: Duration::from_secs(2),
};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// The shared state of postfix's tests (192.0.2.1-3 live, monitor "60,1"),
/// with monitors "3600,1" too.
fn shared() -> Arc<Shared> {
    let base = state();
    let mut config = base.setup().config.clone();
    config.monitors.push("3600,1".parse().unwrap());
    let state = SharedState::new(config, HashMap::from([("SMTP".to_string(), 0u8)]));
    open_sessions(&state, [192, 0, 2], 1..=3);
    Arc::new(Shared::new(Arc::new(state)))
}

fn open_sessions(state: &SharedState, net: [u8; 3], hosts: std::ops::RangeInclusive<u8>) {
    let mut outcome = ApplyOutcome::default();
    for last in hosts {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[net[0], net[1], net[2], last]);
        let event = SessionEvent {
            cookie: 0,
            addr,
            kind: EVENT_OPEN,
            family: FAMILY_V4,
            service: 0,
            _pad: [0; 5],
        };
        state.write_sessions().apply(&event, &mut outcome);
    }
}

fn interp(shared: &Arc<Shared>, scripts: &[(&str, &str)]) -> Result<Interp, ScriptError> {
    let sources: Vec<(PathBuf, String)> = scripts
        .iter()
        .map(|(name, text)| (PathBuf::from(format!("/policy/{name}")), text.to_string()))
        .collect();
    Interp::new(shared, &sources, BOUNDS, 1)
}

fn call(phase: Phase, client: &str, attributes: &[(&str, &str)]) -> PolicyCall {
    PolicyCall {
        phase,
        client: ip(client),
        local_port: Some(25),
        attributes: attributes
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// Runs `call` as a worker does: the session's contexts opened first.
fn run(shared: &Arc<Shared>, interp: &Interp, call: &PolicyCall) -> Result<Outcome, ScriptError> {
    let session = session_key(call);
    shared
        .contexts
        .lock()
        .unwrap()
        .begin(&session, call, Instant::now());
    interp.run(call.clone(), session, Instant::now() + BOUNDS.timeout)
}

fn action(shared: &Arc<Shared>, interp: &Interp, call: &PolicyCall) -> String {
    run(shared, interp, call).unwrap().action()
}

#[test]
fn the_seed_example_runs_unchanged() {
    let shared = shared();
    let interp = interp(&shared, &[("seed.lua", SEED)]).unwrap();
    let mail = call(Phase::Mail, "192.0.2.1", &[("sender", "a@example.org")]);
    assert_eq!(action(&shared, &interp, &mail), "dunno");
    // A phase without the callout runs nothing.
    assert_eq!(
        action(&shared, &interp, &call(Phase::Connect, "192.0.2.1", &[])),
        "dunno"
    );
}

#[test]
fn session_limit_refuses_the_eleventh_session_of_a_24() {
    let shared = shared();
    let interp = interp(&shared, &[("session_limit.lua", SESSION_LIMIT)]).unwrap();
    let connect = call(Phase::Connect, "198.51.100.7", &[("client_port", "4000")]);
    open_sessions(&shared.state, [198, 51, 100], 1..=10);
    assert_eq!(action(&shared, &interp, &connect), "dunno");
    open_sessions(&shared.state, [198, 51, 100], 11..=11);
    assert_eq!(
        action(&shared, &interp, &connect),
        "421 4.7.0 Too many sessions from your network (11), try again later"
    );
}

#[test]
fn tarpit_sleeps_a_client_over_its_connection_rate_at_connect_and_each_recipient() {
    let shared = shared();
    let interp = interp(&shared, &[("tarpit.lua", TARPIT)]).unwrap();
    let client = ip("203.0.113.5");
    let now = unix_now();
    let session = [("client_port", "5555")];
    let connect = call(Phase::Connect, "203.0.113.5", &session);
    let rcpt = call(Phase::Rcpt, "203.0.113.5", &session);
    shared
        .state
        .lock_monitors()
        .record(Series::Connections, client, 20, now);
    assert_eq!(action(&shared, &interp, &connect), "dunno");
    assert_eq!(action(&shared, &interp, &rcpt), "dunno");
    shared
        .state
        .lock_monitors()
        .record(Series::Connections, client, 1, now);
    assert_eq!(action(&shared, &interp, &connect), "sleep 3");
    // The connection context remembers it for this session only.
    assert_eq!(action(&shared, &interp, &rcpt), "sleep 3");
    let other = call(Phase::Rcpt, "203.0.113.5", &[("client_port", "5556")]);
    assert_eq!(action(&shared, &interp, &other), "dunno");
}

#[test]
fn rejection_ratio_blocks_a_client_rejected_more_than_received() {
    let shared = shared();
    let interp = interp(&shared, &[("ratio.lua", RATIO)]).unwrap();
    let client = ip("192.0.2.50");
    let now = unix_now();
    let mail = call(Phase::Mail, "192.0.2.50", &[("sender", "x@example.org")]);
    shared
        .state
        .lock_monitors()
        .record(Series::Rejections, client, 4, now);
    assert_eq!(
        action(&shared, &interp, &mail),
        "dunno",
        "under 5 rejections"
    );
    shared
        .state
        .lock_monitors()
        .record(Series::Rejections, client, 1, now);
    assert_eq!(
        action(&shared, &interp, &mail),
        "550 5.7.1 Too many rejected messages from your address (5 of 5), mail refused"
    );
    shared
        .state
        .lock_monitors()
        .record(Series::Receptions, client, 5, now);
    assert_eq!(
        action(&shared, &interp, &mail),
        "dunno",
        "ratio 0.5 is allowed"
    );
}

#[test]
fn callouts_get_momentums_arguments_and_done_stops_the_phase() {
    let shared = shared();
    let first = r#"
        require("msys.core")
        local mod = {}
        function mod:validate_ehlo(str, ac, vctx)
          assert(self == mod)
          vctx:set(msys.core.VCTX_CONN, "helo", str)
          return msys.core.VALIDATE_CONT
        end
        function mod:validate_rcptto(msg, str, ac, vctx)
          local seen = string.format("%s|%s|%s|%s|%d|%s|%d",
            str, msg:mailfrom(), msg:rcptto(), vctx:get(msys.core.VCTX_CONN, "helo"),
            msg:get_message_size(), msg:reception_peer("ip"), ac:inbound_session_count("/24"))
          vctx:set_code(451, seen)
          return msys.core.VALIDATE_DONE
        end
        msys.registerModule("first", mod)
    "#;
    let second = r#"
        local mod = {}
        function mod:validate_rcptto(msg, str, ac, vctx)
          vctx:set_code(550, "not reached")
          return msys.core.VALIDATE_CONT
        end
        msys.registerModule("second", mod)
    "#;
    let interp = interp(&shared, &[("first.lua", first), ("second.lua", second)]).unwrap();
    let session = [("client_port", "777")];
    let ehlo = call(
        Phase::Ehlo,
        "192.0.2.1",
        &[("client_port", "777"), ("helo_name", "mx.example.org")],
    );
    assert_eq!(action(&shared, &interp, &ehlo), "dunno");
    let rcpt = call(
        Phase::Rcpt,
        "192.0.2.1",
        &[
            session[0],
            ("sender", "a@example.org"),
            ("recipient", "b@example.net"),
            ("size", "1234"),
        ],
    );
    assert_eq!(
        action(&shared, &interp, &rcpt),
        "451 b@example.net|a@example.org|b@example.net|mx.example.org|1234|192.0.2.1|3"
    );
}

#[test]
fn message_context_is_per_transaction_connection_context_per_session() {
    let shared = shared();
    let script = r#"
        local mod = {}
        function mod:validate_mailfrom(str, ac, vctx)
          assert(vctx:get(msys.core.VCTX_MESS, "n") == nil, "message context starts empty")
          vctx:set(msys.core.VCTX_MESS, "n", 1)
          vctx:set(msys.core.VCTX_CONN, "mails", (vctx:get(msys.core.VCTX_CONN, "mails") or 0) + 1)
          return msys.core.VALIDATE_CONT
        end
        function mod:validate_rcptto(msg, str, ac, vctx)
          vctx:set_code(450, string.format("mess %s conn %s",
            tostring(vctx:get(msys.core.VCTX_MESS, "n")), tostring(vctx:get(msys.core.VCTX_CONN, "mails"))))
          return msys.core.VALIDATE_CONT
        end
        msys.registerModule("contexts", mod)
    "#;
    let interp = interp(&shared, &[("contexts.lua", script)]).unwrap();
    let s = ("client_port", "1000");
    let connect = call(Phase::Connect, "192.0.2.2", &[s]);
    let mail = call(Phase::Mail, "192.0.2.2", &[s]);
    let rcpt = call(Phase::Rcpt, "192.0.2.2", &[s]);
    assert_eq!(action(&shared, &interp, &connect), "dunno");
    assert_eq!(action(&shared, &interp, &mail), "dunno");
    assert_eq!(action(&shared, &interp, &rcpt), "450 mess 1 conn 1");
    assert_eq!(
        action(&shared, &interp, &mail),
        "dunno",
        "a new transaction"
    );
    assert_eq!(action(&shared, &interp, &rcpt), "450 mess 1 conn 2");
    assert_eq!(action(&shared, &interp, &connect), "dunno", "a new session");
    let fresh = call(Phase::Rcpt, "192.0.2.2", &[s]);
    assert_eq!(action(&shared, &interp, &fresh), "450 mess nil conn nil");
}

#[test]
fn a_call_we_do_not_provide_names_itself() {
    let shared = shared();
    let cases = [
        (
            "msys.expandMacro(\"%{vctx_conn:ehlo_string}\")",
            "msys.expandMacro is not provided",
        ),
        (
            "vctx:recipient_list()",
            "vctx:recipient_list is not provided",
        ),
        (
            "ac:esmtp_capability_add(\"X\")",
            "ac:esmtp_capability_add is not provided",
        ),
        (
            "msys.core.mail_queue_delay_domain()",
            "msys.core.mail_queue_delay_domain is not provided",
        ),
        (
            "local x = msys.core.EC_AUTH_OK",
            "msys.core.EC_AUTH_OK is not provided",
        ),
        ("msg:body()", "msg:body is not provided"),
        (
            "msg:mailfrom(\"x@y\")",
            "msg:mailfrom: changing the envelope",
        ),
        (
            "msys.audit.connections(\"9,9\")",
            "msys.audit.connections: unknown_monitor",
        ),
    ];
    for (line, expected) in cases {
        let script = format!(
            "local mod = {{}}\nfunction mod:validate_rcptto(msg, str, ac, vctx)\n  {line}\n  return msys.core.VALIDATE_CONT\nend\nmsys.registerModule(\"m\", mod)\n"
        );
        let interp = interp(&shared, &[("unknown.lua", &script)]).unwrap();
        let error = run(&shared, &interp, &call(Phase::Rcpt, "192.0.2.1", &[])).unwrap_err();
        let text = error.to_string();
        assert!(text.contains(expected), "{line}: {text}");
        assert!(
            text.starts_with(
                "/policy/unknown.lua (module m) validate_rcptto: /policy/unknown.lua:3:"
            ),
            "script, module, callout and line: {text}"
        );
    }
}

#[test]
fn runaway_loops_are_stopped_with_their_line_even_inside_pcall() {
    let shared = shared();
    let script = r#"
        local mod = {}
        function mod:validate_connect(ac, vctx)
          while true do
            pcall(function() while true do end end)
          end
        end
        function mod:validate_ehlo(str, ac, vctx)
          return msys.core.VALIDATE_CONT
        end
        msys.registerModule("loop", mod)
    "#;
    let interp = interp(&shared, &[("loop.lua", script)]).unwrap();
    let started = Instant::now();
    let error = run(&shared, &interp, &call(Phase::Connect, "192.0.2.1", &[]))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("/policy/loop.lua:5: instruction limit of 1000000 reached"),
        "{error}"
    );
    assert!(
        started.elapsed() < BOUNDS.timeout,
        "stopped by instructions"
    );
    // The interpreter goes on serving.
    assert_eq!(
        action(&shared, &interp, &call(Phase::Ehlo, "192.0.2.1", &[])),
        "dunno"
    );
}

#[test]
fn the_time_limit_stops_slow_scripts() {
    let shared = shared();
    let script = r#"
        local mod = {}
        function mod:validate_connect(ac, vctx)
          local t = os.clock()
          while true do t = t + 1 end
        end
        msys.registerModule("slow", mod)
    "#;
    let sources = vec![(PathBuf::from("/policy/slow.lua"), script.to_string())];
    let bounds = Bounds {
        max_instructions: u64::MAX,
        timeout: Duration::from_millis(100),
        ..BOUNDS
    };
    let interp = Interp::new(&shared, &sources, bounds, 1).unwrap();
    let started = Instant::now();
    let error = interp
        .run(
            call(Phase::Connect, "192.0.2.1", &[]),
            "s".into(),
            Instant::now() + bounds.timeout,
        )
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("/policy/slow.lua:5: time limit of 100 ms reached"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn memory_growth_hits_the_cap_and_the_interpreter_recovers() {
    let shared = shared();
    let script = r#"
        local mod = {}
        local keep = {}
        function mod:validate_connect(ac, vctx)
          local t = {}
          while true do t[#t + 1] = string.rep("x", 4096) .. #t end
        end
        function mod:validate_ehlo(str, ac, vctx)
          vctx:set_code(250, "ok")
          return msys.core.VALIDATE_CONT
        end
        msys.registerModule("hog", mod)
    "#;
    let sources = vec![(PathBuf::from("/policy/hog.lua"), script.to_string())];
    let bounds = Bounds {
        max_instructions: u64::MAX,
        ..BOUNDS
    };
    let interp = Interp::new(&shared, &sources, bounds, 1).unwrap();
    let error = interp
        .run(
            call(Phase::Connect, "192.0.2.1", &[]),
            "s".into(),
            Instant::now() + bounds.timeout,
        )
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("memory limit of 16777216 bytes reached near /policy/hog.lua:6"),
        "{error}"
    );
    assert!(interp.used_memory() < bounds.max_memory / 2);
    let ehlo = interp
        .run(
            call(Phase::Ehlo, "192.0.2.1", &[]),
            "s".into(),
            Instant::now() + bounds.timeout,
        )
        .unwrap();
    assert_eq!(ehlo.action(), "dunno", "2xx codes accept");
}

#[test]
fn audit_series_count_per_cidr_and_string() {
    let shared = shared();
    let script = r#"
        require("msys.audit_series")
        local mod = {}
        function mod:init()
          msys.audit_series.define("bad_rcpt", "cidr", 300, 6)
          msys.audit_series.define("by_sender", "string", 60, 2)
          return true
        end
        function mod:validate_rcptto(msg, str, ac, vctx)
          msys.audit_series.add("bad_rcpt", ac)
          msys.audit_series.add("bad_rcpt", { key = "192.0.2.77", count = 2 })
          msys.audit_series.add("by_sender", { key = msg:mailfrom(), count = 3 })
          vctx:set_code(450, string.format("%d %d %d %d",
            msys.audit_series.count("bad_rcpt"),
            msys.audit_series.count("bad_rcpt", "/24"),
            msys.audit_series.count("bad_rcpt", { key = "192.0.2.77", startv = 0, endv = 5 }),
            msys.audit_series.count("by_sender", { key = msg:mailfrom() })))
          return msys.core.VALIDATE_CONT
        end
        msys.registerModule("series", mod)
    "#;
    let interp = interp(&shared, &[("series.lua", script)]).unwrap();
    let rcpt = call(Phase::Rcpt, "192.0.2.9", &[("sender", "s@example.org")]);
    assert_eq!(action(&shared, &interp, &rcpt), "450 1 3 2 3");
    assert_eq!(action(&shared, &interp, &rcpt), "450 2 6 4 6");
    // A second interpreter (another worker, or a reload) shares the series.
    let other = self::interp(&shared, &[("series.lua", script)]).unwrap();
    assert_eq!(action(&shared, &other, &rcpt), "450 3 9 6 9");
    let undefined = r#"
        local mod = {}
        function mod:validate_connect(ac, vctx)
          msys.audit_series.count("nope")
        end
        msys.registerModule("u", mod)
    "#;
    let interp = self::interp(&shared, &[("u.lua", undefined)]).unwrap();
    let error = run(&shared, &interp, &call(Phase::Connect, "192.0.2.9", &[]))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("msys.audit_series.count: series \"nope\" is not defined"),
        "{error}"
    );
}

#[test]
fn scripts_that_cannot_load_say_why_and_where() {
    let shared = shared();
    let cases = [
        ("local x = = 1", "/policy/bad.lua: /policy/bad.lua:1:"),
        ("error('boom')", "/policy/bad.lua: /policy/bad.lua:1: boom"),
        ("local mod = {}", "registers no module"),
        (
            "local mod = {}\nfunction mod:init() return false end\nmsys.registerModule('m', mod)",
            "module m: init() did not return true",
        ),
        ("while true do end", "instruction limit of 1000000 reached"),
        ("os.exit(1)", "attempt to call a nil value (field 'exit')"),
        ("require('socket.core')", "module 'socket.core' not found"),
    ];
    for (source, expected) in cases {
        let error = interp(&shared, &[("bad.lua", source)])
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains(expected), "{source}: {error}");
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("inbound-audit-lua-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(scripts: Vec<PathBuf>) -> LuaPolicyConfig {
    LuaPolicyConfig {
        scripts,
        fail_action: "defer_if_permit policy script failed".into(),
        timeout: Duration::from_millis(300),
        workers: 1,
        queue: 4,
        ..LuaPolicyConfig::default()
    }
}

/// A host running `script` alone (written in a directory of its own,
/// returned for removal) with [`config`]'s settings as `tune` changes them.
fn host_running(
    name: &str,
    script: &str,
    tune: impl FnOnce(&mut LuaPolicyConfig),
) -> (Arc<LuaPolicy>, PathBuf) {
    let dir = temp_dir(name);
    let path = dir.join(format!("{name}.lua"));
    std::fs::write(&path, script).unwrap();
    let mut settings = config(vec![path]);
    tune(&mut settings);
    let host = LuaPolicy::start(shared().state.clone(), &settings).unwrap();
    (host, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_interpreter_answers_fail_open_and_never_stalls_others() {
    let script = r#"
        local mod = {}
        function mod:validate_connect(ac, vctx)
          while true do end
        end
        function mod:validate_ehlo(str, ac, vctx)
          vctx:set_code(421, "4.7.0 go away")
          return msys.core.VALIDATE_DONE
        end
        msys.registerModule("slow", mod)
        "#;
    let (host, dir) = host_running("stall", script, |s| s.max_instructions = u64::MAX);
    let started = Instant::now();
    // More slow requests than the one interpreter and its queue take.
    let slow: Vec<_> = (0..8)
        .map(|_| {
            let host = host.clone();
            tokio::spawn(async move { host.evaluate(call(Phase::Connect, "192.0.2.1", &[])).await })
        })
        .collect();
    for task in slow {
        let verdict = task.await.unwrap();
        assert!(verdict.failed);
        assert_eq!(verdict.action, "defer_if_permit policy script failed");
    }
    assert!(
        started.elapsed() < Duration::from_millis(300) + Duration::from_secs(1),
        "each waited at most its timeout: {:?}",
        started.elapsed()
    );
    // Once the stuck ones are done, requests are answered by the script again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let verdict = host.evaluate(call(Phase::Ehlo, "192.0.2.1", &[])).await;
    assert_eq!(verdict.action, "421 4.7.0 go away");
    assert!(!verdict.failed);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A request that finds the one interpreter busy waits for it and is
/// answered by the scripts (not the fail action), one request at a time in
/// that interpreter.
#[test]
fn a_request_waits_for_the_busy_interpreter_and_is_answered_by_it() {
    let script = r#"
        local mod = {}
        local running, served = false, 0
        function mod:validate_connect(ac, vctx)
          if running then error("two requests in one interpreter at once") end
          running = true
          local began = os.clock()
          while os.clock() - began < 0.1 do end
          running = false
          served = served + 1
          vctx:set_code(450, "request " .. served)
          return msys.core.VALIDATE_DONE
        end
        msys.registerModule("busy", mod)
        "#;
    let (host, dir) = host_running("lend", script, |s| s.timeout = Duration::from_secs(5));
    let askers: Vec<_> = (0..2)
        .map(|_| {
            let host = host.clone();
            std::thread::spawn(move || host.run(call(Phase::Connect, "192.0.2.1", &[])))
        })
        .collect();
    let mut answers: Vec<String> = askers
        .into_iter()
        .map(|asker| {
            let verdict = asker.join().unwrap();
            assert!(!verdict.failed, "{verdict:?}");
            verdict.action
        })
        .collect();
    answers.sort();
    // The one interpreter answered both, in turn.
    assert_eq!(answers, ["450 request 1", "450 request 2"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_fails_keeps_the_running_scripts() {
    let dir = temp_dir("reload");
    let path = dir.join("policy.lua");
    let script = |code: u16| {
        format!(
            "local mod = {{}}\nfunction mod:validate_rcptto(msg, str, ac, vctx)\n  vctx:set_code({code}, 'from {code}')\n  return msys.core.VALIDATE_DONE\nend\nmsys.registerModule('r', mod)\n"
        )
    };
    std::fs::write(&path, script(450)).unwrap();
    let settings = config(vec![path.clone()]);
    let host = LuaPolicy::start(shared().state.clone(), &settings).unwrap();
    let rcpt = || call(Phase::Rcpt, "192.0.2.1", &[]);
    assert_eq!(host.evaluate(rcpt()).await.action, "450 from 450");
    std::fs::write(&path, "this is not lua").unwrap();
    let error = host.reload(&settings).unwrap_err().to_string();
    assert!(error.contains("policy.lua:1:"), "{error}");
    assert_eq!(host.evaluate(rcpt()).await.action, "450 from 450");
    std::fs::write(&path, script(550)).unwrap();
    host.reload(&settings).unwrap();
    assert_eq!(host.evaluate(rcpt()).await.action, "550 from 550");
    let missing = config(vec![dir.join("missing.lua")]);
    assert!(host.reload(&missing).is_err());
    assert_eq!(host.evaluate(rcpt()).await.action, "550 from 550");
    let _ = std::fs::remove_dir_all(&dir);
}
