//! Postfix policy delegation (SMTPD_POLICY_README): `check_policy_service`
//! sends `name=value` lines ending with an empty line; we answer one
//! `action=...` line and an empty line. Connections are persistent. On trouble
//! (a malformed or oversized request, a client too slow to send or read) the
//! server logs a warning and disconnects without replying, as the protocol
//! asks, and Postfix applies its default action.
//!
//! Each request is judged against the configured limits, from the same counts
//! the query socket serves: live sessions from the client's prefix, or
//! connections/receptions/rejections in a monitor's windows. At END-OF-MESSAGE a
//! reception is recorded; whenever the answer rejects or defers, a rejection.
//!
//! `reader` frames requests, `limits` counts one limit, `decision` answers a
//! request, `connection` answers one client's requests, `serve` runs the socket.

mod connection;
mod decision;
mod limits;
mod reader;
mod serve;
#[cfg(test)]
pub(crate) mod test_support;

pub use connection::{answer_requests, Ended, Timeouts};
pub use decision::{conclude, decide, judge, record, refuses, scripted, Decision, PolicyMemory};
pub use reader::{Framer, PolicyError, PolicyRequest};
pub use serve::{serve, serve_on_own_thread};
