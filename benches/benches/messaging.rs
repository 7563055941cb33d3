//! Small messages between two nodes on 127.0.0.1: Tidepool (QUIC + mutual TLS) against
//! ractor_cluster (TCP, no encryption), both in this process on the same tokio runtime.
//!
//! Each message is a request carrying a 64-byte payload, answered with the same 64 bytes:
//! - Tidepool: `ShardRequest(Put { value })` → `ShardReply(Value(Some(value)))` through
//!   `Link::request` (correlation ids, bounded send queue, batched writes on one stream).
//! - ractor_cluster: an `#[rpc]` variant `Echo(Vec<u8>, RpcReplyPort<Vec<u8>>)` called on the
//!   remote actor found through a process group, over a `NodeServer` session.
//!
//! Workloads: `throughput` keeps 256 requests in flight (256 tasks pulling from one counter);
//! `rtt` sends one request at a time. After criterion, a fixed pass of sequential requests gives
//! p50/p99 round-trip times (criterion reports means and medians of batches, not tails).
//!
//! Build: `--no-default-features --features ractor-cluster` (see benches/README.md for why).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::{NodeServer, RactorClusterMessage};
use tidepool_benches::{
    free_tcp_port, report, runtime, transport_pair, BoxError, Pair, Percentiles,
};
use tidepool_runtime::codec::{
    ArchivedBody, ArchivedOpResult, Body, Dest, Envelope, IdemKey, Op, ShardRequest,
};
use tidepool_runtime::transport::Link;

const PAYLOAD: usize = 64;
const IN_FLIGHT: u64 = 256;
const LATENCY_SAMPLES: usize = 5_000;
const TIMEOUT: Duration = Duration::from_secs(10);
const PG_GROUP: &str = "tidepool-bench-echo";

/// One request/response of the workload, whatever carries it.
trait Rpc: Clone + Send + Sync + 'static {
    fn call(&self) -> impl Future<Output = ()> + Send;
}

#[derive(Clone)]
struct TidepoolRpc {
    link: Link,
}

impl Rpc for TidepoolRpc {
    async fn call(&self) {
        let req = ShardRequest {
            idem: IdemKey { sender: 1, seq: 0 },
            op: Op::Put {
                key: "k".into(),
                value: vec![0xAB; PAYLOAD],
            },
        };
        let env = Envelope::new("a", Dest::Node("b".into()), 0, Body::ShardRequest(req));
        let reply = self
            .link
            .request(env, TIMEOUT)
            .await
            .expect("tidepool request");
        match &reply.envelope().body {
            ArchivedBody::ShardReply(ArchivedOpResult::Value(v)) => {
                let n = v.as_ref().map_or(0, |v| v.len());
                assert_eq!(n, PAYLOAD, "echo payload");
            }
            _ => panic!("unexpected reply kind"),
        }
    }
}

#[derive(RactorClusterMessage)]
enum EchoMsg {
    #[rpc]
    Echo(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

/// The remote end of the ractor_cluster peer: echoes the payload.
struct EchoActor;

impl Actor for EchoActor {
    type Msg = EchoMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, me: ActorRef<EchoMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        ractor::pg::join(PG_GROUP.to_string(), vec![me.get_cell()]);
        Ok(())
    }

    async fn handle(
        &self,
        _me: ActorRef<EchoMsg>,
        msg: EchoMsg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            EchoMsg::Echo(payload, reply) => {
                let _ = reply.send(payload);
            }
        }
        Ok(())
    }
}

#[derive(Clone)]
struct ClusterRpc {
    remote: ActorRef<EchoMsg>,
}

impl Rpc for ClusterRpc {
    async fn call(&self) {
        let reply = self
            .remote
            .call(
                |port| EchoMsg::Echo(vec![0xAB; PAYLOAD], port),
                Some(TIMEOUT),
            )
            .await
            .expect("ractor_cluster call");
        match reply {
            ractor::rpc::CallResult::Success(v) => assert_eq!(v.len(), PAYLOAD, "echo payload"),
            _ => panic!("ractor_cluster call timed out or failed"),
        }
    }
}

