//! Validation-context variables (`vctx:get`/`vctx:set`): a connection
//! context per SMTP session, a message context per transaction. They live
//! here, not in an interpreter, so every interpreter sees the same ones.
//!
//! A session is named by the client's address and port and the listener's
//! port (Postfix sends them with every request; Exim's ACL passes
//! `client_port=$sender_host_port`). Postfix says nothing when a session ends,
//! so sessions idle for [`IDLE`] are forgotten, and at most [`MAX_SESSIONS`]
//! are kept.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::serving::protocol::{Phase, PolicyCall};

/// Sessions kept at most; past it the idle ones go first, then the oldest.
pub const MAX_SESSIONS: usize = 65_536;
/// A session without a request for this long is forgotten.
pub const IDLE: Duration = Duration::from_secs(3600);
/// Variables one context holds at most.
pub const MAX_VARIABLES: usize = 256;
/// Longest string value.
pub const MAX_VALUE_LEN: usize = 4096;

/// A context variable's value: what Momentum's contexts hold (strings), and
/// the numbers and booleans scripts also store.
#[derive(Debug, Clone, PartialEq)]
pub enum ContextValue {
    Str(String),
    Int(i64),
    Num(f64),
    Bool(bool),
}

/// Which context: the connection's or the message's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Conn,
    Mess,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContextError {
    #[error("more than {MAX_VARIABLES} variables in one context")]
    Full,
    #[error("a value longer than {MAX_VALUE_LEN} bytes")]
    TooLong,
}

#[derive(Debug)]
struct Session {
    conn: HashMap<String, ContextValue>,
    mess: HashMap<String, ContextValue>,
    instance: Option<String>,
    /// This transaction has been refused (counted as a rejection) already.
    refused: bool,
    last: Instant,
}

#[derive(Debug, Default)]
pub struct Contexts {
    sessions: HashMap<String, Session>,
}

/// The session a call belongs to.
pub fn session_key(call: &PolicyCall) -> String {
    format!(
        "{}|{}|{}",
        call.client,
        call.get("client_port").unwrap_or("-"),
        call.local_port.map_or("-".to_string(), |p| p.to_string())
    )
}

impl Contexts {
    /// Opens `call`'s session for a call: a new connection (CONNECT) starts
    /// empty contexts; a new transaction (MAIL, EHLO, or another Postfix
    /// `instance`) an empty message context.
    pub fn begin(&mut self, key: &str, call: &PolicyCall, now: Instant) {
        if !self.sessions.contains_key(key) && self.sessions.len() >= MAX_SESSIONS {
            self.sessions
                .retain(|_, s| now.saturating_duration_since(s.last) < IDLE);
            if self.sessions.len() >= MAX_SESSIONS {
                if let Some(oldest) = self
                    .sessions
                    .iter()
                    .min_by_key(|(_, s)| s.last)
                    .map(|(k, _)| k.clone())
                {
                    self.sessions.remove(&oldest);
                }
            }
        }
        let session = self
            .sessions
            .entry(key.to_string())
            .or_insert_with(|| Session {
                conn: HashMap::new(),
                mess: HashMap::new(),
                instance: None,
                refused: false,
                last: now,
            });
        if now.saturating_duration_since(session.last) >= IDLE {
            session.conn.clear();
            session.mess.clear();
        }
        session.last = now;
        let instance = call.get("instance").map(str::to_string);
        let new_transaction = match call.phase {
            Phase::Connect => {
                session.conn.clear();
                true
            }
            Phase::Ehlo | Phase::Mail => true,
            _ => instance.is_some() && instance != session.instance,
        };
        if new_transaction {
            session.mess.clear();
            session.refused = false;
        }
        if instance.is_some() {
            session.instance = instance;
        }
    }

    pub fn get(&self, key: &str, kind: Kind, name: &str) -> Option<ContextValue> {
        let session = self.sessions.get(key)?;
        match kind {
            Kind::Conn => session.conn.get(name),
            Kind::Mess => session.mess.get(name),
        }
        .cloned()
    }

    /// Sets (Some) or removes (None) a variable.
    pub fn set(
        &mut self,
        key: &str,
        kind: Kind,
        name: &str,
        value: Option<ContextValue>,
    ) -> Result<(), ContextError> {
        let Some(session) = self.sessions.get_mut(key) else {
            return Ok(());
        };
        let context = match kind {
            Kind::Conn => &mut session.conn,
            Kind::Mess => &mut session.mess,
        };
        match value {
            None => {
                context.remove(name);
            }
            Some(value) => {
                if matches!(&value, ContextValue::Str(s) if s.len() > MAX_VALUE_LEN)
                    || name.len() > MAX_VALUE_LEN
                {
                    return Err(ContextError::TooLong);
                }
                if !context.contains_key(name) && context.len() >= MAX_VARIABLES {
                    return Err(ContextError::Full);
                }
                context.insert(name.to_string(), value);
            }
        }
        Ok(())
    }

    /// Notes a refusal in the session's transaction; true for its first,
    /// which is the one counted as a rejection.
    pub fn first_refusal(&mut self, key: &str) -> bool {
        match self.sessions.get_mut(key) {
            Some(session) => !std::mem::replace(&mut session.refused, true),
            None => true,
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }
}
