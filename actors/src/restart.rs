//! Restart budget: at most `max` restarts within a sliding `window`, then escalate. Sans-IO:
//! the caller passes `now`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct RestartBudget {
    max: usize,
    window: Duration,
    recent: VecDeque<Instant>,
}

impl RestartBudget {
    /// Erlang/OTP-style intensity: `max` restarts per `window`.
    pub fn new(max: usize, window: Duration) -> Self {
        RestartBudget {
            max,
            window,
            recent: VecDeque::with_capacity(max + 1),
        }
    }

    /// Records a failure at `now`; `true` if a restart is allowed, `false` to escalate.
    pub fn allow(&mut self, now: Instant) -> bool {
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > self.window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.max {
            return false;
        }
        self.recent.push_back(now);
        true
    }
}

impl Default for RestartBudget {
    /// 5 restarts in 30 s.
    fn default() -> Self {
        RestartBudget::new(5, Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escalates_past_the_budget_and_recovers_after_the_window() {
        let t0 = Instant::now();
        let mut b = RestartBudget::new(3, Duration::from_secs(10));
        assert!(b.allow(t0));
        assert!(b.allow(t0 + Duration::from_secs(1)));
        assert!(b.allow(t0 + Duration::from_secs(2)));
        assert!(
            !b.allow(t0 + Duration::from_secs(3)),
            "fourth failure within the window escalates"
        );
        assert!(
            b.allow(t0 + Duration::from_secs(12)),
            "old failures age out"
        );
    }
}
