//! The loader's plumbing: bpffs and the pin directory, the pinned layout's
//! version check, the pinned links (attach, replace, detach), and typed access
//! to the object's programs and maps.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use audit_common::{control, map_names, program_names, LAYOUT_VERSION};
use aya::{
    maps::{Array, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        BtfTracePoint,
    },
    Ebpf,
};

use super::error::LoadError;

pub(super) const SOCK_OPS_LINK: &str = "link-sock-ops";
pub(super) const SET_STATE_LINK: &str = "link-set-state";

/// Removes everything the agent pinned: links (which detaches the programs) and maps.
pub fn cleanup(pin_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(pin_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        fs::remove_file(&path)?;
        removed.push(path);
    }
    fs::remove_dir(pin_dir)?;
    Ok(removed)
}

/// Pinned state that this start is creating: a pin directory that was absent
/// or empty when the start began. Dropped before [`FreshPins::keep`], it
/// removes whatever was pinned there, so a start that fails later (a cgroup
/// that does not exist, a seeding error) leaves the system as it found it. A
/// directory that held state (a previous agent's counts) is never touched.
#[must_use = "dropping it at once removes the pins"]
pub struct FreshPins {
    dir: Option<PathBuf>,
}

impl FreshPins {
    pub fn note(pin_dir: &Path) -> Self {
        let fresh = match fs::read_dir(pin_dir) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        };
        Self {
            dir: fresh.then(|| pin_dir.to_path_buf()),
        }
    }

    /// Whether a failed start would remove the pin directory.
    pub fn is_fresh(&self) -> bool {
        self.dir.is_some()
    }

    /// The start succeeded: the pins stay and count on.
    pub fn keep(mut self) {
        self.dir = None;
    }
}

impl Drop for FreshPins {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else {
            return;
        };
        match cleanup(&dir) {
            Ok(removed) if removed.is_empty() && !dir.exists() => {}
            Ok(removed) => log::info!(
                "start failed: removed the {} objects it had pinned in {}",
                removed.len(),
                dir.display()
            ),
            Err(e) => log::warn!(
                "start failed, and removing what it pinned in {} failed too: {e}; run `inbound-audit cleanup --pin-dir {}`",
                dir.display(),
                dir.display()
            ),
        }
    }
}

const BPFFS_MOUNT_POINT: &str = "/sys/fs/bpf";

