//! Client connection flags shared by every client command (`--connect`, `--cert-dir`,
//! `--json`) and the connect call.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tidepool_runtime::client::{ClientOptions, ClusterClient};
use tidepool_runtime::transport::TlsMaterial;

#[derive(Args, Debug)]
pub struct Conn {
    /// Any node's QUIC address, HOST:PORT (a name or an IP); several separated by commas. Names
    /// are resolved when the command runs, to every address they have.
    #[arg(
        long,
        env = "TIDEPOOL_CONNECT",
        default_value = "127.0.0.1:7400",
        value_delimiter = ','
    )]
    pub connect: Vec<String>,
    /// Directory with ca.pem, client.pem, client.key.
    #[arg(long, env = "TIDEPOOL_CERT_DIR")]
    pub cert_dir: PathBuf,
    /// Print one JSON document (stable shape, see the README) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Connects with the CLI's timeouts.
pub async fn connect(c: &Conn) -> Result<ClusterClient> {
    let tls = TlsMaterial::load_client(&c.cert_dir)
        .with_context(|| format!("loading client certificate from {}", c.cert_dir.display()))?;
    let opts = ClientOptions {
        request_timeout: Duration::from_secs(5),
        retry_for: Duration::from_secs(10),
        ..Default::default()
    };
    let seeds = resolve(&c.connect).await?;
    Ok(ClusterClient::connect(&seeds, &tls, opts).await?)
}

/// Resolves `HOST:PORT` entries (names or IP literals) to socket addresses; an entry that does
/// not resolve is an error naming it.
pub async fn resolve(entries: &[String]) -> Result<Vec<SocketAddr>> {
    let mut out = Vec::new();
    for e in entries {
        let e = e.trim();
        if e.is_empty() {
            continue;
        }
        let found = tokio::net::lookup_host(e)
            .await
            .with_context(|| format!("--connect {e}: expected HOST:PORT that resolves"))?;
        out.extend(found);
    }
    if out.is_empty() {
        anyhow::bail!("--connect names no address");
    }
    Ok(out)
}
