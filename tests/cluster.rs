//! Multi-process tests: real `tidepool node run` processes on loopback with certificates made in a
//! temp dir. Every wait is a poll with a deadline.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tidepool::http::sum_metric;
use tidepool::local_cluster::{self, LocalCluster};
use tidepool::workload;
use tidepool_runtime::client::{ClientError, ClientOptions, ClusterClient};
use tidepool_runtime::codec::{ErrorCode, Op, OpResult};
use tidepool_runtime::transport::TlsMaterial;

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");

fn cli_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run tidepool CLI");
    assert!(
        out.status.success(),
        "tidepool {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("CLI --json prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_apply_100k_idempotent_ops_exactly_once() {
    let mut cluster = LocalCluster::create(Path::new(BIN), 3, 64, 1).unwrap();
    cluster.start_all().unwrap();
    cluster.wait_ready(Duration::from_secs(60)).await.unwrap();

    let tls = TlsMaterial::load_client(&cluster.admin_dir()).unwrap();
    let client = Arc::new(
        ClusterClient::connect(&cluster.seeds()[..1], &tls, ClientOptions::default())
            .await
            .unwrap(),
    );
    local_cluster::wait_all_up(&client, 3, Duration::from_secs(30))
        .await
        .unwrap();
    local_cluster::wait_stable(&client, Duration::from_secs(60))
        .await
        .unwrap();

    const OPS: u64 = 100_000;
    const KEYS: u64 = 1000;
    let report = workload::run_increments(client.clone(), OPS, KEYS, 128).await;
    assert_eq!(report.unacked, 0, "every op is acknowledged with retries");
    assert_eq!(report.acked, OPS);
    let sum = workload::verify(&client, &report, KEYS).await.unwrap();
    assert_eq!(
        sum, OPS,
        "every acknowledged increment is present exactly once"
    );

    // The nodes' own counters agree with the client.
    let mut applied = 0.0;
    let mut admin_requests = 0.0;
    for i in 0..3 {
        let text = cluster.metrics(i).await.unwrap();
        applied += sum_metric(
            &text,
            "tidepool_shard_ops_total",
            &[("op", "incr"), ("result", "applied")],
        );
        admin_requests += sum_metric(
            &text,
            "tidepool_admin_requests_total",
            &[("role", "admin"), ("kind", "shard_request")],
        );
        assert!(
            text.contains("tidepool_shard_op_duration_seconds_bucket"),
            "latency histogram with explicit buckets"
        );
    }
    assert_eq!(
        applied as u64, OPS,
        "nodes applied exactly the acknowledged ops"
    );
    assert!(
        admin_requests as u64 >= OPS,
        "every write was counted as an admin request"
    );

    // Every admin request was audited, naming the client's certificate.
    let audited: usize = (1..=3)
        .map(|i| {
            std::fs::read_to_string(cluster.root().join(format!("data/n{i}/audit.log")))
                .unwrap_or_default()
        })
        .map(|t| {
            t.lines()
                .filter(|l| l.contains("\"client\":\"demo-admin\""))
                .count()
        })
        .sum();
    assert!(audited as u64 >= OPS, "audit lines: {audited}");

    // The CLI, with a reader certificate: stable JSON shapes.
    let seed = cluster.seeds()[0].to_string();
    let reader = cluster.reader_dir();
    let reader = reader.to_str().unwrap();
    let status = cli_json(&[
        "cluster",
        "status",
        "--json",
        "--connect",
        &seed,
        "--cert-dir",
        reader,
    ]);
    let members = status["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert!(status["leader"].is_string() && status["term"].is_u64());
    let total: u64 = members.iter().map(|m| m["shards"].as_u64().unwrap()).sum();
    assert_eq!(total, 64);
    for m in members {
        assert!(m["name"].is_string() && m["addr"].is_string() && m["state"] == "up");
    }
    let shards = cli_json(&[
        "cluster",
        "shards",
        "--json",
        "--connect",
        &seed,
        "--cert-dir",
        reader,
    ]);
    let shards = shards["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 64);
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(s["id"].as_u64(), Some(i as u64));
        assert!(
            s["epoch"].as_u64().unwrap() >= 1,
            "assigned shards have an epoch"
        );
        assert_eq!(s["state"], "serving");
        assert!(members.iter().any(|m| m["name"] == s["owner"]));
    }

    // The reader role may read but not write.
    let rtls = TlsMaterial::load_client(&cluster.reader_dir()).unwrap();
    let reader = ClusterClient::connect(&cluster.seeds()[1..2], &rtls, ClientOptions::default())
        .await
        .unwrap();
    match reader
        .op(
            "k1",
            Op::Incr {
                key: "k1".into(),
                delta: 1,
            },
        )
        .await
    {
        Err(ClientError::Refused {
            code: ErrorCode::Forbidden,
            ..
        }) => {}
        other => panic!("reader write must be forbidden, got {other:?}"),
    }
    let expected = report.per_key["k1"] as i64;
    assert_eq!(
        reader.op("k1", Op::Get { key: "k1".into() }).await.unwrap(),
        OpResult::Counter(expected)
    );

    let statuses = cluster.stop_all(Duration::from_secs(20)).await.unwrap();
    assert!(
        statuses.iter().all(|s| s.success()),
        "clean exit on SIGTERM: {statuses:?}"
    );
    for i in 0..3 {
        let log = cluster.tail_log(i);
        assert!(log.contains("node stopped"), "n{} log:\n{log}", i + 1);
    }
}

#[test]
fn bad_config_exits_64_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[cluster]\nshards = 0\n", vec![], "cluster.shards"),
        ("[node]\nnmae = \"n1\"\n", vec![], "nmae"),
        ("", vec![("TIDEPOOL_NODE__NAME", "N_1")], "node.name"),
        (
            "[transport]\nmax_frame_bytes = 12\n",
            vec![],
            "transport.max_frame_bytes",
        ),
    ];
    for (i, (toml, env, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        let out = Command::new(BIN)
            .args(["node", "run", "--config"])
            .arg(&path)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "case {i}: {stderr}");
        assert!(
            stderr.contains(key),
            "case {i}: stderr should name {key}: {stderr}"
        );
    }
}

