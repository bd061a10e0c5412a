//! The policy protocol's framing (SMTPD_POLICY_README): a request is
//! `name=value` lines ending with an empty line. [`Framer`] takes bytes as
//! they arrive and tells a request that is not all there yet from one that can
//! never be one; lines and attribute counts are bounded so one client cannot
//! make the agent buffer without end. A request is kept as its text and where
//! each attribute lies in it: two allocations a request, where a map of owned
//! strings took sixty (README "Benchmarks", mailhost).

use std::{collections::HashMap, io, net::IpAddr};

/// Longest attribute line; Postfix's own are far shorter (a long client_name
/// or ccert field is well under this).
const MAX_LINE_LEN: usize = 4096;
/// Most attributes in one request; Postfix 3.7 sends about 30.
const MAX_ATTRIBUTES: usize = 128;
/// Read at a time; a Postfix request is about 700 bytes.
const READ_CHUNK: usize = 4096;

/// Why a request could not be read; the connection is then dropped unanswered.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("attribute line longer than {MAX_LINE_LEN} bytes")]
    LineTooLong,
    #[error("more than {MAX_ATTRIBUTES} attributes in one request")]
    TooManyAttributes,
    #[error("malformed attribute line {line:?} (expected name=value)")]
    Malformed { line: String },
    #[error("request without a usable client_address")]
    NoClientAddress,
    #[error("unsupported request type {0:?} (expected smtpd_access_policy)")]
    RequestType(String),
    #[error("connection closed in the middle of a request")]
    Truncated,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Where one attribute lies in its request's text: `name` is
/// `text[start..eq]`, the value `text[eq + 1..end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Field {
    start: u32,
    eq: u32,
    end: u32,
}

/// One policy request: its attribute lines and where each attribute is.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PolicyRequest {
    text: String,
    fields: Vec<Field>,
}

impl PolicyRequest {
    /// An attribute's value; of a name sent twice, the last (as Postfix's
    /// own attribute readers keep).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .rev()
            .find(|f| &self.text[f.start as usize..f.eq as usize] == name)
            .map(|f| &self.text[f.eq as usize + 1..f.end as usize])
    }

    /// The attributes in the order sent, repeats included.
    pub fn attributes(&self) -> impl Iterator<Item = (&str, &str)> {
        self.fields.iter().map(|f| {
            (
                &self.text[f.start as usize..f.eq as usize],
                &self.text[f.eq as usize + 1..f.end as usize],
            )
        })
    }

    /// The attributes as a map (the last of a repeated name), for the Lua scripts.
    pub fn to_map(&self) -> HashMap<String, String> {
        self.attributes()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    /// A request of these attributes, as if they had been sent in this order.
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        let text: String = pairs.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        Self::index(text)
    }

    pub(crate) fn client(&self) -> Result<IpAddr, PolicyError> {
        self.get("client_address")
            .and_then(|a| a.parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .ok_or(PolicyError::NoClientAddress)
    }

    /// Finds the attributes of `text`: lines the framer has checked, each
    /// with a `=` after a name.
    fn index(text: String) -> Self {
        let mut fields = Vec::with_capacity(32);
        let mut start = 0;
        for line in text.split_terminator('\n') {
            let end = start + line.len();
            if let Some(eq) = line.find('=') {
                fields.push(Field {
                    start: start as u32,
                    eq: (start + eq) as u32,
                    end: end as u32,
                });
            }
            start = end + 1;
        }
        Self { text, fields }
    }
}

/// Frames the requests of one connection from bytes as they arrive.
#[derive(Debug)]
pub struct Framer {
    buffer: Vec<u8>,
    /// What one read fills; a request is copied from it into `buffer`.
    scratch: Box<[u8; READ_CHUNK]>,
    /// Where the request being framed begins (stray empty lines before it
    /// are skipped).
    begin: usize,
    /// Where the first line not yet checked begins.
    checked: usize,
    /// The request's attributes so far, relative to `begin`.
    fields: Vec<Field>,
}

