//! The monitors' state file: the windows written at shutdown and read back at
//! start, in a versioned, checksummed format, and what happens to a file that
//! does not check out.
//!
//! Format: `STATE_MAGIC`, a body, and the body's FNV-1a hash (little-endian
//! u64). Body: monitor count (u32); per monitor W (u64), N (u32), window count
//! (u32); per window its epoch (u64) and, per series, an entry count (u32) and
//! entries of family byte (4 or 6), address octets and count (u64). Only the
//! first `Series::PERSISTED` series are stored (refusals are not), so files
//! written before the refusals series existed still load.
//!
//! Counts are checked on load, not only the checksum: a stored entry's count
//! is at least 1 (zero entries are never written) and at most
//! [`MAX_STORED_COUNT`], 2^48, which one IP cannot reach in one window (at a
//! million events a second it takes nine years), so a larger one was never
//! counted; addresses appear once per series and window. A file that breaks any
//! rule is rejected whole, like a damaged one.
//!
//! Saving: the state dir may be writable by others, so `monitors.tmp` is never
//! followed or reused. A stale one we own is unlinked (which does not follow a
//! link); then it is created with O_CREAT|O_EXCL|O_NOFOLLOW, so a link planted
//! meanwhile makes the save fail instead of writing through it. The file is
//! written and fsynced, renamed over `monitors.state`, and the directory is
//! fsynced so the rename itself survives a power cut. A failed save removes
//! its temporary and names the file the failure is about.
//!
//! A rejected file is renamed `monitors.state.rejected-<unix secs>`; only the
//! newest [`KEPT_REJECTED`] are kept, so repeated bad starts cannot fill the disk.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{self, Read, Write},
    net::IpAddr,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    counting::monitors::{Monitors, Window},
    domain::{MonitorSpec, Series},
};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not an inbound-audit monitor state file ({reason})")]
    Foreign { path: PathBuf, reason: &'static str },
    #[error("{path} is corrupt ({reason})")]
    Corrupt { path: PathBuf, reason: &'static str },
    #[error("{path} exists and belongs to uid {owner}, not to us (uid {ours}); not touching it")]
    ForeignTemporary {
        path: PathBuf,
        owner: u32,
        ours: u32,
    },
    #[error("renaming {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
}

const STATE_MAGIC: &[u8; 8] = b"IAMON\0\0\x01";

/// The largest count a stored entry may have; see the module comment.
pub const MAX_STORED_COUNT: u64 = 1 << 48;

/// Rejected state files kept for a human to look at; older ones are deleted.
pub const KEPT_REJECTED: usize = 3;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub restored: Vec<MonitorSpec>,
    /// Monitors in the file that are no longer configured.
    pub ignored: Vec<MonitorSpec>,
}

/// What [`restore`] did with the state file.
#[derive(Debug)]
pub enum Restored {
    /// There was none (a first start, or no monitor saved yet).
    NoFile,
    Loaded(LoadReport),
    /// The file did not check out: nothing was loaded and it was set aside
    /// (`aside` says where, or why it could not be moved).
    Rejected {
        error: StateError,
        aside: Result<PathBuf, StateError>,
    },
    /// It could not be read (permissions, I/O): left where it is.
    Unreadable(StateError),
}

/// Loads `path` into `monitors`, setting a file that does not check out aside.
pub fn restore(monitors: &mut Monitors, path: &Path, now: Duration) -> Restored {
    match monitors.load(path, now) {
        Ok(report) => Restored::Loaded(report),
        Err(StateError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Restored::NoFile
        }
        Err(error @ (StateError::Corrupt { .. } | StateError::Foreign { .. })) => {
            Restored::Rejected {
                error,
                aside: set_aside(path, now),
            }
        }
        Err(error) => Restored::Unreadable(error),
    }
}

/// `monitors.state` → `monitors.state.rejected-<secs>`, beside it.
pub fn rejected_name(path: &Path, secs: u64) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".rejected-{secs}"));
    path.with_file_name(name)
}

