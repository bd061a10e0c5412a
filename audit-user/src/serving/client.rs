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
