//! Issue 12 item 6: the admin HTTP port under idle and half-sent connections. A real node with
//! short admin timeouts and a small connection cap; hundreds of connections that never finish a
//! request. The node must keep answering `/metrics` and `/readyz`, close the idle connections
//! after the header-read timeout, and hold a bounded number of file descriptors. Waits are polls
//! with deadlines.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use tidepool::http::{get, sum_metric};
use tidepool::local_cluster::LocalCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");
const MAX_CONNECTIONS: usize = 16;
const HEADER_TIMEOUT_MS: u64 = 1000;
/// Connections the test opens: many times the cap.
const IDLE: usize = 150;
const HALF_SENT: usize = 150;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Whether the peer has closed `s` (EOF or reset) within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // An error answer (408) before the close: keep reading to the EOF.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_and_half_sent_connections_do_not_exhaust_the_node() {
    let mut c = LocalCluster::create(Path::new(BIN), 1, 8, 1).unwrap();
    c.env = vec![
        (
            "TIDEPOOL_ADMIN__HEADER_READ_TIMEOUT_MS".into(),
            HEADER_TIMEOUT_MS.to_string(),
        ),
        (
            "TIDEPOOL_ADMIN__MAX_CONNECTIONS".into(),
            MAX_CONNECTIONS.to_string(),
        ),
        ("TIDEPOOL_ADMIN__REQUEST_TIMEOUT_MS".into(), "2000".into()),
    ];
    c.start_all().unwrap();
    c.wait_ready(Duration::from_secs(90)).await.unwrap();
    let addr = c.nodes[0].admin;
    let pid = c.nodes[0].pid().unwrap();
    let baseline = open_fds(pid);
    assert!(baseline > 0, "cannot read /proc/{pid}/fd");

    // The attack: idle connections, and connections that send half a request and stop.
    let mut held = Vec::new();
    for i in 0..IDLE + HALF_SENT {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            continue; // refused or reset under load: that is the node protecting itself
        };
        if i >= IDLE {
            let _ = s
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await;
        }
        held.push(s);
    }
    assert!(
        held.len() > 2 * MAX_CONNECTIONS,
        "only {} connected",
        held.len()
    );

    // While they are held: fds stay bounded, and /metrics and /readyz keep answering.
    let bound = baseline + MAX_CONNECTIONS + 16;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut metrics_ok, mut ready_ok) = (false, false);
    while !(metrics_ok && ready_ok) {
        let fds = open_fds(pid);
        assert!(
            fds <= bound,
            "node holds {fds} fds (baseline {baseline}, bound {bound})"
        );
        metrics_ok |= matches!(get(addr, "/metrics").await, Ok((200, _)));
        ready_ok |= matches!(get(addr, "/readyz").await, Ok((200, _)));
        assert!(
            Instant::now() < deadline,
            "admin HTTP stopped answering: /metrics {metrics_ok}, /readyz {ready_ok}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval
    }

    // Every held connection is closed by the node: over the cap at once, the rest after the
    // header-read timeout (generous slack for a loaded test machine).
    let within = Duration::from_millis(HEADER_TIMEOUT_MS * 10);
    for (i, s) in held.iter_mut().enumerate() {
        assert!(closed_within(s, within).await, "connection {i} still open");
    }
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    while open_fds(pid) > baseline + 8 {
        assert!(
            Instant::now() < deadline,
            "fds not released: {} (baseline {baseline})",
            open_fds(pid)
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval
    }

    let text = c.metrics(0).await.unwrap();
    let closed = |reason| {
        sum_metric(
            &text,
            "tidepool_admin_http_connections_closed_total",
            &[("reason", reason)],
        )
    };
    assert!(closed("limit") > 0.0, "no connection refused over the cap");
    assert!(
        closed("timeout") > 0.0,
        "no connection closed by the timeout"
    );
    assert!(matches!(get(addr, "/readyz").await, Ok((200, _))));
    c.stop_all(Duration::from_secs(30)).await.unwrap();
}
