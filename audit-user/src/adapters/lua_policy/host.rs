//! The host: a few interpreter threads behind a bounded queue. A request
//! that finds the queue full, or waits past its deadline, is answered the
//! fail-open action at once; a script error, a runaway loop or a memory cap
//! answers it too and is logged with the script and line. The async side
//! never runs Lua, so no script can stall the agent's other clients.

use std::{
    fs,
    path::PathBuf,
    sync::{
        mpsc::{sync_channel, Receiver, SyncSender, TrySendError},
        Arc, Mutex, RwLock,
    },
    thread,
    time::Instant,
};

use tokio::sync::oneshot;

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
    #[error("lua_policy: starting an interpreter thread: {0}")]
    Thread(std::io::Error),
}

/// The loaded scripts: what every interpreter runs.
#[derive(Debug)]
struct Scripts {
    generation: u64,
    sources: Vec<(PathBuf, String)>,
    bounds: Bounds,
    fail_action: String,
}

struct Job {
    call: PolicyCall,
    deadline: Instant,
    answer: oneshot::Sender<Verdict>,
}

/// The answer to one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// A Postfix access(5) action: `dunno`, `421 text`, `sleep 5`, or the fail action.
    pub action: String,
    /// The scripts did not decide (error, limits, queue): the fail action.
    pub failed: bool,
}

pub struct LuaPolicy {
    shared: Arc<Shared>,
    scripts: Arc<RwLock<Arc<Scripts>>>,
    queue: SyncSender<Job>,
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
        Interp::new(&shared, &sources, bounds, 1)?;
        let scripts = Arc::new(RwLock::new(Arc::new(Scripts {
            generation: 1,
            sources,
            bounds,
            fail_action: config.fail_action.clone(),
        })));
        let (queue, jobs) = sync_channel::<Job>(config.queue);
        let jobs = Arc::new(Mutex::new(jobs));
        for n in 0..config.workers {
            let (shared, scripts, jobs) = (shared.clone(), scripts.clone(), jobs.clone());
            thread::Builder::new()
                .name(format!("lua-policy-{n}"))
                .spawn(move || work(&shared, &scripts, &jobs))
                .map_err(LoadError::Thread)?;
        }
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
            queue,
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

    /// Runs the scripts for `call`; always answers.
    pub async fn evaluate(&self, call: PolicyCall) -> Verdict {
        let scripts = self.current();
        let fail = || Verdict {
            action: scripts.fail_action.clone(),
            failed: true,
        };
        let deadline = Instant::now() + scripts.bounds.timeout;
        let (answer, answered) = oneshot::channel();
        let phase = call.phase;
        let client = call.client;
        match self.queue.try_send(Job {
            call,
            deadline,
            answer,
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                log::warn!(
                    "lua policy: queue full; {client} {} answered {:?}",
                    phase.name(),
                    scripts.fail_action
                );
                return fail();
            }
            Err(TrySendError::Disconnected(_)) => {
                log::error!("lua policy: no interpreter is running");
                return fail();
            }
        }
        match tokio::time::timeout_at(deadline.into(), answered).await {
            Ok(Ok(verdict)) => verdict,
            Ok(Err(_)) => fail(),
            Err(_) => {
                log::warn!(
                    "lua policy: no answer within {} ms for {client} {}; answering {:?}",
                    scripts.bounds.timeout.as_millis(),
                    phase.name(),
                    scripts.fail_action
                );
                fail()
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
        let this = Self {
            shared: self.shared.clone(),
            scripts: self.scripts.clone(),
            queue: self.queue.clone(),
        };
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

/// One interpreter thread: takes jobs until the host is dropped.
fn work(shared: &Arc<Shared>, scripts: &RwLock<Arc<Scripts>>, jobs: &Mutex<Receiver<Job>>) {
    let mut interp: Option<Interp> = None;
    loop {
        let job = {
            let jobs = jobs.lock().unwrap_or_else(|p| p.into_inner());
            match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        if Instant::now() >= job.deadline || job.answer.is_closed() {
            continue; // its caller has answered the fail action already
        }
        let loaded = scripts.read().unwrap_or_else(|p| p.into_inner()).clone();
        let stale = interp.as_ref().is_none_or(|i| {
            i.generation != loaded.generation || i.used_memory() > loaded.bounds.max_memory / 2
        });
        if stale {
            interp = match Interp::new(shared, &loaded.sources, loaded.bounds, loaded.generation) {
                Ok(i) => Some(i),
                Err(e) => {
                    log::error!("lua policy: {e}");
                    let _ = job.answer.send(Verdict {
                        action: loaded.fail_action.clone(),
                        failed: true,
                    });
                    continue;
                }
            };
        }
        let interp = interp.as_ref().expect("made above");
        let session = session_key(&job.call);
        shared
            .contexts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .begin(&session, &job.call, Instant::now());
        let (client, phase) = (job.call.client, job.call.phase);
        let verdict = match interp.run(job.call, session, job.deadline) {
            Ok(outcome) => verdict_of(&outcome),
            Err(e) => {
                log::warn!(
                    "lua policy: {e}; {client} {} answered {:?}",
                    phase.name(),
                    loaded.fail_action
                );
                Verdict {
                    action: loaded.fail_action.clone(),
                    failed: true,
                }
            }
        };
        let _ = job.answer.send(verdict);
    }
}

fn verdict_of(outcome: &Outcome) -> Verdict {
    Verdict {
        action: outcome.action(),
        failed: false,
    }
}
