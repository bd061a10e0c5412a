//! The sync program: seeds, forgets, adjusts and adopts sessions with the
//! kernel's own atomic code path, run once per request through
//! BPF_PROG_TEST_RUN (aya's `TestRun` for XDP programs, which also returns the
//! kernel-timed run duration the benchmarks quote).

use std::{collections::HashSet, net::IpAddr};

use audit_common::{
    program_names, session_state, sync_result, SessionEvent, SocketRecord, EVENT_CLOSE, FAMILY_V4,
    FAMILY_V6, SYNC_ADJUST, SYNC_ADOPT,
};
use aya::programs::{TestRun, TestRunOptions, Xdp};

use crate::kernel::{api::Uncounted, sock_diag};

use super::{error::LoadError, pins::program_error, KernelProgram};

impl KernelProgram {
    /// Runs the sync program once on `request` (see audit_common::SessionEvent);
    /// returns its `sync_result`.
    pub fn sync(&self, request: &SessionEvent) -> Result<u32, LoadError> {
        Ok(self.sync_timed(request)?.0)
    }

    /// `sync`, also returning the program's own run time as the kernel timed it
    /// (nanoseconds): the benchmarks' measure of the kernel's map work.
    pub fn sync_timed(&self, request: &SessionEvent) -> Result<(u32, u32), LoadError> {
        let program = self
            .ebpf
            .program(program_names::SYNC)
            .ok_or(LoadError::MissingProgram(program_names::SYNC))?;
        let xdp: &Xdp = program
            .try_into()
            .map_err(program_error(program_names::SYNC))?;
        // SAFETY: SessionEvent is repr(C) plain integers with explicit padding
        // (aya::Pod), so all its bytes are initialised; the slice borrows it.
        let data = unsafe {
            std::slice::from_raw_parts(
                (request as *const SessionEvent).cast::<u8>(),
                std::mem::size_of::<SessionEvent>(),
            )
        };
        let result = xdp
            .test_run(TestRunOptions {
                data_in: Some(data),
                ..TestRunOptions::default()
            })
            .map_err(LoadError::Sync)?;
        // The kernel reports the duration in whole nanoseconds as a u32.
        let nanos = u32::try_from(result.duration.as_nanos()).unwrap_or(u32::MAX);
        Ok((result.return_value, nanos))
    }

    /// Adds `delta` to the kernel's count of (`ip`, `slot`) atomically.
    pub fn adjust_live(&self, ip: IpAddr, slot: u8, delta: i64) -> Result<u32, LoadError> {
        let (family, addr) = family_and_addr(ip);
        self.sync(&SessionEvent {
            cookie: delta as u64,
            addr,
            kind: SYNC_ADJUST,
            family,
            service: slot,
            _pad: [0; 5],
        })
    }

    /// Counts sessions sock_ops left `UNCOUNTED` (the per-IP table was full)
    /// where there is room now, by a SOCKETS record. A session that closed
    /// between the snapshot and its adoption would keep a record no close
    /// deletes, so a second look forgets every adopted session that is not
    /// open and `UNCOUNTED` still. Returns the records counted.
    pub fn adopt_uncounted(&self, sessions: &[Uncounted]) -> Result<Vec<SocketRecord>, LoadError> {
        let mut adopted = Vec::new();
        for session in sessions {
            let request = SessionEvent {
                cookie: session.cookie,
                addr: session.record.addr,
                kind: SYNC_ADOPT,
                family: session.record.family,
                service: session.record.service,
                _pad: [0; 5],
            };
            if self.sync(&request)? == sync_result::APPLIED {
                adopted.push(*session);
            }
        }
        if adopted.is_empty() {
            return Ok(Vec::new());
        }
        let live = sock_diag::state_mask(&sock_diag::LIVE_STATES);
        let open: HashSet<u64> = sock_diag::dump_tcp_with_sessions(live, self.sessions_fd())?
            .iter()
            .filter(|s| {
                s.session
                    .is_some_and(|storage| storage.state == session_state::UNCOUNTED)
            })
            .map(|s| s.cookie)
            .collect();
        let mut kept = Vec::with_capacity(adopted.len());
        for session in adopted {
            if open.contains(&session.cookie) {
                kept.push(session.record);
                continue;
            }
            // Closed: its close deleted the record (UNCHANGED here) or came
            // before the record existed (forgotten here).
            self.sync(&SessionEvent {
                cookie: session.cookie,
                kind: EVENT_CLOSE,
                ..SessionEvent::default()
            })?;
        }
        Ok(kept)
    }
}

/// A family tag and the address bytes as the kernel's records hold them.
pub(super) fn family_and_addr(ip: IpAddr) -> (u8, [u8; 16]) {
    match ip {
        IpAddr::V4(v4) => {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&v4.octets());
            (FAMILY_V4, addr)
        }
        IpAddr::V6(v6) => (FAMILY_V6, v6.octets()),
    }
}
