//! The machine: what it is (for the report), its limits (fds, ports), the
//! bench's child cgroup, sysctls and per-process figures read from /proc.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};

/// Facts about the machine, written at the top of every report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    pub date_utc: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub git_commit: String,
    pub load_average_at_start: String,
    pub rlimit_nofile: u64,
    /// The guest idle driver and its halt-polling window: with no polling a
    /// woken vCPU costs a VM exit, which shows in every socket round trip.
    pub cpuidle: String,
}

impl Machine {
    pub fn describe(workspace: &Path) -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let memory_kib: f64 = fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Self {
            date_utc: utc_now(),
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            cpu_model,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_gib: (memory_kib / (1024.0 * 1024.0) * 10.0).round() / 10.0,
            git_commit: git_commit(workspace).unwrap_or_else(|| "unknown".into()),
            load_average_at_start: read_trimmed("/proc/loadavg"),
            rlimit_nofile: nofile_limit().1,
            cpuidle: format!(
                "{} (guest_halt_poll_ns {})",
                read_trimmed("/sys/devices/system/cpu/cpuidle/current_driver"),
                read_trimmed("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
            ),
        }
    }
}

fn read_trimmed(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The current time as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%d %H:%M:%S UTC")
        .to_string()
}

fn git_commit(workspace: &Path) -> Option<String> {
    let git = workspace.join(".git");
    let head = fs::read_to_string(git.join("HEAD")).ok()?;
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref: ") else {
        return Some(head.to_string());
    };
    if let Ok(commit) = fs::read_to_string(git.join(reference)) {
        return Some(commit.trim().to_string());
    }
    fs::read_to_string(git.join("packed-refs"))
        .ok()?
        .lines()
        .find_map(|l| {
            let (commit, name) = l.split_once(' ')?;
            (name == reference).then(|| commit.to_string())
        })
}

/// (soft, hard) RLIMIT_NOFILE.
pub fn nofile_limit() -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (limit.rlim_cur, limit.rlim_max)
}

/// Raises the soft fd limit to the hard one (root here lacks CAP_SYS_RESOURCE,
/// so the hard limit itself cannot grow); returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    let (_, hard) = nofile_limit();
    let limit = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we own.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    nofile_limit().0
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A sysctl set for the duration of a measurement and restored on drop.
pub struct Sysctl {
    path: PathBuf,
    previous: String,
}

impl Sysctl {
    pub fn set(name: &str, value: &str) -> Result<Self> {
        let path = PathBuf::from("/proc/sys").join(name.replace('.', "/"));
        let previous = fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_string();
        fs::write(&path, value).with_context(|| format!("setting {name}={value}"))?;
        Ok(Self { path, previous })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = fs::write(&self.path, &self.previous);
    }
}

/// A TcpExt counter from /proc/net/netstat (e.g. `ListenOverflows`).
pub fn tcp_ext_counter(name: &str) -> Option<u64> {
    let netstat = fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

pub fn sysctl(name: &str) -> String {
    read_trimmed(&format!("/proc/sys/{}", name.replace('.', "/")))
}

/// The bench's child cgroup: servers run in it, the agent watches it, so the
/// agent sees only the bench's connections, whatever else runs on the box.
pub struct BenchCgroup(PathBuf);

impl BenchCgroup {
    pub fn create() -> Result<Self> {
        let root = inbound_audit::kernel::cgroup::cgroup2_root().context("finding cgroup2")?;
        let path = root.join(format!("inbound-audit-bench-{}", std::process::id()));
        if !path.exists() {
            fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        }
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Makes `command`'s process join this cgroup before exec, so every
    /// socket it creates (listeners, and so accepted sockets) belongs to it.
    pub fn enter_on_spawn(&self, command: &mut Command) {
        integration_tests::join_cgroup_on_exec(command, &self.0);
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        // Only an empty cgroup can go; the servers may take a moment to exit.
        for _ in 0..100 {
            if fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A TCP port below the ephemeral range that nothing listens on now, so
/// client sockets (which take ephemeral ports) never share its number.
pub fn free_port(avoid: &[u16]) -> Result<u16> {
    let low: u16 = sysctl("net.ipv4.ip_local_port_range")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(32_768);
    let start = 20_000u16.min(low.saturating_sub(2_000));
    for port in start..low {
        if avoid.contains(&port) {
            continue;
        }
        if TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free TCP port below {low}")
}

/// Bytes of kernel slab objects in use, over every cache (`/proc/slabinfo`,
/// root only): active objects times object size. Unlike the slab pages in
/// /proc/meminfo, it drops as soon as objects are freed into partial slabs.
pub fn slab_object_bytes() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/slabinfo").context("reading /proc/slabinfo")?;
    let mut total = 0u64;
    for line in text.lines().skip(2) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(active), Some(size)) = (fields.get(1), fields.get(3)) else {
            bail!("unexpected /proc/slabinfo line: {line}");
        };
        total += active.parse::<u64>()? * size.parse::<u64>()?;
    }
    Ok(total)
}

/// Resident memory of a process in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// CPU time (user + system, all threads) a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields follow the last ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks)
}

/// CPU time the whole machine spent busy (user, nice, system, irq, softirq;
/// not idle, iowait or steal), in seconds, from /proc/stat.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let busy = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| fields.get(i).copied().unwrap_or(0.0))
        .sum::<f64>();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(busy / ticks)
}

/// Pins the calling thread to `cpu` until dropped, then restores its CPU set.
/// Processes it spawns meanwhile inherit the pin.
pub struct PinnedThread {
    previous: libc::cpu_set_t,
}

fn cpu_set_of(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

fn set_affinity(tid: libc::pid_t, set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl PinnedThread {
    pub fn to(cpu: usize) -> Result<Self> {
        // SAFETY: as in cpu_set_of; the kernel fills `previous`.
        let mut previous: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut previous)
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
        }
        set_affinity(0, &cpu_set_of(cpu)).context("sched_setaffinity")?;
        Ok(Self { previous })
    }
}

impl Drop for PinnedThread {
    fn drop(&mut self) {
        let _ = set_affinity(0, &self.previous);
    }
}

/// Pins every thread of process `pid` to `cpu` (threads it creates later
/// inherit it), or, with `cpu` None, lets them run on every CPU again.
pub fn pin_process(pid: u32, cpu: Option<usize>) -> Result<()> {
    let set = match cpu {
        Some(cpu) => cpu_set_of(cpu),
        None => {
            // SAFETY: as in cpu_set_of.
            let mut all: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            for cpu in 0..std::thread::available_parallelism().map_or(1, |n| n.get()) {
                unsafe { libc::CPU_SET(cpu, &mut all) };
            }
            all
        }
    };
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: libc::pid_t = task?.file_name().to_string_lossy().parse()?;
        set_affinity(tid, &set).with_context(|| format!("pinning thread {tid} of {pid}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process_figures() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() > 0);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        let now = utc_now();
        assert!(now.ends_with("UTC") && now.len() == 23, "{now}");
    }
}