/// What the config points to is checked before anything binds: a certificate directory that
/// is missing or holds another node's certificate, and a data dir that cannot be written, each
/// give one message naming the key and exit 64 (which the systemd unit does not restart).
#[test]
fn wrong_paths_exit_64_once_before_binding() {
    use tidepool_runtime::certs::{self, Subject, Validity};
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    certs::init_ca(&ca).unwrap();
    for n in ["n1", "n2"] {
        certs::issue(
            &ca,
            &Subject::Node(n.into()),
            &dir.path().join(n),
            Validity::days_from_now(1),
        )
        .unwrap();
    }
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cases = [
        (
            dir.path().join("missing"),
            dir.path().join("data"),
            "tls.dir",
        ),
        (dir.path().join("n2"), dir.path().join("data"), "tls.dir"),
        (
            dir.path().join("n1"),
            not_a_dir.join("data"),
            "node.data_dir",
        ),
    ];
    for (i, (tls, data, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("paths{i}.toml"));
        let toml = format!(
            "[node]\nname = \"n1\"\nadmin = \"{admin}\"\ndata_dir = \"{}\"\n[tls]\ndir = \"{}\"\n[storage]\nkey_file = \"{}\"\n",
            data.display(),
            tls.display(),
            ca.join("data.key").display()
        );
        std::fs::write(&path, toml).unwrap();
        let out = Command::new(BIN)
            .args(["node", "run", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "case {i}: {stderr}");
        assert_eq!(
            stderr.matches(key).count(),
            1,
            "case {i}: named once: {stderr}"
        );
        assert!(out.stdout.is_empty(), "case {i}: nothing started");
    }
}
