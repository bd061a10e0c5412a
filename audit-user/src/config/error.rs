//! Why a configuration was refused: the key, the reason and, for the file,
//! the line and column toml reported.

use std::{fmt, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not TOML, or not a key of ours: no value to name.
    #[error("{}{}: {reason}", origin(path), in_file(at))]
    Parse {
        path: PathBuf,
        at: Option<Position>,
        reason: String,
    },
    /// One key's value (from the file: with its position, and the file when
    /// it was read from one; from the flags or a check across keys: without).
    #[error("config key `{key}`{}: {reason}", located(file, at))]
    Invalid {
        key: String,
        reason: String,
        file: Option<PathBuf>,
        at: Option<Position>,
    },
}

/// 1-based, as editors count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl Position {
    /// The position of byte `offset` in `text`; columns count characters.
    pub fn of(text: &str, offset: usize) -> Self {
        let before = &text[..text.floor_char_boundary(offset.min(text.len()))];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Self {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

fn origin(path: &std::path::Path) -> String {
    if path.as_os_str().is_empty() {
        "config".into()
    } else {
        format!("config file {}", path.display())
    }
}

fn in_file(at: &Option<Position>) -> String {
    at.map_or_else(String::new, |at| format!(" ({at})"))
}

fn located(file: &Option<PathBuf>, at: &Option<Position>) -> String {
    match (file, at) {
        (Some(file), Some(at)) => format!(" ({}, {at})", file.display()),
        (Some(file), None) => format!(" ({})", file.display()),
        (None, _) => in_file(at),
    }
}

impl ConfigError {
    /// Names `path` in a key's error that came from that file.
    pub(crate) fn in_file(self, path: &std::path::Path) -> Self {
        match self {
            ConfigError::Invalid {
                key,
                reason,
                file: None,
                at,
            } if !path.as_os_str().is_empty() => ConfigError::Invalid {
                key,
                reason,
                file: Some(path.to_path_buf()),
                at,
            },
            other => other,
        }
    }
}

pub(crate) fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
        file: None,
        at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_lines_and_characters_from_one() {
        let text = "a = 1\nbé = \"x";
        assert_eq!(Position::of(text, 0), Position { line: 1, column: 1 });
        assert_eq!(Position::of(text, 6), Position { line: 2, column: 1 });
        // After the two-byte é: the third character.
        assert_eq!(Position::of(text, 9), Position { line: 2, column: 3 });
        // Inside é: its start; past the end: after the last character.
        assert_eq!(Position::of(text, 8), Position { line: 2, column: 2 });
        assert_eq!(Position::of(text, 999), Position { line: 2, column: 8 });
    }
}
