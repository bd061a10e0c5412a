//! The query protocol spoken on the agent's Unix socket.
//!
//! Clients write one request per line and read one reply line per request,
//! in order. Requests use the call forms of Momentum's `inbound_audit`
//! module, so a policy script's call can be sent as it is written.
//!
//! # Requests
//!
//! ```text
//! request = [ "@" client ( " " / "\t" )+ ] call [ ";" ] LF
//! client  = IPv4 [ ":" port ] / IPv6 / "[" IPv6 "]" [ ":" port ]
//! call    = lua-call / sieve-call
//! ```
//!
//! * A request is at most [`MAX_REQUEST_LEN`] bytes of UTF-8 before its LF,
//!   with no CR and no NUL. Spaces and tabs around it are ignored.
//! * `@client` names the connection the call is evaluated for: the remote
//!   IP Momentum would take from the session, and optionally the local port
//!   it connected to, which selects the listener. Without it, calls that
//!   need the client's address fail with `no_client`.
//! * Lua calls: `msys.audit.inbound_session_count(cidr, servicename)` and
//!   `ac:inbound_session_count(cidr, service_type)`, arguments being Lua
//!   literals (strings in either quote with Lua escapes, `nil`, booleans,
//!   integers, tables).
//! * Sieve calls: `audit_connections_on_service [cidr]`,
//!   `audit_connections_on_listener [cidr]` and
//!   `audit_service service [cidr]`, each argument a quoted string or a
//!   one-string list `["..."]`.
//! * `cidr` is `/N` (the client's IP masked to N bits), `addr/mask`, `addr`,
//!   or omitted/nil for the client's IP itself; see [`cidr`].
//!
//! # Replies
//!
//! ```text
//! reply = "OK " count LF / "ERR " code [ " " message ] LF
//! ```
//!
//! `code` is one of [`ErrorCode`]'s wire names (`syntax`, `bad_cidr`,
//! `unknown_service`, `no_client`, `unknown_function`, `too_long`,
//! `cluster_disabled`, `busy`); `message` is printable text of at most 200
//! bytes meant for people, not for parsing.
//!
//! ```text
//! > @203.0.113.9:25 msys.audit.inbound_session_count("/24")
//! < OK 3
//! > audit_service "SMTP" "10.0.0.0/33"
//! < ERR bad_cidr bad cidr "10.0.0.0/33": prefix length 33 is out of range for IPv4 (0 to 32)
//! ```

pub mod cidr;
pub mod lua;
pub mod policy;
pub mod reply;
pub mod request;

pub use cidr::CidrArg;
pub use policy::{Phase, PolicyCall};
pub use reply::{ErrorCode, QueryError, Reply};
pub use request::{
    parse_request, ClientContext, MonitorRef, Query, Request, ServiceArg, ShowScope,
    MAX_REQUEST_LEN,
};
