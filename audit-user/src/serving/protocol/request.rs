//! Requests: one line, an optional client context, then one call written the
//! way Momentum's Lua or Sieve pages write it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::cidr::{parse_cidr, CidrArg};
use super::lua::{syntax_error, Reader, TableKey, Value};
use super::reply::{ErrorCode, QueryError};
use crate::domain::{Series, DEFAULT_SERVICE};

/// Longest accepted request in bytes, not counting the terminating LF.
pub const MAX_REQUEST_LEN: usize = 4096;

/// Who is asking: the connection on whose behalf Momentum would evaluate the
/// call. Momentum knows this implicitly; over the socket the caller states it
/// with `@IP` or `@IP:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientContext {
    /// The remote address of the client connection; a v4-mapped IPv6
    /// address is stored as IPv4, as the kernel reports such peers.
    pub ip: IpAddr,
    /// The local port the client connected to, which picks the listener.
    pub port: Option<u16>,
}

/// Which service's sessions to count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceArg {
    /// A service by name, exactly as written; whether it exists is decided
    /// where services are known.
    Named(String),
    /// The service of the listener the client connected to (the context's
    /// port); without a port, "SMTP".
    Listener,
}

/// Which monitor a windowed query reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorRef {
    /// By its "W,N" string, as Lua and the Sieve hash form name it.
    Key(String),
    /// By its position in the configuration (Sieve's `{ time_series_index }`).
    Position(u32),
    /// The Sieve hash form's default: the first configured monitor.
    First,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// Sessions currently established from `cidr` to `service`.
    SessionCount { cidr: CidrArg, service: ServiceArg },
    /// The sum of `series` over windows `first..=last` of a monitor.
    Windowed {
        series: Series,
        monitor: MonitorRef,
        cidr: CidrArg,
        first: u32,
        last: u32,
        cluster: bool,
    },
    /// Sieve form 1: the weighted sliding average of windows 0 and 1.
    Sliding {
        series: Series,
        monitor: u32,
        cidr: CidrArg,
        cluster: bool,
    },
    /// Console `add receptions|rejections <ip> [n]`: the MTA reports events.
    Add { series: Series, ip: IpAddr, n: u64 },
    /// Console `show <ip[/mask]>`: every monitor's windows and live sessions.
    Show { cidr: CidrArg },
    /// Console `stats`: the agent's own counters.
    Stats,
}

/// One parsed request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub client: Option<ClientContext>,
    pub query: Query,
}

/// A call as written, before its meaning is looked up. Parsing the shape
/// first and dispatching on the name second keeps every function a single
/// match arm; a console-style form (`add receptions <ip> [n]`, bare words)
/// would be one more variant.
#[derive(Debug, Clone, PartialEq)]
enum CallSyntax {
    /// `name(arg, ...)` where name may be `a.b.c` or `object:method`.
    Lua { name: String, args: Vec<Value> },
    /// `word arg arg ...`
    Sieve { name: String, args: Vec<Value> },
}

/// Parses one request line, given without its terminating LF.
pub fn parse_request(line: &[u8]) -> Result<Request, QueryError> {
    let text = check_framing(line)?;
    let mut reader = Reader::new(text);
    reader.skip_whitespace();
    if reader.is_at_end() {
        return Err(syntax_error("empty request"));
    }
    let client = if reader.eat_byte(b'@') {
        Some(read_client_context(&mut reader)?)
    } else {
        None
    };
    if let Some(query) = read_console_command(&mut reader)? {
        return Ok(Request { client, query });
    }
    let call = read_call(&mut reader)?;
    Ok(Request {
        client,
        query: query_for_call(call)?,
    })
}

/// Momentum's console commands, whose arguments are bare words:
/// `add receptions <ip> [n]`, `add rejections <ip> [n]`, `show <ip[/mask]>`.
/// Returns None (reading nothing) for anything else.
fn read_console_command(reader: &mut Reader<'_>) -> Result<Option<Query>, QueryError> {
    let rest = reader.remaining();
    let mut words = rest.split_ascii_whitespace();
    let command = words.next().unwrap_or("");
    if command != "add" && command != "show" && command != "stats" {
        return Ok(None);
    }
    let words: Vec<&str> = words.collect();
    let query = match (command, words.as_slice()) {
        ("add", [series, ip, count @ ..]) if count.len() <= 1 => {
            let series = match *series {
                "receptions" => Series::Receptions,
                "rejections" => Series::Rejections,
                other => {
                    return Err(syntax_error(format!(
                        "add: series must be receptions or rejections, got {other:?} \
                         (connections are counted by the kernel)"
                    )))
                }
            };
            let ip = ip
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .map_err(|_| {
                    QueryError::new(ErrorCode::BadCidr, format!("add: bad address {ip:?}"))
                })?
                .to_canonical();
            let n = match count.first() {
                None => 1,
                Some(text) => text
                    .parse::<u64>()
                    .ok()
                    .filter(|&n| n > 0 && n <= u32::MAX as u64)
                    .ok_or_else(|| {
                        syntax_error(format!(
                            "add: count {text:?} is not a number from 1 to 4294967295"
                        ))
                    })?,
            };
            Query::Add { series, ip, n }
        }
        ("add", _) => return Err(syntax_error("usage: add receptions|rejections <ip> [n]")),
        ("show", [cidr]) => Query::Show {
            cidr: parse_cidr(cidr)?,
        },
        ("show", _) => return Err(syntax_error("usage: show <ip[/mask]>")),
        ("stats", []) => Query::Stats,
        ("stats", _) => return Err(syntax_error("usage: stats")),
        _ => unreachable!("command is add, show or stats"),
    };
    reader.skip_to_end();
    Ok(Some(query))
}

