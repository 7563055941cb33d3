//! HTTP GET against a node's admin server (polling `/readyz`, scraping `/metrics`) for the demo,
//! the chaos checker and the tests, and sums over a scraped Prometheus text exposition.
//!
//! The client is reqwest (plain `http://`, no TLS stack of its own, proxies ignored: these are
//! our own admin servers, usually on loopback); the exposition is parsed by the
//! `prometheus-parse` crate. That parser splits label sets on `,` and `=`, so a label *value*
//! holding either would be mis-read; no Tidepool metric has such a value (labels are fixed
//! enums, names and versions; see `tidepool_runtime::metrics`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Bodies longer than this are an error rather than read on.
const MAX_BODY: usize = 16 << 20;
/// The whole request (connect, headers, body) must finish within this.
const TIMEOUT: Duration = Duration::from_secs(5);

/// GETs `path` and returns (status, body). Bodies are capped at 16 MiB; the whole request at 5 s.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(TIMEOUT)
        .build()
        .context("HTTP client")?;
    let url = format!("http://{addr}{path}");
    let mut resp = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .with_context(|| format!("GET {url}: body"))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            bail!("GET {url}: body over {MAX_BODY} bytes");
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Sums every sample of `name` whose labels include all of `labels` (`k="v"` pairs) in a
/// Prometheus text exposition. Counters, gauges and untyped samples count, including a
/// histogram's `NAME_count` and `NAME_sum` series; bucket and quantile series do not (ask for
/// `NAME_count` instead).
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let Ok(scrape) = prometheus_parse::Scrape::parse(lines) else {
        // Unreachable: the lines come from memory and never fail to read.
        return 0.0;
    };
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .filter_map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            prometheus_parse::Value::Histogram(_) | prometheus_parse::Value::Summary(_) => None,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_matching_series() {
        let text = "# HELP x\nx_total{op=\"incr\",result=\"applied\"} 3\nx_total{op=\"incr\",result=\"duplicate\"} 2\nx_total{op=\"get\",result=\"read\"} 7\n";
        assert_eq!(super::sum_metric(text, "x_total", &[("op", "incr")]), 5.0);
        assert_eq!(
            super::sum_metric(text, "x_total", &[("result", "applied")]),
            3.0
        );
        assert_eq!(super::sum_metric(text, "x_total", &[]), 12.0);
    }

    /// Typed families as metrics-exporter-prometheus writes them: a label matches by value, not
    /// as a substring of the label set, and a histogram's `_count` is a plain series.
    #[test]
    fn typed_families_and_exact_label_values() {
        let text = "\
# TYPE tidepool_ops_total counter
tidepool_ops_total{op=\"incr\",role=\"node\"} 4
tidepool_ops_total{op=\"incr\",peer_role=\"node\"} 6
# TYPE tidepool_shards_owned gauge
tidepool_shards_owned 12
# TYPE tidepool_task_duration_seconds histogram
tidepool_task_duration_seconds_bucket{job=\"a\",le=\"0.5\"} 1
tidepool_task_duration_seconds_bucket{job=\"a\",le=\"+Inf\"} 3
tidepool_task_duration_seconds_sum{job=\"a\"} 2.5
tidepool_task_duration_seconds_count{job=\"a\"} 3
";
        let sum = super::sum_metric;
        assert_eq!(sum(text, "tidepool_ops_total", &[("role", "node")]), 4.0);
        assert_eq!(sum(text, "tidepool_ops_total", &[]), 10.0);
        assert_eq!(sum(text, "tidepool_shards_owned", &[]), 12.0);
        assert_eq!(sum(text, "tidepool_task_duration_seconds_count", &[]), 3.0);
        assert_eq!(sum(text, "tidepool_task_duration_seconds_sum", &[]), 2.5);
        assert_eq!(sum(text, "tidepool_task_duration_seconds", &[]), 0.0);
        assert_eq!(sum(text, "tidepool_missing", &[]), 0.0);
    }
}
