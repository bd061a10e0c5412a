//! Which directories the agent trusts: every directory above a path it serves
//! or keeps state in (the query and policy sockets, the state dir, the pin dir).
//!
//! Whoever can write a directory can rename what lies beneath it and put their
//! own in its place: a socket that root's `inbound-audit query` then talks to,
//! a state file, a symlink the agent follows. So not only a path's immediate
//! parent but every ancestor must be owned by root or by the agent's user and
//! writable by no one else: not by its group, not by every user, unless it is
//! sticky and root's (like /tmp, where only an entry's owner may rename it).
//! A symlinked ancestor is checked twice: where the link lies (its directory
//! is the ancestor before it) and every directory of what it resolves to.

use std::{
    fs::{self, Metadata},
    io,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// What to do about an unsafe directory, shown with every refusal.
const ADVICE: &str = "only root (or the agent's user) may write each directory above the \
                      agent's sockets, state and pins; fix its owner and mode or choose \
                      another path";

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error(
        "{path} (owner uid {owner}, mode {mode:04o}) is writable by every user, who could \
         replace what lies beneath it; {ADVICE}"
    )]
    WorldWritable {
        path: PathBuf,
        owner: u32,
        mode: u32,
    },
    #[error(
        "{path} (owner uid {owner}, group gid {group}, mode {mode:04o}) is writable by its \
         group, whose members could replace what lies beneath it; {ADVICE}"
    )]
    GroupWritable {
        path: PathBuf,
        owner: u32,
        group: u32,
        mode: u32,
    },
    #[error(
        "{path} (owner uid {owner}, mode {mode:04o}) belongs to neither root nor the agent's \
         user (uid {agent}): its owner could replace what lies beneath it; {ADVICE}"
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        agent: u32,
        mode: u32,
    },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("inspecting {path}: {source}")]
    Inspect { path: PathBuf, source: io::Error },
    #[error("cannot create directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
}

/// Who may own the directories: root and `agent_uid` (the agent's effective uid).
#[derive(Debug, Clone, Copy)]
pub struct Trust {
    pub agent_uid: u32,
}

impl Trust {
    /// The running process's rule.
    pub fn current() -> Self {
        Self {
            agent_uid: nix::unistd::geteuid().as_raw(),
        }
    }

    /// Checks `dir` and every directory above it, changing nothing. Returns
    /// the ones that do not exist yet, top first (each below the one before).
    pub fn check(&self, dir: &Path) -> Result<Vec<PathBuf>, DirError> {
        let absolute = absolute(dir)?;
        let mut prefix = PathBuf::new();
        let mut missing = Vec::new();
        for component in absolute.components() {
            prefix.push(component);
            if !missing.is_empty() {
                missing.push(prefix.clone());
                continue;
            }
            let meta = match fs::symlink_metadata(&prefix) {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    missing.push(prefix.clone());
                    continue;
                }
                Err(source) => return Err(inspect(&prefix, source)),
            };
            if meta.file_type().is_symlink() {
                // The link itself lies in the directory checked just before;
                // what it points to, and all above that, must be safe as well.
                // (It resolves, so nothing of it is missing.)
                let target = fs::canonicalize(&prefix).map_err(|e| inspect(&prefix, e))?;
                self.check(&target)?;
            } else {
                self.check_one(&prefix, &meta)?;
            }
        }
        Ok(missing)
    }

    /// Checks `dir` and every directory above it, then creates the missing
    /// ones (owned by the agent, mode 0755), then checks again.
    pub fn ensure(&self, dir: &Path) -> Result<(), DirError> {
        let missing = self.check(dir)?;
        if missing.is_empty() {
            return Ok(());
        }
        let mut builder = fs::DirBuilder::new();
        builder.mode(0o755);
        for path in &missing {
            let create = |source| DirError::Create {
                path: path.clone(),
                source,
            };
            match builder.create(path) {
                // 0755 whatever the umask, so the socket's group can reach it;
                // through a descriptor opened without following a symlink.
                Ok(()) => fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                    .open(path)
                    .and_then(|dir| dir.set_permissions(fs::Permissions::from_mode(0o755)))
                    .map_err(create)?,
                // Made meanwhile (by whom, the check below says).
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(create(source)),
            }
        }
        self.check(dir).map(drop)
    }

    fn check_one(&self, path: &Path, meta: &Metadata) -> Result<(), DirError> {
        if !meta.is_dir() {
            return Err(DirError::NotADirectory {
                path: path.to_path_buf(),
            });
        }
        let (owner, mode) = (meta.uid(), meta.mode() & 0o7777);
        if owner != 0 && owner != self.agent_uid {
            return Err(DirError::Owner {
                path: path.to_path_buf(),
                owner,
                agent: self.agent_uid,
                mode,
            });
        }
        // In a sticky directory only an entry's owner (or root) may rename or
        // remove it: others can add entries but not replace ours.
        if mode & 0o1000 != 0 && owner == 0 {
            return Ok(());
        }
        if mode & 0o002 != 0 {
            return Err(DirError::WorldWritable {
                path: path.to_path_buf(),
                owner,
                mode,
            });
        }
        if mode & 0o020 != 0 {
            return Err(DirError::GroupWritable {
                path: path.to_path_buf(),
                owner,
                group: meta.gid(),
                mode,
            });
        }
        Ok(())
    }
}

