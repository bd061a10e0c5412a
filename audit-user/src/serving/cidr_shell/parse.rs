//! The request text to a [`CidrShell`]: a small tokenizer (words, numbers,
//! `,` `(` `)`) and a recursive-descent reading of the grammar in the module
//! comment.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{CidrShell, CountRequest, Order, SeriesRef, MAX_ROWS};
use crate::{
    domain::Series,
    serving::protocol::reply::{ErrorCode, QueryError},
};

/// Whether `text` (a whole request, after any `@client`) is a CIDR shell
/// request; None leaves it to the other console commands (`show <ip>`).
pub fn parse(text: &str) -> Option<Result<CidrShell, QueryError>> {
    let tokens = tokenize(text);
    let words: Vec<&str> = tokens.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["show", "available"] => Some(Ok(CidrShell::Available)),
        ["show", "available", ..] => Some(Err(syntax("usage: show available"))),
        ["show", "count", rest @ ..] => Some(parse_count(rest).map(CidrShell::Count)),
        _ => None,
    }
}

fn syntax(message: impl Into<String>) -> QueryError {
    QueryError::new(ErrorCode::Syntax, message)
}

/// Words split on whitespace, with `,`, `(` and `)` as tokens of their own.
fn tokenize(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        if c.is_whitespace() || matches!(c, ',' | '(' | ')' | ';') {
            if !word.is_empty() {
                out.push(std::mem::take(&mut word));
            }
            if matches!(c, ',' | '(' | ')') {
                out.push(c.to_string());
            }
        } else {
            word.push(c);
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

struct Tokens<'a> {
    words: &'a [&'a str],
    at: usize,
}

impl<'a> Tokens<'a> {
    fn peek(&self) -> Option<&'a str> {
        self.words.get(self.at).copied()
    }

    fn next(&mut self) -> Option<&'a str> {
        let word = self.peek();
        self.at += usize::from(word.is_some());
        word
    }

    fn expect(&mut self, wanted: &str, context: &str) -> Result<(), QueryError> {
        match self.next() {
            Some(word) if word.eq_ignore_ascii_case(wanted) => Ok(()),
            Some(word) => Err(syntax(format!(
                "{context}: expected {wanted:?}, got {word:?}"
            ))),
            None => Err(syntax(format!("{context}: expected {wanted:?}"))),
        }
    }

    fn number(&mut self, what: &str) -> Result<u64, QueryError> {
        let word = self
            .next()
            .ok_or_else(|| syntax(format!("{what}: a number is missing")))?;
        word.parse()
            .map_err(|_| syntax(format!("{what}: {word:?} is not a number")))
    }
}

const USAGE: &str =
    "usage: show count for <ip/mask> in <series>[, <series>...] | union(<series>, ...) \
                     [cidrsize N [to M]] [order by count|cidr] [limit N] [threshold N]";

