//! `WorkerPool`: a bounded pool for CPU-heavy work. Tasks run on tokio's blocking threads, at
//! most `threads` at once, with at most `queue_depth` more waiting; past that, callers are refused
//! (the caller turns that into a retryable "overloaded"), so the queue never grows without bound.

use std::sync::Arc;

use std::time::Instant;

use tidepool_runtime::metrics as m;
use tokio::sync::Semaphore;

use crate::load::LoadMeter;

/// Counts a task as queued in the meter until dropped (also when the caller gives up waiting).
struct Queued(Option<Arc<LoadMeter>>);

impl Queued {
    fn new(meter: Option<Arc<LoadMeter>>) -> Self {
        if let Some(m) = &meter {
            m.queued(1);
        }
        Queued(meter)
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if let Some(m) = &self.0 {
            m.queued(-1);
        }
    }
}

/// Why the pool did not run a task.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Every worker is busy and the queue is full.
    #[error("worker pool is full ({0} tasks queued)")]
    Full(usize),
    /// The task panicked; the pool itself is fine.
    #[error("task failed: {0}")]
    Panicked(String),
}

/// A handle to the pool. Cheap to clone.
#[derive(Debug, Clone)]
pub struct WorkerPool {
    running: Arc<Semaphore>,
    admitted: Arc<Semaphore>,
    queue_depth: usize,
    meter: Option<Arc<LoadMeter>>,
}

impl WorkerPool {
    /// `threads` = 0 means one per CPU.
    pub fn new(threads: usize, queue_depth: usize) -> Self {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            threads
        };
        WorkerPool {
            running: Arc::new(Semaphore::new(threads)),
            admitted: Arc::new(Semaphore::new(threads + queue_depth)),
            queue_depth,
            meter: None,
        }
    }

    /// Like [`WorkerPool::new`], reporting busy time and queueing to `meter` (the node's load
    /// signals).
    pub fn with_meter(threads: usize, queue_depth: usize, meter: Arc<LoadMeter>) -> Self {
        let mut pool = Self::new(threads, queue_depth);
        meter.add_threads(pool.running.available_permits());
        pool.meter = Some(meter);
        pool
    }

    /// Runs `f` on a blocking thread and returns its result.
    pub async fn run<T, F>(&self, f: F) -> Result<T, WorkerError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let Ok(_admitted) = self.admitted.clone().try_acquire_owned() else {
            return Err(WorkerError::Full(self.queue_depth));
        };
        let submitted = Instant::now();
        metrics::gauge!(m::WORKER_QUEUED).increment(1.0);
        let queued = Queued::new(self.meter.clone());
        let running = self.running.clone().acquire_owned().await;
        drop(queued);
        metrics::gauge!(m::WORKER_QUEUED).decrement(1.0);
        let Ok(_running) = running else {
            return Err(WorkerError::Panicked("pool closed".into()));
        };
        metrics::gauge!(m::WORKER_BUSY).increment(1.0);
        let started = Instant::now();
        let out = tokio::task::spawn_blocking(f).await;
        if let Some(meter) = &self.meter {
            meter.task_ran(started.elapsed());
        }
        metrics::gauge!(m::WORKER_BUSY).decrement(1.0);
        metrics::counter!(m::WORKER_TASKS).increment(1);
        metrics::histogram!(m::TASK_SECONDS).record(submitted.elapsed().as_secs_f64());
        out.map_err(|e| WorkerError::Panicked(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_past_the_queue_and_survives_panics() {
        let pool = WorkerPool::new(1, 1);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let blocker = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(move || rx.recv().ok()).await })
        };
        let queued = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(|| 7).await })
        };
        // Wait until both slots are taken, then a third task must be refused.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while pool.admitted.available_permits() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "tasks never got admitted"
            );
            tokio::task::yield_now().await;
        }
        assert!(matches!(pool.run(|| 0).await, Err(WorkerError::Full(1))));
        tx.send(()).unwrap();
        assert!(blocker.await.unwrap().is_ok());
        assert_eq!(queued.await.unwrap().unwrap(), 7);
        assert!(matches!(
            pool.run(|| panic!("boom")).await,
            Err(WorkerError::Panicked(_))
        ));
        assert_eq!(pool.run(|| 1).await.unwrap(), 1);
    }
}
