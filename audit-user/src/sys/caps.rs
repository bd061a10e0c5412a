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

use std::io;

/// CAP_BPF, from linux/capability.h.
pub const CAP_BPF: u32 = 39;
const CAP_LAST_CAP: u32 = 40;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Keeps only the capabilities in `keep` (numbers like CAP_BPF) that the
/// process has now; returns the effective set kept, as a bit mask.
pub fn keep_only(keep: &[u32]) -> io::Result<u64> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget with a v3 header and room for its two data words.
    if unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let wanted: u64 = keep.iter().fold(0, |mask, &cap| mask | 1 << cap);
    let permitted = (data[0].permitted as u64 | (data[1].permitted as u64) << 32) & wanted;

    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes below.
    for cap in 0..=CAP_LAST_CAP {
        if wanted & 1 << cap == 0 {
            // SAFETY: prctl with plain integer arguments. EINVAL for a
            // capability this kernel does not know is harmless.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        }
    }
    // SAFETY: prctl with plain integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };

    let words = [permitted as u32, (permitted >> 32) as u32];
    let data = [0, 1].map(|i| CapData {
        effective: words[i],
        permitted: words[i],
        inheritable: 0,
    });
    // SAFETY: capset with a v3 header and its two data words.
    if unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: prctl with plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(permitted)
}
