//! What an operator does by hand: voters started far apart still form a cluster, saying what
//! they wait for meanwhile; CLI output piped into a reader that goes away.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};
use tidepool_runtime::codec::WireMemberState;

use tidepool::local_cluster::LocalCluster;
use tidepool_runtime::client::ClientOptions;

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");

/// n1 starts alone and waits (logging which voters it waits for every 5 s, and saying so in
/// its `/readyz` body and in `cluster status`); n2 and n3 start 20 s later; the three form one
/// cluster with a leader and every node ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voters_started_20_s_apart_form_a_cluster() {
    let mut cluster = LocalCluster::create(Path::new(BIN), 3, 16, 3).unwrap();
    cluster.start(0).unwrap();
    let started = Instant::now();
    let mut checked = false;
    // The gap is the scenario; it is measured by n1's own progress lines, not slept.
    loop {
        let log = std::fs::read_to_string(&cluster.nodes[0].log).unwrap_or_default();
        let waits = log
            .matches("waiting until every configured voter answers")
            .count();
        if waits >= 1 && started.elapsed() >= Duration::from_secs(20) {
            assert!(
                log.contains("n2, n3"),
                "n1 names the voters it waits for:\n{log}"
            );
            break;
        }
        if waits >= 1 && !checked {
            said_what_it_waits_for(&cluster).await;
            checked = true;
        }
        assert!(
            cluster.running(0),
            "n1 gave up waiting:\n{}",
            cluster.tail_log(0)
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no progress line from n1"
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // poll interval
    }
    cluster.start(1).unwrap();
    cluster.start(2).unwrap();
    // Nobody probes n1's /readyz from here on: its readiness gauge must still turn 1 by itself
    // (bare metal without probes; the "ready nodes" panel reads it).
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let text = cluster.metrics(0).await.unwrap_or_default();
        if text
            .lines()
            .any(|l| l.starts_with("tidepool_node_ready") && l.ends_with(" 1"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tidepool_node_ready never 1:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // poll interval
    }
    cluster
        .wait_ready(Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.tail_log(0)));
    let client = cluster
        .admin_client(ClientOptions::default())
        .await
        .unwrap();
    let status = client.status().await.unwrap();
    assert!(!status.leader.is_empty(), "a leader: {status:?}");
    assert_eq!(status.members.len(), 3);
    assert!(
        status
            .members
            .iter()
            .all(|m| m.state == WireMemberState::Up && m.voter),
        "{status:?}"
    );
    client.close().await;
    // Which build runs, as a metric.
    let text = cluster.metrics(0).await.unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("tidepool_build_info{")
            && l.contains("revision=")
            && l.ends_with(" 1")),
        "tidepool_build_info is exported"
    );

    // `--connect` takes host names and lists (a Kubernetes service name): "localhost" here.
    let out = std::process::Command::new(BIN)
        .args(["cluster", "status", "--connect"])
        .arg(format!(
            "localhost:{},localhost:{}",
            cluster.nodes[0].quic.port(),
            cluster.nodes[1].quic.port()
        ))
        .arg("--cert-dir")
        .arg(cluster.reader_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "--connect localhost:PORT: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("leader: n"));

    // `tidepool cluster shards … | head -1` where the reader is gone before the first write:
    // the command ends quietly (SIGPIPE, as Unix tools do), not with a panic and exit 101.
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["cluster", "shards", "--connect"])
        .arg(cluster.nodes[0].quic.to_string())
        .arg("--cert-dir")
        .arg(cluster.reader_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(101), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );

    cluster.stop_all(Duration::from_secs(20)).await.unwrap();
}

/// While n1 waits: `/readyz` is 503 naming n2 and n3, and `cluster status` (text and `--json`)
/// says the cluster is forming and whom this node waits for.
async fn said_what_it_waits_for(cluster: &LocalCluster) {
    let (code, body) = tidepool::http::get(cluster.nodes[0].admin, "/readyz")
        .await
        .unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("forming the cluster") && body.contains("n2, n3"),
        "/readyz says whom it waits for: {body}"
    );
    let run = |json: bool| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["cluster", "status", "--connect"])
            .arg(cluster.nodes[0].quic.to_string())
            .arg("--cert-dir")
            .arg(cluster.reader_dir());
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let text = run(false);
    assert!(
        text.contains("the cluster is forming") && text.contains("n2, n3"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&run(true)).unwrap();
    assert_eq!(
        json["waiting_for"],
        serde_json::json!(["n2", "n3"]),
        "{json}"
    );
    assert_eq!(json["leader"], "", "{json}");
}
