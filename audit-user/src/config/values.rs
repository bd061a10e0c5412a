//! The file's values, each a type that can only hold what its key allows.
//! Every rule is written once, here: the file (through serde) and the flags
//! (through `FromStr`) use the same types, and the error says what is wrong
//! with the value; the key and position are added by whoever read it.

use std::{str::FromStr, time::Duration};

use serde::Deserialize;

use crate::{
    domain::{MonitorSpec, MonitorSpecError},
    sys::users::{group_id, user_id},
};

/// What is wrong with one value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("`{0}` is not a whole number")]
    NotANumber(String),
    #[error("{0} is not a positive number")]
    NotPositive(i64),
    #[error("{0} is not a positive number of seconds")]
    NotPositiveSecs(i64),
    #[error("{0} is not between 1 and {max}", max = TableSize::MAX)]
    TableSize(i64),
    #[error("{0} is not a power of two between {min} and {max}", min = RingBytes::MIN, max = RingBytes::MAX)]
    RingBytes(i64),
    #[error("`{0}` is not an octal file mode like \"0660\"")]
    FileMode(String),
    #[error("port {0} is not in 1..=65535")]
    Port(i64),
    #[error("{0} is not a valid id")]
    Id(i64),
    #[error("no such user or group {0:?}")]
    NoSuchName(String),
    #[error(transparent)]
    Monitor(#[from] MonitorSpecError),
    #[error("Redis URL: {0}")]
    RedisUrl(String),
    #[error("`{0}` is not a node name (1 to 64 letters, digits, _ - .)")]
    NodeName(String),
    #[error("`{0}` is not a key prefix (1 to 64 letters, digits, _ - . :)")]
    KeyPrefix(String),
}

/// Deserialize through the type's `TryFrom<i64>`, saying what it expects
/// when the file has another type there (`max_clients = "lots"`).
macro_rules! deserialize_integer {
    ($($t:ty => $expected:literal),* $(,)?) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Expected;
                impl serde::de::Visitor<'_> for Expected {
                    type Value = $t;

                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str($expected)
                    }

                    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<$t, E> {
                        <$t>::try_from(n).map_err(E::custom)
                    }

                    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<$t, E> {
                        self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
                    }
                }
                deserializer.deserialize_i64(Expected)
            }
        }
    )*};
}

/// `FromStr` for the flags: a whole number, then the file's rule.
macro_rules! from_integer_text {
    ($($t:ty),*) => {$(
        impl FromStr for $t {
            type Err = ValueError;

            fn from_str(text: &str) -> Result<Self, ValueError> {
                let n: i64 = text
                    .trim()
                    .parse()
                    .map_err(|_| ValueError::NotANumber(text.to_string()))?;
                Self::try_from(n)
            }
        }
    )*};
}

/// A positive count (max_clients, max_tracked_ips_per_monitor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PositiveCount(pub usize);

impl TryFrom<i64> for PositiveCount {
    type Error = ValueError;

    fn try_from(n: i64) -> Result<Self, ValueError> {
        usize::try_from(n)
            .ok()
            .filter(|&n| n > 0)
            .map(Self)
            .ok_or(ValueError::NotPositive(n))
    }
}

/// A positive number of seconds (the `*_secs` keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PositiveSecs(pub Duration);

impl TryFrom<i64> for PositiveSecs {
    type Error = ValueError;

    fn try_from(secs: i64) -> Result<Self, ValueError> {
        u64::try_from(secs)
            .ok()
            .filter(|&s| s > 0)
            .map(|s| Self(Duration::from_secs(s)))
            .ok_or(ValueError::NotPositiveSecs(secs))
    }
}

/// Entries of a kernel hash table, set when the maps are created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSize(pub u32);

impl TableSize {
    pub const MAX: u32 = 1 << 26;
}

impl TryFrom<i64> for TableSize {
    type Error = ValueError;

    fn try_from(n: i64) -> Result<Self, ValueError> {
        u32::try_from(n)
            .ok()
            .filter(|&n| n > 0 && n <= Self::MAX)
            .map(Self)
            .ok_or(ValueError::TableSize(n))
    }
}

/// The kernel's ring buffer size: it wants a power of two and a multiple of
/// the page size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingBytes(pub u32);

impl RingBytes {
    pub const MIN: u32 = 4096;
    pub const MAX: u32 = 1 << 30;
}

impl TryFrom<i64> for RingBytes {
    type Error = ValueError;

