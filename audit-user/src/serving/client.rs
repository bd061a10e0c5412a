//! A blocking client for the query socket (the `query` subcommand and tests).

use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

/// Sends one request and returns the answer line without its LF.
pub fn query(socket: &Path, request: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request.as_bytes())?;
    stream.write_all(b"\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if !line.ends_with('\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without answering",
        ));
    }
    line.pop();
    Ok(line)
}

/// Sends a report request (`show ...`): `Ok(lines)` after an `OK <n>` line, or
/// `Err(line)` with the `ERR ...` line.
pub fn query_report(socket: &Path, request: &str) -> io::Result<Result<Vec<String>, String>> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request.as_bytes())?;
    stream.write_all(b"\n")?;
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let first = first.trim_end().to_string();
    let Some(count) = first
        .strip_prefix("OK ")
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return Ok(Err(first));
    };
    let mut lines = Vec::with_capacity(count);
    for _ in 0..count {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        lines.push(line.trim_end().to_string());
    }
    Ok(Ok(lines))
}

/// Prefixes a request with the client context (`@IP[:PORT] `).
pub fn with_client(client: Option<&str>, request: &str) -> String {
    match client {
        Some(client) => format!("@{client} {request}"),
        None => request.to_string(),
    }
}

/// How a streamed answer (`show all`) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// `END <rows>`, and that many rows came.
    Complete { rows: u64 },
    /// Refused before it began: the `ERR ...` line.
    Refused(String),
    /// Stopped part way by the agent: the `ERR ...` line.
    Failed(String),
    /// Ended without `END`: the agent stopped or dropped us, or the count
    /// after `END` did not match the rows.
    Cut(String),
}

/// Sends a streamed request (`show all`) and hands each line between the
/// `OK csv` line and the end (the header, then the rows) to `line`; an
/// error from `line` stops reading and is returned.
pub fn query_stream(
    socket: &Path,
    request: &str,
    mut line: impl FnMut(&str) -> io::Result<()>,
) -> io::Result<StreamEnd> {
    use crate::serving::show_all::{END_PREFIX, START_LINE};
    let mut stream = UnixStream::connect(socket)?;
    // Between chunks the agent only looks counts up: seconds of silence mean trouble.
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request.as_bytes())?;
    stream.write_all(b"\n")?;
    let mut reader = BufReader::new(stream);
    let mut text = String::new();
    reader.read_line(&mut text)?;
    if text.trim_end() != START_LINE {
        return Ok(StreamEnd::Refused(text.trim_end().to_string()));
    }
    let mut lines: u64 = 0;
    loop {
        text.clear();
        if reader.read_line(&mut text)? == 0 || !text.ends_with('\n') {
            return Ok(StreamEnd::Cut(format!(
                "the stream ended after {} rows without {END_PREFIX}<rows>",
                lines.saturating_sub(1)
            )));
        }
        let current = text.trim_end_matches('\n');
        if let Some(count) = current.strip_prefix(END_PREFIX) {
            let rows = lines.saturating_sub(1);
            return Ok(match count.parse::<u64>() {
                Ok(n) if n == rows => StreamEnd::Complete { rows },
                _ => StreamEnd::Cut(format!("{current:?} after {rows} rows")),
            });
        }
        if current.starts_with("ERR ") {
            return Ok(StreamEnd::Failed(current.to_string()));
        }
        line(current)?;
        lines += 1;
    }
}
