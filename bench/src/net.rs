//! Real loopback connections: an epoll server standing in for the MTA (it runs
//! in the bench cgroup as a child process), client-holder processes, and the
//! connect and close helpers.
//!
//! Tens of thousands of sockets need separate processes: the hard fd limit
//! here is 20000 and root lacks CAP_SYS_RESOURCE to raise it, so each server
//! or holder process keeps well under it.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};
use mio::{net::TcpListener, Events, Interest, Poll, Token};
use socket2::{Domain, Socket, Type};

use crate::env::{self, BenchCgroup};

/// A private copy of this runner's executable, for spawning the helper
/// processes: the criterion step (`cargo bench`) rebuilds and replaces the
/// binary under target/ while the runner is running.
static HELPER: OnceLock<PathBuf> = OnceLock::new();

/// Copies the running executable to `dir`; call once before spawning helpers.
pub fn install_helper(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let copy = dir.join("bench-helper");
    std::fs::copy(std::env::current_exe()?, &copy).context("copying the runner")?;
    let _ = HELPER.set(copy);
    Ok(())
}

pub fn helper() -> Result<&'static Path> {
    HELPER
        .get()
        .map(PathBuf::as_path)
        .context("install_helper was not called")
}

/// A client socket from `source` (any 127.x.y.z) to `server`. The port is
/// chosen at connect time (IP_BIND_ADDRESS_NO_PORT), so the kernel can pick
/// one per 4-tuple and TIME_WAIT leftovers never exhaust a source's ports.
pub fn connect_from(source: Ipv4Addr, server: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int from a valid pointer.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(source, 0)).into())?;
    socket.connect(&server.into())?;
    Ok(socket)
}

/// Closes with a RST (SO_LINGER 0) instead of a FIN.
pub fn reset(socket: Socket) {
    let _ = socket.set_linger(Some(Duration::ZERO));
    drop(socket);
}

/// The source of held connection `g`: `per_ip` consecutive connections share
/// an address; 250 addresses per /24 under 127.10.0.0/16.
pub fn held_source(g: usize, per_ip: usize) -> Ipv4Addr {
    let ip = g / per_ip;
    Ipv4Addr::new(127, 10, (ip / 250) as u8, (ip % 250 + 1) as u8)
}

// ---------------------------------------------------------------- server --

/// `bench serve --listen ADDR...`: accepts on each address, holds every
/// connection, and closes it when the peer closes (as an MTA does), reading
/// and discarding anything sent. Prints `READY`; on stdin, `stats` is answered
/// with `accepted A open O`; stdin EOF ends the process.
pub fn serve(listen: &[SocketAddr]) -> Result<()> {
    env::raise_fd_limit();
    let mut poll = Poll::new()?;
    let mut listeners = Vec::new();
    for (i, addr) in listen.iter().enumerate() {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        // Restarting after a kill must not wait for the old TIME_WAIT sockets.
        socket.set_reuse_address(true)?;
        socket.bind(&(*addr).into())?;
        // Capped by net.core.somaxconn at this call: the rate runs raise it so
        // the accept queue never overflows (a dropped handshake stalls its
        // client for a 1 s SYN retransmit, which would time a timer, not CPU).
        socket.listen(65535)?;
        socket.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(socket.into());
        poll.registry()
            .register(&mut listener, Token(i), Interest::READABLE)?;
        listeners.push(listener);
    }
    let accepted = Arc::new(AtomicU64::new(0));
    let open = Arc::new(AtomicU64::new(0));
    {
        let (accepted, open) = (accepted.clone(), open.clone());
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            let mut out = std::io::stdout();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                if line.trim() == "stats" {
                    let _ = writeln!(
                        out,
                        "accepted {} open {}",
                        accepted.load(Ordering::Relaxed),
                        open.load(Ordering::Relaxed)
                    );
                    let _ = out.flush();
                }
            }
            std::process::exit(0);
        });
    }
    println!("READY");
    std::io::stdout().flush()?;

    let first_conn = listeners.len();
    let mut conns: Vec<Option<mio::net::TcpStream>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut buffer = [0u8; 4096];
    let mut emfile_reported = false;
    // Listeners whose last accept failed (out of descriptors) with connections
    // still queued: readiness is edge-triggered, so no new event would come
    // for those; they are retried after every turn of the loop instead.
    let mut stalled: Vec<usize> = Vec::new();
    loop {
        let timeout = (!stalled.is_empty()).then_some(std::time::Duration::from_millis(1));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        let mut ready: Vec<usize> = std::mem::take(&mut stalled);
        for event in events.iter() {
            let token = event.token().0;
            if token < first_conn {
                if !ready.contains(&token) {
                    ready.push(token);
                }
                continue;
            }
            let slot = token - first_conn;
            let closed = match conns.get_mut(slot).and_then(Option::as_mut) {
                None => false,
                Some(stream) => loop {
                    match stream.read(&mut buffer) {
                        Ok(0) => break true,
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => break true,
                    }
                },
            };
            if closed {
                if let Some(mut stream) = conns[slot].take() {
                    let _ = poll.registry().deregister(&mut stream);
                }
                free.push(slot);
                open.fetch_sub(1, Ordering::Relaxed);
            }
        }
        // Accepts after the reads, so connections closed this turn have
        // given their descriptors back.
        for token in ready {
            loop {
                match listeners[token].accept() {
                    Ok((mut stream, _)) => {
                        let slot = free.pop().unwrap_or_else(|| {
                            conns.push(None);
                            conns.len() - 1
                        });
                        poll.registry().register(
                            &mut stream,
                            Token(first_conn + slot),
                            Interest::READABLE,
                        )?;
                        conns[slot] = Some(stream);
                        accepted.fetch_add(1, Ordering::Relaxed);
                        open.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        if !emfile_reported {
                            eprintln!("bench serve: accept: {e} (retrying)");
                            emfile_reported = true;
                        }
                        stalled.push(token);
                        break;
                    }
                }
            }
        }
    }
}

