//! Shared setup for the Tidepool benchmarks.
//!
//! # Layout
//! - [`Certs`]: a cluster CA and node certificates in a temp dir (what `tidepool certs` makes).
//! - [`transport_pair`]: two [`Transport`]s on 127.0.0.1 with mutual TLS and a live link a → b.
//! - [`Echo`]: the `Inbound` handler of the receiving node: pings, 64-byte puts and tensors.
//! - [`criterion`], [`runtime`]: the short, 2-core settings every bench uses.
//! - [`Percentiles`], [`report`]: numbers criterion does not give (p50/p99, ratios), printed as
//!   `RESULT` lines and appended to `target/tidepool-bench/results.jsonl` for `benches/run.py`.
//!
//! Every bench measures Tidepool and its peer in the same process and the same run, so a noisy
//! machine shifts both; only the ratios are meant to be compared across machines.
#![forbid(unsafe_code)]

#[cfg(all(feature = "node", feature = "ractor-cluster"))]
compile_error!(
    "features `node` and `ractor-cluster` cannot be built together (ractor's `cluster` feature \
     removes the blanket Message impl tidepool-actors relies on); see benches/README.md"
);

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tidepool_runtime::certs::{self, Identity, Subject, Validity};
use tidepool_runtime::codec::{
    ArchivedBody, ArchivedOp, Body, Dest, Envelope, Frame, OpResult, TensorView,
};
use tidepool_runtime::transport::{
    BoxFuture, Inbound, Link, PeerPolicy, Socket, TlsMaterial, Transport, TransportConfig,
};

/// Error type of the setup helpers (benches unwrap it: a failed setup is a failed run).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A cluster CA and node certificates under one temp dir, removed on drop.
#[derive(Debug)]
pub struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    /// Creates the CA and one node certificate per name, each in `<tmp>/<name>/`.
    pub fn new(nodes: &[&str]) -> Result<Self, BoxError> {
        let dir = tempfile::tempdir()?;
        let ca = dir.path().join("ca");
        certs::init_ca(&ca)?;
        for name in nodes {
            certs::issue(
                &ca,
                &Subject::Node((*name).to_string()),
                &dir.path().join(name),
                Validity::days_from_now(1),
            )?;
        }
        Ok(Certs { dir })
    }

    /// Directory holding `ca.pem`, `node.pem`, `node.key` of `name`.
    pub fn node_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn material(&self, name: &str) -> Result<TlsMaterial, BoxError> {
        Ok(TlsMaterial::load_node(&self.node_dir(name))?)
    }

    /// Scratch space that lives as long as the certificates (node data dirs).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Admits every identity the CA vouches for (the benches have no membership to enforce).
#[derive(Debug)]
pub struct AdmitAll;

impl PeerPolicy for AdmitAll {
    fn admit(&self, _peer: &Identity) -> Result<(), String> {
        Ok(())
    }
}

/// Answers requests the way the peers in the benches do, inline on the stream's reader task:
/// - `Ping(n)` → `Pong(n)`;
/// - `ShardRequest(Put { value })` → `ShardReply(Value(Some(value)))` (echo of a small payload);
/// - `ShardRequest(AddTensor { values })` → reads every f32 in place (sums them) → `ShardReply(Done)`.
#[derive(Debug)]
pub struct Echo {
    name: String,
}

impl Echo {
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Echo {
            name: name.to_string(),
        })
    }

    fn answer(&self, frame: &Frame) -> Option<Body> {
        Some(match &frame.envelope().body {
            ArchivedBody::Ping(n) => Body::Pong(n.to_native()),
            ArchivedBody::ShardRequest(req) => match &req.op {
                ArchivedOp::Put { value, .. } => {
                    Body::ShardReply(OpResult::Value(Some(value.as_slice().to_vec())))
                }
                ArchivedOp::AddTensor { values, .. } => {
                    std::hint::black_box(sum_f32(values.as_f32s()));
                    Body::ShardReply(OpResult::Done)
                }
                _ => return None,
            },
            _ => return None,
        })
    }
}