/// Rejects what could only come from a broken or hostile client before
/// anything looks at the content.
fn check_framing(line: &[u8]) -> Result<&str, QueryError> {
    if line.len() > MAX_REQUEST_LEN {
        return Err(QueryError::new(
            ErrorCode::TooLong,
            format!(
                "request is {} bytes, longer than the {MAX_REQUEST_LEN}-byte limit",
                line.len()
            ),
        ));
    }
    let text = std::str::from_utf8(line).map_err(|_| syntax_error("request is not valid UTF-8"))?;
    for (position, byte) in text.bytes().enumerate() {
        match byte {
            b'\r' => {
                return Err(syntax_error(
                    "carriage return in request: end lines with LF only",
                ))
            }
            b'\n' => {
                return Err(syntax_error(
                    "line feed inside request: send one request per line",
                ))
            }
            0 => {
                return Err(syntax_error(format!(
                    "NUL byte in request at byte {position}"
                )))
            }
            _ => {}
        }
    }
    Ok(text)
}

/// Reads the address after '@' and the whitespace that must follow it.
fn read_client_context(reader: &mut Reader<'_>) -> Result<ClientContext, QueryError> {
    let address_text = reader.take_until_whitespace();
    let context = parse_client_context(address_text).ok_or_else(|| {
        QueryError::new(
            ErrorCode::BadCidr,
            format!(
                "bad client address {address_text:?}: expected IP, IPv4:port, [IPv6] or [IPv6]:port"
            ),
        )
    })?;
    reader.skip_whitespace();
    if reader.is_at_end() {
        return Err(reader.expected("a call after the client address"));
    }
    Ok(context)
}

/// `IPv4`, `IPv4:port`, `IPv6`, `[IPv6]`, `[IPv6]:port`. A bare IPv6 address
/// never carries a port: its last group would be indistinguishable from one.
fn parse_client_context(text: &str) -> Option<ClientContext> {
    let (ip, port) = if let Some(bracketed) = text.strip_prefix('[') {
        let (address, after_bracket) = bracketed.split_once(']')?;
        let ip = IpAddr::V6(address.parse::<Ipv6Addr>().ok()?);
        let port = match after_bracket {
            "" => None,
            _ => Some(parse_port(after_bracket.strip_prefix(':')?)?),
        };
        (ip, port)
    } else if let Ok(ip) = text.parse::<IpAddr>() {
        (ip, None)
    } else {
        let (address, port) = text.rsplit_once(':')?;
        (
            IpAddr::V4(address.parse::<Ipv4Addr>().ok()?),
            Some(parse_port(port)?),
        )
    };
    Some(ClientContext {
        ip: ip.to_canonical(),
        port,
    })
}

/// A listening port: 1 to 65535 in plain decimal.
fn parse_port(text: &str) -> Option<u16> {
    let plain_decimal = !text.is_empty()
        && text.bytes().all(|byte| byte.is_ascii_digit())
        && !text.starts_with('0');
    if !plain_decimal {
        return None;
    }
    text.parse().ok()
}

/// Reads the call and checks that only an optional ';' follows it.
fn read_call(reader: &mut Reader<'_>) -> Result<CallSyntax, QueryError> {
    let Some(first_name) = reader.read_identifier() else {
        return Err(reader.expected("function name"));
    };
    let mut name = first_name.to_owned();
    let mut is_plain_word = true;
    while reader.eat_byte(b'.') {
        let Some(part) = reader.read_identifier() else {
            return Err(reader.expected("name after '.'"));
        };
        name.push('.');
        name.push_str(part);
        is_plain_word = false;
    }
    if reader.eat_byte(b':') {
        let Some(method) = reader.read_identifier() else {
            return Err(reader.expected("method name after ':'"));
        };
        name.push(':');
        name.push_str(method);
        is_plain_word = false;
    }
    reader.skip_whitespace();

    let call = if reader.eat_byte(b'(') {
        CallSyntax::Lua {
            name,
            args: read_lua_arguments(reader)?,
        }
    } else if is_plain_word {
        CallSyntax::Sieve {
            name,
            args: read_sieve_arguments(reader)?,
        }
    } else {
        return Err(reader.expected(&format!("'(' after '{name}'")));
    };

    reader.skip_whitespace();
    reader.eat_byte(b';');
    reader.skip_whitespace();
    if !reader.is_at_end() {
        return Err(reader.expected("end of request"));
    }
    Ok(call)
}

/// `arg, arg, ... )`; the reader is past the '('.
fn read_lua_arguments(reader: &mut Reader<'_>) -> Result<Vec<Value>, QueryError> {
    let mut args = Vec::new();
    reader.skip_whitespace();
    if reader.eat_byte(b')') {
        return Ok(args);
    }
    loop {
        args.push(reader.read_value()?);
        reader.skip_whitespace();
        if reader.eat_byte(b',') {
            reader.skip_whitespace();
            continue;
        }
        if reader.eat_byte(b')') {
            return Ok(args);
        }
        return Err(reader.expected("',' or ')'"));
    }
}

/// Values up to the end of the request or a ';'.
fn read_sieve_arguments(reader: &mut Reader<'_>) -> Result<Vec<Value>, QueryError> {
    let mut args = Vec::new();
    loop {
        reader.skip_whitespace();
        if reader.is_at_end() || reader.peek_byte() == Some(b';') {
            return Ok(args);
        }
        args.push(reader.read_value()?);
    }
}

