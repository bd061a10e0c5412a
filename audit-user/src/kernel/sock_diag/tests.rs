//! The sock_diag client against the live kernel: dumps of real sockets in every
//! family and state, inbound selection, cgroup ids.

use std::{
    io, mem,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{FromRawFd, OwnedFd},
    path::Path,
};

use super::*;
use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tcp_state::{BOUND_INACTIVE, CLOSE, ESTABLISHED, LISTEN, SYN_RECV, TIME_WAIT};

/// asm-generic value; libc does not export it for every target.
const SO_COOKIE: libc::c_int = 57;

fn getsockopt_int<T: Copy + Default>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> T {
    let mut value = T::default();
    let mut len = mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is writable for `len` bytes and outlives the call.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&mut value as *mut T).cast(), &mut len) };
    assert_eq!(rc, 0, "getsockopt: {}", io::Error::last_os_error());
    assert_eq!(len as usize, mem::size_of::<T>());
    value
}

fn so_cookie(s: &impl AsRawFd) -> u64 {
    getsockopt_int(s.as_raw_fd(), libc::SOL_SOCKET, SO_COOKIE)
}

fn v6only(s: &impl AsRawFd) -> bool {
    getsockopt_int::<libc::c_int>(s.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) != 0
}

fn sock_inode(s: &impl AsRawFd) -> u32 {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", s.as_raw_fd())).unwrap();
    let link = link.to_str().unwrap();
    link.strip_prefix("socket:[")
        .and_then(|l| l.strip_suffix(']'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a socket: {link}"))
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// A `[::]:0` listener with IPV6_V6ONLY explicitly off, so the test does not
/// depend on net.ipv6.bindv6only.
fn dual_stack_listener() -> TcpListener {
    // SAFETY: plain syscall; a non-negative result is a fresh fd we own.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: see above.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let off: libc::c_int = 0;
    // SAFETY: `off` is a readable c_int for the stated length.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&off as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "IPV6_V6ONLY: {}", io::Error::last_os_error());
    // SAFETY: all-zero sockaddr_in6 is the unspecified address, port 0.
    let mut addr: libc::sockaddr_in6 = unsafe { mem::zeroed() };
    addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    // SAFETY: `addr` is a valid sockaddr_in6 of the stated length.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_in6).cast(),
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
    // SAFETY: plain syscall on an fd we own.
    let rc = unsafe { libc::listen(fd.as_raw_fd(), 128) };
    assert_eq!(rc, 0, "listen: {}", io::Error::last_os_error());
    TcpListener::from(fd)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// This process's cgroup v2 directory: the cgroup2 mount plus the `0::` path,
/// relative to the mount's root (which differs from `/` inside a cgroup namespace
/// mounted from outside it).
fn own_cgroup2_dir() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let (root, mountpoint) = mountinfo
        .lines()
        .find_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            if post.split(' ').next()? != "cgroup2" {
                return None;
            }
            let fields: Vec<&str> = pre.split(' ').collect();
            Some((
                unescape_mountinfo(fields.get(3)?),
                unescape_mountinfo(fields.get(4)?),
            ))
        })
        .expect("no cgroup2 mount in /proc/self/mountinfo");
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("no cgroup v2 line in /proc/self/cgroup");
    let rel = path
        .strip_prefix(root.trim_end_matches('/'))
        .unwrap_or(path);
    PathBuf::from(mountpoint).join(rel.trim_start_matches('/'))
}

fn raise_nofile(wanted: u64) -> u64 {
    // SAFETY: all-zero rlimit is valid; getrlimit writes into it.
    let mut lim: libc::rlimit = unsafe { mem::zeroed() };
    // SAFETY: `lim` is writable.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    if lim.rlim_cur < wanted {
        lim.rlim_cur = wanted.min(lim.rlim_max);
        // SAFETY: `lim` is a valid rlimit; raising the soft limit up to the hard
        // one needs no privilege.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    }
    lim.rlim_cur
}

fn established(s: &TcpStream, cgroup_id: Option<u64>) -> TcpSocket {
    TcpSocket {
        cookie: so_cookie(s),
        state: ESTABLISHED,
        local: s.local_addr().unwrap(),
        remote: s.peer_addr().unwrap(),
        cgroup_id,
        uid: euid(),
        inode: sock_inode(s),
        session: None,
    }
}

fn listening(l: &TcpListener, cgroup_id: Option<u64>) -> TcpSocket {
    let local = l.local_addr().unwrap();
    let any = match local {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    TcpSocket {
        cookie: so_cookie(l),
        state: LISTEN,
        local,
        remote: SocketAddr::new(any, 0),
        cgroup_id,
        uid: euid(),
        inode: sock_inode(l),
        session: None,
    }
}

fn sorted(mut v: Vec<TcpSocket>) -> Vec<TcpSocket> {
    v.sort_by_key(|s| s.cookie);
    v
}

/// Our sockets: loopback ones touching our (exclusively bound) listener
/// ports. Only live socket files (inode set): an earlier connection that
/// used one of these port numbers may linger in TIME_WAIT.
fn on_ports(sockets: &[TcpSocket], ports: &[u16]) -> Vec<TcpSocket> {
    sorted(
        sockets
            .iter()
            .filter(|s| s.inode != 0)
            .filter(|s| s.local.ip().to_canonical().is_loopback() || s.local.ip().is_unspecified())
            .filter(|s| ports.contains(&s.local.port()) || ports.contains(&s.remote.port()))
            .copied()
            .collect(),
    )
}

fn cookies_in_family(family: i32, states: u32) -> HashSet<u64> {
    let sock = DiagSocket::open().unwrap();
    let mut buf = vec![0u8; RECV_BUF_LEN];
    let mut cookies = HashSet::new();
    let request = DumpRequest {
        states,
        sessions: None,
    };
    dump_family(&sock, family as u8, &request, &mut buf, &mut |s| {
        cookies.insert(s.cookie);
    })
    .unwrap();
    cookies
}

#[test]
fn dump_reports_v4_v6_and_v4_mapped_sessions_exactly() {
    let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l6 = dual_stack_listener();
    assert!(!v6only(&l6));
    let (p4, p6) = (
        l4.local_addr().unwrap().port(),
        l6.local_addr().unwrap().port(),
    );

    let c4 = TcpStream::connect(l4.local_addr().unwrap()).unwrap();
    let (a4, _) = l4.accept().unwrap();
    let c6 = TcpStream::connect((Ipv6Addr::LOCALHOST, p6)).unwrap();
    let (a6, _) = l6.accept().unwrap();
    let cm = TcpStream::connect((Ipv4Addr::LOCALHOST, p6)).unwrap();
    let (am, _) = l6.accept().unwrap();

    let cg = Some(cgroup_id_of(&own_cgroup2_dir()).unwrap());
    let listeners = sorted(vec![listening(&l4, cg), listening(&l6, cg)]);
    let clients = [&c4, &c6, &cm].map(|s| established(s, cg));
    let accepted = [&a4, &a6, &am].map(|s| established(s, cg));
    let mapped = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
    assert_eq!(accepted[2].local, SocketAddr::new(mapped, p6));
    assert_eq!(accepted[2].remote.ip(), mapped);

    let all = dump_tcp(state_mask(&tcp_state::ALL)).unwrap();
    let mine = on_ports(&all, &[p4, p6]);
    let want = sorted([&listeners[..], &clients, &accepted].concat());
    assert_eq!(mine, want);
    let cookies: HashSet<u64> = mine.iter().map(|s| s.cookie).collect();
    assert_eq!(cookies.len(), want.len());
    assert!(!cookies.contains(&0));

    let inbound_cookies: BTreeSet<u64> = inbound(&all)
        .filter(|s| cookies.contains(&s.cookie))
        .map(|s| s.cookie)
        .collect();
    assert_eq!(inbound_cookies, accepted.iter().map(|s| s.cookie).collect());

    // Sockets of a dual-stack listener are AF_INET6 even with an IPv4 peer.
    let v4 = cookies_in_family(libc::AF_INET, state_mask(&tcp_state::ALL));
    let v6 = cookies_in_family(libc::AF_INET6, state_mask(&tcp_state::ALL));
    assert!(!v4.contains(&accepted[2].cookie) && v6.contains(&accepted[2].cookie));
    assert!(v4.contains(&clients[2].cookie) && !v6.contains(&clients[2].cookie));

    let only_listen = dump_tcp(state_mask(&[LISTEN])).unwrap();
    assert_eq!(on_ports(&only_listen, &[p4, p6]), listeners);
    let only_est = dump_tcp(state_mask(&[ESTABLISHED])).unwrap();
    assert_eq!(
        on_ports(&only_est, &[p4, p6]),
        sorted([clients, accepted].concat())
    );
    assert!(only_est.iter().all(|s| s.state == ESTABLISHED));
    assert_eq!(inbound(&only_est).count(), 0, "inbound needs the listeners");

    drop((c4, c6, cm, a4, a6, am, l4, l6));
    // Each end leaves ESTABLISHED as its own close() returns.
    let est = dump_tcp(state_mask(&[ESTABLISHED, LISTEN])).unwrap();
    assert!(!est.iter().any(|s| cookies.contains(&s.cookie)));

    // The clients closed first, so they end in TIME_WAIT once the servers' FINs
    // are processed (softirq, hence the polling). The minisocket keeps the cookie
    // but has no owner, inode or attributes.
    let client_cookies: BTreeSet<u64> = clients.iter().map(|s| s.cookie).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tw = dump_tcp(state_mask(&[TIME_WAIT])).unwrap();
        let ours: Vec<&TcpSocket> = tw
            .iter()
            .filter(|s| client_cookies.contains(&s.cookie))
            .collect();
        if ours.len() == client_cookies.len() {
            for s in ours {
                assert_eq!(
                    (s.state, s.cgroup_id, s.inode, s.uid),
                    (TIME_WAIT, None, 0, 0)
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "clients not in TIME_WAIT: {ours:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let rest = dump_tcp(state_mask(&tcp_state::ALL)).unwrap();
    assert!(rest
        .iter()
        .filter(|s| cookies.contains(&s.cookie))
        .all(|s| s.state != ESTABLISHED && s.state != LISTEN));
}

#[test]
fn dump_returns_thousands_of_sessions_in_many_datagrams() {
    const WANTED: usize = 2000;
    // Two fds per connection plus headroom for the harness and parallel tests; a
    // hard limit below that shrinks the test rather than failing it.
    const SPARE_FDS: u64 = 128;
    let nofile = raise_nofile(2 * WANTED as u64 + SPARE_FDS);
    let n = WANTED.min((nofile.saturating_sub(SPARE_FDS) / 2) as usize);
    assert!(
        n >= 100,
        "RLIMIT_NOFILE too low for a multi-part dump: {nofile}"
    );
    if n < WANTED {
        eprintln!("RLIMIT_NOFILE {nofile}: testing {n} connections instead of {WANTED}");
    }

    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        conns.push((so_cookie(&c), so_cookie(&a), c, a));
    }
    let accepted: HashSet<u64> = conns.iter().map(|c| c.1).collect();
    let mut ours: HashSet<u64> = conns.iter().map(|c| c.0).collect();
    ours.extend(&accepted);
    ours.insert(so_cookie(&l));

    let all = dump_tcp(state_mask(&[ESTABLISHED, LISTEN])).unwrap();
    let found: HashSet<u64> = all
        .iter()
        .map(|s| s.cookie)
        .filter(|c| ours.contains(c))
        .collect();
    assert_eq!(found.len(), 2 * n + 1);
    assert_eq!(found, ours);
    let inbound_ours: HashSet<u64> = inbound(&all)
        .map(|s| s.cookie)
        .filter(|c| ours.contains(c))
        .collect();
    assert_eq!(inbound_ours, accepted);

    let mut visited = 0;
    for_each_tcp(state_mask(&[ESTABLISHED]), |s| {
        visited += usize::from(ours.contains(&s.cookie));
    })
    .unwrap();
    assert_eq!(visited, 2 * n);

    let sock = DiagSocket::open().unwrap();
    let mut buf = vec![0u8; RECV_BUF_LEN];
    let request = DumpRequest {
        states: state_mask(&[ESTABLISHED]),
        sessions: None,
    };
    let datagrams =
        dump_family(&sock, libc::AF_INET as u8, &request, &mut buf, &mut |_| {}).unwrap();
    // Each socket costs well over 80 bytes and a datagram holds at most ~32 KiB.
    assert!(
        datagrams >= 2 * n * 80 / 32768,
        "only {datagrams} datagrams"
    );
}

#[test]
fn bound_only_sockets_need_the_bound_inactive_bit() {
    // SAFETY: plain syscall; a non-negative result is a fresh fd we own.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: see above.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero sockaddr_in is 0.0.0.0:0; we set loopback below.
    let mut addr: libc::sockaddr_in = unsafe { mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
    // SAFETY: `addr` is a valid sockaddr_in of the stated length.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_in).cast(),
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
    let cookie = so_cookie(&fd);

    let bound = dump_tcp(state_mask(&[BOUND_INACTIVE])).unwrap();
    let me = bound
        .iter()
        .find(|s| s.cookie == cookie)
        .expect("bound socket not dumped");
    // Asked for as BOUND_INACTIVE, reported as what it is: CLOSE.
    assert_eq!(me.state, CLOSE);
    assert_eq!(me.local.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_ne!(me.local.port(), 0);
    let connections = dump_tcp(state_mask(&[ESTABLISHED, CLOSE, LISTEN])).unwrap();
    assert!(!connections.iter().any(|s| s.cookie == cookie));
}

#[test]
fn pending_handshakes_are_syn_recv_request_sockets() {
    use std::io::Write;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    // With TCP_DEFER_ACCEPT the server ignores the bare final ACK, so the
    // connection stays a request socket until the client sends data.
    let secs: libc::c_int = 30;
    // SAFETY: `secs` is a readable c_int for the stated length.
    let rc = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_DEFER_ACCEPT: {}", io::Error::last_os_error());
    let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let client = c.local_addr().unwrap();
    let pending = |s: &&TcpSocket| s.local == l.local_addr().unwrap() && s.remote == client;

    let dump = dump_tcp(state_mask(&[SYN_RECV, LISTEN])).unwrap();
    let req = *dump
        .iter()
        .find(pending)
        .expect("request socket not dumped");
    assert_eq!(req.state, SYN_RECV);
    assert_ne!(req.cookie, 0);
    assert_eq!((req.cgroup_id, req.inode, req.uid), (None, 0, 0));
    assert!(inbound(&dump).any(|s| s.cookie == req.cookie));
    // Either request bit selects request sockets; they are always shown as SYN_RECV.
    let by_new_bit = dump_tcp(state_mask(&[tcp_state::NEW_SYN_RECV])).unwrap();
    assert_eq!(by_new_bit.iter().find(pending), Some(&req));

    c.write_all(b"x").unwrap();
    let (a, _) = l.accept().unwrap();
    // The full socket inherits the request socket's cookie.
    assert_eq!(so_cookie(&a), req.cookie);
    let dump = dump_tcp(state_mask(&[ESTABLISHED])).unwrap();
    let child = dump.iter().find(|s| s.cookie == req.cookie).unwrap();
    assert_eq!(child.remote, client);
    assert!(child.cgroup_id.is_some());
}

#[test]
fn std_v6_wildcard_listener_follows_bindv6only() {
    let l = TcpListener::bind("[::]:0").unwrap();
    let sysctl = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").unwrap();
    assert_eq!(v6only(&l), sysctl.trim() == "1");
}

#[test]
fn cgroup_id_of_rejects_non_cgroup2_paths() {
    let err = cgroup_id_of(Path::new("/proc")).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(cgroup_id_of(Path::new("/nonexistent/cgroup")).is_err());
    let own = own_cgroup2_dir();
    assert_eq!(
        cgroup_id_of(&own).unwrap(),
        std::fs::metadata(&own).unwrap().ino()
    );
}

#[test]
fn state_mask_sets_one_bit_per_state() {
    assert_eq!(state_mask(&[]), 0);
    assert_eq!(state_mask(&[LISTEN]), 1 << 10);
    assert_eq!(state_mask(&[ESTABLISHED, SYN_RECV, ESTABLISHED]), 0b1010);
    assert_eq!(state_mask(&[40]), 0);
    assert_eq!(state_mask(&tcp_state::ALL), 0x3ffe);
}

fn sock(state: u8, local: &str, remote: &str) -> TcpSocket {
    TcpSocket {
        cookie: 0,
        state,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        cgroup_id: None,
        uid: 0,
        inode: 0,
        session: None,
    }
}

#[test]
fn inbound_matches_listener_address_rules() {
    let sockets = [
        sock(LISTEN, "10.0.0.1:80", "0.0.0.0:0"),
        sock(LISTEN, "0.0.0.0:443", "0.0.0.0:0"),
        sock(LISTEN, "[::]:8080", "[::]:0"),
        sock(LISTEN, "[::ffff:0.0.0.0]:9090", "[::]:0"),
        sock(LISTEN, "[fd00::1]:22", "[::]:0"),
        sock(ESTABLISHED, "10.0.0.1:80", "1.2.3.4:5000"), // 5: same address
        sock(ESTABLISHED, "10.0.0.2:80", "1.2.3.4:5000"), // other address
        sock(ESTABLISHED, "10.0.0.2:443", "1.2.3.4:5000"), // 7: v4 wildcard
        sock(ESTABLISHED, "[fd00::2]:443", "[fd00::9]:5000"), // v4 wildcard, v6 local
        sock(ESTABLISHED, "[fd00::2]:8080", "[fd00::9]:5000"), // 9: v6 wildcard
        sock(ESTABLISHED, "[::ffff:10.0.0.1]:8080", "[::ffff:1.2.3.4]:1"), // 10
        sock(ESTABLISHED, "10.0.0.1:8080", "1.2.3.4:1"),  // 11: v6 wildcard, v4
        sock(ESTABLISHED, "[::ffff:10.0.0.1]:9090", "[::ffff:1.2.3.4]:1"), // 12
        sock(ESTABLISHED, "[fd00::2]:9090", "[fd00::9]:1"), // v4-only wildcard
        sock(ESTABLISHED, "[fd00::1]:22", "[fd00::9]:1"), // 14
        sock(TIME_WAIT, "[fd00::1]:22", "[fd00::9]:2"),   // 15
        sock(SYN_RECV, "[fd00::1]:22", "[fd00::9]:3"),    // 16
        sock(CLOSE, "[fd00::1]:22", "[::]:0"),            // bound only
        sock(BOUND_INACTIVE, "10.0.0.1:80", "0.0.0.0:0"), // bound only
        sock(ESTABLISHED, "10.0.0.1:33000", "10.0.0.1:80"), // client side
    ];
    let got: Vec<usize> = inbound(&sockets)
        .map(|s| sockets.iter().position(|x| std::ptr::eq(x, s)).unwrap())
        .collect();
    assert_eq!(got, [5, 7, 9, 10, 11, 12, 14, 15, 16]);
    assert_eq!(inbound(&sockets[5..]).count(), 0);
}
