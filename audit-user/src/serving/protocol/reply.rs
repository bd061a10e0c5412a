//! Replies: one line per request, `OK <count>` or `ERR <code> <message>`.

use std::fmt;

/// Longest message a reply line carries, in bytes.
///
/// Messages often quote the request back, and a request may be 4 KiB of
/// hostile text; clients should be able to log a reply line without care.
pub const MAX_REPLY_MESSAGE_LEN: usize = 200;

/// The machine-readable part of an error reply; clients branch on this,
/// humans read the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Syntax,
    BadCidr,
    UnknownService,
    NoClient,
    UnknownFunction,
    TooLong,
    ClusterDisabled,
    ClusterUnavailable,
    UnknownNode,
    Busy,
    UnknownMonitor,
    NotConfigured,
    Forbidden,
    UnknownSeries,
    NoHistory,
    Reconfigured,
    UnknownPhase,
    NoPolicy,
}

impl ErrorCode {
    /// The code as it appears on the wire; part of the protocol, never reworded.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Syntax => "syntax",
            ErrorCode::BadCidr => "bad_cidr",
            ErrorCode::UnknownService => "unknown_service",
            ErrorCode::NoClient => "no_client",
            ErrorCode::UnknownFunction => "unknown_function",
            ErrorCode::TooLong => "too_long",
            ErrorCode::ClusterDisabled => "cluster_disabled",
            ErrorCode::ClusterUnavailable => "cluster_unavailable",
            ErrorCode::UnknownNode => "unknown_node",
            ErrorCode::Busy => "busy",
            ErrorCode::UnknownMonitor => "unknown_monitor",
            ErrorCode::NotConfigured => "not_configured",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::UnknownSeries => "unknown_series",
            ErrorCode::NoHistory => "no_history",
            ErrorCode::Reconfigured => "reconfigured",
            ErrorCode::UnknownPhase => "unknown_phase",
            ErrorCode::NoPolicy => "no_policy",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Why a request got no count. The message is free text for humans and may
/// quote the request; [`Reply::to_line`] makes it safe for the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} {message}", code.as_str())]
pub struct QueryError {
    pub code: ErrorCode,
    pub message: String,
}

impl QueryError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        QueryError {
            code,
            message: message.into(),
        }
    }
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Count(u64),
    Error(QueryError),
    /// A report (`show`): `OK <n>` then n lines; only console commands answer so.
    Lines(Vec<String>),
    /// A policy answer: `OK <action>` (`OK dunno`, `OK 421 text`).
    Action(String),
}

impl From<QueryError> for Reply {
    fn from(error: QueryError) -> Self {
        Reply::Error(error)
    }
}

impl Reply {
    /// The reply as sent: one line terminated by a single LF (a `Lines` report:
    /// its `OK <n>` line, then n lines).
    pub fn to_line(&self) -> String {
        match self {
            Reply::Count(count) => format!("OK {count}\n"),
            Reply::Action(action) => format!("OK {}\n", single_line_message(action)),
            Reply::Lines(lines) => {
                let mut out = format!("OK {}\n", lines.len());
                for line in lines {
                    out.push_str(&single_line_message(line));
                    out.push('\n');
                }
                out
            }
            Reply::Error(error) => {
                let message = single_line_message(&error.message);
                if message.is_empty() {
                    format!("ERR {}\n", error.code)
                } else {
                    format!("ERR {} {message}\n", error.code)
                }
            }
        }
    }
}

/// Makes `message` safe to put inside a reply line: control characters
/// would break the one-line framing (or a terminal), so they become '?', and
/// the length is capped so an echoed request cannot bloat the reply.
fn single_line_message(message: &str) -> String {
    let mut safe = String::with_capacity(message.len().min(MAX_REPLY_MESSAGE_LEN));
    for character in message.chars() {
        let printable = if is_line_breaking_or_control(character) {
            '?'
        } else {
            character
        };
        if safe.len() + printable.len_utf8() > MAX_REPLY_MESSAGE_LEN {
            break;
        }
        safe.push(printable);
    }
    safe
}

