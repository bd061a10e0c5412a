//! What one node writes to Redis about its own counts, and how another node
//! reads it back. Everything read back comes from a shared server that any
//! client with the password can write to, so it is parsed entry by entry: a
//! malformed or out-of-range entry is refused and counted, never half-applied,
//! and the rest of the batch still counts.
//!
//! Entries carry absolute values ("10.0.0.1 has 3 SMTP sessions"), never
//! deltas: applying one twice, or a snapshot and then an entry it already
//! includes, gives the same result, so a reader that replays is still exact.
//!
//! Text, one entry a line:
//! - `s <service> <ip> <count>`: live sessions from `ip` to `service`;
//! - `w <W>,<N> <window epoch> <series> <ip> <count>`: the count of `series`
//!   from `ip` in the window that began at `epoch × W` seconds after the Unix
//!   epoch, in monitor "W,N".
//!
//! A count of 0 removes the entry.

use std::{fmt::Write as _, net::IpAddr};

use crate::domain::{MonitorSpec, Series};

/// Highest count accepted from Redis: far above any real session or window
/// count (2^40 is a trillion), far below where sums could overflow.
pub const MAX_COUNT: u64 = 1 << 40;
/// Longest entry line accepted.
pub const MAX_LINE_LEN: usize = 256;
/// Service names are at most 31 bytes (the kernel's limit).
const MAX_SERVICE_LEN: usize = 31;

/// Where an entry's count belongs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EntryKey {
    Sessions {
        service: String,
        ip: IpAddr,
    },
    Window {
        monitor: MonitorSpec,
        epoch: u64,
        series: Series,
        ip: IpAddr,
    },
}

/// One absolute count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: EntryKey,
    pub count: u64,
}

impl Entry {
    pub fn sessions(service: &str, ip: IpAddr, count: u64) -> Self {
        Self {
            key: EntryKey::Sessions {
                service: service.to_string(),
                ip: ip.to_canonical(),
            },
            count,
        }
    }

    pub fn window(
        monitor: MonitorSpec,
        epoch: u64,
        series: Series,
        ip: IpAddr,
        count: u64,
    ) -> Self {
        Self {
            key: EntryKey::Window {
                monitor,
                epoch,
                series,
                ip: ip.to_canonical(),
            },
            count,
        }
    }

    /// Appends the entry's line (with its LF) to `out`.
    pub fn encode(&self, out: &mut String) {
        // Writing to a String cannot fail.
        let _ = match &self.key {
            EntryKey::Sessions { service, ip } => writeln!(out, "s {service} {ip} {}", self.count),
            EntryKey::Window {
                monitor,
                epoch,
                series,
                ip,
            } => writeln!(
                out,
                "w {monitor} {epoch} {} {ip} {}",
                series.name(),
                self.count
            ),
        };
    }
}

/// Encodes entries as one batch.
pub fn encode(entries: &[Entry]) -> String {
    let mut out = String::with_capacity(entries.len() * 32);
    for entry in entries {
        entry.encode(&mut out);
    }
    out
}

/// Why an entry line was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("line longer than {MAX_LINE_LEN} bytes")]
    TooLong,
    #[error("unknown entry kind")]
    Kind,
    #[error("wrong number of fields")]
    Fields,
    #[error("bad service name")]
    Service,
    #[error("bad IP address")]
    Address,
    #[error("count is not a whole number up to 2^40")]
    Count,
    #[error("bad monitor")]
    Monitor,
    #[error("bad window epoch")]
    Epoch,
    #[error("unknown series")]
    Series,
}

