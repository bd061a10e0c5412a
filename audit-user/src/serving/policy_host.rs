//! Where the query socket sends `policy` requests: the Lua policy host lives
//! above this layer (adapters/lua_policy), so the agent hands it in behind
//! this trait.

use std::{future::Future, pin::Pin, sync::Arc};

use crate::serving::protocol::PolicyCall;

/// The action for one call, once the scripts have run.
pub type PolicyAnswer = Pin<Box<dyn Future<Output = String> + Send>>;

/// Answers policy calls. An answer always comes: a script that fails, runs
/// too long or waits too long in the queue answers the fail-open action.
pub trait PolicyHost: Send + Sync {
    fn answer(&self, call: PolicyCall) -> PolicyAnswer;
}

/// The host the query socket uses, if scripts are configured.
pub type PolicyHook = Option<Arc<dyn PolicyHost>>;
