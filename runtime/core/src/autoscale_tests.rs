use super::*;

fn policy() -> AutoscalePolicy {
    AutoscalePolicy {
        min_nodes: 3,
        max_nodes: 10,
        target_utilization: 0.7,
        target_backlog_per_node: 100.0,
        tolerance: 0.1,
        scale_up_window: Duration::from_secs(30),
        scale_down_window: Duration::from_secs(300),
    }
}

/// Runs a trace sampled every 5 s; `load(t_secs, current)` gives (utilisation, backlog). The
/// simulated cluster follows the recommendation after `lag` samples (a Kubernetes controller
/// acting on it). Returns the recommendations.
fn run(
    steps: u64,
    start: u32,
    lag: usize,
    load: impl FnMut(u64, u32) -> (f64, f64),
    lose: impl FnMut(u64) -> u32,
) -> Vec<Recommendation> {
    run_with(policy(), steps, start, lag, load, lose)
}

fn run_with(
    policy: AutoscalePolicy,
    steps: u64,
    start: u32,
    lag: usize,
    mut load: impl FnMut(u64, u32) -> (f64, f64),
    mut lose: impl FnMut(u64) -> u32,
) -> Vec<Recommendation> {
    let mut a = Autoscaler::new(policy);
    let mut current = start;
    let mut out: Vec<Recommendation> = Vec::new();
    for i in 0..steps {
        let t = i * 5;
        current = current.saturating_sub(lose(t)).max(1);
        let (utilization, backlog) = load(t, current);
        let r = a.observe(
            Duration::from_secs(t),
            &LoadSample {
                current,
                utilization,
                backlog,
            },
        );
        out.push(r);
        // The controller applies the recommendation made `lag` samples ago.
        if let Some(applied) = out.len().checked_sub(lag).map(|i| out[i].desired) {
            current = applied;
        }
    }
    out
}

/// Utilisation when `work` node-equivalents of work run on `n` nodes.
fn util(work: f64, n: u32) -> f64 {
    (work / f64::from(n)).min(1.0)
}

fn changes(rs: &[Recommendation]) -> usize {
    rs.windows(2)
        .filter(|w| w[0].desired != w[1].desired)
        .count()
}

#[test]
fn steady_load_near_target_changes_nothing() {
    let rs = run(100, 3, 1, |_, n| (util(2.2, n) * 0.98, 50.0), |_| 0);
    assert!(rs.iter().all(|r| r.desired == 3), "{:?}", rs.last());
    assert!(rs[50].reason.starts_with("steady"), "{}", rs[50].reason);
}

#[test]
fn step_up_scales_after_the_up_window_then_holds() {
    // Work jumps from 2 to 5 node-equivalents at t = 100 s.
    let rs = run(
        120,
        3,
        1,
        |t, n| (util(if t < 100 { 2.0 } else { 5.0 }, n), 0.0),
        |_| 0,
    );
    let first_up = rs.iter().position(|r| r.desired > 3).unwrap();
    assert!(
        (26..=28).contains(&first_up),
        "scaled up at sample {first_up} (t = {} s): the 30 s window must pass first",
        first_up * 5
    );
    let last = rs.last().unwrap();
    // 5 units of work at 0.7 target utilisation: ceil(5 / 0.7) = 8 nodes.
    assert_eq!(last.desired, 8, "{}", last.reason);
    assert!(changes(&rs) <= 3, "{} changes", changes(&rs));
}

#[test]
fn a_short_spike_is_ignored() {
    // 20 s of saturation and a backlog burst, shorter than the 30 s scale-up window.
    let rs = run(
        80,
        3,
        1,
        |t, n| {
            if (100..120).contains(&t) {
                (1.0, 2000.0)
            } else {
                (util(2.0, n), 10.0)
            }
        },
        |_| 0,
    );
    assert!(
        rs.iter().all(|r| r.desired == 3),
        "{:?}",
        rs.iter().map(|r| r.desired).collect::<Vec<_>>()
    );
}

