//! Static checks of the shipped Grafana dashboards (`dashboards/*.json`) and the Grafana
//! provisioning files (`config/grafana/`), so a rename cannot silently blank a panel and the
//! files stay provisionable by a stock Grafana:
//!
//! - every dashboard parses, has a unique uid and title, a `datasource` template variable and no
//!   `${DS_...}` import placeholders or `__inputs`; every panel uses `${datasource}`, has a known
//!   unit and at least one query;
//! - every PromQL expression parses (promql-parser, after substituting Grafana's variables);
//!   walking its AST: every selector names a metric of the table with the right suffix for its
//!   kind, filters and groups only by labels the metric has, counters and histogram series only
//!   appear under `rate`/`increase`/`irate`, gauges never do, bucket series only under
//!   `histogram_quantile` with `le` kept, and every range is `[$__rate_interval]`;
//! - legends only name labels the query keeps; each dashboard covers what the issue asks of it;
//! - the provisioning YAML has the fields Grafana requires.
//!
//! The live half (every metric present on a node after a job, every query returning data from
//! a real Prometheus) is `tests/prometheus.rs`.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use promql_parser::label::MatchOp;
use promql_parser::parser::{self, Expr, LabelModifier, VectorSelector};
use serde_json::Value;
use tidepool_runtime::metrics::{MetricDef, MetricKind, ALL};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
/// The one shipped scrape config (there used to be two).
const SCRAPE_CONFIGS: &[&str] = &["config/prometheus/scrape.yml"];

/// Labels on every scraped series: Prometheus's target labels and the node's own global labels
/// (`node`: its name, `cluster`: `cluster.name`).
const TARGET_LABELS: &[&str] = &["instance", "job", "node", "cluster"];

/// Grafana unit ids the dashboards may use (a typo would show raw numbers).
const UNITS: &[&str] = &[
    "short",
    "none",
    "s",
    "ms",
    "bytes",
    "Bps",
    "ops",
    "reqps",
    "cps",
    "pps",
    "percentunit",
];

/// What each dashboard must show (the list), as metrics it must query.
const REQUIRED: &[(&str, &[&str])] = &[
    (
        "tidepool-cluster.json",
        &[
            "tidepool_cluster_members",
            "tidepool_raft_is_leader", // the leader panel, by name
            "tidepool_shards_owned",
            "tidepool_rebalances_total",
        ],
    ),
    (
        "tidepool-autoscaling.json",
        &[
            "tidepool_autoscale_desired_nodes",
            "tidepool_autoscale_current_nodes",
            "tidepool_autoscale_utilization_ratio",
            "tidepool_autoscale_backlog_tasks",
            "tidepool_worker_utilization_ratio",
            "tidepool_backlog_tasks",
        ],
    ),
    (
        "tidepool-transport.json",
        &[
            "tidepool_wire_frames_received_total",
            "tidepool_wire_frames_sent_total",
            "tidepool_wire_received_bytes_total",
            "tidepool_wire_sent_bytes_total",
            "tidepool_quic_rtt_seconds",
            "tidepool_quic_lost_packets_total",
            "tidepool_wire_rejected_frames_total",
        ],
    ),
    (
        "tidepool-jobs.json",
        &[
            "tidepool_job_loss",
            "tidepool_job_samples_total",
            "tidepool_job_step_duration_seconds_bucket",
            "tidepool_job_checkpoints_total",
        ],
    ),
];

/// Which series of a metric a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Series {
    Plain,
    Bucket,
    Sum,
    Count,
}

/// Every exposed series name: histograms as `_bucket`, `_sum` and `_count`.
fn known() -> HashMap<String, (&'static MetricDef, Series)> {
    let mut out = HashMap::new();
    for m in ALL {
        if m.kind == MetricKind::Histogram {
            for (suffix, s) in [
                ("_bucket", Series::Bucket),
                ("_sum", Series::Sum),
                ("_count", Series::Count),
            ] {
                out.insert(format!("{}{suffix}", m.name), (m, s));
            }
        } else {
            out.insert(m.name.to_string(), (m, Series::Plain));
        }
    }
    out
}

