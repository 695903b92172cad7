//! Serving an HTTPS JSON API: the configuration server's and the relay controller's.
//! One place for what both need to hold up against slow or greedy clients: the TLS
//! handshake within [`Limits::handshake_timeout`], connections admitted by a
//! [`ConnectionGate`] (bounded; when full, a new connection takes the slot of the one
//! waiting longest without a request in progress, so a slowloris cannot keep operators
//! out), each served for at most [`Limits::connection_timeout`], request heads within
//! 10 s. Each request is handed to
//! the caller's handler with who is calling, as the TLS session says ([`Caller`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fbr_daemon::gate::{Admission, ConnectionGate};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// How much a server gives its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connection_timeout: Duration,
    pub handshake_timeout: Duration,
}

/// Longest a request body may take to arrive once its head is in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body is over {0} bytes")]
    TooLarge(usize),
    #[error("the body did not arrive within {} s", BODY_TIMEOUT.as_secs())]
    TooSlow,
    #[error("reading the body: {0}")]
    Broken(String),
}

/// Reads a request's body: at most `limit` bytes, within [`BODY_TIMEOUT`] (a client
/// trickling its body holds its connection no longer than one trickling its head).
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Vec<u8>, BodyError> {
    use http_body_util::BodyExt;
    let collect = http_body_util::Limited::new(req.into_body(), limit).collect();
    match tokio::time::timeout(BODY_TIMEOUT, collect).await {
        Err(_) => Err(BodyError::TooSlow),
        Ok(Ok(c)) => Ok(c.to_bytes().to_vec()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(BodyError::TooLarge(limit))
        }
        Ok(Err(e)) => Err(BodyError::Broken(e.to_string())),
    }
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

/// Serves `listener` with `tls` until the task is dropped, admitting connections
/// through `gate`; `handler` answers each request with a status and a JSON body.
pub async fn serve<H, Fut>(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    limits: Limits,
    gate: ConnectionGate,
    handler: H,
) where
    H: Fn(Request<Incoming>, Arc<Caller>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (StatusCode, Vec<u8>)> + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(admission) = gate.admit() else {
            drop(tcp);
            continue;
        };
        let admission = Arc::new(admission);
        let (acceptor, handler) = (acceptor.clone(), handler.clone());
        tokio::spawn(async move {
            let served = connection(acceptor, handler, tcp, remote, limits, admission.clone());
            tokio::select! {
                within = tokio::time::timeout(limits.connection_timeout, served) => {
                    if within.is_err() {
                        admission.timed_out();
                    }
                }
                () = admission.evicted() => {
                    tracing::debug!(%remote, "connection evicted: waited longest without a request");
                }
            }
        });
    }
}

async fn connection<H, Fut>(
    acceptor: tokio_rustls::TlsAcceptor,
    handler: H,
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    limits: Limits,
    admission: Arc<Admission>,
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
        Err(_) => {
            admission.timed_out();
            return;
        }
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
    let in_service = admission.clone();
    let service = hyper::service::service_fn(move |req| {
        let (handler, caller, admission) = (handler.clone(), caller.clone(), in_service.clone());
        async move {
            admission.request_started();
            let (status, body) = handler(req, caller).await;
            admission.request_finished();
            let response = Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
            Ok::<_, Infallible>(response)
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(tls), service)
        .await;
    if matches!(&served, Err(e) if e.is_timeout()) {
        admission.timed_out();
    }
}
