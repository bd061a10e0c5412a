//! `msys.audit_series`: named windowed counters a script defines, keyed by
//! IP (`cidr`: counted per address, summed per prefix on query, like the
//! monitors' series) or by string. Windows are `interval` seconds aligned on
//! multiples of it; window 0 is the current one, up to `num_windows - 1`.
//! Counts never go below 0 (Momentum allows negative adjustments; a
//! decrement past 0 stops at 0).

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
};

use ipnet::IpNet;

use crate::counting::index::CidrIndex;

/// Series one agent holds at most.
pub const MAX_SERIES: usize = 256;
/// Keys one window of one series holds at most; past it new keys are not counted.
pub const MAX_KEYS_PER_WINDOW: usize = 1 << 20;
/// Most windows of one series.
pub const MAX_WINDOWS: u64 = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesKind {
    Cidr,
    Str,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeriesError {
    #[error("type must be \"cidr\" or \"string\", got {0:?}")]
    BadKind(String),
    #[error(
        "interval and num_windows must be whole numbers from 1 (at most {MAX_WINDOWS} windows)"
    )]
    BadShape,
    #[error("series {0:?} is not defined (msys.audit_series.define)")]
    Undefined(String),
    #[error("more than {MAX_SERIES} series")]
    TooMany,
    #[error("series {0:?} is a {1} series: its key is {2}")]
    WrongKey(String, &'static str, &'static str),
}

/// One key, as the series' type needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeriesKey {
    Ip(IpAddr),
    Net(IpNet),
    Str(String),
}

enum Bucket {
    Cidr(Box<CidrIndex>),
    Str(HashMap<String, u64>),
}

struct Series {
    kind: SeriesKind,
    interval: u64,
    windows: u64,
    /// (epoch, counts), newest first.
    data: VecDeque<(u64, Bucket)>,
}

#[derive(Default)]
pub struct SeriesStore {
    series: HashMap<String, Series>,
}

impl SeriesKind {
    pub fn parse(text: &str) -> Result<Self, SeriesError> {
        match text {
            "cidr" => Ok(SeriesKind::Cidr),
            "string" => Ok(SeriesKind::Str),
            other => Err(SeriesError::BadKind(other.to_string())),
        }
    }
}

impl SeriesStore {
    /// Defines `name`; defining it again with the same shape keeps its
    /// counts (every interpreter, and every reload, runs the scripts' init).
    pub fn define(
        &mut self,
        name: &str,
        kind: SeriesKind,
        interval: u64,
        windows: u64,
    ) -> Result<(), SeriesError> {
        if interval == 0 || windows == 0 || windows > MAX_WINDOWS {
            return Err(SeriesError::BadShape);
        }
        if let Some(s) = self.series.get(name) {
            if s.kind == kind && s.interval == interval && s.windows == windows {
                return Ok(());
            }
        } else if self.series.len() >= MAX_SERIES {
            return Err(SeriesError::TooMany);
        }
        self.series.insert(
            name.to_string(),
            Series {
                kind,
                interval,
                windows,
                data: VecDeque::new(),
            },
        );
        Ok(())
    }

    pub fn kind(&self, name: &str) -> Result<SeriesKind, SeriesError> {
        self.series
            .get(name)
            .map(|s| s.kind)
            .ok_or_else(|| SeriesError::Undefined(name.to_string()))
    }

    /// Adds `delta` to `key` in the current window; the key's count there now.
    pub fn add(
        &mut self,
        name: &str,
        key: &SeriesKey,
        delta: i64,
        now_secs: u64,
    ) -> Result<u64, SeriesError> {
        let series = self
            .series
            .get_mut(name)
            .ok_or_else(|| SeriesError::Undefined(name.to_string()))?;
        let epoch = now_secs / series.interval;
        series.expire(epoch);
        if series.data.front().is_none_or(|(e, _)| *e != epoch) {
            let bucket = match series.kind {
                SeriesKind::Cidr => Bucket::Cidr(Box::default()),
                SeriesKind::Str => Bucket::Str(HashMap::new()),
            };
            series.data.push_front((epoch, bucket));
        }
        let (_, bucket) = series.data.front_mut().expect("just made");
        let apply = |old: u64| {
            if delta < 0 {
                old.saturating_sub(delta.unsigned_abs())
            } else {
                old.saturating_add(delta as u64)
            }
        };
        match (bucket, key) {
            (Bucket::Cidr(index), SeriesKey::Ip(ip)) => {
                let old = index.get(*ip);
                if old == 0 && index.len() >= MAX_KEYS_PER_WINDOW {
                    return Ok(0);
                }
                let new = apply(old);
                index.set(*ip, new);
                Ok(new)
            }
            (Bucket::Str(map), SeriesKey::Str(text)) => {
                let old = map.get(text).copied().unwrap_or(0);
                if old == 0 && map.len() >= MAX_KEYS_PER_WINDOW {
                    return Ok(0);
                }
                let new = apply(old);
                if new == 0 {
                    map.remove(text);
                } else {
                    map.insert(text.clone(), new);
                }
                Ok(new)
            }
            (Bucket::Cidr(_), _) => Err(SeriesError::WrongKey(
                name.to_string(),
                "cidr",
                "an IP address",
            )),
            (Bucket::Str(_), _) => Err(SeriesError::WrongKey(
                name.to_string(),
                "string",
                "a string",
            )),
        }
    }

    /// The sum over windows `first..=last` (either order, clamped to the
    /// series' windows) for `key` (a network for a cidr series).
    pub fn count(
        &self,
        name: &str,
        key: &SeriesKey,
        first: u64,
        last: u64,
        now_secs: u64,
    ) -> Result<u64, SeriesError> {
        let series = self
            .series
            .get(name)
            .ok_or_else(|| SeriesError::Undefined(name.to_string()))?;
        let (first, last) = (first.min(last), first.max(last).min(series.windows - 1));
        let epoch = now_secs / series.interval;
        let mut sum = 0u64;
        for (e, bucket) in &series.data {
            let age = epoch.saturating_sub(*e);
            if age < first || age > last || *e > epoch {
                continue;
            }
            sum = sum.saturating_add(match (bucket, key) {
                (Bucket::Cidr(index), SeriesKey::Net(net)) => index.count(net),
                (Bucket::Cidr(index), SeriesKey::Ip(ip)) => index.get(*ip),
                (Bucket::Str(map), SeriesKey::Str(text)) => map.get(text).copied().unwrap_or(0),
                (Bucket::Cidr(_), _) => {
                    return Err(SeriesError::WrongKey(name.to_string(), "cidr", "a cidr"))
                }
                (Bucket::Str(_), _) => {
                    return Err(SeriesError::WrongKey(
                        name.to_string(),
                        "string",
                        "a string",
                    ))
                }
            });
        }
        Ok(sum)
    }

    /// Removes `key` from every window.
    pub fn remove(&mut self, name: &str, key: &SeriesKey) -> Result<(), SeriesError> {
        let series = self
            .series
            .get_mut(name)
            .ok_or_else(|| SeriesError::Undefined(name.to_string()))?;
        for (_, bucket) in &mut series.data {
            match (bucket, key) {
                (Bucket::Cidr(index), SeriesKey::Ip(ip)) => {
                    index.set(*ip, 0);
                }
                (Bucket::Str(map), SeriesKey::Str(text)) => {
                    map.remove(text);
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl Series {
    /// Drops windows older than the oldest one kept.
    fn expire(&mut self, epoch: u64) {
        while self
            .data
            .back()
            .is_some_and(|(e, _)| epoch.saturating_sub(*e) >= self.windows)
        {
            self.data.pop_back();
        }
    }
}
