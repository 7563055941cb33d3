//! Byte budgets: how much memory one connection, or the whole node, may hold for what peers
//! sent (frames being received or waiting to be handled) or for what we owe them (replies
//! queued for a peer that may not be reading).
//!
//! A budget is a semaphore whose permits are bytes. Memory is reserved *before* it is
//! allocated, in steps as bytes arrive, so a peer that announces a large frame and sends
//! nothing holds nothing; a [`Held`] reservation returns its bytes when dropped (with the
//! buffer it paid for). Nothing here allocates in proportion to a number a peer announced.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Errors reserving bytes. Each leaves nothing reserved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BudgetError {
    /// More than the whole budget was asked for: it can never be granted.
    #[error("{bytes} bytes exceed the {name} budget of {total} bytes")]
    TooLarge {
        name: &'static str,
        bytes: usize,
        total: usize,
    },
    /// The budget stayed exhausted for the whole wait.
    #[error("the {name} budget of {total} bytes stayed exhausted for {waited:?}")]
    Exhausted {
        name: &'static str,
        total: usize,
        waited: Duration,
    },
}

/// A byte budget. Cheap to clone; clones share the bytes.
#[derive(Clone, Debug)]
pub struct Budget {
    sem: Arc<Semaphore>,
    total: usize,
    name: &'static str,
}

/// Bytes reserved from one or more budgets; returned when dropped.
#[derive(Debug, Default)]
pub struct Held {
    permits: Vec<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Held {
    /// Bytes held (counted once, however many budgets they came from).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn absorb(&mut self, p: OwnedSemaphorePermit) {
        // Permits of the same semaphore merge; otherwise keep one entry per budget.
        let same = self
            .permits
            .iter_mut()
            .find(|h| Arc::ptr_eq(h.semaphore(), p.semaphore()));
        match same {
            Some(h) => h.merge(p),
            None => self.permits.push(p),
        }
    }
}

/// The largest reservation one call may ask for (the semaphore counts in `u32`).
const MAX_STEP: usize = u32::MAX as usize;

impl Budget {
    /// A budget of `total` bytes, named for errors and metrics.
    pub fn new(name: &'static str, total: usize) -> Budget {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        Budget {
            sem: Arc::new(Semaphore::new(total)),
            total,
            name,
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> usize {
        self.total - self.sem.available_permits()
    }

    fn check(&self, bytes: usize) -> Result<u32, BudgetError> {
        if bytes > self.total || bytes > MAX_STEP {
            return Err(BudgetError::TooLarge {
                name: self.name,
                bytes,
                total: self.total,
            });
        }
        Ok(bytes as u32)
    }

    /// Reserves `bytes` now or fails at once.
    pub fn try_reserve_into(&self, held: &mut Held, bytes: usize) -> Result<(), BudgetError> {
        let n = self.check(bytes)?;
        match self.sem.clone().try_acquire_many_owned(n) {
            Ok(p) => {
                held.absorb(p);
                Ok(())
            }
            Err(TryAcquireError::NoPermits) | Err(TryAcquireError::Closed) => {
                Err(BudgetError::Exhausted {
                    name: self.name,
                    total: self.total,
                    waited: Duration::ZERO,
                })
            }
        }
    }

    /// Reserves `bytes`, waiting up to `wait` for other holders to return theirs.
    pub async fn reserve_into(
        &self,
        held: &mut Held,
        bytes: usize,
        wait: Duration,
    ) -> Result<(), BudgetError> {
        let n = self.check(bytes)?;
        match tokio::time::timeout(wait, self.sem.clone().acquire_many_owned(n)).await {
            Ok(Ok(p)) => {
                held.absorb(p);
                Ok(())
            }
            _ => Err(BudgetError::Exhausted {
                name: self.name,
                total: self.total,
                waited: wait,
            }),
        }
    }
}

/// The two budgets a connection's traffic counts against: its own and the node's.
#[derive(Clone, Debug)]
pub struct Budgets {
    pub connection: Budget,
    pub node: Budget,
    /// How long to wait for bytes before giving up on a frame.
    pub wait: Duration,
}

impl Budgets {
    /// Reserves `bytes` from both budgets (the connection's first, so a greedy peer mostly
    /// waits on its own budget), adding them to `held`. On error nothing more is held.
    pub async fn reserve(&self, held: &mut Held, bytes: usize) -> Result<(), BudgetError> {
        let mut step = Held::default();
        self.connection
            .reserve_into(&mut step, bytes, self.wait)
            .await?;
        self.node.reserve_into(&mut step, bytes, self.wait).await?;
        for p in step.permits {
            held.absorb(p);
        }
        held.bytes += bytes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn budgets(conn: usize, node: usize) -> Budgets {
        Budgets {
            connection: Budget::new("connection", conn),
            node: Budget::new("node", node),
            wait: Duration::from_millis(20),
        }
    }

    #[tokio::test]
    async fn reservations_count_against_both_and_return_on_drop() {
        let b = budgets(100, 150);
        let mut h = Held::default();
        b.reserve(&mut h, 60).await.unwrap();
        b.reserve(&mut h, 40).await.unwrap();
        assert_eq!(h.bytes(), 100);
        assert_eq!(b.connection.in_use(), 100);
        assert_eq!(b.node.in_use(), 100);
        // One semaphore entry per budget, however many steps.
        assert_eq!(h.permits.len(), 2);
        drop(h);
        assert_eq!(b.connection.in_use(), 0);
        assert_eq!(b.node.in_use(), 0);
    }

    #[tokio::test]
    async fn exhausted_budget_fails_after_the_wait_and_holds_nothing() {
        let b = budgets(100, 1000);
        let mut h = Held::default();
        b.reserve(&mut h, 90).await.unwrap();
        let mut more = Held::default();
        let e = b.reserve(&mut more, 20).await.unwrap_err();
        assert!(matches!(
            e,
            BudgetError::Exhausted {
                name: "connection",
                ..
            }
        ));
        assert_eq!(more.bytes(), 0);
        assert_eq!(b.connection.in_use(), 90);
        assert_eq!(b.node.in_use(), 90);
    }

    #[tokio::test]
    async fn node_budget_is_shared_between_connections() {
        let node = Budget::new("node", 100);
        let a = Budgets {
            connection: Budget::new("connection", 100),
            node: node.clone(),
            wait: Duration::from_millis(20),
        };
        let b = Budgets {
            connection: Budget::new("connection", 100),
            ..a.clone()
        };
        let mut ha = Held::default();
        a.reserve(&mut ha, 80).await.unwrap();
        let mut hb = Held::default();
        let e = b.reserve(&mut hb, 30).await.unwrap_err();
        assert!(matches!(e, BudgetError::Exhausted { name: "node", .. }));
        // The failed step returned what it took from b's connection budget.
        assert_eq!(b.connection.in_use(), 0);
        drop(ha);
        b.reserve(&mut hb, 30).await.unwrap();
    }

    #[test]
    fn more_than_the_total_is_refused_outright() {
        let b = Budget::new("connection", 10);
        let e = b.try_reserve_into(&mut Held::default(), 11).unwrap_err();
        assert!(matches!(e, BudgetError::TooLarge { bytes: 11, .. }));
    }
}