#[test]
fn slow_ramp_grows_monotonically_within_bounds() {
    // Work grows from 1 to 9 node-equivalents over 20 minutes.
    let rs = run(
        240,
        3,
        1,
        |t, n| (util(1.0 + 8.0 * t as f64 / 1200.0, n), 0.0),
        |_| 0,
    );
    let desired: Vec<u32> = rs.iter().map(|r| r.desired).collect();
    assert!(
        desired.windows(2).all(|w| w[1] >= w[0]),
        "never scales down on a ramp: {desired:?}"
    );
    assert_eq!(*desired.last().unwrap(), 10, "capped at max_nodes");
    assert!(
        rs.last().unwrap().reason.contains("clamped"),
        "{}",
        rs.last().unwrap().reason
    );
}

#[test]
fn oscillating_load_does_not_flap() {
    // Work swings between 1.5 and 4.5 node-equivalents with a 2-minute period.
    let rs = run(
        400,
        3,
        1,
        |t, n| {
            let phase = (t % 120) as f64 / 120.0;
            (
                util(3.0 + 1.5 * (std::f64::consts::TAU * phase).sin(), n),
                0.0,
            )
        },
        |_| 0,
    );
    let desired: Vec<u32> = rs.iter().map(|r| r.desired).collect();
    // It may scale up once to cover the peaks, but must not follow every swing down and up.
    assert!(
        changes(&rs) <= 3,
        "flapping: {} changes in {desired:?}",
        changes(&rs)
    );
    let tail = &desired[200..];
    assert!(tail.iter().all(|&d| d == tail[0]), "not settled: {tail:?}");
}

#[test]
fn without_stabilisation_the_same_oscillation_flaps() {
    // The check above is meaningful: zero windows follow every swing.
    let no_windows = AutoscalePolicy {
        scale_up_window: Duration::ZERO,
        scale_down_window: Duration::ZERO,
        ..policy()
    };
    let rs = run_with(
        no_windows,
        400,
        3,
        1,
        |t, n| {
            let phase = (t % 120) as f64 / 120.0;
            (
                util(3.0 + 1.5 * (std::f64::consts::TAU * phase).sin(), n),
                0.0,
            )
        },
        |_| 0,
    );
    assert!(changes(&rs) > 20, "{} changes", changes(&rs));
}

#[test]
fn node_loss_raises_utilisation_and_the_recommendation() {
    // 4 node-equivalents of work on 6 nodes (0.67, in tolerance); 2 nodes die at t = 200 s.
    let rs = run(
        100,
        6,
        usize::MAX,
        |_, n| (util(4.0, n), 0.0),
        |t| if t == 200 { 2 } else { 0 },
    );
    assert!(
        rs[..40].iter().all(|r| r.desired == 6),
        "steady before the loss"
    );
    let last = rs.last().unwrap();
    assert_eq!(last.current, 4);
    // 4 units on 4 nodes: utilisation 1.0: ceil(4 x 1.0 / 0.7) = 6.
    assert_eq!(last.desired, 6, "{}", last.reason);
    assert!(last.reason.starts_with("scale up"), "{}", last.reason);
}

#[test]
fn backlog_drives_scale_up_when_utilisation_is_fine() {
    let rs = run(20, 3, usize::MAX, |_, _| (0.7, 900.0), |_| 0);
    let last = rs.last().unwrap();
    assert_eq!(last.desired, 9, "ceil(900 / 100): {}", last.reason);
    assert!(last.reason.contains("backlog"), "{}", last.reason);
}

#[test]
fn scale_down_waits_for_the_long_window() {
    let rs = run(100, 8, usize::MAX, |_, n| (util(1.0, n), 0.0), |_| 0);
    let first_down = rs.iter().position(|r| r.desired < 8).unwrap();
    assert!(
        first_down * 5 >= 300,
        "scaled down after {} s",
        first_down * 5
    );
    assert_eq!(rs.last().unwrap().desired, 3, "down to min_nodes");
}
