//! Requests whose answer is a report (`show`, `stats`): printed line by line.

use std::process::ExitCode;

use inbound_audit::serving::client;

pub fn run_report(socket: &std::path::Path, request: &str) -> ExitCode {
    match client::query_report(socket, request) {
        Ok(Ok(lines)) => {
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Ok(Err(error_line)) => {
            println!("{error_line}");
            ExitCode::from(1)
        }
        Err(e) => unreachable_agent(socket, &e),
    }
}

pub fn unreachable_agent(socket: &std::path::Path, error: &std::io::Error) -> ExitCode {
    eprintln!(
        "inbound-audit: cannot reach the agent at {}: {error}\n\
         Is it running? Start it with `inbound-audit agent` (or `cargo xtask run`), \
         or point --socket at its socket.",
        socket.display()
    );
    ExitCode::from(2)
}
