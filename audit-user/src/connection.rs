//! Request framing on one client connection: LF-terminated lines of at most
//! `MAX_REQUEST_LEN` bytes; a final request may instead end at EOF (Exim's
//! ${readsocket} writes the request, shuts down its side and reads the answer).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{Reply, MAX_REQUEST_LEN};

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
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            lines: LineBuffer::default(),
            eof: false,
        }
    }

    pub async fn read_request(&mut self) -> std::io::Result<Incoming> {
        let mut chunk = [0u8; 4096];
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
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                self.eof = true;
            } else {
                self.lines.extend(&chunk[..n]);
            }
        }
    }

    pub async fn write_reply(&mut self, reply: &Reply) -> std::io::Result<()> {
        self.stream.write_all(reply.to_line().as_bytes()).await
    }

    pub async fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        self.stream.write_all(line.as_bytes()).await
    }

    pub async fn close(mut self) -> std::io::Result<()> {
        self.stream.shutdown().await
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
        assert_eq!(
            connection.read_request().await.unwrap(),
            Incoming::Request(b"first".to_vec())
        );
        assert_eq!(
            connection.read_request().await.unwrap(),
            Incoming::LastRequest(b"last".to_vec())
        );
        assert_eq!(connection.read_request().await.unwrap(), Incoming::Closed);
    }
}
