//! Data at rest, end to end with real `tidepool node run` processes: the data key file is
//! required before anything is bound, everything the daemon writes is owner-only, and what it
//! writes to the shared storage is sealed (no plaintext).

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tidepool::local_cluster::{self, LocalCluster};
use tidepool_runtime::client::ClientOptions;
use tidepool_runtime::codec::{Op, OpResult};

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");

#[test]
fn a_missing_or_malformed_data_key_exits_64_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let certs = dir.path().join("n1");
    tidepool_runtime::certs::init_ca(&ca).unwrap();
    tidepool_runtime::certs::issue(
        &ca,
        &tidepool_runtime::certs::Subject::Node("n1".into()),
        &certs,
        tidepool_runtime::certs::Validity::days_from_now(1),
    )
    .unwrap();
    let key = certs.join("data.key");
    let malformed = dir.path().join("malformed.key");
    std::fs::write(
        &malformed,
        "current = 1\n[[keys]]\nid = 1\nsecret = \"00\"\n",
    )
    .unwrap();
    // Listening on a port we hold: a node that got as far as binding would fail differently.
    let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap();
    let held_tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = held_tcp.local_addr().unwrap();
    let base = format!(
        "[node]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\ndata_dir = \"{}\"\n\n[tls]\ndir = \"{}\"\n\n[storage]\nurl = \"file://{}\"\n",
        dir.path().join("data").display(),
        certs.display(),
        dir.path().join("shared").display(),
    );
    std::fs::remove_file(&key).unwrap();
    let cases = [
        (base.clone(), "data.key"),
        (
            format!("{base}key_file = \"{}\"\n", malformed.display()),
            "hex digits",
        ),
    ];
    for (i, (toml, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("n1-{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        let out = Command::new(BIN)
            .args(["node", "run", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "case {i}: {stderr}");
        assert!(
            stderr.contains("storage.key_file") && stderr.contains(want),
            "case {i}: stderr should name storage.key_file and {want:?}: {stderr}"
        );
        assert!(
            !dir.path().join("data").exists(),
            "case {i}: nothing is created"
        );
    }
}

/// Every file and directory under `root`, with its permission bits.
fn modes(root: &Path) -> Vec<(PathBuf, u32, bool)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            out.push((
                path.clone(),
                meta.permissions().mode() & 0o777,
                meta.is_dir(),
            ));
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_writes_owner_only_files_and_sealed_objects() {
    let mut cluster = LocalCluster::create(Path::new(BIN), 1, 4, 1).unwrap();
    cluster.start_all().unwrap();
    cluster.wait_ready(Duration::from_secs(60)).await.unwrap();
    let client = cluster
        .admin_client(ClientOptions::default())
        .await
        .unwrap();
    local_cluster::wait_all_up(&client, 1, Duration::from_secs(30))
        .await
        .unwrap();
    // A key name that would show up in a plaintext op log.
    let key = "plaintext-canary-key";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let incr = Op::Incr {
            key: key.into(),
            delta: 7,
        };
        match client.op(key, incr).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying the write: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("write failed: {e}"),
        }
    }
    assert_eq!(
        client.op(key, Op::Get { key: key.into() }).await.unwrap(),
        OpResult::Counter(7)
    );
    let statuses = cluster.stop_all(Duration::from_secs(20)).await.unwrap();
    assert!(statuses.iter().all(|s| s.success()), "{statuses:?}");

    let data = cluster.root().join("data");
    let shared = cluster.root().join("shared");
    let mut found = (0, 0);
    for root in [&data, &shared] {
        assert_eq!(
            std::fs::metadata(root).unwrap().permissions().mode() & 0o777,
            0o700,
            "{}",
            root.display()
        );
        for (path, mode, is_dir) in modes(root) {
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", path.display());
            if is_dir {
                found.0 += 1;
                continue;
            }
            found.1 += 1;
            if root == &shared {
                let bytes = std::fs::read(&path).unwrap();
                assert!(
                    !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
                    "{} holds the key name in plaintext",
                    path.display()
                );
            }
        }
    }
    let segments = modes(&shared)
        .iter()
        .filter(|(p, _, _)| p.extension().is_some_and(|e| e == "seg"))
        .count();
    assert!(segments >= 2, "a fence and the write: {segments} segments");
    assert!(found.0 >= 3 && found.1 >= 4, "dirs, files: {found:?}");
}

/// A job result edited on the storage, or swapped for another job's valid result, is refused by
/// `job result` (never served as a model) and counted in the metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_job_result_is_refused_and_counted() {
    use tidepool::http::sum_metric;
    use tidepool::{datasets, jobs_cli};
    use tidepool_runtime::control::JobState;

    let mut cluster = LocalCluster::create(Path::new(BIN), 1, 8, 1).unwrap();
    cluster.start_all().unwrap();
    cluster.wait_ready(Duration::from_secs(60)).await.unwrap();
    let opts = ClientOptions {
        retry_for: Duration::from_secs(60),
        ..Default::default()
    };
    let client = cluster.admin_client(opts).await.unwrap();
    local_cluster::wait_all_up(&client, 1, Duration::from_secs(30))
        .await
        .unwrap();
    let table = datasets::builtin("breast_cancer").unwrap();
    jobs_cli::import_table(&client, &table, "bc").await.unwrap();
    let spec = "[job]\nkind = \"stats\"\ndataset = \"bc\"\n[train]\nbins = 4\n";
    let mut ids = Vec::new();
    for _ in 0..2 {
        let id = jobs_cli::submit(&client, spec).await.unwrap();
        let rec = jobs_cli::wait(&client, &id, false, Duration::from_secs(120))
            .await
            .unwrap();
        assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
        jobs_cli::result(&client, &id).await.unwrap();
        ids.push(id);
    }
    let result_file = |id: &str| {
        cluster
            .root()
            .join("shared/jobs")
            .join(id)
            .join("result.json")
    };
    let rejected = |text: &str, reason: &str| {
        sum_metric(
            text,
            "tidepool_storage_rejected_objects_total",
            &[("reason", reason)],
        )
    };
    let before = cluster.metrics(0).await.unwrap();
    assert_eq!(rejected(&before, "forged"), 0.0);

    // The client retries an internal error until `retry_for`; every attempt is refused (and
    // counted) again, so a short budget keeps this quick.
    let once = ClientOptions {
        retry_for: Duration::from_millis(1),
        ..Default::default()
    };
    let client = cluster.admin_client(once).await.unwrap();

    // Job 0's result replaced by job 1's (valid, sealed, same contents): moved, refused.
    std::fs::copy(result_file(&ids[1]), result_file(&ids[0])).unwrap();
    // Job 1's result edited in place.
    let mut bytes = std::fs::read(result_file(&ids[1])).unwrap();
    let last = bytes.len() - 20;
    bytes[last] ^= 0x01;
    std::fs::write(result_file(&ids[1]), bytes).unwrap();
    for id in &ids {
        let e = jobs_cli::result(&client, id).await.unwrap_err();
        assert!(
            format!("{e:#}").contains("authentication failed"),
            "{id}: {e:#}"
        );
    }
    let after = cluster.metrics(0).await.unwrap();
    assert!(rejected(&after, "forged") >= 2.0, "{after}");
    assert_eq!(
        rejected(&after, "version") + rejected(&after, "unknown_key"),
        0.0
    );
    client.close().await;
    cluster.stop_all(Duration::from_secs(20)).await.unwrap();
}
