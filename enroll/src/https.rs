//! Serving an HTTPS JSON API: the configuration server's and the relay controller's.
//! One place for what both need to hold up against slow or greedy clients: the TLS
//! handshake within [`Limits::handshake_timeout`], at most [`Limits::max_connections`]
//! connections at once (more are closed at once), each served for at most
//! [`Limits::connection_timeout`], request heads within 10 s. Each request is handed to
//! the caller's handler with who is calling, as the TLS session says ([`Caller`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How much a server gives its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub connection_timeout: Duration,
    pub handshake_timeout: Duration,
}

/// Who sent a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub remote: SocketAddr,
    /// Its certificate, checked against the site CA by TLS, if it sent one.
    pub peer: Option<fbr_transport::PeerIdentity>,
    /// The TLS session's exporter value under [`crate::proof::EXPORTER_LABEL`] (what
    /// enrollment proofs are bound to).
    pub exporter: [u8; 32],
}

/// Serves `listener` with `tls` until the task is dropped; `handler` answers each
/// request with a status and a JSON body.
pub async fn serve<H, Fut>(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    limits: Limits,
    handler: H,
) where
    H: Fn(Request<Incoming>, Arc<Caller>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (StatusCode, Vec<u8>)> + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(tcp);
            continue;
        };
        let (acceptor, handler) = (acceptor.clone(), handler.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(
                limits.connection_timeout,
                connection(acceptor, handler, tcp, remote, limits),
            )
            .await;
        });
    }
}

async fn connection<H, Fut>(
    acceptor: tokio_rustls::TlsAcceptor,
    handler: H,
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    limits: Limits,
) where
    H: Fn(Request<Incoming>, Arc<Caller>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (StatusCode, Vec<u8>)> + Send + 'static,
{
    let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::debug!(%remote, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => return,
    };
    let mut exporter = [0u8; 32];
    if let Err(e) =
        tls.get_ref()
            .1
            .export_keying_material(&mut exporter, crate::proof::EXPORTER_LABEL, None)
    {
        tracing::warn!(%remote, "TLS exporter: {e}");
        return;
    }
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| fbr_transport::identity::identity_from_der(c).ok());
    let caller = Arc::new(Caller {
        remote,
        peer,
        exporter,
    });
    let service = hyper::service::service_fn(move |req| {
        let (handler, caller) = (handler.clone(), caller.clone());
        async move {
            let (status, body) = handler(req, caller).await;
            let response = Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
            Ok::<_, Infallible>(response)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(tls), service)
        .await;
}
