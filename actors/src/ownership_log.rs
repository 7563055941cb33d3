//! The ownership log: JSON lines saying when this node began and stopped serving each shard, for
//! operators and for the no-two-owners checkers (`tests/elastic.rs`, chaos checker 2).
//!
//! Every instant is taken on this node's monotonic clock, at the moment admission began or
//! ended (a lease lapse is dated at the lease's own expiry, however late the process noticed it),
//! and written as wall-clock microseconds: the wall clock now, minus how long ago the instant was
//! on the monotonic clock. The two clocks are read in a bracket (monotonic, wall, monotonic) that
//! is retried until it is tight, because a starved process can be descheduled between two reads
//! for tens of milliseconds, which would shift every instant it logs (found by the starved
//! rolling restart: a 34 ms phantom overlap). Lines are appended by a writer thread, in the order
//! they were recorded, so no runtime thread waits on the disk.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Lines queued for the writer at most; past it `record` waits (ownership changes are rare:
/// a few per shard per move).
const QUEUE: usize = 4096;

/// Whether an interval began or ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Start,
    Stop,
}

impl Event {
    fn as_str(self) -> &'static str {
        match self {
            Event::Start => "start",
            Event::Stop => "stop",
        }
    }
}

enum Item {
    Line(String),
    Flush(mpsc::SyncSender<()>),
}

/// Handle to the writer; cheap to clone. Without a path, records nothing.
#[derive(Debug, Clone)]
pub struct OwnershipLog {
    node: String,
    tx: Option<mpsc::SyncSender<Item>>,
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Item")
    }
}

/// A bracket wider than this is retried: the process was descheduled between the reads.
const TIGHT: std::time::Duration = std::time::Duration::from_micros(200);

/// `at` as wall-clock microseconds since the Unix epoch.
pub fn wall_us(at: Instant) -> u64 {
    let mut best: Option<(std::time::Duration, Instant, SystemTime)> = None;
    for _ in 0..64 {
        let before = Instant::now();
        let wall = SystemTime::now();
        let after = Instant::now();
        let width = after.saturating_duration_since(before);
        if best.is_none_or(|(w, _, _)| width < w) {
            best = Some((width, before + width / 2, wall));
        }
        if width <= TIGHT {
            break;
        }
    }
    let Some((_, mono, wall)) = best else {
        return 0;
    };
    let t = if at >= mono {
        wall.checked_add(at - mono)
    } else {
        wall.checked_sub(mono - at)
    };
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_micros() as u64)
}

impl OwnershipLog {
    /// Starts the writer appending to `path` (nothing is recorded without one).
    pub fn start(node: &str, path: Option<PathBuf>) -> Self {
        let tx = path.map(|path| {
            let (tx, rx) = mpsc::sync_channel::<Item>(QUEUE);
            let spawned = std::thread::Builder::new()
                .name("ownership-log".into())
                .spawn(move || write_loop(&path, &rx));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the ownership log writer");
            }
            tx
        });
        OwnershipLog {
            node: node.to_string(),
            tx,
        }
    }

    /// Records that this node began or stopped serving `shard` at `epoch`, at instant `at`.
    pub fn record(&self, shard: u32, epoch: u64, event: Event, at: Instant) {
        let Some(tx) = &self.tx else { return };
        let line = format!(
            "{{\"ts_us\":{},\"node\":\"{}\",\"shard\":{shard},\"epoch\":{epoch},\"event\":\"{}\"}}\n",
            wall_us(at),
            self.node,
            event.as_str()
        );
        let _ = tx.send(Item::Line(line));
    }

    /// Waits until everything recorded so far is written (before the process exits).
    pub fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        if tx.send(Item::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv_timeout(std::time::Duration::from_secs(5));
        }
    }
}

fn write_loop(path: &std::path::Path, rx: &mpsc::Receiver<Item>) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path);
    let mut file = match file {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot open the ownership log");
            None
        }
    };
    while let Ok(item) = rx.recv() {
        match item {
            Item::Line(line) => {
                if let Some(f) = file.as_mut() {
                    if let Err(e) = f.write_all(line.as_bytes()) {
                        tracing::warn!(error = %e, "cannot record ownership event");
                    }
                }
            }
            Item::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_convert_to_wall_time_and_lines_are_written_in_order() {
        let t0 = Instant::now();
        let t1 = t0 + std::time::Duration::from_millis(1500);
        // Each conversion brackets the two clocks within 200 us.
        assert!((wall_us(t1) - wall_us(t0)).abs_diff(1_500_000) <= 500);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ownership.log");
        let log = OwnershipLog::start("n1", Some(path.clone()));
        log.record(3, 7, Event::Start, t0);
        log.record(3, 7, Event::Stop, t1);
        log.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "start");
        assert_eq!(lines[1]["event"], "stop");
        assert_eq!(lines[0]["node"], "n1");
        let gap = lines[1]["ts_us"].as_u64().unwrap() - lines[0]["ts_us"].as_u64().unwrap();
        assert!(gap.abs_diff(1_500_000) <= 500, "{gap}");
        OwnershipLog::start("n1", None).record(1, 1, Event::Start, t0);
    }
}
