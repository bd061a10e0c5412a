//! The `show count for ...` and `show available` requests, in the grammar of
//! Momentum's `cidr_cli` (the cluster console's CIDR shell), for the live
//! data the agent holds. This is what `inbound-audit top` asks.
//!
//! ```text
//! show-count = "show count for" cidr "in" ( series-list / "union(" series-list ")" ) *param
//! series-list = series *( "," series )
//! series     = "sessions" [ "." service ]
//!            / ( "connections" / "receptions" / "rejections" ) [ "." monitor ] [ "@" first [ "-" last ] ]
//! param      = "cidrsize" N [ "to" M ] / "order by count" / "order by cidr"
//!            / "limit" N / "threshold" N
//! ```
//!
//! * `cidr` is `ip/mask` (host bits are ignored; an IPv6 address may be in
//!   brackets). `sessions` alone sums every service; `sessions.SMTP` is one.
//!   A monitored series names a monitor by position (default 0, the first
//!   configured) and a window range (default `@0`, the current window).
//! * One row per network of `cidrsize` bits inside `cidr` holding a non-zero
//!   count (default: the address width, one row per IP; `N to M`: every size
//!   from N to M). A row is `<net> : <count>[,<count>...]`, one count per
//!   series in order, or a single sum for `union(...)`.
//! * `order by cidr` (the default) sorts by network; `order by count` by the
//!   first count (the sum for a union), largest first. `threshold N` keeps rows
//!   whose sort count is at least N; `limit N` the first N rows (default and
//!   most [`MAX_ROWS`]).
//! * Momentum's history clauses (`since`, `on`, `from ... to`, `aggregate`)
//!   are understood and refused with `no_history`: the agent holds live
//!   sessions and its monitors' windows, not Momentum's files.
//! * `show available` lists the series: `<series> : <what it covers>`.
//!
//! Replies are `OK <n>` then n lines, like `show`. Errors: `syntax`,
//! `bad_cidr` (the cidr, or a cidrsize outside it), `unknown_series`,
//! `unknown_service`, `unknown_monitor`, `not_configured` (a monitored series
//! without monitors), `no_history`.
//!
//! Cost: rows are listed without visiting every tracked IP where the order
//! allows. `order by count` on one size takes the first series' best rows
//! from its index (whole addresses: a best-first walk of the trie, pruned by
//! each subtree's largest count; /24 and /64: the per-prefix sums; other
//! sizes: a walk that stops at that length, one step per network), then
//! every other count is a prefix query per row. `order by cidr` takes each
//! series' first `limit` networks in address order. The rest (`union`, a
//! range of sizes by count, a first series over several windows) reads every
//! network of each series in chunks of [`CHUNK`], releasing the lock between
//! them.

mod answer;
#[cfg(test)]
mod model_tests;
mod parse;
#[cfg(test)]
mod tests;

use ipnet::IpNet;

pub use answer::{answer, CHUNK};
pub use parse::parse;

use crate::domain::Series;

/// Most rows one request returns.
pub const MAX_ROWS: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CidrShell {
    Available,
    Count(CountRequest),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountRequest {
    pub cidr: IpNet,
    pub series: Vec<SeriesRef>,
    /// `union(...)`: one summed count per row.
    pub union: bool,
    /// Inclusive range of prefix lengths; None: the address width.
    pub sizes: Option<(u8, u8)>,
    pub order: Order,
    pub limit: usize,
    pub threshold: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Cidr,
    Count,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeriesRef {
    /// None: every service.
    Sessions(Option<String>),
    Monitored {
        series: Series,
        monitor: usize,
        first: u32,
        last: u32,
    },
}

impl std::fmt::Display for SeriesRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SeriesRef::Sessions(None) => f.write_str("sessions"),
            SeriesRef::Sessions(Some(service)) => write!(f, "sessions.{service}"),
            SeriesRef::Monitored {
                series,
                monitor,
                first,
                last,
            } => {
                write!(f, "{}.{monitor}@{first}", series.name())?;
                if last != first {
                    write!(f, "-{last}")?;
                }
                Ok(())
            }
        }
    }
}
