//! One interpreter: Lua 5.4 with the Momentum API (prelude.lua), every
//! script loaded, and the bounds on what one request may cost. Each request
//! runs in a fresh coroutine; when it goes over its instruction or time
//! budget the count hook yields it (which no `pcall` in the script can
//! catch) and the coroutine is dropped. An interpreter runs on one thread at
//! a time: that of the request it answers (mlua's `send`).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use mlua::{Function, HookTriggers, Lua, LuaOptions, MultiValue, StdLib, Table, Value, VmState};

use super::{
    context::{ContextValue, Kind},
    series::{SeriesKey, SeriesKind},
    Shared,
};
use crate::{
    domain::unix_now,
    serving::{
        command,
        protocol::{parse_request, CidrArg, PolicyCall},
    },
};

const PRELUDE: &str = include_str!("prelude.lua");
const AUDIT_MODULE: &str = include_str!("../../../../lua/msys/audit.lua");

/// The hook runs every this many VM instructions.
const HOOK_EVERY: u32 = 1000;

/// What one request (or one script's load) may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub max_instructions: u64,
    pub max_memory: usize,
    pub timeout: Duration,
}

/// Why a script did not give an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    #[error("{script}: {message}")]
    Load { script: String, message: String },
    #[error("{script} (module {module}) {callout}: {message}")]
    Run {
        script: String,
        module: String,
        callout: String,
        message: String,
    },
}

/// What the scripts decided for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// From vctx:set_code / vctx:disconnect.
    pub code: Option<(u16, String)>,
    /// From vctx:tarpit, whole seconds (rounded up).
    pub tarpit: u64,
    pub disconnect: bool,
}

impl Outcome {
    /// As a Postfix access(5) action: the code and text, a `sleep` for a
    /// tarpit, else `dunno`. A 2xx code accepts: `dunno` (Postfix has no
    /// 2xx action; the remaining restrictions decide).
    pub fn action(&self) -> String {
        match &self.code {
            Some((code, text)) if *code >= 400 => {
                let text = text.trim();
                if text.is_empty() {
                    format!("{code} rejected by policy")
                } else {
                    format!("{code} {text}")
                }
            }
            _ if self.tarpit > 0 => format!("sleep {}", self.tarpit),
            _ => "dunno".into(),
        }
    }
}

/// The request being run, for the host's primitives.
#[derive(Debug, Default)]
struct Current {
    call: Option<PolicyCall>,
    session: String,
    /// (module, script, callout) being run.
    module: Option<(String, String, String)>,
    /// The script being loaded.
    loading: Option<String>,
}

#[derive(Debug, Default)]
struct Budget {
    instructions: u64,
    max: u64,
    deadline: Option<Instant>,
    timeout: Duration,
    /// Where and why the budget ran out; set once.
    exceeded: Option<String>,
    /// Hook calls since it ran out (yields that did not happen).
    over: u32,
    /// Where the hook last saw the code, for errors without a place (memory).
    last_seen: Option<String>,
}

pub struct Interp {
    lua: Lua,
    run: Function,
    budget: Arc<Mutex<Budget>>,
    current: Arc<Mutex<Current>>,
    bounds: Bounds,
    /// The scripts' generation this interpreter loaded.
    pub generation: u64,
}

impl Interp {
    /// A new interpreter with `scripts` (path, source) loaded in order.
    pub fn new(
        shared: &Arc<Shared>,
        scripts: &[(PathBuf, String)],
        bounds: Bounds,
        generation: u64,
    ) -> Result<Self, ScriptError> {
        let setup = |message: mlua::Error| ScriptError::Load {
            script: "(policy host)".into(),
            message: message.to_string(),
        };
        let libs = StdLib::COROUTINE
            | StdLib::TABLE
            | StdLib::STRING
            | StdLib::UTF8
            | StdLib::MATH
            | StdLib::OS
            | StdLib::PACKAGE;
        let lua = Lua::new_with(libs, LuaOptions::default()).map_err(setup)?;
        let budget = Arc::new(Mutex::new(Budget::default()));
        let current = Arc::new(Mutex::new(Current::default()));
        restrict(&lua, scripts).map_err(setup)?;
        let host = primitives(&lua, shared, &current).map_err(setup)?;
        let prelude = lua
            .load(PRELUDE)
            .set_name("=policy-host-prelude")
            .into_function()
            .map_err(setup)?;
        let api: Table = prelude.call((host, AUDIT_MODULE)).map_err(setup)?;
        install_hook(&lua, &budget).map_err(setup)?;
        lua.set_memory_limit(bounds.max_memory).map_err(setup)?;
        let interp = Self {
            run: api.get("run").map_err(setup)?,
            lua,
            budget,
            current,
            bounds,
            generation,
        };
        let begin: Function = api.get("begin_script").map_err(setup)?;
        let finish: Function = api.get("finish_script").map_err(setup)?;
        for (path, source) in scripts {
            interp.load_script(path, source, &begin, &finish)?;
        }
        Ok(interp)
    }

