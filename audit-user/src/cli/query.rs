//! `inbound-audit query`: one request, its answer printed; the exit code says
//! OK (0), ERR (1) or no agent (2).

use std::{path::PathBuf, process::ExitCode};

use inbound_audit::{config, serving::client};

use super::report::unreachable_agent;

#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  inbound-audit query 'msys.audit.inbound_session_count(\"10.0.0.0/8\", \"SMTP\")'
  inbound-audit query --client 203.0.113.9:25 'ac:inbound_session_count(\"/24\")'
  inbound-audit query 'audit_service \"SMTP\" \"203.0.113.0/24\"'
  inbound-audit query 'msys.audit.connections(\"60,1\")'")]
pub struct QueryArgs {
    /// The agent's query socket
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_SOCKET_PATH)]
    pub socket: PathBuf,
    /// The connecting client that relative forms (/24, no cidr) refer to: IP[:PORT] [default: none]
    #[arg(long, value_name = "IP[:PORT]")]
    client: Option<String>,
    /// The request, e.g. 'msys.audit.inbound_session_count("10.0.0.0/8", "SMTP")'
    request: String,
}

pub fn run(args: QueryArgs) -> ExitCode {
    let request = client::with_client(args.client.as_deref(), &args.request);
    match client::query(&args.socket, &request) {
        Ok(answer) => {
            println!("{answer}");
            if answer.starts_with("OK") {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => unreachable_agent(&args.socket, &e),
    }
}
