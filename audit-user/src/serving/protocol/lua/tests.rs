//! Tests of the literal reader: strings, numbers, tables, string lists, and its bounds.

use super::*;

fn value(text: &str) -> Value {
    parse_value(text).unwrap_or_else(|error| panic!("{text:?}: {error}"))
}

fn syntax_message(text: &str) -> String {
    let error = parse_value(text).expect_err("should be rejected");
    assert_eq!(error.code, ErrorCode::Syntax, "{text:?}");
    error.message
}

fn str_value(text: &str) -> Value {
    Value::Str(text.to_owned())
}

#[test]
fn keywords() {
    assert_eq!(value("nil"), Value::Nil);
    assert_eq!(value("true"), Value::Bool(true));
    assert_eq!(value("false"), Value::Bool(false));
    assert_eq!(value("  nil  "), Value::Nil);
    assert_eq!(syntax_message("nothing"), "expected value at byte 0");
    assert_eq!(syntax_message("nil2"), "expected value at byte 0");
}

#[test]
fn strings_in_either_quote() {
    assert_eq!(value("\"/24\""), str_value("/24"));
    assert_eq!(value("'/24'"), str_value("/24"));
    assert_eq!(value("\"it's\""), str_value("it's"));
    assert_eq!(value("'say \"hi\"'"), str_value("say \"hi\""));
    assert_eq!(value("\"\""), str_value(""));
    assert_eq!(value("\"héllo\""), str_value("héllo"));
}

