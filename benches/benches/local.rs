//! A message to a shard on the same node: Tidepool's `Router::send_to_shard` round trip on a
//! one-member node against plain ractor actors doing the same work.
//!
//! - `tidepool_send_to_shard`: `Op::Incr` on shard 0 with a fresh idempotency key each time:
//!   admission (bounded queue permit), actor message, dedup check, the increment, reply.
//! - `ractor_call`: `ractor::call!` to an actor that increments a counter in a `HashMap<String,
//!   i64>` and replies through an `RpcReplyPort` (the same work without queue bound or dedup).
//! - `ractor_cast`: the same increment as a `cast`, no reply; after the batch one `call` waits
//!   for the mailbox to drain, so the time covers processing, not just enqueueing.
//!
//! All run one op at a time from the bench thread into the 2-worker runtime.

use std::cell::Cell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tidepool_actors::node::Node;
use tidepool_benches::{report, runtime, Certs};
use tidepool_runtime::codec::{IdemKey, Op, OpResult, ShardRequest};
use tidepool_runtime::config::{MemberConfig, NodeConfig};

const SHARD: u32 = 0;

enum CounterMsg {
    Incr(String, i64, RpcReplyPort<i64>),
    Add(String, i64),
    Get(String, RpcReplyPort<i64>),
}

struct Counter;

impl Actor for Counter {
    type Msg = CounterMsg;
    type State = HashMap<String, i64>;
    type Arguments = ();

    async fn pre_start(
        &self,
        _me: ActorRef<CounterMsg>,
        _: (),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(HashMap::new())
    }

    async fn handle(
        &self,
        _me: ActorRef<CounterMsg>,
        msg: CounterMsg,
        kv: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CounterMsg::Incr(key, delta, reply) => {
                let c = kv.entry(key).or_insert(0);
                *c += delta;
                let _ = reply.send(*c);
            }
            CounterMsg::Add(key, delta) => *kv.entry(key).or_insert(0) += delta,
            CounterMsg::Get(key, reply) => {
                let _ = reply.send(kv.get(&key).copied().unwrap_or(0));
            }
        }
        Ok(())
    }
}

/// A one-member node on 127.0.0.1 (QUIC port picked by the OS), certificates and data in `certs`.
async fn one_node(certs: &Certs) -> Node {
    let mut cfg = NodeConfig::default();
    cfg.node.name = "n1".into();
    cfg.node.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.node.data_dir = certs.path().join("data");
    cfg.tls.dir = certs.node_dir("n1");
    cfg.cluster.members = vec![MemberConfig {
        name: "n1".into(),
        addr: cfg.node.listen,
    }];
    cfg.cluster.seeds = vec![];
    let node = Node::start(&cfg, None).await.expect("node start");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.router().all_shards_running() {
        assert!(Instant::now() < deadline, "shard actors did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node
}

fn local(c: &mut Criterion) {
    let rt = runtime();
    let certs = Certs::new(&["n1"]).expect("certs");
    let node = rt.block_on(one_node(&certs));
    let (counter, _) = rt
        .block_on(Actor::spawn(None, Counter, ()))
        .expect("counter actor");
    let seq = Cell::new(0u64);
    let router = node.router().clone();
    let tidepool_incr = |n: u64| {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..n {
                seq.set(seq.get() + 1);
                let req = ShardRequest {
                    idem: IdemKey {
                        sender: 1,
                        seq: seq.get(),
                    },
                    op: Op::Incr {
                        key: "k".into(),
                        delta: 1,
                    },
                };
                match router.send_to_shard(SHARD, req).await {
                    Ok(OpResult::Counter(_)) => {}
                    other => panic!("unexpected reply {other:?}"),
                }
            }
            start.elapsed()
        })
    };

    let mut g = c.benchmark_group("local/incr");
    g.throughput(Throughput::Elements(1));
    g.bench_function("tidepool_send_to_shard", |b| b.iter_custom(tidepool_incr));
    g.bench_function("ractor_call", |b| {
        b.iter_custom(|n| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..n {
                    ractor::call!(counter, CounterMsg::Incr, "k".to_string(), 1).expect("call");
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("ractor_cast", |b| {
        b.iter_custom(|n| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..n {
                    counter
                        .cast(CounterMsg::Add("k".to_string(), 1))
                        .expect("cast");
                }
                ractor::call!(counter, CounterMsg::Get, "k".to_string()).expect("drain");
                start.elapsed()
            })
        })
    });
    g.finish();

    report("local", "tidepool_ops", seq.get() as f64, "ops");
    rt.block_on(node.shutdown(Duration::from_secs(2)));
    counter.stop(None);
}

criterion_group! {
    name = benches;
    config = tidepool_benches::criterion();
    targets = local
}
criterion_main!(benches);
