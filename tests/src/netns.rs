//! A network namespace made for one test or bench run (`ip netns add`, lo up),
//! removed on drop. Processes go in with nsenter (`ip netns exec` would remount
//! /sys, hiding bpffs and cgroup2); this process's own sockets go in through a
//! thread that has entered it.

use std::{
    io,
    process::{Command, Stdio},
};

pub struct NetNs(String);

impl NetNs {
    /// `ia-NAME-PID`, with lo up (127.0.0.0/8 is then local inside it).
    pub fn new(name: &str) -> Self {
        let name = format!("ia-{name}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name]).unwrap_or_else(|e| panic!("ip netns add {name}: {e}"));
        let ns = Self(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// `/run/netns/NAME`, for `nsenter --net=`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }

    /// `ip -n NAME ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        ip(&all).unwrap_or_else(|e| panic!("ip {}: {e}", all.join(" ")));
    }

    /// `program` run inside the namespace (through nsenter).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net={}", self.path())).arg(program);
        command
    }

    /// Moves the calling thread into the namespace: sockets it makes, threads
    /// and processes it starts, are in the namespace from then on.
    pub fn enter_this_thread(&self) -> io::Result<()> {
        let file = std::fs::File::open(self.path())?;
        // SAFETY: setns on the calling thread only, with a namespace fd we hold.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Runs `f` on a thread that has entered the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter_this_thread()
                        .expect("setns into the test namespace");
                    f()
                })
                .join()
                .expect("netns thread")
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    let status = Command::new("ip").args(args).status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("exit {status}")))
    }
}
