//! Writing a dump to one client, a chunk at a time, with the socket as the
//! only buffer beyond the chunk being written.

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    counting::state::SharedState,
    domain::unix_now,
    serving::{
        connection::Connection,
        protocol::Reply,
        show_all::{Dump, CHUNK_IPS, END_PREFIX, START_LINE},
        shutdown::Shutdown,
    },
};

/// Streams `show all` to `connection`: `OK csv`, the header, the rows, then
/// `END <rows>` (or the `ERR` line that stopped it). A write that takes longer
/// than `limit` ends the connection (the client is not reading); shutdown ends
/// the stream where it is. Locks are never held across a write.
pub async fn stream<S: AsyncRead + AsyncWrite + Unpin>(
    connection: &mut Connection<S>,
    state: &SharedState,
    stop: &mut Shutdown,
    limit: Duration,
) -> std::io::Result<()> {
    let started = Instant::now();
    let mut dump = Dump::new(state);
    let mut out = format!("{START_LINE}\n{}", dump.header());
    let mut code = "ok";
    loop {
        let more = match dump.next_chunk(state, unix_now(), CHUNK_IPS, &mut out) {
            Ok(more) => more,
            Err(error) => {
                code = error.code.as_str();
                out.push_str(&Reply::Error(error).to_line());
                false
            }
        };
        if !more && code == "ok" {
            out.push_str(&format!("{END_PREFIX}{}\n", dump.rows()));
        }
        tokio::select! {
            _ = stop.wait() => return Ok(()),
            written = connection.write_bytes(out.as_bytes(), limit) => written?,
        }
        if !more {
            break;
        }
        out.clear();
        // A dump of 1M IPs is hundreds of chunks of work: let the other
        // clients on this worker run between them.
        tokio::task::yield_now().await;
    }
    state.stats.observed.streamed("show_all", code);
    log::debug!(
        "show all: {} rows in {:.3} s",
        dump.rows(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
