//! Dropping privileges once the kernel side is loaded and attached.
//!
//! Loading and attaching need CAP_BPF, CAP_PERFMON (tp_btf), CAP_NET_ADMIN
//! (cgroup attach) and CAP_SYS_ADMIN (mounting bpffs, pinning). Afterwards the
//! agent only makes bpf() calls on the maps and programs it already holds:
//! reading maps, collecting zero entries, running the sync program to heal a
//! count, updating the port map on SIGHUP. Those need CAP_BPF alone (bpf() is
//! refused without it when unprivileged BPF is disabled, the usual setting).
//! Everything else goes, from the bounding set too, and no_new_privs is set, so
//! a compromised agent cannot regain what it dropped.
//!
//! The `caps` crate does the capget/capset/prctl work. The running kernel, not
//! the crate, says which capabilities exist (/proc/sys/kernel/cap_last_cap): a
//! kernel newer than the crate may know numbers the crate has no name for, and
//! those are dropped from the bounding set by number.

use std::collections::HashSet;

pub use caps::Capability;
use caps::{CapSet, CapsHashSet};

/// CAP_BPF's number (linux/capability.h), as the bit to look for in /proc's masks.
pub const CAP_BPF: u32 = Capability::CAP_BPF as u32;

const CAP_LAST_CAP_FILE: &str = "/proc/sys/kernel/cap_last_cap";

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("{step}: {source}")]
    Caps {
        step: &'static str,
        source: caps::errors::CapsError,
    },
    #[error(
        "dropping capability {number} (unknown to the caps crate) from the bounding set: {source}"
    )]
    BoundingByNumber { number: u32, source: nix::Error },
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(nix::Error),
}

fn step(step: &'static str) -> impl FnOnce(caps::errors::CapsError) -> CapsError {
    move |source| CapsError::Caps { step, source }
}

/// Keeps only the capabilities in `keep` that the process has now (effective
/// and permitted), empties the bounding, ambient and inheritable sets of all
/// others, and sets no_new_privs; returns the effective set kept, as a bit mask.
pub fn keep_only(keep: &[Capability]) -> Result<u64, CapsError> {
    let wanted: HashSet<Capability> = keep.iter().copied().collect();
    let permitted = caps::read(None, CapSet::Permitted).map_err(step("reading permitted set"))?;
    let kept: CapsHashSet = permitted.intersection(&wanted).copied().collect();

    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes below.
    let kernel_last = kernel_last_cap();
    let known = caps::runtime::procfs_all_supported(None)
        .unwrap_or_else(|_| caps::runtime::thread_all_supported());
    for &cap in known.iter().filter(|cap| !wanted.contains(cap)) {
        if caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap).map_err(step("dropping from bounding set"))?;
        }
    }
    let crate_last = caps::all().iter().map(|c| u32::from(c.index())).max();
    if let (Some(kernel_last), Some(crate_last)) = (kernel_last, crate_last) {
        for number in crate_last + 1..=kernel_last {
            drop_bounding_by_number(number)?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(step("clearing ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(step("clearing inheritable set"))?;
    // Effective before permitted: the effective set must stay within the permitted one.
    caps::set(None, CapSet::Effective, &kept).map_err(step("setting effective set"))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(step("setting permitted set"))?;
    nix::sys::prctl::set_no_new_privs().map_err(CapsError::NoNewPrivs)?;
    let effective = caps::read(None, CapSet::Effective).map_err(step("reading effective set"))?;
    Ok(mask(&effective))
}

/// Whether the calling thread may use `cap` now.
pub fn effective(cap: Capability) -> bool {
    caps::has_cap(None, CapSet::Effective, cap).unwrap_or(false)
}

/// The bit mask of `set`, as /proc/PID/status shows it.
pub fn mask(set: &CapsHashSet) -> u64 {
    set.iter().fold(0, |mask, cap| mask | cap.bitmask())
}

/// The highest capability number the running kernel knows, if /proc says.
fn kernel_last_cap() -> Option<u32> {
    std::fs::read_to_string(CAP_LAST_CAP_FILE)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The caps crate names only the capabilities it was written for; nix has no
/// PR_CAPBSET_DROP wrapper. A capability newer than both is dropped here.
fn drop_bounding_by_number(number: u32) -> Result<(), CapsError> {
    // SAFETY: prctl with plain integer arguments; it reads or writes no memory.
    let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(number), 0, 0, 0) };
    if rc != 0 {
        return Err(CapsError::BoundingByNumber {
            number,
            source: nix::Error::last(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_bpf_is_bit_39() {
        assert_eq!(CAP_BPF, 39);
        assert_eq!(mask(&[Capability::CAP_BPF].into_iter().collect()), 1 << 39);
    }
}