/// Two `NodeServer`s on 127.0.0.1 (b dials a) and the echo actor, seen from b as a remote actor.
async fn ractor_cluster_pair() -> Result<ClusterRpc, BoxError> {
    let localhost = std::net::IpAddr::from([127, 0, 0, 1]);
    let port_a = free_tcp_port()?;
    let port_b = free_tcp_port()?;
    let cookie = "tidepool-bench".to_string();
    let server_a = NodeServer::new(
        port_a,
        cookie.clone(),
        "node-a".into(),
        "localhost".into(),
        None,
        None,
    )
    .with_listen_addr(localhost);
    let server_b = NodeServer::new(
        port_b,
        cookie,
        "node-b".into(),
        "localhost".into(),
        None,
        None,
    )
    .with_listen_addr(localhost);
    let (_a, _) = Actor::spawn(None, server_a, ()).await?;
    let (b, _) = Actor::spawn(None, server_b, ()).await?;
    let (_echo, _) = Actor::spawn(None, EchoActor, ()).await?;
    // The listener binds in the server's post_start; give it a moment before dialing.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ractor_cluster::client_connect(&b, ("127.0.0.1", port_a)).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("ractor_cluster connect: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.to_string().into()),
        }
    }
    // The session authenticates, then syncs process groups; the echo actor shows up as remote.
    while Instant::now() < deadline {
        let remote = ractor::pg::get_members(&PG_GROUP.to_string())
            .into_iter()
            .find(|c| !c.get_id().is_local());
        if let Some(cell) = remote {
            return Ok(ClusterRpc {
                remote: ActorRef::from(cell),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err("ractor_cluster: the remote echo actor never appeared in the process group".into())
}

/// Runs `n` requests with [`IN_FLIGHT`] outstanding at a time; returns the elapsed time.
async fn throughput<R: Rpc>(rpc: &R, n: u64) -> Duration {
    let left = Arc::new(AtomicU64::new(n));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT.min(n) {
        let (rpc, left) = (rpc.clone(), left.clone());
        tasks.spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
                .is_ok()
            {
                rpc.call().await;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("worker task");
    }
    start.elapsed()
}

/// Runs `n` requests one after another; returns each round trip.
async fn round_trips<R: Rpc>(rpc: &R, n: usize, out: &mut Vec<Duration>) {
    for _ in 0..n {
        let t = Instant::now();
        rpc.call().await;
        out.push(t.elapsed());
    }
}

fn messaging(c: &mut Criterion) {
    let rt = runtime();
    let (pair, cluster): (Pair, ClusterRpc) = rt.block_on(async {
        let pair = transport_pair().await.expect("tidepool transport pair");
        let cluster = ractor_cluster_pair().await.expect("ractor_cluster pair");
        (pair, cluster)
    });
    let tidepool = TidepoolRpc {
        link: pair.link.clone(),
    };

    let mut g = c.benchmark_group("messaging/throughput_256_in_flight");
    g.throughput(Throughput::Elements(1));
    g.bench_function("tidepool_quic_mtls", |b| {
        b.iter_custom(|n| rt.block_on(throughput(&tidepool, n)))
    });
    g.bench_function("ractor_cluster_tcp", |b| {
        b.iter_custom(|n| rt.block_on(throughput(&cluster, n)))
    });
    g.finish();

    let mut g = c.benchmark_group("messaging/rtt");
    g.throughput(Throughput::Elements(1));
    g.bench_function("tidepool_quic_mtls", |b| {
        b.iter_custom(|n| rt.block_on(timed(&tidepool, n)))
    });
    g.bench_function("ractor_cluster_tcp", |b| {
        b.iter_custom(|n| rt.block_on(timed(&cluster, n)))
    });
    g.finish();

    // Tails, from one fixed pass each (after warm connections and allocators).
    for (name, p) in [
        ("tidepool_quic_mtls", rt.block_on(percentiles(&tidepool))),
        ("ractor_cluster_tcp", rt.block_on(percentiles(&cluster))),
    ] {
        println!(
            "messaging rtt {name}: n={} mean={:?} p50={:?} p99={:?}",
            p.n, p.mean, p.p50, p.p99
        );
        report(
            "messaging",
            &format!("{name}.rtt_p50_us"),
            p.p50.as_secs_f64() * 1e6,
            "us",
        );
        report(
            "messaging",
            &format!("{name}.rtt_p99_us"),
            p.p99.as_secs_f64() * 1e6,
            "us",
        );
    }

    rt.block_on(pair.a.shutdown(Duration::from_millis(200)));
    rt.block_on(pair.b.shutdown(Duration::from_millis(200)));
}

async fn timed<R: Rpc>(rpc: &R, n: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        rpc.call().await;
    }
    start.elapsed()
}

async fn percentiles<R: Rpc>(rpc: &R) -> Percentiles {
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    round_trips(rpc, LATENCY_SAMPLES / 10, &mut samples).await;
    samples.clear();
    round_trips(rpc, LATENCY_SAMPLES, &mut samples).await;
    Percentiles::of(&mut samples)
}

criterion_group! {
    name = benches;
    config = tidepool_benches::criterion();
    targets = messaging
}
criterion_main!(benches);