/// The function table: each known call and what it asks for.
fn query_for_call(call: CallSyntax) -> Result<Query, QueryError> {
    match call {
        CallSyntax::Lua { name, args } => {
            let args = Arguments::new(&name, args);
            match name.as_str() {
                "msys.audit.inbound_session_count" => msys_audit_inbound_session_count(args),
                "ac:inbound_session_count" => ac_inbound_session_count(args),
                "msys.audit.connections" => msys_audit_windowed(args, Series::Connections),
                "msys.audit.receptions" => msys_audit_windowed(args, Series::Receptions),
                "msys.audit.rejections" => msys_audit_windowed(args, Series::Rejections),
                _ => Err(unknown_function(&name)),
            }
        }
        CallSyntax::Sieve { name, args } => {
            let args = Arguments::new(&name, args);
            // Sieve command and test names are case-insensitive.
            match name.to_ascii_lowercase().as_str() {
                "audit_connections_on_service" => audit_connections_on(args, service_named_smtp()),
                "audit_connections_on_listener" => audit_connections_on(args, ServiceArg::Listener),
                "audit_service" => audit_service(args),
                "ec_ip_connections" => ec_ip(args, Series::Connections, false),
                "ec_ip_receptions" => ec_ip(args, Series::Receptions, false),
                "ec_ip_rejections" => ec_ip(args, Series::Rejections, false),
                "ec_ip_connections_cluster" => ec_ip(args, Series::Connections, true),
                "ec_ip_receptions_cluster" => ec_ip(args, Series::Receptions, true),
                "ec_ip_rejections_cluster" => ec_ip(args, Series::Rejections, true),
                _ => Err(unknown_function(&name)),
            }
        }
    }
}

/// `msys.audit.inbound_session_count(cidr, servicename)`
fn msys_audit_inbound_session_count(args: Arguments<'_>) -> Result<Query, QueryError> {
    const PARAMETERS: [&str; 2] = ["cidr", "servicename"];
    args.check_count(&PARAMETERS)?;
    let cidr = cidr_or_client(args.lua_string(0, &PARAMETERS)?)?;
    let service = args
        .lua_string(1, &PARAMETERS)?
        .map_or_else(service_named_smtp, ServiceArg::Named);
    Ok(Query::SessionCount { cidr, service })
}

/// `ac:inbound_session_count(cidr, service_type)`. Momentum documents the
/// no-argument form as "this listener"; once a cidr is given, the service
/// defaults to SMTP. A nil argument counts as omitted, as it does for Lua
/// functions that test with `lua_isnoneornil`.
fn ac_inbound_session_count(args: Arguments<'_>) -> Result<Query, QueryError> {
    const PARAMETERS: [&str; 2] = ["cidr", "service_type"];
    args.check_count(&PARAMETERS)?;
    let cidr_text = args.lua_string(0, &PARAMETERS)?;
    let service = match args.lua_string(1, &PARAMETERS)? {
        Some(service) => ServiceArg::Named(service),
        None if cidr_text.is_none() => ServiceArg::Listener,
        None => service_named_smtp(),
    };
    let cidr = cidr_or_client(cidr_text)?;
    Ok(Query::SessionCount { cidr, service })
}

/// Sieve `audit_connections_on_service [cidr]` and
/// `audit_connections_on_listener [cidr]`, which differ only in the service.
fn audit_connections_on(args: Arguments<'_>, service: ServiceArg) -> Result<Query, QueryError> {
    const PARAMETERS: [&str; 1] = ["cidr"];
    args.check_count(&PARAMETERS)?;
    let cidr = cidr_or_client(args.sieve_string(0, &PARAMETERS)?)?;
    Ok(Query::SessionCount { cidr, service })
}

/// Sieve `audit_service <service> [cidr]`.
fn audit_service(args: Arguments<'_>) -> Result<Query, QueryError> {
    const PARAMETERS: [&str; 2] = ["service", "cidr"];
    args.check_count(&PARAMETERS)?;
    let Some(service) = args.sieve_string(0, &PARAMETERS)? else {
        return Err(syntax_error(format!(
            "{}: argument 1 (service) is required",
            args.function
        )));
    };
    let cidr = cidr_or_client(args.sieve_string(1, &PARAMETERS)?)?;
    Ok(Query::SessionCount {
        cidr,
        service: ServiceArg::Named(service),
    })
}

/// `msys.audit.connections(monitor, options)` and its receptions/rejections
/// siblings. `options` is a cidr string or a table {startv, endv, cidr, cluster};
/// startv and endv default to 0 and name the range in either order.
fn msys_audit_windowed(args: Arguments<'_>, series: Series) -> Result<Query, QueryError> {
    const PARAMETERS: [&str; 2] = ["monitor", "options"];
    args.check_count(&PARAMETERS)?;
    let Some(monitor) = args.lua_string(0, &PARAMETERS)? else {
        return Err(syntax_error(format!(
            "{}: argument 1 (monitor) is required, e.g. \"300,6\"",
            args.function
        )));
    };
    let (mut first, mut last, mut cidr, mut cluster) = (0, 0, CidrArg::Client, false);
    match args.values.get(1) {
        None | Some(Value::Nil) => {}
        Some(Value::Str(text)) => cidr = parse_cidr(text)?,
        Some(Value::Table(fields)) => {
            for (key, value) in fields {
                let option = args.table_key(key)?;
                match option {
                    "startv" => first = args.window_number(option, value)?,
                    "endv" => last = args.window_number(option, value)?,
                    "cidr" => match value {
                        Value::Nil => {}
                        Value::Str(text) => cidr = parse_cidr(text)?,
                        other => return Err(args.option_error(option, "a string", other)),
                    },
                    "cluster" => match value {
                        Value::Nil => {}
                        Value::Bool(flag) => cluster = *flag,
                        other => return Err(args.option_error(option, "a boolean", other)),
                    },
                    other => {
                        return Err(syntax_error(format!(
                            "{}: unknown option {other:?} (startv, endv, cidr, cluster)",
                            args.function
                        )))
                    }
                }
            }
        }
        Some(other) => {
            return Err(args.type_error(1, &PARAMETERS, "a cidr string or an options table", other))
        }
    }
    Ok(Query::Windowed {
        series,
        monitor: MonitorRef::Key(monitor),
        cidr,
        first,
        last,
        cluster,
    })
}