    fn load_script(
        &self,
        path: &Path,
        source: &str,
        begin: &Function,
        finish: &Function,
    ) -> Result<(), ScriptError> {
        let script = path.display().to_string();
        let fail = |message: String| ScriptError::Load {
            script: script.clone(),
            message,
        };
        lock(&self.current).loading = Some(script.clone());
        begin
            .call::<()>(script.clone())
            .map_err(|e| fail(e.to_string()))?;
        let chunk = self
            .lua
            .load(source)
            .set_name(format!("@{script}"))
            .into_function()
            .map_err(|e| fail(message_of(&e)))?;
        // The script's top level and its modules' init() under the budget.
        let body = self
            .lua
            .create_function(move |_, (chunk, finish): (Function, Function)| {
                chunk.call::<()>(())?;
                finish.call::<u32>(())
            })
            .map_err(|e| fail(e.to_string()))?;
        let registered = self
            .resume(
                &body,
                (chunk, finish.clone()),
                Instant::now() + self.bounds.timeout,
            )
            .map_err(&fail)?;
        lock(&self.current).loading = None;
        let registered = registered
            .into_iter()
            .next()
            .and_then(|v| v.as_u32())
            .unwrap_or(0);
        if registered == 0 {
            return Err(fail(
                "registers no module (msys.registerModule(name, table))".into(),
            ));
        }
        Ok(())
    }

    /// Runs `f(args)` in a new coroutine under the budget.
    fn resume(
        &self,
        f: &Function,
        args: impl mlua::IntoLuaMulti,
        deadline: Instant,
    ) -> Result<MultiValue, String> {
        {
            let mut budget = lock(&self.budget);
            *budget = Budget {
                max: self.bounds.max_instructions,
                deadline: Some(deadline),
                timeout: self.bounds.timeout,
                ..Budget::default()
            };
        }
        let thread = self
            .lua
            .create_thread(f.clone())
            .map_err(|e| e.to_string())?;
        let result = thread.resume::<MultiValue>(args);
        let exceeded = lock(&self.budget).exceeded.take();
        let outcome = match (result, exceeded) {
            (_, Some(why)) => Err(why),
            (Ok(values), None) if thread.status() == mlua::thread::ThreadStatus::Finished => {
                Ok(values)
            }
            (Ok(_), None) => {
                Err("yielded outside a coroutine (coroutine.yield in a callout)".into())
            }
            (Err(mlua::Error::MemoryError(_)), None) => Err(format!(
                "memory limit of {} bytes reached{}",
                self.bounds.max_memory,
                lock(&self.budget)
                    .last_seen
                    .as_ref()
                    .map_or(String::new(), |at| format!(" near {at}"))
            )),
            (Err(e), None) => Err(message_of(&e)),
        };
        drop(thread);
        if outcome.is_err() {
            // What the failed request left behind must not crowd the next.
            let _ = self.lua.gc_collect();
            let _ = self.lua.gc_collect();
        }
        outcome
    }

