//! The reference policy server (the least any Postfix policy check can cost:
//! `action=dunno` as soon as a request's empty line arrives, no other work),
//! and a policy client that times one request's round trip.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use inbound_bench::stats::Percentiles;

/// A request as Postfix 3.7's smtpd sends it at RCPT (its attributes, in its
/// order), from 127.0.0.1.
pub const RCPT_REQUEST: &[u8] = b"request=smtpd_access_policy\nprotocol_state=RCPT\n\
protocol_name=ESMTP\nclient_address=127.0.0.1\nclient_name=unknown\n\
client_port=40000\nreverse_client_name=unknown\nserver_address=127.0.0.1\n\
server_port=2525\nhelo_name=localhost\nsender=a@example.org\nrecipient=b@example.net\n\
recipient_count=0\nqueue_id=\nstress=\nsize=0\netrn_domain=\nsasl_method=\n\
sasl_username=\nsasl_sender=\nccert_subject=\nccert_issuer=\nccert_fingerprint=\n\
ccert_pubkey_fingerprint=\nencryption_protocol=\nencryption_cipher=\n\
encryption_keysize=0\npolicy_context=\ncompatibility_level=3.6\nmail_version=3.7.11\n\
instance=1b2c.6761c6b2.1\n\n";

/// The reference server: one thread per connection, blocking reads, one
/// write per answer. Stops (and removes its socket) on drop.
pub struct DunnoServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
}

impl DunnoServer {
    /// Listens on `path`, mode 0666 (smtpd runs as user postfix).
    pub fn start(path: &Path) -> Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        {
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let answered = answered.clone();
                    std::thread::spawn(move || serve_dunno(stream, &answered));
                }
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            stop,
            answered,
        })
    }

    /// Requests answered so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

fn serve_dunno(stream: UnixStream, answered: &AtomicU64) {
    let Ok(mut write) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let mut attributes = 0;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line == b"\n" {
            if attributes > 0 {
                if write.write_all(b"action=dunno\n\n").is_err() {
                    return;
                }
                answered.fetch_add(1, Ordering::Relaxed);
            }
            attributes = 0;
        } else {
            attributes += 1;
        }
    }
}

impl Drop for DunnoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Round trips on two policy sockets, one persistent connection each,
/// alternating batches of 1,000 after a warm-up; each socket's in ns.
pub fn alternate_round_trips(
    first: &Path,
    second: &Path,
    batches: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut a = PolicyClient::connect(first)?;
    let mut b = PolicyClient::connect(second)?;
    for _ in 0..200 {
        a.round_trip(RCPT_REQUEST)?;
        b.round_trip(RCPT_REQUEST)?;
    }
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    for _ in 0..batches {
        for _ in 0..1000 {
            on_a.push(a.round_trip(RCPT_REQUEST)?);
        }
        for _ in 0..1000 {
            on_b.push(b.round_trip(RCPT_REQUEST)?);
        }
    }
    Ok((on_a, on_b))
}

/// The `round-trips` helper: [`alternate_round_trips`] from `cpu`, as
/// `p50 p99 p50 p99`.
pub fn print_round_trips(first: &Path, second: &Path, batches: usize, cpu: usize) -> Result<()> {
    let _pinned = crate::env::PinnedThread::to(cpu)?;
    let (a, b) = alternate_round_trips(first, second, batches)?;
    let (a, b) = (Percentiles::of(&a), Percentiles::of(&b));
    println!("{} {} {} {}", a.p50, a.p99, b.p50, b.p99);
    Ok(())
}

/// One persistent policy connection, as smtpd keeps one.
pub struct PolicyClient {
    stream: UnixStream,
    buffer: Vec<u8>,
}

impl PolicyClient {
    pub fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            stream,
            buffer: vec![0; 4096],
        })
    }

    /// Sends `request` and reads the answer (up to its empty line): the round trip in ns.
    pub fn round_trip(&mut self, request: &[u8]) -> Result<f64> {
        let started = Instant::now();
        self.ask(request)?;
        Ok(started.elapsed().as_nanos() as f64)
    }

    /// One request; its action, without `action=`.
    pub fn ask(&mut self, request: &[u8]) -> Result<String> {
        self.stream.write_all(request)?;
        let mut filled = 0;
        loop {
            if let Some(end) = self.buffer[..filled].windows(2).position(|w| w == b"\n\n") {
                let answer = std::str::from_utf8(&self.buffer[..end])?;
                return answer
                    .strip_prefix("action=")
                    .map(str::to_string)
                    .with_context(|| format!("unexpected answer {answer:?}"));
            }
            if filled == self.buffer.len() {
                bail!("answer longer than {} bytes", self.buffer.len());
            }
            let n = self.stream.read(&mut self.buffer[filled..])?;
            if n == 0 {
                bail!("the policy server closed the connection");
            }
            filled += n;
        }
    }
}
