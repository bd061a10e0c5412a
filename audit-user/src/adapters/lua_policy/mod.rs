//! The policy host for Momentum-style Lua scripts (`lua_policy_scripts`):
//! at each Postfix policy request, and each Exim `policy` request on the
//! query socket, the registered modules' callout for the SMTP phase runs with
//! `ac`, `vctx` and `msg` as Momentum passes them, and what the scripts set
//! with `vctx:set_code` becomes the answer.
//!
//! `prelude.lua` is the Momentum API (msys.core, msys.registerModule,
//! msys.audit through lua/msys/audit.lua answered in-process,
//! msys.audit_series, vctx, msg); `interp` one interpreter and its bounds;
//! `host` the threads and queue; `context` the vctx variables; `series`
//! the audit series.

mod context;
mod host;
mod interp;
mod series;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

pub use host::{LoadError, LuaPolicy, Verdict};
pub use interp::{Outcome, ScriptError};

use crate::counting::state::SharedState;

/// What every interpreter shares: the counts, the contexts, the series.
pub(crate) struct Shared {
    state: Arc<SharedState>,
    contexts: Mutex<context::Contexts>,
    series: Mutex<series::SeriesStore>,
}

impl Shared {
    fn new(state: Arc<SharedState>) -> Self {
        Self {
            state,
            contexts: Mutex::new(context::Contexts::default()),
            series: Mutex::new(series::SeriesStore::default()),
        }
    }
}
