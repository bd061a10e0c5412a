//! The policy protocol's framing (SMTPD_POLICY_README): a request is
//! `name=value` lines ending with an empty line. Lines and attribute counts are
//! bounded so one client cannot make the agent buffer without end.

use std::{collections::HashMap, io, net::IpAddr};

use tokio::io::{AsyncBufReadExt, AsyncReadExt};

/// Longest attribute line; Postfix's own are far shorter (a long client_name
/// or ccert field is well under this).
const MAX_LINE_LEN: usize = 4096;
/// Most attributes in one request; Postfix 3.7 sends about 30.
const MAX_ATTRIBUTES: usize = 128;

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

/// One policy request: its attributes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PolicyRequest {
    pub attributes: HashMap<String, String>,
}

impl PolicyRequest {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attributes.get(name).map(String::as_str)
    }

    pub(crate) fn client(&self) -> Result<IpAddr, PolicyError> {
        self.get("client_address")
            .and_then(|a| a.parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .ok_or(PolicyError::NoClientAddress)
    }
}

/// Reads requests off one connection; returns Ok(None) at a clean EOF between requests.
pub struct PolicyReader<R> {
    reader: R,
}

impl<R: tokio::io::AsyncBufRead + Unpin> PolicyReader<R> {
    pub fn new(reader: R) -> Self {
        Self { reader }
    }

    /// Waits until a request's first byte is there (true) or the peer closed
    /// (false), consuming nothing: the server bounds this wait by the idle
    /// timeout and the rest of the request by the request timeout. Cancel-safe.
    pub async fn wait_for_request(&mut self) -> Result<bool, PolicyError> {
        Ok(!self.reader.fill_buf().await?.is_empty())
    }

    pub async fn next_request(&mut self) -> Result<Option<PolicyRequest>, PolicyError> {
        // Postfix 3.7 sends about 30 attributes: sized once, never rehashed.
        let mut request = PolicyRequest {
            attributes: HashMap::with_capacity(32),
        };
        let mut line = Vec::with_capacity(128);
        loop {
            line.clear();
            let n = (&mut self.reader)
                .take(MAX_LINE_LEN as u64 + 1)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                return if request.attributes.is_empty() {
                    Ok(None)
                } else {
                    Err(PolicyError::Truncated)
                };
            }
            if line.last() != Some(&b'\n') {
                return Err(if line.len() > MAX_LINE_LEN {
                    PolicyError::LineTooLong
                } else {
                    PolicyError::Truncated
                });
            }
            line.pop();
            if line.is_empty() {
                if request.attributes.is_empty() {
                    // Stray empty lines between requests are harmless.
                    continue;
                }
                if let Some(kind) = request.get("request") {
                    if kind != "smtpd_access_policy" {
                        return Err(PolicyError::RequestType(kind.to_string()));
                    }
                }
                return Ok(Some(request));
            }
            let text = String::from_utf8_lossy(&line);
            let Some((name, value)) = text.split_once('=') else {
                return Err(PolicyError::Malformed {
                    line: text.chars().take(80).collect(),
                });
            };
            if name.is_empty() {
                return Err(PolicyError::Malformed {
                    line: text.chars().take(80).collect(),
                });
            }
            if request.attributes.len() >= MAX_ATTRIBUTES {
                return Err(PolicyError::TooManyAttributes);
            }
            request
                .attributes
                .insert(name.to_string(), value.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::BufReader;

    use super::*;

    #[tokio::test]
    async fn reader_follows_the_wire_rules() {
        let input: &[u8] = b"request=smtpd_access_policy\nclient_address=192.0.2.1\nfoo=a=b\n\n\nclient_address=::1\n\n";
        let mut reader = PolicyReader::new(BufReader::new(input));
        let first = reader.next_request().await.unwrap().unwrap();
        assert_eq!(first.get("client_address"), Some("192.0.2.1"));
        assert_eq!(first.get("foo"), Some("a=b"));
        let second = reader.next_request().await.unwrap().unwrap();
        assert_eq!(second.get("client_address"), Some("::1"));
        assert!(reader.next_request().await.unwrap().is_none());

        for (bad, expected) in [
            (&b"no equals sign\n\n"[..], "malformed"),
            (b"request=junk\n\n", "unsupported request type"),
            (b"client_address=1.2.3.4\n", "closed in the middle"),
        ] {
            let mut reader = PolicyReader::new(BufReader::new(bad));
            let error = reader.next_request().await.unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
        let long = [b"x=".as_slice(), &vec![b'y'; 5000], b"\n\n"].concat();
        let mut reader = PolicyReader::new(BufReader::new(long.as_slice()));
        assert!(matches!(
            reader.next_request().await,
            Err(PolicyError::LineTooLong)
        ));
        let many: Vec<u8> = (0..200)
            .flat_map(|i| format!("a{i}=1\n").into_bytes())
            .collect();
        let mut reader = PolicyReader::new(BufReader::new(many.as_slice()));
        assert!(matches!(
            reader.next_request().await,
            Err(PolicyError::TooManyAttributes)
        ));
    }
}
