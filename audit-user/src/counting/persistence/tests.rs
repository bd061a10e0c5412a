//! Tests of the state file: round trip, damage, counts out of range, the
//! temporary file's safety, durability and clean-up, and rejected files.

use std::{net::IpAddr, os::unix::fs::symlink, process::Command, time::Duration};

use ipnet::IpNet;

use super::*;
use crate::domain::Series;

fn at(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn net(text: &str) -> IpNet {
    text.parse().unwrap()
}

fn spec(text: &str) -> MonitorSpec {
    text.parse().unwrap()
}

/// A fresh, empty directory of this test's own.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ia-persist-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A valid (checksummed) file of one "60,1" monitor, one window at epoch 1,
/// holding `entries` in its connections series.
fn file_with(entries: &[(IpAddr, u64)]) -> Vec<u8> {
    let mut body = Vec::new();
    put_u32(&mut body, 1);
    put_u64(&mut body, 60);
    put_u32(&mut body, 1);
    put_u32(&mut body, 1);
    put_u64(&mut body, 1);
    put_u32(&mut body, entries.len() as u32);
    for (address, count) in entries {
        let IpAddr::V4(v4) = address else {
            panic!("IPv4 only here")
        };
        body.push(4);
        body.extend_from_slice(&v4.octets());
        put_u64(&mut body, *count);
    }
    put_u32(&mut body, 0);
    put_u32(&mut body, 0);
    let mut file = STATE_MAGIC.to_vec();
    file.extend_from_slice(&body);
    file.extend_from_slice(&fnv1a(&body).to_le_bytes());
    file
}

#[test]
fn state_round_trips_and_refuses_damage() {
    let dir = std::env::temp_dir().join(format!("ia-monitors-{}", std::process::id()));
    let path = dir.join("monitors.state");
    let mut monitors = Monitors::new(&[spec("60,2"), spec("300,6")], 100);
    monitors.record(Series::Connections, ip("10.0.0.1"), 3, at(30));
    monitors.record(Series::Receptions, ip("2001:db8::1"), 2, at(70));
    monitors.save(&path).unwrap();

    let mut restored = Monitors::new(&[spec("60,2"), spec("10,1")], 100);
    let report = restored.load(&path, at(80)).unwrap();
    assert_eq!(report.restored, vec![spec("60,2")]);
    assert_eq!(report.ignored, vec![spec("300,6")]);
    let m = restored.by_key("60,2").unwrap();
    assert_eq!(
        m.sum(Series::Connections, &net("10.0.0.0/8"), 1, 1, at(80)),
        3
    );
    assert_eq!(
        m.sum(Series::Receptions, &net("2001:db8::/32"), 0, 0, at(80)),
        2
    );
    assert_eq!(m.tracked(), 2);

    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let mut fresh = Monitors::new(&[spec("60,2")], 100);
    assert!(matches!(
        fresh.load(&path, at(80)),
        Err(StateError::Corrupt { .. })
    ));
    assert_eq!(fresh.by_key("60,2").unwrap().tracked(), 0);

    std::fs::write(&path, b"something else entirely").unwrap();
    assert!(matches!(
        fresh.load(&path, at(80)),
        Err(StateError::Foreign { .. })
    ));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn counts_out_of_range_reject_the_file() {
    let dir = scratch("range");
    let path = dir.join("monitors.state");
    let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
    // The file: 10.0.0.1 = 2^64 - 1 made 10.0.0.0/24 read 4.
    for (entries, reason) in [
        (vec![(a, u64::MAX), (b, 5)], "a count above 2^48"),
        (vec![(a, MAX_STORED_COUNT + 1)], "a count above 2^48"),
        (vec![(a, 0)], "an entry with a zero count"),
        (vec![(a, 1), (a, 2)], "an address twice in one window"),
    ] {
        std::fs::write(&path, file_with(&entries)).unwrap();
        let mut monitors = Monitors::new(&[spec("60,1")], 100);
        match monitors.load(&path, at(61)) {
            Err(StateError::Corrupt { reason: got, .. }) => assert_eq!(got, reason, "{entries:?}"),
            other => panic!("{entries:?} loaded: {other:?}"),
        }
        assert_eq!(monitors.by_key("60,1").unwrap().tracked(), 0);
    }
    // The cap itself is a real count.
    std::fs::write(&path, file_with(&[(a, MAX_STORED_COUNT), (b, 5)])).unwrap();
    let mut monitors = Monitors::new(&[spec("60,1")], 100);
    monitors.load(&path, at(61)).unwrap();
    assert_eq!(
        monitors.by_key("60,1").unwrap().sum(
            Series::Connections,
            &net("10.0.0.0/24"),
            0,
            0,
            at(61)
        ),
        MAX_STORED_COUNT + 5
    );
    // Through `restore`, as at start-up: set aside under the documented name.
    std::fs::write(&path, file_with(&[(a, u64::MAX)])).unwrap();
    let mut monitors = Monitors::new(&[spec("60,1")], 100);
    match restore(&mut monitors, &path, at(1_700_000_000)) {
        Restored::Rejected { error, aside } => {
            assert!(matches!(error, StateError::Corrupt { .. }));
            assert_eq!(
                aside.unwrap(),
                dir.join("monitors.state.rejected-1700000000")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(!path.exists());
    assert!(matches!(
        restore(&mut monitors, &path, at(1)),
        Restored::NoFile
    ));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn rejected_files_are_capped() {
    let dir = scratch("rejected");
    let path = dir.join("monitors.state");
    for secs in [100, 104, 101, 103, 102] {
        std::fs::write(rejected_name(&path, secs), b"old").unwrap();
    }
    // Not ours by name: never deleted.
    for other in ["monitors.state.rejected-x", "monitors.rejected-5", "notes"] {
        std::fs::write(dir.join(other), b"keep").unwrap();
    }
    std::fs::write(&path, b"not a state file").unwrap();
    let mut monitors = Monitors::new(&[spec("60,1")], 100);
    let Restored::Rejected { aside, .. } = restore(&mut monitors, &path, at(200)) else {
        panic!("not rejected");
    };
    assert_eq!(aside.unwrap(), dir.join("monitors.state.rejected-200"));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "monitors.rejected-5",
            "monitors.state.rejected-103",
            "monitors.state.rejected-104",
            "monitors.state.rejected-200",
            "monitors.state.rejected-x",
            "notes",
        ]
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn some_monitors() -> Monitors {
    let mut monitors = Monitors::new(&[spec("60,1")], 100_000);
    monitors.record(Series::Connections, ip("10.0.0.1"), 3, at(30));
    monitors
}

#[test]
fn a_link_at_the_temporary_is_never_followed() {
    let dir = scratch("symlink");
    let path = dir.join("monitors.state");
    let victim = dir.join("root-only");
    std::fs::write(&victim, b"precious").unwrap();
    let temporary = temporary_name(&path);
    assert_eq!(temporary, dir.join("monitors.tmp"));

    // A link we own (a stale one, or planted by us): unlinked, then replaced.
    symlink(&victim, &temporary).unwrap();
    some_monitors().save(&path).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(&temporary).is_err());
    assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
    let mut loaded = Monitors::new(&[spec("60,1")], 100);
    assert_eq!(loaded.load(&path, at(31)).unwrap().restored.len(), 1);

    // A dangling link must not create its target either.
    let nowhere = dir.join("created-through-a-link");
    symlink(&nowhere, &temporary).unwrap();
    some_monitors().save(&path).unwrap();
    assert!(!nowhere.exists());

    if !is_root() {
        eprintln!("skipping the foreign-owner half: needs root to lchown a link");
        let _ = std::fs::remove_dir_all(dir);
        return;
    }
    // Someone else's link (another user in a shared dir): left alone, the
    // save fails naming it, the target is untouched and the old state stays.
    symlink(&victim, &temporary).unwrap();
    std::os::unix::fs::lchown(&temporary, Some(65534), Some(65534)).unwrap();
    let before = std::fs::read(&path).unwrap();
    match some_monitors().save(&path) {
        Err(StateError::ForeignTemporary {
            path: named, owner, ..
        }) => {
            assert_eq!(named, temporary);
            assert_eq!(owner, 65534);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_failed_rename_removes_the_temporary_and_names_both_files() {
    let dir = scratch("rename");
    // A non-empty directory where the state file should be: rename fails.
    let path = dir.join("monitors.state");
    std::fs::create_dir_all(path.join("in-the-way")).unwrap();
    match some_monitors().save(&path) {
        Err(StateError::Rename { from, to, .. }) => {
            assert_eq!(from, dir.join("monitors.tmp"));
            assert_eq!(to, path);
        }
        other => panic!("{other:?}"),
    }
    assert!(!dir.join("monitors.tmp").exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_full_disk_leaves_no_temporary_and_the_old_state_intact() {
    if !is_root() {
        eprintln!("skipping: mounting a tiny tmpfs needs root");
        return;
    }
    let dir = scratch("enospc");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipping: could not mount a tmpfs on {}", dir.display());
        return;
    }
    let path = dir.join("monitors.state");
    let outcome = std::panic::catch_unwind(|| {
        some_monitors().save(&path).unwrap();
        let before = std::fs::read(&path).unwrap();
        // About 17 bytes an entry: 20,000 entries do not fit in 64 KiB.
        let mut big = Monitors::new(&[spec("60,1")], 100_000);
        for i in 0..20_000u32 {
            let address = IpAddr::from(std::net::Ipv4Addr::from((10 << 24) | i));
            big.record(Series::Connections, address, 1, at(30));
        }
        match big.save(&path) {
            Err(StateError::Io {
                path: named,
                source,
            }) => {
                assert_eq!(named, dir.join("monitors.tmp"));
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{source}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!dir.join("monitors.tmp").exists());
        assert_eq!(std::fs::read(&path).unwrap(), before);
        // And the next save, with room again, works.
        some_monitors().save(&path).unwrap();
    });
    let _ = Command::new("umount").arg(&dir).status();
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn the_directory_of_a_bare_name_is_the_current_one() {
    assert_eq!(parent_dir(Path::new("monitors.state")), Path::new("."));
    assert_eq!(
        parent_dir(Path::new("/var/x/monitors.state")),
        Path::new("/var/x")
    );
    sync_dir(Path::new(".")).unwrap();
    match sync_dir(Path::new("/nonexistent-ia-dir")) {
        Err(StateError::Io { path, .. }) => assert_eq!(path, Path::new("/nonexistent-ia-dir")),
        other => panic!("{other:?}"),
    }
}

/// Run by [`the_directory_is_fsynced_after_the_rename`] under strace.
#[test]
#[ignore = "a helper: run under strace by the_directory_is_fsynced_after_the_rename"]
fn save_for_strace() {
    let dir = PathBuf::from(std::env::var_os("IA_STRACE_DIR").expect("IA_STRACE_DIR"));
    some_monitors().save(&dir.join("monitors.state")).unwrap();
}

/// The order of the system calls, as strace sees them: the temporary is
/// created exclusively without following links, fsynced, renamed, and then
/// the directory itself is opened and fsynced.
#[test]
fn the_directory_is_fsynced_after_the_rename() {
    let dir = scratch("strace");
    let trace = dir.join("trace");
    let work = dir.join("state");
    std::fs::create_dir_all(&work).unwrap();
    let ran = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=openat,fsync,rename,renameat,renameat2",
            "-o",
        ])
        .arg(&trace)
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "counting::persistence::tests::save_for_strace",
            "--ignored",
            "--test-threads=1",
        ])
        .env("IA_STRACE_DIR", &work)
        .output();
    let Ok(ran) = ran else {
        eprintln!("skipping: strace is not installed");
        return;
    };
    if !ran.status.success() {
        let text = String::from_utf8_lossy(&ran.stderr);
        if text.contains("ptrace") || text.contains("Operation not permitted") {
            eprintln!("skipping: strace cannot trace here: {text}");
            return;
        }
        panic!("helper failed: {text}");
    }
    let lines: Vec<String> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(|l| {
            l.split_once(' ')
                .map_or(l, |(_, rest)| rest)
                .trim_start()
                .to_string()
        })
        .collect();
    let tmp = work.join("monitors.tmp").display().to_string();
    let dir_name = work.display().to_string();
    let fd_of = |line: &str| {
        line.rsplit_once("= ")
            .and_then(|(_, fd)| fd.trim().parse::<i32>().ok())
    };
    let find = |from: usize, what: &dyn Fn(&str) -> bool| {
        lines[from..].iter().position(|l| what(l)).map(|i| i + from)
    };
    let create = find(0, &|l| {
        l.starts_with("openat(") && l.contains(&format!("\"{tmp}\""))
    })
    .unwrap_or_else(|| panic!("no open of the temporary: {lines:#?}"));
    for flag in ["O_CREAT", "O_EXCL", "O_NOFOLLOW"] {
        assert!(lines[create].contains(flag), "{}", lines[create]);
    }
    let tmp_fd = fd_of(&lines[create]).unwrap();
    let file_sync = find(create, &|l| l.starts_with(&format!("fsync({tmp_fd})"))).unwrap();
    let rename = find(file_sync, &|l| l.starts_with("rename") && l.contains(&tmp)).unwrap();
    let dir_open = find(rename, &|l| {
        l.starts_with("openat(") && l.contains(&format!("\"{dir_name}\""))
    })
    .unwrap_or_else(|| panic!("the directory is not opened after the rename: {lines:#?}"));
    let dir_fd = fd_of(&lines[dir_open]).unwrap();
    find(dir_open, &|l| {
        l.starts_with(&format!("fsync({dir_fd})")) && l.ends_with("= 0")
    })
    .unwrap_or_else(|| panic!("the directory is not fsynced: {lines:#?}"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn refusals_are_not_saved_and_the_format_stays_as_it_was() {
    let dir = scratch("refusals");
    let (with, without) = (dir.join("with.state"), dir.join("without.state"));
    let mut monitors = Monitors::new(&[spec("60,1")], 100);
    monitors.record(Series::Connections, ip("10.0.0.1"), 3, at(30));
    monitors.save(&without).unwrap();
    monitors.record(Series::Refusals, ip("10.0.0.2"), 7, at(30));
    monitors.save(&with).unwrap();
    assert_eq!(
        std::fs::read(&with).unwrap(),
        std::fs::read(&without).unwrap()
    );
    // A file in the format of before the refusals series loads as ever.
    std::fs::write(&with, file_with(&[(ip("10.0.0.1"), 3)])).unwrap();
    let mut restored = Monitors::new(&[spec("60,1")], 100);
    restored.load(&with, at(61)).unwrap();
    let m = restored.by_key("60,1").unwrap();
    assert_eq!(
        m.sum(Series::Connections, &net("10.0.0.0/8"), 0, 0, at(61)),
        3
    );
    assert_eq!(m.sum(Series::Refusals, &net("10.0.0.0/8"), 0, 0, at(61)), 0);
    let _ = std::fs::remove_dir_all(dir);
}
