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

/// Prefixes a request with the client context (`@IP[:PORT] `).
pub fn with_client(client: Option<&str>, request: &str) -> String {
    match client {
        Some(client) => format!("@{client} {request}"),
        None => request.to_string(),
    }
}
