//! A message to a shard on the same node: Tidepool's `Router::send_to_shard` round trip on a
//! one-member node against plain ractor actors doing the same increment.
//!
//! Tidepool rows (one op at a time, shard 0, a fresh idempotency key per write):
//! - `tidepool_incr_memory_store`: `Op::Incr` on a node whose object store is `memory://`:
//!   admission (bounded queue permit), actor message, dedup check, the increment, the append to
//!   the shard's op log (in memory), reply. The log append is on the path because an ack means
//!   the op is durable (invariant 3); in memory it costs what the log writer's hand-off costs.
//! - `tidepool_incr_file_store`: the same on a second node with the default kind of store,
//!   `file://` (each acknowledged write is a new log object, fsynced with its directory).
//! - `tidepool_get`: `Op::Get` on the memory node; reads are not logged, so this is the local
//!   message path without durability.
//!
//! Peers:
//! - `ractor_call`: `ractor::call!` to an actor that increments a counter in a
//!   `HashMap<String, i64>` and replies through an `RpcReplyPort`.
//! - `ractor_cast`: the same increment as a `cast`, no reply; after the batch one `call` waits
//!   for the mailbox to drain, so the time covers processing, not just enqueueing.

use std::cell::Cell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tidepool_actors::node::Node;
use tidepool_actors::router::Router;
use tidepool_benches::{report, runtime, Certs};
use tidepool_runtime::codec::{IdemKey, Op, OpResult, ShardRequest};
use tidepool_runtime::config::NodeConfig;

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

/// A one-member cluster (its own voter, no seeds) on 127.0.0.1 with the OS picking the QUIC
/// port, storing its shard logs at `store`; returns once shard 0 answers.
async fn one_node(certs: &Certs, name: &str, store: String) -> Node {
    let mut cfg = NodeConfig::default();
    cfg.node.name = name.into();
    cfg.node.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.node.admin = "127.0.0.1:0".parse().expect("addr");
    cfg.node.data_dir = certs.path().join(name).join("data");
    cfg.tls.dir = certs.node_dir(name);
    cfg.storage.url = store;
    cfg.cluster.seeds = vec![];
    cfg.cluster.voters = vec![name.into()];
    let node = Node::start(&cfg, None).await.expect("node start");
    // The new leader waits out a lease TTL before assigning shards, then the shard restores.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let probe = ShardRequest {
            idem: IdemKey { sender: 0, seq: 0 },
            op: Op::Get { key: "k".into() },
        };
        match node.router().send_to_shard(SHARD, probe).await {
            Ok(_) => return node,
            Err(code) => {
                assert!(
                    Instant::now() < deadline,
                    "{name}: shard {SHARD} never served ({code:?})"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// `n` sequential increments through `router`, numbering writes from `seq`.
async fn incr(router: &Router, seq: &Cell<u64>, n: u64) -> Duration {
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
}

async fn get(router: &Router, n: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        let req = ShardRequest {
            idem: IdemKey { sender: 1, seq: 0 },
            op: Op::Get { key: "k".into() },
        };
        match router.send_to_shard(SHARD, req).await {
            Ok(OpResult::Counter(_)) => {}
            other => panic!("unexpected reply {other:?}"),
        }
    }
    start.elapsed()
}

fn local(c: &mut Criterion) {
    let rt = runtime();
    let certs = Certs::new(&["n1", "n2"]).expect("certs");
    let file_store = format!("file://{}", certs.path().join("shared").display());
    let (mem, file) = rt.block_on(async {
        let mem = one_node(&certs, "n1", "memory://tidepool-bench-local".into()).await;
        let file = one_node(&certs, "n2", file_store).await;
        (mem, file)
    });
    let (counter, _) = rt
        .block_on(Actor::spawn(None, Counter, ()))
        .expect("counter actor");
    let (mem_seq, file_seq) = (Cell::new(0u64), Cell::new(0u64));
    // The key exists before any row runs, so `tidepool_get` reads a counter even when filtered.
    rt.block_on(incr(mem.router(), &mem_seq, 1));

    let mut g = c.benchmark_group("local/incr");
    g.throughput(Throughput::Elements(1));
    g.bench_function("tidepool_incr_memory_store", |b| {
        b.iter_custom(|n| rt.block_on(incr(mem.router(), &mem_seq, n)))
    });
    g.bench_function("tidepool_incr_file_store", |b| {
        b.iter_custom(|n| rt.block_on(incr(file.router(), &file_seq, n)))
    });
    g.bench_function("tidepool_get", |b| {
        b.iter_custom(|n| rt.block_on(get(mem.router(), n)))
    });
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

    report(
        "local",
        "tidepool_memory_writes",
        mem_seq.get() as f64,
        "ops",
    );
    report(
        "local",
        "tidepool_file_writes",
        file_seq.get() as f64,
        "ops",
    );
    rt.block_on(async {
        mem.shutdown(Duration::from_secs(2)).await;
        file.shutdown(Duration::from_secs(2)).await;
    });
    counter.stop(None);
}

criterion_group! {
    name = benches;
    config = tidepool_benches::criterion();
    targets = local
}
criterion_main!(benches);
