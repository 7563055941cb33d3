//! The README's demo command runs for real: a local cluster trains through a kill -9 and beats
//! or matches smartcore; it names model files only when it keeps them (`--keep`).

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