fn parse_count(words: &[&str]) -> Result<CountRequest, QueryError> {
    let mut t = Tokens { words, at: 0 };
    t.expect("for", USAGE)?;
    let cidr_text = t.next().ok_or_else(|| syntax(USAGE))?;
    let cidr = parse_cidr(cidr_text)?;
    t.expect("in", USAGE)?;
    let union = t.peek().is_some_and(|w| w.eq_ignore_ascii_case("union"));
    if union {
        t.next();
        t.expect("(", "union")?;
    }
    let mut series = vec![parse_series(t.next().ok_or_else(|| syntax(USAGE))?)?];
    while t.peek() == Some(",") {
        t.next();
        series.push(parse_series(
            t.next()
                .ok_or_else(|| syntax("a series is missing after ','"))?,
        )?);
    }
    if union {
        t.expect(")", "union")?;
    }
    let mut request = CountRequest {
        cidr,
        series,
        union,
        sizes: None,
        order: Order::Cidr,
        limit: MAX_ROWS,
        threshold: 0,
    };
    while let Some(word) = t.next() {
        match word.to_ascii_lowercase().as_str() {
            "cidrsize" => {
                let from = prefix_len(t.number("cidrsize")?)?;
                let to = if t.peek().is_some_and(|w| w.eq_ignore_ascii_case("to")) {
                    t.next();
                    prefix_len(t.number("cidrsize ... to")?)?
                } else {
                    from
                };
                request.sizes = Some((from.min(to), from.max(to)));
            }
            "order" => {
                t.expect("by", "order")?;
                request.order = match t.next().map(str::to_ascii_lowercase).as_deref() {
                    Some("count") => Order::Count,
                    Some("cidr") => Order::Cidr,
                    _ => return Err(syntax("order by count or order by cidr")),
                };
            }
            "limit" => {
                let n = t.number("limit")?;
                request.limit = usize::try_from(n).unwrap_or(usize::MAX).min(MAX_ROWS);
            }
            "threshold" => request.threshold = t.number("threshold")?,
            "since" | "on" | "from" | "aggregate" => {
                return Err(QueryError::new(
                    ErrorCode::NoHistory,
                    format!(
                        "'{word}': the agent keeps no dated history, only live sessions and \
                         its monitors' windows (select them with @first-last)"
                    ),
                ))
            }
            other => return Err(syntax(format!("unexpected {other:?}; {USAGE}"))),
        }
    }
    if let Some((_, to)) = request.sizes {
        let (width, len) = match request.cidr {
            IpNet::V4(n) => (32, n.prefix_len()),
            IpNet::V6(n) => (128, n.prefix_len()),
        };
        let (from, _) = request.sizes.expect("checked");
        if to > width || from < len {
            return Err(QueryError::new(
                ErrorCode::BadCidr,
                format!(
                    "cidrsize {from} to {to} is not inside {} (from /{len} to /{width})",
                    request.cidr
                ),
            ));
        }
    }
    Ok(request)
}

fn prefix_len(n: u64) -> Result<u8, QueryError> {
    u8::try_from(n)
        .ok()
        .filter(|&n| n <= 128)
        .ok_or_else(|| QueryError::new(ErrorCode::BadCidr, format!("cidrsize {n} is above 128")))
}

fn parse_cidr(text: &str) -> Result<IpNet, QueryError> {
    let bad = |why: &str| QueryError::new(ErrorCode::BadCidr, format!("bad cidr {text:?}: {why}"));
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| bad("expected ip/mask"))?;
    let addr: IpAddr = addr
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| bad("not an IP address"))?;
    let addr = addr.to_canonical();
    let len: u8 = len.parse().map_err(|_| bad("the mask is not a number"))?;
    IpNet::new(addr, len)
        .map(|net| net.trunc())
        .map_err(|_| bad("the mask is out of range"))
}

fn parse_series(word: &str) -> Result<SeriesRef, QueryError> {
    let unknown = || {
        QueryError::new(
            ErrorCode::UnknownSeries,
            format!(
                "no series {word:?}: sessions[.SERVICE] or \
                 connections|receptions|rejections[.MONITOR][@FIRST[-LAST]] (see show available)"
            ),
        )
    };
    let (name, windows) = match word.split_once('@') {
        Some((name, windows)) => (name, Some(windows)),
        None => (word, None),
    };
    let (kind, qualifier) = match name.split_once('.') {
        Some((kind, qualifier)) => (kind, Some(qualifier)),
        None => (name, None),
    };
    let series = match kind.to_ascii_lowercase().as_str() {
        "sessions" => {
            if windows.is_some() {
                return Err(syntax(format!(
                    "{word:?}: sessions are live, they have no windows"
                )));
            }
            return Ok(SeriesRef::Sessions(qualifier.map(str::to_string)));
        }
        "connections" => Series::Connections,
        "receptions" => Series::Receptions,
        "rejections" => Series::Rejections,
        _ => return Err(unknown()),
    };
    let monitor = match qualifier {
        None => 0,
        Some(text) => text
            .parse()
            .map_err(|_| syntax(format!("{word:?}: the monitor is its position, a number")))?,
    };
    let window = |text: &str| {
        text.parse::<u32>()
            .map_err(|_| syntax(format!("{word:?}: windows are @FIRST[-LAST], numbers")))
    };
    let (first, last) = match windows {
        None => (0, 0),
        Some(range) => match range.split_once('-') {
            Some((a, b)) => (window(a)?, window(b)?),
            None => {
                let n = window(range)?;
                (n, n)
            }
        },
    };
    Ok(SeriesRef::Monitored {
        series,
        monitor,
        first: first.min(last),
        last: first.max(last),
    })
}
