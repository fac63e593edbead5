//! What the parser fuzz targets share (`netmanager/tests/parser_fuzz.rs`
//! and `nodeengine/tests/parser_fuzz.rs`, which includes this file by path):
//! the case budget, the memory cap, and the inputs a hostile or broken peer
//! could send -- random JSON shaped like the documents (their own keys, in
//! any case, with tricky values), valid fixtures mutated in their structure
//! and in their bytes, raw bytes, and a few hostile documents every target
//! gets (deep nesting, huge strings and lists).
//!
//! CI runs [`CI_CASES`] cases per target with a fixed seed (seconds);
//! `OAK_FUZZ_CASES=<n>` runs more and `OAK_FUZZ_SEED=<u64>` another
//! sequence (`cargo xtask test --full` runs 50,000 per target).

#![allow(dead_code)] // each test crate uses its own subset

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use serde_json::{Map, Value};

pub const CASES_ENV: &str = "OAK_FUZZ_CASES";
pub const SEED_ENV: &str = "OAK_FUZZ_SEED";
/// Cases per target in CI: a few seconds for a whole test file.
pub const CI_CASES: u32 = 2_000;
/// The stated cap: no fuzz target may need more than this. The targets of a
/// file share one process and run in parallel, so the process's peak RSS
/// bounds each of them.
pub const MEMORY_CAP_BYTES: u64 = 512 << 20;
/// The largest message NetManager's MQTT client accepts (NodeEngine's
/// takes 4 MiB; the hostile documents use this size for both).
pub const MQTT_MAX_PAYLOAD: usize = 1 << 20;
const DEFAULT_SEED: u64 = 0x0a4e_57a0_f022;

fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    let text = std::env::var(name).ok()?;
    match text.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={text:?} is not a number"),
    }
}

pub fn cases() -> u32 {
    env_number(CASES_ENV).unwrap_or(CI_CASES)
}

fn config() -> Config {
    Config {
        cases: cases(),
        rng_seed: RngSeed::Fixed(env_number(SEED_ENV).unwrap_or(DEFAULT_SEED)),
        // The seed reproduces a failure; no regression files in the tree.
        failure_persistence: None,
        ..Config::default()
    }
}

/// Peak resident set size of this process (getrusage's `ru_maxrss`, KiB).
pub fn peak_rss_bytes() -> u64 {
    // SAFETY: all-zero is a valid `rusage`; getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a pointer to a live, writable rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024
}

/// Runs `check` on the hostile documents, then on the generated cases;
/// fails on the first panic or failed check (shrunk to a small input), and
/// when the process went over [`MEMORY_CAP_BYTES`].
pub fn fuzz(
    target: &str,
    inputs: BoxedStrategy<Vec<u8>>,
    check: impl Fn(&[u8]) -> Result<(), TestCaseError>,
) {
    for (i, doc) in hostile_documents().iter().enumerate() {
        if let Err(e) = check(doc) {
            panic!("{target}: hostile document {i}: {e}");
        }
    }
    let mut runner = TestRunner::new(config());
    if let Err(e) = runner.run(&inputs, |input| check(&input)) {
        panic!("{target}: {e}");
    }
    let peak = peak_rss_bytes();
    eprintln!(
        "{target}: {} generated cases + {} hostile documents, process peak RSS {} MiB (cap {} MiB)",
        cases(),
        hostile_documents().len(),
        peak >> 20,
        MEMORY_CAP_BYTES >> 20
    );
    assert!(
        peak < MEMORY_CAP_BYTES,
        "{target}: peak RSS {peak} bytes is over the cap of {MEMORY_CAP_BYTES}"
    );
}