impl Default for Framer {
    fn default() -> Self {
        Self {
            buffer: Vec::with_capacity(READ_CHUNK),
            scratch: Box::new([0; READ_CHUNK]),
            begin: 0,
            checked: 0,
            fields: Vec::with_capacity(32),
        }
    }
}

impl Framer {
    /// Reads once from `from` into the buffer: the bytes read, 0 at EOF.
    pub fn read_from(&mut self, from: &mut impl io::Read) -> io::Result<usize> {
        let read = from.read(&mut self.scratch[..])?;
        self.buffer.extend_from_slice(&self.scratch[..read]);
        Ok(read)
    }

    /// Adds bytes that arrived.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Part of a request is here, not its end.
    pub fn is_mid_request(&self) -> bool {
        self.buffer[self.begin..].iter().any(|&b| b != b'\n')
    }

    /// The connection ended: an error if it ended inside a request.
    pub fn finish(&self) -> Result<(), PolicyError> {
        if self.is_mid_request() {
            Err(PolicyError::Truncated)
        } else {
            Ok(())
        }
    }

    /// The next whole request; None until its empty line has arrived.
    pub fn next_request(&mut self) -> Result<Option<PolicyRequest>, PolicyError> {
        loop {
            let rest = &self.buffer[self.checked..];
            let Some(len) = memchr::memchr(b'\n', rest) else {
                if rest.len() > MAX_LINE_LEN {
                    return Err(PolicyError::LineTooLong);
                }
                self.compact();
                return Ok(None);
            };
            if len > MAX_LINE_LEN {
                return Err(PolicyError::LineTooLong);
            }
            let (start, end) = (self.checked, self.checked + len);
            self.checked = end + 1;
            if len == 0 {
                if self.fields.is_empty() {
                    // Stray empty lines between requests are harmless.
                    self.begin = self.checked;
                    continue;
                }
                return self.take(end).map(Some);
            }
            let line = &self.buffer[start..end];
            let eq = match memchr::memchr(b'=', line) {
                Some(eq) if eq > 0 => eq,
                _ => {
                    return Err(PolicyError::Malformed {
                        line: String::from_utf8_lossy(line).chars().take(80).collect(),
                    })
                }
            };
            if self.fields.len() >= MAX_ATTRIBUTES {
                return Err(PolicyError::TooManyAttributes);
            }
            self.fields.push(Field {
                start: (start - self.begin) as u32,
                eq: (start + eq - self.begin) as u32,
                end: (end - self.begin) as u32,
            });
        }
    }

    /// The request whose empty line is at `end`, out of the buffer.
    fn take(&mut self, end: usize) -> Result<PolicyRequest, PolicyError> {
        let bytes = &self.buffer[self.begin..end];
        let request = match std::str::from_utf8(bytes) {
            Ok(text) => PolicyRequest {
                text: text.to_string(),
                fields: std::mem::replace(&mut self.fields, Vec::with_capacity(32)),
            },
            // Replacement characters move the offsets: index the text again.
            Err(_) => {
                self.fields.clear();
                PolicyRequest::index(String::from_utf8_lossy(bytes).into_owned())
            }
        };
        self.buffer.drain(..self.checked);
        self.begin = 0;
        self.checked = 0;
        if let Some(kind) = request.get("request") {
            if kind != "smtpd_access_policy" {
                return Err(PolicyError::RequestType(kind.to_string()));
            }
        }
        Ok(request)
    }