/// C0, DEL and C1 controls, plus the Unicode line and paragraph separators
/// that some clients split lines on.
fn is_line_breaking_or_control(character: char) -> bool {
    character.is_control() || character == '\u{2028}' || character == '\u{2029}'
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL_CODES: [ErrorCode; 8] = [
        ErrorCode::Syntax,
        ErrorCode::BadCidr,
        ErrorCode::UnknownService,
        ErrorCode::NoClient,
        ErrorCode::UnknownFunction,
        ErrorCode::TooLong,
        ErrorCode::ClusterDisabled,
        ErrorCode::Busy,
    ];

    #[test]
    fn codes_have_their_wire_names() {
        let names: Vec<&str> = ALL_CODES.iter().map(|code| code.as_str()).collect();
        assert_eq!(
            names,
            [
                "syntax",
                "bad_cidr",
                "unknown_service",
                "no_client",
                "unknown_function",
                "too_long",
                "cluster_disabled",
                "busy"
            ]
        );
        for code in ALL_CODES {
            assert_eq!(code.to_string(), code.as_str());
        }
    }

    #[test]
    fn query_error_displays_code_then_message() {
        let error = QueryError::new(ErrorCode::BadCidr, "bad cidr \"x\"");
        assert_eq!(error.to_string(), "bad_cidr bad cidr \"x\"");
        assert_eq!(error.code, ErrorCode::BadCidr);
        assert_eq!(error.message, "bad cidr \"x\"");
    }

    #[test]
    fn count_reply_line() {
        assert_eq!(Reply::Count(3).to_line(), "OK 3\n");
        assert_eq!(Reply::Count(0).to_line(), "OK 0\n");
        assert_eq!(
            Reply::Count(u64::MAX).to_line(),
            "OK 18446744073709551615\n"
        );
    }

    #[test]
    fn error_reply_line() {
        let reply = Reply::from(QueryError::new(ErrorCode::BadCidr, "prefix too long"));
        assert_eq!(reply.to_line(), "ERR bad_cidr prefix too long\n");
        let reply: Reply = QueryError::new(ErrorCode::Busy, "try again").into();
        assert_eq!(reply.to_line(), "ERR busy try again\n");
    }

    #[test]
    fn empty_message_leaves_no_trailing_space() {
        let reply = Reply::from(QueryError::new(ErrorCode::Syntax, ""));
        assert_eq!(reply.to_line(), "ERR syntax\n");
    }

    #[test]
    fn control_characters_become_question_marks() {
        let reply = Reply::from(QueryError::new(
            ErrorCode::Syntax,
            "a\r\nb\0c\td\u{1b}e\u{7f}f\u{85}g\u{2028}h",
        ));
        assert_eq!(reply.to_line(), "ERR syntax a??b?c?d?e?f?g?h\n");
    }

    #[test]
    fn long_message_is_cut_at_the_cap() {
        let reply = Reply::from(QueryError::new(ErrorCode::Syntax, "x".repeat(1000)));
        assert_eq!(
            reply.to_line(),
            format!("ERR syntax {}\n", "x".repeat(MAX_REPLY_MESSAGE_LEN))
        );
    }

    #[test]
    fn long_message_is_cut_on_a_char_boundary() {
        // 199 one-byte chars then a two-byte 'é' that would end at byte 201.
        let message = format!("{}é tail", "a".repeat(199));
        let reply = Reply::from(QueryError::new(ErrorCode::Syntax, message));
        assert_eq!(reply.to_line(), format!("ERR syntax {}\n", "a".repeat(199)));
    }

    proptest! {
        #[test]
        fn reply_is_always_exactly_one_line(
            code_index in 0..ALL_CODES.len(),
            message in any::<String>(),
            count in any::<u64>(),
        ) {
            let lines = [
                Reply::Error(QueryError::new(ALL_CODES[code_index], message)).to_line(),
                Reply::Count(count).to_line(),
            ];
            for line in lines {
                prop_assert!(line.ends_with('\n'));
                prop_assert_eq!(line.matches('\n').count(), 1);
                prop_assert!(!line.contains('\r'));
                prop_assert!(!line[..line.len() - 1].chars().any(is_line_breaking_or_control));
                prop_assert!(line.len() <= "ERR unknown_function \n".len() + MAX_REPLY_MESSAGE_LEN);
            }
        }
    }
}
