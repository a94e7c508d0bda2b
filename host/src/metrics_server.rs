//! `/metrics` and `/health` on their own address (default port 9090, as in
//! the seed guide), separate from the API so that scraping and probes never
//! queue behind client traffic.
//!
//! `/metrics` is the Prometheus text exposition of a [`Metrics`] registry.
//! `/health` is JSON: with a pipeline attached, its [`Health`] report, with
//! the backends' state when they are given (status 200 while it admits
//! requests, `degraded` included; 503 while draining); without one,
//! `{"status":"ok"}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use warp::Filter;
use warp::http::{StatusCode, header};
use warp::reply::Response;

use crate::inference::Backends;
use crate::metrics::{Metrics, global};
use crate::pipeline::{Health, Pipeline};
use crate::server::{self, BindError, ServerHandle};

/// The routes of the metrics address.
pub fn routes(
    metrics: Arc<Metrics>,
    pipeline: Option<Pipeline>,
    backends: Option<Backends>,
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
        let health = pipeline.as_ref().map(|pipeline| {
            let mut health = pipeline.health();
            if let Some(backends) = &backends {
                health.backends = backends.health();
                if health.status == "ok" && health.backends.iter().any(|b| b.circuit != "closed") {
                    health.status = "degraded";
                }
            }
            health
        });
        health_response(health)
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

fn health_response(health: Option<Health>) -> Response {
    let (status, body) = match health {
        Some(health) => {
            // Degraded still answers 200: the process is alive and serves
            // what it can; only draining takes it out of rotation.
            let status = if health.status == "draining" {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            (status, serde_json::to_string(&health).unwrap_or_default())
        }
        None => (StatusCode::OK, r#"{"status":"ok"}"#.to_string()),
    };
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Serve the process-wide registry ([`global`]) on `addr` — the seed
/// guide's `metrics_server::start_server`. Must be called within a tokio
/// runtime.
pub async fn start_server(addr: SocketAddr) -> Result<ServerHandle, BindError> {
    let listener = server::bind(addr).await?;
    server::spawn(listener, routes(global().clone(), None, None))
}