fn dashboards() -> Vec<(PathBuf, String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(Path::new(ROOT).join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let dash: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        out.push((path, text, dash));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 4, "expected at least 4 dashboards: {out:?}");
    out
}

/// Every non-row panel, including those nested in collapsed rows.
fn panels(dash: &Value) -> Vec<&Value> {
    fn collect<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            if p["type"] == "row" {
                collect(&p["panels"], out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    collect(&dash["panels"], &mut out);
    out
}

/// Grafana's variables replaced by values PromQL accepts (`$instance` = the "All" value).
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("${__rate_interval}", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("${cluster}", ".*")
        .replace("$cluster", ".*")
        .replace("${node}", ".*")
        .replace("$node", ".*")
}

/// Walks a parsed expression, collecting the metric names it reads and what is wrong with it;
/// returns the labels its result keeps.
struct Walk<'a> {
    known: &'a HashMap<String, (&'static MetricDef, Series)>,
    names: BTreeSet<String>,
    problems: Vec<String>,
}

/// Where a selector sits: the range function applied to it (if any) and whether it is under a
/// `histogram_quantile` with `le` kept by every aggregation in between.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    range_fn: Option<&'a str>,
    quantile_le: bool,
}

impl Walk<'_> {
    fn expr(&mut self, e: &Expr, ctx: Ctx<'_>) -> BTreeSet<String> {
        let plain = Ctx {
            range_fn: None,
            ..ctx
        };
        match e {
            Expr::Aggregate(a) => {
                if let Some(p) = &a.param {
                    self.expr(p, plain);
                }
                let keeps_le = match &a.modifier {
                    Some(LabelModifier::Include(l)) => l.labels.iter().any(|x| x == "le"),
                    Some(LabelModifier::Exclude(l)) => !l.labels.iter().any(|x| x == "le"),
                    None => false,
                };
                let inner = self.expr(
                    &a.expr,
                    Ctx {
                        range_fn: None,
                        quantile_le: ctx.quantile_le && keeps_le,
                    },
                );
                match &a.modifier {
                    Some(LabelModifier::Include(l)) => {
                        for label in &l.labels {
                            if !inner.contains(label) {
                                self.problems.push(format!(
                                    "groups by {label:?}, which the series under it do not have ({inner:?})"
                                ));
                            }
                        }
                        l.labels.iter().cloned().collect()
                    }
                    Some(LabelModifier::Exclude(l)) => inner
                        .into_iter()
                        .filter(|x| !l.labels.contains(x))
                        .collect(),
                    None => BTreeSet::new(),
                }
            }
            Expr::Unary(u) => self.expr(&u.expr, plain),
            Expr::Binary(b) => {
                let mut l = self.expr(&b.lhs, plain);
                l.extend(self.expr(&b.rhs, plain));
                l
            }
            Expr::Paren(p) => self.expr(&p.expr, ctx),
            Expr::Subquery(_) => {
                self.problems.push("subqueries are not used here".into());
                BTreeSet::new()
            }
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) => BTreeSet::new(),
            Expr::VectorSelector(vs) => self.selector(vs, ctx),
            Expr::MatrixSelector(ms) => {
                if ctx.range_fn.is_none() {
                    self.problems
                        .push("a range vector outside a range function".into());
                }
                self.selector(&ms.vs, ctx)
            }
            Expr::Call(c) => {
                let name = c.func.name;
                let mut out = BTreeSet::new();
                for (i, arg) in c.args.args.iter().enumerate() {
                    let sub = match (name, i) {
                        ("histogram_quantile", 1) => Ctx {
                            range_fn: None,
                            quantile_le: true,
                        },
                        _ if matches!(**arg, Expr::MatrixSelector(_)) => Ctx {
                            range_fn: Some(name),
                            ..ctx
                        },
                        _ => plain,
                    };
                    out.extend(self.expr(arg, sub));
                }
                if name == "histogram_quantile" {
                    out.remove("le");
                }
                out
            }
            Expr::Extension(_) => {
                self.problems.push("extension expression".into());
                BTreeSet::new()
            }
        }
    }

    fn selector(&mut self, vs: &VectorSelector, ctx: Ctx<'_>) -> BTreeSet<String> {
        let name = vs.name.clone().or_else(|| {
            vs.matchers
                .matchers
                .iter()
                .find(|m| m.name == "__name__" && matches!(m.op, MatchOp::Equal))
                .map(|m| m.value.clone())
        });
        let Some(name) = name else {
            self.problems
                .push("a selector without a metric name".to_string());
            return BTreeSet::new();
        };
        let Some(&(def, series)) = self.known.get(&name) else {
            self.problems.push(format!(
                "{name} is not in the metric table (runtime/src/metrics.rs), or has the wrong suffix for its kind"
            ));
            return BTreeSet::new();
        };
        self.names.insert(name.clone());
        let mut labels: BTreeSet<String> = def
            .labels
            .iter()
            .chain(TARGET_LABELS)
            .map(|s| s.to_string())
            .collect();
        if series == Series::Bucket {
            labels.insert("le".into());
        }
        for m in vs
            .matchers
            .matchers
            .iter()
            .chain(vs.matchers.or_matchers.iter().flatten())
        {
            if m.name != "__name__" && !labels.contains(&m.name) {
                self.problems
                    .push(format!("{name} has no label {:?}", m.name));
            }
        }
        let counted = matches!(ctx.range_fn, Some("rate" | "increase" | "irate"));
        match (def.kind, series) {
            (MetricKind::Counter, _) | (MetricKind::Histogram, Series::Sum | Series::Count) => {
                if !counted {
                    self.problems.push(format!(
                        "{name} is a counter: query it only inside rate()/increase()"
                    ));
                }
            }
            (MetricKind::Histogram, Series::Bucket) => {
                if !counted || !ctx.quantile_le {
                    self.problems.push(format!(
                        "{name}: use histogram_quantile(q, sum by (le) (rate({name}[$__rate_interval])))"
                    ));
                }
            }
            (MetricKind::Gauge, _) => {
                if counted {
                    self.problems.push(format!(
                        "{name} is a gauge: rate()/increase() of it is meaningless"
                    ));
                }
            }
            (MetricKind::Histogram, Series::Plain) => unreachable!(),
        }
        labels
    }
}