    /// Runs the phase's callout of every module for `call`.
    /// `deadline`: when the caller stops waiting (the time limit counts from
    /// the request's arrival, queueing included).
    pub fn run(
        &self,
        call: PolicyCall,
        session: String,
        deadline: Instant,
    ) -> Result<Outcome, ScriptError> {
        let callout = call.phase.callout();
        let (client, port) = (call.client.to_string(), call.local_port.map(i64::from));
        {
            // Kept here for the scripts' calls (`host.attribute`, the
            // audit functions' client) while they run.
            let mut current = lock(&self.current);
            current.call = Some(call);
            current.session = session;
            current.module = None;
        }
        let result = self.resume(&self.run, (callout, client, port), deadline);
        let module = {
            let mut current = lock(&self.current);
            current.call = None;
            current.module.take()
        };
        let values = result.map_err(|message| {
            let (module, script, callout) = module
                .unwrap_or_else(|| ("(none)".into(), "(policy host)".into(), callout.to_string()));
            ScriptError::Run {
                script,
                module,
                callout,
                message,
            }
        })?;
        let mut values = values.into_iter();
        let code = values.next().and_then(|v| v.as_i64());
        let text = values
            .next()
            .and_then(|v| v.as_string().map(|s| s.to_string_lossy()))
            .unwrap_or_default();
        let tarpit = match values.next() {
            Some(Value::Integer(i)) => i as f64,
            Some(Value::Number(n)) => n,
            _ => 0.0,
        };
        let disconnect = values.next().and_then(|v| v.as_boolean()).unwrap_or(false);
        Ok(Outcome {
            code: code.map(|c| (c.clamp(0, 999) as u16, text)),
            tarpit: tarpit.ceil().clamp(0.0, 3600.0) as u64,
            disconnect,
        })
    }

    /// Bytes the interpreter holds.
    pub fn used_memory(&self) -> usize {
        self.lua.used_memory()
    }
}

/// The interpreter's own state, shared only with its callbacks, which run
/// on the thread running the interpreter: never contended, and a panic in
/// one leaves nothing half-done that the next request would trip on.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// An error's message without mlua's wrapping: `script.lua:12: text`.
fn message_of(error: &mlua::Error) -> String {
    match error {
        mlua::Error::CallbackError { cause, .. } => message_of(cause),
        mlua::Error::RuntimeError(message) | mlua::Error::SyntaxError { message, .. } => {
            message.clone()
        }
        mlua::Error::ExternalError(e) => e.to_string(),
        other => other.to_string(),
    }
}

/// Takes out what would let a script harm the agent (exit it, run programs,
/// load C code) and points `require` at the scripts' own directories.
fn restrict(lua: &Lua, scripts: &[(PathBuf, String)]) -> mlua::Result<()> {
    let globals = lua.globals();
    let os: Table = globals.get("os")?;
    for name in [
        "exit",
        "execute",
        "remove",
        "rename",
        "tmpname",
        "setlocale",
        "getenv",
    ] {
        os.raw_set(name, Value::Nil)?;
    }
    for name in ["dofile", "loadfile"] {
        globals.raw_set(name, Value::Nil)?;
    }
    let package: Table = globals.get("package")?;
    let mut dirs: Vec<String> = scripts
        .iter()
        .filter_map(|(path, _)| path.parent())
        .map(|dir| format!("{}/?.lua", dir.display()))
        .collect();
    dirs.dedup();
    package.raw_set("path", dirs.join(";"))?;
    package.raw_set("cpath", "")?;
    let searchers: Table = package.get("searchers")?;
    // Only the preload and Lua-file searchers: no C libraries.
    searchers.raw_set(3, Value::Nil)?;
    searchers.raw_set(4, Value::Nil)?;
    Ok(())
}

/// The count hook: instructions and wall time; on running out it yields the
/// request's coroutine (and errors if a yield is not possible there).
fn install_hook(lua: &Lua, budget: &Arc<Mutex<Budget>>) -> mlua::Result<()> {
    let budget = budget.clone();
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(HOOK_EVERY),
        move |_, debug| {
            let mut b = lock(&budget);
            b.instructions += u64::from(HOOK_EVERY);
            let source = debug.source();
            let at = format!(
                "{}:{}",
                source.short_src.as_deref().unwrap_or("?"),
                debug
                    .current_line()
                    .map_or("?".to_string(), |l| l.to_string())
            );
            if b.exceeded.is_none() {
                let why = if b.instructions > b.max {
                    Some(format!("instruction limit of {} reached", b.max))
                } else if b.deadline.is_some_and(|d| Instant::now() >= d) {
                    Some(format!(
                        "time limit of {} ms reached",
                        b.timeout.as_millis()
                    ))
                } else {
                    None
                };
                match why {
                    Some(why) => b.exceeded = Some(format!("{at}: {why}")),
                    None => {
                        b.last_seen = Some(at);
                        return Ok(VmState::Continue);
                    }
                }
            }
            b.over += 1;
            if b.over > 1 {
                // The yield did not happen (not yieldable here): an error each
                // time until the coroutine ends.
                return Err(mlua::Error::RuntimeError(
                    b.exceeded.clone().unwrap_or_default(),
                ));
            }
            Ok(VmState::Yield)
        },
    )
}

