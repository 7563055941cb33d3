//! A real single-member node in-process: shard actors restart after a failure with their state
//! intact, and repeated failures escalate instead of limping on.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tidepool_actors::node::Node;
use tidepool_actors::supervisor::SupervisorMsg;
use tidepool_runtime::certs::{self, Subject, Validity};
use tidepool_runtime::codec::{IdemKey, Op, OpResult, ShardRequest};
use tidepool_runtime::config::NodeConfig;

fn config(dir: &std::path::Path) -> NodeConfig {
    certs::init_ca(&dir.join("ca")).unwrap();
    certs::issue(
        &dir.join("ca"),
        &Subject::Node("n1".into()),
        &dir.join("n1"),
        Validity::days_from_now(1),
    )
    .unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = NodeConfig::default();
    cfg.node.listen = format!("127.0.0.1:{port}").parse().unwrap();
    cfg.node.admin = "127.0.0.1:1".parse().unwrap();
    cfg.node.data_dir = dir.join("data");
    cfg.cluster.seeds = vec![];
    cfg.cluster.voters = vec!["n1".into()];
    cfg.cluster.shards = 8;
    cfg.tls.dir = dir.join("n1");
    cfg.storage.url = format!("file://{}", dir.join("shared").display());
    cfg.validate().unwrap();
    cfg
}

fn incr(seq: u64) -> ShardRequest {
    ShardRequest {
        idem: IdemKey { sender: 1, seq },
        op: Op::Incr {
            key: "c".into(),
            delta: 1,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_actors_restart_with_state_and_escalate_past_the_budget() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(&config(dir.path()), None).await.unwrap();
    let router = node.router().clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node.ready() || router.send_to_shard(3, incr(1)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "node never became ready and served shard 3"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
    }
    for seq in 2..=10 {
        router.send_to_shard(3, incr(seq)).await.unwrap();
    }
    // A retry of an applied op is recognised, locally too.
    assert_eq!(
        router.send_to_shard(3, incr(10)).await,
        Ok(OpResult::Duplicate)
    );

    // Crash shard 3 and wait for a new incarnation; `None` if none came (the supervisor gave up).
    async fn crash_and_wait(node: &Node, shard: u32) -> Option<ractor::ActorId> {
        let before = node.router().shard_actor(shard);
        node.supervisor()
            .cast(SupervisorMsg::CrashShard(shard))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match node.router().shard_actor(shard) {
                Some(id) if Some(id) != before => return Some(id),
                _ if Instant::now() > deadline => return None,
                _ => tokio::time::sleep(Duration::from_millis(10)).await, // poll interval
            }
        }
    }

    assert!(
        crash_and_wait(&node, 3).await.is_some(),
        "restarted after one failure"
    );
    assert_eq!(
        router.send_to_shard(3, incr(11)).await,
        Ok(OpResult::Counter(11)),
        "state was restored from the durable log, nothing applied twice"
    );

    // The default budget is 5 restarts in 30 s and one is spent: 4 more restart, the next escalates.
    for i in 0..4 {
        assert!(
            crash_and_wait(&node, 3).await.is_some(),
            "restart {} within budget",
            i + 2
        );
    }
    assert!(
        crash_and_wait(&node, 3).await.is_none(),
        "past the budget there is no restart"
    );
    let reason = tokio::time::timeout(Duration::from_secs(10), node.escalated())
        .await
        .expect("escalation reported");
    assert!(reason.unwrap().contains("shard 3"));

    // A stop flips readiness (what /readyz reports) before anything is torn down.
    let readiness = node.readiness();
    readiness.begin_stop();
    assert!(!readiness.is_ready() && !node.ready());
    node.shutdown(Duration::from_secs(5)).await;
}
