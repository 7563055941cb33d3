//! The `tidepool` binary's library half: the pieces the CLI, the demo and the multi-process
//! tests share. The binary itself (src/main.rs) is only argument parsing and wiring.
//!
//! - [`daemon`]: `tidepool node run`: config, logging, metrics, admin HTTP, signals.
//! - [`admin`]: the admin HTTP server (`/metrics`, `/livez`, `/readyz`).
//! - [`local_cluster`]: starts real `tidepool node run` processes on loopback with fresh certs.
//! - [`netns`]: network namespaces, veth, bridge and nftables faults for `chaos run --netns`.
//! - [`workload`]: the idempotent-increment workload and its exactly-once check.
//! - [`hostile`]: hostile peers (F9), shared by tests/hostile.rs and the chaos harness.
//! - [`http`]: a minimal HTTP/1.1 GET for polling admin endpoints.
//! - [`demo`]: `tidepool demo`: logistic regression on breast cancer across a node kill.
//! - [`demo_recommend`]: `tidepool demo --recommend`: matrix factorisation across a node kill.
//! - [`kv_demo`]: `tidepool demo --kv`: the exactly-once key-value demo.
//! - [`conn`]: client connection flags.
//! - [`cli_docs`]: shell completions and man pages from the clap definitions.
//! - [`jobs_cli`], [`jobs_cmd`]: dataset import, job submit/wait/result (library and CLI).
//! - [`job_watch`]: following a job to its end with a progress bar (`job watch`, `--wait`).
//! - [`exit`]: the CLI's exit codes and the typed errors they are read from.
//! - [`bench`]: `tidepool bench failover`.
//! - [`bench_mf`]: `tidepool bench mf`: matrix factorisation on the parameter server.
//! - [`bench_train`]: `tidepool bench train`: SGD throughput vs a plain loop, scaling, local SGD.
//! - [`datasets`]: built-in real datasets, seeded train/test split, CSV export, smartcore reference.
//! - [`chaos`]: `tidepool chaos run`: scenarios, faults, checkers, reports.
//! - [`fault_spec`], `fault_file` (feature `fault-injection`): the nodes' fault files.
//! - [`starve`]: CPU starvation of node processes (cgroup quotas, SIGSTOP stalls): chaos F11 and
//!   `TIDEPOOL_TEST_STARVE`.
//! - [`predict`]: `tidepool predict` and `tidepool dataset builtin`.
//! - [`mf_dir`], [`mf_model`], [`mf_predict`], [`recommend`]: matrix-factorisation model
//!   directories: streamed from the cluster (`job result --out`), read by range, `predict`
//!   and `tidepool recommend`; [`safetensors_file`]: the safetensors format written in place.
//! - [`ratings_csv`]: `tidepool dataset builtin ratings`: synthetic ratings as CSV.

pub mod admin;
pub mod bench;
pub mod bench_import;
pub mod bench_kmeans;
pub mod bench_math;
pub mod bench_mf;
pub mod bench_train;
pub mod chaos;
pub mod cli_docs;
pub mod conn;
pub mod daemon;
pub mod datasets;
pub mod demo;
pub mod demo_recommend;
pub mod exit;
#[cfg(feature = "fault-injection")]
pub mod fault_file;
pub mod fault_spec;
pub mod hostile;
pub mod hostile_peer;
pub mod http;
pub mod import_watch;
pub mod job_watch;
pub mod jobs_cli;
pub mod jobs_cmd;
pub mod kv_demo;
pub mod local_cluster;
pub mod logging;
pub mod members_cmd;
pub mod mf_dir;
pub mod mf_model;
pub mod mf_predict;
pub mod model_dir;
pub mod netns;
pub mod ports;
pub mod predict;
pub mod ratings_csv;
pub mod recommend;
pub mod safetensors_file;
pub mod starve;
pub mod workload;
