//! The admin HTTP endpoint: Prometheus metrics, liveness, readiness, and the live port
//! map that `kpscctl maps` prints.

use std::sync::Arc;

use anyhow::Context as _;
use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    config::common::{HttpConfig, MapsEndpoint},
    mapping::map::Origin,
};

/// Path of the JSON port map.
pub const MAPS_PATH: &str = "/maps";
/// Path of the readiness probe.
pub const READY_PATH: &str = "/ready";

/// One row of the port map as the admin endpoint reports it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapRow {
    /// `ip:port` kpsc listens on; None for external mappings.
    pub listen: Option<String>,
    pub node_id: Option<i32>,
    /// The real broker address (never shown to Kafka clients).
    pub broker: String,
    /// What clients are told instead.
    pub advertised: String,
    pub origin: Origin,
    pub bound: bool,
    pub connections_open: i64,
    pub connections_total: u64,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    /// `kpscd proxy --bulk-transfer sockmap`: what the kernel carried from clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_from_client: Option<KernelRow>,
    /// The same for responses, broker -> client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_to_client: Option<KernelRow>,
}

/// One port's traffic in one direction on the kernel path.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KernelRow {
    pub redirected_bytes: u64,
    pub redirected_frames: u64,
    /// Frames kpscd handled itself.
    pub passed_frames: u64,
}

impl From<&crate::metrics::KernelCounters> for KernelRow {
    fn from(k: &crate::metrics::KernelCounters) -> Self {
        Self {
            redirected_bytes: k.redirected_bytes.get(),
            redirected_frames: k.redirected_frames.get(),
            passed_frames: k.passed_frames.get(),
        }
    }
}

/// What a mode exposes to the admin endpoint.
pub trait AdminView: Send + Sync + 'static {
    /// Ok when ready to serve; otherwise why not.
    fn readiness(&self) -> Result<(), String>;
    fn map_rows(&self) -> Vec<MapRow>;
    fn metrics_text(&self) -> String;
}

/// Binds the admin endpoint, and `/maps`'s own listener when it has one (so a busy port
/// is a start-up error), and serves them until `shutdown`.
pub async fn serve(
    http: &HttpConfig,
    view: Arc<dyn AdminView>,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let mut servers = Vec::new();
    if let Some(addr) = &http.listen {
        let mut router = Router::new()
            .route(&http.metrics_path, get(metrics))
            .route(&http.health_path, get(|| async { "OK\n" }))
            .route(READY_PATH, get(ready));
        if http.maps == MapsEndpoint::Admin {
            router = router.route(MAPS_PATH, get(maps));
        }
        let listener = bind(addr, "--http-listen-address").await?;
        info!(address = %listener.local_addr()?, maps = http.maps == MapsEndpoint::Admin, "admin endpoint listening");
        servers.push((listener, router.with_state(Arc::clone(&view))));
    }
    if let MapsEndpoint::Separate(addr) = &http.maps {
        let listener = bind(addr, "--http-maps-listen-address").await?;
        info!(address = %listener.local_addr()?, "port map endpoint (/maps) listening");
        let router = Router::new().route(MAPS_PATH, get(maps)).with_state(view);
        servers.push((listener, router));
    }
    if servers.is_empty() {
        return Ok(None);
    }
    Ok(Some(tokio::spawn(async move {
        let mut served = tokio::task::JoinSet::new();
        for (listener, router) in servers {
            let shutdown = shutdown.clone();
            served.spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move { shutdown.cancelled().await })
                    .await
            });
        }
        while let Some(result) = served.join_next().await {
            if let Ok(Err(e)) = result {
                tracing::error!(error = %e, "admin endpoint failed");
            }
        }
    })))
}

async fn bind(addr: &str, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {flag} {addr}"))
}

/// Views may read kernel maps entry by entry: they run off the async threads, two at a
/// time at most, so a flood of scrapes (the endpoint has no authentication) queues here
/// instead of occupying the blocking pool that reloads and flow cleanup also use.
async fn off_runtime<T: Send + 'static>(
    view: Arc<dyn AdminView>,
    read: fn(&dyn AdminView) -> T,
) -> Result<T, StatusCode> {
    static VIEWS_AT_ONCE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    let _turn = VIEWS_AT_ONCE
        .acquire()
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    tokio::task::spawn_blocking(move || read(view.as_ref()))
        .await
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)
}

async fn metrics(State(view): State<Arc<dyn AdminView>>) -> impl IntoResponse {
    let text = off_runtime(view, |v| v.metrics_text()).await?;
    Ok::<_, StatusCode>((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    ))
}

async fn ready(State(view): State<Arc<dyn AdminView>>) -> impl IntoResponse {
    let readiness = match off_runtime(view, |v| v.readiness()).await {
        Ok(r) => r,
        Err(status) => return (status, "not ready: admin view failed\n".to_owned()),
    };
    match readiness {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn maps(State(view): State<Arc<dyn AdminView>>) -> Result<Json<Vec<MapRow>>, StatusCode> {
    off_runtime(view, |v| v.map_rows()).await.map(Json)
}
