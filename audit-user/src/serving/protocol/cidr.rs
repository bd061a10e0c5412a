//! The `cidr` argument of the session-count queries.
//!
//! Momentum's pages give four forms: `/24` (the connecting IP masked to 24
//! bits), `/32` (exactly the connecting IP), `addr/mask` and `addr`. Omitting
//! the argument (nil) means the connecting IP itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::reply::{ErrorCode, QueryError};

/// What a request asks to count, before the client address is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CidrArg {
    /// No cidr given: the connecting client's IP exactly.
    Client,
    /// `/N`: the client's IP masked to N bits. N is at most 128 here; whether
    /// it fits the client's family is only known at [`CidrArg::resolve`].
    ClientPrefix(u8),
    /// `addr/mask` or `addr`: a fixed network, host bits already masked off,
    /// v4-mapped IPv6 already turned into IPv4.
    Network(IpNet),
}

const IPV4_BITS: u8 = 32;
const IPV6_BITS: u8 = 128;
/// Bits in front of the IPv4 part of `::ffff:a.b.c.d`.
const V4_MAPPED_PREFIX_BITS: u8 = 96;

/// Parses a cidr argument exactly as the caller wrote it.
///
/// Nothing is trimmed: a Lua or Sieve string is taken literally, and a stray
/// space more likely means a mistake than an intent.
pub fn parse_cidr(text: &str) -> Result<CidrArg, QueryError> {
    if text.is_empty() {
        return Err(QueryError::new(
            ErrorCode::BadCidr,
            "empty cidr: expected \"/N\", \"addr/mask\" or \"addr\"",
        ));
    }
    if text
        .chars()
        .any(|character| character.is_whitespace() || character.is_control())
    {
        return Err(bad_cidr(
            text,
            "whitespace and control characters are not allowed",
        ));
    }

    if let Some(digits) = text.strip_prefix('/') {
        return parse_prefix_length(text, digits).map(CidrArg::ClientPrefix);
    }

    let (address_text, prefix) = match text.split_once('/') {
        Some((address, digits)) => (address, Some(parse_prefix_length(text, digits)?)),
        None => (text, None),
    };
    let address = parse_address(text, address_text)?;
    let network = network_of(address, prefix).map_err(|max_bits| {
        bad_cidr(
            text,
            format!(
                "prefix length {} is out of range for {} (0 to {max_bits})",
                prefix.unwrap_or(max_bits),
                family_name(address),
            ),
        )
    })?;
    Ok(CidrArg::Network(network))
}

impl CidrArg {
    /// The network to count for a request from `client`.
    pub fn resolve(&self, client: Option<IpAddr>) -> Result<IpNet, QueryError> {
        match *self {
            CidrArg::Network(network) => Ok(network),
            CidrArg::Client => {
                let client = require_client(client)?;
                network_of(client, None).map_err(|_| {
                    // Unreachable: a host prefix always fits its own family.
                    QueryError::new(ErrorCode::BadCidr, format!("bad client address {client}"))
                })
            }
            CidrArg::ClientPrefix(bits) => {
                let client = require_client(client)?;
                network_of(client, Some(bits)).map_err(|max_bits| {
                    QueryError::new(
                        ErrorCode::BadCidr,
                        format!(
                            "prefix length /{bits} is out of range for the {} client {client} (0 to {max_bits})",
                            family_name(client),
                        ),
                    )
                })
            }
        }
    }
}

fn require_client(client: Option<IpAddr>) -> Result<IpAddr, QueryError> {
    client.map(|ip| ip.to_canonical()).ok_or_else(|| {
        QueryError::new(
            ErrorCode::NoClient,
            "no client address: prefix the request with @IP",
        )
    })
}

fn bad_cidr(text: &str, reason: impl std::fmt::Display) -> QueryError {
    QueryError::new(ErrorCode::BadCidr, format!("bad cidr {text:?}: {reason}"))
}

/// Parses the digits after '/'. Only plain decimal up to 128 is accepted:
/// leading zeros, signs and huge numbers are typos, not prefixes.
fn parse_prefix_length(text: &str, digits: &str) -> Result<u8, QueryError> {
    if digits.is_empty() {
        return Err(bad_cidr(text, "missing prefix length after '/'"));
    }
    if !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(bad_cidr(
            text,
            format!("prefix length {digits:?} is not a decimal number"),
        ));
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return Err(bad_cidr(
            text,
            format!("prefix length {digits:?} has a leading zero"),
        ));
    }
    match digits.parse::<u8>() {
        Ok(bits) if bits <= IPV6_BITS => Ok(bits),
        _ => Err(bad_cidr(
            text,
            format!("prefix length {digits} is out of range (0 to {IPV6_BITS})"),
        )),
    }
}