fn absolute(path: &Path) -> Result<PathBuf, DirError> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .map_err(|source| inspect(Path::new("."), source))
}

fn inspect(path: &Path, source: io::Error) -> DirError {
    DirError::Inspect {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// A scratch directory (mode 0755) under the system's temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("inbound-audit-fs-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir(&path).unwrap();
            chmod(&path, 0o755);
            Self(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mkdir(path: &Path, mode: u32) {
        fs::create_dir(path).unwrap();
        chmod(path, mode);
    }

    fn me() -> Trust {
        Trust::current()
    }

    #[test]
    fn a_world_writable_ancestor_is_named_even_below_a_safe_directory() {
        let scratch = Scratch::new("world");
        let open = scratch.0.join("x");
        mkdir(&open, 0o777);
        mkdir(&open.join("sub"), 0o755);
        match me().check(&open.join("sub")) {
            Err(DirError::WorldWritable { path, mode, .. }) => {
                assert_eq!(path, open);
                assert_eq!(mode, 0o777);
            }
            other => panic!("{other:?}"),
        }
        let message = me().check(&open.join("sub")).unwrap_err().to_string();
        assert!(message.contains("writable by every user"), "{message}");
        assert!(message.contains("mode 0777"), "{message}");
    }

    #[test]
    fn a_group_writable_directory_is_refused_and_a_sticky_one_of_roots_is_not() {
        let scratch = Scratch::new("group");
        let shared = scratch.0.join("shared");
        mkdir(&shared, 0o775);
        assert!(matches!(
            me().check(&shared),
            Err(DirError::GroupWritable { path, .. }) if path == shared
        ));
        let message = me().check(&shared).unwrap_err().to_string();
        assert!(message.contains("writable by its group"), "{message}");
        assert!(!message.contains("group can write"), "{message}");
        let sticky = scratch.0.join("sticky");
        mkdir(&sticky, 0o1777);
        let owner = fs::metadata(&sticky).unwrap().uid();
        let result = me().check(&sticky);
        if owner == 0 {
            assert_eq!(result.unwrap(), Vec::<PathBuf>::new());
        } else {
            // Sticky but not root's: the owner is the agent itself here, still
            // others may write it.
            assert!(matches!(result, Err(DirError::WorldWritable { .. })));
        }
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        let scratch = Scratch::new("owner");
        let theirs = scratch.0.join("theirs");
        mkdir(&theirs, 0o755);
        if std::os::unix::fs::chown(&theirs, Some(65534), None).is_err() {
            eprintln!("SKIPPED (not root): cannot give a directory to another user");
            return;
        }
        let trust = Trust { agent_uid: 0 };
        assert!(matches!(
            trust.check(&theirs.join("below")),
            Err(DirError::Owner { path, owner: 65534, .. }) if path == theirs
        ));
        // The agent's own user may own them.
        assert!(Trust { agent_uid: 65534 }.check(&theirs).is_ok());
    }

    #[test]
    fn missing_directories_are_reported_then_created_0755() {
        let scratch = Scratch::new("missing");
        let deep = scratch.0.join("a/b/c");
        assert_eq!(
            me().check(&deep).unwrap(),
            vec![scratch.0.join("a"), scratch.0.join("a/b"), deep.clone()]
        );
        assert!(!scratch.0.join("a").exists(), "check changes nothing");
        me().ensure(&deep).unwrap();
        for dir in ["a", "a/b", "a/b/c"] {
            let mode = fs::metadata(scratch.0.join(dir)).unwrap().mode() & 0o7777;
            assert_eq!(mode, 0o755, "{dir}: {mode:o}");
        }
        assert!(me().check(&deep).unwrap().is_empty());
    }

    #[test]
    fn nothing_is_created_below_an_unsafe_directory() {
        let scratch = Scratch::new("nocreate");
        let open = scratch.0.join("open");
        mkdir(&open, 0o777);
        assert!(me().ensure(&open.join("new/deeper")).is_err());
        assert!(!open.join("new").exists());
    }

    #[test]
    fn a_symlinked_ancestor_is_checked_where_it_points() {
        let scratch = Scratch::new("link");
        let open = scratch.0.join("open");
        mkdir(&open, 0o777);
        let target = open.join("real");
        mkdir(&target, 0o755);
        let link = scratch.0.join("link");
        symlink(&target, &link).unwrap();
        assert!(matches!(
            me().check(&link.join("sock-dir")),
            Err(DirError::WorldWritable { path, .. }) if path == open
        ));
        // A link to a safe place is fine, and what is missing is named by
        // the link's path.
        let safe = scratch.0.join("safe");
        mkdir(&safe, 0o755);
        let good = scratch.0.join("good");
        symlink(&safe, &good).unwrap();
        assert_eq!(me().check(&good.join("x")).unwrap(), vec![good.join("x")]);
    }

    #[test]
    fn a_file_in_the_way_is_not_a_directory() {
        let scratch = Scratch::new("file");
        let file = scratch.0.join("file");
        fs::write(&file, "").unwrap();
        assert!(matches!(
            me().check(&file.join("sub")),
            Err(DirError::NotADirectory { path }) if path == file
        ));
    }

    #[test]
    fn the_usual_system_directories_pass() {
        for dir in ["/tmp", "/run", "/var/lib"] {
            if Path::new(dir).exists() {
                me().check(Path::new(dir))
                    .unwrap_or_else(|e| panic!("{dir}: {e}"));
            }
        }
    }
}