/// Parses one entry line (without its LF).
pub fn parse_entry(line: &str) -> Result<Entry, EntryError> {
    if line.len() > MAX_LINE_LEN {
        return Err(EntryError::TooLong);
    }
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.first().copied() {
        Some("s") => {
            let [_, service, ip, count] = fields[..] else {
                return Err(EntryError::Fields);
            };
            Ok(Entry::sessions(
                parse_service(service)?,
                parse_ip(ip)?,
                parse_count(count)?,
            ))
        }
        Some("w") => {
            let [_, monitor, epoch, series, ip, count] = fields[..] else {
                return Err(EntryError::Fields);
            };
            let monitor: MonitorSpec = monitor.parse().map_err(|_| EntryError::Monitor)?;
            let epoch: u64 = parse_number(epoch).ok_or(EntryError::Epoch)?;
            // Windows start before year 10,000 or they are no windows of ours.
            if epoch.saturating_mul(monitor.window_secs) > 253_402_300_800 {
                return Err(EntryError::Epoch);
            }
            let series = Series::ALL
                .into_iter()
                .find(|s| s.name() == series)
                .ok_or(EntryError::Series)?;
            Ok(Entry::window(
                monitor,
                epoch,
                series,
                parse_ip(ip)?,
                parse_count(count)?,
            ))
        }
        _ => Err(EntryError::Kind),
    }
}

/// Entries parsed from a batch, and how many lines were refused.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub entries: Vec<Entry>,
    pub refused: u64,
}

/// Parses a batch: every well-formed line is kept, every other one counted.
pub fn parse_batch(text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        match parse_entry(line) {
            Ok(entry) => parsed.entries.push(entry),
            Err(_) => parsed.refused += 1,
        }
    }
    parsed
}

fn parse_service(text: &str) -> Result<&str, EntryError> {
    let valid = !text.is_empty()
        && text.len() <= MAX_SERVICE_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    valid.then_some(text).ok_or(EntryError::Service)
}

fn parse_ip(text: &str) -> Result<IpAddr, EntryError> {
    text.parse().map_err(|_| EntryError::Address)
}

fn parse_count(text: &str) -> Result<u64, EntryError> {
    parse_number(text)
        .filter(|&n| n <= MAX_COUNT)
        .ok_or(EntryError::Count)
}

/// Plain decimal digits only: no sign, no spaces, no leading `+`.
fn parse_number(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The first line of a snapshot, and every heartbeat: which run of the node
/// wrote it (`epoch`, random per start) and the last batch it includes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub epoch: u64,
    pub seq: u64,
}

const HEADER_TAG: &str = "v1";

impl Header {
    pub fn encode(&self) -> String {
        format!("{HEADER_TAG} {:016x} {}", self.epoch, self.seq)
    }

    pub fn parse(text: &str) -> Option<Self> {
        let mut fields = text.split(' ');
        if fields.next()? != HEADER_TAG {
            return None;
        }
        let epoch = fields.next().filter(|f| f.len() == 16)?;
        let epoch = u64::from_str_radix(epoch, 16).ok()?;
        let seq = parse_number(fields.next()?)?;
        fields.next().is_none().then_some(Self { epoch, seq })
    }
}

/// A snapshot: the header line, then the entries.
pub fn encode_snapshot(header: Header, entries: &[Entry]) -> String {
    let mut out = header.encode();
    out.push('\n');
    for entry in entries {
        entry.encode(&mut out);
    }
    out
}

/// Splits a snapshot into its header and entries; None when the header is bad
/// (the whole snapshot is then refused).
pub fn parse_snapshot(text: &str) -> Option<(Header, Parsed)> {
    let (head, body) = text.split_once('\n').unwrap_or((text, ""));
    Some((Header::parse(head)?, parse_batch(body)))
}

/// A heartbeat: the header of the node's latest batch and a counter that
/// moves at every beat, so readers see the node is alive without comparing
/// clocks across hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub header: Header,
    pub beat: u64,
}

impl Heartbeat {
    pub fn encode(&self) -> String {
        format!("{} {}", self.header.encode(), self.beat)
    }

