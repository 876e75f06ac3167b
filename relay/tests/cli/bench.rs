//! `outbox bench` at a tiny size, so the tool cannot rot. Only that each
//! scenario completes and reports sane numbers is checked, never a speed.

use crate::support::run_outbox;

fn bench_json(args: &[&str]) -> serde_json::Value {
    let mut full = vec!["bench", "--json"];
    full.extend_from_slice(args);
    let (status, stdout, stderr) = run_outbox(&full, &[]);
    assert_eq!(status, 0, "outbox {full:?} failed:\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{full:?}: not JSON ({e}):\n{stdout}"))
}

fn positive(value: &serde_json::Value, field: &str) -> f64 {
    let number = value[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing in {value}"));
    assert!(
        number.is_finite() && number > 0.0,
        "{field} = {number} in {value}"
    );
    number
}

#[test]
fn drain_latency_and_write_complete_at_a_tiny_size() {
    let drain = bench_json(&["drain", "--events", "300", "--aggregates", "10", "--relays", "1"]);
    positive(&drain, "raw_events_per_second");
    let run = &drain["runs"][0];
    assert_eq!(run["relays"], 1);
    positive(run, "events_per_second");
    positive(run, "ratio_to_raw");
    assert!(
        run["peak_rss_mib"][0]
            .as_f64()
            .is_some_and(|m| m > 1.0 && m < 1024.0),
        "{run}"
    );

    let latency = bench_json(&["latency", "--rate", "200", "--duration", "2s", "--warmup", "0s"]);
    assert_eq!(latency["events"], 400);
    let p50 = positive(&latency, "p50_ms");
    let p99 = positive(&latency, "p99_ms");
    let max = positive(&latency, "max_ms");
    assert!(p50 <= p99 && p99 <= max, "{latency}");

    let write = bench_json(&["write", "--writers", "2", "--duration", "1s", "--rounds", "1"]);
    positive(&write, "plain_tps");
    positive(&write, "outbox_tps");
    positive(&write, "ratio");
}

#[test]
fn bench_rejects_bad_sizes() {
    let (status, _, stderr) = run_outbox(&["bench", "drain", "--events", "0"], &[]);
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("--events"), "{stderr}");
    let (status, _, stderr) = run_outbox(&["bench", "write", "--duration", "soon"], &[]);
    assert_eq!(status, 2, "{stderr}");
}