/// Documents no generator is likely to hit: nesting deeper than serde's
/// recursion limit, strings and lists as large as one MQTT message, a
/// number too large for every integer type, invalid UTF-8.
pub fn hostile_documents() -> Vec<Vec<u8>> {
    let deep = |open: &str, close: &str, n: usize| format!("{}{}", open.repeat(n), close.repeat(n));
    let big_list = format!(
        "{{\"instance_list\":[{}]}}",
        vec!["{\"instance_number\":1,\"namespace_ip\":\"10.18.0.2\",\"host_ip\":\"198.51.100.9\",\"host_port\":50103}"; 9000].join(",")
    );
    vec![
        Vec::new(),
        b"null".to_vec(),
        deep("[", "]", 100_000).into_bytes(),
        deep("{\"a\":", "}", 50_000).into_bytes(),
        format!("{{\"a\":\"{}\"}}", "x".repeat(MQTT_MAX_PAYLOAD)).into_bytes(),
        format!("[{}]", vec!["0"; MQTT_MAX_PAYLOAD / 2].join(",")).into_bytes(),
        big_list.into_bytes(),
        format!("{{\"a\":{}}}", "9".repeat(10_000)).into_bytes(),
        b"{\"a\":\"\xff\xfe\"}".to_vec(),
        b"{\"a\":1}{\"a\":2}".to_vec(),
    ]
}

/// Every object key of a document, so generated documents use the real ones.
pub fn keys_of(docs: &[&str]) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    out.push(k.clone());
                    walk(v, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for d in docs {
        walk(&serde_json::from_str(d).expect("fixture is JSON"), &mut out);
    }
    out.sort();
    out.dedup();
    out
}

/// Values a peer might send where a name, an address or a number belongs.
fn tricky_string() -> BoxedStrategy<String> {
    let known = [
        "",
        " ",
        "+",
        "#",
        "/",
        "a/b",
        "a.b.c.d",
        "a.+.c.d",
        "a.#",
        "..",
        "a.b.c.d.instance.0",
        "10.30.55.55",
        "10.18.0.66",
        "10.18.0.64",
        "10.16.0.0",
        "10.30.0.0",
        "127.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "198.51.100.2",
        "fdff::1",
        "fdff:2000::55:55",
        "fc00::42",
        "fc00::40",
        "::",
        "::ffff:10.18.0.2",
        "-1",
        "0",
        "1",
        "65535",
        "65536",
        "4294967296",
        "18446744073709551616",
        "1e400",
        "-0",
        "0x10",
        "NaN",
        "true",
        "null",
        "\u{0}",
        "a\u{0}b",
        "=",
        "=x",
        "RR",
        "Closest",
        "instance_ip",
        "docker",
        "unikernel",
        "crosvm",
        "8080:80",
        "0:80",
        "80:80/udp;80:80/udp",
        "70000:1",
        "a:b/c",
        ":::",
        "on",
        "off",
        "TRUE",
        "yes",
    ];
    prop_oneof![
        4 => prop::sample::select(known.to_vec()).prop_map(String::from),
        2 => address(),
        2 => prop::collection::vec(any::<char>(), 0..24).prop_map(String::from_iter),
        1 => (0..4096usize).prop_map(|n| "9".repeat(n)),
    ]
    .boxed()
}

/// An address inside or just outside the ranges the cluster uses
/// (namespace 10.16.0.0/12 and fc00::/7, service 10.30.0.0/16 and fdff::/16),
/// a special one, or any at all.
fn address() -> BoxedStrategy<String> {
    let special = [
        "127.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.1",
        "169.254.0.1",
        "8.8.8.8",
        "10.15.255.255",
        "10.32.0.0",
        "10.29.255.255",
        "10.31.0.0",
        "2001:db8::1",
        "::",
        "::1",
        "ff02::1",
        "fe80::1",
        "fbff::1",
        "fe00::1",
        "fdfe::1",
        "::ffff:10.30.0.1",
    ];
    prop_oneof![
        2 => (16u8..32, any::<u16>()).prop_map(|(b, r)| format!("10.{b}.{}.{}", r >> 8, r & 0xff)),
        2 => any::<u16>().prop_map(|r| format!("10.30.{}.{}", r >> 8, r & 0xff)),
        1 => any::<u16>().prop_map(|r| format!("fc00::{r:x}")),
        1 => any::<u16>().prop_map(|r| format!("fdff::{r:x}")),
        1 => any::<u32>().prop_map(|a| std::net::Ipv4Addr::from(a).to_string()),
        1 => any::<u128>().prop_map(|a| std::net::Ipv6Addr::from(a).to_string()),
        2 => prop::sample::select(special.to_vec()).prop_map(String::from),
    ]
    .boxed()
}

fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        (0u64..70_000).prop_map(Value::from),
    ]
    .boxed()
}

