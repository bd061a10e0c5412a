//! Requests: one line, an optional client context, then one call written the
//! way Momentum's Lua or Sieve pages write it.
//!
//! About 700 lines: one short function per Momentum call form, and the forms
//! share one set of argument rules (`Arguments`), so they read best together.
//! The tests are in `request/tests.rs`.

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
    /// Console `show <ip[/mask]> [cluster | node NAME]`: every monitor's
    /// windows and live sessions, on this node, over the fleet, or on one node.
    Show { cidr: CidrArg, scope: ShowScope },
    /// Console `show all`: every tracked IP with its series, as CSV, streamed
    /// (see [`crate::serving::show_all`]).
    ShowAll,
    /// Console `stats`: the agent's own counters.
    Stats,
    /// `show count for ...` / `show available`, Momentum's cidr_cli grammar.
    CidrShell(crate::serving::cidr_shell::CidrShell),
    /// `policy PHASE name=value ...`: one SMTP phase for the Lua policy host.
    Policy(super::policy::PolicyCall),
}

/// Whose counts `show` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShowScope {
    /// This node's own.
    Local,
    /// The fleet's sums, then a row per node.
    Cluster,
    /// One node's own view, by its cluster name.
    Node(String),
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
    if super::policy::is_policy(&reader) {
        let call = super::policy::read_policy(&mut reader, client.map(|c| (c.ip, c.port)))?;
        return Ok(Request {
            client,
            query: Query::Policy(call),
        });
    }
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
    if let Some(shell) = crate::serving::cidr_shell::parse(rest) {
        reader.skip_to_end();
        return shell.map(|shell| Some(Query::CidrShell(shell)));
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
        ("show", ["all"]) => Query::ShowAll,
        ("show", ["all", ..]) => {
            return Err(syntax_error(
                "usage: show all (this node's counts; it takes no arguments)",
            ))
        }
        ("show", [cidr]) => Query::Show {
            cidr: parse_cidr(cidr)?,
            scope: ShowScope::Local,
        },
        ("show", [cidr, "cluster"]) => Query::Show {
            cidr: parse_cidr(cidr)?,
            scope: ShowScope::Cluster,
        },
        ("show", [cidr, "node", node]) => Query::Show {
            cidr: parse_cidr(cidr)?,
            scope: ShowScope::Node(node.to_string()),
        },
        ("show", _) => {
            return Err(syntax_error(
                "usage: show <ip[/mask]> [cluster | node NAME] | show all",
            ))
        }
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
                "msys.audit.refusals" => msys_audit_windowed(args, Series::Refusals),
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
mod tests;
