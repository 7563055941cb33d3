//! Job specs: the TOML a user submits (`tidepool job submit SPEC.toml`), parsed and validated
//! before anything runs. Keys and meanings are the README's; every error names the key.
//!
//! ```toml
//! [job]
//! kind = "sgd"              # sgd | local_sgd | kmeans | stats
//! dataset = "cancer"
//! [model]
//! type = "logistic"         # linear | logistic | softmax (sgd, local_sgd)
//! classes = 10              # softmax; default: largest label + 1
//! k = 8                     # kmeans
//! [train]
//! epochs = 20               # or steps = N
//! batch_size = 64           # global minibatch, split over shards by their row counts
//! learning_rate = 0.1
//! lr_decay = 0.0            # rate = learning_rate / (1 + lr_decay * step)
//! l2 = 0.0001
//! seed = 7
//! checkpoint_every = 50     # steps
//! standardize = true        # sgd/local_sgd (default true); kmeans and stats use raw features
//! local_steps = 10          # local_sgd: local steps per averaging round
//! max_iter = 100            # kmeans
//! tol = 1e-4                # kmeans: stop when the centres' squared moves sum to at most
//!                           # tol x the mean column variance (scikit-learn's rule)
//! n_init = 1                # kmeans: runs side by side (one data pass each step); best kept
//! init_candidates = 3       # kmeans: greedy k-means++ candidates per centre (2 + ln k)
//! bins = 10                 # stats: histogram bins
//! consistency = "sync"      # parameter-server models: sync, or ssp (bounded staleness)
//! staleness = 4             # ssp: train steps that may run ahead of the oldest unfinished
//! ```
//!
//! Matrix factorisation (`kind = "mf"`) takes `[model] rank`, `user_column`, `item_column`; the
//! dataset's label is the rating. `sgd` with `[model] features = "hashed"` (`hash_bits = 24`)
//! or `features = "sharded"` keeps its weights on the parameter server.

use serde::Deserialize;

/// A job spec that cannot run; the message names the key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobSpecError {
    /// Not TOML, an unknown key, or a value of the wrong type.
    #[error("job spec: {0}")]
    Parse(String),
    /// A value out of range.
    #[error("job spec: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Caps on how long a job may run, from the node's config (`jobs.max_steps`,
/// `jobs.max_epochs`): a spec asking for more is refused at submit instead of running (and
/// checkpointing) for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobCaps {
    pub max_steps: u64,
    pub max_epochs: u64,
}

/// What a job computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Sgd,
    LocalSgd,
    Kmeans,
    Stats,
    /// Matrix factorisation on the parameter server.
    Mf,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Sgd => "sgd",
            JobKind::LocalSgd => "local_sgd",
            JobKind::Kmeans => "kmeans",
            JobKind::Stats => "stats",
            JobKind::Mf => "mf",
        }
    }
}

/// The model of an `sgd` / `local_sgd` job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelType {
    Linear,
    Logistic,
    Softmax,
}

/// A validated job spec.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub kind: JobKind,
    pub dataset: String,
    pub model: Option<ModelType>,
    pub classes: Option<usize>,
    pub k: usize,
    pub epochs: Option<u64>,
    pub steps: Option<u64>,
    pub batch_size: u64,
    pub learning_rate: f64,
    pub lr_decay: f64,
    pub l2: f64,
    pub seed: u64,
    pub checkpoint_every: u64,
    pub standardize: bool,
    pub local_steps: u64,
    pub max_iter: u64,
    pub tol: f64,
    /// k-means: independent runs (seedings) side by side; the lowest inertia wins.
    pub n_init: usize,
    /// k-means: candidates per centre in greedy k-means++ (`None`: `2 + ln k`).
    pub init_candidates: Option<usize>,
    pub bins: usize,
    /// Matrix factorisation: the model (`None` for other kinds).
    pub mf: Option<MfModel>,
    /// Where an `sgd` model's weights live: broadcast every step (the default), or rows on the
    /// parameter server (`[model] features = "hashed"` or `"sharded"`).
    pub features: FeatureMap,
    /// `consistency = "ssp"`: train steps that may run ahead of the oldest unfinished one
    /// (`staleness`, default 4); 0 for `sync`.
    pub staleness: u64,
}

