//! The operators' alert rules and dashboard (deploy/): promtool checks the
//! rules and the scrape config and runs the rules' unit tests, and every
//! `outbox_*` series they read is one `src/metrics.rs` names, so renaming a
//! metric cannot leave an alert silently watching nothing. promtool comes
//! with the Debian package `prometheus` (.ci/run installs it).

use std::path::Path;
use std::process::Command;

const RULES: &str = "deploy/prometheus/outbox-alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/outbox-alerts.test.yml";
const CONFIG: &str = "deploy/prometheus/prometheus.yml";
const DASHBOARD: &str = "deploy/grafana/outbox-dashboard.json";

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("cannot read {}: {e}", full.display()))
}

fn promtool(args: &[&str]) {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run promtool (apt-get install prometheus): {e}"));
    assert!(
        output.status.success(),
        "promtool {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn promtool_accepts_the_rules_and_config_and_passes_the_rule_tests() {
    promtool(&["check", "rules", RULES]);
    promtool(&["test", "rules", RULE_TESTS]);
    promtool(&["check", "config", CONFIG]);
}

/// The `outbox_` names in `text` (table names too: callers pass only
/// PromQL).
fn outbox_names(text: &str) -> Vec<String> {
    text.match_indices("outbox_")
        .map(|(at, _)| {
            let rest = &text[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(rest.len());
            rest[..end].to_owned()
        })
        .collect()
}

#[test]
fn alerts_and_dashboard_read_only_exported_metrics_and_every_alert_is_tested() {
    let exported: Vec<String> = read("src/metrics.rs")
        .lines()
        .filter_map(|line| line.split_once(": &str = \"")?.1.split_once('"'))
        .map(|(name, _)| name.to_owned())
        .collect();
    assert!(exported.len() > 20, "{exported:?}");
    // PromQL only: a rule's `expr` runs to its `for:`; the dashboard has
    // one `"expr"` per line.
    let rules = read(RULES);
    let mut promql = String::new();
    let mut in_expr = false;
    for line in rules.lines().map(str::trim) {
        in_expr = line.starts_with("expr:") || (in_expr && !line.starts_with("for:"));
        if in_expr {
            promql.push_str(line);
            promql.push('\n');
        }
    }
    let dashboard = read(DASHBOARD);
    promql.extend(dashboard.lines().filter(|l| l.trim().starts_with("\"expr\":")));
    let known = |name: &str| {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        exported.iter().any(|e| e == name || e == base)
    };
    let unknown: Vec<String> = outbox_names(&promql).into_iter().filter(|n| !known(n)).collect();
    assert!(unknown.is_empty(), "not exported by src/metrics.rs: {unknown:?}");

    let tests = read(RULE_TESTS);
    for line in rules.lines().map(str::trim) {
        if let Some(alert) = line.strip_prefix("- alert:") {
            let cases = tests.matches(&format!("alertname: {}\n", alert.trim())).count();
            assert!(
                cases >= 2,
                "{} needs a firing and a silent case in {RULE_TESTS}",
                alert.trim()
            );
        }
    }
}
