//! `inbound-audit cleanup`: detach the kernel programs and remove all pinned state.

use std::{path::Path, process::ExitCode};

use inbound_audit::kernel::loader;

pub fn run(pin_dir: &Path) -> ExitCode {
    match loader::cleanup(pin_dir) {
        Ok(removed) => {
            println!(
                "removed {} pinned objects from {}",
                removed.len(),
                pin_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("inbound-audit: cleanup of {}: {e}", pin_dir.display());
            ExitCode::FAILURE
        }
    }
}