/// Random JSON whose object keys are mostly `keys` (as given, upper-cased or
/// lower-cased), so the parsers' fields get hostile values.
pub fn json(keys: Vec<String>) -> BoxedStrategy<Value> {
    let key = prop_oneof![
        6 => prop::sample::select(keys.clone()),
        1 => prop::sample::select(keys.clone()).prop_map(|k| k.to_ascii_uppercase()),
        1 => prop::sample::select(keys).prop_map(|k| k.to_ascii_lowercase()),
        1 => tricky_string(),
    ];
    leaf()
        .prop_recursive(5, 96, 10, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..10).prop_map(Value::Array),
                prop::collection::vec((key.clone(), inner), 0..10)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
            ]
        })
        .boxed()
}

/// A scalar: null, a boolean, a number or a string, tricky ones first.
fn leaf() -> BoxedStrategy<Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        2 => number(),
        4 => tricky_string().prop_map(Value::String),
    ]
    .boxed()
}

/// A change to one place of a document.
#[derive(Debug, Clone)]
enum Edit {
    Replace(Value),
    Remove,
    /// Repeat a list's first entry (or wrap the value in a list) so the
    /// list has this many entries: the "one huge message" case.
    Grow(usize),
    /// Replace the document's addresses (string leaves that parse as one)
    /// in turn with these; `None` keeps that one. Address checks are what
    /// a forged table gets past or not, and random edits rarely hit them.
    Readdress(Vec<Option<String>>),
}

/// Every address in `node` moved up by `by`.
fn shift_addresses(node: &mut Value, by: u32) {
    use std::net::IpAddr;
    match node {
        Value::String(s) => match s.trim().parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => {
                *s = std::net::Ipv4Addr::from(u32::from(a).wrapping_add(by)).to_string()
            }
            Ok(IpAddr::V6(a)) => {
                *s =
                    std::net::Ipv6Addr::from(u128::from(a).wrapping_add(u128::from(by))).to_string()
            }
            Err(_) => {}
        },
        Value::Array(a) => a.iter_mut().for_each(|v| shift_addresses(v, by)),
        Value::Object(m) => m.values_mut().for_each(|v| shift_addresses(v, by)),
        _ => {}
    }
}

fn readdress(node: &mut Value, with: &[Option<String>], next: &mut usize) {
    match node {
        Value::String(s) if s.trim().parse::<std::net::IpAddr>().is_ok() => {
            if let Some(Some(a)) = with.get(*next % with.len().max(1)) {
                *s = a.clone();
            }
            *next += 1;
        }
        Value::Array(a) => a.iter_mut().for_each(|v| readdress(v, with, next)),
        Value::Object(m) => m.values_mut().for_each(|v| readdress(v, with, next)),
        _ => {}
    }
}

/// Applies `edit` at the place `path` leads to: each step picks a member
/// of an object or array (modulo its length); the walk stops at a leaf.
fn apply(node: &mut Value, path: &[usize], edit: &Edit) {
    if let Edit::Readdress(with) = edit {
        return readdress(node, with, &mut 0);
    }
    if let Some((&step, rest)) = path.split_first() {
        match node {
            Value::Object(m) if !m.is_empty() => {
                let key = m.keys().nth(step % m.len()).cloned().unwrap_or_default();
                if rest.is_empty() && matches!(edit, Edit::Remove) {
                    m.remove(&key);
                } else if let Some(child) = m.get_mut(&key) {
                    apply(child, rest, edit);
                }
                return;
            }
            Value::Array(a) if !a.is_empty() => {
                let i = step % a.len();
                if rest.is_empty() && matches!(edit, Edit::Remove) {
                    a.remove(i);
                } else {
                    apply(&mut a[i], rest, edit);
                }
                return;
            }
            _ => {}
        }
    }
    match edit {
        Edit::Replace(v) => *node = v.clone(),
        Edit::Remove => *node = Value::Null,
        Edit::Readdress(_) => {}
        Edit::Grow(n) => {
            let entry = match &*node {
                Value::Array(a) => a.first().cloned().unwrap_or(Value::Null),
                other => other.clone(),
            };
            // Copies with their own addresses, or they would collapse into
            // one table entry each.
            *node = Value::Array(
                (0..*n)
                    .map(|i| {
                        let mut copy = entry.clone();
                        shift_addresses(&mut copy, i as u32);
                        copy
                    })
                    .collect(),
            );
        }
    }
}

