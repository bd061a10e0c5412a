//! A reader for the literal values that appear in requests: the Lua literal
//! syntax (strings, `nil`, booleans, integers, table constructors) and Sieve
//! string lists. It is not a Lua interpreter: there are no variables,
//! operators or expressions, only literals.
//!
//! The reader accepts the union of both syntaxes wherever a value may stand;
//! which value fits which argument is decided by the caller. Requests come
//! from untrusted clients, so every path is bounded: nesting is capped before
//! recursing, numbers are range-checked, and errors carry byte offsets instead
//! of panicking.
//!
//! Written by hand on purpose: the grammar is a small fixed subset, fuzzed
//! (`cargo xtask fuzz`, target `query_request`), and a Lua crate would bring
//! an interpreter to read a few literals.

use super::reply::{ErrorCode, QueryError};

/// Deepest allowed nesting of tables and string lists. Real calls nest one
/// or two levels; the cap keeps recursion far from the stack's limit.
pub const MAX_NESTING_DEPTH: usize = 32;

/// A literal value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    Integer(i64),
    Str(String),
    /// A table constructor's fields in source order; `None` for positional
    /// fields, so `{ "a", x = 1 }` keeps both the order and the kind.
    Table(Vec<(Option<TableKey>, Value)>),
    /// A Sieve string list `["a", "b"]`; its members are always `Str`.
    List(Vec<Value>),
}

impl Value {
    /// The type as named in error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Nil => "nil",
            Value::Bool(_) => "boolean",
            Value::Integer(_) => "integer",
            Value::Str(_) => "string",
            Value::Table(_) => "table",
            Value::List(_) => "string list",
        }
    }
}

/// The key of a keyed table field.
#[derive(Debug, Clone, PartialEq)]
pub enum TableKey {
    /// `{ cidr = "..." }`
    Name(String),
    /// `{ ["cidr"] = "..." }` or `{ [1] = ... }`
    Value(Value),
}

/// Words Lua reserves; they cannot name a table field.
const LUA_RESERVED_WORDS: [&str; 22] = [
    "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto", "if", "in",
    "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while",
];

/// Parses `text` as exactly one value, allowing whitespace around it.
pub fn parse_value(text: &str) -> Result<Value, QueryError> {
    let mut reader = Reader::new(text);
    reader.skip_whitespace();
    let value = reader.read_value()?;
    reader.skip_whitespace();
    if !reader.is_at_end() {
        return Err(reader.expected("end of value"));
    }
    Ok(value)
}

/// A syntax error with `message` as is.
pub fn syntax_error(message: impl Into<String>) -> QueryError {
    QueryError::new(ErrorCode::Syntax, message)
}

/// A cursor over one request. Error offsets are byte offsets into the whole
/// `source`, so a caller that reads a prefix itself still reports offsets
/// the client can count in the line it sent.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    source: &'a str,
    position: usize,
}

impl<'a> Reader<'a> {
    pub fn new(source: &'a str) -> Self {
        Reader {
            source,
            position: 0,
        }
    }

    /// Byte offset of the next unread byte.
    pub fn position(&self) -> usize {
        self.position
    }

