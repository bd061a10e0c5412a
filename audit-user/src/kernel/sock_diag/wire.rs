//! Netlink and inet_diag wire constants (include/uapi/linux/{netlink,sock_diag,
//! inet_diag}.h) and the byte-slice helpers that request building and reply
//! parsing share.

use super::types::SockDiagError;

pub(super) const NLMSG_HDRLEN: usize = 16;
pub(super) const NLMSG_NOOP: u16 = 1;
pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
pub(super) const NLMSG_OVERRUN: u16 = 4;
pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_DUMP_INTR: u16 = 0x10;
pub(super) const NLM_F_DUMP: u16 = 0x100 | 0x200; // NLM_F_ROOT | NLM_F_MATCH
/// Strips NLA_F_NESTED and NLA_F_NET_BYTEORDER from `rta_type`.
pub(super) const NLA_TYPE_MASK: u16 = 0x3fff;
pub(super) const RTA_HDRLEN: usize = 4;

pub(super) const SOCK_DIAG_BY_FAMILY: u16 = 20;
pub(super) const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
pub(super) const INET_DIAG_CGROUP_ID: u16 = 21;
/// Request attribute: the sk_storage maps whose values to report (nested).
pub(super) const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
pub(super) const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
/// Reply: one nested SK_DIAG_BPF_STORAGE per map holding a value for the socket.
pub(super) const SK_DIAG_BPF_STORAGE: u16 = 1;
pub(super) const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
pub(super) const NLA_F_NESTED: u16 = 0x8000;
/// `struct inet_diag_req_v2`: 4 bytes of selectors, `idiag_states`, 48-byte sockid.
pub(super) const INET_DIAG_REQ_V2_LEN: usize = 56;
/// `struct inet_diag_msg`: 4 bytes of header, 48-byte sockid, 5 u32 fields.
pub(super) const INET_DIAG_MSG_LEN: usize = 72;
pub(super) const REQUEST_LEN: usize = NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN;

pub(super) fn family_name(family: u8) -> &'static str {
    match i32::from(family) {
        libc::AF_INET => "AF_INET",
        libc::AF_INET6 => "AF_INET6",
        _ => "unknown family",
    }
}

pub(super) fn malformed(what: &'static str) -> SockDiagError {
    SockDiagError::Malformed { what }
}

/// Reads `N` bytes at `at`, or reports `what` as truncated.
pub(super) fn bytes<const N: usize>(
    buf: &[u8],
    at: usize,
    what: &'static str,
) -> Result<[u8; N], SockDiagError> {
    at.checked_add(N)
        .and_then(|end| buf.get(at..end))
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| malformed(what))
}

pub(super) fn align4(len: usize) -> usize {
    len.saturating_add(3) & !3
}