impl Inbound for Echo {
    fn on_request(&self, link: Link, frame: Frame) -> BoxFuture {
        let corr = frame.envelope().correlation.to_native();
        let reply = self
            .answer(&frame)
            .map(|body| Envelope::new(self.name.clone(), Dest::Peer, corr, body));
        Box::pin(async move {
            if let Some(env) = reply {
                // A failed reply shows up as a request timeout on the sender; nothing to do here.
                let _ = link.send(&env).await;
            }
        })
    }
}

/// Two transports, "a" and "b", on 127.0.0.1, both serving [`Echo`], and a's live link to b.
#[derive(Debug)]
pub struct Pair {
    pub a: Transport,
    pub b: Transport,
    /// a → b.
    pub link: Link,
    /// Keeps the certificate files alive as long as the pair.
    pub certs: Certs,
}

/// Binds, introduces and connects two transports (QUIC + mutual TLS on loopback). Must run
/// inside a tokio runtime.
pub async fn transport_pair() -> Result<Pair, BoxError> {
    let certs = Certs::new(&["a", "b"])?;
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let a = Transport::bind(
        "a",
        Socket::Bind(any),
        &certs.material("a")?,
        Arc::new(AdmitAll),
        TransportConfig::default(),
    )?;
    let b = Transport::bind(
        "b",
        Socket::Bind(any),
        &certs.material("b")?,
        Arc::new(AdmitAll),
        TransportConfig::default(),
    )?;
    let members = [
        ("a".to_string(), a.local_addr()?),
        ("b".to_string(), b.local_addr()?),
    ];
    a.set_members(members.clone());
    b.set_members(members);
    a.start(Echo::new("a"));
    b.start(Echo::new("b"));
    let link = a.link("b").await?;
    Ok(Pair { a, b, link, certs })
}

/// The tokio runtime of every bench: two workers, one per core of the benchmark machine.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Short criterion settings for a 2-core shared machine: the whole suite runs in minutes.
/// `TIDEPOOL_BENCH_SECS` overrides the measurement time (seconds).
pub fn criterion() -> criterion::Criterion {
    let secs = std::env::var("TIDEPOOL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    criterion::Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs_f64(secs))
        .without_plots()
}

/// Sums f32s in 16 independent lanes so the compiler vectorizes it: reading 4 MiB costs about
/// a memory pass, not a 1M-long chain of dependent adds.
pub fn sum_f32(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Latency percentiles of a set of samples.
#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    pub n: usize,
    pub mean: Duration,
    pub p50: Duration,
    pub p99: Duration,
}

impl Percentiles {
    /// Nearest-rank percentiles; sorts `samples`.
    pub fn of(samples: &mut [Duration]) -> Self {
        assert!(!samples.is_empty(), "no samples");
        samples.sort_unstable();
        let rank = |p: f64| {
            samples[((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1]
        };
        let total: Duration = samples.iter().sum();
        Percentiles {
            n: samples.len(),
            mean: total / samples.len() as u32,
            p50: rank(0.50),
            p99: rank(0.99),
        }
    }
}

/// Prints one number as `RESULT <bench> <key> <value> <unit>` and appends it to
/// `$TIDEPOOL_BENCH_OUT/results.jsonl` (default `target/tidepool-bench/`), where
/// `benches/run.py` collects the medians of repeated runs.
pub fn report(bench: &str, key: &str, value: f64, unit: &str) {
    println!("RESULT {bench} {key} {value:.6} {unit}");
    let dir = std::env::var_os("TIDEPOOL_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tidepool-bench"));
    let line = format!(
        "{{\"bench\":\"{bench}\",\"key\":\"{key}\",\"value\":{value},\"unit\":\"{unit}\"}}\n"
    );
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("results.jsonl"))?
            .write_all(line.as_bytes())
    });
    if let Err(e) = written {
        eprintln!("cannot record {bench}/{key} in {}: {e}", dir.display());
    }
}

/// Minor page faults of this process so far (Linux `/proc/self/stat`; 0 elsewhere). Fresh 4 MiB
/// buffers cost ~1000 faults each, which on a VM can outweigh copying them.
pub fn minor_faults() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; minflt is field 10 of the whole line.
            let rest = &s[s.rfind(')')? + 2..];
            rest.split(' ').nth(7)?.parse().ok()
        })
        .unwrap_or(0)
}

/// A free TCP port on 127.0.0.1 (for servers that want a port number, not a bound socket).
pub fn free_tcp_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
