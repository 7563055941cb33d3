//! The README's demo command runs for real: a local cluster trains through a kill -9 and beats
//! or matches smartcore; it names model files only when it keeps them (`--keep`). `demo
//! --recommend` trains matrix factorisation through a kill -9 to the single-process reference.

#![allow(clippy::unwrap_used)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");

fn demo(args: &[&str]) -> String {
    let out = Command::new(BIN).arg("demo").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "demo {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn demo_trains_through_a_kill_and_names_files_only_when_kept() {
    let out = demo(&["--epochs", "2"]);
    assert!(out.contains("with SIGKILL"), "a node was killed:\n{out}");
    assert!(out.contains("demo OK"), "{out}");
    assert!(
        !out.contains("try: tidepool predict"),
        "no pointer to files the demo deleted:\n{out}"
    );

    let out = demo(&["--epochs", "1", "--no-kill", "--keep"]);
    let line = out
        .lines()
        .find(|l| l.contains("model written to"))
        .unwrap_or_else(|| panic!("--keep names the model file:\n{out}"));
    let model = line
        .split("model written to ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap();
    assert!(std::path::Path::new(model).exists(), "{model} exists");
    let kept = out
        .lines()
        .find_map(|l| l.strip_prefix("logs and certificates kept in "))
        .unwrap_or_else(|| panic!("--keep names its dir:\n{out}"));
    std::fs::remove_dir_all(kept.trim()).unwrap();
}

/// The number at the end of the line starting (after indentation) with `label`.
fn number_after(out: &str, label: &str) -> f64 {
    out.lines()
        .find(|l| l.trim_start().starts_with(label))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a line {label:?} ending in a number:\n{out}"))
}

#[test]
fn recommend_demo_trains_through_a_kill_to_the_reference() {
    // Fewer epochs and shards than the defaults keep it fast; the checks are the same.
    let out = demo(&["--recommend", "--epochs", "4", "--shards", "16"]);
    assert!(out.contains("with SIGKILL"), "a node was killed:\n{out}");
    assert!(
        !out.contains("killed n1 "),
        "n1 (maybe the only voter) is spared:\n{out}"
    );
    assert!(
        out.contains("rolled back to its last saved tables (rollbacks: "),
        "{out}"
    );
    let ours = number_after(&out, "tidepool (3 nodes, one killed mid-job)");
    let reference = number_after(&out, "single-process reference");
    let mean = number_after(&out, "predicting the mean rating");
    assert!((ours - reference).abs() <= 0.02 * reference, "{out}");
    assert!(ours < 0.8 * mean, "the model learned something:\n{out}");
    assert!(out.contains("bit for bit: yes"), "{out}");
    for user in ["user 0: ", "user 1: ", "user 2: "] {
        assert!(out.contains(user), "recommendations for {user}:\n{out}");
    }
    assert!(!out.contains("model written to"), "{out}");
    assert!(out.contains("demo OK"), "{out}");
}