    /// Drops skipped empty lines, so a client sending only those holds no memory.
    fn compact(&mut self) {
        if self.begin > 0 {
            self.buffer.drain(..self.begin);
            self.checked -= self.begin;
            self.begin = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request framed from `input` fed in `chunk`-byte pieces, and
    /// how it ended.
    fn frame(input: &[u8], chunk: usize) -> (Vec<PolicyRequest>, Result<(), PolicyError>) {
        let mut framer = Framer::default();
        let mut requests = Vec::new();
        for piece in input.chunks(chunk) {
            framer.push(piece);
            loop {
                match framer.next_request() {
                    Ok(Some(request)) => requests.push(request),
                    Ok(None) => break,
                    Err(e) => return (requests, Err(e)),
                }
            }
        }
        let end = framer.finish();
        (requests, end)
    }

    #[test]
    fn framer_follows_the_wire_rules_in_any_pieces() {
        let input: &[u8] = b"\nrequest=smtpd_access_policy\nclient_address=192.0.2.1\nfoo=a=b\nfoo=c\n\n\nclient_address=::1\nempty=\n\n";
        for chunk in [1, 2, 7, input.len()] {
            let (requests, end) = frame(input, chunk);
            end.unwrap();
            assert_eq!(requests.len(), 2, "chunks of {chunk}");
            assert_eq!(requests[0].get("client_address"), Some("192.0.2.1"));
            assert_eq!(requests[0].get("foo"), Some("c"), "the last of a repeat");
            assert_eq!(requests[0].to_map()["foo"], "c");
            assert_eq!(requests[0].attributes().nth(2), Some(("foo", "a=b")));
            assert_eq!(requests[1].get("client_address"), Some("::1"));
            assert_eq!(requests[1].get("empty"), Some(""));
            assert_eq!(requests[1].get("missing"), None);
        }
    }

    #[test]
    fn framer_refuses_what_can_never_be_a_request() {
        for (bad, expected) in [
            (&b"no equals sign\n\n"[..], "malformed"),
            (b"=value\n\n", "malformed"),
            (b"request=junk\n\n", "unsupported request type"),
            (b"client_address=1.2.3.4\n", "closed in the middle"),
            (b"client_address=1.2", "closed in the middle"),
        ] {
            for chunk in [1, bad.len()] {
                let (_, end) = frame(bad, chunk);
                let error = end.unwrap_err().to_string();
                assert!(error.contains(expected), "{error}");
            }
        }
        // Too long is known before the line ends.
        let long = [b"x=".as_slice(), &vec![b'y'; 5000]].concat();
        assert!(matches!(frame(&long, 100).1, Err(PolicyError::LineTooLong)));
        let many: Vec<u8> = (0..200)
            .flat_map(|i| format!("a{i}=1\n").into_bytes())
            .collect();
        assert!(matches!(
            frame(&many, 64).1,
            Err(PolicyError::TooManyAttributes)
        ));
    }

    #[test]
    fn invalid_utf8_is_replaced_and_still_indexed() {
        let (requests, end) = frame(b"helo_name=\xff\xfeok\nclient_address=192.0.2.1\n\n", 3);
        end.unwrap();
        assert_eq!(requests[0].get("helo_name"), Some("\u{fffd}\u{fffd}ok"));
        assert_eq!(requests[0].get("client_address"), Some("192.0.2.1"));
    }

    #[test]
    fn empty_lines_alone_hold_no_memory() {
        let mut framer = Framer::default();
        for _ in 0..10_000 {
            framer.push(b"\n\n\n");
            assert!(framer.next_request().unwrap().is_none());
        }
        assert!(framer.buffer.is_empty());
        framer.finish().unwrap();
    }

    #[test]
    fn requests_read_from_a_stream_come_whole() {
        let mut input: &[u8] = b"client_address=192.0.2.1\n\nclient_address=192.0.2.2\n\n";
        let mut framer = Framer::default();
        assert_eq!(framer.read_from(&mut input).unwrap(), 52);
        let first = framer.next_request().unwrap().unwrap();
        let second = framer.next_request().unwrap().unwrap();
        assert_eq!(
            (first.get("client_address"), second.get("client_address")),
            (Some("192.0.2.1"), Some("192.0.2.2"))
        );
        assert_eq!(framer.read_from(&mut input).unwrap(), 0);
        assert!(framer.next_request().unwrap().is_none());
        framer.finish().unwrap();
    }
}
