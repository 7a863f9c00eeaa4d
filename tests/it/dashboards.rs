//! The Grafana dashboards and Prometheus alert rules in `dashboards/`: `dashboards/check.sh` runs
//! `promtool check rules`, `promtool test rules` (every alert firing and not firing), checks
//! every dashboard's JSON model, and evaluates every PromQL expression of the dashboards on a
//! throwaway real Prometheus (Debian's `prometheus` package, installed by scripts/setup.sh).

use std::process::{Command, Stdio};

#[test]
fn the_alert_rules_pass_promtool_and_every_dashboard_expression_evaluates_on_prometheus() {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("bash")
        .arg(format!("{root}/dashboards/check.sh"))
        .current_dir(root)
        .stdin(Stdio::null())
        .output()
        .expect("bash runs dashboards/check.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    assert!(text.contains("ok: dashboards/ checks passed"), "{text}");
}
