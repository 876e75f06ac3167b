//! Bounded, seeded fuzzing of what a worker reads from the wire: message
//! bodies ([`decode`]) and AMQP header tables (lapin's parser, then the
//! worker's header handling). Every input must give `Ok` or a typed error,
//! never a panic. A run is a fixed number of cases (stopping early after a
//! few seconds on a slow machine); the seed is printed on failure and can
//! be replayed with `OUTBOX_FUZZ_SEED=<seed>`.

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};

use super::headers::{copied_headers, delivery_count, encoded_size, has_header};
use super::message::{DecodeError, decode};
use crate::cloudevents::{EventRef, encode_body};

/// splitmix64: small, seeded, good enough to drive a fuzzer.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn seed() -> u64 {
    std::env::var("OUTBOX_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6f75_7462_6f78)
}

/// Runs `case` `cases` times (or until `budget` is spent), reporting the
/// seed and case number of a panic.
fn run(name: &str, cases: usize, budget: Duration, mut case: impl FnMut(&mut Rng, usize)) {
    let seed = seed();
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut done = 0;
    while done < cases && started.elapsed() < budget {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&mut rng, done)));
        assert!(
            outcome.is_ok(),
            "{name}: case {done} panicked; replay with OUTBOX_FUZZ_SEED={seed}"
        );
        done += 1;
    }
    eprintln!("{name}: {done} cases in {:?} (seed {seed})", started.elapsed());
    assert!(done >= cases.min(1000), "{name}: only {done} cases ran");
}

fn valid_body(rng: &mut Rng) -> Vec<u8> {
    let payloads = [
        r#"{"site_id":7,"domain":"a.example"}"#,
        "null",
        "[1,2,3]",
        r#""text""#,
        r#"{"nested":{"deeper":[{"x":1e308}]}}"#,
    ];
    let event_types = ["site.created", "backup.completed", "a.b"];
    let event_type = event_types[rng.below(event_types.len())];
    let payload_json = payloads[rng.below(payloads.len())];
    let event = EventRef {
        event_id: uuid::Uuid::now_v7(),
        event_type,
        aggregate_type: "site",
        aggregate_id: "7",
        tenant_id: if rng.chance(2) { Some("3") } else { None },
        occurred_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
        actor: Some("user:1"),
        correlation_id: None,
        causation_id: Some("c"),
        traceparent: None,
        schema_version: 1,
        payload_json,
    };
    encode_body(&event, "/fuzz").unwrap_or_default()
}

const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    "\\",
    "\\u0000",
    "\\ud800",
    "null",
    "true",
    "-0",
    "1e999",
    "-1",
    "9223372036854775808",
    "\"specversion\"",
    "\"1.0\"",
    "\"id\"",
    "\"type\"",
    "\"source\"",
    "\"subject\"",
    "\"time\"",
    "\"data\"",
    "\"schemaversion\"",
    "\"aggregatetype\"",
    "\"2024-01-01T00:00:00Z\"",
    "\"01890000-0000-7000-8000-000000000000\"",
    "\"site.created\"",
    " ",
    "\u{ff}",
    "\u{10ffff}",
];

fn mutated(rng: &mut Rng, mut body: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(8) {
        if body.is_empty() {
            body.push(b'{');
        }
        let at = rng.below(body.len());
        match rng.below(6) {
            0 => body[at] = rng.next() as u8,
            1 => {
                body.truncate(at);
            }
            2 => {
                let token = rng.pick(TOKENS).as_bytes().to_vec();
                body.splice(at..at, token);
            }
            3 => {
                let end = (at + rng.below(32)).min(body.len());
                body.drain(at..end);
            }
            4 => {
                let end = (at + rng.below(64)).min(body.len());
                let copy = body[at..end].to_vec();
                body.splice(at..at, copy);
            }
            _ => {
                let depth = rng.below(300);
                let open = if rng.chance(2) { "[" } else { "{\"k\":" };
                body.splice(at..at, open.repeat(depth).into_bytes());
            }
        }
    }
    body
}

fn token_soup(rng: &mut Rng) -> Vec<u8> {
    let mut body = Vec::new();
    for _ in 0..rng.below(64) {
        body.extend_from_slice(rng.pick(TOKENS).as_bytes());
    }
    body
}

fn check_decoded(body: &[u8]) {
    match decode(body) {
        Ok(event) => {
            assert!(crate::envelope::is_valid_event_type(&event.event_type));
            assert!(!event.aggregate_id.is_empty() && event.aggregate_id.len() <= 255);
            assert!(event.schema_version >= 1);
            // The payload text must itself be JSON a listener can read.
            let _ = event.data_value();
        }
        Err(error) => {
            let text = error.to_string();
            assert!(!text.is_empty());
            if !matches!(error, DecodeError::Json(_)) {
                assert!(text.len() < 1024, "bounded error: {}", text.len());
            }
        }
    }
}

