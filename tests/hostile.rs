//! Hostile peers against real node processes: refused handshakes (each case is a real connection
//! attempt), garbage datagrams and malformed frames, all while a workload runs and is checked
//! for exactly-once at the end.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tidepool::hostile::{no_cert_config, ping_frame, probe};
use tidepool::http::sum_metric;
use tidepool::local_cluster::LocalCluster;
use tidepool::workload;
use tidepool_runtime::certs::{self, Role, Subject, Validity};
use tidepool_runtime::client::{ClientOptions, ClusterClient};
use tidepool_runtime::codec::{self, ArchivedBody, FRAME_HEADER_LEN};
use tidepool_runtime::transport::tls::{self, ANY_NODE};
use tidepool_runtime::transport::TlsMaterial;

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");

async fn metric(cluster: &LocalCluster, i: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
    sum_metric(&cluster.metrics(i).await.unwrap(), name, labels)
}

async fn wait_metric_at_least(
    cluster: &LocalCluster,
    i: usize,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric(cluster, i, name, labels).await;
        if v >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} stayed at {v}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_refused_and_do_not_disturb_a_workload() {
    let mut cluster = LocalCluster::create(Path::new(BIN), 3, 32, 1).unwrap();
    cluster.start_all().unwrap();
    cluster.wait_ready(Duration::from_secs(60)).await.unwrap();
    let target = cluster.nodes[0].quic;
    let pki = tempfile::tempdir().unwrap();

    // A workload runs throughout.
    let admin = TlsMaterial::load_client(&cluster.admin_dir()).unwrap();
    let client = Arc::new(
        ClusterClient::connect(&cluster.seeds(), &admin, ClientOptions::default())
            .await
            .unwrap(),
    );
    let work = tokio::spawn(workload::run_increments(client.clone(), 20_000, 200, 32));

    // Control: a valid admin certificate gets an answer.
    probe(tls::client_config(&admin).unwrap(), target, ANY_NODE)
        .await
        .expect("valid client is served");

    // 1. No certificate.
    let err = probe(no_cert_config(), target, "n1")
        .await
        .expect_err("no certificate must be refused");
    println!("no certificate: {err}");
    // 2. A certificate from a foreign CA.
    let foreign = pki.path().join("foreign-ca");
    certs::init_ca(&foreign).unwrap();
    certs::issue(
        &foreign,
        &Subject::Client {
            name: "mallory".into(),
            role: Role::Admin,
        },
        &pki.path().join("foreign"),
        Validity::days_from_now(1),
    )
    .unwrap();
    let m = TlsMaterial::load_client(&pki.path().join("foreign")).unwrap();
    probe(tls::client_config(&m).unwrap(), target, ANY_NODE)
        .await
        .expect_err("foreign CA must be refused");
    // 3. An expired certificate from the right CA.
    let now = time::OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - time::Duration::days(3),
        not_after: now - time::Duration::days(1),
    };
    certs::issue(
        &cluster.ca_dir(),
        &Subject::Client {
            name: "late".into(),
            role: Role::Admin,
        },
        &pki.path().join("expired"),
        expired,
    )
    .unwrap();
    let m = TlsMaterial::load_client(&pki.path().join("expired")).unwrap();
    probe(tls::client_config(&m).unwrap(), target, ANY_NODE)
        .await
        .expect_err("expired certificate must be refused");
    // (Membership is dynamic: any node certificate from the cluster CA may join, so a node
    // certificate with a new name is admitted; what it cannot do is claim another node's name.)
    // 4. The node at this address is n1, not the n2 we claim to dial: our side refuses it.
    probe(tls::client_config(&admin).unwrap(), target, "n2")
        .await
        .expect_err("name mismatch must be refused");
    wait_metric_at_least(
        &cluster,
        0,
        "tidepool_transport_handshake_failures_total",
        &[("direction", "inbound")],
        3.0,
    )
    .await;

    // Garbage datagrams at every node's QUIC port.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for i in 0..3000 {
        let len = rng.random_range(1..1400);
        let junk: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let _ = udp.send_to(&junk, cluster.nodes[i % 3].quic).await;
    }

    // Malformed frames from an authenticated client, each on its own stream of one connection.
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(tls::client_config(&admin).unwrap(), target, ANY_NODE)
        .unwrap()
        .await
        .unwrap();
    let good = ping_frame(1);
    let mut oversized = good.clone();
    oversized[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut version = good.clone();
    version[4..6].copy_from_slice(&9u16.to_le_bytes());
    let mut malformed = good.clone();
    malformed[FRAME_HEADER_LEN..]
        .iter_mut()
        .for_each(|b| *b = 0xff);
    let truncated = good[..good.len() - 3].to_vec();
    for bad in [oversized, version, malformed, truncated] {
        let mut s = conn.open_uni().await.unwrap();
        let _ = s.write_all(&bad).await;
        let _ = s.finish();
    }
    for reason in ["oversized", "version", "malformed", "truncated"] {
        wait_metric_at_least(
            &cluster,
            0,
            "tidepool_wire_rejected_frames_total",
            &[("reason", reason)],
            1.0,
        )
        .await;
    }
    // The same connection still works after its bad streams were reset.
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&ping_frame(2)).await.unwrap();
    let mut r = tokio::time::timeout(Duration::from_secs(10), conn.accept_uni())
        .await
        .unwrap()
        .unwrap();
    let f = codec::read_frame(&mut r, 1 << 20).await.unwrap().unwrap();
    assert!(matches!(f.envelope().body, ArchivedBody::Pong(_)));

    // The workload was not disturbed: everything acknowledged, exactly once.
    let report = work.await.unwrap();
    assert_eq!(report.unacked, 0);
    assert_eq!(
        workload::verify(&client, &report, 200).await.unwrap(),
        20_000
    );
    for i in 0..3 {
        let (code, _) = tidepool::http::get(cluster.nodes[i].admin, "/readyz")
            .await
            .unwrap();
        assert_eq!(code, 200, "n{} still ready", i + 1);
    }
    let statuses = cluster.stop_all(Duration::from_secs(20)).await.unwrap();
    assert!(statuses.iter().all(|s| s.success()));
}
