//! The autoscaling policy (sans-IO): how many nodes the cluster should run, from the load the
//! nodes report. Time is passed in; nothing here reads a clock or touches the network.
//!
//! The rule is Kubernetes' HPA rule, applied to two signals and taking the larger answer:
//!
//! - utilisation: `ceil(current * mean_utilisation / target_utilisation)`;
//! - backlog: `ceil(current * (backlog / current) / target_backlog_per_node)`
//!   = `ceil(backlog / target_backlog_per_node)`.
//!
//! A signal whose ratio to its target is within `tolerance` of 1 proposes `current` (no change),
//! so noise around the target does not move anything. The raw proposal is clamped to
//! `[min_nodes, max_nodes]`. Then stabilisation, as the HPA's `behavior` does it: a scale-up takes
//! the *smallest* proposal of the last `scale_up_window` (a spike shorter than the window changes
//! nothing), a scale-down the *largest* proposal of the last `scale_down_window` (load must stay
//! low for the whole, longer window). Proposals are remembered for the longer window only, so
//! memory is bounded.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Policy settings (`[autoscale]` in the node config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoscalePolicy {
    /// Never recommend fewer nodes (at least the control-plane voters).
    pub min_nodes: u32,
    /// Never recommend more.
    pub max_nodes: u32,
    /// Mean worker utilisation to aim for, in (0, 1].
    pub target_utilization: f64,
    /// Runnable backlog (queued tasks and messages) per node to aim for, > 0.
    pub target_backlog_per_node: f64,
    /// Ratios within `1 ± tolerance` of the target propose no change.
    pub tolerance: f64,
    /// Scale-up stabilisation window.
    pub scale_up_window: Duration,
    /// Scale-down stabilisation window (longer: scaling down is the riskier move).
    pub scale_down_window: Duration,
}

impl Default for AutoscalePolicy {
    fn default() -> Self {
        AutoscalePolicy {
            min_nodes: 1,
            max_nodes: 100,
            target_utilization: 0.7,
            target_backlog_per_node: 100.0,
            tolerance: 0.1,
            scale_up_window: Duration::from_secs(30),
            scale_down_window: Duration::from_secs(300),
        }
    }
}

/// What the cluster looks like at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadSample {
    /// Nodes up.
    pub current: u32,
    /// Mean worker utilisation of the up nodes, 0..=1.
    pub utilization: f64,
    /// Total runnable backlog over the up nodes.
    pub backlog: f64,
}

/// The policy's answer and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    pub desired: u32,
    pub current: u32,
    /// Human explanation: which signal drove it, its value against the target, and whether
    /// stabilisation held the change back.
    pub reason: String,
}

/// The stateful policy: the proposals of the last window. A change needs its whole window
/// observed: right after start (or a leader change) the current size is held.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    policy: AutoscalePolicy,
    /// `(time, raw proposal)`, oldest first, kept for the longer window.
    history: VecDeque<(Duration, u32)>,
    last: Option<u32>,
    /// When the first sample arrived: a window that has not been observed in full yet cannot
    /// justify a change (a new leader starts by holding the current size).
    since: Option<Duration>,
}

fn hpa(current: u32, ratio: f64, tolerance: f64) -> u32 {
    if !ratio.is_finite() || (ratio - 1.0).abs() <= tolerance {
        return current;
    }
    let want = (f64::from(current.max(1)) * ratio).ceil();
    want.clamp(0.0, f64::from(u32::MAX)) as u32
}

impl Autoscaler {
    pub fn new(policy: AutoscalePolicy) -> Self {
        Autoscaler {
            policy,
            history: VecDeque::new(),
            last: None,
            since: None,
        }
    }

    pub fn policy(&self) -> &AutoscalePolicy {
        &self.policy
    }

    /// Forgets the history (a new leader starts fresh).
    pub fn reset(&mut self) {
        self.history.clear();
        self.last = None;
        self.since = None;
    }

    /// The raw (unstabilised) proposal for one sample and why.
    pub fn propose(&self, s: &LoadSample) -> (u32, String) {
        let p = &self.policy;
        let current = s.current.max(1);
        let util_ratio = s.utilization / p.target_utilization;
        let per_node = s.backlog / f64::from(current);
        let backlog_ratio = per_node / p.target_backlog_per_node;
        let by_util = hpa(current, util_ratio, p.tolerance);
        let by_backlog = hpa(current, backlog_ratio, p.tolerance);
        let raw = by_util.max(by_backlog);
        let clamped = raw.clamp(p.min_nodes, p.max_nodes.max(p.min_nodes));
        let driver = if by_backlog > by_util {
            format!(
                "backlog {per_node:.0}/node vs target {:.0}: ceil({current} x {backlog_ratio:.2}) = {by_backlog}",
                p.target_backlog_per_node
            )
        } else if by_util == current && by_backlog == current {
            format!(
                "utilisation {:.2} and backlog {per_node:.0}/node within {:.0}% of targets {:.2} / {:.0}",
                s.utilization,
                p.tolerance * 100.0,
                p.target_utilization,
                p.target_backlog_per_node
            )
        } else {
            format!(
                "utilisation {:.2} vs target {:.2}: ceil({current} x {util_ratio:.2}) = {by_util}",
                s.utilization, p.target_utilization
            )
        };
        let reason = if clamped != raw {
            format!("{driver}, clamped to [{}, {}]", p.min_nodes, p.max_nodes)
        } else {
            driver
        };
        (clamped, reason)
    }

    /// Feeds one sample taken at `now` (any monotonic origin) and returns the recommendation.
    pub fn observe(&mut self, now: Duration, s: &LoadSample) -> Recommendation {
        let (raw, why) = self.propose(s);
        let since = *self.since.get_or_insert(now);
        let observed = now.saturating_sub(since);
        self.history.push_back((now, raw));
        let keep = self
            .policy
            .scale_down_window
            .max(self.policy.scale_up_window);
        while self
            .history
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > keep)
        {
            self.history.pop_front();
        }
        let within = |w: Duration| {
            self.history
                .iter()
                .filter(move |(t, _)| now.saturating_sub(*t) <= w)
                .map(|(_, r)| *r)
        };
        let current = s.current.clamp(
            self.policy.min_nodes,
            self.policy.max_nodes.max(self.policy.min_nodes),
        );
        let up = within(self.policy.scale_up_window).min().unwrap_or(raw);
        let down = within(self.policy.scale_down_window).max().unwrap_or(raw);
        let up_ready = observed >= self.policy.scale_up_window;
        let down_ready = observed >= self.policy.scale_down_window;
        let (desired, reason) = if up > current && up_ready {
            let held = if up < raw {
                format!(
                    " (held to {up} by the {:?} scale-up window)",
                    self.policy.scale_up_window
                )
            } else {
                String::new()
            };
            (up, format!("scale up: {why}{held}"))
        } else if down < current && down_ready {
            let held = if down > raw {
                format!(
                    " (held to {down} by the {:?} scale-down window)",
                    self.policy.scale_down_window
                )
            } else {
                String::new()
            };
            (down, format!("scale down: {why}{held}"))
        } else if raw != current {
            (
                current,
                format!("steady: {why}, not yet sustained over the stabilisation window"),
            )
        } else {
            (current, format!("steady: {why}"))
        };
        self.last = Some(desired);
        Recommendation {
            desired,
            current: s.current,
            reason,
        }
    }

    /// The last recommended count, if any.
    pub fn last(&self) -> Option<u32> {
        self.last
    }
}

#[cfg(test)]
#[path = "autoscale_tests.rs"]
mod tests;
