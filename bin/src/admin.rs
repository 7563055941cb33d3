//! Admin HTTP: `/metrics` (Prometheus text), `/livez` (the process is up), `/readyz` (joined the
//! cluster and serving its shards; 503 while starting and from the moment a stop begins).
//!
//! It is bound before the node starts, so liveness and metrics answer while the node discovers
//! its voters and joins (which can take a while on a fresh Kubernetes rollout).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tidepool_actors::node::Readiness;

/// Set once the node has started; `/readyz` is 503 until then.
pub type ReadinessSlot = Arc<OnceLock<Readiness>>;

#[derive(Clone)]
struct AdminState {
    metrics: PrometheusHandle,
    ready: ReadinessSlot,
}

/// Binds the admin listener (so a taken port fails startup) and returns the server future.
pub async fn bind(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    ready: ReadinessSlot,
) -> Result<impl std::future::Future<Output = ()>> {
    let app = axum::Router::new()
        .route("/metrics", get(render))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState { metrics, ready });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind admin HTTP on {addr}"))?;
    Ok(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin HTTP server failed");
        }
    })
}

async fn render(State(s): State<AdminState>) -> String {
    s.metrics.render()
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    let ready = s.ready.get().is_some_and(Readiness::is_ready);
    metrics::gauge!(tidepool_runtime::metrics::NODE_READY).set(if ready { 1.0 } else { 0.0 });
    if ready {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