fn edit(keys: Vec<String>) -> BoxedStrategy<Edit> {
    prop_oneof![
        // Mostly scalars: a field with a value of the wrong kind is
        // refused early; one of the right kind reaches the checks.
        4 => leaf().prop_map(Edit::Replace),
        2 => json(keys).prop_map(Edit::Replace),
        2 => Just(Edit::Remove),
        1 => (0..1000usize).prop_map(Edit::Grow),
        3 => prop::collection::vec(prop::option::of(address()), 1..12).prop_map(Edit::Readdress),
    ]
    .boxed()
}

/// A fixture with a few of its places replaced, removed or grown.
pub fn mutated(fixtures: Vec<&'static str>, keys: Vec<String>) -> BoxedStrategy<Value> {
    let edits = prop::collection::vec(
        (prop::collection::vec(any::<usize>(), 0..6), edit(keys)),
        1..5,
    );
    (prop::sample::select(fixtures), edits)
        .prop_map(|(fixture, edits)| {
            let mut doc: Value = serde_json::from_str(fixture).expect("fixture is JSON");
            let mut grown = false;
            for (path, e) in &edits {
                // One growth per document: two nested ones would multiply
                // into gigabytes, far beyond any message a daemon accepts.
                if matches!(e, Edit::Grow(_)) && std::mem::replace(&mut grown, true) {
                    continue;
                }
                apply(&mut doc, path, e);
            }
            doc
        })
        .boxed()
}

#[derive(Debug, Clone)]
enum ByteEdit {
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
}

/// A fixture's bytes flipped, cut and spliced: broken JSON, broken UTF-8.
pub fn byte_mutated(fixtures: Vec<&'static str>) -> BoxedStrategy<Vec<u8>> {
    let edit = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Set(i, b)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| ByteEdit::Insert(i, b)),
        (any::<usize>(), 1..64usize).prop_map(|(i, n)| ByteEdit::Delete(i, n)),
        any::<usize>().prop_map(ByteEdit::Truncate),
    ];
    (
        prop::sample::select(fixtures),
        prop::collection::vec(edit, 1..8),
    )
        .prop_map(|(fixture, edits)| {
            let mut bytes = fixture.as_bytes().to_vec();
            for e in edits {
                let len = bytes.len().max(1);
                match e {
                    ByteEdit::Set(i, b) => {
                        if let Some(x) = bytes.get_mut(i % len) {
                            *x = b;
                        }
                    }
                    ByteEdit::Insert(i, b) => {
                        let at = (i % len).min(bytes.len());
                        bytes.splice(at..at, b);
                    }
                    ByteEdit::Delete(i, n) => {
                        let at = (i % len).min(bytes.len());
                        let end = (at + n).min(bytes.len());
                        bytes.drain(at..end);
                    }
                    ByteEdit::Truncate(i) => bytes.truncate(i % len),
                }
            }
            bytes
        })
        .boxed()
}

/// Everything a target gets: fixtures mutated in structure and in bytes,
/// random documents with the fixtures' keys (and `extra_keys`), raw bytes.
pub fn payloads(fixtures: Vec<&'static str>, extra_keys: &[&str]) -> BoxedStrategy<Vec<u8>> {
    let mut keys = keys_of(&fixtures);
    keys.extend(extra_keys.iter().map(|k| k.to_string()));
    let to_bytes = |v: Value| serde_json::to_vec(&v).expect("a Value serialises");
    prop_oneof![
        4 => mutated(fixtures.clone(), keys.clone()).prop_map(to_bytes),
        3 => json(keys).prop_map(to_bytes),
        2 => byte_mutated(fixtures),
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ]
    .boxed()
}

/// A check's failure with the input shown (lossy UTF-8, first 300 bytes).
pub fn fail(what: impl std::fmt::Display, input: &[u8]) -> TestCaseError {
    TestCaseError::fail(format!(
        "{what}; input {:?}",
        String::from_utf8_lossy(&input[..input.len().min(300)])
    ))
}
