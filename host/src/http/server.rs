//! Running a warp filter on a bound address, with graceful shutdown.
//!
//! Both HTTP surfaces (the API and the metrics/health endpoint) are served
//! the same way: [`bind`] first, so that a port of 0 resolves to a real port
//! the caller can print, then [`spawn`]. [`ServerHandle::shutdown`] stops
//! accepting connections and waits for the requests in progress to finish.

use std::convert::Infallible;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use warp::Filter;
use warp::reply::Response;

/// A listening socket could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}")]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// The socket error.
    pub source: std::io::Error,
}

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
/// the connections it accepts (warp offers no hook to set it per
/// connection). Without it, a streamed answer — many small writes — waits
/// on Nagle's algorithm and the client's delayed ACK: about 40 ms per
/// response on loopback.
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

/// Serve `routes` on `listener` until [`ServerHandle::shutdown`].
pub fn spawn<F>(listener: TcpListener, routes: F) -> Result<ServerHandle, BindError>
where
    F: Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
{
    let addr = listener.local_addr().map_err(|source| BindError {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = warp::serve(routes).incoming(listener).graceful(async move {
        let _ = stopped.await;
    });
    let task = tokio::spawn(server.run());
    Ok(ServerHandle {
        addr,
        stop: Some(stop),
        task,
    })
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
