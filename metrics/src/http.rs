//! The metrics and health HTTP endpoint (HTTP/1.1, plain text, read-only).
//!
//! | path       | 200 when                         | 503 when                 | body            |
//! |------------|----------------------------------|--------------------------|-----------------|
//! | `/metrics` | always (unless encoding failed)  | never (500 on failure)   | text format 0.0.4 |
//! | `/healthz` | the process serves requests      | the daemon says it is wedged | one line    |
//! | `/readyz`  | the daemon can do its job        | it cannot (reasons)      | state and reasons |
//!
//! Anything else is 404; methods other than GET and HEAD are 405. At most
//! [`MAX_CONNECTIONS`] connections are open at once, admitted by a
//! [`ConnectionGate`]: when full, a new connection takes the slot of the one waiting
//! longest without a request in progress (a slowloris), so a scrape always gets in. Each
//! connection lives at most [`CONNECTION_TIMEOUT`], its request head within
//! [`HEADER_TIMEOUT`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use fbr_daemon::gate::ConnectionGate;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest a connection may stay open (scrapes take milliseconds).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a request head may take to arrive.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The answer of a probe: whether it passed, and a short human-readable body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub ok: bool,
    pub body: String,
}

/// What a daemon exposes over HTTP.
pub trait Endpoints: Send + Sync + 'static {
    /// Every metric in the text exposition format, refreshed for this scrape.
    fn metrics_text(&self) -> Result<String, String>;
    /// Liveness: `ok` unless the daemon knows it is wedged and should be restarted.
    fn liveness(&self) -> Probe;
    /// Readiness: `ok` when the daemon can do its job now.
    fn readiness(&self) -> Probe;
}

/// Binds `addr`, writes the bound address to `port_file` (for scripts and tests), and
/// serves `endpoints` there in a task, admitting connections through `gate` (whose
/// counters the daemon exports); errors say what failed.
pub async fn start(
    addr: std::net::SocketAddr,
    port_file: Option<&std::path::Path>,
    endpoints: Arc<dyn Endpoints>,
    gate: ConnectionGate,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("binding the metrics endpoint to {addr}: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("metrics endpoint: {e}"))?;
    if let Some(pf) = port_file {
        fbr_daemon::write_port_file(pf, bound)
            .map_err(|e| format!("writing {}: {e}", pf.display()))?;
    }
    tracing::info!(%bound, "metrics endpoint listening (/metrics, /healthz, /readyz)");
    Ok(tokio::spawn(serve(listener, endpoints, gate)))
}

/// A gate of [`MAX_CONNECTIONS`] slots, for [`start`].
pub fn gate() -> ConnectionGate {
    ConnectionGate::new(MAX_CONNECTIONS)
}

/// Serves `endpoints` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, endpoints: Arc<dyn Endpoints>, gate: ConnectionGate) {
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(admission) = gate.admit() else {
            tracing::debug!(%remote, "metrics endpoint: every connection is busy, closing a new one");
            continue;
        };
        let admission = Arc::new(admission);
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let in_service = admission.clone();
            let service = hyper::service::service_fn(move |req| {
                let (endpoints, admission) = (endpoints.clone(), in_service.clone());
                async move {
                    admission.request_started();
                    let response = respond(&*endpoints, &req);
                    admission.request_finished();
                    Ok::<_, Infallible>(response)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                served = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => match served {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) if e.is_timeout() => admission.timed_out(),
                    Ok(Err(e)) => tracing::debug!(%remote, "metrics connection: {e}"),
                    Err(_) => admission.timed_out(),
                },
                () = admission.evicted() => {
                    tracing::debug!(%remote, "metrics connection evicted: waited longest without a request");
                }
            }
        });
    }
}

fn respond<B>(endpoints: &dyn Endpoints, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
    }
    match req.uri().path() {
        "/metrics" => match endpoints.metrics_text() {
            Ok(body) => {
                let mut r = text(StatusCode::OK, body);
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(
                        "text/plain; version=0.0.4; charset=utf-8",
                    ),
                );
                r
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        "/healthz" => probe(endpoints.liveness()),
        "/readyz" => probe(endpoints.readiness()),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

fn probe(p: Probe) -> Response<Full<Bytes>> {
    let status = if p.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(status, p.body)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Fixed;
    impl Endpoints for Fixed {
        fn metrics_text(&self) -> Result<String, String> {
            Ok("# TYPE x_total counter\nx_total 1\n".into())
        }
        fn liveness(&self) -> Probe {
            Probe {
                ok: true,
                body: "alive\n".into(),
            }
        }
        fn readiness(&self) -> Probe {
            Probe {
                ok: false,
                body: "critical: cache full\n".into(),
            }
        }
    }

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_each_path_with_its_status() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(Fixed), gate()));
        let req =
            |p: &str, m: &str| format!("{m} {p} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let metrics = get(addr, &req("/metrics", "GET")).await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.contains("text/plain; version=0.0.4"), "{metrics}");
        assert!(metrics.ends_with("x_total 1\n"), "{metrics}");
        assert!(get(addr, &req("/healthz", "GET"))
            .await
            .starts_with("HTTP/1.1 200"));
        let ready = get(addr, &req("/readyz", "GET")).await;
        assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
        assert!(ready.contains("cache full"), "{ready}");
        assert!(get(addr, &req("/nope", "GET"))
            .await
            .starts_with("HTTP/1.1 404"));
        assert!(get(addr, &req("/metrics", "POST"))
            .await
            .starts_with("HTTP/1.1 405"));
        // Garbage gets an error status, and the server keeps serving.
        let garbage = get(addr, "\x00\x01 not http\r\n\r\n").await;
        assert!(
            garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
            "{garbage}"
        );
        assert!(get(addr, &req("/healthz", "GET"))
            .await
            .starts_with("HTTP/1.1 200"));
        server.abort();
    }

    /// Every slot held by a client that sends its request head a byte at a time: a
    /// scrape still gets in (it takes the longest waiter's slot), and the gate counts it.
    #[tokio::test]
    async fn a_slowloris_holding_every_slot_does_not_keep_a_scrape_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = gate();
        let stats = gate.stats();
        let server = tokio::spawn(serve(listener, Arc::new(Fixed), gate.clone()));
        let mut slow = Vec::new();
        for _ in 0..MAX_CONNECTIONS * 2 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /metr").await.unwrap();
            slow.push(s);
        }
        // The server has taken them all in (evicting the oldest as it went).
        for _ in 0..100 {
            if stats.admitted.load(std::sync::atomic::Ordering::Relaxed)
                >= 2 * MAX_CONNECTIONS as u64
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let scrape = tokio::time::timeout(
            Duration::from_secs(5),
            get(
                addr,
                "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            ),
        )
        .await
        .expect("the scrape is answered at once");
        assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
        assert!(gate.open() <= MAX_CONNECTIONS);
        let counts = stats.counts();
        assert!(counts[1].1 >= MAX_CONNECTIONS as u64, "{counts:?}");
        assert_eq!(counts[2], ("refused", 0));
        drop(slow);
        server.abort();
    }
}
