//! A minimal HTTP/1.1 GET over loopback, for polling `/readyz` and scraping `/metrics` from the
//! demo and the tests (no HTTP client dependency for two endpoints we serve ourselves).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GETs `path` and returns (status, body). Bodies are capped at 16 MiB.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        (&mut s).take(16 << 20).read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            bail!("no HTTP header from {addr}")
        };
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("bad status line")?;
        Ok((status, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .context("HTTP GET timed out")?
}

/// Sums every sample of `name` whose labels contain all of `labels` (`k="v"` pairs) in a
/// Prometheus text exposition.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())?
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
}
