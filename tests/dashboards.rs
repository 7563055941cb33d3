//! Every metric a shipped dashboard queries exists in the metric table (so a rename cannot
//! silently blank a panel), and every dashboard is valid JSON with the Grafana fields we rely on.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;

use tidepool_runtime::metrics::{MetricKind, ALL};

#[test]
fn dashboards_query_only_metrics_that_exist() {
    let known: HashSet<String> = ALL
        .iter()
        .flat_map(|m| match m.kind {
            MetricKind::Histogram => vec![
                format!("{}_bucket", m.name),
                format!("{}_sum", m.name),
                format!("{}_count", m.name),
            ],
            _ => vec![m.name.to_string()],
        })
        .collect();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let dash: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            dash["uid"].is_string() && dash["title"].is_string(),
            "{}",
            path.display()
        );
        let panels = dash["panels"].as_array().unwrap();
        assert!(!panels.is_empty());
        for p in panels {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                let names: Vec<&str> = expr
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("tidepool_"))
                    .collect();
                assert!(
                    !names.is_empty(),
                    "panel {:?} queries no tidepool metric",
                    p["title"]
                );
                for n in names {
                    assert!(
                        known.contains(n),
                        "{}: panel {:?} queries unknown metric {n}",
                        path.display(),
                        p["title"]
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 10, "only {checked} queries checked");
}
