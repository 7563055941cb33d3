//! 4 MiB tensors (1M f32) from one node to another on 127.0.0.1, each acknowledged, one at a
//! time. Tidepool against the limit: a bare quinn connection with the same TLS and QUIC
//! settings that moves the same bytes and nothing else.
//!
//! - `tidepool`: `Link::request` of `ShardRequest(AddTensor { values })`. The receiver gets the
//!   validated frame, reads every f32 in place through `TensorView::as_f32s` (sums them), and
//!   replies `ShardReply(Done)`. Timed per message: encode (rkyv), queue, QUIC write on a
//!   stream of its own, read into an aligned buffer, bytecheck validation, the sum, the reply.
//!   The envelope is cloned for each send (`request` takes it by value); `envelope_clone`
//!   times that clone alone, since a real sender builds each gradient anyway. `encode_only` and
//!   `from_wire_only` (copy into an aligned buffer + validation, about what the receiver's
//!   `read_frame` adds to the raw read) time two more pieces, for the breakdown.
//! - `quinn_raw`: open a bidi stream, write the 4 MiB as one `Bytes` (no copy), finish; the
//!   receiver reads every chunk and drops it (no copy, no parse), then writes a 1-byte ack.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use quinn::Endpoint;
use tidepool_benches::{minor_faults, report, runtime, transport_pair, AdmitAll, BoxError, Certs};
use tidepool_runtime::codec::{
    encode, ArchivedBody, ArchivedOpResult, Body, Dest, Envelope, Frame, IdemKey, Op, ShardRequest,
    DEFAULT_MAX_FRAME_BYTES,
};
use tidepool_runtime::transport::tls;

const LEN: usize = 1 << 20;
const BYTES: usize = LEN * 4;
const TIMEOUT: Duration = Duration::from_secs(30);

fn tensor_envelope() -> Envelope {
    let values: Vec<f32> = (0..LEN).map(|i| i as f32 * 0.5).collect();
    let req = ShardRequest {
        idem: IdemKey { sender: 1, seq: 1 },
        op: Op::AddTensor {
            key: "w".into(),
            values,
        },
    };
    Envelope::new("a", Dest::Node("b".into()), 0, Body::ShardRequest(req))
}

/// A quinn server ("b") and client ("a") with Tidepool's TLS material and transport settings.
struct RawQuinn {
    conn: quinn::Connection,
    payload: bytes::Bytes,
    _server: Endpoint,
    _client: Endpoint,
    _certs: Certs,
}

async fn raw_quinn() -> Result<RawQuinn, BoxError> {
    let certs = Certs::new(&["a", "b"])?;
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let server = Endpoint::server(
        tls::server_config(&certs.material("b")?, Arc::new(AdmitAll))?,
        any,
    )?;
    let addr = server.local_addr()?;
    let acceptor = server.clone();
    tokio::spawn(async move {
        while let Some(incoming) = acceptor.accept().await {
            let Ok(conn) = incoming.await else { continue };
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let mut got = 0usize;
                        while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX, true).await {
                            got += chunk.bytes.len();
                        }
                        if got == BYTES {
                            let _ = send.write_all(&[1]).await;
                        }
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    let mut client = Endpoint::client(any)?;
    client.set_default_client_config(tls::client_config(&certs.material("a")?)?);
    let conn = client.connect(addr, "b")?.await?;
    let payload = bytes::Bytes::from(vec![0x5Au8; BYTES]);
    Ok(RawQuinn {
        conn,
        payload,
        _server: server,
        _client: client,
        _certs: certs,
    })
}

impl RawQuinn {
    async fn send(&self) {
        let (mut send, mut recv) = self.conn.open_bi().await.expect("open stream");
        send.write_chunk(self.payload.clone()).await.expect("write");
        send.finish().expect("finish");
        let ack = recv.read_to_end(16).await.expect("ack");
        assert_eq!(ack, [1], "receiver got the whole tensor");
    }
}

fn tensor(c: &mut Criterion) {
    let rt = runtime();
    let (pair, raw) = rt.block_on(async {
        (
            transport_pair().await.expect("tidepool transport pair"),
            raw_quinn().await.expect("raw quinn pair"),
        )
    });
    let env = tensor_envelope();
    let tidepool_send = |env: Envelope| {
        let link = pair.link.clone();
        async move {
            let reply = link.request(env, TIMEOUT).await.expect("tensor request");
            assert!(
                matches!(
                    reply.envelope().body,
                    ArchivedBody::ShardReply(ArchivedOpResult::Done)
                ),
                "tensor acknowledged"
            );
        }
    };

    // Page faults and messages over every timed loop (warm-up included), per system.
    let faults = [Cell::new((0u64, 0u64)), Cell::new((0u64, 0u64))];
    let counted = |i: usize, n: u64, took: Duration, before: u64| {
        let (f, m) = faults[i].get();
        faults[i].set((f + minor_faults() - before, m + n));
        took
    };

    let mut g = c.benchmark_group("tensor/4MiB_acked");
    g.throughput(Throughput::Bytes(BYTES as u64));
    g.bench_function("tidepool", |b| {
        b.iter_custom(|n| {
            let before = minor_faults();
            let took = rt.block_on(async {
                let start = Instant::now();
                for _ in 0..n {
                    tidepool_send(env.clone()).await;
                }
                start.elapsed()
            });
            counted(0, n, took, before)
        })
    });
    g.bench_function("quinn_raw", |b| {
        b.iter_custom(|n| {
            let before = minor_faults();
            let took = rt.block_on(async {
                let start = Instant::now();
                for _ in 0..n {
                    raw.send().await;
                }
                start.elapsed()
            });
            counted(1, n, took, before)
        })
    });
    // Pieces of the Tidepool path, for the breakdown in BENCHMARKS.md (not peers). Each frees
    // its result before the next iteration, so these run on recycled memory.
    g.bench_function("envelope_clone", |b| b.iter(|| env.clone()));
    g.bench_function("encode_only", |b| b.iter(|| encode(&env).expect("encode")));
    let wire = encode(&env).expect("encode").to_vec();
    g.bench_function("from_wire_only", |b| {
        b.iter(|| Frame::from_wire(&wire, DEFAULT_MAX_FRAME_BYTES).expect("valid"))
    });
    g.finish();

    for (i, name) in ["tidepool", "quinn_raw"].into_iter().enumerate() {
        let (f, m) = faults[i].get();
        report(
            "tensor",
            &format!("{name}.page_faults_per_msg"),
            f as f64 / m.max(1) as f64,
            "faults",
        );
    }

    rt.block_on(pair.a.shutdown(Duration::from_millis(200)));
    rt.block_on(pair.b.shutdown(Duration::from_millis(200)));
}

criterion_group! {
    name = benches;
    config = tidepool_benches::criterion();
    targets = tensor
}
criterion_main!(benches);
