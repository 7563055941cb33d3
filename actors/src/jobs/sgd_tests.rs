//! Tests of [`super::sgd`]: node-count independence, order checks, minibatches.

use super::models::{objective, LrSchedule, ModelKind};
use super::rng::Rng;
use super::sgd::*;
use nalgebra::DMatrix;

/// One shard's partition.
struct Part {
    x: DMatrix<f32>,
    y: Vec<f32>,
}

/// Shards of different sizes with softmax labels from a random linear model.
fn shards(kind: ModelKind, d: usize) -> Vec<Part> {
    let mut rng = Rng::for_task(21, 0, 0);
    let truth = DMatrix::from_fn(d + 1, kind.outputs(), |_, _| rng.uniform_f64() * 2.0 - 1.0);
    [40, 17, 33, 5, 60, 28]
        .iter()
        .map(|&n| {
            let x = DMatrix::from_fn(n, d, |_, _| (rng.uniform_f64() * 4.0 - 2.0) as f32);
            let y = super::models::predict(kind, &truth, &x)
                .expect("shapes")
                .into_iter()
                .map(|v| v as f32)
                .collect();
            Part { x, y }
        })
        .collect()
}

const SEED: u64 = 99;
const BATCH: usize = 8;

/// Trains `steps` steps; each "node" computes the partials of its shards (in its own order),
/// and the coordinator sorts them by shard id before the step.
fn train(kind: ModelKind, parts: &[Part], nodes: &[Vec<u32>], steps: u64) -> DMatrix<f64> {
    let d = parts[0].x.ncols();
    let mut params = kind.zeros(d);
    let schedule = LrSchedule::InverseDecay {
        lr0: 0.5,
        decay: 0.01,
    };
    for step in 0..steps {
        let mut partials = Vec::new();
        for node in nodes {
            for &s in node.iter().rev() {
                let p = &parts[s as usize];
                let idx = minibatch_indices(SEED, step, s, p.x.nrows(), BATCH);
                partials.push(
                    ShardPartial::compute(kind, &params, s, &p.x, &p.y, &idx).expect("valid"),
                );
            }
        }
        partials.sort_by_key(|p| p.shard);
        params = sgd_step(&params, step, &partials, 1e-3, schedule)
            .expect("valid")
            .params;
    }
    params
}

#[test]
fn model_is_bit_identical_across_node_counts() {
    for kind in [ModelKind::Logistic, ModelKind::Softmax { classes: 3 }] {
        let parts = shards(kind, 4);
        let one = train(kind, &parts, &[vec![0, 1, 2, 3, 4, 5]], 40);
        for layout in [
            vec![vec![0, 3, 5], vec![1, 2], vec![4]],
            vec![vec![5], vec![4], vec![3], vec![2], vec![1], vec![0]],
        ] {
            let many = train(kind, &parts, &layout, 40);
            let bits = |m: &DMatrix<f64>| m.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one), bits(&many), "{kind:?} {layout:?}");
        }
        assert!(one.amax() > 0.0);
    }
}

#[test]
fn full_batch_step_is_gradient_descent() {
    let kind = ModelKind::Logistic;
    let parts = shards(kind, 3);
    let p = &parts[0];
    let params = DMatrix::from_fn(4, 1, |r, _| r as f64 * 0.1);
    let all: Vec<usize> = (0..p.x.nrows()).collect();
    let partial = ShardPartial::compute(kind, &params, 0, &p.x, &p.y, &all).expect("valid");
    let out = sgd_step(&params, 0, &[partial], 0.01, LrSchedule::Constant(0.3)).expect("valid");
    let (loss, grad) = objective(kind, &params, &p.x, &p.y, 0.01).expect("valid");
    assert!((out.loss - loss).abs() < 1e-12);
    assert!((out.params - (params - grad * 0.3)).amax() < 1e-12);
    assert_eq!(out.count, 40);
}

#[test]
fn refuses_bad_partials() {
    let params = ModelKind::Linear.zeros(2);
    let part = |shard, count| ShardPartial {
        shard,
        loss_sum: 1.0,
        grad_sum: DMatrix::zeros(3, 1),
        count,
    };
    let lr = LrSchedule::Constant(0.1);
    let err = sgd_step(&params, 0, &[part(2, 1), part(1, 1)], 0.0, lr);
    assert_eq!(err, Err(SgdError::NotInShardOrder { prev: 2, next: 1 }));
    let err = sgd_step(&params, 0, &[part(1, 1), part(1, 1)], 0.0, lr);
    assert!(matches!(err, Err(SgdError::NotInShardOrder { .. })));
    let err = sgd_step(&params, 0, &[part(0, 0)], 0.0, lr);
    assert_eq!(err, Err(SgdError::NoRows));
    let mut wrong = part(0, 1);
    wrong.grad_sum = DMatrix::zeros(2, 1);
    let err = sgd_step(&params, 0, &[wrong], 0.0, lr);
    assert!(matches!(err, Err(SgdError::ShapeMismatch { shard: 0, .. })));
}

#[test]
fn minibatches_are_keyed_and_clamped() {
    let a = minibatch_indices(1, 5, 2, 100, 10);
    assert_eq!(a, minibatch_indices(1, 5, 2, 100, 10));
    assert_ne!(a, minibatch_indices(1, 6, 2, 100, 10));
    assert_ne!(a, minibatch_indices(1, 5, 3, 100, 10));
    assert_eq!(a.len(), 10);
    assert_eq!(minibatch_indices(1, 5, 2, 4, 10), vec![0, 1, 2, 3]);
    assert!(minibatch_indices(1, 5, 2, 0, 10).is_empty());
}

#[test]
fn gather_rows_copies_the_chosen_rows() {
    let x = DMatrix::from_row_slice(3, 2, &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let (bx, by) = gather_rows(&x, &[0.0, 1.0, 2.0], &[2, 0]);
    assert_eq!(bx, DMatrix::from_row_slice(2, 2, &[5.0f32, 6.0, 1.0, 2.0]));
    assert_eq!(by, vec![2.0, 0.0]);
}