/// Pinning needs bpffs. Most systems mount it at /sys/fs/bpf at boot; where none
/// is mounted (minimal VMs, containers), mount it there as systemd would.
pub(super) fn ensure_bpffs(pin_dir: &Path) -> Result<(), LoadError> {
    let parent = pin_dir.parent().unwrap_or(pin_dir);
    if is_bpffs(parent) || is_bpffs(pin_dir) {
        return Ok(());
    }
    let bpffs_error = |source| LoadError::Bpffs {
        path: parent.to_path_buf(),
        source,
    };
    if parent != Path::new(BPFFS_MOUNT_POINT) {
        return Err(bpffs_error(io::Error::new(
            io::ErrorKind::Unsupported,
            "only /sys/fs/bpf is mounted automatically; mount bpffs at the pin directory's parent",
        )));
    }
    nix::mount::mount(
        Some("bpffs"),
        BPFFS_MOUNT_POINT,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|errno| bpffs_error(io::Error::from(errno)))?;
    log::info!("mounted bpffs at {BPFFS_MOUNT_POINT} for pinning");
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|stat| stat.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

#[cfg(test)]
mod fresh_pins_tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "inbound-audit-fresh-pins-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_failed_fresh_start_removes_what_it_pinned() {
        let dir = scratch("absent");
        let guard = FreshPins::note(&dir);
        assert!(guard.is_fresh());
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("LIVE_V4"), b"").unwrap();
        drop(guard);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }

    #[test]
    fn an_empty_directory_counts_as_fresh() {
        let dir = scratch("empty");
        fs::create_dir_all(&dir).unwrap();
        let guard = FreshPins::note(&dir);
        assert!(guard.is_fresh());
        fs::write(dir.join("LAYOUT"), b"").unwrap();
        drop(guard);
        assert!(!dir.exists());
    }

    #[test]
    fn a_previous_agents_state_is_never_removed() {
        let dir = scratch("previous");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("LIVE_V4"), b"").unwrap();
        let guard = FreshPins::note(&dir);
        assert!(!guard.is_fresh());
        drop(guard);
        assert!(dir.join("LIVE_V4").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_empty_or_absent_pin_dir_is_current() {
        let dir = scratch("layout");
        assert_eq!(pinned_layout(&dir), PinnedLayout::Current);
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(pinned_layout(&dir), PinnedLayout::Current);
        // Files that are no pinned maps (state from before LAYOUT existed, or
        // not bpffs at all): another layout, replaced.
        fs::write(dir.join("LIVE"), b"").unwrap();
        assert_eq!(pinned_layout(&dir), PinnedLayout::Other(None));
        assert!(replace_other_layout(&dir).unwrap());
        assert!(!dir.exists());
        assert!(!replace_other_layout(&dir).unwrap());
    }

    #[test]
    fn a_successful_start_keeps_its_pins() {
        let dir = scratch("kept");
        let guard = FreshPins::note(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("LIVE_V4"), b"").unwrap();
        guard.keep();
        assert!(dir.join("LIVE_V4").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}

/// What an agent found pinned, before loading over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PinnedLayout {
    /// Nothing pinned, or this agent's own layout: load over it.
    Current,
    /// Another layout (an older or newer agent's, or state from before the
    /// LAYOUT map): its maps cannot be read as ours. `None`: no readable LAYOUT.
    Other(Option<u32>),
}

/// Reads the LAYOUT version pinned in `pin_dir` without loading anything.
pub(super) fn pinned_layout(pin_dir: &Path) -> PinnedLayout {
    let empty = fs::read_dir(pin_dir).map_or(true, |mut e| e.next().is_none());
    if empty {
        return PinnedLayout::Current;
    }
    let version = MapData::from_pin(pin_dir.join(map_names::LAYOUT))
        .ok()
        .and_then(|data| Array::<MapData, u32>::try_from(aya::maps::Map::Array(data)).ok())
        .and_then(|layout| layout.get(&0, 0).ok());
    match version {
        Some(0) | Some(LAYOUT_VERSION) => PinnedLayout::Current,
        other => PinnedLayout::Other(other),
    }
}

/// Pinned state of another layout is replaced, never adopted half-way nor
/// refused: its links are unpinned (detaching its programs) and its maps
/// removed, so the new maps start empty and start-up seeds every open session
/// from sock_diag, as for sessions that predate the programs. Nothing is
/// counted twice: the old counts go with the old maps. Returns whether it did.
pub(super) fn replace_other_layout(pin_dir: &Path) -> Result<bool, LoadError> {
    let PinnedLayout::Other(found) = pinned_layout(pin_dir) else {
        return Ok(false);
    };
    let found = found.map_or_else(
        || "no readable LAYOUT".to_string(),
        |v| format!("layout {v}"),
    );
    let removed = cleanup(pin_dir).map_err(|source| LoadError::PinDir {
        path: pin_dir.to_path_buf(),
        source,
    })?;
    log::warn!(
        "{} held pinned state of {found} (this agent uses layout {LAYOUT_VERSION}): removed its {} objects; open sessions are seeded again from the kernel's socket table",
        pin_dir.display(),
        removed.len()
    );
    Ok(true)
}

pub(super) fn check_layout(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<(), LoadError> {
    let map = ebpf
        .map_mut(map_names::LAYOUT)
        .ok_or(LoadError::MissingMap(map_names::LAYOUT))?;
    let mut layout: Array<&mut MapData, u32> =
        Array::try_from(map).map_err(|source| LoadError::Map {
            name: map_names::LAYOUT,
            source,
        })?;
    let map_error = |source| LoadError::Map {
        name: map_names::LAYOUT,
        source,
    };
    match layout.get(&0, 0).map_err(map_error)? {
        0 => layout.set(0, LAYOUT_VERSION, 0).map_err(map_error),
        LAYOUT_VERSION => Ok(()),
        found => Err(LoadError::Layout {
            dir: pin_dir.to_path_buf(),
            found,
            expected: LAYOUT_VERSION,
        }),
    }
}

/// Attaches the (loaded) tp_btf close backstop and pins its link.
pub(super) fn attach_backstop(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<(), LoadError> {
    let set_state: &mut BtfTracePoint = program(ebpf, program_names::SET_STATE)?;
    let link_id = set_state
        .attach()
        .map_err(program_error(program_names::SET_STATE))?;
    let link: FdLink = set_state
        .take_link(link_id)
        .map_err(program_error(program_names::SET_STATE))?
        .into();
    replace_pinned_link(link, &pin_dir.join(SET_STATE_LINK))
}

/// Unpins the backstop's link, which detaches it; false if it was not attached.
pub(super) fn detach_backstop(pin_dir: &Path) -> Result<bool, LoadError> {
    let path = pin_dir.join(SET_STATE_LINK);
    let link = match PinnedLink::from_pin(&path) {
        Ok(link) => link,
        Err(_) if !path.exists() => return Ok(false),
        Err(e) => {
            return Err(LoadError::Link {
                path,
                message: e.to_string(),
            })
        }
    };
    // Dropping the last reference to the unpinned link detaches the program.
    drop(link.unpin().map_err(|e| LoadError::Link {
        path,
        message: e.to_string(),
    })?);
    Ok(true)
}

pub(super) fn set_mirroring(control: &mut Array<MapData, u32>, on: bool) -> Result<(), LoadError> {
    control
        .set(control::MIRROR_TO_SOCKETS, u32::from(on), 0)
        .map_err(|source| LoadError::Map {
            name: map_names::CONTROL,
            source,
        })
}

pub(super) fn replace_pinned_link(link: FdLink, path: &Path) -> Result<(), LoadError> {
    let link_error = |message: String| LoadError::Link {
        path: path.to_path_buf(),
        message,
    };
    if path.exists() {
        // Dropping the unpinned old link detaches the previous agent's program.
        let old = PinnedLink::from_pin(path).map_err(|e| link_error(e.to_string()))?;
        drop(old.unpin().map_err(|e| link_error(e.to_string()))?);
    }
    // The pin keeps the link (and the program) attached after this process exits.
    let pinned = link.pin(path).map_err(|e| link_error(e.to_string()))?;
    drop(pinned);
    Ok(())
}

pub(super) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(program_error(name))
}

pub(super) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    T::try_from(map).map_err(|source| LoadError::Map { name, source })
}

pub(super) fn program_error(
    name: &'static str,
) -> impl Fn(aya::programs::ProgramError) -> LoadError {
    move |source| LoadError::Program { name, source }
}
