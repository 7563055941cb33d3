//! The chaos harness on every change: each scenario in `config/chaos/` once (seed 1) against a
//! real local cluster, every checker passing; then the deliberately broken mode (nodes that
//! acknowledge ops without logging them) under F1, where the checkers must report lost
//! acknowledged ops and the run must exit non-zero. Needs a `fault-injection` build (`cargo test
//! --all-features`, as `.ci/run` does).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");

/// One chaos cluster at a time: two at once on a small CI machine would only measure CPU
/// starvation (lease renewals late, convergence slow), not the protocol.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

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
    let _serial = serial();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/chaos");
    // F6 skews wall clocks with libfaketime (Debian `faketime`). `.ci/run` installs it and sets
    // TIDEPOOL_REQUIRE_FAKETIME=1; elsewhere the matrix runs without F6 and says so.
    let scratch = tempfile::tempdir().unwrap();
    let dir = if tidepool::chaos::faketime_library().is_ok() {
        shipped.clone()
    } else {
        assert!(
            std::env::var("TIDEPOOL_REQUIRE_FAKETIME").as_deref() != Ok("1"),
            "TIDEPOOL_REQUIRE_FAKETIME=1 but libfaketime is not installed"
        );
        eprintln!(
            "SKIPPED F6 (wall-clock skew): libfaketime is not installed (apt-get install faketime)"
        );
        for e in std::fs::read_dir(&shipped).unwrap() {
            let p = e.unwrap().path();
            let text = std::fs::read_to_string(&p).unwrap();
            if !text.contains("[skew_ms]") {
                std::fs::write(scratch.path().join(p.file_name().unwrap()), text).unwrap();
            }
        }
        scratch.path().to_path_buf()
    };
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
    let f1 = shipped.join("f1-owner-kill.toml");
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

/// F11 (CPU starvation through a rolling restart, a failover and training) with two more seeds
/// than the matrix's one: a throttled, stalled node must keep one owner per shard by itself.
#[test]
fn cpu_starvation_keeps_one_owner_with_more_seeds() {
    if !cfg!(feature = "fault-injection") {
        eprintln!("SKIPPED: needs the fault-injection feature (cargo test --all-features)");
        return;
    }
    let _serial = serial();
    let f11 = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/chaos/f11-cpu-starvation.toml");
    for seed in ["2", "3"] {
        let (code, text, report) = chaos(&[f11.to_str().unwrap(), "--seed", seed]);
        assert_eq!(code, 0, "F11 seed {seed}:\n{text}");
        let run = &report;
        assert_eq!(run["passed"], true, "{run}");
        assert!(run["checks"]["2_one_owner"].as_array().unwrap().is_empty());
        let starved = run["faults"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["kind"] == "starve");
        assert!(starved, "{run}");
    }
}

/// Whether this machine can run `--netns` (root, iproute2, nftables, namespaces allowed).
fn netns_available() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0");
    if !root {
        return Err("not root".into());
    }
    for (prog, arg) in [("ip", "-V"), ("nft", "--version")] {
        if Command::new(prog).arg(arg).output().is_err() {
            return Err(format!("{prog} is not installed"));
        }
    }
    let probe = format!("tidepool-probe-{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &probe])
        .status()
        .is_ok_and(|s| s.success());
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    if ok {
        Ok(())
    } else {
        Err("cannot create network namespaces here".into())
    }
}

fn namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|n| n.starts_with("tidepool-"))
        .collect()
}

/// `--netns`: every node in its own namespace; partitions as nftables DROP rules (F4) and a link
/// set down (F10), every checker passing; the namespaces are gone afterwards. Runs wherever
/// the machine allows it; `TIDEPOOL_REQUIRE_NETNS=1` (set by `.ci/run` when it can) makes a
/// missing prerequisite a failure instead of a skip.
#[test]
fn netns_mode_partitions_with_firewall_rules_and_link_down() {
    if let Err(why) = netns_available() {
        assert!(
            std::env::var("TIDEPOOL_REQUIRE_NETNS").as_deref() != Ok("1"),
            "TIDEPOOL_REQUIRE_NETNS=1 but --netns cannot run: {why}"
        );
        eprintln!("SKIPPED: --netns cannot run here: {why}");
        return;
    }
    let _serial = serial();
    let before = namespaces();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/chaos");
    for file in ["f4-partitions.toml", "f10-link-down.toml"] {
        let path = dir.join(file);
        let (code, text, report) = chaos(&[path.to_str().unwrap(), "--seed", "1", "--netns"]);
        assert_eq!(code, 0, "{file} under --netns:\n{text}");
        assert!(
            report["network"].as_str().unwrap().starts_with("netns 10."),
            "{report}"
        );
        let faults = report["faults"].as_array().unwrap();
        let details: Vec<&str> = faults
            .iter()
            .map(|f| f["detail"].as_str().unwrap())
            .collect();
        if file.starts_with("f4") {
            assert!(
                details.iter().any(|d| d.contains("nftables DROP")),
                "{details:?}"
            );
        } else {
            assert!(
                details.iter().any(|d| d.contains("eth0 down")),
                "{details:?}"
            );
        }
        assert!(report["acked"].as_u64().unwrap() > 0, "{report}");
    }
    assert_eq!(namespaces(), before, "namespaces left behind");
}

/// A setup problem is not a violation: a scenario that needs network namespaces, run without
/// `--netns`, exits 2 saying what is missing, before any node starts, and writes no report.
#[test]
fn a_setup_problem_exits_2_and_says_what_is_missing() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (code, text, json) = chaos(&[root
        .join("config/chaos/f10-link-down.toml")
        .to_str()
        .unwrap()]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("setup problem") && text.contains("--netns"),
        "{text}"
    );
    assert!(!text.contains("VIOLATION"), "{text}");
    assert_eq!(json, serde_json::Value::Null, "nothing ran, no report");
}
