//! The listening Unix socket the query and policy servers share: created so
//! that no client can connect before its permissions are in place, and so
//! that no step follows a symlink or leaves another user a window on the path.
//!
//! Every directory above the socket is checked first (sys::fs: only root or
//! the agent's user may write them), so no one else can replace the path
//! between the steps. The socket is born with its mode (the umask is set
//! around bind; start-up is single-threaded then), its group is set with
//! lchown, which never follows a symlink, and it listens only after that.

use std::{
    io,
    os::{fd::OwnedFd, unix::fs::FileTypeExt},
    path::{Path, PathBuf},
};

use nix::sys::stat::{umask, Mode};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::net::{UnixListener, UnixStream};

use crate::sys::{
    fs::{DirError, Trust},
    users::group_id,
};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another agent is already serving {path}; stop it first or use --socket")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("the directory of {path}: {source}")]
    Directory { path: PathBuf, source: DirError },
    #[error("unknown group {group} for the query socket")]
    UnknownGroup { group: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// The bound socket; the file is removed when this is dropped.
pub struct QuerySocket {
    /// Bound and listening from the start; registered with the runtime on the
    /// first accept, since binding happens before the runtime exists.
    listener: std::os::unix::net::UnixListener,
    registered: std::sync::OnceLock<UnixListener>,
    path: PathBuf,
}

impl QuerySocket {
    /// Checks (and makes) the directories above `path`, then bind with `mode`
    /// → lchown → listen, so no client can connect before the permissions are
    /// in place. A stale socket file (no agent behind it) is replaced.
    /// Must run while the process has a single thread (the umask is per process).
    pub fn bind(path: &Path, mode: u32, group: Option<&str>) -> Result<Self, SocketError> {
        let io_error = |action: &'static str| {
            move |source| SocketError::Io {
                action,
                path: path.to_path_buf(),
                source,
            }
        };
        Trust::current()
            .ensure(&socket_dir(path))
            .map_err(|source| SocketError::Directory {
                path: path.to_path_buf(),
                source,
            })?;
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(SocketError::NotASocket {
                    path: path.to_path_buf(),
                })
            }
            Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(SocketError::InUse {
                        path: path.to_path_buf(),
                    })
                }
                Err(_) => std::fs::remove_file(path).map_err(io_error("removing stale socket"))?,
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("inspecting")(e)),
        }
        let gid = group.map(socket_group).transpose()?;
        let address = SockAddr::unix(path).map_err(io_error("binding"))?;
        let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)
            .map_err(io_error("creating socket for"))?;
        bind_with_mode(&socket, &address, mode).map_err(io_error("binding"))?;
        let mut remove_on_error = RemoveOnDrop(Some(path.to_path_buf()));
        if let Some(gid) = gid {
            // lchown: a symlink in the socket's place (not possible in a safe
            // directory, but cheap to rule out) would be changed itself, not
            // its target.
            std::os::unix::fs::lchown(path, None, Some(gid)).map_err(io_error("chown"))?;
        }
        socket.listen(1024).map_err(io_error("listening on"))?;
        remove_on_error.0 = None;
        Ok(Self {
            listener: std::os::unix::net::UnixListener::from(OwnedFd::from(socket)),
            registered: std::sync::OnceLock::new(),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next client; must be called inside the runtime.
    pub async fn accept(&self) -> io::Result<UnixStream> {
        let listener = match self.registered.get() {
            Some(listener) => listener,
            None => {
                let listener = UnixListener::from_std(self.listener.try_clone()?)?;
                self.registered.get_or_init(|| listener)
            }
        };
        listener.accept().await.map(|(stream, _)| stream)
    }
}

impl Drop for QuerySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The directory `path` lies in; "." for a bare file name.
pub fn socket_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// bind(2) creates the socket file with 0777 less the umask: with the umask
/// set to the complement of `mode`, it is born with `mode`, never wider.
/// The umask is per process: binds from several threads (the unit tests) take
/// turns, so each restores the umask it found.
fn bind_with_mode(socket: &Socket, address: &SockAddr, mode: u32) -> io::Result<()> {
    static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = UMASK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mask = Mode::from_bits_truncate(!mode & 0o777);
    let previous = umask(mask);
    let bound = socket.bind(address);
    umask(previous);
    bound
}

fn socket_group(name: &str) -> Result<u32, SocketError> {
    name.parse::<u32>()
        .ok()
        .or_else(|| group_id(name))
        .ok_or_else(|| SocketError::UnknownGroup {
            group: name.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "inbound-audit-socket-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn a_bare_socket_name_lies_in_the_current_directory() {
        assert_eq!(socket_dir(Path::new("audit.sock")), Path::new("."));
        assert_eq!(
            socket_dir(Path::new("/run/inbound-audit/audit.sock")),
            Path::new("/run/inbound-audit")
        );
    }

    #[test]
    fn the_socket_is_born_with_its_mode_and_gets_its_group() {
        let dir = scratch("mode");
        let path = dir.join("audit.sock");
        let root = nix::unistd::geteuid().is_root();
        let group = root.then_some("65534");
        let socket = QuerySocket::bind(&path, 0o640, group).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o7777, 0o640);
        if root {
            assert_eq!(meta.gid(), 65534);
        }
        // The umask is back to what it was.
        let probe = dir.join("probe");
        std::fs::write(&probe, "").unwrap();
        assert_ne!(
            std::fs::metadata(&probe).unwrap().mode() & 0o777,
            0o640 & 0o666
        );
        drop(socket);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_is_made_0755_and_a_group_writable_one_is_refused() {
        let dir = scratch("dirs");
        let path = dir.join("new/audit.sock");
        let socket = QuerySocket::bind(&path, 0o660, None).unwrap();
        let mode = std::fs::metadata(dir.join("new")).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o755);
        drop(socket);

        let shared = dir.join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o770)).unwrap();
        let refused = QuerySocket::bind(&shared.join("audit.sock"), 0o660, None);
        match refused {
            Err(SocketError::Directory {
                source: DirError::GroupWritable { path, .. },
                ..
            }) => assert_eq!(path, shared),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("bound in a group-writable directory"),
        }
        assert!(!shared.join("audit.sock").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symlink_in_the_sockets_place_is_refused_and_its_target_untouched() {
        let dir = scratch("symlink");
        let target = dir.join("secret");
        std::fs::write(&target, "root only").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = dir.join("audit.sock");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(matches!(
            QuerySocket::bind(&path, 0o666, Some("0")),
            Err(SocketError::NotASocket { .. })
        ));
        assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o7777, 0o600);
        assert!(std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
