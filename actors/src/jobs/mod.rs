//! The math of Tidepool's learning jobs: pure, deterministic, no I/O.
//!
//! - [`rng`]: the seeded generator; every random choice is keyed by `(seed, step, shard)`.
//! - [`stats`]: mergeable column statistics and histograms (the `stats` job, standardisation).
//! - [`models`]: linear / logistic / softmax regression losses and gradients as row *sums*,
//!   prediction, metrics, [`models::Standardizer`], the learning-rate schedule.
//! - [`kmeans`]: seeded k-means++ init and Lloyd steps as mergeable partials.
//! - [`sparse`]: the models' losses and gradients on sparse (CSR) rows, standardisation folded
//!   into the parameters instead of densifying.
//! - [`sgd`]: the synchronous-SGD step as a pure function of per-shard partials taken in
//!   shard-id order, and per-shard minibatch selection (ARCHITECTURE.md, invariant 6).
//!
//! Not wired yet: the job coordinator actor, the user-job trait and the wire types of partials,
//! dataset import and partition loading, local SGD, checkpointing of job state, and the CLI
//! (`job submit`, `predict`). Those call into this module; nothing here knows about shards'
//! placement, nodes or time.

pub mod colstats;
pub mod exact;
pub mod job;
pub mod kmeans;
pub mod kmeans_job;
pub mod model_dir;
pub mod model_file;
pub mod models;
pub mod registry;
pub mod rng;
pub mod sgd;
pub mod sparse;
pub mod stats;
pub mod stats_job;
pub mod train;

#[cfg(test)]
mod kmeans_tests;
#[cfg(test)]
mod models_tests;
#[cfg(test)]
mod registry_tests;
#[cfg(test)]
mod sgd_tests;
#[cfg(test)]
mod stats_tests;