/// Renames a rejected `path` to [`rejected_name`] and deletes all but the
/// newest [`KEPT_REJECTED`] rejected files; returns the new name.
pub fn set_aside(path: &Path, now: Duration) -> Result<PathBuf, StateError> {
    let aside = rejected_name(path, now.as_secs());
    std::fs::rename(path, &aside).map_err(|source| StateError::Rename {
        from: path.to_path_buf(),
        to: aside.clone(),
        source,
    })?;
    prune_rejected(path)?;
    Ok(aside)
}

/// Deletes rejected copies of `path` beyond the newest [`KEPT_REJECTED`]
/// (by the time in their name); returns the ones deleted.
pub fn prune_rejected(path: &Path) -> Result<Vec<PathBuf>, StateError> {
    let dir = parent_dir(path);
    let prefix = format!(
        "{}.rejected-",
        path.file_name().unwrap_or_default().to_string_lossy()
    );
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StateError::Io { path, source }
    };
    let mut rejected: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let name = entry.file_name();
        let secs = name
            .to_str()
            .and_then(|name| name.strip_prefix(&prefix))
            .and_then(|secs| secs.parse().ok());
        if let Some(secs) = secs {
            rejected.push((secs, entry.path()));
        }
    }
    rejected.sort_unstable_by(|a, b| b.cmp(a));
    let mut deleted = Vec::new();
    for (_, old) in rejected.into_iter().skip(KEPT_REJECTED) {
        // remove_file unlinks; a link among them is removed, never followed.
        std::fs::remove_file(&old).map_err(io_error(&old))?;
        deleted.push(old);
    }
    Ok(deleted)
}

/// The directory holding `path` ("." for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// The temporary `save` writes beside `path`.
pub fn temporary_name(path: &Path) -> PathBuf {
    path.with_extension("tmp")
}

/// Removes a stale temporary if it is ours, without following it.
fn remove_stale(temporary: &Path) -> Result<(), StateError> {
    let io_error = |source| StateError::Io {
        path: temporary.to_path_buf(),
        source,
    };
    let meta = match std::fs::symlink_metadata(temporary) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(e)),
    };
    // SAFETY: geteuid cannot fail and touches no memory.
    let ours = unsafe { libc::geteuid() };
    if meta.uid() != ours {
        return Err(StateError::ForeignTemporary {
            path: temporary.to_path_buf(),
            owner: meta.uid(),
            ours,
        });
    }
    std::fs::remove_file(temporary).map_err(io_error)
}

/// Writes `contents` to `path` through a new temporary, renamed over it, with
/// both fsyncs; see the module comment.
fn write_durably(path: &Path, contents: &[&[u8]]) -> Result<(), StateError> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir).map_err(|source| StateError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let temporary = temporary_name(path);
    remove_stale(&temporary)?;
    let tmp_error = |source| StateError::Io {
        path: temporary.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&temporary)
        .map_err(tmp_error)?;
    let written = contents
        .iter()
        .try_for_each(|part| file.write_all(part))
        .and_then(|()| file.sync_all());
    drop(file);
    let renamed = written.map_err(tmp_error).and_then(|()| {
        std::fs::rename(&temporary, path).map_err(|source| StateError::Rename {
            from: temporary.clone(),
            to: path.to_path_buf(),
            source,
        })
    });
    if let Err(error) = renamed {
        // Ours (created exclusively above), so removing it cannot hit another's file.
        let _ = std::fs::remove_file(&temporary);
        return Err(error);
    }
    sync_dir(dir)
}

