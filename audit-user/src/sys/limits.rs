//! The open-file limit, against the clients the agent lets in.
//!
//! Every client of the query or policy socket holds a descriptor. A common
//! default soft limit (1024) is below the default max_clients (1024): at the
//! limit accept fails with EMFILE, new clients hang without `ERR busy`, and the
//! reconcile passes cannot open their netlink socket. So the soft limit is
//! raised to the hard one at start, and where even that is too low the
//! effective max_clients is lowered to what fits.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Descriptors kept for the agent itself: pinned maps, programs and links,
/// the ring buffer, the runtime's epoll and wake-ups, sock_diag and netlink
/// sockets during reconcile passes, refused clients on their way out.
pub const OWN_DESCRIPTORS: u64 = 64;

/// The limit the agent runs under, after raising the soft limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLimit {
    pub soft: u64,
    pub hard: u64,
    /// The soft limit before it was raised, if it was.
    pub raised_from: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("reading RLIMIT_NOFILE: {0}")]
    Read(nix::Error),
    #[error("raising the RLIMIT_NOFILE soft limit from {soft} to {hard}: {source}")]
    Raise {
        soft: u64,
        hard: u64,
        source: nix::Error,
    },
}

/// Raises the soft RLIMIT_NOFILE to the hard one.
pub fn raise_open_files() -> Result<FileLimit, LimitError> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(LimitError::Read)?;
    if soft >= hard {
        return Ok(FileLimit {
            soft,
            hard,
            raised_from: None,
        });
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|source| LimitError::Raise {
        soft,
        hard,
        source,
    })?;
    Ok(FileLimit {
        soft: hard,
        hard,
        raised_from: Some(soft),
    })
}

/// The most clients per socket that fit in `limit` descriptors when `sockets`
/// sockets (query, and policy if configured) may each have `max_clients`;
/// `max_clients` itself when they all fit. Never below one.
pub fn clients_within(limit: u64, sockets: usize, max_clients: usize) -> usize {
    let sockets = sockets.max(1) as u64;
    let fit = limit.saturating_sub(OWN_DESCRIPTORS) / sockets;
    usize::try_from(fit)
        .unwrap_or(usize::MAX)
        .clamp(1, max_clients.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_clients_is_kept_when_it_fits_and_lowered_when_not() {
        assert_eq!(clients_within(20_000, 1, 1024), 1024);
        assert_eq!(clients_within(1024 + OWN_DESCRIPTORS, 1, 1024), 1024);
        assert_eq!(
            clients_within(1024, 1, 1024),
            1024 - OWN_DESCRIPTORS as usize
        );
        assert_eq!(clients_within(256, 1, 1024), 192);
        // The policy socket's clients need descriptors of their own.
        assert_eq!(clients_within(256, 2, 1024), 96);
        assert_eq!(clients_within(2 * 1024 + 64, 2, 1024), 1024);
        assert_eq!(clients_within(10, 1, 1024), 1);
    }

    #[test]
    fn the_soft_limit_ends_at_the_hard_one() {
        let limit = raise_open_files().expect("RLIMIT_NOFILE");
        assert_eq!(limit.soft, limit.hard);
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!((soft, hard), (limit.soft, limit.hard));
    }
}