#[test]
fn fuzz_decode_never_panics() {
    run("decode", 30_000, Duration::from_secs(4), |rng, _| {
        let body = match rng.below(4) {
            0 => {
                let len = rng.below(300);
                rng.bytes(len)
            }
            1 => token_soup(rng),
            _ => {
                let body = valid_body(rng);
                mutated(rng, body)
            }
        };
        check_decoded(&body);
    });
}

fn random_value(rng: &mut Rng, depth: usize) -> AMQPValue {
    let kinds = if depth == 0 { 14 } else { 16 };
    match rng.below(kinds) {
        0 => AMQPValue::Boolean(rng.chance(2)),
        1 => AMQPValue::ShortShortInt(rng.next() as i8),
        2 => AMQPValue::ShortShortUInt(rng.next() as u8),
        3 => AMQPValue::ShortInt(rng.next() as i16),
        4 => AMQPValue::ShortUInt(rng.next() as u16),
        5 => AMQPValue::LongInt(*rng.pick(&[i32::MIN, -1, 0, 1, 1000, 1001, i32::MAX])),
        6 => AMQPValue::LongUInt(*rng.pick(&[0, 5, 1000, u32::MAX])),
        7 => AMQPValue::LongLongInt(*rng.pick(&[i64::MIN, -1, 0, 3, i64::MAX])),
        8 => AMQPValue::Float(f32::from_bits(rng.next() as u32)),
        9 => AMQPValue::Double(f64::from_bits(rng.next())),
        10 => AMQPValue::DecimalValue(DecimalValue {
            scale: rng.next() as u8,
            value: rng.next() as u32,
        }),
        11 => {
            let len = if rng.chance(50) { 70_000 } else { rng.below(40) };
            AMQPValue::LongString(LongString::from(rng.bytes(len)))
        }
        12 => {
            let len = rng.below(40);
            AMQPValue::ByteArray(ByteArray::from(rng.bytes(len)))
        }
        13 => AMQPValue::Timestamp(rng.next()),
        14 => AMQPValue::FieldArray(FieldArray::from(
            (0..rng.below(5))
                .map(|_| random_value(rng, depth - 1))
                .collect::<Vec<_>>(),
        )),
        _ => AMQPValue::FieldTable(random_table(rng, depth - 1)),
    }
}

fn random_table(rng: &mut Rng, depth: usize) -> FieldTable {
    let mut table = FieldTable::default();
    let keys = [
        "x-delivery-count",
        "x-outbox-retry",
        "x-outbox-failed-job",
        "x-death",
        "aggregate_id",
        "traceparent",
        "",
        "k",
    ];
    for _ in 0..rng.below(8) {
        let key = if rng.chance(2) {
            (*rng.pick(&keys)).to_owned()
        } else {
            format!("x-{}", rng.next() % 1000)
        };
        let value = random_value(rng, depth);
        table.insert(key.into(), value);
    }
    table
}

fn wire(table: &FieldTable) -> Vec<u8> {
    use lapin::types::generation::gen_field_table;
    cookie_factory::gen_simple(gen_field_table(table), Vec::new()).unwrap_or_default()
}

fn check_headers(table: FieldTable) {
    let properties = BasicProperties::default().with_headers(table);
    assert!(delivery_count(&properties) <= 1000);
    let _ = has_header(&properties, "x-outbox-retry");
    let copy = copied_headers(&properties);
    let size = encoded_size(&AMQPValue::FieldTable(copy)) - 5;
    assert!(size <= 64 * 1024 + 32, "copied headers bounded: {size}");
}

#[test]
fn fuzz_header_tables_never_panic() {
    use lapin::types::parsing::parse_field_table;
    run("headers", 5_000, Duration::from_secs(4), |rng, _| {
        let table = random_table(rng, 4);
        let bytes = wire(&table);
        // The worker's size estimate is exact for what lapin sends.
        assert_eq!(
            encoded_size(&AMQPValue::FieldTable(table.clone())),
            bytes.len() + 1
        );
        match parse_field_table(bytes.as_slice()) {
            Ok((rest, parsed)) => {
                assert!(rest.is_empty());
                check_headers(parsed);
            }
            Err(error) => panic!("lapin cannot read back what it wrote: {error:?}"),
        }
        // Corrupted wire bytes: lapin's parser gives a table or an error;
        // whatever table comes out, the worker copes with it.
        let mut corrupt = bytes;
        for _ in 0..1 + rng.below(4) {
            if corrupt.is_empty() {
                break;
            }
            let at = rng.below(corrupt.len());
            match rng.below(3) {
                0 => corrupt[at] = rng.next() as u8,
                1 => corrupt.truncate(at),
                _ => corrupt.insert(at, rng.next() as u8),
            }
        }
        if let Ok((_, parsed)) = parse_field_table(corrupt.as_slice()) {
            check_headers(parsed);
        }
        check_headers(table);
    });
}
