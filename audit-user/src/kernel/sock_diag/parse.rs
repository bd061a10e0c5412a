//! Parsing the dump's reply datagrams: netlink messages, `inet_diag_msg`, and
//! its attributes (the cgroup id and the SESSIONS socket storage), from plain
//! byte slices, never casting kernel memory to Rust structs.

use std::{
    mem,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
};

use audit_common::SessionStorage;

use super::{
    types::{SockDiagError, TcpSocket},
    wire::{
        align4, bytes, family_name, malformed, INET_DIAG_CGROUP_ID, INET_DIAG_MSG_LEN,
        INET_DIAG_SK_BPF_STORAGES, NLA_TYPE_MASK, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN,
        NLMSG_NOOP, NLMSG_OVERRUN, NLM_F_DUMP_INTR, RTA_HDRLEN, SK_DIAG_BPF_STORAGE,
        SK_DIAG_BPF_STORAGE_MAP_VALUE, SOCK_DIAG_BY_FAMILY,
    },
};

/// Walks the attributes in `attrs` (rtattr/nlattr framing), calling `visit`
/// with each one's type (flags stripped) and value.
pub(super) fn for_each_attr(
    mut attrs: &[u8],
    mut visit: impl FnMut(u16, &[u8]) -> Result<(), SockDiagError>,
) -> Result<(), SockDiagError> {
    // Like the kernel's nla_ok(), a tail shorter than an attribute header is padding.
    while attrs.len() >= RTA_HDRLEN {
        let len = usize::from(u16::from_ne_bytes(bytes(attrs, 0, "rtattr truncated")?));
        let ty = u16::from_ne_bytes(bytes(attrs, 2, "rtattr truncated")?) & NLA_TYPE_MASK;
        if len < RTA_HDRLEN || len > attrs.len() {
            return Err(malformed("rta_len outside the message"));
        }
        visit(ty, &attrs[RTA_HDRLEN..len])?;
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    Ok(())
}

/// The value in an INET_DIAG_SK_BPF_STORAGES attribute. Only one map is ever
/// asked for, so any value is that map's.
pub(super) fn parse_session_storage(
    storages: &[u8],
) -> Result<Option<SessionStorage>, SockDiagError> {
    let mut found = None;
    for_each_attr(storages, |ty, storage| {
        if ty != SK_DIAG_BPF_STORAGE {
            return Ok(());
        }
        for_each_attr(storage, |ty, value| {
            if ty == SK_DIAG_BPF_STORAGE_MAP_VALUE {
                let raw: [u8; mem::size_of::<SessionStorage>()] = value
                    .try_into()
                    .map_err(|_| malformed("SESSIONS storage value has the wrong size"))?;
                // SAFETY: SessionStorage is repr(C), integers only, no implicit
                // padding: every byte pattern of its size is a valid value.
                found = Some(unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) });
            }
            Ok(())
        })
    })?;
    Ok(found)
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Progress {
    More,
    Done,
}