    pub fn parse(text: &str) -> Option<Self> {
        let (head, beat) = text.rsplit_once(' ')?;
        Some(Self {
            header: Header::parse(head)?,
            beat: parse_number(beat)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> MonitorSpec {
        text.parse().unwrap()
    }

    #[test]
    fn entries_round_trip() {
        let entries = vec![
            Entry::sessions("SMTP", "10.0.0.1".parse().unwrap(), 3),
            Entry::sessions("Control", "2001:db8::1".parse().unwrap(), 0),
            Entry::window(
                spec("60,1"),
                29_000_000,
                Series::Rejections,
                "::ffff:192.0.2.7".parse().unwrap(),
                MAX_COUNT,
            ),
        ];
        let text = encode(&entries);
        let parsed = parse_batch(&text);
        assert_eq!(parsed.refused, 0);
        assert_eq!(parsed.entries, entries);
        // v4-mapped addresses are stored as IPv4, as the local index does.
        assert!(text.contains(" 192.0.2.7 "), "{text}");
    }

    #[test]
    fn hostile_lines_are_refused_one_by_one() {
        let long = format!("s SMTP 10.0.0.1 {}", "1".repeat(300));
        let lines = [
            ("x SMTP 10.0.0.1 1", EntryError::Kind),
            ("s SMTP 10.0.0.1", EntryError::Fields),
            ("s SMTP 10.0.0.1 1 2", EntryError::Fields),
            ("s  SMTP 10.0.0.1 1", EntryError::Fields),
            ("s bad/name 10.0.0.1 1", EntryError::Service),
            ("s SMTP 10.0.0.256 1", EntryError::Address),
            ("s SMTP 10.0.0.1 -1", EntryError::Count),
            ("s SMTP 10.0.0.1 +1", EntryError::Count),
            ("s SMTP 10.0.0.1 18446744073709551615", EntryError::Count),
            ("s SMTP 10.0.0.1 1099511627777", EntryError::Count),
            ("w 60 1 connections 10.0.0.1 1", EntryError::Monitor),
            ("w 60,1 1 connections 10.0.0.1", EntryError::Fields),
            ("w 0,1 1 connections 10.0.0.1 1", EntryError::Monitor),
            ("w 60,1 x connections 10.0.0.1 1", EntryError::Epoch),
            (
                "w 60,1 18446744073709551 connections 10.0.0.1 1",
                EntryError::Epoch,
            ),
            ("w 60,1 1 spam 10.0.0.1 1", EntryError::Series),
            (long.as_str(), EntryError::TooLong),
        ];
        for (line, error) in lines {
            assert_eq!(parse_entry(line), Err(error), "{line:?}");
        }
        let mut batch: String = lines.iter().map(|(l, _)| format!("{l}\n")).collect();
        batch.push_str("s SMTP 10.0.0.9 2\n");
        let parsed = parse_batch(&batch);
        assert_eq!(parsed.refused, lines.len() as u64);
        assert_eq!(
            parsed.entries,
            vec![Entry::sessions("SMTP", "10.0.0.9".parse().unwrap(), 2)]
        );
    }

    #[test]
    fn headers_and_heartbeats() {
        let header = Header {
            epoch: 0xdead_beef_0000_0001,
            seq: 42,
        };
        assert_eq!(Header::parse(&header.encode()), Some(header));
        let beat = Heartbeat { header, beat: 7 };
        assert_eq!(Heartbeat::parse(&beat.encode()), Some(beat));
        for bad in [
            "",
            "v1",
            "v2 00000000deadbeef 1",
            "v1 beef 1",
            "v1 00000000deadbeef -1",
            "v1 00000000deadbeef 1 2",
        ] {
            assert_eq!(Header::parse(bad), None, "{bad:?}");
        }
        let snapshot = encode_snapshot(
            header,
            &[Entry::sessions("SMTP", "10.0.0.1".parse().unwrap(), 1)],
        );
        let (parsed_header, parsed) = parse_snapshot(&snapshot).unwrap();
        assert_eq!(parsed_header, header);
        assert_eq!(parsed.entries.len(), 1);
        assert!(parse_snapshot("garbage\ns SMTP 10.0.0.1 1\n").is_none());
    }
}
