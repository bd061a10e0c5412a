//! Serving queries on the Unix socket, along the data path: protocol (parsing
//! a request line) → connection (framing) → command (answering from the
//! counting state) → server (accepting, limits, timeouts). Also the client
//! the CLI and tests use. `cidr_shell` is the `show count for ...` request
//! (Momentum's cidr_cli grammar) that `top` is built on; `show_all` is the
//! streamed CSV of every tracked IP (Momentum's console `show all`).

pub mod cidr_shell;
pub mod client;
pub mod command;
pub mod connection;
pub mod policy_host;
pub mod protocol;
pub mod server;
pub mod show_all;
pub mod shutdown;
