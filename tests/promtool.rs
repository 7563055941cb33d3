//! The shipped Prometheus rules: `promtool check rules` and `promtool test rules` (alerts fire
//! when they should and not before). Runs where promtool is installed (Debian package
//! `prometheus`); `.ci/run` installs it and sets TIDEPOOL_REQUIRE_PROMETHEUS=1 so a missing
//! promtool fails CI instead of skipping.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool").arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var("TIDEPOOL_REQUIRE_PROMETHEUS").as_deref() != Ok("1"),
            "promtool is not installed but TIDEPOOL_REQUIRE_PROMETHEUS=1 (apt-get install -y prometheus)"
        );
        eprintln!("SKIPPED: promtool not on PATH (apt-get install -y prometheus to run this test)");
        return None;
    }
    Some("promtool")
}

fn run(args: &[&str]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/prometheus");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn rules_are_valid_and_their_unit_tests_pass() {
    if promtool().is_none() {
        return;
    }
    run(&["check", "rules", "rules.yml"]);
    run(&["test", "rules", "rules_test.yml"]);
}

#[test]
fn rules_use_only_exported_metrics() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/prometheus/rules.yml"),
    )
    .unwrap();
    let known: Vec<&str> = tidepool_runtime::metrics::ALL
        .iter()
        .map(|m| m.name)
        .collect();
    let mut checked = 0;
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
        // Recorded series are named tidepool:...; raw metrics tidepool_...
        if let Some(name) = word.strip_prefix("tidepool_").map(|_| word) {
            assert!(
                known.contains(&name),
                "rules.yml uses unknown metric {name}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} metric references found");
}
