//! The operations address (default port 9090, as in the seed guide):
//! `/metrics` and `/health`, separate from the API so that scraping and
//! probes never queue behind client traffic.
//!
//! `/metrics` is the Prometheus text exposition of a [`Metrics`] registry.
//! `/health` is JSON: with a pipeline attached, its [`Health`] report and
//! the inference backends' state (status 200 while it admits requests,
//! `degraded` included; 503 while draining); without one,
//! `{"status":"ok"}`.
//!
//! Owns composing the health report from the pipeline's and the router's;
//! it must not change anything.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;
use warp::Filter;
use warp::http::{StatusCode, header};
use warp::reply::Response;

use crate::http::error::json_response;
use crate::http::server::{self, BindError, ServerHandle};
use crate::inference::BackendHealth;
use crate::metrics::{BreakerState, Metrics, global};
use crate::pipeline::{Health, HealthStatus, Pipeline};

/// The body of `/health`.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    /// The pipeline's report; its status is `degraded` also while a
    /// backend's breaker is not closed.
    #[serde(flatten)]
    pub pipeline: Health,
    /// The inference backends.
    pub backends: Vec<BackendHealth>,
    /// Each model clients may ask for: its backend and pipeline.
    pub models: Vec<ModelHealth>,
}

/// `/health`'s view of one model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelHealth {
    /// The model name clients send.
    pub model: String,
    /// The backend serving it.
    pub backend: String,
    /// The pipeline its requests run through.
    pub pipeline: String,
}

impl HealthReport {
    /// The report of `pipeline` and the backends of its configuration.
    pub fn new(pipeline: &Pipeline) -> HealthReport {
        let snapshot = pipeline.snapshot();
        let router = snapshot.router();
        let mut report = HealthReport {
            pipeline: pipeline.health(),
            backends: router.health(),
            models: router
                .models()
                .map(|(model, backend, pipeline)| ModelHealth {
                    model: model.to_string(),
                    backend: backend.to_string(),
                    pipeline: pipeline.to_string(),
                })
                .collect(),
        };
        if report.pipeline.status == HealthStatus::Ok
            && report
                .backends
                .iter()
                .any(|b| b.circuit != BreakerState::Closed)
        {
            report.pipeline.status = HealthStatus::Degraded;
        }
        report
    }
}

/// The routes of the operations address.
pub fn routes(
    metrics: Arc<Metrics>,
    pipeline: Option<Pipeline>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let metrics_route = warp::path!("metrics").and(warp::get()).map(move || {
        let mut response = Response::new(metrics.gather().into());
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    });
    let health_route = warp::path!("health").and(warp::get()).map(move || {
        match &pipeline {
            Some(pipeline) => {
                let report = HealthReport::new(pipeline);
                // Degraded still answers 200: the process is alive and
                // serves what it can; only draining takes it out of rotation.
                let status = if report.pipeline.status == HealthStatus::Draining {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                json_response(status, &report)
            }
            None => json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        }
    });
    metrics_route
        .or(health_route)
        .unify()
        .or(warp::any().map(|| {
            let mut response = Response::new("not found: try /metrics or /health\n".into());
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }))
        .unify()
}

/// Open connections the metrics listener (and an admin listener of its
/// own) accepts at once: scrapers and probes need a handful; the limit
/// keeps a flood on this port from taking the process's file descriptors.
pub const MAX_CONNECTIONS: usize = 256;

/// Time a client of the metrics listener has to send a request's headers.
/// Probes and scrapers send theirs at once; a client that trickles them
/// holds a connection slot for at most this long, so holding all
/// [`MAX_CONNECTIONS`] takes opening that many connections every second.
pub const HEADER_READ: std::time::Duration = std::time::Duration::from_secs(1);

/// The metrics listener's limits (see [`server`]).
pub fn limits() -> server::Limits {
    server::Limits {
        max_connections: MAX_CONNECTIONS,
        header_read: HEADER_READ,
        max_header_bytes: server::MIN_HEADER_BYTES,
        request: std::time::Duration::from_secs(30),
    }
}

/// Serve the process-wide registry ([`global`]) on `addr` — the seed
/// guide's `metrics_server::start_server`. Must be called within a tokio
/// runtime.
pub async fn start_server(addr: SocketAddr) -> Result<ServerHandle, BindError> {
    let listener = server::bind(addr).await?;
    server::spawn(
        listener,
        routes(global().clone(), None),
        limits(),
        global().connections("ops"),
    )
}
