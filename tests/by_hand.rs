//! The README's "Running a cluster by hand" section, followed literally: its shell blocks run
//! in order in a fresh directory (certificates, three configs, three nodes in the background, a
//! formed cluster, a dataset, a job, a drain, a clean stop). Only the build lines change: the
//! test uses the binary cargo built for it instead of `cargo build --release`.

#![allow(clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");

/// The `sh` blocks of one README section, in order.
fn section_blocks(readme: &str, heading: &str) -> Vec<String> {
    let start = readme
        .find(heading)
        .unwrap_or_else(|| panic!("README has no section {heading:?}"));
    let rest = &readme[start + heading.len()..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    let end = rest[..end].find("\n### ").unwrap_or(end);
    let mut blocks = Vec::new();
    let mut cur: Option<String> = None;
    for line in rest[..end].lines() {
        match (&mut cur, line.trim_end()) {
            (None, "```sh") => cur = Some(String::new()),
            (Some(b), "```") => {
                blocks.push(std::mem::take(b));
                cur = None;
            }
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
fn readme_running_a_cluster_by_hand() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let blocks = section_blocks(&readme, "## Running a cluster by hand");
    assert!(blocks.len() >= 4, "the section has its shell blocks");
    let mut script = String::from("set -eu\n");
    let mut replaced = 0;
    for block in &blocks {
        for line in block.lines() {
            if line == "cargo build --release" {
                replaced += 1;
                continue;
            }
            if line == "T=target/release/tidepool" {
                replaced += 1;
                script.push_str(&format!("T={BIN}\n"));
                continue;
            }
            script.push_str(line);
            script.push('\n');
        }
    }
    assert_eq!(
        replaced, 2,
        "the build lines are where the test expects them"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("walkthrough.sh"), &script).unwrap();
    let out = std::fs::File::create(dir.path().join("walkthrough.out")).unwrap();
    let mut child = Command::new("bash")
        .arg("walkthrough.sh")
        .current_dir(dir.path())
        .env_remove("TIDEPOOL_CONNECT")
        .env_remove("TIDEPOOL_CERT_DIR")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200)); // poll interval
    };
    // Whatever happened, nothing the walkthrough started outlives the test.
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on the process group this test created.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    let report = || diagnostics(dir.path());
    let status =
        status.unwrap_or_else(|| panic!("the walkthrough did not end within 300 s\n{}", report()));
    assert!(
        status.success(),
        "the walkthrough failed: {status}\n{}",
        report()
    );
    let output = std::fs::read_to_string(dir.path().join("walkthrough.out")).unwrap();
    assert!(
        output.contains("valid (node n3"),
        "config check ran:\n{output}"
    );
    assert!(
        output.contains("n3 is drained"),
        "the drain finished:\n{output}"
    );
    for i in 1..=3 {
        let log = std::fs::read_to_string(dir.path().join(format!("n{i}.log"))).unwrap();
        assert!(!log.contains("panicked"), "n{i} panicked:\n{log}");
    }
}

fn diagnostics(dir: &Path) -> String {
    let mut s = String::new();
    for f in ["walkthrough.out", "n1.log", "n2.log", "n3.log"] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        s.push_str(&format!("--- {f} (last 40 lines)\n"));
        for l in tail.into_iter().rev() {
            s.push_str(l);
            s.push('\n');
        }
    }
    s
}

/// Everything a reader needs is in the repository: no file points at documents outside it.
#[test]
fn the_repository_stands_alone() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new("git")
        .args(["ls-files"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(out.status.success(), "git ls-files: {out:?}");
    // Spelled in two parts so this file does not match itself.
    let outside = [concat!("../sha", "red/"), concat!("DESI", "GN.md")];
    let mut found = Vec::new();
    for file in String::from_utf8(out.stdout).unwrap().lines() {
        let Ok(text) = std::fs::read_to_string(Path::new(root).join(file)) else {
            continue; // binary or removed
        };
        for (n, line) in text.lines().enumerate() {
            if outside.iter().any(|o| line.contains(o)) {
                found.push(format!("{file}:{}: {line}", n + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "references outside the repository:\n{}",
        found.join("\n")
    );
}