impl Monitors {
    /// Writes every window to `path`, durably (see the module comment).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let mut body = Vec::new();
        let saved: Vec<_> = self.saved().collect();
        put_u32(&mut body, saved.len() as u32);
        for (spec, windows) in saved {
            put_u64(&mut body, spec.window_secs);
            put_u32(&mut body, spec.kept);
            put_u32(&mut body, windows.len() as u32);
            for window in windows {
                put_u64(&mut body, window.epoch);
                for index in &window.series[..Series::PERSISTED] {
                    put_u32(&mut body, index.len() as u32);
                    for (ip, count) in index.iter() {
                        match ip {
                            IpAddr::V4(v4) => {
                                body.push(4);
                                body.extend_from_slice(&v4.octets());
                            }
                            IpAddr::V6(v6) => {
                                body.push(6);
                                body.extend_from_slice(&v6.octets());
                            }
                        }
                        // A live count above the cap (only `add` can make one)
                        // is stored at the cap so the file still loads.
                        put_u64(&mut body, count.min(MAX_STORED_COUNT));
                    }
                }
            }
        }
        write_durably(path, &[STATE_MAGIC, &body, &fnv1a(&body).to_le_bytes()])
    }

    /// Reads back what `save` wrote, for the monitors still configured (a
    /// monitor whose spec changed starts empty). Nothing is loaded unless the
    /// whole file checks out.
    pub fn load(&mut self, path: &Path, now: Duration) -> Result<LoadReport, StateError> {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|source| StateError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        let foreign = |reason| StateError::Foreign {
            path: path.to_path_buf(),
            reason,
        };
        let corrupt = |reason| StateError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() < STATE_MAGIC.len() + 8 || &bytes[..STATE_MAGIC.len()] != STATE_MAGIC {
            return Err(foreign("wrong magic number or version"));
        }
        let body = &bytes[STATE_MAGIC.len()..bytes.len() - 8];
        let checksum = u64::from_le_bytes(bytes[bytes.len() - 8..].try_into().expect("8 bytes"));
        if fnv1a(body) != checksum {
            return Err(corrupt("checksum mismatch"));
        }
        let mut input = body;
        let mut parsed = Vec::new();
        for _ in 0..take_u32(&mut input).ok_or(corrupt("truncated"))? {
            let spec = MonitorSpec {
                window_secs: take_u64(&mut input).ok_or(corrupt("truncated"))?,
                kept: take_u32(&mut input).ok_or(corrupt("truncated"))?,
            };
            if spec.window_secs == 0 {
                return Err(corrupt("zero window length"));
            }
            let mut windows = VecDeque::new();
            for _ in 0..take_u32(&mut input).ok_or(corrupt("truncated"))? {
                let mut window = Window::new(take_u64(&mut input).ok_or(corrupt("truncated"))?);
                for index in &mut window.series[..Series::PERSISTED] {
                    for _ in 0..take_u32(&mut input).ok_or(corrupt("truncated"))? {
                        let ip = take_ip(&mut input).ok_or(corrupt("bad address"))?;
                        let count = take_u64(&mut input).ok_or(corrupt("truncated"))?;
                        if count == 0 {
                            return Err(corrupt("an entry with a zero count"));
                        }
                        if count > MAX_STORED_COUNT {
                            return Err(corrupt("a count above 2^48"));
                        }
                        if index.set(ip, count) != 0 {
                            return Err(corrupt("an address twice in one window"));
                        }
                    }
                }
                windows.push_back(window);
            }
            if windows
                .iter()
                .zip(windows.iter().skip(1))
                .any(|(a, b)| a.epoch <= b.epoch)
            {
                return Err(corrupt("windows out of order"));
            }
            parsed.push((spec, windows));
        }
        if !input.is_empty() {
            return Err(corrupt("trailing bytes"));
        }
        let mut report = LoadReport::default();
        for (spec, windows) in parsed {
            if self.restore(spec, windows, now) {
                report.restored.push(spec);
            } else {
                report.ignored.push(spec);
            }
        }
        Ok(report)
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if input.len() < n {
        return None;
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Some(head)
}

fn take_u32(input: &mut &[u8]) -> Option<u32> {
    take(input, 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
}

fn take_u64(input: &mut &[u8]) -> Option<u64> {
    take(input, 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

fn take_ip(input: &mut &[u8]) -> Option<IpAddr> {
    match take(input, 1)?[0] {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(take(input, 4)?).ok()?)),
        6 => Some(IpAddr::from(<[u8; 16]>::try_from(take(input, 16)?).ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
