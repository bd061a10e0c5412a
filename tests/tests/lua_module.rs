//! The Lua module (lua/msys/audit.lua) end to end, as root: a real Lua
//! interpreter with LuaSocket runs Momentum-style scripts against the real
//! agent, which counts real loopback connections to a test server.
//!
//! Needs `lua5.4` and LuaSocket (Debian: `apt-get install lua5.4 lua-socket`);
//! without them each test says SKIPPED and which package is missing.
//! `INBOUND_AUDIT_LUA=lua5.1` (or lua5.3, ...) runs the same scripts with
//! another interpreter.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::mpsc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use integration_tests::{
    connect_from, require_ebpf, Agent, AgentOptions, TempDir, TestCgroup, TestServer,
};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// The interpreter: `lua5.4` unless INBOUND_AUDIT_LUA names another.
fn lua_binary() -> String {
    std::env::var("INBOUND_AUDIT_LUA").unwrap_or_else(|_| "lua5.4".to_string())
}

/// The repository's lua/ directory, which holds msys/audit.lua.
fn lua_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lua")
}

/// Why Lua scripts cannot run here, naming the Debian package to install.
fn lua_unavailable() -> Option<String> {
    let lua = lua_binary();
    let probe = Command::new(&lua)
        .args(["-e", "require('socket.unix')"])
        .env_remove("LUA_INIT")
        .env_remove("LUA_INIT_5_4")
        .stdin(Stdio::null())
        .output();
    match probe {
        Err(error) => Some(format!(
            "{lua} cannot be run ({error}): install the Debian package {lua} (apt-get install {lua})"
        )),
        Ok(output) if !output.status.success() => Some(format!(
            "LuaSocket (socket.unix) is not installed for {lua}: install the Debian package \
             lua-socket (apt-get install lua-socket)\n{}",
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .next()
                .unwrap_or("")
        )),
        Ok(_) => None,
    }
}

/// Skips the calling test (returning early) when the Lua interpreter or
/// LuaSocket is missing.
macro_rules! require_lua {
    () => {
        if let Some(reason) = lua_unavailable() {
            eprintln!("SKIPPED (Lua cannot run here): {reason}");
            return;
        }
    };
}

/// A Lua script running in its own interpreter, with package.path at the
/// repository's lua/ directory and INBOUND_AUDIT_SOCKET at the test agent.
/// A watchdog kills it if it has not finished within a minute.
struct LuaScript {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    output: Vec<String>,
    stderr_path: PathBuf,
    watchdog: Option<mpsc::Sender<()>>,
}

impl LuaScript {
    fn spawn(dir: &TempDir, source: &str, socket: &Path, args: &[String]) -> Self {
        let script = dir.path().join("script.lua");
        std::fs::write(&script, source).expect("write the script");
        let stderr_path = dir.path().join("stderr.txt");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let lua_path = format!("{dir}/?.lua;{dir}/?/init.lua;;", dir = lua_dir().display());
        let mut child = Command::new(lua_binary())
            .arg(&script)
            .args(args)
            .env("LUA_PATH", &lua_path)
            .env("LUA_PATH_5_4", &lua_path)
            .env("LUA_PATH_5_3", &lua_path)
            .env("LUA_PATH_5_2", &lua_path)
            .env_remove("LUA_INIT")
            .env_remove("LUA_INIT_5_4")
            .env("INBOUND_AUDIT_SOCKET", socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", lua_binary()));
        let (watchdog, expired) = mpsc::channel::<()>();
        let pid = child.id() as i32;
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) =
                expired.recv_timeout(Duration::from_secs(60))
            {
                eprintln!("the Lua script ran for over 60 s: killing it");
                // SAFETY: kill(2) on our own child, which has not been waited for
                // (the sender is dropped only after the wait).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        Self {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().expect("piped")),
            child,
            output: Vec::new(),
            stderr_path,
            watchdog: Some(watchdog),
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Reads stdout until a line equal to `expected`; panics with everything
    /// the script said if it ends first.
    fn wait_for_line(&mut self, expected: &str) {
        loop {
            let mut line = String::new();
            let read = self.stdout.read_line(&mut line).expect("script stdout");
            if read == 0 {
                let status = self.child.wait().expect("wait for lua");
                panic!(
                    "the Lua script ended ({status}) before printing {expected:?}\n\
                     stdout:\n{}\nstderr:\n{}",
                    self.output.join("\n"),
                    self.stderr()
                );
            }
            let line = line.trim_end().to_string();
            self.output.push(line.clone());
            if line == expected {
                return;
            }
        }
    }

    fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("script stdin");
        stdin.flush().expect("script stdin");
    }

    /// Waits for the script to exit; asserts it succeeded and returns all its
    /// stdout lines.
    fn finish(mut self) -> Vec<String> {
        drop(self.stdin.take());
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut rest).expect("script stdout");
        self.output.extend(rest.lines().map(str::to_string));
        let status = self.child.wait().expect("wait for lua");
        drop(self.watchdog.take());
        println!("Lua script output:\n{}", self.output.join("\n"));
        assert!(
            status.success(),
            "the Lua script failed ({status})\nstdout:\n{}\nstderr:\n{}",
            self.output.join("\n"),
            self.stderr()
        );
        std::mem::take(&mut self.output)
    }
}

