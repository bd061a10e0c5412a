//! `inbound-audit`: the agent and its command-line client (see `cli/`).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
