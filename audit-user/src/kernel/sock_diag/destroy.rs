//! SOCK_DESTROY: the kernel aborts one TCP socket (`tcp_abort`), sending the
//! peer a RST and failing the owner's next call with ECONNABORTED; the socket
//! moves to TCP_CLOSE through the ordinary state change, so the counting
//! programs see its close like any other. Needs CONFIG_INET_DIAG_DESTROY and
//! CAP_NET_ADMIN in the socket's network namespace.

use std::net::{IpAddr, SocketAddr};

use super::{
    socket::DiagSocket,
    types::{SockDiagError, TcpSocket},
    wire::{bytes, NLMSG_ERROR, NLMSG_HDRLEN, NLM_F_REQUEST, REQUEST_LEN},
};

/// `SOCK_DESTROY` (include/uapi/linux/sock_diag.h).
const SOCK_DESTROY: u16 = 21;
const NLM_F_ACK: u16 = 0x4;
/// Every TCP state: the lookup is by address and cookie, not by state.
const ALL_STATES: u32 = u32::MAX;

/// Aborts `socket`, found by its addresses and checked by its cookie (a
/// socket that reused the addresses since the dump is left alone). `Ok(false)`:
/// it was gone already.
pub fn destroy_tcp(socket: &TcpSocket) -> Result<bool, SockDiagError> {
    let family = family_of(&socket.local);
    let sock = DiagSocket::open()?;
    let seq = 1;
    sock.send(family, &mut destroy_request(socket, seq))?;
    let mut buf = vec![0u8; 4096];
    loop {
        let Some(n) = sock.recv(&mut buf, family)? else {
            continue;
        };
        match ack_errno(&buf[..n], seq)? {
            None => continue,
            Some(0) => return Ok(true),
            Some(libc::ENOENT) => return Ok(false),
            Some(errno) => return Err(SockDiagError::Destroy { errno }),
        }
    }
}

fn family_of(addr: &SocketAddr) -> u8 {
    match addr {
        SocketAddr::V4(_) => libc::AF_INET as u8,
        SocketAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

/// The SOCK_DESTROY request for `socket`: an `inet_diag_req_v2` whose
/// `inet_diag_sockid` names it.
pub(super) fn destroy_request(socket: &TcpSocket, seq: u32) -> Vec<u8> {
    let mut req = vec![0u8; REQUEST_LEN];
    req[0..4].copy_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DESTROY.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
    let r = NLMSG_HDRLEN;
    req[r] = family_of(&socket.local);
    req[r + 1] = libc::IPPROTO_TCP as u8;
    req[r + 4..r + 8].copy_from_slice(&ALL_STATES.to_ne_bytes());
    // inet_diag_sockid: ports in network order, then source (local) and
    // destination (remote) addresses, the bound device, the cookie.
    let id = r + 8;
    req[id..id + 2].copy_from_slice(&socket.local.port().to_be_bytes());
    req[id + 2..id + 4].copy_from_slice(&socket.remote.port().to_be_bytes());
    req[id + 4..id + 20].copy_from_slice(&addr_bytes(socket.local.ip()));
    req[id + 20..id + 36].copy_from_slice(&addr_bytes(socket.remote.ip()));
    let scope = match socket.local {
        SocketAddr::V6(v6) => v6.scope_id(),
        SocketAddr::V4(_) => 0,
    };
    req[id + 36..id + 40].copy_from_slice(&scope.to_ne_bytes());
    req[id + 40..id + 44].copy_from_slice(&(socket.cookie as u32).to_ne_bytes());
    req[id + 44..id + 48].copy_from_slice(&((socket.cookie >> 32) as u32).to_ne_bytes());
    req
}

fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => {
            let mut out = [0u8; 16];
            out[..4].copy_from_slice(&v4.octets());
            out
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The errno of the acknowledgement for `seq` in `datagram` (0: done), or
/// None when the datagram holds none.
pub(super) fn ack_errno(datagram: &[u8], seq: u32) -> Result<Option<i32>, SockDiagError> {
    const TRUNC: &str = "netlink ack truncated";
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(bytes(rest, 0, TRUNC)?) as usize;
        let ty = u16::from_ne_bytes(bytes(rest, 4, TRUNC)?);
        let got_seq = u32::from_ne_bytes(bytes(rest, 8, TRUNC)?);
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(SockDiagError::Malformed {
                what: "nlmsg_len outside the datagram",
            });
        }
        if ty == NLMSG_ERROR && got_seq == seq {
            let error = i32::from_ne_bytes(bytes(rest, NLMSG_HDRLEN, TRUNC)?);
            return Ok(Some(error.saturating_neg()));
        }
        rest = &rest[(len.saturating_add(3) & !3).min(rest.len())..];
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(local: &str, remote: &str, cookie: u64) -> TcpSocket {
        TcpSocket {
            cookie,
            state: 1,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            cgroup_id: None,
            uid: 0,
            inode: 0,
            session: None,
        }
    }

    #[test]
    fn a_destroy_request_names_the_socket_by_addresses_and_cookie() {
        let req = destroy_request(
            &socket("127.0.0.1:25", "127.0.1.9:40000", 0x1122_3344_5566_7788),
            7,
        );
        assert_eq!(req.len(), REQUEST_LEN);
        assert_eq!(req[4..6], SOCK_DESTROY.to_ne_bytes());
        assert_eq!(req[6..8], (NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        assert_eq!(req[8..12], 7u32.to_ne_bytes());
        assert_eq!(req[16], libc::AF_INET as u8);
        assert_eq!(req[17], libc::IPPROTO_TCP as u8);
        assert_eq!(req[24..26], 25u16.to_be_bytes());
        assert_eq!(req[26..28], 40000u16.to_be_bytes());
        assert_eq!(req[28..32], [127, 0, 0, 1]);
        assert_eq!(req[44..48], [127, 0, 1, 9]);
        assert_eq!(req[64..68], 0x5566_7788u32.to_ne_bytes());
        assert_eq!(req[68..72], 0x1122_3344u32.to_ne_bytes());
        let v6 = destroy_request(
            &socket("[::ffff:127.0.0.1]:25", "[::ffff:127.0.1.9]:1", 1),
            1,
        );
        assert_eq!(v6[16], libc::AF_INET6 as u8);
        assert_eq!(
            v6[28..44],
            "::ffff:127.0.0.1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
    }

    #[test]
    fn acks_give_their_errno() {
        let ack = |seq: u32, error: i32| {
            let mut m = vec![0u8; NLMSG_HDRLEN + 4];
            m[0..4].copy_from_slice(&((NLMSG_HDRLEN + 4) as u32).to_ne_bytes());
            m[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
            m[8..12].copy_from_slice(&seq.to_ne_bytes());
            m[16..20].copy_from_slice(&error.to_ne_bytes());
            m
        };
        assert_eq!(ack_errno(&ack(3, 0), 3).unwrap(), Some(0));
        assert_eq!(
            ack_errno(&ack(3, -libc::ENOENT), 3).unwrap(),
            Some(libc::ENOENT)
        );
        assert_eq!(ack_errno(&ack(2, -1), 3).unwrap(), None);
        assert!(ack_errno(&ack(3, 0)[..10], 3).unwrap().is_none());
        let mut bad = ack(3, 0);
        bad[0..4].copy_from_slice(&99u32.to_ne_bytes());
        assert!(ack_errno(&bad, 3).is_err());
    }
}
