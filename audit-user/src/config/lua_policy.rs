//! The Lua policy host's settings: which scripts, and the bounds that keep
//! an operator's script from taking the agent down.

use std::{path::PathBuf, time::Duration};

/// `lua_policy_*` keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuaPolicyConfig {
    /// Momentum-style scripts, run in this order at each policy request;
    /// empty: no policy host.
    pub scripts: Vec<PathBuf>,
    /// The answer when a script fails, runs out of time, instructions or
    /// memory, or the request waits too long: an access(5) action.
    pub fail_action: String,
    /// From a request's arrival to its answer, queueing included.
    pub timeout: Duration,
    /// Lua VM instructions one request's callouts may run.
    pub max_instructions: u64,
    /// Bytes one interpreter may hold.
    pub max_memory: usize,
    /// Interpreters (threads), each with every script loaded. Restart only.
    pub workers: usize,
    /// Requests waiting for an interpreter at most; more answer the fail
    /// action at once. Restart only.
    pub queue: usize,
}

impl Default for LuaPolicyConfig {
    fn default() -> Self {
        Self {
            scripts: Vec::new(),
            fail_action: "dunno".into(),
            timeout: Duration::from_millis(1000),
            max_instructions: 10_000_000,
            max_memory: 64 << 20,
            workers: 2,
            queue: 1024,
        }
    }
}

impl LuaPolicyConfig {
    pub fn enabled(&self) -> bool {
        !self.scripts.is_empty()
    }
}