/// Sieve `ec_ip_connections { time_series_index } [ mask ]` (the weighted
/// sliding average) and `ec_ip_connections { $hash }` with the keys monitor,
/// period_start, period_end and mask, written as a table literal
/// `{monitor="300,6", period_start=0, period_end=1, mask=24}`.
fn ec_ip(args: Arguments<'_>, series: Series, cluster: bool) -> Result<Query, QueryError> {
    const PARAMETERS: [&str; 2] = ["time_series_index", "mask"];
    args.check_count(&PARAMETERS)?;
    let mask_cidr = |mask: Option<u32>| match mask {
        None => Ok(CidrArg::Client),
        Some(bits) if bits <= 128 => Ok(CidrArg::ClientPrefix(bits as u8)),
        Some(bits) => Err(QueryError::new(
            ErrorCode::BadCidr,
            format!("mask {bits} is longer than 128"),
        )),
    };
    match args.values.first() {
        Some(Value::Table(fields)) => {
            if args.values.len() > 1 {
                return Err(syntax_error(format!(
                    "{}: the hash form takes one argument",
                    args.function
                )));
            }
            let (mut monitor, mut first, mut last, mut mask) = (MonitorRef::First, 0, None, None);
            for (key, value) in fields {
                let option = args.table_key(key)?;
                match option {
                    "monitor" => match value {
                        Value::Str(text) => monitor = MonitorRef::Key(text.clone()),
                        other => return Err(args.option_error(option, "a string", other)),
                    },
                    "period_start" => first = args.window_number(option, value)?,
                    "period_end" => last = Some(args.window_number(option, value)?),
                    "mask" => mask = Some(args.window_number(option, value)?),
                    other => {
                        return Err(syntax_error(format!(
                            "{}: unknown key {other:?} (monitor, period_start, period_end, mask)",
                            args.function
                        )))
                    }
                }
            }
            Ok(Query::Windowed {
                series,
                monitor,
                cidr: mask_cidr(mask)?,
                first,
                last: last.unwrap_or(first),
                cluster,
            })
        }
        Some(index) => {
            let monitor = args.window_number("time_series_index", index)?;
            let mask = args
                .values
                .get(1)
                .map(|mask| args.window_number("mask", mask))
                .transpose()?;
            Ok(Query::Sliding {
                series,
                monitor,
                cidr: mask_cidr(mask)?,
                cluster,
            })
        }
        None => Err(syntax_error(format!(
            "{}: expected {{ time_series_index }} [ mask ] or a hash",
            args.function
        ))),
    }
}

fn cidr_or_client(text: Option<String>) -> Result<CidrArg, QueryError> {
    text.map_or(Ok(CidrArg::Client), |text| parse_cidr(&text))
}

fn service_named_smtp() -> ServiceArg {
    ServiceArg::Named(DEFAULT_SERVICE.to_owned())
}

fn unknown_function(name: &str) -> QueryError {
    QueryError::new(
        ErrorCode::UnknownFunction,
        format!("unknown function '{name}'"),
    )
}

/// A call's arguments with the function name, so type errors can say
/// which function and which argument.
struct Arguments<'a> {
    function: &'a str,
    values: Vec<Value>,
}

impl<'a> Arguments<'a> {
    fn new(function: &'a str, values: Vec<Value>) -> Self {
        Arguments { function, values }
    }

    fn check_count(&self, parameters: &[&str]) -> Result<(), QueryError> {
        if self.values.len() <= parameters.len() {
            return Ok(());
        }
        Err(syntax_error(format!(
            "{} takes at most {} argument{} ({}), got {}",
            self.function,
            parameters.len(),
            if parameters.len() == 1 { "" } else { "s" },
            parameters.join(", "),
            self.values.len()
        )))
    }

    /// A Lua string argument; `None` when omitted or nil.
    fn lua_string(&self, index: usize, parameters: &[&str]) -> Result<Option<String>, QueryError> {
        match self.values.get(index) {
            None | Some(Value::Nil) => Ok(None),
            Some(Value::Str(text)) => Ok(Some(text.clone())),
            Some(other) => Err(self.type_error(index, parameters, "a string or nil", other)),
        }
    }

    /// A Sieve string argument: a string or a one-string list; `None` when
    /// omitted.
    fn sieve_string(
        &self,
        index: usize,
        parameters: &[&str],
    ) -> Result<Option<String>, QueryError> {
        match self.values.get(index) {
            None => Ok(None),
            Some(Value::Str(text)) => Ok(Some(text.clone())),
            Some(Value::List(members)) => match members.as_slice() {
                [Value::Str(text)] => Ok(Some(text.clone())),
                _ => Err(syntax_error(format!(
                    "{}: argument {} ({}) must be a single string, got a string list of {}",
                    self.function,
                    index + 1,
                    parameters[index],
                    members.len()
                ))),
            },
            Some(other) => Err(self.type_error(index, parameters, "a string", other)),
        }
    }

