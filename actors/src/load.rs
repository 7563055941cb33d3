//! The node's load signals: worker utilisation (busy-time ratio), runnable backlog, mailbox
//! depths and QUIC connection statistics, sampled every second into metrics, and the latest
//! figures that ride on lease renewals to the leader's autoscaler.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidepool_runtime::metrics as m;
use tidepool_runtime::transport::Transport;

use crate::router::Router;

/// How often the sampler runs.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Utilisation is the busy-time ratio over this window (a few samples, to smooth bursts).
const WINDOW: usize = 5;

/// Counters the worker pools feed: busy time, threads, queued tasks.
#[derive(Debug, Default)]
pub struct LoadMeter {
    busy_nanos: AtomicU64,
    threads: AtomicUsize,
    queued: AtomicI64,
    latest: Mutex<(f64, u64)>,
}

impl LoadMeter {
    pub fn new() -> Arc<Self> {
        Arc::new(LoadMeter::default())
    }

    /// A pool with `n` threads reports to this meter.
    pub fn add_threads(&self, n: usize) {
        self.threads.fetch_add(n, Ordering::Relaxed);
        metrics::gauge!(m::WORKER_THREADS).set(self.threads.load(Ordering::Relaxed) as f64);
    }

    /// A task ran for `busy`.
    pub fn task_ran(&self, busy: Duration) {
        let nanos = u64::try_from(busy.as_nanos()).unwrap_or(u64::MAX);
        self.busy_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// A task started (`+1`) or stopped (`-1`) waiting for a worker.
    pub fn queued(&self, delta: i64) {
        self.queued.fetch_add(delta, Ordering::Relaxed);
    }

    /// The latest (utilisation 0..=1, backlog), as sent with lease renewals.
    pub fn latest(&self) -> (f64, u64) {
        *self.latest.lock()
    }
}

/// Samples the node's load every [`SAMPLE_EVERY`] into metrics and [`LoadMeter::latest`].
pub async fn sample_loop(meter: Arc<LoadMeter>, router: Router, transport: Transport) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut window: std::collections::VecDeque<(Instant, u64)> = Default::default();
    let mut quic: HashMap<String, (u64, u64)> = HashMap::new();
    loop {
        tick.tick().await;
        metrics::gauge!(m::TRANSPORT_INFLIGHT_BYTES).set(transport.inflight_bytes() as f64);
        let now = Instant::now();
        let busy = meter.busy_nanos.load(Ordering::Relaxed);
        window.push_back((now, busy));
        while window.len() > WINDOW + 1 {
            window.pop_front();
        }
        let threads = meter.threads.load(Ordering::Relaxed).max(1) as f64;
        let utilization = match (window.front(), window.back()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => {
                let span = t1.duration_since(*t0).as_nanos() as f64;
                ((b1 - b0) as f64 / (span * threads)).clamp(0.0, 1.0)
            }
            _ => 0.0,
        };
        let queued = meter.queued.load(Ordering::Relaxed).max(0) as u64;
        let shards: u64 = router
            .owned_shards()
            .iter()
            .map(|&s| router.inflight(s) as u64)
            .sum();
        let links = transport.live_links();
        let send_queues: u64 = links.iter().map(|l| l.queued() as u64).sum();
        let backlog = queued + shards;
        *meter.latest.lock() = (utilization, backlog);
        metrics::gauge!(m::WORKER_UTILIZATION).set(utilization);
        metrics::gauge!(m::BACKLOG).set(backlog as f64);
        metrics::gauge!(m::MAILBOX_DEPTH, "mailbox" => "workers").set(queued as f64);
        metrics::gauge!(m::MAILBOX_DEPTH, "mailbox" => "shards").set(shards as f64);
        metrics::gauge!(m::MAILBOX_DEPTH, "mailbox" => "send_queues").set(send_queues as f64);
        // Whole seconds (metrics counters are integers): rate() over a minute or more is exact
        // enough; the utilisation gauge above has full resolution.
        metrics::counter!(m::WORKER_BUSY_SECONDS).absolute(busy / 1_000_000_000);

        let mut rtt = Duration::ZERO;
        let mut cwnd: Option<u64> = None;
        let mut seen = HashMap::new();
        for l in &links {
            let st = l.stats();
            rtt = rtt.max(st.path.rtt);
            cwnd = Some(cwnd.map_or(st.path.cwnd, |c| c.min(st.path.cwnd)));
            let key = l.peer().name.clone();
            let (lost, sent) = (st.path.lost_packets, st.path.sent_packets);
            // Counters are per connection: add what grew since the last sample; a new
            // connection (counts went down) counts from zero.
            let (lost0, sent0) = quic.get(&key).copied().unwrap_or((0, 0));
            let (dl, ds) = if lost >= lost0 && sent >= sent0 {
                (lost - lost0, sent - sent0)
            } else {
                (lost, sent)
            };
            metrics::counter!(m::QUIC_LOST).increment(dl);
            metrics::counter!(m::QUIC_SENT).increment(ds);
            seen.insert(key, (lost, sent));
        }
        quic = seen;
        metrics::gauge!(m::QUIC_RTT).set(rtt.as_secs_f64());
        metrics::gauge!(m::QUIC_CWND).set(cwnd.unwrap_or(0) as f64);
    }
}
