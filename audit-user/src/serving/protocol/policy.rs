//! `policy` requests: one SMTP phase of one client, for the operator's
//! Momentum-style Lua scripts (the policy host in adapters/lua_policy). Exim
//! sends one per ACL call with `${readsocket}`; the Postfix policy server
//! builds the same call from a `check_policy_service` request.
//!
//! ```text
//! request   = "@" client SP "policy" SP phase *( SP name "=" value )
//! phase     = "CONNECT" / "EHLO" / "HELO" / "MAIL" / "RCPT" / "DATA" / "END-OF-MESSAGE"
//! name      = [a-z_]+            ; Postfix's attribute names: sender, recipient, helo_name, size, ...
//! value     = bare / Lua string  ; bare: no space and no quote; Exim's ${quote:...} gives either
//! ```
//!
//! The answer is `OK <action>`: `OK dunno`, or what the scripts set
//! (`OK 421 too many connections`), or the configured fail-open action.

use std::{collections::HashMap, net::IpAddr};

use super::{
    lua::{syntax_error, Reader, Value},
    reply::{ErrorCode, QueryError},
};

/// The SMTP phases a policy call is made at, with Postfix's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Connect,
    Ehlo,
    Mail,
    Rcpt,
    Data,
    EndOfMessage,
}

impl Phase {
    /// Postfix's `protocol_state` value (HELO is EHLO's phase).
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text.to_ascii_uppercase().as_str() {
            "CONNECT" => Phase::Connect,
            "EHLO" | "HELO" => Phase::Ehlo,
            "MAIL" => Phase::Mail,
            "RCPT" => Phase::Rcpt,
            "DATA" => Phase::Data,
            "END-OF-MESSAGE" => Phase::EndOfMessage,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Connect => "CONNECT",
            Phase::Ehlo => "EHLO",
            Phase::Mail => "MAIL",
            Phase::Rcpt => "RCPT",
            Phase::Data => "DATA",
            Phase::EndOfMessage => "END-OF-MESSAGE",
        }
    }

    /// The Momentum callout this phase runs.
    pub fn callout(self) -> &'static str {
        match self {
            Phase::Connect => "validate_connect",
            Phase::Ehlo => "validate_ehlo",
            Phase::Mail => "validate_mailfrom",
            Phase::Rcpt => "validate_rcptto",
            Phase::Data => "validate_data",
            Phase::EndOfMessage => "validate_data_spool",
        }
    }
}

/// One phase of one client's SMTP session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyCall {
    pub phase: Phase,
    pub client: IpAddr,
    /// The local port the client connected to (its listener).
    pub local_port: Option<u16>,
    /// Postfix's attribute names: `sender`, `recipient`, `helo_name`, `size`,
    /// `client_port`, `instance`, ...
    pub attributes: HashMap<String, String>,
}

impl PolicyCall {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attributes.get(name).map(String::as_str)
    }
}

/// Most attributes one request may carry.
const MAX_ATTRIBUTES: usize = 64;

/// Whether `reader` is at a `policy` request (reading nothing).
pub fn is_policy(reader: &Reader<'_>) -> bool {
    let rest = reader.remaining();
    rest.strip_prefix("policy")
        .is_some_and(|after| after.is_empty() || after.starts_with([' ', '\t']))
}

/// Reads the rest of a `policy` request; `reader` is on the word `policy`.
/// `client`: the request's `@IP[:port]`.
pub fn read_policy(
    reader: &mut Reader<'_>,
    client: Option<(IpAddr, Option<u16>)>,
) -> Result<PolicyCall, QueryError> {
    let (ip, port) = client.ok_or_else(|| {
        QueryError::new(
            ErrorCode::NoClient,
            "policy needs the client: @IP[:port] policy PHASE ...",
        )
    })?;
    reader.take_until_whitespace();
    reader.skip_whitespace();
    let word = reader.take_until_whitespace();
    let phase = Phase::parse(word).ok_or_else(|| {
        QueryError::new(
            ErrorCode::UnknownPhase,
            format!(
                "unknown phase {word:?}: expected CONNECT, EHLO, HELO, MAIL, RCPT, DATA or END-OF-MESSAGE"
            ),
        )
    })?;
    let mut attributes = HashMap::new();
    loop {
        reader.skip_whitespace();
        if reader.is_at_end() {
            break;
        }
        let at = reader.position();
        let name = reader
            .read_identifier()
            .ok_or_else(|| reader.expected("attribute name"))?
            .to_string();
        if !reader.eat_byte(b'=') {
            return Err(syntax_error(format!(
                "attribute {name:?} at byte {at}: expected name=value"
            )));
        }
        let value = match reader.peek_byte() {
            Some(b'"' | b'\'') => match reader.read_value()? {
                Value::Str(text) => text,
                _ => unreachable!("a quote starts a string"),
            },
            _ => {
                let bare = reader.take_until_whitespace();
                if bare.contains(['"', '\'']) {
                    return Err(syntax_error(format!(
                        "attribute {name:?}: a value with a quote must be a quoted string"
                    )));
                }
                bare.to_string()
            }
        };
        if attributes.len() >= MAX_ATTRIBUTES {
            return Err(syntax_error(format!(
                "more than {MAX_ATTRIBUTES} attributes"
            )));
        }
        attributes.insert(name, value);
    }
    // Exim names its listener's port as Postfix does (server_port=$received_port).
    let local_port = port.or_else(|| attributes.get("server_port").and_then(|p| p.parse().ok()));
    Ok(PolicyCall {
        phase,
        client: ip,
        local_port,
        attributes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::protocol::{parse_request, Query};

    fn call(line: &str) -> Result<PolicyCall, QueryError> {
        parse_request(line.as_bytes()).map(|request| match request.query {
            Query::Policy(call) => call,
            other => panic!("not a policy call: {other:?}"),
        })
    }

    #[test]
    fn reads_phase_client_and_attributes() {
        let call = call(
            r#"@192.0.2.1:25 policy RCPT sender=a@example.org recipient="b \"x\"@example.net" size=10"#,
        )
        .unwrap();
        assert_eq!(call.phase, Phase::Rcpt);
        assert_eq!(call.client, "192.0.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(call.local_port, Some(25));
        assert_eq!(call.get("sender"), Some("a@example.org"));
        assert_eq!(call.get("recipient"), Some("b \"x\"@example.net"));
        assert_eq!(call.get("size"), Some("10"));
        assert_eq!(
            call_phase("@192.0.2.1 policy helo helo_name=mx"),
            Phase::Ehlo
        );
        assert_eq!(
            call_phase("@192.0.2.1 policy END-OF-MESSAGE"),
            Phase::EndOfMessage
        );
    }

    fn call_phase(line: &str) -> Phase {
        call(line).unwrap().phase
    }

    #[test]
    fn bad_requests_have_stable_codes() {
        let code = |line: &str| call(line).unwrap_err().code;
        assert_eq!(code("policy RCPT"), ErrorCode::NoClient);
        assert_eq!(code("@192.0.2.1 policy QUIT"), ErrorCode::UnknownPhase);
        assert_eq!(code("@192.0.2.1 policy"), ErrorCode::UnknownPhase);
        assert_eq!(code("@192.0.2.1 policy RCPT sender"), ErrorCode::Syntax);
        assert_eq!(code("@192.0.2.1 policy RCPT a=b\"c"), ErrorCode::Syntax);
        assert_eq!(code("@192.0.2.1 policy RCPT a=\"open"), ErrorCode::Syntax);
        assert_eq!(code("@192.0.2.1 policy RCPT =x"), ErrorCode::Syntax);
    }
}