impl Drop for LuaScript {
    fn drop(&mut self) {
        if self.watchdog.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Shared by the scripts: `check(what, got, want)` and
/// `check_error(what, fragment, f, ...)`, counting the checks made.
const LUA_CHECKS: &str = r#"
local checks = 0
local function show(value)
  if type(value) == "string" then return string.format("%q", value) end
  return tostring(value)
end
local function check(what, got, want)
  checks = checks + 1
  if got ~= want then
    error(string.format("%s: got %s, want %s", what, show(got), show(want)), 2)
  end
  if type(want) == "number" and math.type and math.type(got) ~= "integer" then
    error(string.format("%s: got a %s, want an integer", what, math.type(got)), 2)
  end
end
local function check_error(what, fragment, f, ...)
  checks = checks + 1
  local ok, err = pcall(f, ...)
  if ok then
    error(string.format("%s: no error (returned %s), want one containing %q",
      what, show(err), fragment), 2)
  end
  if not tostring(err):find(fragment, 1, true) then
    error(string.format("%s: error %s does not contain %q", what, show(err), fragment), 2)
  end
  return err
end
"#;

/// Live session counts, ac objects, errors, and the transport recovering from
/// a connection closed underneath it and from an agent restart between calls.
const LIVE_SCRIPT: &str = r#"
local smtp_port, control_port = tonumber(arg[1]), tonumber(arg[2])

local audit = require("msys.audit")
check("require sets the global msys.audit", msys.audit, audit)
check("msys.extended.ac is msys.audit", require("msys.extended.ac"), audit)

-- No client context: absolute CIDRs only.
check("/24 on SMTP", msys.audit.inbound_session_count("127.0.0.0/24", "SMTP"), 4)
check("an address, default service", msys.audit.inbound_session_count("127.0.0.21"), 3)
check("Control", msys.audit.inbound_session_count("127.0.0.22", "Control"), 1)
check("nobody", msys.audit.inbound_session_count("10.0.0.0/8", "SMTP"), 0)
check_error("relative form without a client", "msys.audit.inbound_session_count: no_client",
  msys.audit.inbound_session_count, "/24")

-- The host glue names the connecting client.
msys.audit.set_client("127.0.0.21")
check("client /32", msys.audit.inbound_session_count("/32", "SMTP"), 3)
check("client /24", msys.audit.inbound_session_count("/24"), 4)
check("client, all defaults", msys.audit.inbound_session_count(), 3)
msys.audit.set_client("127.0.0.21", smtp_port)
check("client with port", msys.audit.inbound_session_count("/32", "SMTP"), 3)
check("get_client", select(2, msys.audit.get_client()), smtp_port)

-- ac objects carry their own client, whatever the global one is.
local ac = msys.audit.accept_construct("127.0.0.22", smtp_port)
check("ac: this listener", ac:inbound_session_count(), 1)
check("ac: /24", ac:inbound_session_count("/24"), 4)
check("ac: /24 on SMTP", ac:inbound_session_count("/24", "SMTP"), 4)
check("ac: nil, Control", ac:inbound_session_count(nil, "Control"), 1)
check("ac: localhost/32", ac:inbound_session_count("localhost/32"), 0)
local ac_control = msys.audit.accept_construct("127.0.0.22", control_port)
check("ac on the Control listener", ac_control:inbound_session_count(), 1)
local ac_no_port = msys.audit.accept_construct("127.0.0.21")
check("ac without a port: SMTP", ac_no_port:inbound_session_count(), 3)
check_error("ac.method without the colon", "ac:inbound_session_count",
  ac.inbound_session_count, "/24")

-- Errors from the agent are raised with the function, the code and the text;
-- the connection stays usable afterwards.
local err = check_error("unknown service", "msys.audit.inbound_session_count: unknown_service",
  msys.audit.inbound_session_count, "10.0.0.0/8", "nosuch")
check("the message names the service", err:find("nosuch", 1, true) ~= nil, true)
check_error("bad cidr", "bad_cidr", msys.audit.inbound_session_count, "10.0.0.0/99", "SMTP")
-- Quotes, backslashes and control characters survive the trip to the agent
-- (it answers unknown_service for the odd name, not a syntax error).
check_error("escaped service name", "unknown_service",
  msys.audit.inbound_session_count, "127.0.0.0/24", "S\"M\\T\nP\0\1\127\195\169")
check("usable after errors", msys.audit.inbound_session_count("127.0.0.0/24", "SMTP"), 4)

-- Wrong argument types fail before anything is sent.
check_error("number as cidr", "bad argument #1 (cidr)", msys.audit.inbound_session_count, 24)
check_error("too many arguments", "at most 2", msys.audit.inbound_session_count, "/24", "SMTP", 1)
check_error("bad client ip", "set_client", msys.audit.set_client, "not-an-ip")
check_error("bad port", "local_port", msys.audit.accept_construct, "127.0.0.1", 70000)
check_error("options: float", "startv", msys.audit.connections, "60,1", { startv = 0.5 })
check_error("options: unknown key", "unknown option", msys.audit.connections, "60,1", { strat = 1 })

local stats = msys.audit.stats()
check("one persistent connection so far", stats.connects, 1)
check("no reconnects so far", stats.reconnects, 0)

-- The connection dies underneath the module: the next call reconnects once.
msys.audit._connection():shutdown("both")
check("after shutdown underneath", msys.audit.inbound_session_count("127.0.0.0/24", "SMTP"), 4)
check("reconnected once", msys.audit.stats().reconnects, 1)
check("second connection", msys.audit.stats().connects, 2)

-- The agent restarts between two calls (the test does it while we wait).
print("RESTART")
io.stdout:flush()
check("the test's go-ahead", io.read("*l"), "GO")
check("after the agent restarted", msys.audit.inbound_session_count("127.0.0.0/24", "SMTP"), 4)
check("reconnected after the restart", msys.audit.stats().reconnects, 2)
check("third connection", msys.audit.stats().connects, 3)
check("ac after the restart", ac:inbound_session_count(), 1)

-- Unreachable agent: a transport error, raised after the one retry.
msys.audit.configure({ socket = arg[3], timeout = 2 })
check_error("no agent", "transport error", msys.audit.inbound_session_count, "/24")
-- Back to INBOUND_AUDIT_SOCKET.
check("configure back", msys.audit.configure({ socket = false }).socket, os.getenv("INBOUND_AUDIT_SOCKET"))
check("reachable again", msys.audit.inbound_session_count("127.0.0.0/24", "SMTP"), 4)

print("LUA-OK " .. checks)
"#;

#[test]
fn lua_module_counts_live_sessions_and_recovers_its_connection() {
    require_ebpf!();
    require_lua!();
    let cgroup = TestCgroup::new("lua-live");
    let server = TestServer::start(
        env!("CARGO_BIN_EXE_test-server"),
        &cgroup,
        &["127.0.0.1:0", "127.0.0.1:0"],
    );
    let (smtp_port, control_port) = (server.ports[0], server.ports[1]);
    let dir = TempDir::new("lua-live-script");
    let mut agent = Agent::start(AgentOptions {
        name: "lua-live",
        cgroup: &cgroup,
        services: vec![
            format!("SMTP={smtp_port}"),
            format!("Control={control_port}"),
        ],
        extra_args: Vec::new(),
    });
    let smtp = SocketAddr::new(ip("127.0.0.1"), smtp_port);
    let control = SocketAddr::new(ip("127.0.0.1"), control_port);
    let _held: Vec<_> = [
        ("127.0.0.21", smtp),
        ("127.0.0.21", smtp),
        ("127.0.0.21", smtp),
        ("127.0.0.22", smtp),
        ("127.0.0.22", control),
    ]
    .into_iter()
    .map(|(source, server)| connect_from(ip(source), server))
    .collect();
    agent.expect_count("127.0.0.0/24", "SMTP", 4);
    agent.expect_count("127.0.0.22", "Control", 1);

    let missing_socket = dir.path().join("no-agent-here.sock");
    let mut script = LuaScript::spawn(
        &dir,
        &format!("{LUA_CHECKS}{LIVE_SCRIPT}"),
        &agent.socket,
        &[
            smtp_port.to_string(),
            control_port.to_string(),
            missing_socket.display().to_string(),
        ],
    );
    script.wait_for_line("RESTART");
    agent.restart();
    agent.expect_count("127.0.0.0/24", "SMTP", 4);
    script.send_line("GO");
    let output = script.finish();
    let last = output.last().map(String::as_str).unwrap_or("");
    assert!(
        last.starts_with("LUA-OK "),
        "the script's last line is {last:?}\n{}",
        output.join("\n")
    );
    let checks: u32 = last["LUA-OK ".len()..].parse().expect("a check count");
    assert!(
        checks >= 40,
        "only {checks} checks ran:\n{}",
        output.join("\n")
    );
}

/// The windowed functions as a Momentum validate_mailfrom hook uses them,
/// with the host glue around it that Momentum would provide.
const WINDOWED_SCRIPT: &str = r#"
local client_ip, smtp_port = arg[1], tonumber(arg[2])

require("msys.audit")
require("msys.extended.ac")

-- The policy, as in Momentum's msys.audit.connections example.
local mod = {}
function mod:validate_mailfrom(str, ac, vctx)
  local conn = msys.audit.connections("60,1")
  local rcpt = msys.audit.receptions("60,1")
  local rejn = msys.audit.rejections("60,1")
  local live = ac:inbound_session_count()
  local live24 = msys.audit.inbound_session_count("/24", "SMTP")
  vctx.conn, vctx.rcpt, vctx.rejn, vctx.live, vctx.live24 = conn, rcpt, rejn, live, live24
  if conn > 30 or live > 10 or rejn > rcpt then
    return "tempfail"
  end
  return "continue"
end

-- The host glue: the connecting client, its accept construct, and the
-- messages it has had accepted so far.
msys.audit.set_client(client_ip, smtp_port)
local ac = msys.audit.accept_construct(client_ip, smtp_port)
check("add receptions", msys.audit.add("receptions", client_ip, 3), 3)

local vctx = {}
check("validate_mailfrom", mod:validate_mailfrom("sender@example.com", ac, vctx), "continue")
check("connections", vctx.conn, 2)
check("receptions", vctx.rcpt, 3)
check("rejections", vctx.rejn, 0)
check("live sessions, this listener", vctx.live, 2)
check("live sessions, /24", vctx.live24, 2)

check("connections over windows 0-1 of the /24",
  msys.audit.connections("60,1", { startv = 0, endv = 1, cidr = "/24" }), 2)
check("connections, cidr string", msys.audit.connections("60,1", "127.0.0.0/8"), 2)
check("connections, cidr in the table", msys.audit.connections("60,1", { cidr = "127.0.0.23" }), 2)
check("receptions of another address", msys.audit.receptions("60,1", "127.0.0.24"), 0)
check_error("unknown monitor", "msys.audit.connections: unknown_monitor",
  msys.audit.connections, "999,1")
check_error("unknown monitor, receptions", "msys.audit.receptions: unknown_monitor",
  msys.audit.receptions, "999,1")

-- add with the client as the default ip, and the default increment of 1.
check("add rejections", msys.audit.add("rejections"), 1)
check("rejections after add", msys.audit.rejections("60,1"), 1)
check_error("add: bad series", "series", msys.audit.add, "connections", client_ip, 1)
check_error("add: bad count", "bad argument #3", msys.audit.add, "receptions", client_ip, 0)

msys.audit.set_client(nil)
check_error("no client", "no_client", msys.audit.connections, "60,1")

print("LUA-OK " .. checks)
"#;

/// Sleeps past a 60 s window boundary that is less than 20 s away, so the
/// connections made next and the queries about them fall in one window
/// (monitor windows are aligned on multiples of their size since the epoch).
fn avoid_window_boundary(window_secs: f64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    let into_window = now % window_secs;
    if window_secs - into_window < 20.0 {
        std::thread::sleep(Duration::from_secs_f64(window_secs - into_window + 0.5));
    }
}

#[test]
fn lua_windowed_functions_in_a_momentum_style_policy() {
    require_ebpf!();
    require_lua!();
    let cgroup = TestCgroup::new("lua-windows");
    let server = TestServer::start(env!("CARGO_BIN_EXE_test-server"), &cgroup, &["127.0.0.1:0"]);
    let smtp_port = server.ports[0];
    let dir = TempDir::new("lua-windows-script");
    // The harness gives each agent its own monitor state directory.
    let extra_args = vec!["--monitor".to_string(), "60,1".to_string()];
    let agent = Agent::start(AgentOptions {
        name: "lua-windows",
        cgroup: &cgroup,
        services: vec![format!("SMTP={smtp_port}")],
        extra_args,
    });
    avoid_window_boundary(60.0);
    let smtp = SocketAddr::new(ip("127.0.0.1"), smtp_port);
    let _held: Vec<_> = (0..2)
        .map(|_| connect_from(ip("127.0.0.23"), smtp))
        .collect();
    agent.expect_count("127.0.0.23", "SMTP", 2);
    agent.expect("@127.0.0.23 msys.audit.connections(\"60,1\")", "OK 2");

    let script = LuaScript::spawn(
        &dir,
        &format!("{LUA_CHECKS}{WINDOWED_SCRIPT}"),
        &agent.socket,
        &["127.0.0.23".to_string(), smtp_port.to_string()],
    );
    let output = script.finish();
    let last = output.last().map(String::as_str).unwrap_or("");
    assert!(
        last.starts_with("LUA-OK "),
        "the script's last line is {last:?}\n{}",
        output.join("\n")
    );
}

/// The cluster forms through the Lua module, unchanged: `inbound_cidr`, an
/// `ac` on it, `cluster=true` and a cluster error raised with its code. Two
/// real agents (an MX host each) on one private Redis.
#[test]
fn lua_cluster_forms_pass_through() {
    require_ebpf!();
    require_lua!();
    let Some(redis) = integration_tests::redis::Redis::start() else {
        return;
    };
    let dir = TempDir::new("lua-cluster");
    let mut nodes = Vec::new();
    for name in ["lua-mx1", "lua-mx2"] {
        let cgroup = TestCgroup::new(name);
        let server =
            TestServer::start(env!("CARGO_BIN_EXE_test-server"), &cgroup, &["127.0.0.1:0"]);
        let agent = Agent::start(AgentOptions {
            name,
            cgroup: &cgroup,
            services: vec![format!("SMTP={}", server.ports[0])],
            extra_args: vec![
                "--monitor".into(),
                "60,1".into(),
                "--cluster-redis".into(),
                redis.url(),
                "--node".into(),
                name.into(),
            ],
        });
        nodes.push((agent, server, cgroup));
    }
    avoid_window_boundary(60.0);
    let smtp = |i: usize| SocketAddr::new(ip("127.0.0.1"), nodes[i].1.ports[0]);
    let _held: Vec<_> = [(0, "127.0.7.1"), (0, "127.0.7.2"), (1, "127.0.7.3")]
        .iter()
        .map(|&(i, from)| connect_from(ip(from), smtp(i)))
        .collect();
    for (agent, _, _) in &nodes {
        agent.expect(
            "msys.audit.inbound_session_count(\"127.0.7.0/24\", \"inbound_cidr\")",
            "OK 3",
        );
        agent.expect(
            "msys.audit.connections(\"60,1\", {cidr=\"127.0.7.0/24\", cluster=true})",
            "OK 3",
        );
    }
    let script = r#"
require("msys.audit")
local client, port = arg[1], tonumber(arg[2])
msys.audit.set_client(client, port)
check("cluster sessions", msys.audit.inbound_session_count("/24", "inbound_cidr"), 3)
check("local sessions", msys.audit.inbound_session_count("/24", "SMTP"), 1)
local ac = msys.audit.accept_construct(client, port)
check("ac on inbound_cidr", ac:inbound_session_count("/24", "inbound_cidr"), 3)
check("cluster connections", msys.audit.connections("60,1", {cidr = "/24", cluster = true}), 3)
check("local connections", msys.audit.connections("60,1", {cidr = "/24"}), 1)
check_error("unknown monitor", "unknown_monitor", msys.audit.connections, "61,1", {cluster = true})
print("LUA-OK " .. checks)
"#;
    let second = &nodes[1].0;
    let script = LuaScript::spawn(
        &dir,
        &format!("{LUA_CHECKS}{script}"),
        &second.socket,
        &["127.0.7.3".to_string(), nodes[1].1.ports[0].to_string()],
    );
    let output = script.finish();
    let last = output.last().map(String::as_str).unwrap_or("");
    assert!(
        last.starts_with("LUA-OK "),
        "the script's last line is {last:?}\n{}",
        output.join("\n")
    );
}