/// Largest `train.staleness`.
pub const MAX_STALENESS: u64 = 64;

/// Where an `sgd` model's weights live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureMap {
    /// The whole model travels to every node each step (`features = "dense"`, the default).
    Broadcast,
    /// Column `c` maps to weight `xxh3(c) mod 2^bits` (with a sign), the weights on the
    /// parameter server (`features = "hashed"`, `hash_bits = bits`).
    Hashed { bits: u32 },
    /// Column `c` has its own row of weights (one per output) on the parameter server
    /// (`features = "sharded"`): models wider than a frame.
    Sharded,
}

impl JobSpec {
    /// Whether the model lives on the parameter server.
    pub fn on_params(&self) -> bool {
        self.kind == JobKind::Mf || self.features != FeatureMap::Broadcast
    }
}

/// Smallest and largest `model.hash_bits`.
pub const HASH_BITS: std::ops::RangeInclusive<u32> = 8..=32;

/// The model of an `mf` job: user and item embeddings of `rank` values each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MfModel {
    pub rank: usize,
    /// The feature column holding user ids (integers from 0).
    pub user_column: String,
    /// The feature column holding item ids (integers from 0).
    pub item_column: String,
}

/// Largest `rank` of an `mf` job.
pub const MAX_MF_RANK: usize = 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    job: RawJob,
    #[serde(default)]
    model: RawModel,
    #[serde(default)]
    train: RawTrain,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    kind: JobKind,
    dataset: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawModel {
    #[serde(rename = "type")]
    ty: Option<ModelType>,
    classes: Option<usize>,
    k: Option<usize>,
    rank: Option<usize>,
    user_column: Option<String>,
    item_column: Option<String>,
    features: Option<String>,
    hash_bits: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTrain {
    epochs: Option<u64>,
    steps: Option<u64>,
    batch_size: Option<u64>,
    learning_rate: Option<f64>,
    lr_decay: Option<f64>,
    l2: Option<f64>,
    seed: Option<u64>,
    checkpoint_every: Option<u64>,
    standardize: Option<bool>,
    local_steps: Option<u64>,
    max_iter: Option<u64>,
    tol: Option<f64>,
    n_init: Option<usize>,
    init_candidates: Option<usize>,
    bins: Option<usize>,
    consistency: Option<String>,
    staleness: Option<u64>,
}

fn invalid(key: &'static str, reason: impl Into<String>) -> JobSpecError {
    JobSpecError::Invalid {
        key,
        reason: reason.into(),
    }
}

fn finite_at_least(key: &'static str, v: f64, min: f64) -> Result<f64, JobSpecError> {
    if v.is_finite() && v >= min {
        Ok(v)
    } else {
        Err(invalid(
            key,
            format!("must be a finite number >= {min}, got {v}"),
        ))
    }
}

impl JobSpec {
    /// Parses and validates a spec.
    pub fn parse(text: &str) -> Result<JobSpec, JobSpecError> {
        let raw: Raw = toml::from_str(text).map_err(|e| JobSpecError::Parse(e.to_string()))?;
        let t = raw.train;
        let kind = raw.job.kind;
        if raw.job.dataset.is_empty() {
            return Err(invalid("job.dataset", "must not be empty"));
        }
        let trains = matches!(kind, JobKind::Sgd | JobKind::LocalSgd);
        let model = match (trains, raw.model.ty) {
            (true, None) => return Err(invalid("model.type", "required for sgd and local_sgd")),
            (true, m) => m,
            (false, _) => None,
        };
        let classes = raw.model.classes;
        if let Some(c) = classes {
            if !(2..=10_000).contains(&c) {
                return Err(invalid("model.classes", "must be between 2 and 10000"));
            }
        }
        let k = raw.model.k.unwrap_or(8);
        if kind == JobKind::Kmeans && !(1..=10_000).contains(&k) {
            return Err(invalid("model.k", "must be between 1 and 10000"));
        }
        if t.epochs.is_some() && t.steps.is_some() {
            return Err(invalid("train.steps", "give epochs or steps, not both"));
        }
        let epochs = match (t.epochs, t.steps) {
            (None, None) => Some(10),
            (e, _) => e,
        };
        if epochs == Some(0) || t.steps == Some(0) {
            return Err(invalid("train.epochs", "must be at least 1"));
        }
        let batch_size = t.batch_size.unwrap_or(64);
        if !(1..=100_000_000).contains(&batch_size) {
            return Err(invalid("train.batch_size", "must be between 1 and 1e8"));
        }
        let checkpoint_every = t.checkpoint_every.unwrap_or(50);
        if checkpoint_every == 0 {
            return Err(invalid("train.checkpoint_every", "must be at least 1"));
        }
        let local_steps = t.local_steps.unwrap_or(10);
        if local_steps == 0 || local_steps > 100_000 {
            return Err(invalid("train.local_steps", "must be between 1 and 100000"));
        }
        if !trains && t.standardize == Some(true) {
            return Err(invalid(
                "train.standardize",
                "applies to sgd and local_sgd only (k-means and stats use the raw features)",
            ));
        }
        let mf = if kind == JobKind::Mf {
            let rank = raw.model.rank.unwrap_or(32);
            if !(1..=MAX_MF_RANK).contains(&rank) {
                return Err(invalid(
                    "model.rank",
                    format!("must be between 1 and {MAX_MF_RANK}"),
                ));
            }
            let column = |key: &'static str, v: Option<String>| match v {
                Some(c) if !c.is_empty() => Ok(c),
                _ => Err(invalid(
                    key,
                    "required for mf (a feature column of integer ids)",
                )),
            };
            Some(MfModel {
                rank,
                user_column: column("model.user_column", raw.model.user_column)?,
                item_column: column("model.item_column", raw.model.item_column)?,
            })
        } else {
            if raw.model.rank.is_some()
                || raw.model.user_column.is_some()
                || raw.model.item_column.is_some()
            {
                return Err(invalid(
                    "model.rank",
                    "rank, user_column and item_column are for mf only",
                ));
            }
            None
        };
        let features = match raw.model.features.as_deref() {
            None | Some("dense") => {
                if raw.model.hash_bits.is_some() {
                    return Err(invalid(
                        "model.hash_bits",
                        "needs model.features = \"hashed\"",
                    ));
                }
                FeatureMap::Broadcast
            }
            Some(f @ ("hashed" | "sharded")) => {
                if kind != JobKind::Sgd {
                    return Err(invalid(
                        "model.features",
                        format!("{f:?} is for kind = \"sgd\""),
                    ));
                }
                if model == Some(ModelType::Softmax) && raw.model.classes.is_none() {
                    return Err(invalid(
                        "model.classes",
                        format!("required for softmax with features = {f:?}"),
                    ));
                }
                if t.standardize == Some(true) {
                    return Err(invalid(
                        "train.standardize",
                        "parameter-server features are used as they are (no standardisation)",
                    ));
                }
                if f == "sharded" {
                    if raw.model.hash_bits.is_some() {
                        return Err(invalid(
                            "model.hash_bits",
                            "needs model.features = \"hashed\"",
                        ));
                    }
                    FeatureMap::Sharded
                } else {
                    let bits = raw.model.hash_bits.unwrap_or(24);
                    if !HASH_BITS.contains(&bits) {
                        return Err(invalid(
                            "model.hash_bits",
                            format!(
                                "{bits} is outside {}..={}",
                                HASH_BITS.start(),
                                HASH_BITS.end()
                            ),
                        ));
                    }
                    FeatureMap::Hashed { bits }
                }
            }
            Some(other) => {
                return Err(invalid(
                    "model.features",
                    format!("{other:?}: expected \"dense\", \"hashed\" or \"sharded\""),
                ))
            }
        };
        let on_params = kind == JobKind::Mf || features != FeatureMap::Broadcast;
        let staleness = match t.consistency.as_deref() {
            None | Some("sync") => {
                if t.staleness.is_some() {
                    return Err(invalid(
                        "train.staleness",
                        "applies to consistency = \"ssp\" only",
                    ));
                }
                0
            }
            Some("ssp") if on_params => match t.staleness.unwrap_or(4) {
                s @ 1..=MAX_STALENESS => s,
                s => {
                    return Err(invalid(
                        "train.staleness",
                        format!("{s} is outside 1..={MAX_STALENESS}"),
                    ))
                }
            },
            Some("ssp") => {
                return Err(invalid(
                    "train.consistency",
                    "\"ssp\" is for models on the parameter server \
                     (mf, or features = \"hashed\" or \"sharded\")",
                ))
            }
            Some(other) => {
                return Err(invalid(
                    "train.consistency",
                    format!("{other:?}: expected \"sync\" or \"ssp\""),
                ))
            }
        };
        let bins = t.bins.unwrap_or(10);
        if bins == 0 || bins > 10_000 {
            return Err(invalid("train.bins", "must be between 1 and 10000"));
        }
        Ok(JobSpec {
            kind,
            dataset: raw.job.dataset,
            model,
            classes,
            k,
            epochs,
            steps: t.steps,
            batch_size,
            learning_rate: finite_at_least(
                "train.learning_rate",
                t.learning_rate.unwrap_or(0.1),
                0.0,
            )?,
            lr_decay: finite_at_least("train.lr_decay", t.lr_decay.unwrap_or(0.0), 0.0)?,
            l2: finite_at_least("train.l2", t.l2.unwrap_or(0.0), 0.0)?,
            seed: t.seed.unwrap_or(0),
            checkpoint_every,
            standardize: t
                .standardize
                .unwrap_or(trains && features == FeatureMap::Broadcast),
            local_steps,
            max_iter: t.max_iter.unwrap_or(100).max(1),
            tol: finite_at_least("train.tol", t.tol.unwrap_or(1e-4), 0.0)?,
            n_init: match t.n_init {
                Some(n) if !(1..=32).contains(&n) => {
                    return Err(invalid("train.n_init", format!("{n} is outside 1..=32")))
                }
                n => n.unwrap_or(1),
            },
            init_candidates: match t.init_candidates {
                Some(n) if !(1..=64).contains(&n) => {
                    return Err(invalid(
                        "train.init_candidates",
                        format!("{n} is outside 1..=64"),
                    ))
                }
                n => n,
            },
            bins,
            mf,
            features,
            staleness,
        })
    }

    /// Checks the spec against `caps` on a dataset of `rows` rows; the error names the key and
    /// the cap's config key.
    pub fn check_caps(&self, rows: u64, caps: &JobCaps) -> Result<(), JobSpecError> {
        if let Some(e) = self.epochs.filter(|&e| e > caps.max_epochs) {
            return Err(invalid(
                "train.epochs",
                format!("{e} is over jobs.max_epochs = {}", caps.max_epochs),
            ));
        }
        let (key, steps) = match self.kind {
            JobKind::Sgd | JobKind::LocalSgd | JobKind::Mf => match self.steps {
                Some(s) => ("train.steps", s),
                None => ("train.epochs", self.train_steps(rows)),
            },
            JobKind::Kmeans => ("train.max_iter", self.max_iter),
            JobKind::Stats => return Ok(()),
        };
        if steps > caps.max_steps {
            return Err(invalid(
                key,
                format!("{steps} steps is over jobs.max_steps = {}", caps.max_steps),
            ));
        }
        Ok(())
    }

    /// Training steps for `rows` rows: `steps`, or `epochs * ceil(rows / batch_size)`
    /// (for local SGD, averaging rounds: that divided by `local_steps`, at least 1).
    pub fn train_steps(&self, rows: u64) -> u64 {
        let per_epoch = rows.div_ceil(self.batch_size).max(1);
        let steps = self
            .steps
            .unwrap_or_else(|| self.epochs.unwrap_or(1).saturating_mul(per_epoch));
        match self.kind {
            JobKind::LocalSgd => (steps / self.local_steps).max(1),
            _ => steps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_example_parses_with_defaults() {
        let spec = JobSpec::parse(
            r#"
            [job]
            kind = "sgd"
            dataset = "cancer"
            [model]
            type = "logistic"
            [train]
            epochs = 20
            batch_size = 64
            learning_rate = 0.1
            l2 = 0.0001
            seed = 7
            checkpoint_every = 50
            "#,
        )
        .unwrap();
        assert_eq!(spec.kind, JobKind::Sgd);
        assert_eq!(spec.model, Some(ModelType::Logistic));
        assert!(spec.standardize);
        assert_eq!(spec.train_steps(640), 200);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[job]\nkind = \"sgd\"\ndataset = \"d\"", "model.type"),
            (
                "[job]\nkind = \"sgd\"\ndataset = \"\"\n[model]\ntype=\"linear\"",
                "job.dataset",
            ),
            (
                "[job]\nkind = \"kmeans\"\ndataset = \"d\"\n[model]\nk = 0",
                "model.k",
            ),
            (
                "[job]\nkind = \"stats\"\ndataset = \"d\"\n[train]\nlearning_rate = -1.0",
                "train.learning_rate",
            ),
            ("[job]\nkind = \"nope\"\ndataset = \"d\"", "unknown variant"),
            (
                "[job]\nkind = \"stats\"\ndataset = \"d\"\nextra = 1",
                "unknown field",
            ),
            ("not toml [", "job spec"),
        ];
        for (text, want) in cases {
            let err = JobSpec::parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn caps_come_from_config() {
        let caps = JobCaps {
            max_steps: 1000,
            max_epochs: 10,
        };
        let sgd = |train: &str| {
            JobSpec::parse(&format!(
                "[job]\nkind = \"sgd\"\ndataset = \"d\"\n[model]\ntype = \"linear\"\n[train]\n{train}"
            ))
            .unwrap()
        };
        // (spec, rows, refused key)
        let cases = [
            (sgd("epochs = 10\nbatch_size = 10"), 1000, None),
            (
                sgd("epochs = 11\nbatch_size = 10"),
                10,
                Some("train.epochs"),
            ),
            (sgd("epochs = 1000000000000"), 10, Some("train.epochs")),
            (sgd("epochs = 2\nbatch_size = 1"), 501, Some("train.epochs")),
            (sgd("steps = 1000"), 1, None),
            (sgd("steps = 1001"), 1, Some("train.steps")),
        ];
        for (spec, rows, want) in cases {
            let got = spec.check_caps(rows, &caps);
            match (want, got) {
                (None, Ok(())) => {}
                (Some(key), Err(JobSpecError::Invalid { key: k, reason })) => {
                    assert_eq!(k, key, "{reason}");
                    assert!(reason.contains("jobs.max_"), "{reason}");
                }
                (want, got) => panic!("{spec:?}: want {want:?}, got {got:?}"),
            }
        }
        let km =
            JobSpec::parse("[job]\nkind = \"kmeans\"\ndataset = \"d\"\n[train]\nmax_iter = 5000")
                .unwrap();
        assert!(km.check_caps(10, &caps).is_err());
    }

    #[test]
    fn local_sgd_counts_rounds() {
        let spec = JobSpec::parse(
            "[job]\nkind = \"local_sgd\"\ndataset = \"d\"\n[model]\ntype = \"linear\"\n[train]\nsteps = 100\nlocal_steps = 10",
        )
        .unwrap();
        assert_eq!(spec.train_steps(1_000_000), 10);
    }
}