#[test]
fn string_escapes() {
    assert_eq!(
        value(r#""\\ \" \' \n \t \r \a \b \f \v""#),
        str_value("\\ \" ' \n \t \r \u{7} \u{8} \u{c} \u{b}")
    );
    assert_eq!(value(r#""a\0b""#), str_value("a\0b"));
    assert_eq!(value(r#""\65\066\0671""#), str_value("ABC1"));
    assert_eq!(value(r#""\195\169""#), str_value("é"));
    assert_eq!(value(r#""\x41\x6a\x4A""#), str_value("AjJ"));
    assert_eq!(value(r#""\xc3\xa9""#), str_value("é"));
    assert_eq!(value("\"a\\z   \t b\""), str_value("ab"));
}

#[test]
fn bad_escapes() {
    assert_eq!(syntax_message(r#""\q""#), "unknown escape '\\q' at byte 1");
    assert_eq!(
        syntax_message(r#""ab\é""#),
        "unknown escape '\\é' at byte 3"
    );
    assert_eq!(
        syntax_message(r#""\256""#),
        "decimal escape \\256 is larger than 255 at byte 1"
    );
    assert_eq!(
        syntax_message(r#""\x4""#),
        "expected two hexadecimal digits after '\\x' at byte 3"
    );
    assert_eq!(
        syntax_message(r#""\xg1""#),
        "expected two hexadecimal digits after '\\x' at byte 3"
    );
    assert_eq!(
        syntax_message(r#""\xff""#),
        "string starting at byte 0 is not valid UTF-8 after its escapes"
    );
}

#[test]
fn unterminated_strings() {
    assert_eq!(
        syntax_message("\"abc"),
        "unterminated string starting at byte 0"
    );
    assert_eq!(
        syntax_message("  'abc\""),
        "unterminated string starting at byte 2"
    );
    assert_eq!(
        syntax_message("\"abc\\"),
        "unterminated string starting at byte 0"
    );
    assert_eq!(
        syntax_message("\"abc\\\""),
        "unterminated string starting at byte 0"
    );
    assert_eq!(
        syntax_message("\"ab\ncd\""),
        "unterminated string starting at byte 0"
    );
}

#[test]
fn integers() {
    assert_eq!(value("0"), Value::Integer(0));
    assert_eq!(value("42"), Value::Integer(42));
    assert_eq!(value("007"), Value::Integer(7));
    assert_eq!(value("-17"), Value::Integer(-17));
    assert_eq!(value("0x1F"), Value::Integer(31));
    assert_eq!(value("0Xff"), Value::Integer(255));
    assert_eq!(value("-0x10"), Value::Integer(-16));
    assert_eq!(value("9223372036854775807"), Value::Integer(i64::MAX));
    assert_eq!(value("-9223372036854775808"), Value::Integer(i64::MIN));
    assert_eq!(value("0x7fffffffffffffff"), Value::Integer(i64::MAX));
}

#[test]
fn integers_out_of_range() {
    for text in [
        "99999999999999999999",
        "9223372036854775808",
        "-9223372036854775809",
        "0x8000000000000000",
        "0xffffffffffffffffff",
        "-99999999999999999999999999999999999999999999",
    ] {
        assert_eq!(
            syntax_message(text),
            "number out of range at byte 0",
            "{text}"
        );
    }
}

#[test]
fn floats_are_rejected() {
    for text in [
        "1.5", "1.", "-2.5", "1e5", "1E5", "1e+5", "1e-5", "0x1p4", "0x1.8", ".5",
    ] {
        assert_eq!(
            syntax_message(text),
            "only integers are supported at byte 0",
            "{text}"
        );
    }
}

#[test]
fn malformed_numbers() {
    assert_eq!(
        syntax_message("12abc"),
        "malformed number '12abc' at byte 0"
    );
    assert_eq!(syntax_message("0x"), "malformed number '0x' at byte 0");
    assert_eq!(syntax_message("0xg"), "malformed number '0xg' at byte 0");
    assert_eq!(
        syntax_message("1.2.3"),
        "malformed number '1.2.3' at byte 0"
    );
    assert_eq!(syntax_message("-"), "expected digit after '-' at byte 1");
    assert_eq!(syntax_message("- 5"), "expected digit after '-' at byte 1");
    assert_eq!(syntax_message("--5"), "expected digit after '-' at byte 1");
}

#[test]
fn tables() {
    assert_eq!(value("{}"), Value::Table(vec![]));
    assert_eq!(
        value(r#"{ a = 1, ["b"] = "x", "positional", }"#),
        Value::Table(vec![
            (Some(TableKey::Name("a".into())), Value::Integer(1)),
            (Some(TableKey::Value(str_value("b"))), str_value("x")),
            (None, str_value("positional")),
        ])
    );
    assert_eq!(
        value("{1; 2, nil; [3]=true;}"),
        Value::Table(vec![
            (None, Value::Integer(1)),
            (None, Value::Integer(2)),
            (None, Value::Nil),
            (Some(TableKey::Value(Value::Integer(3))), Value::Bool(true)),
        ])
    );
    assert_eq!(
        value("{cidr='/24',cluster=true,inner={x={}}}"),
        Value::Table(vec![
            (Some(TableKey::Name("cidr".into())), str_value("/24")),
            (Some(TableKey::Name("cluster".into())), Value::Bool(true)),
            (
                Some(TableKey::Name("inner".into())),
                Value::Table(vec![(
                    Some(TableKey::Name("x".into())),
                    Value::Table(vec![])
                )])
            ),
        ])
    );
    assert_eq!(
        value("{ true, false }"),
        Value::Table(vec![(None, Value::Bool(true)), (None, Value::Bool(false))])
    );
}

#[test]
fn malformed_tables() {
    assert_eq!(syntax_message("{"), "expected '}' at byte 1");
    assert_eq!(syntax_message("{1"), "expected ',', ';' or '}' at byte 2");
    assert_eq!(
        syntax_message("{1 2}"),
        "expected ',', ';' or '}' at byte 3"
    );
    assert_eq!(syntax_message("{,}"), "expected value at byte 1");
    assert_eq!(syntax_message("{1,,}"), "expected value at byte 3");
    assert_eq!(syntax_message("{a}"), "expected value at byte 1");
    assert_eq!(syntax_message("{a = }"), "expected value at byte 5");
    assert_eq!(syntax_message("{[1 = 2}"), "expected ']' at byte 4");
    assert_eq!(syntax_message("{[1] 2}"), "expected '=' at byte 5");
    assert_eq!(
        syntax_message("{end = 1}"),
        "'end' is a reserved word and cannot name a field at byte 1"
    );
    assert_eq!(
        syntax_message("{ false = 1 }"),
        "'false' is a reserved word and cannot name a field at byte 2"
    );
    // Inside a table '[' opens a key, never a string list.
    assert_eq!(syntax_message("{[\"a\"]}"), "expected '=' at byte 6");
}

#[test]
fn string_lists() {
    assert_eq!(value("[\"/24\"]"), Value::List(vec![str_value("/24")]));
    assert_eq!(
        value("[ \"a\" , 'b',\"c\" ]"),
        Value::List(vec![str_value("a"), str_value("b"), str_value("c")])
    );
    assert_eq!(syntax_message("[]"), "expected string at byte 1");
    assert_eq!(syntax_message("[\"a\",]"), "expected string at byte 5");
    assert_eq!(syntax_message("[1]"), "expected string at byte 1");
    assert_eq!(
        syntax_message("[\"a\" \"b\"]"),
        "expected ',' or ']' at byte 5"
    );
    assert_eq!(syntax_message("[\"a\""), "expected ',' or ']' at byte 4");
}

#[test]
fn nesting_limit() {
    let deepest_allowed = format!(
        "{}{}",
        "{".repeat(MAX_NESTING_DEPTH),
        "}".repeat(MAX_NESTING_DEPTH)
    );
    assert!(matches!(value(&deepest_allowed), Value::Table(_)));
    let too_deep = format!(
        "{}{}",
        "{".repeat(MAX_NESTING_DEPTH + 1),
        "}".repeat(MAX_NESTING_DEPTH + 1)
    );
    assert_eq!(
        syntax_message(&too_deep),
        "nesting deeper than 32 at byte 32"
    );
    let list_too_deep = format!("{}a=[\"a\"]", "{".repeat(MAX_NESTING_DEPTH));
    assert_eq!(
        syntax_message(&list_too_deep),
        "nesting deeper than 32 at byte 34"
    );
    let key_too_deep = format!("{}[{{}}]=1}}", "{".repeat(MAX_NESTING_DEPTH));
    assert_eq!(
        syntax_message(&key_too_deep),
        "nesting deeper than 32 at byte 33"
    );
}

#[test]
fn a_flood_of_braces_does_not_overflow_the_stack() {
    assert_eq!(
        syntax_message(&"{".repeat(100_000)),
        "nesting deeper than 32 at byte 32"
    );
    assert_eq!(
        syntax_message(&"{[".repeat(100_000)),
        "nesting deeper than 32 at byte 64"
    );
}

#[test]
fn trailing_garbage() {
    assert_eq!(syntax_message("1 2"), "expected end of value at byte 2");
    assert_eq!(syntax_message(""), "expected value at byte 0");
    assert_eq!(syntax_message(")"), "expected value at byte 0");
}

#[test]
fn reader_cursor_operations() {
    let mut reader = Reader::new("  msys.audit (x)");
    reader.skip_whitespace();
    assert_eq!(reader.position(), 2);
    assert_eq!(reader.read_identifier(), Some("msys"));
    assert_eq!(reader.read_identifier(), None);
    assert!(reader.eat_byte(b'.'));
    assert!(!reader.eat_byte(b'.'));
    assert_eq!(reader.read_identifier(), Some("audit"));
    assert_eq!(
        reader.expect_byte(b'('),
        Err(syntax_error("expected '(' at byte 12"))
    );
    reader.skip_whitespace();
    assert_eq!(reader.peek_byte(), Some(b'('));
    assert_eq!(reader.expect_byte(b'('), Ok(()));
    assert_eq!(reader.take_until_whitespace(), "x)");
    assert!(reader.is_at_end());
    assert_eq!(reader.peek_byte(), None);

    let mut reader = Reader::new("@10.0.0.1\tfoo");
    assert!(reader.eat_byte(b'@'));
    assert_eq!(reader.take_until_whitespace(), "10.0.0.1");
    assert_eq!(reader.take_while(|byte| byte == b'\t'), "\t");
    assert_eq!(reader.take_while(|byte| byte == b'f'), "f");
    assert_eq!(reader.expected("x"), syntax_error("expected x at byte 11"));
}

#[test]
fn type_names() {
    let names: Vec<&str> = [
        Value::Nil,
        Value::Bool(true),
        Value::Integer(1),
        str_value("a"),
        Value::Table(vec![]),
        Value::List(vec![]),
    ]
    .iter()
    .map(Value::type_name)
    .collect();
    assert_eq!(
        names,
        [
            "nil",
            "boolean",
            "integer",
            "string",
            "table",
            "string list"
        ]
    );
}
