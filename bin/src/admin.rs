//! Admin HTTP: `/metrics` (Prometheus text), `/livez` (the process is up), `/readyz` (joined the
//! cluster and serving its shards; 503 while starting and from the moment a stop begins).
//!
//! It is bound before the node starts, so liveness and metrics answer while the node discovers
//! its voters and joins (which can take a while on a fresh Kubernetes rollout).
//!
//! Limits (`[admin]`): anyone who can reach the port can open connections, and each one is a file
//! descriptor the node's op-log appends and QUIC sockets also need. So at most
//! `max_connections` are open at once (more are closed as soon as they are accepted), a
//! connection that does not send a request's headers within `header_read_timeout_ms` (after
//! connecting or after its previous answer) is closed, a request is answered within
//! `request_timeout_ms` (503 after that), and no connection lives longer than the two timeouts
//! together (a client that does not read its answer cannot hold one either).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tidepool_actors::forming::PhaseTx;
use tidepool_actors::node::Readiness;
use tidepool_runtime::config::AdminSection;
use tidepool_runtime::metrics as m;
use tokio::sync::Semaphore;
use tower_http::timeout::TimeoutLayer;

/// Set once the node has started; `/readyz` is 503 until then.
pub type ReadinessSlot = Arc<OnceLock<Readiness>>;

/// Pause after a failed accept (out of file descriptors): retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Clone)]
struct AdminState {
    metrics: PrometheusHandle,
    ready: ReadinessSlot,
    phase: PhaseTx,
    /// `process_*` metrics (CPU, memory, file descriptors, start time), read on each scrape.
    process: metrics_process::Collector,
}

/// Binds the admin listener (so a taken port fails startup) and returns the server future.
pub async fn bind(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    ready: ReadinessSlot,
    phase: PhaseTx,
    limits: &AdminSection,
) -> Result<impl std::future::Future<Output = ()>> {
    let request_timeout = Duration::from_millis(limits.request_timeout_ms);
    let header_timeout = Duration::from_millis(limits.header_read_timeout_ms);
    let app = axum::Router::new()
        .route("/metrics", get(render))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
        .with_state(AdminState {
            metrics,
            ready,
            phase,
            process: {
                let c = metrics_process::Collector::default();
                c.describe();
                c.collect();
                c
            },
        });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind admin HTTP on {addr}"))?;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let lifetime = header_timeout + request_timeout;
    Ok(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    metrics::counter!(m::ADMIN_HTTP_CLOSED, "reason" => "accept_error")
                        .increment(1);
                    tracing::warn!(error = %e, "admin HTTP accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                // Closed at once: the descriptor is back before the next accept.
                metrics::counter!(m::ADMIN_HTTP_CLOSED, "reason" => "limit").increment(1);
                drop(stream);
                continue;
            };
            let conn =
                http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
            tokio::spawn(async move {
                let _permit = permit;
                let timed_out = match tokio::time::timeout(lifetime, conn).await {
                    Ok(Ok(())) => false,
                    Ok(Err(e)) => e.is_timeout(),
                    Err(_) => true,
                };
                if timed_out {
                    metrics::counter!(m::ADMIN_HTTP_CLOSED, "reason" => "timeout").increment(1);
                }
            });
        }
    })
}

/// Readiness now (or why not), also exported as `tidepool_node_ready` (so the gauge is current
/// whenever it is scraped, whether or not anyone probes `/readyz`).
fn ready_now(s: &AdminState) -> Result<(), String> {
    let ready = match s.ready.get() {
        Some(r) => r.check().map_err(|e| e.to_string()),
        None => Err(s.phase.borrow().describe()),
    };
    metrics::gauge!(tidepool_runtime::metrics::NODE_READY).set(if ready.is_ok() {
        1.0
    } else {
        0.0
    });
    ready
}

async fn render(State(s): State<AdminState>) -> String {
    let _ = ready_now(&s);
    s.process.collect();
    s.metrics.render()
}

/// `200 ready`, or `503 not ready: <why>` (while forming: the voters it waits for).
async fn readyz(State(s): State<AdminState>) -> (StatusCode, String) {
    match ready_now(&s) {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