/// Parses the part before '/': an IPv4 or IPv6 address, IPv6 optionally in
/// brackets (the Momentum convention where ':' could be ambiguous), or
/// `localhost`, which Momentum's own example uses.
fn parse_address(text: &str, address_text: &str) -> Result<IpAddr, QueryError> {
    if address_text.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    if let Some(bracketed) = address_text.strip_prefix('[') {
        let Some((inner, after_bracket)) = bracketed.split_once(']') else {
            return Err(bad_cidr(text, "'[' without a matching ']'"));
        };
        if !after_bracket.is_empty() {
            return Err(bad_cidr(
                text,
                format!("unexpected {after_bracket:?} after ']'"),
            ));
        }
        return inner
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| bad_cidr(text, format!("{inner:?} is not an IPv6 address")));
    }
    address_text.parse::<IpAddr>().map_err(|_| {
        bad_cidr(
            text,
            format!("{address_text:?} is not an IPv4 or IPv6 address"),
        )
    })
}

/// The network of `address` with `prefix` bits (all bits when `None`), host
/// bits masked off. A v4-mapped IPv6 network whose prefix covers the mapping
/// becomes the IPv4 network, because the kernel reports IPv4 peers of
/// dual-stack sockets as IPv4. On a prefix too long for the family, returns
/// the family's bit count.
fn network_of(address: IpAddr, prefix: Option<u8>) -> Result<IpNet, u8> {
    let (address, prefix) = match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) if prefix.is_none_or(|bits| bits >= V4_MAPPED_PREFIX_BITS) => (
                IpAddr::V4(v4),
                prefix.map(|bits| bits - V4_MAPPED_PREFIX_BITS),
            ),
            _ => (address, prefix),
        },
        IpAddr::V4(_) => (address, prefix),
    };
    let max_bits = match address {
        IpAddr::V4(_) => IPV4_BITS,
        IpAddr::V6(_) => IPV6_BITS,
    };
    IpNet::new(address, prefix.unwrap_or(max_bits))
        .map(|network| network.trunc())
        .map_err(|_| max_bits)
}

