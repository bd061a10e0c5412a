//! Request framing on one client connection: LF-terminated lines of at most
//! `MAX_REQUEST_LEN` bytes; a final request may instead end at EOF (Exim's
//! ${readsocket} writes the request, shuts down its side and reads the answer).

use std::time::Duration;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::Instant,
};

use crate::serving::protocol::{Reply, MAX_REQUEST_LEN};

/// What the buffered bytes hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// One request, without its LF.
    Line(Vec<u8>),
    /// More than MAX_REQUEST_LEN bytes and still no LF: the stream cannot be
    /// resynchronised, so the connection is answered and closed.
    TooLong,
}

/// Splits a byte stream into request lines.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
}

impl LineBuffer {
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, or None while a line is still incomplete.
    pub fn next_frame(&mut self) -> Option<Frame> {
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(end) if end <= MAX_REQUEST_LEN => {
                let line = self.buf[..end].to_vec();
                self.buf.drain(..=end);
                Some(Frame::Line(line))
            }
            Some(_) => Some(Frame::TooLong),
            None if self.buf.len() > MAX_REQUEST_LEN => Some(Frame::TooLong),
            None => None,
        }
    }

    /// What is left when the peer closed its side: a last request without LF.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn take_rest(&mut self) -> Option<Vec<u8>> {
        if self.buf.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.buf))
        }
    }
}

/// One client: reads frames, writes replies.
pub struct Connection<S> {
    stream: S,
    lines: LineBuffer,
    eof: bool,
}

/// A frame as the connection delivers it.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Request(Vec<u8>),
    /// The peer half-closed after this request: answer it, then close.
    LastRequest(Vec<u8>),
    TooLong,
    Closed,
    /// No request began within the idle limit.
    Idle,
    /// A request began but did not end in time.
    TimedOut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            lines: LineBuffer::default(),
            eof: false,
        }
    }

    /// The next request. `idle` bounds the wait for a request to begin;
    /// `partial` bounds the time from its first byte to its end, so a client
    /// that trickles bytes cannot hold its place (or memory) for long.
    pub async fn read_request(
        &mut self,
        idle: Duration,
        partial: Duration,
    ) -> std::io::Result<Incoming> {
        let mut chunk = [0u8; 4096];
        let mut deadline = (!self.lines.is_empty()).then(|| Instant::now() + partial);
        loop {
            if let Some(frame) = self.lines.next_frame() {
                return Ok(match frame {
                    Frame::Line(line) => Incoming::Request(line),
                    Frame::TooLong => Incoming::TooLong,
                });
            }
            if self.eof {
                return Ok(match self.lines.take_rest() {
                    Some(rest) => Incoming::LastRequest(rest),
                    None => Incoming::Closed,
                });
            }
            let limit = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => idle,
            };
            let n = match tokio::time::timeout(limit, self.stream.read(&mut chunk)).await {
                Ok(read) => read?,
                Err(_) => {
                    return Ok(if deadline.is_some() {
                        Incoming::TimedOut
                    } else {
                        Incoming::Idle
                    })
                }
            };
            if n == 0 {
                self.eof = true;
            } else {
                self.lines.extend(&chunk[..n]);
                deadline.get_or_insert_with(|| Instant::now() + partial);
            }
        }
    }

    /// Writes a reply; a client that does not read its answers for `limit`
    /// gets a TimedOut error (and is dropped by the caller).
    pub async fn write_reply(&mut self, reply: &Reply, limit: Duration) -> std::io::Result<()> {
        self.write_bytes(reply.to_line().as_bytes(), limit).await
    }

    /// Writes `bytes` (a part of a streamed answer) with the same limit.
    pub async fn write_bytes(&mut self, bytes: &[u8], limit: Duration) -> std::io::Result<()> {
        match tokio::time::timeout(limit, self.stream.write_all(bytes)).await {
            Ok(written) => written,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client is not reading its answers",
            )),
        }
    }

    pub async fn close(mut self) -> std::io::Result<()> {
        self.stream.shutdown().await
    }

    /// Closes after an answer the client may not have read yet while it is
    /// still sending (a too-long line): closing with unread input makes the
    /// kernel send a RST, which can destroy the answer in flight. So: shut our
    /// side, then discard what still comes, briefly and boundedly.
    pub async fn close_draining(mut self) -> std::io::Result<()> {
        self.stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut budget = 1 << 20;
        let deadline = Instant::now() + Duration::from_millis(500);
        while budget > 0 {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => budget -= n.min(budget),
                _ => break,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_keeps_partial() {
        let mut lines = LineBuffer::default();
        lines.extend(b"a\nbc");
        assert_eq!(lines.next_frame(), Some(Frame::Line(b"a".to_vec())));
        assert_eq!(lines.next_frame(), None);
        lines.extend(b"d\n\n");
        assert_eq!(lines.next_frame(), Some(Frame::Line(b"bcd".to_vec())));
        assert_eq!(lines.next_frame(), Some(Frame::Line(Vec::new())));
        assert_eq!(lines.take_rest(), None);
        lines.extend(b"tail");
        assert_eq!(lines.take_rest(), Some(b"tail".to_vec()));
    }

    #[test]
    fn caps_line_length() {
        let mut lines = LineBuffer::default();
        lines.extend(&vec![b'x'; MAX_REQUEST_LEN]);
        assert_eq!(lines.next_frame(), None);
        lines.extend(b"\n");
        assert!(matches!(lines.next_frame(), Some(Frame::Line(l)) if l.len() == MAX_REQUEST_LEN));
        lines.extend(&vec![b'x'; MAX_REQUEST_LEN + 1]);
        assert_eq!(lines.next_frame(), Some(Frame::TooLong));
        let mut lines = LineBuffer::default();
        lines.extend(&vec![b'x'; MAX_REQUEST_LEN + 1]);
        lines.extend(b"\n");
        assert_eq!(lines.next_frame(), Some(Frame::TooLong));
    }

    #[tokio::test]
    async fn half_closed_request_is_delivered() {
        let (client, server) = tokio::io::duplex(64);
        let mut client = client;
        client.write_all(b"first\nlast").await.unwrap();
        client.shutdown().await.unwrap();
        let mut connection = Connection::new(server);
        let limit = Duration::from_secs(5);
        assert_eq!(
            connection.read_request(limit, limit).await.unwrap(),
            Incoming::Request(b"first".to_vec())
        );
        assert_eq!(
            connection.read_request(limit, limit).await.unwrap(),
            Incoming::LastRequest(b"last".to_vec())
        );
        assert_eq!(
            connection.read_request(limit, limit).await.unwrap(),
            Incoming::Closed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_and_trickling_clients_time_out() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut connection = Connection::new(server);
        let (idle, partial) = (Duration::from_secs(300), Duration::from_secs(10));
        assert_eq!(
            connection.read_request(idle, partial).await.unwrap(),
            Incoming::Idle
        );
        // One byte a second never finishes a line within 10 s.
        let trickle = tokio::spawn(async move {
            for _ in 0..60 {
                if client.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let started = Instant::now();
        assert_eq!(
            connection.read_request(idle, partial).await.unwrap(),
            Incoming::TimedOut
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited <= Duration::from_secs(11),
            "{waited:?}"
        );
        drop(connection);
        trickle.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_reads_cannot_block_a_writer() {
        // A 64-byte pipe the client never drains.
        let (_client, server) = tokio::io::duplex(64);
        let mut connection = Connection::new(server);
        let reply = Reply::Count(u64::MAX);
        let mut result = Ok(());
        for _ in 0..10 {
            result = connection
                .write_reply(&reply, Duration::from_secs(10))
                .await;
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
    }
}
