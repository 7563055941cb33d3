//! Tests of [`super::models`]: gradients, additivity over row splits, training, helpers.

use super::models::*;
use super::rng::Rng;
use super::stats::Stats;
use nalgebra::DMatrix;

/// `n` rows of `d` features in roughly [-2, 2).
fn features(rng: &mut Rng, n: usize, d: usize) -> DMatrix<f32> {
    DMatrix::from_fn(n, d, |_, _| (rng.uniform_f64() * 4.0 - 2.0) as f32)
}

fn random_params(rng: &mut Rng, kind: ModelKind, d: usize) -> DMatrix<f64> {
    DMatrix::from_fn(d + 1, kind.outputs(), |_, _| rng.uniform_f64() - 0.5)
}

/// Labels from a known model: values (linear), or the argmax / sign of the true scores.
fn labels(kind: ModelKind, truth: &DMatrix<f64>, x: &DMatrix<f32>) -> Vec<f32> {
    predict(kind, truth, x)
        .expect("shapes")
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

const KINDS: [ModelKind; 3] = [
    ModelKind::Linear,
    ModelKind::Logistic,
    ModelKind::Softmax { classes: 3 },
];

#[test]
fn gradient_matches_finite_differences() {
    for kind in KINDS {
        let mut rng = Rng::for_task(11, 0, 0);
        let (n, d) = (20, 3);
        let x = features(&mut rng, n, d);
        let y = labels(kind, &random_params(&mut rng, kind, d), &x);
        let params = random_params(&mut rng, kind, d);
        let l2 = 0.1;
        let (_, grad) = objective(kind, &params, &x, &y, l2).expect("valid");
        let h = 1e-6;
        for i in 0..params.len() {
            let (mut up, mut down) = (params.clone(), params.clone());
            up[i] += h;
            down[i] -= h;
            let fu = objective(kind, &up, &x, &y, l2).expect("valid").0;
            let fd = objective(kind, &down, &x, &y, l2).expect("valid").0;
            let numeric = (fu - fd) / (2.0 * h);
            assert!(
                (numeric - grad[i]).abs() < 1e-6,
                "{kind:?} param {i}: numeric {numeric} vs analytic {}",
                grad[i]
            );
        }
    }
}

#[test]
fn partial_sums_add_up_to_the_whole_batch() {
    for kind in KINDS {
        let mut rng = Rng::for_task(12, 0, 0);
        let x = features(&mut rng, 37, 4);
        let y = labels(kind, &random_params(&mut rng, kind, 4), &x);
        let params = random_params(&mut rng, kind, 4);
        let whole = loss_and_grad(kind, &params, &x, &y).expect("valid");
        let mut sum = LossGrad {
            loss_sum: 0.0,
            grad_sum: DMatrix::zeros(5, kind.outputs()),
            count: 0,
        };
        for (start, len) in [(0, 10), (10, 1), (11, 26)] {
            let part = loss_and_grad(
                kind,
                &params,
                &x.rows(start, len).into_owned(),
                &y[start..start + len],
            )
            .expect("valid");
            sum.loss_sum += part.loss_sum;
            sum.grad_sum += part.grad_sum;
            sum.count += part.count;
        }
        assert_eq!(sum.count, whole.count);
        assert!((sum.loss_sum - whole.loss_sum).abs() <= 1e-9 * whole.loss_sum.abs().max(1.0));
        assert!((sum.grad_sum - &whole.grad_sum).amax() <= 1e-9 * whole.grad_sum.amax().max(1.0));
    }
}

#[test]
fn gradient_descent_learns_separable_problems() {
    for kind in KINDS {
        let mut rng = Rng::for_task(13, 0, 0);
        let d = 4;
        let x = features(&mut rng, 300, d);
        let truth = random_params(&mut rng, kind, d) * 4.0;
        let y = labels(kind, &truth, &x);
        let mut params = kind.zeros(d);
        for _ in 0..300 {
            let (_, grad) = objective(kind, &params, &x, &y, 0.0).expect("valid");
            params -= grad * 0.5;
        }
        let pred = predict(kind, &params, &x).expect("valid");
        match kind {
            ModelKind::Linear => assert!(rmse(&pred, &y) < 1e-3, "rmse {}", rmse(&pred, &y)),
            _ => assert!(
                accuracy(&pred, &y) >= 0.95,
                "{kind:?} {}",
                accuracy(&pred, &y)
            ),
        }
    }
}

#[test]
fn stable_at_extreme_scores() {
    let x = DMatrix::from_row_slice(2, 1, &[1.0f32, -1.0]);
    let params = DMatrix::from_column_slice(2, 1, &[1e4, 0.0]);
    let lg = loss_and_grad(ModelKind::Logistic, &params, &x, &[0.0, 0.0]).expect("valid");
    assert!((lg.loss_sum - 1e4).abs() < 1e-6, "{}", lg.loss_sum);
    assert!(lg.grad_sum.iter().all(|g| g.is_finite()));
    let params = DMatrix::from_row_slice(2, 2, &[1e4, -1e4, 0.0, 0.0]);
    let sm = ModelKind::Softmax { classes: 2 };
    let lg = loss_and_grad(sm, &params, &x, &[1.0, 1.0]).expect("valid");
    assert!((lg.loss_sum - 2e4).abs() < 1e-6, "{}", lg.loss_sum);
    assert_eq!(sigmoid(-1000.0), 0.0);
    assert_eq!(sigmoid(1000.0), 1.0);
    let p = predict_proba(&DMatrix::zeros(2, 1), &x).expect("valid");
    assert_eq!(p, vec![0.5, 0.5]);
}

#[test]
fn bad_inputs_are_refused() {
    let x = DMatrix::<f32>::zeros(2, 3);
    let err = loss_and_grad(ModelKind::Linear, &DMatrix::zeros(3, 1), &x, &[0.0, 0.0]);
    assert!(matches!(
        err,
        Err(ModelError::ParamShape { want_rows: 4, .. })
    ));
    let p = ModelKind::Logistic.zeros(3);
    let err = loss_and_grad(ModelKind::Logistic, &p, &x, &[0.0]);
    assert!(matches!(err, Err(ModelError::LabelCount { .. })));
    let err = loss_and_grad(ModelKind::Logistic, &p, &x, &[0.0, 0.5]);
    assert!(matches!(err, Err(ModelError::BadLabel { row: 1, .. })));
    let sm = ModelKind::Softmax { classes: 3 };
    let err = loss_and_grad(sm, &sm.zeros(3), &x, &[2.0, 3.0]);
    assert!(matches!(err, Err(ModelError::BadLabel { row: 1, .. })));
}

#[test]
fn standardizer_and_raw_params() {
    let mut rng = Rng::for_task(14, 0, 0);
    let raw = DMatrix::from_fn(50, 2, |_, c| {
        (rng.uniform_f64() * 10.0 + 100.0 * c as f64) as f32
    });
    let mut constant = raw.clone();
    constant.column_mut(1).fill(5.0);
    let st = Standardizer::from_stats(&Stats::from_matrix(&constant));
    assert_eq!(st.std[1], 1.0);
    let st = Standardizer::from_stats(&Stats::from_matrix(&raw));
    let mut x = raw.clone();
    st.apply(&mut x);
    let s = Stats::from_matrix(&x);
    for c in &s.columns {
        assert!(
            c.mean.abs() < 1e-5 && (c.variance() - 1.0).abs() < 1e-5,
            "{c:?}"
        );
    }
    let params = DMatrix::from_column_slice(3, 1, &[0.7, -1.3, 0.2]);
    let on_std = predict(ModelKind::Linear, &params, &x).expect("valid");
    let on_raw = predict(ModelKind::Linear, &st.to_raw_params(&params), &raw).expect("valid");
    for (a, b) in on_std.iter().zip(&on_raw) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

#[test]
fn lr_schedules_and_metrics() {
    assert_eq!(LrSchedule::Constant(0.1).lr(1000), 0.1);
    let s = LrSchedule::InverseDecay {
        lr0: 1.0,
        decay: 0.5,
    };
    assert_eq!((s.lr(0), s.lr(2)), (1.0, 0.5));
    assert_eq!(accuracy(&[1.0, 0.0, 2.0], &[1.0, 1.0, 2.0]), 2.0 / 3.0);
    assert_eq!(rmse(&[1.0, 3.0], &[1.0, 1.0]), 2.0f64.sqrt());
    assert_eq!(accuracy(&[], &[]), 0.0);
}