    /// The unread rest of the source.
    pub fn remaining(&self) -> &'a str {
        &self.source[self.position..]
    }

    /// Marks everything as read.
    pub fn skip_to_end(&mut self) {
        self.position = self.source.len();
    }

    pub fn is_at_end(&self) -> bool {
        self.position >= self.source.len()
    }

    pub fn peek_byte(&self) -> Option<u8> {
        self.source.as_bytes().get(self.position).copied()
    }

    /// Consumes `byte` if it is next.
    pub fn eat_byte(&mut self, byte: u8) -> bool {
        if self.peek_byte() == Some(byte) {
            self.position += 1;
            true
        } else {
            false
        }
    }

    /// Consumes `byte` or fails with "expected 'b' at byte N".
    pub fn expect_byte(&mut self, byte: u8) -> Result<(), QueryError> {
        if self.eat_byte(byte) {
            Ok(())
        } else {
            Err(self.expected(&format!("'{}'", char::from(byte))))
        }
    }

    /// Skips Lua whitespace (which includes Sieve's).
    pub fn skip_whitespace(&mut self) {
        self.take_while(is_lua_whitespace);
    }

    /// Consumes the longest run of ASCII bytes matching `accept`.
    ///
    /// Stopping only at ASCII bytes keeps the position on a char boundary.
    pub fn take_while(&mut self, accept: impl Fn(u8) -> bool) -> &'a str {
        let start = self.position;
        let length = self.source.as_bytes()[start..]
            .iter()
            .take_while(|&&byte| byte.is_ascii() && accept(byte))
            .count();
        self.position += length;
        &self.source[start..self.position]
    }

    /// Consumes everything up to the next whitespace or the end.
    pub fn take_until_whitespace(&mut self) -> &'a str {
        let start = self.position;
        let rest = &self.source[start..];
        let length = rest
            .find(|character: char| character.is_ascii() && is_lua_whitespace(character as u8))
            .unwrap_or(rest.len());
        self.position += length;
        &self.source[start..self.position]
    }

    /// Consumes a Lua (and Sieve) identifier: `[A-Za-z_][A-Za-z0-9_]*`.
    pub fn read_identifier(&mut self) -> Option<&'a str> {
        if !self.peek_byte().is_some_and(is_identifier_start) {
            return None;
        }
        Some(self.take_while(is_identifier_continue))
    }

    /// Reads one literal value.
    pub fn read_value(&mut self) -> Result<Value, QueryError> {
        self.read_value_nested_in(0)
    }

    /// "expected `what` at byte N" at the current position.
    pub fn expected(&self, what: &str) -> QueryError {
        expected_at(what, self.position)
    }

    /// `depth` is the number of tables and lists around the value.
    fn read_value_nested_in(&mut self, depth: usize) -> Result<Value, QueryError> {
        match self.peek_byte() {
            Some(b'"' | b'\'') => self.read_string().map(Value::Str),
            Some(b'{') => self.read_table(depth + 1),
            Some(b'[') => self.read_string_list(depth + 1),
            Some(b'-' | b'0'..=b'9') => self.read_integer().map(Value::Integer),
            Some(b'.')
                if self
                    .source
                    .as_bytes()
                    .get(self.position + 1)
                    .is_some_and(u8::is_ascii_digit) =>
            {
                Err(only_integers_at(self.position))
            }
            Some(byte) if is_identifier_start(byte) => {
                let start = self.position;
                match self.read_identifier() {
                    Some("nil") => Ok(Value::Nil),
                    Some("true") => Ok(Value::Bool(true)),
                    Some("false") => Ok(Value::Bool(false)),
                    _ => Err(expected_at("value", start)),
                }
            }
            _ => Err(self.expected("value")),
        }
    }

    fn check_depth(&self, depth: usize) -> Result<(), QueryError> {
        if depth > MAX_NESTING_DEPTH {
            Err(syntax_error(format!(
                "nesting deeper than {MAX_NESTING_DEPTH} at byte {}",
                self.position
            )))
        } else {
            Ok(())
        }
    }

    /// `{ field (sep field)* sep? }` where sep is ',' or ';'. `depth`
    /// counts this table.
    fn read_table(&mut self, depth: usize) -> Result<Value, QueryError> {
        // Checked before consuming '{' and before recursing, so a flood of
        // '{' costs at most MAX_NESTING_DEPTH stack frames.
        self.check_depth(depth)?;
        self.position += 1;
        let mut fields = Vec::new();
        loop {
            self.skip_whitespace();
            if self.eat_byte(b'}') {
                return Ok(Value::Table(fields));
            }
            if self.is_at_end() {
                return Err(self.expected("'}'"));
            }
            fields.push(self.read_table_field(depth)?);
            self.skip_whitespace();
            if self.eat_byte(b',') || self.eat_byte(b';') {
                continue;
            }
            if self.eat_byte(b'}') {
                return Ok(Value::Table(fields));
            }
            return Err(self.expected("',', ';' or '}'"));
        }
    }

    fn read_table_field(&mut self, depth: usize) -> Result<(Option<TableKey>, Value), QueryError> {
        if self.eat_byte(b'[') {
            self.skip_whitespace();
            let key = self.read_value_nested_in(depth)?;
            self.skip_whitespace();
            self.expect_byte(b']')?;
            self.skip_whitespace();
            self.expect_byte(b'=')?;
            self.skip_whitespace();
            let value = self.read_value_nested_in(depth)?;
            return Ok((Some(TableKey::Value(key)), value));
        }

        let field_start = self.position;
        if let Some(name) = self.read_identifier() {
            self.skip_whitespace();
            if self.peek_byte() == Some(b'=') {
                if LUA_RESERVED_WORDS.contains(&name) {
                    return Err(syntax_error(format!(
                        "'{name}' is a reserved word and cannot name a field at byte {field_start}"
                    )));
                }
                self.position += 1;
                self.skip_whitespace();
                let value = self.read_value_nested_in(depth)?;
                return Ok((Some(TableKey::Name(name.to_owned())), value));
            }
            // Not `name =`: a positional `nil`, `true` or `false`, or an error
            // that the value reader reports at the word.
            self.position = field_start;
        }
        let value = self.read_value_nested_in(depth)?;
        Ok((None, value))
    }

    /// `[ string (, string)* ]`, the Sieve string list. `depth` counts this
    /// list.
    fn read_string_list(&mut self, depth: usize) -> Result<Value, QueryError> {
        self.check_depth(depth)?;
        self.position += 1;
        let mut members = Vec::new();
        loop {
            self.skip_whitespace();
            if !matches!(self.peek_byte(), Some(b'"' | b'\'')) {
                return Err(self.expected("string"));
            }
            members.push(Value::Str(self.read_string()?));
            self.skip_whitespace();
            if self.eat_byte(b',') {
                continue;
            }
            if self.eat_byte(b']') {
                return Ok(Value::List(members));
            }
            return Err(self.expected("',' or ']'"));
        }
    }

    /// A quoted string; the reader is on the opening quote.
    fn read_string(&mut self) -> Result<String, QueryError> {
        let start = self.position;
        let quote = self.source.as_bytes()[start];
        self.position += 1;
        // Bytes, not chars: `\ddd` and `\xXX` may build multi-byte UTF-8
        // sequences one byte at a time.
        let mut bytes = Vec::new();
        loop {
            match self.peek_byte() {
                None | Some(b'\n' | b'\r') => {
                    return Err(syntax_error(format!(
                        "unterminated string starting at byte {start}"
                    )))
                }
                Some(byte) if byte == quote => {
                    self.position += 1;
                    break;
                }
                Some(b'\\') => self.read_escape(start, &mut bytes)?,
                Some(byte) => {
                    bytes.push(byte);
                    self.position += 1;
                }
            }
        }
        String::from_utf8(bytes).map_err(|_| {
            syntax_error(format!(
                "string starting at byte {start} is not valid UTF-8 after its escapes"
            ))
        })
    }

    /// One escape sequence; the reader is on the backslash.
    fn read_escape(&mut self, string_start: usize, bytes: &mut Vec<u8>) -> Result<(), QueryError> {
        let escape_start = self.position;
        self.position += 1;
        let Some(selector) = self.peek_byte() else {
            return Err(syntax_error(format!(
                "unterminated string starting at byte {string_start}"
            )));
        };
        let simple = match selector {
            b'\\' => Some(b'\\'),
            b'"' => Some(b'"'),
            b'\'' => Some(b'\''),
            b'n' => Some(b'\n'),
            b't' => Some(b'\t'),
            b'r' => Some(b'\r'),
            b'a' => Some(0x07),
            b'b' => Some(0x08),
            b'f' => Some(0x0c),
            b'v' => Some(0x0b),
            _ => None,
        };
        if let Some(byte) = simple {
            bytes.push(byte);
            self.position += 1;
            return Ok(());
        }
        match selector {
            b'x' => {
                self.position += 1;
                let digits = self
                    .source
                    .get(self.position..self.position + 2)
                    .filter(|digits| digits.bytes().all(|byte| byte.is_ascii_hexdigit()));
                let Some(digits) = digits else {
                    return Err(syntax_error(format!(
                        "expected two hexadecimal digits after '\\x' at byte {}",
                        self.position
                    )));
                };
                bytes.push(u8::from_str_radix(digits, 16).map_err(|_| {
                    expected_at("two hexadecimal digits after '\\x'", self.position)
                })?);
                self.position += 2;
            }
            b'z' => {
                self.position += 1;
                self.skip_whitespace();
            }
            b'0'..=b'9' => {
                // Lua reads up to three decimal digits: "\0659" is "A9".
                let digits_start = self.position;
                let mut value: u32 = 0;
                while self.position - digits_start < 3 {
                    match self.peek_byte() {
                        Some(digit @ b'0'..=b'9') => {
                            value = value * 10 + u32::from(digit - b'0');
                            self.position += 1;
                        }
                        _ => break,
                    }
                }
                let byte = u8::try_from(value).map_err(|_| {
                    syntax_error(format!(
                        "decimal escape \\{} is larger than 255 at byte {escape_start}",
                        &self.source[digits_start..self.position]
                    ))
                })?;
                bytes.push(byte);
            }
            _ => {
                let escaped = self.source[self.position..]
                    .chars()
                    .next()
                    .unwrap_or(char::REPLACEMENT_CHARACTER);
                return Err(syntax_error(format!(
                    "unknown escape '\\{escaped}' at byte {escape_start}"
                )));
            }
        }
        Ok(())
    }

    /// A decimal or `0x` hexadecimal integer with an optional '-'.
    fn read_integer(&mut self) -> Result<i64, QueryError> {
        let start = self.position;
        let negative = self.eat_byte(b'-');
        // Like Lua's lexer, take the whole alphanumeric run, so "12abc" is
        // one malformed numeral rather than 12 followed by a name.
        let numeral_start = self.position;
        let numeral = self.take_while(|byte| byte.is_ascii_alphanumeric() || byte == b'.');
        if numeral.is_empty() {
            return Err(expected_at("digit after '-'", numeral_start));
        }
        let (radix, digits) = match numeral
            .strip_prefix("0x")
            .or_else(|| numeral.strip_prefix("0X"))
        {
            Some(hex_digits) => (16, hex_digits),
            None => (10, numeral),
        };
        if looks_like_float(radix, digits) {
            return Err(only_integers_at(start));
        }
        if digits.is_empty() || !digits.chars().all(|digit| digit.is_digit(radix)) {
            return Err(syntax_error(format!(
                "malformed number '{numeral}' at byte {start}"
            )));
        }
        let out_of_range = || syntax_error(format!("number out of range at byte {start}"));
        let mut magnitude: u64 = 0;
        for digit in digits.chars().filter_map(|digit| digit.to_digit(radix)) {
            magnitude = magnitude
                .checked_mul(u64::from(radix))
                .and_then(|shifted| shifted.checked_add(u64::from(digit)))
                .ok_or_else(out_of_range)?;
        }
        let signed = if negative {
            -i128::from(magnitude)
        } else {
            i128::from(magnitude)
        };
        i64::try_from(signed).map_err(|_| out_of_range())
    }
}

