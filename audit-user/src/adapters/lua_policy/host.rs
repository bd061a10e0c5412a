//! The host: a pool of interpreters, each lent to one request at a time and
//! run on the thread that asks (a Postfix connection's own thread; for the
//! async query socket, a blocking-pool thread), so a request costs no
//! hand-off to an interpreter thread and back. A request that finds every
//! interpreter busy waits for one until its deadline, at most
//! `lua_policy_queue` of them at once; past either it is answered the
//! fail-open action at once. A script error, a runaway loop or a memory cap
//! answers it too and is logged with the script and line. The async side
//! never runs Lua, so no script can stall the agent's other clients.

use std::{
    fs,
    path::PathBuf,
    sync::{Arc, Condvar, Mutex, MutexGuard, RwLock},
    time::Instant,
};

use super::{
    context::session_key,
    interp::{Bounds, Interp, Outcome, ScriptError},
    Shared,
};
use crate::{
    adapters::postfix::{record, refuses},
    config::LuaPolicyConfig,
    counting::state::SharedState,
    domain::{unix_now, Series},
    serving::{
        policy_host::{PolicyAnswer, PolicyHost},
        protocol::{Phase, PolicyCall},
    },
};

/// Why the scripts could not be (re)loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("lua_policy_scripts: reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("lua_policy_scripts: {0}")]
    Script(#[from] ScriptError),
}

/// The loaded scripts: what every interpreter runs.
#[derive(Debug)]
struct Scripts {
    generation: u64,
    sources: Vec<(PathBuf, String)>,
    bounds: Bounds,
    fail_action: String,
}

/// The answer to one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// A Postfix access(5) action: `dunno`, `421 text`, `sleep 5`, or the fail action.
    pub action: String,
    /// The scripts did not decide (error, limits, queue): the fail action.
    pub failed: bool,
}

/// Cheap to clone: the handles of one host.
#[derive(Clone)]
pub struct LuaPolicy {
    shared: Arc<Shared>,
    scripts: Arc<RwLock<Arc<Scripts>>>,
    pool: Arc<Pool>,
}

/// The interpreters not lent out (None: not built yet, or lost with a
/// build that failed), and how many requests wait for one.
struct Pool {
    idle: Mutex<Idle>,
    returned: Condvar,
    /// Requests that may wait at once (`lua_policy_queue`).
    queue: usize,
}

struct Idle {
    interps: Vec<Option<Interp>>,
    waiting: usize,
}

/// Why a request got no interpreter.
enum Busy {
    /// `lua_policy_queue` requests wait already.
    QueueFull,
    /// None came back before the request's deadline.
    TimedOut,
}

/// An interpreter lent to one request; back in the pool when dropped, so a
/// panicking script cannot shrink the pool.
struct Lent<'a> {
    pool: &'a Pool,
    interp: Option<Interp>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        self.pool.lock().interps.push(self.interp.take());
        self.pool.returned.notify_one();
    }
}

impl Pool {
    fn new(size: usize, queue: usize) -> Self {
        Self {
            idle: Mutex::new(Idle {
                interps: (0..size.max(1)).map(|_| None).collect(),
                waiting: 0,
            }),
            returned: Condvar::new(),
            queue,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An interpreter for a request due by `deadline`.
    fn lend(&self, deadline: Instant) -> Result<Lent<'_>, Busy> {
        if Instant::now() >= deadline {
            return Err(Busy::TimedOut);
        }
        let mut idle = self.lock();
        if idle.interps.is_empty() {
            if idle.waiting >= self.queue {
                return Err(Busy::QueueFull);
            }
            idle.waiting += 1;
            while idle.interps.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    idle.waiting -= 1;
                    return Err(Busy::TimedOut);
                }
                idle = self
                    .returned
                    .wait_timeout(idle, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            idle.waiting -= 1;
        }
        let interp = idle.interps.pop().expect("checked above");
        Ok(Lent { pool: self, interp })
    }
}

fn bounds_of(config: &LuaPolicyConfig) -> Bounds {
    Bounds {
        max_instructions: config.max_instructions,
        max_memory: config.max_memory,
        timeout: config.timeout,
    }
}

fn read_sources(config: &LuaPolicyConfig) -> Result<Vec<(PathBuf, String)>, LoadError> {
    config
        .scripts
        .iter()
        .map(|path| {
            fs::read_to_string(path)
                .map(|source| (path.clone(), source))
                .map_err(|source| LoadError::Read {
                    path: path.clone(),
                    source,
                })
        })
        .collect()
}

impl LuaPolicy {
    /// Loads the configured scripts (a trial interpreter checks them) and
    /// starts the interpreters.
    pub fn start(
        state: Arc<SharedState>,
        config: &LuaPolicyConfig,
    ) -> Result<Arc<Self>, LoadError> {
        let shared = Arc::new(Shared::new(state));
        let sources = read_sources(config)?;
        let bounds = bounds_of(config);
        let trial = Interp::new(&shared, &sources, bounds, 1)?;
        let scripts = Arc::new(RwLock::new(Arc::new(Scripts {
            generation: 1,
            sources,
            bounds,
            fail_action: config.fail_action.clone(),
        })));
        let pool = Arc::new(Pool::new(config.workers, config.queue));
        // The trial interpreter is a good one: the first request's.
        pool.lock().interps[0] = Some(trial);
        log::info!(
            "lua policy: {} script(s) loaded ({}), {} interpreter(s)",
            config.scripts.len(),
            config
                .scripts
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            config.workers
        );
        Ok(Arc::new(Self {
            shared,
            scripts,
            pool,
        }))
    }

