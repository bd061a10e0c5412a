//! The NETLINK_SOCK_DIAG socket and one family's dump over it: send the
//! request, receive datagrams until the reply is done.

use std::{
    io, mem,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use super::{
    parse::{parse_datagram, Progress},
    request::{build_request, DumpRequest},
    types::{SockDiagError, TcpSocket},
    wire::{family_name, malformed},
};

pub(super) struct DiagSocket {
    fd: OwnedFd,
}

impl DiagSocket {
    pub(super) fn open() -> Result<Self, SockDiagError> {
        // SAFETY: socket(2) takes no pointers; a non-negative result is a new file
        // descriptor that nothing else owns, so OwnedFd may take it over.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(SockDiagError::Socket {
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: see above; `fd` is valid and exclusively ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    pub(super) fn send_dump(
        &self,
        family: u8,
        request: &DumpRequest,
        seq: u32,
    ) -> Result<(), SockDiagError> {
        self.send(family, &mut build_request(family, request, seq))
    }

    /// Sends one netlink message (a dump or a SOCK_DESTROY request) to the kernel.
    pub(super) fn send(&self, family: u8, req: &mut [u8]) -> Result<(), SockDiagError> {
        let name = family_name(family);
        let mut kernel = kernel_addr();
        let mut iov = libc::iovec {
            iov_base: req.as_mut_ptr().cast(),
            iov_len: req.len(),
        };
        // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_name = (&mut kernel as *mut libc::sockaddr_nl).cast();
        msg.msg_namelen = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        loop {
            // SAFETY: `msg` points at `kernel`, `iov` and `req`, which all outlive the
            // call and have the lengths stated; the kernel only reads them.
            let sent = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, 0) };
            if sent >= 0 {
                if sent as usize != req.len() {
                    return Err(SockDiagError::Send {
                        family: name,
                        source: io::Error::new(io::ErrorKind::WriteZero, "short netlink send"),
                    });
                }
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(SockDiagError::Send {
                    family: name,
                    source: err,
                });
            }
        }
    }

    /// Receives one datagram into `buf`; `None` if it did not come from the kernel.
    pub(super) fn recv(&self, buf: &mut [u8], family: u8) -> Result<Option<usize>, SockDiagError> {
        let name = family_name(family);
        loop {
            let mut from = kernel_addr();
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
            let mut msg: libc::msghdr = unsafe { mem::zeroed() };
            msg.msg_name = (&mut from as *mut libc::sockaddr_nl).cast();
            msg.msg_namelen = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            // SAFETY: `msg` points at `from` and at `buf` through `iov`, both live and
            // writable for the stated lengths; the kernel writes no further.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, 0) };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // The socket dropped messages; nothing after this point can be
                    // trusted to be complete.
                    Some(libc::ENOBUFS) => return Err(SockDiagError::Overrun { family: name }),
                    _ => {
                        return Err(SockDiagError::Recv {
                            family: name,
                            source: err,
                        })
                    }
                }
            }
            if msg.msg_flags & libc::MSG_TRUNC != 0 {
                return Err(malformed("datagram larger than the receive buffer"));
            }
            if from.nl_pid != 0 {
                log::debug!("sock_diag: ignoring datagram from port {}", from.nl_pid);
                return Ok(None);
            }
            return Ok(Some(n as usize));
        }
    }
}

pub(super) fn kernel_addr() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain integers; all-zero is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr
}

/// Runs one dump for `family`; returns how many datagrams it took.
pub(super) fn dump_family(
    sock: &DiagSocket,
    family: u8,
    request: &DumpRequest,
    buf: &mut [u8],
    visit: &mut dyn FnMut(&TcpSocket),
) -> Result<usize, SockDiagError> {
    // A distinct seq per family keeps a stray message of the previous dump from
    // being taken for this one.
    let seq = u32::from(family);
    sock.send_dump(family, request, seq)?;
    let mut datagrams = 0;
    loop {
        let Some(n) = sock.recv(buf, family)? else {
            continue;
        };
        datagrams += 1;
        if parse_datagram(&buf[..n], seq, family, visit)? == Progress::Done {
            return Ok(datagrams);
        }
    }
}
