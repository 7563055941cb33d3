//! The metrics and dashboards against a real cluster and a real Prometheus.
//!
//! A 3-node local cluster (three voters) takes some key-value increments and runs a
//! logistic-regression job on the breast-cancer data. Then:
//!
//! - every metric the dashboards query is on some node's `/metrics` (always);
//! - `promtool check metrics` has nothing to say about any node's `/metrics`;
//! - a real Prometheus, started from a generated config scraping the three admin ports every
//!   second, returns the autoscaling and job metrics through its HTTP API, with the job's step
//!   count and the cluster size right;
//! - every query of every dashboard panel, run through Prometheus's range API as Grafana would
//!   (`$__rate_interval` = 5s, `$instance` = all), returns data.
//!
//! The Prometheus half needs `prometheus` and `promtool` on the PATH (Debian package
//! `prometheus`; `.ci/run` installs it). Without them it is skipped with a message, unless
//! `TIDEPOOL_REQUIRE_PROMETHEUS=1`, which makes their absence a failure (CI sets it).
//! Waits are polls with deadlines.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use promql_parser::parser::{self, Expr};
use serde_json::Value;
use tidepool::local_cluster::{wait_all_up, wait_stable, LocalCluster};
use tidepool::{datasets, jobs_cli, workload};
use tidepool_runtime::client::{ClientOptions, ClusterClient};
use tidepool_runtime::control::JobState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
/// The one shipped scrape config (there used to be two).
const SCRAPE_CONFIGS: &[&str] = &["config/prometheus/scrape.yml"];
const SHARDS: u32 = 32;
/// What Grafana's `$__rate_interval` is with a 1 s scrape interval and a 1 s step (4 scrapes),
/// plus one for scrape jitter.
const RATE_INTERVAL: &str = "5s";

// ------------------------------------------------------------------ finding the tools

/// `name`'s path if it is an executable on the PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// The Prometheus binaries, or why there are none. Panics when they are required.
fn prometheus_tools() -> Option<(PathBuf, PathBuf)> {
    let found = (on_path("prometheus"), on_path("promtool"));
    let required = std::env::var("TIDEPOOL_REQUIRE_PROMETHEUS").is_ok_and(|v| v == "1");
    match found {
        (Some(p), Some(t)) => Some((p, t)),
        (p, t) => {
            let missing: Vec<&str> = [("prometheus", p.is_none()), ("promtool", t.is_none())]
                .into_iter()
                .filter_map(|(n, m)| m.then_some(n))
                .collect();
            assert!(
                !required,
                "prometheus not installed but required (TIDEPOOL_REQUIRE_PROMETHEUS=1): {} not on \
                 the PATH; install the Debian package `prometheus`",
                missing.join(" and ")
            );
            eprintln!(
                "SKIPPING the Prometheus checks: {} not on the PATH (install the Debian package \
                 `prometheus`, or set TIDEPOOL_REQUIRE_PROMETHEUS=1 to make this a failure)",
                missing.join(" and ")
            );
            None
        }
    }
}

// ------------------------------------------------------------------ HTTP

/// Percent-encodes a query-string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An HTTP/1.0 GET (no chunked encoding, no keep-alive): (status, body).
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow::anyhow!("no HTTP header"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("bad status line"))?;
        Ok((status, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(10), fut).await?
}

// ------------------------------------------------------------------ Prometheus

/// A Prometheus server child process, killed on drop.
struct Prometheus {
    child: std::process::Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
    _port: tidepool::ports::Port,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The scrape config the test generates: every node's admin port, every second.
fn scrape_config(targets: &[SocketAddr]) -> String {
    let targets: Vec<String> = targets.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: tidepool\n    metrics_path: /metrics\n    \
         static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    )
}