/// The agent's side of the prelude: answers, context, series, log.
fn primitives(
    lua: &Lua,
    shared: &Arc<Shared>,
    current: &Arc<Mutex<Current>>,
) -> mlua::Result<Table> {
    let host = lua.create_table()?;
    let state = shared.clone();
    host.set(
        "answer",
        lua.create_function(move |_, line: mlua::LuaString| {
            let request = match parse_request(&line.as_bytes()) {
                Ok(request) => request,
                Err(error) => return Ok(format!("ERR {} {}", error.code, error.message)),
            };
            let reply = command::execute(&request, &state.state, unix_now());
            Ok(reply.to_line().trim_end_matches('\n').to_string())
        })?,
    )?;
    host.set(
        "now",
        lua.create_function(|_, ()| Ok(unix_now().as_secs()))?,
    )?;
    let cur = current.clone();
    host.set(
        "attribute",
        lua.create_function(move |_, name: mlua::LuaString| {
            let Ok(name) = name.to_str() else {
                return Ok(None);
            };
            let current = lock(&cur);
            Ok(current
                .call
                .as_ref()
                .and_then(|c| c.attributes.get(&*name))
                .cloned())
        })?,
    )?;
    let cur = current.clone();
    host.set(
        "entering",
        lua.create_function(
            move |_, (_index, module, script, callout): (i64, String, String, String)| {
                lock(&cur).module = Some((module, script, callout));
                Ok(())
            },
        )?,
    )?;
    let cur = current.clone();
    host.set(
        "log",
        lua.create_function(move |_, (level, text): (String, String)| {
            let current = lock(&cur);
            let script = current
                .module
                .as_ref()
                .map(|(_, script, _)| script.as_str())
                .or(current.loading.as_deref())
                .unwrap_or("lua policy");
            if level == "warn" {
                log::warn!("lua policy: {text}");
            } else {
                log::info!("{script}: {text}");
            }
            Ok(())
        })?,
    )?;
    let (cur, sh) = (current.clone(), shared.clone());
    host.set(
        "context_get",
        lua.create_function(move |lua, (kind, name): (String, String)| {
            let current = lock(&cur);
            let value = sh.contexts.lock().unwrap_or_else(|p| p.into_inner()).get(
                &current.session,
                kind_of(&kind),
                &name,
            );
            Ok(match value {
                None => Value::Nil,
                Some(ContextValue::Str(s)) => Value::String(lua.create_string(&s)?),
                Some(ContextValue::Int(i)) => Value::Integer(i),
                Some(ContextValue::Num(n)) => Value::Number(n),
                Some(ContextValue::Bool(b)) => Value::Boolean(b),
            })
        })?,
    )?;
    let (cur, sh) = (current.clone(), shared.clone());
    host.set(
        "context_set",
        lua.create_function(move |_, (kind, name, value): (String, String, Value)| {
            let value = match value {
                Value::Nil => None,
                Value::String(s) => Some(ContextValue::Str(s.to_string_lossy())),
                Value::Integer(i) => Some(ContextValue::Int(i)),
                Value::Number(n) => Some(ContextValue::Num(n)),
                Value::Boolean(b) => Some(ContextValue::Bool(b)),
                other => {
                    return Err(mlua::Error::RuntimeError(format!(
                        "vctx:set: a string, number or boolean value expected, got {}",
                        other.type_name()
                    )))
                }
            };
            let current = lock(&cur);
            sh.contexts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set(&current.session, kind_of(&kind), &name, value)
                .map_err(|e| mlua::Error::RuntimeError(format!("vctx:set: {e}")))
        })?,
    )?;
    let sh = shared.clone();
    host.set(
        "series_define",
        lua.create_function(
            move |_, (name, kind, interval, windows): (String, String, Value, Value)| {
                let fail =
                    |e: String| mlua::Error::RuntimeError(format!("msys.audit_series.define: {e}"));
                let kind = SeriesKind::parse(&kind).map_err(|e| fail(e.to_string()))?;
                let whole = |v: &Value| match v {
                    Value::Integer(i) if *i > 0 => Some(*i as u64),
                    Value::Number(n) if *n >= 1.0 && n.fract() == 0.0 => Some(*n as u64),
                    _ => None,
                };
                let (Some(interval), Some(windows)) = (whole(&interval), whole(&windows)) else {
                    return Err(fail(
                        "interval and num_windows must be whole numbers from 1".into(),
                    ));
                };
                sh.series
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .define(&name, kind, interval, windows)
                    .map_err(|e| fail(e.to_string()))
            },
        )?,
    )?;
    let (cur, sh) = (current.clone(), shared.clone());
    host.set(
        "series_add",
        lua.create_function(
            move |_, (name, key, count): (String, Option<String>, i64)| {
                let fail =
                    |e: String| mlua::Error::RuntimeError(format!("msys.audit_series.add: {e}"));
                let mut series = sh.series.lock().unwrap_or_else(|p| p.into_inner());
                let kind = series.kind(&name).map_err(|e| fail(e.to_string()))?;
                let key = series_key(kind, key, &lock(&cur), true).map_err(fail)?;
                series
                    .add(&name, &key, count, unix_now().as_secs())
                    .map_err(|e| fail(e.to_string()))
            },
        )?,
    )?;
    let (cur, sh) = (current.clone(), shared.clone());
    host.set(
        "series_count",
        lua.create_function(
            move |_, (name, key, startv, endv): (String, Option<String>, u32, u32)| {
                let fail =
                    |e: String| mlua::Error::RuntimeError(format!("msys.audit_series.count: {e}"));
                let series = sh.series.lock().unwrap_or_else(|p| p.into_inner());
                let kind = series.kind(&name).map_err(|e| fail(e.to_string()))?;
                let key = series_key(kind, key, &lock(&cur), false).map_err(fail)?;
                series
                    .count(
                        &name,
                        &key,
                        startv.into(),
                        endv.into(),
                        unix_now().as_secs(),
                    )
                    .map_err(|e| fail(e.to_string()))
            },
        )?,
    )?;
    let (cur, sh) = (current.clone(), shared.clone());
    host.set(
        "series_remove",
        lua.create_function(move |_, (name, key): (String, Option<String>)| {
            let fail = |e: String| {
                mlua::Error::RuntimeError(format!("msys.audit_series.remove_item: {e}"))
            };
            let mut series = sh.series.lock().unwrap_or_else(|p| p.into_inner());
            let kind = series.kind(&name).map_err(|e| fail(e.to_string()))?;
            let key = series_key(kind, key, &lock(&cur), true).map_err(fail)?;
            series.remove(&name, &key).map_err(|e| fail(e.to_string()))
        })?,
    )?;
    Ok(host)
}

fn kind_of(kind: &str) -> Kind {
    if kind == "conn" {
        Kind::Conn
    } else {
        Kind::Mess
    }
}

/// A script's key for a series: for cidr series an IP (adding) or a CIDR
/// form (counting; nil or `/N` is the client's), for string series the string.
fn series_key(
    kind: SeriesKind,
    key: Option<String>,
    current: &Current,
    exact: bool,
) -> Result<SeriesKey, String> {
    let client = current.call.as_ref().map(|c| c.client);
    match kind {
        SeriesKind::Str => key
            .map(SeriesKey::Str)
            .ok_or_else(|| "a string series needs a key".to_string()),
        SeriesKind::Cidr => {
            let arg = match key.as_deref() {
                None => CidrArg::Client,
                Some(text) => {
                    crate::serving::protocol::cidr::parse_cidr(text).map_err(|e| e.message)?
                }
            };
            let net = arg.resolve(client).map_err(|e| e.message)?;
            if exact {
                Ok(SeriesKey::Ip(net.addr()))
            } else {
                Ok(SeriesKey::Net(net))
            }
        }
    }
}