    /// A table key that must be a plain name.
    fn table_key<'k>(&self, key: &'k Option<TableKey>) -> Result<&'k str, QueryError> {
        match key {
            Some(TableKey::Name(name)) => Ok(name),
            Some(TableKey::Value(Value::Str(name))) => Ok(name),
            _ => Err(syntax_error(format!(
                "{}: options are named fields like {{startv=0}}",
                self.function
            ))),
        }
    }

    /// A non-negative integer (window number, index, mask), also accepted as
    /// a numeric string since Sieve passes strings.
    fn window_number(&self, option: &str, value: &Value) -> Result<u32, QueryError> {
        let number = match value {
            Value::Integer(n) => Some(*n),
            Value::Str(text) => text.parse::<i64>().ok(),
            _ => None,
        };
        number
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.option_error(option, "a non-negative integer", value))
    }

    fn option_error(&self, option: &str, wanted: &str, got: &Value) -> QueryError {
        syntax_error(format!(
            "{}: {option} must be {wanted}, got {}",
            self.function,
            got.type_name()
        ))
    }

    fn type_error(
        &self,
        index: usize,
        parameters: &[&str],
        wanted: &str,
        got: &Value,
    ) -> QueryError {
        syntax_error(format!(
            "{}: argument {} ({}) must be {wanted}, got {}",
            self.function,
            index + 1,
            parameters[index],
            got.type_name()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(text: &str) -> Request {
        parse_request(text.as_bytes()).unwrap_or_else(|error| panic!("{text:?}: {error}"))
    }

    fn rejected(text: &str) -> QueryError {
        parse_request(text.as_bytes()).expect_err("should be rejected")
    }

    fn syntax(message: &str) -> QueryError {
        QueryError::new(ErrorCode::Syntax, message)
    }

    fn session_count(cidr: CidrArg, service: ServiceArg) -> Request {
        Request {
            client: None,
            query: Query::SessionCount { cidr, service },
        }
    }

    fn named(service: &str) -> ServiceArg {
        ServiceArg::Named(service.to_owned())
    }

    fn network(text: &str) -> CidrArg {
        CidrArg::Network(text.parse().expect("test network"))
    }

    fn context(ip: &str, port: Option<u16>) -> Option<ClientContext> {
        Some(ClientContext {
            ip: ip.parse().expect("test address"),
            port,
        })
    }

    #[test]
    fn msys_audit_inbound_session_count_forms() {
        assert_eq!(
            parse("msys.audit.inbound_session_count()"),
            session_count(CidrArg::Client, named("SMTP"))
        );
        assert_eq!(
            parse("msys.audit.inbound_session_count(\"/24\")"),
            session_count(CidrArg::ClientPrefix(24), named("SMTP"))
        );
        assert_eq!(
            parse("msys.audit.inbound_session_count(\"10.0.0.0/8\", \"ECStream\")"),
            session_count(network("10.0.0.0/8"), named("ECStream"))
        );
        assert_eq!(
            parse("msys.audit.inbound_session_count(nil, 'Control');"),
            session_count(CidrArg::Client, named("Control"))
        );
        assert_eq!(
            parse("msys.audit.inbound_session_count('/32', nil)"),
            session_count(CidrArg::ClientPrefix(32), named("SMTP"))
        );
        assert_eq!(
            parse("  msys.audit.inbound_session_count ( \"[2001:db8::]/64\" , \"smtp\" ) ; \t"),
            session_count(network("2001:db8::/64"), named("smtp"))
        );
        assert_eq!(
            parse("msys.audit.inbound_session_count(\"localhost\", \"\")"),
            session_count(network("127.0.0.1/32"), named(""))
        );
    }

    #[test]
    fn ac_inbound_session_count_forms() {
        assert_eq!(
            parse("ac:inbound_session_count()"),
            session_count(CidrArg::Client, ServiceArg::Listener)
        );
        assert_eq!(
            parse("ac:inbound_session_count(nil)"),
            session_count(CidrArg::Client, ServiceArg::Listener)
        );
        assert_eq!(
            parse("ac:inbound_session_count(\"localhost/32\")"),
            session_count(network("127.0.0.1/32"), named("SMTP"))
        );
        assert_eq!(
            parse("ac:inbound_session_count(\"/24\", \"ECStream\")"),
            session_count(CidrArg::ClientPrefix(24), named("ECStream"))
        );
        assert_eq!(
            parse("ac:inbound_session_count(nil, \"Control\")"),
            session_count(CidrArg::Client, named("Control"))
        );
    }

    #[test]
    fn sieve_forms() {
        assert_eq!(
            parse("audit_connections_on_service \"/24\""),
            session_count(CidrArg::ClientPrefix(24), named("SMTP"))
        );
        assert_eq!(
            parse("audit_connections_on_service"),
            session_count(CidrArg::Client, named("SMTP"))
        );
        assert_eq!(
            parse("audit_connections_on_listener \"/24\";"),
            session_count(CidrArg::ClientPrefix(24), ServiceArg::Listener)
        );
        assert_eq!(
            parse("audit_connections_on_listener"),
            session_count(CidrArg::Client, ServiceArg::Listener)
        );
        assert_eq!(
            parse("audit_service \"SMTP\" \"10.0.0.0/8\""),
            session_count(network("10.0.0.0/8"), named("SMTP"))
        );
        assert_eq!(
            parse("audit_service \"Control\""),
            session_count(CidrArg::Client, named("Control"))
        );
        assert_eq!(
            parse("audit_service [\"SMTP\"] [\"/16\"]"),
            session_count(CidrArg::ClientPrefix(16), named("SMTP"))
        );
        assert_eq!(
            parse("AUDIT_Connections_On_Service [\"/24\"]"),
            session_count(CidrArg::ClientPrefix(24), named("SMTP"))
        );
        assert_eq!(
            parse("audit_service\"SMTP\"\"10.1.2.3/24\""),
            session_count(network("10.1.2.0/24"), named("SMTP"))
        );
    }

    #[test]
    fn client_context_forms() {
        let call = " msys.audit.inbound_session_count()";
        let cases = [
            ("@203.0.113.9", context("203.0.113.9", None)),
            ("@203.0.113.9:587", context("203.0.113.9", Some(587))),
            ("@[2001:db8::1]:25", context("2001:db8::1", Some(25))),
            ("@[2001:db8::1]", context("2001:db8::1", None)),
            ("@2001:db8::1", context("2001:db8::1", None)),
            ("@2001:db8::1:25", context("2001:db8::1:25", None)),
            ("@::ffff:10.0.0.1", context("10.0.0.1", None)),
            ("@[::ffff:10.0.0.1]:2525", context("10.0.0.1", Some(2525))),
            ("@10.0.0.1:65535", context("10.0.0.1", Some(65535))),
        ];
        for (prefix, expected_client) in cases {
            let request = parse(&format!("{prefix}{call}"));
            assert_eq!(request.client, expected_client, "{prefix}");
            assert_eq!(
                request.query,
                Query::SessionCount {
                    cidr: CidrArg::Client,
                    service: named("SMTP")
                }
            );
        }
        assert_eq!(
            parse("\t@10.0.0.1\t\taudit_connections_on_listener").client,
            context("10.0.0.1", None)
        );
    }

    #[test]
    fn bad_client_context() {
        for address in [
            "",
            "10.0.0",
            "10.0.0.1:",
            "10.0.0.1:0",
            "10.0.0.1:025",
            "10.0.0.1:65536",
            "10.0.0.1:+25",
            "[2001:db8::1",
            "[2001:db8::1]25",
            "[2001:db8::1]:",
            "[10.0.0.1]:25",
            "fe80::1%eth0",
            "host.example:25",
            "2001:db8::1]:25",
        ] {
            assert_eq!(
                rejected(&format!("@{address} audit_connections_on_service")),
                QueryError::new(
                    ErrorCode::BadCidr,
                    format!(
                        "bad client address {address:?}: expected IP, IPv4:port, [IPv6] or [IPv6]:port"
                    )
                ),
                "{address}"
            );
        }
    }

    #[test]
    fn client_context_needs_a_call_after_it() {
        assert_eq!(
            rejected("@10.0.0.1"),
            syntax("expected a call after the client address at byte 9")
        );
        assert_eq!(
            rejected("@10.0.0.1   "),
            syntax("expected a call after the client address at byte 12")
        );
    }

    fn windowed(
        series: Series,
        monitor: MonitorRef,
        cidr: CidrArg,
        first: u32,
        last: u32,
    ) -> Query {
        Query::Windowed {
            series,
            monitor,
            cidr,
            first,
            last,
            cluster: false,
        }
    }

    fn key(text: &str) -> MonitorRef {
        MonitorRef::Key(text.to_owned())
    }

    #[test]
    fn msys_audit_windowed_forms() {
        assert_eq!(
            parse("msys.audit.connections(\"60,1\")").query,
            windowed(Series::Connections, key("60,1"), CidrArg::Client, 0, 0)
        );
        assert_eq!(
            parse("msys.audit.receptions('300,6', '10.0.0.0/8')").query,
            windowed(
                Series::Receptions,
                key("300,6"),
                network("10.0.0.0/8"),
                0,
                0
            )
        );
        assert_eq!(
            parse("msys.audit.rejections(\"300,6\", {startv=1, endv=3, cidr=\"/24\"})").query,
            windowed(
                Series::Rejections,
                key("300,6"),
                CidrArg::ClientPrefix(24),
                1,
                3
            )
        );
        assert_eq!(
            parse("msys.audit.connections(\"300,6\", {cluster=true, [\"endv\"]=2})").query,
            Query::Windowed {
                series: Series::Connections,
                monitor: key("300,6"),
                cidr: CidrArg::Client,
                first: 0,
                last: 2,
                cluster: true
            }
        );
        for bad in [
            "msys.audit.connections()",
            "msys.audit.connections(60)",
            "msys.audit.connections(\"60,1\", 5)",
            "msys.audit.connections(\"60,1\", {startv=-1})",
            "msys.audit.connections(\"60,1\", {start=1})",
            "msys.audit.connections(\"60,1\", {cidr=5})",
            "msys.audit.connections(\"60,1\", {cluster=\"yes\"})",
            "msys.audit.connections(\"60,1\", {1})",
            "msys.audit.connections(\"60,1\", nil, 3)",
        ] {
            assert_eq!(rejected(bad).code, ErrorCode::Syntax, "{bad}");
        }
        assert_eq!(
            rejected("msys.audit.connections(\"60,1\", \"10.0.0.300\")").code,
            ErrorCode::BadCidr
        );
    }

    #[test]
    fn sieve_ec_ip_forms() {
        assert_eq!(
            parse("ec_ip_connections \"0\"").query,
            Query::Sliding {
                series: Series::Connections,
                monitor: 0,
                cidr: CidrArg::Client,
                cluster: false
            }
        );
        assert_eq!(
            parse("ec_ip_rejections 1 24").query,
            Query::Sliding {
                series: Series::Rejections,
                monitor: 1,
                cidr: CidrArg::ClientPrefix(24),
                cluster: false
            }
        );
        assert_eq!(
            parse("ec_ip_receptions {monitor=\"300,6\", period_start=1, period_end=4, mask=16}")
                .query,
            windowed(
                Series::Receptions,
                key("300,6"),
                CidrArg::ClientPrefix(16),
                1,
                4
            )
        );
        assert_eq!(
            parse("ec_ip_connections {period_start=\"2\"}").query,
            windowed(
                Series::Connections,
                MonitorRef::First,
                CidrArg::Client,
                2,
                2
            )
        );
        assert!(matches!(
            parse("ec_ip_connections_cluster \"0\"").query,
            Query::Sliding { cluster: true, .. }
        ));
        assert_eq!(rejected("ec_ip_connections").code, ErrorCode::Syntax);
        assert_eq!(
            rejected("ec_ip_connections {colour=1}").code,
            ErrorCode::Syntax
        );
        assert_eq!(
            rejected("ec_ip_connections {mask=24} 3").code,
            ErrorCode::Syntax
        );
        assert_eq!(rejected("ec_ip_connections 0 129").code, ErrorCode::BadCidr);
    }

    #[test]
    fn console_add_and_show() {
        assert_eq!(
            parse("add receptions 10.0.0.1").query,
            Query::Add {
                series: Series::Receptions,
                ip: "10.0.0.1".parse().unwrap(),
                n: 1
            }
        );
        assert_eq!(
            parse("add rejections ::ffff:10.0.0.1 7").query,
            Query::Add {
                series: Series::Rejections,
                ip: "10.0.0.1".parse().unwrap(),
                n: 7
            }
        );
        assert_eq!(
            parse("@10.0.0.9 show /24"),
            Request {
                client: context("10.0.0.9", None),
                query: Query::Show {
                    cidr: CidrArg::ClientPrefix(24)
                }
            }
        );
        assert_eq!(
            parse("show 2001:db8::/64").query,
            Query::Show {
                cidr: network("2001:db8::/64")
            }
        );
        for bad in [
            "add",
            "add receptions",
            "add connections 10.0.0.1",
            "add receptions 10.0.0.1 0",
            "add receptions 10.0.0.1 x",
            "add receptions 10.0.0.1 1 2",
            "show",
            "show a b",
        ] {
            assert_eq!(rejected(bad).code, ErrorCode::Syntax, "{bad}");
        }
        assert_eq!(
            rejected("add receptions 10.0.0.256").code,
            ErrorCode::BadCidr
        );
        assert_eq!(rejected("show 10.0.0.0/33").code, ErrorCode::BadCidr);
        assert_eq!(parse("stats").query, Query::Stats);
        assert_eq!(rejected("stats now").code, ErrorCode::Syntax);
        // Only whole words are console commands.
        assert_eq!(rejected("address").code, ErrorCode::UnknownFunction);
    }

    #[test]
    fn unknown_functions() {
        let unknown = |name: &str| {
            QueryError::new(
                ErrorCode::UnknownFunction,
                format!("unknown function '{name}'"),
            )
        };
        assert_eq!(
            rejected("msys.audit.connection(\"60,1\")"),
            unknown("msys.audit.connection")
        );
        assert_eq!(rejected("print()"), unknown("print"));
        assert_eq!(rejected("ac:session_count()"), unknown("ac:session_count"));
        assert_eq!(
            rejected("audit_service(\"SMTP\")"),
            unknown("audit_service")
        );
        assert_eq!(
            rejected("ec_ip_connection \"0\""),
            unknown("ec_ip_connection")
        );
        assert_eq!(rejected("foo"), unknown("foo"));
        assert_eq!(rejected("foo;"), unknown("foo"));
    }

    #[test]
    fn malformed_calls() {
        let cases = [
            (
                "msys.audit.inbound_session_count(",
                "expected value at byte 33",
            ),
            (
                "msys.audit.inbound_session_count(\"/24\"",
                "expected ',' or ')' at byte 38",
            ),
            (
                "msys.audit.inbound_session_count(\"/24\",)",
                "expected value at byte 39",
            ),
            (
                "msys.audit.inbound_session_count \"/24\"",
                "expected '(' after 'msys.audit.inbound_session_count' at byte 33",
            ),
            (
                "msys.audit.inbound_session_count",
                "expected '(' after 'msys.audit.inbound_session_count' at byte 32",
            ),
            ("msys.audit.(\"x\")", "expected name after '.' at byte 11"),
            ("ac:(\"x\")", "expected method name after ':' at byte 3"),
            ("ac:a:b()", "expected '(' after 'ac:a' at byte 4"),
            ("foo bar baz(", "expected value at byte 4"),
            (
                "ac:inbound_session_count() extra",
                "expected end of request at byte 27",
            ),
            (
                "ac:inbound_session_count();;",
                "expected end of request at byte 27",
            ),
            (
                "ac:inbound_session_count(); ac:inbound_session_count()",
                "expected end of request at byte 28",
            ),
            ("(\"x\")", "expected function name at byte 0"),
            ("\"/24\"", "expected function name at byte 0"),
            ("@10.0.0.1 42", "expected function name at byte 10"),
            (
                "audit_service \"SMTP\" \"/24",
                "unterminated string starting at byte 21",
            ),
            ("audit_service \"SMTP\" {{{", "expected '}' at byte 24"),
        ];
        for (text, message) in cases {
            assert_eq!(rejected(text), syntax(message), "{text}");
        }
    }

    #[test]
    fn argument_type_errors() {
        let cases = [
            ("msys.audit.inbound_session_count(24)", "msys.audit.inbound_session_count: argument 1 (cidr) must be a string or nil, got integer"),
            ("msys.audit.inbound_session_count({cidr='/24'})", "msys.audit.inbound_session_count: argument 1 (cidr) must be a string or nil, got table"),
            ("msys.audit.inbound_session_count(nil, true)", "msys.audit.inbound_session_count: argument 2 (servicename) must be a string or nil, got boolean"),
            ("msys.audit.inbound_session_count([\"/24\"])", "msys.audit.inbound_session_count: argument 1 (cidr) must be a string or nil, got string list"),
            ("msys.audit.inbound_session_count(nil, nil, nil)", "msys.audit.inbound_session_count takes at most 2 arguments (cidr, servicename), got 3"),
            ("ac:inbound_session_count('/24', 'SMTP', 'x')", "ac:inbound_session_count takes at most 2 arguments (cidr, service_type), got 3"),
            ("ac:inbound_session_count(false)", "ac:inbound_session_count: argument 1 (cidr) must be a string or nil, got boolean"),
            ("audit_connections_on_service \"/24\" \"/16\"", "audit_connections_on_service takes at most 1 argument (cidr), got 2"),
            ("audit_connections_on_service [\"/24\", \"/16\"]", "audit_connections_on_service: argument 1 (cidr) must be a single string, got a string list of 2"),
            ("audit_connections_on_listener nil", "audit_connections_on_listener: argument 1 (cidr) must be a string, got nil"),
            ("audit_connections_on_listener 24", "audit_connections_on_listener: argument 1 (cidr) must be a string, got integer"),
            ("audit_service", "audit_service: argument 1 (service) is required"),
            ("audit_service \"SMTP\" {}", "audit_service: argument 2 (cidr) must be a string, got table"),
            ("audit_service \"SMTP\" \"/24\" \"x\"", "audit_service takes at most 2 arguments (service, cidr), got 3"),
        ];
        for (text, message) in cases {
            assert_eq!(rejected(text), syntax(message), "{text}");
        }
    }

    #[test]
    fn bad_cidr_arguments() {
        assert_eq!(
            rejected("msys.audit.inbound_session_count(\"10.0.0.1/33\")"),
            QueryError::new(
                ErrorCode::BadCidr,
                "bad cidr \"10.0.0.1/33\": prefix length 33 is out of range for IPv4 (0 to 32)"
            )
        );
        assert_eq!(
            rejected("audit_connections_on_service \"\""),
            QueryError::new(
                ErrorCode::BadCidr,
                "empty cidr: expected \"/N\", \"addr/mask\" or \"addr\""
            )
        );
        assert_eq!(
            rejected("ac:inbound_session_count(\" /24\")"),
            QueryError::new(
                ErrorCode::BadCidr,
                "bad cidr \" /24\": whitespace and control characters are not allowed"
            )
        );
    }

    #[test]
    fn no_client_surfaces_when_resolving() {
        let request = parse("audit_connections_on_service \"/24\"");
        let Query::SessionCount { cidr, .. } = request.query else {
            panic!("a session count")
        };
        assert_eq!(
            cidr.resolve(request.client.map(|client| client.ip)),
            Err(QueryError::new(
                ErrorCode::NoClient,
                "no client address: prefix the request with @IP"
            ))
        );
        let request = parse("@::ffff:203.0.113.9 audit_connections_on_service \"/24\"");
        let Query::SessionCount { cidr, .. } = request.query else {
            panic!("a session count")
        };
        assert_eq!(
            cidr.resolve(request.client.map(|client| client.ip)),
            Ok("203.0.113.0/24".parse().unwrap())
        );
    }

    #[test]
    fn framing_errors() {
        assert_eq!(
            parse_request(b"audit_service \"SMTP\" \"\xff\""),
            Err(syntax("request is not valid UTF-8"))
        );
        assert_eq!(
            parse_request(b"audit_service \"SM\0TP\""),
            Err(syntax("NUL byte in request at byte 17"))
        );
        assert_eq!(
            parse_request(b"ac:inbound_session_count()\r"),
            Err(syntax("carriage return in request: end lines with LF only"))
        );
        assert_eq!(
            parse_request(b"ac:inbound_session_count()\nac:inbound_session_count()"),
            Err(syntax(
                "line feed inside request: send one request per line"
            ))
        );
        assert_eq!(parse_request(b""), Err(syntax("empty request")));
        assert_eq!(parse_request(b" \t  "), Err(syntax("empty request")));
    }

    #[test]
    fn length_limit() {
        let call = "audit_service \"SMTP\"";
        let mut longest = " ".repeat(MAX_REQUEST_LEN - call.len());
        longest.push_str(call);
        assert_eq!(longest.len(), MAX_REQUEST_LEN);
        assert_eq!(
            parse(&longest),
            session_count(CidrArg::Client, named("SMTP"))
        );
        let too_long = format!(" {longest}");
        assert_eq!(
            parse_request(too_long.as_bytes()),
            Err(QueryError::new(
                ErrorCode::TooLong,
                "request is 4097 bytes, longer than the 4096-byte limit"
            ))
        );
        // The limit comes first, even for a line that is not UTF-8.
        assert_eq!(
            parse_request(&[0xff; MAX_REQUEST_LEN + 1]).map_err(|error| error.code),
            Err(ErrorCode::TooLong)
        );
    }

    #[test]
    fn hostile_arguments() {
        let deep = format!("msys.audit.inbound_session_count({})", "{".repeat(100_000));
        assert_eq!(
            parse_request(deep.as_bytes()),
            Err(QueryError::new(
                ErrorCode::TooLong,
                "request is 100034 bytes, longer than the 4096-byte limit"
            ))
        );
        let deep = format!("msys.audit.inbound_session_count({})", "{".repeat(4000));
        assert_eq!(rejected(&deep), syntax("nesting deeper than 32 at byte 65"));
        assert_eq!(
            rejected("msys.audit.inbound_session_count(99999999999999999999)"),
            syntax("number out of range at byte 33")
        );
        assert_eq!(
            rejected("msys.audit.inbound_session_count(1.5)"),
            syntax("only integers are supported at byte 33")
        );
        assert_eq!(
            rejected("msys.audit.inbound_session_count(\"/24)"),
            syntax("unterminated string starting at byte 33")
        );
        assert_eq!(
            rejected("audit_service \"\\q\""),
            syntax("unknown escape '\\q' at byte 15")
        );
    }

    #[test]
    fn escapes_reach_the_arguments() {
        assert_eq!(
            parse(r#"msys.audit.inbound_session_count("\x2f\50\z   4", "S\x4dTP")"#),
            session_count(CidrArg::ClientPrefix(24), named("SMTP"))
        );
    }

    /// Text made mostly of the protocol's own punctuation, so the generator
    /// reaches deep into the grammar instead of failing at byte 0.
    fn request_like_text() -> impl Strategy<Value = String> {
        let fragments = prop::sample::select(vec![
            "msys.audit.inbound_session_count",
            "ac:inbound_session_count",
            "audit_service",
            "audit_connections_on_listener",
            "@10.0.0.1:25 ",
            "@[::1] ",
            "(",
            ")",
            ",",
            ";",
            "{",
            "}",
            "[",
            "]",
            "=",
            "\"",
            "'",
            "\\",
            "\\x",
            "\\z",
            "\\999",
            "/24",
            "10.0.0.0/8",
            "::ffff:1.2.3.4",
            "nil",
            "true",
            "-",
            "0x",
            "99999999999999999999",
            "1.5",
            " ",
            "\t",
            "é",
        ]);
        prop::collection::vec(fragments, 0..40).prop_map(|parts| parts.concat())
    }

    proptest! {
        #[test]
        fn parse_request_never_panics_on_bytes(line in prop::collection::vec(any::<u8>(), 0..5000)) {
            let _ = parse_request(&line);
        }

        #[test]
        fn parse_request_never_panics_on_near_requests(text in request_like_text()) {
            let _ = parse_request(text.as_bytes());
        }

        #[test]
        fn every_outcome_fits_one_reply_line(text in request_like_text()) {
            if let Err(error) = parse_request(text.as_bytes()) {
                let line = crate::serving::protocol::Reply::from(error).to_line();
                prop_assert!(line.ends_with('\n'));
                prop_assert_eq!(line.matches('\n').count(), 1);
            }
        }
    }
}