/// Parses one datagram of the reply to dump request `seq`, calling `visit` for each
/// socket, until `NLMSG_DONE`.
pub(super) fn parse_datagram(
    datagram: &[u8],
    seq: u32,
    family: u8,
    visit: &mut dyn FnMut(&TcpSocket),
) -> Result<Progress, SockDiagError> {
    if datagram.is_empty() {
        return Err(malformed("empty netlink datagram"));
    }
    let name = family_name(family);
    let mut rest = datagram;
    while !rest.is_empty() {
        let len = u32::from_ne_bytes(bytes(rest, 0, "netlink header truncated")?) as usize;
        let ty = u16::from_ne_bytes(bytes(rest, 4, "netlink header truncated")?);
        let flags = u16::from_ne_bytes(bytes(rest, 6, "netlink header truncated")?);
        let msg_seq = u32::from_ne_bytes(bytes(rest, 8, "netlink header truncated")?);
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(malformed("nlmsg_len outside the datagram"));
        }
        let payload = &rest[NLMSG_HDRLEN..len];
        rest = &rest[align4(len).min(rest.len())..];

        if msg_seq != seq {
            log::debug!("sock_diag: skipping netlink message with stale seq {msg_seq}");
            continue;
        }
        if flags & NLM_F_DUMP_INTR != 0 {
            return Err(SockDiagError::Interrupted { family: name });
        }
        match ty {
            SOCK_DIAG_BY_FAMILY => visit(&parse_inet_diag_msg(payload)?),
            NLMSG_DONE => {
                // The payload is the dump callback's final status.
                if let Ok(status) = bytes::<4>(payload, 0, "") {
                    let status = i32::from_ne_bytes(status);
                    if status < 0 {
                        return Err(SockDiagError::Kernel {
                            family: name,
                            errno: status.saturating_neg(),
                        });
                    }
                }
                return Ok(Progress::Done);
            }
            NLMSG_ERROR => {
                let error = i32::from_ne_bytes(bytes(payload, 0, "nlmsgerr truncated")?);
                match error {
                    // An acknowledgement, which a dump does not ask for.
                    0 => continue,
                    e if e < 0 => {
                        return Err(SockDiagError::Kernel {
                            family: name,
                            errno: e.saturating_neg(),
                        })
                    }
                    _ => return Err(malformed("positive errno in nlmsgerr")),
                }
            }
            NLMSG_OVERRUN => return Err(SockDiagError::Overrun { family: name }),
            NLMSG_NOOP => {}
            other => log::debug!("sock_diag: skipping netlink message type {other}"),
        }
    }
    Ok(Progress::More)
}