    fn try_from(n: i64) -> Result<Self, ValueError> {
        u32::try_from(n)
            .ok()
            .filter(|n| n.is_power_of_two() && (Self::MIN..=Self::MAX).contains(n))
            .map(Self)
            .ok_or(ValueError::RingBytes(n))
    }
}

/// A socket's permission bits, written in octal ("0660", "0o660").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct FileMode(pub u32);

impl TryFrom<String> for FileMode {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        let digits = text.strip_prefix("0o").unwrap_or(&text);
        u32::from_str_radix(digits, 8)
            .ok()
            .filter(|&m| m <= 0o777)
            .map(Self)
            .ok_or(ValueError::FileMode(text))
    }
}

/// A TCP port a service listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port(pub u16);

impl TryFrom<i64> for Port {
    type Error = ValueError;

    fn try_from(n: i64) -> Result<Self, ValueError> {
        u16::try_from(n)
            .ok()
            .filter(|&p| p != 0)
            .map(Self)
            .ok_or(ValueError::Port(n))
    }
}

from_integer_text!(PositiveCount, PositiveSecs, TableSize, RingBytes, Port);
deserialize_integer!(
    PositiveCount => "a positive whole number",
    PositiveSecs => "a positive whole number of seconds",
    TableSize => "a whole number of entries",
    RingBytes => "a whole number of bytes",
    Port => "a port number",
);

/// A monitor ("W,N").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Monitor(pub MonitorSpec);

impl TryFrom<String> for Monitor {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        Ok(Self(text.parse()?))
    }
}

/// A user or group as written: a number or a name.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum IdOrName {
    Id(i64),
    Name(String),
}

impl IdOrName {
    fn resolve(self, lookup: fn(&str) -> Option<u32>) -> Result<u32, ValueError> {
        match self {
            IdOrName::Id(id) => u32::try_from(id).map_err(|_| ValueError::Id(id)),
            IdOrName::Name(name) => lookup(&name).ok_or(ValueError::NoSuchName(name)),
        }
    }
}

/// A local user, resolved to its uid when the file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "IdOrName")]
pub struct Uid(pub u32);

impl TryFrom<IdOrName> for Uid {
    type Error = ValueError;

    fn try_from(id: IdOrName) -> Result<Self, ValueError> {
        id.resolve(user_id).map(Self)
    }
}

/// A local group, resolved to its gid when the file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "IdOrName")]
pub struct Gid(pub u32);

impl TryFrom<IdOrName> for Gid {
    type Error = ValueError;

    fn try_from(id: IdOrName) -> Result<Self, ValueError> {
        id.resolve(group_id).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_value_keeps_its_rule() {
        assert_eq!(PositiveCount::try_from(3), Ok(PositiveCount(3)));
        assert_eq!(PositiveCount::try_from(0), Err(ValueError::NotPositive(0)));
        assert_eq!(
            PositiveSecs::try_from(-1).unwrap_err().to_string(),
            "-1 is not a positive number of seconds"
        );
        assert_eq!(TableSize::try_from(1 << 26), Ok(TableSize(1 << 26)));
        assert!(TableSize::try_from((1 << 26) + 1).is_err());
        assert_eq!(RingBytes::try_from(4096), Ok(RingBytes(4096)));
        for bad in [2048, 5000, 1 << 31] {
            assert_eq!(RingBytes::try_from(bad), Err(ValueError::RingBytes(bad)));
        }
        assert_eq!(FileMode::try_from("0o640".to_string()), Ok(FileMode(0o640)));
        assert!(FileMode::try_from("999".to_string()).is_err());
        assert!(FileMode::try_from("01000".to_string()).is_err());
        assert_eq!(Port::try_from(65535), Ok(Port(65535)));
        assert_eq!(Port::try_from(0), Err(ValueError::Port(0)));
        assert_eq!("10".parse::<PositiveCount>(), Ok(PositiveCount(10)));
        assert_eq!(
            "ten".parse::<PositiveSecs>(),
            Err(ValueError::NotANumber("ten".into()))
        );
        assert_eq!(
            "0".parse::<PositiveSecs>(),
            Err(ValueError::NotPositiveSecs(0))
        );
        assert_eq!(Uid::try_from(IdOrName::Name("root".into())), Ok(Uid(0)));
        assert_eq!(Uid::try_from(IdOrName::Id(-1)), Err(ValueError::Id(-1)));
        assert!(matches!(
            Gid::try_from(IdOrName::Name("no-such-group-here".into())),
            Err(ValueError::NoSuchName(_))
        ));
    }
}