/// Whether a numeral run is a float literal Lua would accept:
/// `digits [. digits] [e digits]` (exponent marker 'p' for hexadecimal),
/// with a '.' or an exponent present. The exponent's sign is not part of
/// the run, so "1e" (from "1e+5") counts as a float too.
fn looks_like_float(radix: u32, digits: &str) -> bool {
    let exponent_markers: &[char] = if radix == 16 {
        &['p', 'P']
    } else {
        &['e', 'E']
    };
    let (mantissa, exponent) = match digits.split_once(exponent_markers) {
        Some((mantissa, exponent)) => (mantissa, Some(exponent)),
        None => (digits, None),
    };
    let mantissa_is_numeric = mantissa
        .chars()
        .all(|character| character == '.' || character.is_digit(radix))
        && mantissa.matches('.').count() <= 1;
    let exponent_is_numeric =
        exponent.is_none_or(|exponent| exponent.chars().all(|c| c.is_ascii_digit()));
    mantissa_is_numeric && exponent_is_numeric && (mantissa.contains('.') || exponent.is_some())
}

fn expected_at(what: &str, position: usize) -> QueryError {
    syntax_error(format!("expected {what} at byte {position}"))
}

fn only_integers_at(position: usize) -> QueryError {
    syntax_error(format!("only integers are supported at byte {position}"))
}

/// Lua's whitespace: space, \t, \n, \v, \f, \r.
fn is_lua_whitespace(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

fn is_identifier_start(byte: u8) -> bool {
    byte.is_ascii_alphabetic() || byte == b'_'
}

fn is_identifier_continue(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_'
}

#[cfg(test)]
mod tests;
