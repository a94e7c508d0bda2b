//! Serving a warp filter on a bound address: connection limits, read
//! timeouts, and graceful shutdown.
//!
//! Both HTTP surfaces (the API and the metrics/health endpoint) are served
//! the same way: [`bind`] first, so that a port of 0 resolves to a real port
//! the caller can print, then [`spawn`]. [`ServerHandle::shutdown`] stops
//! accepting connections and waits for the requests in progress to finish.
//!
//! The accept loop is ours rather than `warp::serve`'s, because a public
//! listener must not let one client exhaust the process:
//!
//! - **A connection limit** per listener ([`Limits::max_connections`]): a
//!   connection beyond it is closed at once and counted
//!   (`orchestrator_http_connections_refused_total{listener}`; open ones are
//!   `orchestrator_http_connections{listener}`). The API's limit is kept
//!   below the process's file-descriptor limit, so that however many
//!   connections it is offered, descriptors remain for the metrics
//!   listener, plugins and backends: `/health` keeps answering while the
//!   API is saturated.
//! - **A header-read timeout** ([`Limits::header_read`]): a client must send
//!   a request's headers within it, on a new connection and between the
//!   requests of a kept-alive one, or the connection is closed. A
//!   slowloris client trickling a byte every few seconds is gone after it.
//! - **A header size limit** ([`Limits::max_header_bytes`]): a request
//!   whose line and headers do not fit is answered 431 and the connection
//!   closed, before any header is parsed into a value.
//! - **A request timeout** ([`Limits::request`]): the handler, body read
//!   included, must produce the response's head within it (a
//!   `Content-Length` larger than the body sent does not wait forever);
//!   the client gets 408. A streamed body is not bounded by it: its events
//!   are bounded by the request's own deadline and by `stream_stall_ms`.
//! - **Accept errors** (`EMFILE` when descriptors run out) are logged at
//!   most once a second and retried after a short pause, instead of
//!   spinning.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use warp::Filter;
use warp::reply::Response;

use crate::metrics::ConnectionMetrics;

/// A listening socket could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}")]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// The socket error.
    pub source: std::io::Error,
}

/// The smallest header limit hyper accepts.
pub const MIN_HEADER_BYTES: usize = 8192;

/// What one listener allows each client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at once; more are closed at once.
    pub max_connections: usize,
    /// Time to send a request's headers.
    pub header_read: Duration,
    /// Largest request line and headers, in bytes (at least 8,192).
    pub max_header_bytes: usize,
    /// Time for the handler, body read included, to produce a response's
    /// head.
    pub request: Duration,
}

impl Limits {
    /// `max_connections`, lowered if needed to leave `reserve` of the
    /// process's file descriptors (`RLIMIT_NOFILE`) for everything else.
    pub fn within_fd_limit(mut self, reserve: usize) -> Limits {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct it is given and nothing else.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            let fds = usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX);
            self.max_connections = self.max_connections.min(fds.saturating_sub(reserve).max(1));
        }
        self
    }
}

/// The client address of a request, for filters that want it
/// (`warp::ext::optional::<ClientAddr>()`).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// Bind `addr` (port 0 picks a free port).
///
/// The listening socket has `TCP_NODELAY` set, which Linux passes on to
/// the connections it accepts. Without it, a streamed answer — many small
/// writes — waits on Nagle's algorithm and the client's delayed ACK: about
/// 40 ms per response on loopback.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    let fail = |source| BindError { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(fail)?;
    socket.set_reuseaddr(true).map_err(fail)?;
    socket.set_nodelay(true).map_err(fail)?;
    socket.bind(addr).map_err(fail)?;
    socket.listen(1024).map_err(fail)
}

/// The pause after a failed `accept` (descriptors exhausted, say).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Serve `routes` on `listener` within `limits` until
/// [`ServerHandle::shutdown`].
pub fn spawn<F>(
    listener: TcpListener,
    routes: F,
    limits: Limits,
    metrics: ConnectionMetrics,
) -> Result<ServerHandle, BindError>
where
    F: Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
{
    let addr = listener.local_addr().map_err(|source| BindError {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let service = warp::service(routes);
        let graceful = GracefulShutdown::new();
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let mut last_error_logged: Option<Instant> = None;
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut stopped => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        if last_error_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                            tracing::warn!(%addr, %error, "cannot accept a connection; retrying");
                            last_error_logged = Some(Instant::now());
                        }
                        tokio::time::sleep(ACCEPT_RETRY).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                metrics.refused.inc();
                drop(stream);
                continue;
            };
            metrics.open.inc();
            // One adapter per connection; each call clones the filter once
            // (inside the adapter), as warp's own loop does.
            let service = TowerToHyperService::new(service.clone());
            let handler = hyper::service::service_fn(move |mut request| {
                request.extensions_mut().insert(ClientAddr(peer));
                let response = hyper::service::Service::call(&service, request);
                async move {
                    match tokio::time::timeout(limits.request, response).await {
                        Ok(response) => response,
                        Err(_) => Ok::<_, Infallible>(request_timeout()),
                    }
                }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read)
                .max_buf_size(limits.max_header_bytes.max(MIN_HEADER_BYTES))
                .serve_connection(TokioIo::new(stream), handler);
            let connection = graceful.watch(connection);
            let open = metrics.open.clone();
            tokio::spawn(async move {
                // A connection error is the client's (reset, timeout).
                let _ = connection.await;
                drop(slot);
                open.dec();
            });
        }
        drop(listener);
        graceful.shutdown().await;
    });
    Ok(ServerHandle {
        addr,
        stop: Some(stop),
        task,
    })
}

/// 408 for a request whose handler did not answer within
/// [`Limits::request`] (typically: its body never arrived).
fn request_timeout() -> Response {
    let mut response = crate::http::error::json_response(
        warp::http::StatusCode::REQUEST_TIMEOUT,
        &serde_json::json!({"error": {
            "message": "the request was not received in time",
            "type": "invalid_request_error",
            "code": "request_timeout",
        }}),
    );
    response.headers_mut().insert(
        warp::http::header::CONNECTION,
        warp::http::HeaderValue::from_static("close"),
    );
    response
}

impl ServerHandle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting connections and wait for requests in progress.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}
