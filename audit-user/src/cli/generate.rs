//! `inbound-audit generate man DIR` / `completions DIR` (hidden): the man pages
//! and shell completions, written from the clap definition at package time so
//! they never drift from `--help`. It lives in the binary because the
//! definition is the binary crate's; `cargo xtask deb` runs it.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap_complete::Shell;

/// The section the agent's pages go in: a system administration daemon.
const MAN_SECTION: &str = "8";

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// What to write
    #[arg(value_enum)]
    what: What,
    /// Directory to write into (created when missing)
    dir: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum What {
    /// inbound-audit.8 and inbound-audit-SUBCOMMAND.8
    Man,
    /// inbound-audit.bash, _inbound-audit (zsh), inbound-audit.fish
    Completions,
}

pub fn run(args: GenerateArgs) -> ExitCode {
    let written = match args.what {
        What::Man => write_man_pages(&args.dir),
        What::Completions => write_completions(&args.dir),
    };
    match written {
        Ok(files) => {
            for file in files {
                println!("{}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("inbound-audit: writing into {}: {e}", args.dir.display());
            ExitCode::FAILURE
        }
    }
}

/// One page for the command and one per visible subcommand, named as
/// `man inbound-audit-agent` finds them.
pub fn write_man_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let command = super::command().version(super::VERSION);
    let mut written = Vec::new();
    let page = |command: clap::Command, name: &str| -> io::Result<PathBuf> {
        let path = dir.join(format!("{name}.{MAN_SECTION}"));
        let mut out = Vec::new();
        clap_mangen::Man::new(command)
            .title(name)
            .section(MAN_SECTION)
            .manual("inbound-audit")
            .source(format!("inbound-audit {}", super::VERSION))
            .render(&mut out)?;
        fs::write(&path, out)?;
        Ok(path)
    };
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("inbound-audit-{}", sub.get_name());
        // The page's NAME line is the command's name: inbound-audit-agent.
        written.push(page(sub.clone().name(name.clone()), &name)?);
    }
    written.push(page(command, "inbound-audit")?);
    Ok(written)
}

/// The three shells Debian packages completions for.
pub fn write_completions(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut command = super::command();
        written.push(clap_complete::generate_to(
            shell,
            &mut command,
            "inbound-audit",
            dir,
        )?);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "inbound-audit-generate-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn man_pages_cover_every_visible_subcommand() {
        let dir = scratch("man");
        let written = write_man_pages(&dir).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for expected in [
            "inbound-audit.8",
            "inbound-audit-agent.8",
            "inbound-audit-query.8",
            "inbound-audit-show.8",
            "inbound-audit-stats.8",
            "inbound-audit-cleanup.8",
        ] {
            assert!(names.contains(&expected.to_string()), "{names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("generate")), "{names:?}");
        let agent = fs::read_to_string(dir.join("inbound-audit-agent.8")).unwrap();
        assert!(agent.contains(".TH inbound-audit-agent 8"), "{agent}");
        assert!(
            agent.contains("inbound\\-audit\\-agent \\- Load"),
            "{agent}"
        );
        assert!(agent.contains("reconcile\\-interval"), "{agent}");
        assert!(agent.contains("RUST_LOG"), "{agent}");
        let main = fs::read_to_string(dir.join("inbound-audit.8")).unwrap();
        assert!(main.contains("commit"), "the page names the build: {main}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn completions_for_bash_zsh_and_fish() {
        let dir = scratch("completions");
        let written = write_completions(&dir).unwrap();
        assert_eq!(written.len(), 3);
        let bash = fs::read_to_string(dir.join("inbound-audit.bash")).unwrap();
        assert!(bash.contains("--pin-dir"), "{bash}");
        let zsh = fs::read_to_string(dir.join("_inbound-audit")).unwrap();
        assert!(zsh.starts_with("#compdef inbound-audit"), "{zsh}");
        let fish = fs::read_to_string(dir.join("inbound-audit.fish")).unwrap();
        assert!(fish.contains("complete -c inbound-audit"), "{fish}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
