//! `outbox bench` at a tiny size, so the tool cannot rot. Only that each
//! scenario completes and reports sane numbers is checked, never a speed.

use crate::support::run_bench;

fn bench_json(args: &[&str]) -> serde_json::Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let (status, stdout, stderr) = run_bench(&full);
    assert_eq!(status, 0, "outbox-bench {full:?} failed:\n{stderr}");
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
    positive(&latency, "raw_p50_ms");
    let p99 = positive(&latency, "p99_ms");
    let max = positive(&latency, "max_ms");
    assert!(p50 <= p99 && p99 <= max, "{latency}");

    let write = bench_json(&["write", "--writers", "2", "--duration", "1s", "--rounds", "1"]);
    positive(&write, "plain_tps");
    positive(&write, "outbox_tps");
    positive(&write, "ratio");
}

fn finite(value: &serde_json::Value, field: &str) -> f64 {
    let number = value[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing in {value}"));
    assert!(number.is_finite(), "{field} = {number} in {value}");
    number
}

fn sane_rss(mib: &serde_json::Value) {
    assert!(mib.as_f64().is_some_and(|m| m > 1.0 && m < 1024.0), "RSS {mib}");
}

fn check_consume(consume: &serde_json::Value, listeners: usize) {
    let rows = consume["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), listeners, "{consume}");
    for row in rows {
        positive(row, "raw_per_second");
        positive(row, "worker_per_second");
        positive(row, "ratio");
        sane_rss(&row["worker_peak_rss_mib"]);
    }
}

fn check_seed(seed: &serde_json::Value) {
    let rows = seed["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 5, "{seed}");
    // Dispatch overhead is a difference of medians: finite, of any sign at
    // a tiny size. Memory growth may be zero.
    finite(&rows[0], "ours");
    positive(&rows[1], "ours");
    positive(&rows[2], "ours");
    positive(&rows[3], "ours");
    assert!(finite(&rows[4], "ours") >= 0.0, "{seed}");
    for row in rows {
        positive(row, "seed");
        positive(row, "target");
        assert!(row["met"].is_boolean(), "{row}");
    }
    sane_rss(&seed["relay_peak_rss_mib"]);
}

#[test]
fn consume_seed_and_all_with_plots_complete_at_a_tiny_size() {
    let consume = bench_json(&[
        "consume",
        "--messages",
        "30",
        "--listeners",
        "noop,record-audit-log",
    ]);
    check_consume(&consume, 2);

    let seed = bench_json(&[
        "seed",
        "--creates",
        "10",
        "--lifecycles",
        "3",
        "--burst",
        "10",
        "--events",
        "20",
    ]);
    check_seed(&seed);

    let dir = std::env::temp_dir().join(format!("outbox-bench-plots-{}", std::process::id()));
    let dir_arg = dir.to_str().expect("a UTF-8 temp dir");
    let all = bench_json(&["all", "--quick", "--plot", dir_arg]);
    positive(&all["write"], "ratio");
    positive(&all["drain"], "raw_events_per_second");
    positive(&all["drain"]["runs"][0], "events_per_second");
    positive(&all["latency"], "p50_ms");
    check_consume(&all["consume"], 3);
    check_seed(&all["seed"]);
    for chart in ["latency.svg", "drain.svg"] {
        let svg = std::fs::read_to_string(dir.join(chart)).unwrap_or_else(|e| panic!("{chart}: {e}"));
        assert!(svg.starts_with("<svg") && svg.len() > 1000, "{chart}: {svg}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_rejects_bad_sizes() {
    let (status, _, stderr) = run_bench(&["drain", "--events", "0"]);
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("--events"), "{stderr}");
    let (status, _, stderr) = run_bench(&["write", "--duration", "soon"]);
    assert_eq!(status, 2, "{stderr}");
    let (status, _, stderr) = run_bench(&["consume", "--messages", "1"]);
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("--messages"), "{stderr}");
    let (status, _, stderr) = run_bench(&["seed", "--creates", "0"]);
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("--creates"), "{stderr}");
}
