//! The chaos harness on every change: each scenario in `config/chaos/` once (seed 1) against a
//! real local cluster, every checker passing; then the deliberately broken mode (nodes that
//! acknowledge ops without logging them) under F1, where the checkers must report lost
//! acknowledged ops and the run must exit non-zero. Needs a `fault-injection` build (`cargo test
//! --all-features`, as `.ci/run` does).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");

fn chaos(args: &[&str]) -> (i32, String, serde_json::Value) {
    let report = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(BIN)
        .args(["chaos", "run"])
        .args(args)
        .arg("--report")
        .arg(report.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let json = std::fs::read(report.path())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), text, json)
}

#[test]
fn every_scenario_passes_and_the_broken_mode_is_caught() {
    if !cfg!(feature = "fault-injection") {
        eprintln!("SKIPPED: needs the fault-injection feature (cargo test --all-features)");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/chaos");
    let (code, text, report) = chaos(&["--matrix", dir.to_str().unwrap(), "--seeds", "1"]);
    assert_eq!(code, 0, "violations in the chaos matrix:\n{text}");
    let runs = report["runs"].as_array().unwrap();
    assert!(runs.len() >= 6, "{} runs", runs.len());
    for r in runs {
        assert_eq!(r["passed"], true, "{r}");
        assert!(r["acked"].as_u64().unwrap() > 0);
        assert!(!r["faults"].as_array().unwrap().is_empty(), "{r}");
        assert!(r["convergence_ms"].as_u64().is_some(), "{r}");
    }

    // A checker that never fails proves nothing: the broken mode must be reported.
    let f1 = dir.join("f1-owner-kill.toml");
    let (code, text, report) = chaos(&[
        f1.to_str().unwrap(),
        "--seed",
        "1",
        "--unsafe-skip-durability",
    ]);
    assert_eq!(code, 1, "the broken mode was not caught:\n{text}");
    let lost = report["checks"]["1_acked_ops"].as_array().unwrap();
    assert!(
        lost.iter().any(|v| v.as_str().unwrap().contains("LOST")),
        "{report}"
    );
}
