//! Finding the cgroup v2 hierarchy the sock_ops program attaches to.

use std::{io, path::PathBuf};

/// The cgroup2 mount point, read from /proc/self/mountinfo: it is not always
/// /sys/fs/cgroup (hybrid hierarchies mount it at /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> io::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    find_cgroup2(&mountinfo).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 file system is mounted (see /proc/self/mountinfo); mount one or pass --cgroup",
        )
    })
}

fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        before
            .split_whitespace()
            .nth(4)
            .map(|m| PathBuf::from(unescape(m)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "24 1 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro\n\
                      25 24 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let escaped = "30 1 0:26 / /mnt/my\\040cgroup rw - cgroup2 none rw\n";
        assert_eq!(find_cgroup2(escaped), Some(PathBuf::from("/mnt/my cgroup")));
        assert_eq!(
            find_cgroup2("24 1 0:22 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"),
            None
        );
    }

    #[test]
    fn this_machine_has_one() {
        let root = cgroup2_root().expect("cgroup2 mounted");
        assert!(root.join("cgroup.procs").exists(), "{}", root.display());
    }
}