/// Everything wrong with one PromQL expression; the metric names it reads and the labels its
/// result keeps.
fn check_expr(
    expr: &str,
    known: &HashMap<String, (&'static MetricDef, Series)>,
) -> (BTreeSet<String>, BTreeSet<String>, Vec<String>) {
    let mut problems = Vec::new();
    // Every range is Grafana's `$__rate_interval` (adapts to the scrape interval and the zoom).
    let mut rest = expr;
    while let Some(start) = rest.find('[') {
        let end = rest[start..].find(']').map_or(rest.len(), |e| start + e);
        let range = &rest[start + 1..end];
        if range != "$__rate_interval" {
            problems.push(format!("range [{range}]: use [$__rate_interval]"));
        }
        rest = &rest[end.min(rest.len())..];
        if rest.starts_with(']') {
            rest = &rest[1..];
        }
    }
    let text = substitute(expr);
    if text.contains('$') {
        problems.push(format!("unknown Grafana variable in {text:?}"));
    }
    let ast = match parser::parse(&text) {
        Ok(ast) => ast,
        Err(e) => {
            problems.push(format!("does not parse: {e}"));
            return (BTreeSet::new(), BTreeSet::new(), problems);
        }
    };
    let mut walk = Walk {
        known,
        names: BTreeSet::new(),
        problems,
    };
    let kept = walk.expr(
        &ast,
        Ctx {
            range_fn: None,
            quantile_le: false,
        },
    );
    if walk.names.is_empty() {
        walk.problems.push("queries no tidepool metric".into());
    }
    (walk.names, kept, walk.problems)
}

#[test]
fn dashboards_follow_the_rules() {
    let known = known();
    let ds = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    let mut problems = Vec::new();
    let mut uids = HashSet::new();
    let mut titles = HashSet::new();
    let mut exprs = 0;
    for (path, text, dash) in dashboards() {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut bad = |what: String| problems.push(format!("{file}: {what}"));
        let uid = dash["uid"].as_str().unwrap_or_default();
        let title = dash["title"].as_str().unwrap_or_default();
        if uid.is_empty() || !uids.insert(uid.to_string()) {
            bad(format!("uid {uid:?} missing or not unique"));
        }
        if title.is_empty() || !titles.insert(title.to_string()) {
            bad(format!("title {title:?} missing or not unique"));
        }
        if dash["schemaVersion"].as_u64().is_none_or(|v| v < 36) {
            bad("schemaVersion below 36 (Grafana 9+)".into());
        }
        if text.contains("${DS_") || dash.get("__inputs").is_some() {
            bad("import placeholders (${DS_...} / __inputs): use the datasource variable".into());
        }
        let vars = dash["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !vars.iter().any(|v| {
            v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"
        }) {
            bad("no `datasource` template variable of type datasource, query prometheus".into());
        }
        for v in vars.iter().filter(|v| v["type"] == "query") {
            if v["datasource"] != ds {
                bad(format!(
                    "variable {} does not use ${{datasource}}",
                    v["name"]
                ));
            }
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap_or("");
            let metric = q
                .strip_prefix("label_values(")
                .and_then(|r| r.split([',', '{', ')']).next())
                .unwrap_or("")
                .trim();
            if !known.contains_key(metric) {
                bad(format!(
                    "variable {} queries unknown metric {metric:?}",
                    v["name"]
                ));
            }
        }
        let mut ids = HashSet::new();
        let mut used = BTreeSet::new();
        let panels = panels(&dash);
        if panels.is_empty() {
            bad("no panels".into());
        }
        for p in panels {
            let ptitle = p["title"].as_str().unwrap_or_default().to_string();
            let mut bad = |what: String| problems.push(format!("{file}: panel {ptitle:?}: {what}"));
            if !p["id"].as_u64().is_some_and(|id| ids.insert(id)) {
                bad("id missing or not unique".into());
            }
            let g = &p["gridPos"];
            if g["w"].as_u64().is_none_or(|w| w == 0)
                || g["x"].as_u64().unwrap_or(99) + g["w"].as_u64().unwrap_or(0) > 24
                || g["h"].as_u64().is_none_or(|h| h == 0)
            {
                bad(format!("bad gridPos {g}"));
            }
            if p["datasource"] != ds {
                bad(format!("datasource {} is not {ds}", p["datasource"]));
            }
            let unit = p["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or("");
            if !UNITS.contains(&unit) {
                bad(format!("unit {unit:?} missing or not one of {UNITS:?}"));
            }
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            if targets.is_empty() {
                bad("no queries".into());
            }
            let mut refs = HashSet::new();
            for t in &targets {
                if !t["refId"]
                    .as_str()
                    .is_some_and(|r| refs.insert(r.to_string()))
                {
                    bad("refId missing or not unique".into());
                }
                if t["datasource"] != ds {
                    bad(format!("query datasource {} is not {ds}", t["datasource"]));
                }
                let Some(expr) = t["expr"].as_str() else {
                    bad("query without expr".into());
                    continue;
                };
                exprs += 1;
                let (names, kept, probs) = check_expr(expr, &known);
                for pr in probs {
                    bad(format!("{expr}: {pr}"));
                }
                let legend = t["legendFormat"].as_str().unwrap_or("");
                for part in legend.split("{{").skip(1) {
                    let label = part.split("}}").next().unwrap_or("").trim();
                    if !kept.contains(label) {
                        bad(format!(
                            "legend {legend:?} names {label:?}, which {expr} does not keep ({kept:?})"
                        ));
                    }
                }
                // Unit sanity for single-metric queries: latencies in seconds, byte rates in
                // bytes/s, ratios as 0..1.
                if names.len() == 1 && !expr.contains(" / ") {
                    let n = names.iter().next().unwrap();
                    let want = if expr.starts_with("histogram_quantile") && n.contains("_seconds") {
                        Some("s")
                    } else if n.ends_with("_bytes_total") {
                        Some("Bps")
                    } else if n.ends_with("_bytes") {
                        Some("bytes")
                    } else if n.ends_with("_ratio") {
                        Some("percentunit")
                    } else if n.ends_with("_seconds") {
                        Some("s")
                    } else {
                        None
                    };
                    if let Some(want) = want {
                        if unit != want {
                            bad(format!("{n} is shown in {unit:?}, expected {want:?}"));
                        }
                    }
                }
                used.extend(names);
            }
        }
        if let Some((_, need)) = REQUIRED.iter().find(|(f, _)| *f == file) {
            for n in *need {
                if !used.contains(*n) {
                    problems.push(format!("{file}: must show {n}"));
                }
            }
        }
    }
    for (file, _) in REQUIRED {
        if !Path::new(ROOT).join("dashboards").join(file).exists() {
            problems.push(format!("dashboards/{file} is missing"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(exprs > 40, "only {exprs} queries checked");
}

/// The checker itself catches what it should (a broken rule would otherwise pass everything).
#[test]
fn the_checker_rejects_bad_queries() {
    let known = known();
    let bad = [
        ("tidepool_job_steps_total", "counter"),
        ("sum(tidepool_job_steps_total)", "counter"),
        ("rate(tidepool_job_loss[$__rate_interval])", "gauge"),
        ("rate(tidepool_job_steps_total[5m])", "[$__rate_interval]"),
        ("tidepool_no_such_metric", "not in the metric table"),
        ("tidepool_job_step_duration_seconds", "not in the metric table"),
        ("tidepool_shards_owned{kind=\"x\"}", "no label"),
        ("sum by (kind) (tidepool_shards_owned)", "groups by"),
        (
            "histogram_quantile(0.9, sum(rate(tidepool_job_task_duration_seconds_bucket[$__rate_interval])))",
            "histogram_quantile",
        ),
        (
            "sum(rate(tidepool_job_task_duration_seconds_bucket[$__rate_interval]))",
            "histogram_quantile",
        ),
        ("sum(tidepool_job_task_duration_seconds_count)", "counter"),
        ("sum(rate(tidepool_job_steps_total[$__rate_interval]", "does not parse"),
        ("up", "not in the metric table"),
    ];
    for (expr, want) in bad {
        let (_, _, problems) = check_expr(expr, &known);
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "{expr}: expected a problem containing {want:?}, got {problems:?}"
        );
    }
    let good = [
        "sum by (kind) (rate(tidepool_job_steps_total{cluster=~\"$cluster\",node=~\"$node\"}[$__rate_interval]))",
        "histogram_quantile(0.99, sum by (le, kind) (rate(tidepool_job_step_duration_seconds_bucket[$__rate_interval])))",
        "max by (instance) (tidepool_autoscale_current_nodes) > 0",
        "sum(rate(tidepool_worker_busy_seconds_total[$__rate_interval])) / sum(tidepool_worker_threads)",
    ];
    for expr in good {
        let (names, _, problems) = check_expr(expr, &known);
        assert!(problems.is_empty(), "{expr}: {problems:?}");
        assert!(!names.is_empty());
    }
}

fn yaml(rel: &str) -> Value {
    let path = Path::new(ROOT).join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every dashboard has `cluster` and `node` variables (node names from the `node` label, the
/// node list narrowed by the cluster), and every panel query selects by both, in every selector.
#[test]
fn every_dashboard_filters_by_cluster_and_node() {
    let mut problems = Vec::new();
    for (path, _, dash) in dashboards() {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let vars = dash["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let query = |name: &str| {
            vars.iter()
                .find(|v| v["name"] == name && v["type"] == "query")
                .map(|v| {
                    v["query"]["query"]
                        .as_str()
                        .or(v["query"].as_str())
                        .unwrap_or("")
                        .to_string()
                })
        };
        match query("cluster") {
            Some(q) if q.starts_with("label_values(") && q.ends_with(", cluster)") => {}
            q => problems.push(format!("{file}: cluster variable {q:?}")),
        }
        match query("node") {
            Some(q) if q.contains("cluster=~\"$cluster\"") && q.ends_with(", node)") => {}
            q => problems.push(format!(
                "{file}: node variable {q:?} (label_values(..{{cluster=~\"$cluster\"}}, node))"
            )),
        }
        if vars.iter().any(|v| v["name"] == "instance") {
            problems.push(format!("{file}: still has an instance variable"));
        }
        for p in panels(&dash) {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or("");
                // Every selector (a `{...}` after a metric name) filters by both.
                let selectors = expr.matches("tidepool_").count();
                let with_both = expr
                    .matches("{cluster=~\"$cluster\",node=~\"$node\"")
                    .count()
                    + expr
                        .matches(",cluster=~\"$cluster\",node=~\"$node\"")
                        .count();
                if selectors == 0 || with_both != selectors {
                    problems.push(format!("{file}: panel {:?}: {expr} does not filter every selector by $cluster and $node", p["title"]));
                }
                if expr.contains("instance")
                    || t["legendFormat"]
                        .as_str()
                        .unwrap_or("")
                        .contains("instance")
                {
                    problems.push(format!(
                        "{file}: panel {:?}: names nodes by instance, not node: {expr}",
                        p["title"]
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn grafana_provisioning_files_are_complete() {
    let ds = yaml("config/grafana/provisioning/datasources/tidepool.yml");
    assert_eq!(ds["apiVersion"], 1, "datasources: apiVersion must be 1");
    let list = ds["datasources"].as_array().expect("datasources: a list");
    assert!(!list.is_empty());
    let mut names = HashSet::new();
    for d in list {
        let name = d["name"].as_str().expect("datasource needs a name");
        assert!(names.insert(name), "duplicate datasource {name}");
        assert_eq!(d["type"], "prometheus", "{name}: type");
        assert_eq!(
            d["access"], "proxy",
            "{name}: access (browser access is gone)"
        );
        let url = d["url"].as_str().expect("datasource needs a url");
        assert!(
            url.starts_with("http://") || url.starts_with("https://"),
            "{url}"
        );
        let interval = d["jsonData"]["timeInterval"].as_str().unwrap_or("");
        assert!(
            interval.ends_with('s') && interval[..interval.len() - 1].parse::<u32>().is_ok(),
            "{name}: jsonData.timeInterval (the scrape interval) should be set, e.g. 5s"
        );
        // $__rate_interval is at least 4 x timeInterval: it must be the real scrape interval.
        let scrape = yaml("config/prometheus/scrape.yml");
        assert_eq!(
            Some(interval),
            scrape["global"]["scrape_interval"].as_str(),
            "{name}: jsonData.timeInterval must equal scrape.yml's scrape_interval"
        );
    }
    assert_eq!(
        list.iter().filter(|d| d["isDefault"] == true).count(),
        1,
        "exactly one default datasource (the dashboards' variable picks the default)"
    );

    let dash = yaml("config/grafana/provisioning/dashboards/tidepool.yml");
    assert_eq!(dash["apiVersion"], 1, "dashboards: apiVersion must be 1");
    let providers = dash["providers"].as_array().expect("providers: a list");
    assert!(!providers.is_empty());
    let readme = std::fs::read_to_string(Path::new(ROOT).join("config/grafana/README.md")).unwrap();
    for p in providers {
        let name = p["name"].as_str().expect("provider needs a name");
        assert_eq!(p["type"], "file", "{name}: type");
        assert_eq!(p["options"]["foldersFromFilesStructure"], false, "{name}");
        let path = p["options"]["path"].as_str().expect("options.path");
        assert!(
            path.starts_with('/'),
            "{name}: options.path must be absolute"
        );
        assert!(
            readme.contains(path),
            "config/grafana/README.md must say to mount dashboards/ at {path}"
        );
        if let Some(org) = p.get("orgId") {
            assert!(org.as_u64().is_some_and(|o| o >= 1), "{name}: orgId");
        }
    }
    for rel in [
        "provisioning/datasources/tidepool.yml",
        "provisioning/dashboards/tidepool.yml",
    ] {
        assert!(readme.contains(rel), "README does not mention {rel}");
    }
}

#[test]
fn prometheus_configs_parse() {
    for rel in SCRAPE_CONFIGS {
        let cfg = yaml(rel);
        let jobs = cfg["scrape_configs"].as_array().expect("scrape_configs");
        assert!(
            jobs.iter().any(
                |j| j["metrics_path"].as_str().unwrap_or("/metrics") == "/metrics"
                    && j["static_configs"][0]["targets"]
                        .as_array()
                        .is_some_and(|t| !t.is_empty())
            ),
            "{rel}: no job scraping /metrics"
        );
    }
}
