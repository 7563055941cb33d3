//! The math of Tidepool's learning jobs: pure, deterministic, no I/O.
//!
//! - [`job`]: the `Job` trait (iterative map/reduce over a checkpointable state) and the exact
//!   fixed-point merge of partials ([`exact`]); [`registry`] turns a spec into a runnable job.
//! - [`train`], [`kmeans_job`], [`stats_job`] (with [`colstats`]): the built-in jobs.
//! - [`rng`]: the seeded generator; every random choice is keyed by `(seed, step, shard)`.
//! - [`stats`]: mergeable column statistics and histograms (the `stats` job, standardisation).
//! - [`models`]: linear / logistic / softmax regression losses and gradients as row *sums*,
//!   prediction, metrics, [`models::Standardizer`], the learning-rate schedule.
//! - [`minibatch`]: the training step's losses and gradients over rows read in place (dense or
//!   sparse CSR), the standardisation folded into the parameters.
//! - [`kmeans`]: seeded k-means++ init and Lloyd steps as mergeable partials.
//! - [`sgd`]: the synchronous-SGD step as a pure function of per-shard partials taken in
//!   shard-id order, and per-shard minibatch selection (ARCHITECTURE.md, invariant 6).
//! - [`ps`]: the parameter server's tables (rows spread over the shards, pushes applied in
//!   source order at the step barrier); [`mf`]: matrix factorisation on them; [`ps_linear`]:
//!   linear, logistic and softmax regression with hashed or sharded feature columns on them.
//! - [`model_file`], [`model_dir`]: the exported model (JSON; a manifest plus safetensors).
//!
//! Nothing here knows about shards' placement, nodes or time: the job executor and the
//! coordinator actor call into it.

pub mod colstats;
pub mod exact;
pub mod job;
pub mod kmeans;
pub mod kmeans_job;
pub mod mf;
pub mod minibatch;
pub mod model_dir;
pub mod model_file;
pub mod models;
pub mod ps;
pub mod ps_linear;
pub mod registry;
pub mod rng;
pub mod sgd;
pub mod stats;
pub mod stats_job;
pub mod train;

#[cfg(test)]
mod kmeans_tests;
#[cfg(test)]
mod mf_tests;
#[cfg(test)]
mod models_tests;
#[cfg(test)]
mod ps_linear_tests;
#[cfg(test)]
mod registry_tests;
#[cfg(test)]
mod sgd_tests;
#[cfg(test)]
mod stats_tests;
