//! `inbound-audit show all`: every tracked IP with its series, as CSV on
//! stdout (the header, then one row per IP), streamed from the agent.

use std::{
    io::{self, Write},
    path::Path,
    process::ExitCode,
};

use inbound_audit::serving::client::{self, StreamEnd};

use super::report::unreachable_agent;

pub fn run(socket: &Path) -> ExitCode {
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let ended = client::query_stream(socket, "show all", |line| writeln!(out, "{line}"));
    let flushed = out.flush();
    match (ended, flushed) {
        (Ok(StreamEnd::Complete { .. }), Ok(())) => ExitCode::SUCCESS,
        // `| head`: the reader had enough; not an error of ours.
        (Err(e), _) | (Ok(_), Err(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        (Ok(StreamEnd::Refused(line)), _) => {
            println!("{line}");
            ExitCode::from(1)
        }
        (Ok(StreamEnd::Failed(line)), _) => {
            eprintln!("inbound-audit: the dump stopped part way: {line}");
            ExitCode::from(1)
        }
        (Ok(StreamEnd::Cut(why)), _) => {
            eprintln!("inbound-audit: incomplete dump: {why}");
            ExitCode::from(1)
        }
        (Ok(StreamEnd::Complete { .. }), Err(e)) => {
            eprintln!("inbound-audit: writing the dump: {e}");
            ExitCode::from(1)
        }
        (Err(e), _) => unreachable_agent(socket, &e),
    }
}