/// Parses `struct inet_diag_msg` followed by its attributes.
pub(super) fn parse_inet_diag_msg(msg: &[u8]) -> Result<TcpSocket, SockDiagError> {
    const TRUNC: &str = "inet_diag_msg truncated";
    if msg.len() < INET_DIAG_MSG_LEN {
        return Err(malformed(TRUNC));
    }
    let [family, state, _timer, _retrans] = bytes::<4>(msg, 0, TRUNC)?;
    let sport = u16::from_be_bytes(bytes(msg, 4, TRUNC)?);
    let dport = u16::from_be_bytes(bytes(msg, 6, TRUNC)?);
    let src: [u8; 16] = bytes(msg, 8, TRUNC)?;
    let dst: [u8; 16] = bytes(msg, 24, TRUNC)?;
    let ifindex = u32::from_ne_bytes(bytes(msg, 40, TRUNC)?);
    let cookie_lo = u32::from_ne_bytes(bytes(msg, 44, TRUNC)?);
    let cookie_hi = u32::from_ne_bytes(bytes(msg, 48, TRUNC)?);
    let uid = u32::from_ne_bytes(bytes(msg, 64, TRUNC)?);
    let inode = u32::from_ne_bytes(bytes(msg, 68, TRUNC)?);

    let (local, remote) = match i32::from(family) {
        libc::AF_INET => {
            let ip = |a: [u8; 16]| Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            (
                SocketAddr::V4(SocketAddrV4::new(ip(src), sport)),
                SocketAddr::V4(SocketAddrV4::new(ip(dst), dport)),
            )
        }
        libc::AF_INET6 => {
            // Mirror getsockname(): the bound device is the scope of link-local
            // addresses only.
            let addr = |a: [u8; 16], port| {
                let ip = Ipv6Addr::from(a);
                let scope = if ip.is_unicast_link_local() {
                    ifindex
                } else {
                    0
                };
                SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope))
            };
            (addr(src, sport), addr(dst, dport))
        }
        _ => return Err(malformed("inet_diag_msg with an unknown address family")),
    };

    let mut cgroup_id = None;
    let mut session = None;
    let attrs = &msg[align4(INET_DIAG_MSG_LEN).min(msg.len())..];
    for_each_attr(attrs, |ty, value| {
        match ty {
            INET_DIAG_CGROUP_ID => {
                if value.len() != 8 {
                    return Err(malformed("INET_DIAG_CGROUP_ID is not a u64"));
                }
                cgroup_id = Some(u64::from_ne_bytes(bytes(
                    value,
                    0,
                    "INET_DIAG_CGROUP_ID truncated",
                )?));
            }
            INET_DIAG_SK_BPF_STORAGES => session = parse_session_storage(value)?,
            _ => {}
        }
        Ok(())
    })?;

    Ok(TcpSocket {
        cookie: u64::from(cookie_lo) | u64::from(cookie_hi) << 32,
        state,
        local,
        remote,
        cgroup_id,
        uid,
        inode,
        session,
    })
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use proptest::prelude::*;

    use super::*;
    use crate::kernel::sock_diag::{
        types::tcp_state::{ESTABLISHED, TIME_WAIT},
        wire::NLA_F_NESTED,
    };

    const SEQ: u32 = 7;

    fn nlmsg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(align4(m.len()), 0);
        m
    }

    fn rta(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((RTA_HDRLEN + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(align4(a.len()), 0);
        a
    }

    #[allow(clippy::too_many_arguments)]
    fn diag_msg(
        family: i32,
        state: u8,
        src: SocketAddr,
        dst: SocketAddr,
        ifindex: u32,
        cookie: u64,
        attrs: &[u8],
    ) -> Vec<u8> {
        let addr = |a: SocketAddr| -> [u8; 16] {
            let mut b = [0u8; 16];
            match a.ip() {
                IpAddr::V4(ip) => b[..4].copy_from_slice(&ip.octets()),
                IpAddr::V6(ip) => b = ip.octets(),
            }
            b
        };
        let mut m = vec![family as u8, state, 0, 0];
        m.extend_from_slice(&src.port().to_be_bytes());
        m.extend_from_slice(&dst.port().to_be_bytes());
        m.extend_from_slice(&addr(src));
        m.extend_from_slice(&addr(dst));
        m.extend_from_slice(&ifindex.to_ne_bytes());
        m.extend_from_slice(&(cookie as u32).to_ne_bytes());
        m.extend_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        for field in [0u32, 0, 0, 1000, 4242] {
            m.extend_from_slice(&field.to_ne_bytes());
        }
        assert_eq!(m.len(), INET_DIAG_MSG_LEN);
        m.extend_from_slice(attrs);
        m
    }

    fn parse(datagram: &[u8]) -> Result<(Progress, Vec<TcpSocket>), SockDiagError> {
        let mut seen = Vec::new();
        let progress = parse_datagram(datagram, SEQ, libc::AF_INET6 as u8, &mut |s| seen.push(*s))?;
        Ok((progress, seen))
    }

    fn v4_msg(attrs: &[u8]) -> Vec<u8> {
        diag_msg(
            libc::AF_INET,
            ESTABLISHED,
            "10.1.2.3:443".parse().unwrap(),
            "192.0.2.7:51000".parse().unwrap(),
            0,
            0x1122_3344_5566_7788,
            attrs,
        )
    }

    fn session_storages(value: &[u8]) -> Vec<u8> {
        // INET_DIAG_SK_BPF_STORAGES { SK_DIAG_BPF_STORAGE { PAD, MAP_ID, MAP_VALUE } },
        // with the nested flag bits the kernel sets.
        let storage = [
            rta(1, &[]),
            rta(2, &7u32.to_ne_bytes()),
            rta(SK_DIAG_BPF_STORAGE_MAP_VALUE, value),
        ]
        .concat();
        rta(
            INET_DIAG_SK_BPF_STORAGES | NLA_F_NESTED,
            &rta(SK_DIAG_BPF_STORAGE | NLA_F_NESTED, &storage),
        )
    }

    #[test]
    fn parses_a_sockets_session_storage() {
        let stored = SessionStorage {
            record: audit_common::SocketRecord {
                addr: [192, 0, 2, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                family: audit_common::FAMILY_V4,
                service: 3,
                origin: audit_common::record_origin::ACCEPTED,
                _pad: [0; 5],
            },
            state: audit_common::session_state::COUNTED,
            opened_ms: 0,
        };
        // SAFETY: SessionStorage is repr(C) plain integers without implicit padding.
        let value: [u8; 32] = unsafe { mem::transmute(stored) };
        let attrs = [
            session_storages(&value),
            rta(INET_DIAG_CGROUP_ID, &77u64.to_ne_bytes()),
        ]
        .concat();
        let (_, seen) = parse(&nlmsg(SOCK_DIAG_BY_FAMILY, 0, SEQ, &v4_msg(&attrs))).unwrap();
        assert_eq!(seen[0].session, Some(stored));
        assert_eq!(seen[0].cgroup_id, Some(77));

        let short = session_storages(&value[..24]);
        assert!(matches!(
            parse(&nlmsg(SOCK_DIAG_BY_FAMILY, 0, SEQ, &v4_msg(&short))),
            Err(SockDiagError::Malformed { .. })
        ));
    }
    fn done(status: i32) -> Vec<u8> {
        nlmsg(NLMSG_DONE, 0, SEQ, &status.to_ne_bytes())
    }

    #[test]
    fn parses_messages_attributes_and_done() {
        // INET_DIAG_SHUTDOWN, a 4-byte INET_DIAG_PAD as 64-bit-strict arches emit, then
        // the cgroup id with the nested/byteorder flag bits that must be masked off.
        let attrs = [
            rta(8, &[0]),
            rta(14, &[]),
            rta(INET_DIAG_CGROUP_ID, &77u64.to_ne_bytes()),
        ]
        .concat();
        let stale = nlmsg(SOCK_DIAG_BY_FAMILY, 0, SEQ + 1, &v4_msg(&[]));
        let dgram = [
            stale,
            nlmsg(NLMSG_NOOP, 0, SEQ, &[]),
            nlmsg(NLMSG_ERROR, 0, SEQ, &0i32.to_ne_bytes()),
            nlmsg(SOCK_DIAG_BY_FAMILY, 0x2, SEQ, &v4_msg(&attrs)),
        ]
        .concat();
        let (progress, seen) = parse(&dgram).unwrap();
        assert_eq!(progress, Progress::More);
        assert_eq!(
            seen,
            [TcpSocket {
                cookie: 0x1122_3344_5566_7788,
                state: ESTABLISHED,
                local: "10.1.2.3:443".parse().unwrap(),
                remote: "192.0.2.7:51000".parse().unwrap(),
                cgroup_id: Some(77),
                uid: 1000,
                inode: 4242,
                session: None,
            }]
        );

        let flagged = rta(INET_DIAG_CGROUP_ID | 0x8000, &5u64.to_ne_bytes());
        let v6 = diag_msg(
            libc::AF_INET6,
            TIME_WAIT,
            "[fe80::1]:22".parse().unwrap(),
            "[fe80::2]:40000".parse().unwrap(),
            3,
            9,
            &flagged,
        );
        let dgram = [
            nlmsg(SOCK_DIAG_BY_FAMILY, 0, SEQ, &v6),
            done(0),
            v4_msg(&[]),
        ]
        .concat();
        let (progress, seen) = parse(&dgram).unwrap();
        assert_eq!(progress, Progress::Done);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].local, "[fe80::1%3]:22".parse().unwrap());
        assert_eq!(seen[0].remote, "[fe80::2%3]:40000".parse().unwrap());
        assert_eq!(seen[0].cgroup_id, Some(5));

        // Old kernels end a dump with an empty NLMSG_DONE.
        assert_eq!(
            parse(&nlmsg(NLMSG_DONE, 0, SEQ, &[])).unwrap().0,
            Progress::Done
        );
    }

    #[test]
    fn reports_kernel_errors_and_incomplete_dumps() {
        let errno = |r: Result<_, SockDiagError>| match r {
            Err(SockDiagError::Kernel { errno, .. }) => errno,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            errno(parse(&nlmsg(
                NLMSG_ERROR,
                0,
                SEQ,
                &(-libc::EPERM).to_ne_bytes()
            ))),
            libc::EPERM
        );
        assert_eq!(errno(parse(&done(-libc::ENOENT))), libc::ENOENT);
        assert!(matches!(
            parse(&nlmsg(
                SOCK_DIAG_BY_FAMILY,
                NLM_F_DUMP_INTR,
                SEQ,
                &v4_msg(&[])
            )),
            Err(SockDiagError::Interrupted { .. })
        ));
        assert!(matches!(
            parse(&nlmsg(NLMSG_OVERRUN, 0, SEQ, &[])),
            Err(SockDiagError::Overrun { .. })
        ));
        assert!(SockDiagError::Overrun { family: "AF_INET" }.is_transient());
        assert!(!SockDiagError::Kernel {
            family: "AF_INET",
            errno: 1
        }
        .is_transient());
    }

    #[test]
    fn rejects_malformed_replies() {
        let what = |dgram: &[u8]| match parse(dgram) {
            Err(SockDiagError::Malformed { what }) => what,
            other => panic!("{other:?}"),
        };
        let ok = nlmsg(SOCK_DIAG_BY_FAMILY, 0, SEQ, &v4_msg(&[]));
        assert_eq!(what(&[]), "empty netlink datagram");
        assert_eq!(what(&ok[..10]), "netlink header truncated");
        assert_eq!(what(&ok[..40]), "nlmsg_len outside the datagram");
        let mut short_len = ok.clone();
        short_len[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(what(&short_len), "nlmsg_len outside the datagram");
        let msg = v4_msg(&[]);
        assert_eq!(
            what(&nlmsg(SOCK_DIAG_BY_FAMILY, 0, SEQ, &msg[..60])),
            "inet_diag_msg truncated"
        );
        let mut bad_family = msg.clone();
        bad_family[0] = libc::AF_UNIX as u8;
        assert_eq!(
            what(&nlmsg(SOCK_DIAG_BY_FAMILY, 0, SEQ, &bad_family)),
            "inet_diag_msg with an unknown address family"
        );
        let bad_rta = |attr: &[u8]| what(&nlmsg(SOCK_DIAG_BY_FAMILY, 0, SEQ, &v4_msg(attr)));
        assert_eq!(bad_rta(&[2, 0, 8, 0]), "rta_len outside the message");
        assert_eq!(
            bad_rta(&[64, 0, 8, 0, 0, 0, 0, 0]),
            "rta_len outside the message"
        );
        assert_eq!(
            bad_rta(&rta(INET_DIAG_CGROUP_ID, &[1, 2, 3, 4])),
            "INET_DIAG_CGROUP_ID is not a u64"
        );
        assert_eq!(
            what(&nlmsg(NLMSG_ERROR, 0, SEQ, &[0, 0])),
            "nlmsgerr truncated"
        );
        assert_eq!(
            what(&nlmsg(NLMSG_ERROR, 0, SEQ, &5i32.to_ne_bytes())),
            "positive errno in nlmsgerr"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn arbitrary_inet_diag_payloads_never_panic(
            family in prop_oneof![Just(libc::AF_INET as u8), Just(libc::AF_INET6 as u8), any::<u8>()],
            mut payload in proptest::collection::vec(any::<u8>(), 0..400),
            ty in prop_oneof![Just(SOCK_DIAG_BY_FAMILY), Just(NLMSG_ERROR), Just(NLMSG_DONE), any::<u16>()],
        ) {
            if let Some(f) = payload.first_mut() {
                *f = family;
            }
            let _ = parse(&nlmsg(ty, 0, SEQ, &payload));
        }
    }
}
