//! The listening Unix socket the query and policy servers share: created so
//! that no client can connect before its permissions are in place.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::FileTypeExt},
    },
    path::{Path, PathBuf},
};

use tokio::net::{UnixListener, UnixStream};

use crate::sys::users::group_id;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another agent is already serving {path}; stop it first or use --socket")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot create directory {path}: {source}")]
    Directory { path: PathBuf, source: io::Error },
    #[error(
        "{path} is writable by every user, who could replace the socket; \
         put the socket in a directory only root (or its group) can write"
    )]
    WorldWritable { path: PathBuf },
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
    /// bind → chmod/chown → listen, so no client can connect before the
    /// permissions are in place. A stale socket file (no agent behind it) is replaced.
    pub fn bind(path: &Path, mode: u32, group: Option<&str>) -> Result<Self, SocketError> {
        let io_error = |action: &'static str| {
            move |source| SocketError::Io {
                action,
                path: path.to_path_buf(),
                source,
            }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| SocketError::Directory {
                path: dir.to_path_buf(),
                source,
            })?;
            // Anyone who can write the directory can replace the socket with
            // their own and answer the MTA's questions.
            let mode = std::fs::metadata(dir)
                .map_err(io_error("inspecting"))?
                .permissions();
            if std::os::unix::fs::PermissionsExt::mode(&mode) & 0o002 != 0 {
                return Err(SocketError::WorldWritable {
                    path: dir.to_path_buf(),
                });
            }
        }
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
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|e| io_error("encoding")(io::Error::new(io::ErrorKind::InvalidInput, e)))?;

        // SAFETY: plain socket(2); the result is checked and owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if fd < 0 {
            return Err(io_error("creating socket for")(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let addr = unix_sockaddr(path).map_err(io_error("binding"))?;
        // SAFETY: addr is a valid sockaddr_un of the given length.
        let rc = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io_error("binding")(io::Error::last_os_error()));
        }
        let mut remove_on_error = RemoveOnDrop(Some(path.to_path_buf()));
        // SAFETY: c_path is a valid NUL-terminated path.
        if unsafe { libc::chmod(c_path.as_ptr(), mode) } != 0 {
            return Err(io_error("chmod")(io::Error::last_os_error()));
        }
        if let Some(gid) = gid {
            // SAFETY: as above; uid -1 leaves the owner unchanged.
            if unsafe { libc::chown(c_path.as_ptr(), u32::MAX, gid) } != 0 {
                return Err(io_error("chown")(io::Error::last_os_error()));
            }
        }
        // SAFETY: fd is a bound stream socket.
        if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&fd), 1024) } != 0 {
            return Err(io_error("listening on")(io::Error::last_os_error()));
        }
        remove_on_error.0 = None;
        Ok(Self {
            listener: std::os::unix::net::UnixListener::from(fd),
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

fn unix_sockaddr(path: &Path) -> io::Result<libc::sockaddr_un> {
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path longer than {} bytes", addr.sun_path.len() - 1),
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    Ok(addr)
}

fn socket_group(name: &str) -> Result<u32, SocketError> {
    name.parse::<u32>()
        .ok()
        .or_else(|| group_id(name))
        .ok_or_else(|| SocketError::UnknownGroup {
            group: name.to_string(),
        })
}
