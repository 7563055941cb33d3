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

/// GitHub's anchor for a Markdown heading: lower case, spaces to `-`, punctuation other than
/// `-` and `_` dropped; a repeated heading gets `-1`, `-2`, ...
fn github_anchors(markdown: &str) -> std::collections::HashSet<String> {
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    let mut out = std::collections::HashSet::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        let Some(text) = line.strip_prefix('#').map(|t| t.trim_start_matches('#')) else {
            continue;
        };
        if fenced || !text.starts_with(' ') {
            continue;
        }
        let slug: String = text
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

#[test]
fn github_anchor_rules() {
    let a = github_anchors("# Operating Tidepool\n## Runbooks\n### `TidepoolNodeDown`\n## Runbooks\n```\n# not a heading\n```\n");
    for want in [
        "operating-tidepool",
        "runbooks",
        "tidepoolnodedown",
        "runbooks-1",
    ] {
        assert!(a.contains(want), "{want}: {a:?}");
    }
    assert!(!a.contains("not-a-heading"));
}

/// Every alert has a severity (critical or warning) and a runbook_url whose anchor is a
/// heading of README.md.
#[test]
fn every_alert_has_a_severity_and_a_runbook_in_the_readme() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rules: serde_json::Value = serde_norway::from_str(
        &std::fs::read_to_string(root.join("config/prometheus/rules.yml")).unwrap(),
    )
    .unwrap();
    let anchors = github_anchors(&std::fs::read_to_string(root.join("README.md")).unwrap());
    let mut alerts = 0;
    let mut problems = Vec::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let Some(name) = rule["alert"].as_str() else {
                continue;
            };
            alerts += 1;
            let severity = rule["labels"]["severity"].as_str().unwrap_or("");
            if !["critical", "warning"].contains(&severity) {
                problems.push(format!("{name}: severity {severity:?}"));
            }
            let url = rule["annotations"]["runbook_url"].as_str().unwrap_or("");
            match url.split_once("README.md#") {
                Some((base, anchor))
                    if base == "https://github.com/tidepool-rs/tidepool/blob/main/"
                        && anchors.contains(anchor) => {}
                _ => problems.push(format!(
                    "{name}: runbook_url {url:?} is not a heading of README.md"
                )),
            }
        }
    }
    assert!(alerts >= 8, "only {alerts} alerts");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