impl Prometheus {
    fn start(bin: &Path, promtool: &Path, targets: &[SocketAddr]) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("tidepool-prometheus-")
            .tempdir()
            .unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, scrape_config(targets)).unwrap();
        let check = Command::new(promtool)
            .args(["check", "config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "generated config rejected: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let port = tidepool::ports::reserve().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port.get()));
        let log = dir.path().join("prometheus.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Prometheus {
            child,
            addr,
            log,
            _dir: dir,
            _port: port,
        }
    }

    fn tail_log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = get(self.addr, "/-/ready").await {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited with {status}:\n{}", self.tail_log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within {timeout:?}:\n{}",
                self.tail_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await; // poll interval
        }
    }

    /// `GET /api/v1/<endpoint>?<params>`; the `data` of a successful answer.
    async fn api(&self, endpoint: &str, params: &[(&str, String)]) -> anyhow::Result<Value> {
        let qs: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        let (status, body) =
            get(self.addr, &format!("/api/v1/{endpoint}?{}", qs.join("&"))).await?;
        let v: Value =
            serde_json::from_str(&body).map_err(|e| anyhow::anyhow!("{status}: {e}: {body}"))?;
        if v["status"] != "success" {
            anyhow::bail!("{status}: {body}");
        }
        Ok(v["data"].clone())
    }

    /// An instant query's result vector.
    async fn query(&self, q: &str) -> anyhow::Result<Vec<Value>> {
        let data = self.api("query", &[("query", q.to_string())]).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// A range query from `start` to now at a 1 s step, as a Grafana time series panel runs it.
    async fn query_range(&self, q: &str, start: f64) -> anyhow::Result<Vec<Value>> {
        let end = unix_now();
        let data = self
            .api(
                "query_range",
                &[
                    ("query", q.to_string()),
                    ("start", format!("{start:.3}")),
                    ("end", format!("{end:.3}")),
                    ("step", "1".into()),
                ],
            )
            .await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Polls an instant query until `ok` accepts its result (then returns it) or the deadline.
    async fn poll(
        &self,
        q: &str,
        timeout: Duration,
        ok: impl Fn(&[Value]) -> bool,
    ) -> Result<Vec<Value>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.query(q).await;
            if let Ok(r) = &last {
                if ok(r) {
                    return Ok(r.clone());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("{q}: after {timeout:?}: {last:?}"));
            }
            tokio::time::sleep(Duration::from_millis(250)).await; // poll interval
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// What an instant query's values must add up to.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Any,
    AtLeast(f64),
    Exactly(f64),
}

/// The sum of an instant vector's values.
fn total(result: &[Value]) -> f64 {
    result
        .iter()
        .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
        .sum()
}

// ------------------------------------------------------------------ dashboards

/// Every panel query of every dashboard: (dashboard file, panel title, expr).
fn dashboard_queries() -> Vec<(String, String, String)> {
    fn collect(file: &str, list: &Value, out: &mut Vec<(String, String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            if p["type"] == "row" {
                collect(file, &p["panels"], out);
                continue;
            }
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((
                        file.to_string(),
                        p["title"].as_str().unwrap_or_default().to_string(),
                        expr.to_string(),
                    ));
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(Path::new(ROOT).join("dashboards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    for path in files {
        let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        collect(&file, &dash["panels"], &mut out);
        // Template variables' metrics (label_values(metric, label)) must exist too.
        for v in dash["templating"]["list"].as_array().into_iter().flatten() {
            let q = v["query"]["query"].as_str().or(v["query"].as_str());
            if let Some(metric) = q.and_then(|q| q.strip_prefix("label_values(")) {
                let metric = metric.split([',', '{', ')']).next().unwrap().trim();
                out.push((
                    file.clone(),
                    format!("variable {}", v["name"]),
                    metric.into(),
                ));
            }
        }
    }
    assert!(out.len() > 40, "only {} dashboard queries", out.len());
    out
}

/// Grafana's variables as the test's Prometheus needs them (`$instance` = All).
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("${__rate_interval}", RATE_INTERVAL)
        .replace("$__interval", "1s")
        .replace("${cluster}", ".*")
        .replace("$cluster", ".*")
        .replace("${node}", ".*")
        .replace("$node", ".*")
}

/// The metric names an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    fn walk(e: &Expr, out: &mut BTreeSet<String>) {
        match e {
            Expr::Aggregate(a) => {
                walk(&a.expr, out);
                if let Some(p) = &a.param {
                    walk(p, out);
                }
            }
            Expr::Unary(u) => walk(&u.expr, out),
            Expr::Binary(b) => {
                walk(&b.lhs, out);
                walk(&b.rhs, out);
            }
            Expr::Paren(p) => walk(&p.expr, out),
            Expr::Subquery(s) => walk(&s.expr, out),
            Expr::VectorSelector(vs) => out.extend(vs.name.clone()),
            Expr::MatrixSelector(ms) => out.extend(ms.vs.name.clone()),
            Expr::Call(c) => c.args.args.iter().for_each(|a| walk(a, out)),
            _ => {}
        }
    }
    let ast = parser::parse(&substitute(expr)).unwrap_or_else(|e| panic!("{expr}: {e}"));
    let mut out = BTreeSet::new();
    walk(&ast, &mut out);
    out
}

/// The metric names in a Prometheus text exposition.
fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// `promtool check metrics` on an exposition: (exit success, everything it printed).
fn promtool_check_metrics(promtool: &Path, text: &str) -> (bool, String) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let body = text.to_string();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(body.as_bytes())
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

// ------------------------------------------------------------------ the cluster

async fn connect(c: &LocalCluster) -> Arc<ClusterClient> {
    let opts = ClientOptions {
        retry_for: Duration::from_secs(60),
        request_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    Arc::new(c.admin_client(opts).await.unwrap())
}

/// Long enough (about ten scrapes in a debug build) that every rate and histogram panel sees
/// the job in more than one scrape.
const JOB: &str = "[job]\nkind = \"sgd\"\ndataset = \"cancer\"\n[model]\ntype = \"logistic\"\n\
                   [train]\nepochs = 60\nbatch_size = 32\nlearning_rate = 0.1\nl2 = 0.0001\n\
                   seed = 7\ncheckpoint_every = 20\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_cluster_metrics_dashboards_and_prometheus() {
    let tools = prometheus_tools();
    let mut c = LocalCluster::create(Path::new(BIN), 3, SHARDS, 3).unwrap();
    let admins: Vec<SocketAddr> = c.nodes.iter().map(|n| n.admin).collect();
    // Prometheus first, so it scrapes the nodes from their first second.
    let mut prom = tools
        .as_ref()
        .map(|(bin, tool)| Prometheus::start(bin, tool, &admins));
    c.start_all().unwrap();
    if let Some(p) = prom.as_mut() {
        p.wait_ready(Duration::from_secs(60)).await;
    }
    c.wait_ready(Duration::from_secs(90)).await.unwrap();
    let client = connect(&c).await;
    wait_all_up(&client, 3, Duration::from_secs(90))
        .await
        .unwrap();
    wait_stable(&client, Duration::from_secs(120))
        .await
        .unwrap();

    let started = unix_now();
    // Some key-value traffic for the shard panels (jobs do not go through shard ops).
    let kv = workload::run_increments(client.clone(), 2000, 50, 8).await;
    assert!(kv.acked > 0, "{kv:?}");

    let table = datasets::builtin("breast_cancer").unwrap();
    jobs_cli::import_table(&client, &table, "cancer")
        .await
        .unwrap();
    let t0 = Instant::now();
    let id = jobs_cli::submit(&client, JOB).await.unwrap();
    let rec = jobs_cli::wait(&client, &id, false, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
    eprintln!("job {id}: {} steps in {:?}", rec.step, t0.elapsed());

    let mut failures: Vec<String> = Vec::new();

    // Every metric a dashboard queries is on some node's /metrics now that a job ran.
    let queries = dashboard_queries();
    let mut texts = Vec::new();
    for i in 0..c.nodes.len() {
        texts.push(c.metrics(i).await.unwrap());
    }
    let exposed: BTreeSet<String> = texts.iter().flat_map(|t| exposed_names(t)).collect();
    let mut wanted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, title, expr) in &queries {
        let names = if title.starts_with("variable ") {
            BTreeSet::from([expr.clone()])
        } else {
            metric_names(expr)
        };
        for n in names {
            wanted
                .entry(n)
                .or_default()
                .insert(format!("{file}: {title}"));
        }
    }
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(n, _)| !exposed.contains(*n))
        .map(|(n, panels)| {
            let panels: Vec<&str> = panels.iter().map(String::as_str).collect();
            format!("  {n} (used by {})", panels.join("; "))
        })
        .collect();
    if !missing.is_empty() {
        failures.push(format!(
            "{} dashboard metrics are on no node's /metrics after a job (a series is exported \
             only once touched: record it at start-up, every label value of its closed set):\n{}",
            missing.len(),
            missing.join("\n")
        ));
    }

    if let (Some((_, promtool)), Some(prom)) = (tools.as_ref(), prom.as_ref()) {
        // promtool's lint has nothing to say about any node's exposition.
        for (i, text) in texts.iter().enumerate() {
            let (ok, said) = promtool_check_metrics(promtool, text);
            if !ok || !said.trim().is_empty() {
                failures.push(format!(
                    "promtool check metrics on {}'s /metrics: {said}",
                    c.nodes[i].name
                ));
            }
        }

        // Prometheus scrapes all three nodes.
        if let Err(e) = prom
            .poll("sum(up{job=\"tidepool\"})", Duration::from_secs(30), |r| {
                total(r) == 3.0
            })
            .await
        {
            failures.push(format!("not all nodes are up in Prometheus: {e}"));
        }

        // The autoscaling and job metrics, read back through the HTTP API: (query, at least
        // this many series, and if set, the exact sum / a lower bound of their values).
        let steps = rec.step as f64;
        let checks: &[(&str, usize, Expect)] = &[
            ("tidepool_autoscale_desired_nodes", 1, Expect::Any),
            (
                "max(tidepool_autoscale_desired_nodes)",
                1,
                Expect::AtLeast(1.0),
            ),
            (
                "max(tidepool_autoscale_current_nodes)",
                1,
                Expect::Exactly(3.0),
            ),
            ("tidepool_autoscale_utilization_ratio", 1, Expect::Any),
            ("tidepool_autoscale_backlog_tasks", 1, Expect::Any),
            ("tidepool_worker_utilization_ratio", 3, Expect::Any),
            ("tidepool_job_steps_total", 1, Expect::Any),
            ("sum(tidepool_job_steps_total)", 1, Expect::Exactly(steps)),
            ("tidepool_job_samples_total", 1, Expect::Any),
            ("tidepool_job_loss", 1, Expect::Any),
            ("tidepool_job_step_duration_seconds_count", 1, Expect::Any),
            ("tidepool_job_checkpoints_total", 1, Expect::AtLeast(1.0)),
            (
                "sum(tidepool_jobs_finished_total{state=\"succeeded\"})",
                1,
                Expect::Exactly(1.0),
            ),
        ];
        for &(q, series, expect) in checks {
            let ok = |r: &[Value]| {
                r.len() >= series
                    && match expect {
                        Expect::Any => true,
                        Expect::AtLeast(v) => total(r) >= v,
                        Expect::Exactly(v) => total(r) == v,
                    }
            };
            if let Err(e) = prom.poll(q, Duration::from_secs(30), ok).await {
                failures.push(format!(
                    "Prometheus never answered {q} with {series}+ series, {expect:?}: {e}"
                ));
            }
        }

        // Every dashboard query returns data, as Grafana would run it over the job's time.
        let mut pending: Vec<&(String, String, String)> = queries
            .iter()
            .filter(|(_, t, _)| !t.starts_with("variable "))
            .collect();
        let mut nan_only = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last_err: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let mut still = Vec::new();
            for q in pending {
                let expr = substitute(&q.2);
                match prom.query_range(&expr, started - 5.0).await {
                    Ok(r) if !r.is_empty() => {
                        let finite = r.iter().any(|s| {
                            s["values"].as_array().into_iter().flatten().any(|v| {
                                v[1].as_str()
                                    .and_then(|x| x.parse::<f64>().ok())
                                    .is_some_and(f64::is_finite)
                            })
                        });
                        if !finite {
                            nan_only.push(format!("  {}: {:?}: {}", q.0, q.1, q.2));
                        }
                    }
                    Ok(_) => {
                        last_err.insert(q.2.clone(), "empty result".into());
                        still.push(q);
                    }
                    Err(e) => {
                        last_err.insert(q.2.clone(), e.to_string());
                        still.push(q);
                    }
                }
            }
            pending = still;
            if pending.is_empty() || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await; // poll interval
        }
        if !nan_only.is_empty() {
            eprintln!(
                "note: these panel queries returned only NaN (no events in the window, e.g. \
                 a histogram with no observations):\n{}",
                nan_only.join("\n")
            );
        }
        if !pending.is_empty() {
            let lines: Vec<String> = pending
                .iter()
                .map(|(f, t, e)| format!("  {f}: {t:?}: {e} ({})", last_err[e.as_str()]))
                .collect();
            failures.push(format!(
                "{} dashboard queries returned no data from Prometheus:\n{}",
                lines.len(),
                lines.join("\n")
            ));
        }
        eprintln!("ran {} dashboard queries against Prometheus", queries.len());
    }

    let _ = c.stop_all(Duration::from_secs(30)).await;
    drop(prom);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The shipped Prometheus configs are valid for promtool.
#[test]
fn promtool_accepts_the_shipped_configs() {
    let Some((_, promtool)) = prometheus_tools() else {
        return;
    };
    for rel in SCRAPE_CONFIGS {
        let out = Command::new(&promtool)
            .args(["check", "config"])
            .arg(Path::new(ROOT).join(rel))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{rel}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The lint above is not vacuous: promtool does flag a bad exposition read from stdin.
#[test]
fn promtool_flags_a_bad_exposition() {
    let Some((_, promtool)) = prometheus_tools() else {
        return;
    };
    let bad = "# HELP x_seconds Time.\n# TYPE x_seconds counter\nx_seconds 1\n";
    let (ok, said) = promtool_check_metrics(&promtool, bad);
    assert!(!ok && said.contains("_total"), "{ok} {said}");
    let good = "# HELP x_total Things.\n# TYPE x_total counter\nx_total 1\n";
    let (ok, said) = promtool_check_metrics(&promtool, good);
    assert!(ok && said.trim().is_empty(), "{ok} {said}");
}