fn family_name(address: IpAddr) -> &'static str {
    match address.to_canonical() {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(text: &str) -> CidrArg {
        CidrArg::Network(text.parse().expect("test network"))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn bad_cidr_message(text: &str) -> String {
        let error = parse_cidr(text).expect_err("should be rejected");
        assert_eq!(error.code, ErrorCode::BadCidr, "{text:?}");
        error.message
    }

    #[test]
    fn client_prefix_forms() {
        assert_eq!(parse_cidr("/24"), Ok(CidrArg::ClientPrefix(24)));
        assert_eq!(parse_cidr("/32"), Ok(CidrArg::ClientPrefix(32)));
        assert_eq!(parse_cidr("/0"), Ok(CidrArg::ClientPrefix(0)));
        assert_eq!(parse_cidr("/64"), Ok(CidrArg::ClientPrefix(64)));
        assert_eq!(parse_cidr("/128"), Ok(CidrArg::ClientPrefix(128)));
    }

    #[test]
    fn ipv4_networks_are_masked() {
        assert_eq!(parse_cidr("10.0.0.0/8"), Ok(network("10.0.0.0/8")));
        assert_eq!(parse_cidr("10.1.2.3/24"), Ok(network("10.1.2.0/24")));
        assert_eq!(parse_cidr("10.1.2.3/0"), Ok(network("0.0.0.0/0")));
        assert_eq!(parse_cidr("10.1.2.3/32"), Ok(network("10.1.2.3/32")));
    }

    #[test]
    fn bare_address_is_exact() {
        assert_eq!(parse_cidr("203.0.113.9"), Ok(network("203.0.113.9/32")));
        assert_eq!(parse_cidr("2001:db8::1"), Ok(network("2001:db8::1/128")));
    }

    #[test]
    fn ipv6_with_and_without_brackets() {
        assert_eq!(parse_cidr("2001:db8::/64"), Ok(network("2001:db8::/64")));
        assert_eq!(parse_cidr("2001:db8::1:2/64"), Ok(network("2001:db8::/64")));
        assert_eq!(parse_cidr("[2001:db8::1]"), Ok(network("2001:db8::1/128")));
        assert_eq!(parse_cidr("[2001:db8::]/64"), Ok(network("2001:db8::/64")));
        assert_eq!(parse_cidr("::/0"), Ok(network("::/0")));
    }

    #[test]
    fn localhost_is_the_ipv4_loopback() {
        assert_eq!(parse_cidr("localhost"), Ok(network("127.0.0.1/32")));
        assert_eq!(parse_cidr("localhost/32"), Ok(network("127.0.0.1/32")));
        assert_eq!(parse_cidr("localhost/8"), Ok(network("127.0.0.0/8")));
        assert_eq!(parse_cidr("LocalHost"), Ok(network("127.0.0.1/32")));
    }

    #[test]
    fn v4_mapped_becomes_ipv4_when_the_prefix_covers_the_mapping() {
        assert_eq!(parse_cidr("::ffff:10.1.2.3"), Ok(network("10.1.2.3/32")));
        assert_eq!(
            parse_cidr("::ffff:10.1.2.3/120"),
            Ok(network("10.1.2.0/24"))
        );
        assert_eq!(parse_cidr("::ffff:10.1.2.3/96"), Ok(network("0.0.0.0/0")));
        assert_eq!(
            parse_cidr("[::ffff:10.1.2.3]/128"),
            Ok(network("10.1.2.3/32"))
        );
        assert_eq!(
            parse_cidr("::ffff:10.1.2.3/95"),
            Ok(network("::fffe:0:0/95"))
        );
        assert_eq!(parse_cidr("::ffff:10.1.2.3/64"), Ok(network("::/64")));
    }

    #[test]
    fn malformed_prefixes() {
        assert_eq!(
            bad_cidr_message("1.2.3.4/"),
            "bad cidr \"1.2.3.4/\": missing prefix length after '/'"
        );
        assert_eq!(
            bad_cidr_message("/"),
            "bad cidr \"/\": missing prefix length after '/'"
        );
        assert_eq!(
            bad_cidr_message("/024"),
            "bad cidr \"/024\": prefix length \"024\" has a leading zero"
        );
        assert_eq!(
            bad_cidr_message("/+24"),
            "bad cidr \"/+24\": prefix length \"+24\" is not a decimal number"
        );
        assert_eq!(
            bad_cidr_message("/2x"),
            "bad cidr \"/2x\": prefix length \"2x\" is not a decimal number"
        );
        assert_eq!(
            bad_cidr_message("10.0.0.0/8/8"),
            "bad cidr \"10.0.0.0/8/8\": prefix length \"8/8\" is not a decimal number"
        );
        assert_eq!(
            bad_cidr_message("/129"),
            "bad cidr \"/129\": prefix length 129 is out of range (0 to 128)"
        );
        assert_eq!(
            bad_cidr_message("/99999999999999999999"),
            "bad cidr \"/99999999999999999999\": prefix length 99999999999999999999 is out of range (0 to 128)"
        );
    }

    #[test]
    fn prefix_too_long_for_the_family() {
        assert_eq!(
            bad_cidr_message("1.2.3.4/33"),
            "bad cidr \"1.2.3.4/33\": prefix length 33 is out of range for IPv4 (0 to 32)"
        );
        assert_eq!(
            bad_cidr_message("localhost/64"),
            "bad cidr \"localhost/64\": prefix length 64 is out of range for IPv4 (0 to 32)"
        );
    }

    #[test]
    fn malformed_addresses() {
        assert_eq!(
            bad_cidr_message(""),
            "empty cidr: expected \"/N\", \"addr/mask\" or \"addr\""
        );
        assert_eq!(
            bad_cidr_message("1.2.3"),
            "bad cidr \"1.2.3\": \"1.2.3\" is not an IPv4 or IPv6 address"
        );
        assert_eq!(
            bad_cidr_message("01.2.3.4"),
            "bad cidr \"01.2.3.4\": \"01.2.3.4\" is not an IPv4 or IPv6 address"
        );
        assert_eq!(
            bad_cidr_message("1.2.3.256/8"),
            "bad cidr \"1.2.3.256/8\": \"1.2.3.256\" is not an IPv4 or IPv6 address"
        );
        assert_eq!(
            bad_cidr_message("example.com/24"),
            "bad cidr \"example.com/24\": \"example.com\" is not an IPv4 or IPv6 address"
        );
        assert_eq!(
            bad_cidr_message("fe80::1%eth0"),
            "bad cidr \"fe80::1%eth0\": \"fe80::1%eth0\" is not an IPv4 or IPv6 address"
        );
        assert_eq!(
            bad_cidr_message("[10.0.0.1]"),
            "bad cidr \"[10.0.0.1]\": \"10.0.0.1\" is not an IPv6 address"
        );
        assert_eq!(
            bad_cidr_message("[2001:db8::1/64"),
            "bad cidr \"[2001:db8::1/64\": '[' without a matching ']'"
        );
        assert_eq!(
            bad_cidr_message("[2001:db8::1]64"),
            "bad cidr \"[2001:db8::1]64\": unexpected \"64\" after ']'"
        );
        assert_eq!(
            bad_cidr_message("[2001:db8::1]]"),
            "bad cidr \"[2001:db8::1]]\": unexpected \"]\" after ']'"
        );
    }

    #[test]
    fn whitespace_is_never_trimmed() {
        for text in [
            " /24",
            "/24 ",
            "10.0.0.0 /8",
            "\t10.0.0.1",
            "10.0.0.1\n",
            "/2\u{0}4",
        ] {
            assert_eq!(
                bad_cidr_message(text),
                format!("bad cidr {text:?}: whitespace and control characters are not allowed")
            );
        }
    }

    #[test]
    fn resolve_client_is_a_host_route() {
        assert_eq!(
            CidrArg::Client.resolve(Some(ip("203.0.113.9"))),
            Ok("203.0.113.9/32".parse().unwrap())
        );
        assert_eq!(
            CidrArg::Client.resolve(Some(ip("2001:db8::9"))),
            Ok("2001:db8::9/128".parse().unwrap())
        );
        assert_eq!(
            CidrArg::Client.resolve(Some(ip("::ffff:203.0.113.9"))),
            Ok("203.0.113.9/32".parse().unwrap())
        );
    }

    #[test]
    fn resolve_client_prefix_masks_the_client() {
        assert_eq!(
            CidrArg::ClientPrefix(24).resolve(Some(ip("203.0.113.9"))),
            Ok("203.0.113.0/24".parse().unwrap())
        );
        assert_eq!(
            CidrArg::ClientPrefix(32).resolve(Some(ip("203.0.113.9"))),
            Ok("203.0.113.9/32".parse().unwrap())
        );
        assert_eq!(
            CidrArg::ClientPrefix(0).resolve(Some(ip("203.0.113.9"))),
            Ok("0.0.0.0/0".parse().unwrap())
        );
        assert_eq!(
            CidrArg::ClientPrefix(24).resolve(Some(ip("::ffff:203.0.113.9"))),
            Ok("203.0.113.0/24".parse().unwrap())
        );
        assert_eq!(
            CidrArg::ClientPrefix(48).resolve(Some(ip("2001:db8:1:2::9"))),
            Ok("2001:db8:1::/48".parse().unwrap())
        );
        assert_eq!(
            CidrArg::ClientPrefix(24).resolve(Some(ip("2001:db8:1:2::9"))),
            Ok("2001:d00::/24".parse().unwrap())
        );
    }

    #[test]
    fn resolve_client_prefix_longer_than_ipv4() {
        assert_eq!(
            CidrArg::ClientPrefix(33).resolve(Some(ip("203.0.113.9"))),
            Err(QueryError::new(
                ErrorCode::BadCidr,
                "prefix length /33 is out of range for the IPv4 client 203.0.113.9 (0 to 32)"
            ))
        );
        assert_eq!(
            CidrArg::ClientPrefix(120).resolve(Some(ip("::ffff:203.0.113.9"))),
            Err(QueryError::new(
                ErrorCode::BadCidr,
                "prefix length /120 is out of range for the IPv4 client 203.0.113.9 (0 to 32)"
            ))
        );
    }

    #[test]
    fn resolve_network_ignores_the_client() {
        let fixed = network("10.0.0.0/8");
        assert_eq!(fixed.resolve(None), Ok("10.0.0.0/8".parse().unwrap()));
        assert_eq!(
            fixed.resolve(Some(ip("192.0.2.1"))),
            Ok("10.0.0.0/8".parse().unwrap())
        );
    }

    #[test]
    fn resolve_without_client_is_no_client() {
        let expected = Err(QueryError::new(
            ErrorCode::NoClient,
            "no client address: prefix the request with @IP",
        ));
        assert_eq!(CidrArg::Client.resolve(None), expected);
        assert_eq!(CidrArg::ClientPrefix(24).resolve(None), expected);
    }
}
