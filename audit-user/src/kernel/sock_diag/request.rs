//! Building the inet_diag dump request, with the sk_storage map whose values
//! the kernel should add to each socket (`INET_DIAG_REQ_SK_BPF_STORAGES`).

use std::os::fd::RawFd;

use super::wire::{
    INET_DIAG_REQ_SK_BPF_STORAGES, NLA_F_NESTED, NLM_F_DUMP, NLM_F_REQUEST, REQUEST_LEN,
    RTA_HDRLEN, SK_DIAG_BPF_STORAGE_REQ_MAP_FD, SOCK_DIAG_BY_FAMILY,
};

/// What a dump asks for, besides the address family.
pub(super) struct DumpRequest {
    pub states: u32,
    /// An sk_storage map whose values the kernel adds to each socket's reply.
    pub sessions: Option<RawFd>,
}

pub(super) fn build_request(family: u8, request: &DumpRequest, seq: u32) -> Vec<u8> {
    let mut req = vec![0u8; REQUEST_LEN];
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel fills in our port id.
    req[16] = family;
    req[17] = libc::IPPROTO_TCP as u8;
    // idiag_ext stays 0: the cgroup id is sent without being asked for, and the
    // extensions we could ask for (tcp_info, meminfo, ...) would only bloat the dump.
    req[20..24].copy_from_slice(&request.states.to_ne_bytes());
    // The sockid selector is ignored by dumps; leave it zeroed.
    if let Some(fd) = request.sessions {
        // INET_DIAG_REQ_SK_BPF_STORAGES { SK_DIAG_BPF_STORAGE_REQ_MAP_FD: fd }
        let inner = (RTA_HDRLEN + 4) as u16;
        req.extend_from_slice(&(RTA_HDRLEN as u16 + inner).to_ne_bytes());
        req.extend_from_slice(&(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED).to_ne_bytes());
        req.extend_from_slice(&inner.to_ne_bytes());
        req.extend_from_slice(&SK_DIAG_BPF_STORAGE_REQ_MAP_FD.to_ne_bytes());
        req.extend_from_slice(&(fd as u32).to_ne_bytes());
    }
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_request_names_the_sessions_map_only_when_asked() {
        let plain = build_request(
            libc::AF_INET as u8,
            &DumpRequest {
                states: 2,
                sessions: None,
            },
            1,
        );
        assert_eq!(plain.len(), REQUEST_LEN);
        let with_map = build_request(
            libc::AF_INET as u8,
            &DumpRequest {
                states: 2,
                sessions: Some(9),
            },
            1,
        );
        assert_eq!(with_map.len(), REQUEST_LEN + 12);
        assert_eq!(with_map[0..4], ((REQUEST_LEN + 12) as u32).to_ne_bytes());
        assert_eq!(with_map[..REQUEST_LEN][4..], plain[4..]);
        let expected = [
            12u16.to_ne_bytes(),
            (INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED).to_ne_bytes(),
            8u16.to_ne_bytes(),
            SK_DIAG_BPF_STORAGE_REQ_MAP_FD.to_ne_bytes(),
        ]
        .concat();
        assert_eq!(with_map[REQUEST_LEN..REQUEST_LEN + 8], expected[..]);
        assert_eq!(with_map[REQUEST_LEN + 8..], 9u32.to_ne_bytes());
    }
}