    /// Loads the scripts in a throwaway interpreter: the agent checks them
    /// before it makes anything, so bad scripts refuse the start cleanly.
    pub fn check(config: &crate::config::Config) -> Result<(), LoadError> {
        let state = Arc::new(SharedState::new(
            config.clone(),
            std::collections::HashMap::new(),
        ));
        let shared = Arc::new(Shared::new(state));
        Interp::new(
            &shared,
            &read_sources(&config.lua_policy)?,
            bounds_of(&config.lua_policy),
            0,
        )?;
        Ok(())
    }

    /// SIGHUP: reads and checks the scripts again; on any failure the
    /// running ones stay. Interpreters switch at their next request.
    pub fn reload(&self, config: &LuaPolicyConfig) -> Result<(), LoadError> {
        let sources = read_sources(config)?;
        let bounds = bounds_of(config);
        let generation = self.current().generation + 1;
        Interp::new(&self.shared, &sources, bounds, generation)?;
        *self.scripts.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Scripts {
            generation,
            sources,
            bounds,
            fail_action: config.fail_action.clone(),
        });
        log::info!(
            "lua policy: {} script(s) reloaded (generation {generation})",
            config.scripts.len()
        );
        Ok(())
    }

    fn current(&self) -> Arc<Scripts> {
        self.scripts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs the scripts for `call` on the calling thread, which blocks for
    /// at most the timeout; always answers.
    pub fn run(&self, call: PolicyCall) -> Verdict {
        let scripts = self.current();
        let deadline = Instant::now() + scripts.bounds.timeout;
        self.run_with(call, &scripts, deadline)
    }

    /// [`run`](Self::run) with the scripts read and the deadline counted at
    /// the request's arrival.
    fn run_with(&self, call: PolicyCall, scripts: &Scripts, deadline: Instant) -> Verdict {
        let (client, phase) = (call.client, call.phase);
        let mut lent = match self.pool.lend(deadline) {
            Ok(lent) => lent,
            Err(busy) => {
                let why = match busy {
                    Busy::QueueFull => "every interpreter busy and the queue full".to_string(),
                    Busy::TimedOut => format!(
                        "no interpreter free within {} ms",
                        scripts.bounds.timeout.as_millis()
                    ),
                };
                log::warn!(
                    "lua policy: {why}; {client} {} answered {:?}",
                    phase.name(),
                    scripts.fail_action
                );
                return fail(scripts);
            }
        };
        answer(&self.shared, scripts, &mut lent.interp, call, deadline)
    }

    /// [`run`](Self::run) on a blocking-pool thread, for async callers.
    pub async fn evaluate(&self, call: PolicyCall) -> Verdict {
        let scripts = self.current();
        // From now: a wait for a blocking-pool thread counts too.
        let deadline = Instant::now() + scripts.bounds.timeout;
        let (this, loaded) = (self.clone(), scripts.clone());
        match tokio::task::spawn_blocking(move || this.run_with(call, &loaded, deadline)).await {
            Ok(verdict) => verdict,
            Err(e) => {
                log::error!("lua policy: a script run ended abnormally: {e}");
                fail(&scripts)
            }
        }
    }

    /// Sessions whose context variables are held.
    pub fn sessions(&self) -> usize {
        self.shared
            .contexts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

/// Exim's `policy` requests on the query socket. As the Postfix policy
/// server does, an answer that refuses is a rejection (once per
/// transaction) and an accepted END-OF-MESSAGE a reception.
impl PolicyHost for LuaPolicy {
    fn answer(&self, call: PolicyCall) -> PolicyAnswer {
        // The future owns what it needs: a cheap clone of the handles.
        let this = self.clone();
        Box::pin(async move {
            let (client, phase, session) = (call.client, call.phase, session_key(&call));
            let verdict = this.evaluate(call).await;
            let state = &this.shared.state;
            let now = unix_now();
            if refuses(&verdict.action) {
                let first = this
                    .shared
                    .contexts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .first_refusal(&session);
                if first {
                    record(state, Series::Rejections, client, now);
                }
            } else if phase == Phase::EndOfMessage {
                record(state, Series::Receptions, client, now);
            }
            state.stats.observed.policy_answer(&verdict.action);
            verdict.action
        })
    }
}

fn fail(scripts: &Scripts) -> Verdict {
    Verdict {
        action: scripts.fail_action.clone(),
        failed: true,
    }
}

/// Runs `call` in `interp`, first (re)built when it is missing, of older
/// scripts, or holds more than half its memory cap.
fn answer(
    shared: &Arc<Shared>,
    loaded: &Scripts,
    interp: &mut Option<Interp>,
    call: PolicyCall,
    deadline: Instant,
) -> Verdict {
    let stale = interp.as_ref().is_none_or(|i| {
        i.generation != loaded.generation || i.used_memory() > loaded.bounds.max_memory / 2
    });
    if stale {
        // Dropped first: two copies would hold twice the memory.
        *interp = None;
        match Interp::new(shared, &loaded.sources, loaded.bounds, loaded.generation) {
            Ok(i) => *interp = Some(i),
            Err(e) => {
                log::error!("lua policy: {e}");
                return fail(loaded);
            }
        }
    }
    let interp = interp.as_ref().expect("built above");
    let session = session_key(&call);
    shared
        .contexts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .begin(&session, &call, Instant::now());
    let (client, phase) = (call.client, call.phase);
    match interp.run(call, session, deadline) {
        Ok(outcome) => verdict_of(&outcome),
        Err(e) => {
            log::warn!(
                "lua policy: {e}; {client} {} answered {:?}",
                phase.name(),
                loaded.fail_action
            );
            fail(loaded)
        }
    }
}

fn verdict_of(outcome: &Outcome) -> Verdict {
    Verdict {
        action: outcome.action(),
        failed: false,
    }
}