/// A `bench serve` child process inside the bench cgroup.
pub struct ServerProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ServerProcess {
    pub fn start(cgroup: &BenchCgroup, ports: &[u16]) -> Result<Self> {
        let mut command = Command::new(helper()?);
        command.arg("serve");
        for port in ports {
            command.arg("--listen").arg(format!("127.0.0.1:{port}"));
        }
        command.stdin(Stdio::piped()).stdout(Stdio::piped());
        cgroup.enter_on_spawn(&mut command);
        let mut child = command.spawn().context("starting bench serve")?;
        let stdin = child.stdin.take().context("piped stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("piped stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line.trim() != "READY" {
            bail!("bench serve said {line:?}");
        }
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (accepted so far, open now).
    pub fn stats(&mut self) -> Result<(u64, u64)> {
        writeln!(self.stdin, "stats")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["accepted", a, "open", o] => Ok((a.parse()?, o.parse()?)),
            _ => bail!("bench serve said {line:?}"),
        }
    }

    /// Raises the server's CPU priority (nice -5): on 2 cores, busy client
    /// threads would otherwise leave it behind, closes queueing in CLOSE_WAIT.
    pub fn prioritize(&self) {
        // SAFETY: setpriority on our own child's pid; failure only leaves the default.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, self.child.id(), -5) };
    }

    /// SIGKILL: the kernel closes every socket the server held, as when an
    /// MTA crashes.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ hold --

/// `bench hold`: opens connections `first..first+count` (sources from
/// [`held_source`]) to `to`, prints `READY n`, and keeps them until stdin
/// closes.
pub fn hold(to: SocketAddr, first: usize, count: usize, per_ip: usize) -> Result<()> {
    env::raise_fd_limit();
    let mut held = Vec::with_capacity(count);
    for g in first..first + count {
        let source = held_source(g, per_ip);
        let socket =
            connect_from(source, to).with_context(|| format!("connect {source} -> {to}"))?;
        held.push(socket);
    }
    println!("READY {}", held.len());
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    Ok(())
}

/// A `bench hold` child process (outside the bench cgroup: clients are not
/// what the agent watches).
pub struct HoldProcess {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl HoldProcess {
    pub fn start(to: SocketAddr, first: usize, count: usize, per_ip: usize) -> Result<Self> {
        let mut child = Command::new(helper()?)
            .args(["hold", "--to", &to.to_string()])
            .args(["--first", &first.to_string()])
            .args(["--count", &count.to_string()])
            .args(["--per-ip", &per_ip.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting bench hold")?;
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().context("piped stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line.trim() != format!("READY {count}") {
            let _ = child.kill();
            let _ = child.wait();
            bail!("bench hold said {line:?}");
        }
        Ok(Self { child, stdin })
    }
}

impl Drop for HoldProcess {
    fn drop(&mut self) {
        // Closing stdin lets the holder exit and close its connections.
        drop(self.stdin.take());
        for _ in 0..500 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `path` names an executable we can spawn (the agent binary).
pub fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
