//! QUIC endpoints with mutual TLS 1.3, tuned for a high bandwidth-delay product.
//!
//! quinn's defaults give one stream a 1.25 MB receive window: at 100 ms round trip that
//! caps it near 12.5 MB/s. [`QuicTuning`] sizes the windows from the link we expect
//! (default: 1 Gbit/s at 80 ms per stream, ~10 MB, rounded up to 16 MiB) and raises the
//! UDP socket buffers so bursts are not dropped by the kernel. The kernel caps socket
//! buffers at `net.core.rmem_max` / `wmem_max`; `packaging/sysctl/60-failback-relay.conf`
//! raises those caps. What the kernel actually granted is logged at start.
//!
//! Memory: a connection buffers at most `connection_window` bytes received but not yet
//! read by the application, whatever the number of streams.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, MtuDiscoveryConfig, TransportConfig, VarInt};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocol id: refuses peers of other protocols during the handshake.
pub const ALPN: &[u8] = b"fbr/1";

/// Errors setting up TLS or QUIC.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{path}: {reason}")]
    Credentials { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("socket {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Streams a peer may open at once by default: a relay's thousand disks on one
/// connection to its master target, with room for their resyncs.
pub const DEFAULT_MAX_PEER_STREAMS: u32 = 4096;

/// Flow-control and socket sizes. See the module docs for the reasoning.
#[derive(Debug, Clone)]
pub struct QuicTuning {
    /// Receive window of one stream (one disk), bytes.
    pub stream_window: u64,
    /// Receive window of a whole connection, bytes; bounds memory per peer.
    pub connection_window: u64,
    /// Requested UDP send and receive socket buffer, bytes.
    pub socket_buffer: usize,
    /// Largest UDP payload MTU discovery may probe up to. 1452 suits Ethernet paths
    /// through a VPN; loopback and jumbo-frame links can go higher.
    pub max_udp_payload: u16,
    /// Streams the peer may have open at once on one connection. quinn keeps the
    /// state of every stream the peer may open from the start (about 75 bytes each), so
    /// a listener for many small peers keeps this near what one peer needs.
    pub max_peer_streams: u32,
    /// Close the connection after this long without hearing from the peer.
    pub idle_timeout: Duration,
    /// How the sender paces itself against the path (what it sends; the receiver's
    /// choice matters little).
    pub congestion: Congestion,
}

/// Congestion controllers quinn offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// Loss-based (RFC 9438): backs off on every loss, so random loss on a long path
    /// caps it far below the link rate.
    #[default]
    Cubic,
    /// Model-based (BBR): paces at the measured bottleneck rate and round trip, and does
    /// not take random loss for congestion.
    Bbr,
}

impl Congestion {
    /// `cubic` or `bbr`.
    pub fn parse(s: &str) -> Option<Congestion> {
        match s {
            "cubic" => Some(Congestion::Cubic),
            "bbr" => Some(Congestion::Bbr),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
        }
    }
}

impl Default for QuicTuning {
    fn default() -> Self {
        QuicTuning {
            stream_window: 16 << 20,
            connection_window: 128 << 20,
            socket_buffer: 16 << 20,
            max_udp_payload: 1452,
            max_peer_streams: DEFAULT_MAX_PEER_STREAMS,
            idle_timeout: Duration::from_secs(30),
            congestion: Congestion::default(),
        }
    }
}

impl QuicTuning {
    fn transport_config(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        t.stream_receive_window(VarInt::from_u64(self.stream_window).unwrap_or(VarInt::MAX));
        t.receive_window(VarInt::from_u64(self.connection_window).unwrap_or(VarInt::MAX));
        t.send_window(self.connection_window);
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_peer_streams));
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        t.keep_alive_interval(Some(self.idle_timeout / 4));
        t.max_idle_timeout(self.idle_timeout.try_into().ok());
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload.max(1200));
        t.mtu_discovery_config(Some(mtu));
        if self.congestion == Congestion::Bbr {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        t
    }
}

/// A certificate chain, its key, and the CA that peers must chain to.
#[derive(Debug)]
pub struct Credentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: RootCertStore,
}

impl Credentials {
    /// The TLS configuration of an HTTPS API served with these credentials: TLS 1.3
    /// only, HTTP/1.1, a client certificate of the site CA asked for but not required
    /// (the API decides per endpoint; a certificate sent is checked against the CA).
    pub fn https_server_config(&self) -> Result<rustls::ServerConfig, TransportError> {
        let tls = |e: &dyn std::fmt::Display| TransportError::Tls(e.to_string());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots.clone()),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| tls(&e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls(&e))?
            .with_client_cert_verifier(clients)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| tls(&e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Loads `<dir>/<name>.pem`, `<dir>/<name>.key` and `<dir>/ca.pem`.
    pub fn load(dir: &Path, name: &str) -> Result<Self, TransportError> {
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        let ca_path = dir.join("ca.pem");
        let cred_err = |p: &Path, reason: String| TransportError::Credentials {
            path: p.display().to_string(),
            reason,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
            .map_err(|e| cred_err(&cert_path, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| cred_err(&cert_path, e.to_string()))?;
        if chain.is_empty() {
            return Err(cred_err(&cert_path, "no certificate in file".into()));
        }
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| cred_err(&key_path, e.to_string()))?;
        let roots = load_roots(&ca_path)?;
        Ok(Credentials { chain, key, roots })
    }
}

/// The CA certificates of a PEM file (at least one), as trust roots.
pub fn load_roots(ca_path: &Path) -> Result<RootCertStore, TransportError> {
    let cred_err = |reason: String| TransportError::Credentials {
        path: ca_path.display().to_string(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(ca_path).map_err(|e| cred_err(e.to_string()))? {
        let ca = ca.map_err(|e| cred_err(e.to_string()))?;
        roots.add(ca).map_err(|e| cred_err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(cred_err("no CA certificate in file".into()));
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn udp_socket(
    addr: SocketAddr,
    tuning: &QuicTuning,
) -> Result<std::net::UdpSocket, TransportError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock_err = |source| TransportError::Socket { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(sock_err)?;
    if addr.is_ipv6() {
        // Listen on exactly what was asked for.
        let _ = socket.set_only_v6(true);
    }
    // Best effort: the kernel silently caps these at rmem_max / wmem_max.
    let _ = socket.set_recv_buffer_size(tuning.socket_buffer);
    let _ = socket.set_send_buffer_size(tuning.socket_buffer);
    socket.bind(&addr.into()).map_err(sock_err)?;
    let granted_recv = socket.recv_buffer_size().unwrap_or(0);
    let granted_send = socket.send_buffer_size().unwrap_or(0);
    if granted_recv < tuning.socket_buffer || granted_send < tuning.socket_buffer {
        tracing::info!(
            requested = tuning.socket_buffer,
            granted_recv,
            granted_send,
            "UDP socket buffers capped by the kernel; install packaging/sysctl/60-failback-relay.conf to raise net.core.rmem_max/wmem_max"
        );
    }
    Ok(socket.into())
}

/// Endpoint configuration that survives restarts: the key signing stateless-reset
/// tokens and the key of the connection-ID generator are derived from the server's
/// private key instead of chosen at random per process. After a crash, a peer's next
/// packet reaches the restarted server, which recognises the connection ID as its own
/// and answers with a stateless reset the peer can verify: the peer reconnects at once
/// instead of waiting out its idle timeout.
fn restart_stable_endpoint_config(key: &PrivateKeyDer<'_>) -> EndpointConfig {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"fbr endpoint keys v1");
    ctx.update(key.secret_der());
    let digest = ctx.finish();
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, digest.as_ref());
    let cid_key = u64::from_le_bytes(digest.as_ref()[..8].try_into().expect("32-byte digest"));
    let mut config = EndpointConfig::new(Arc::new(reset_key));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

/// A QUIC server endpoint that requires a client certificate from our CA.
pub fn server_endpoint(
    listen: SocketAddr,
    creds: Credentials,
    tuning: &QuicTuning,
) -> Result<Endpoint, TransportError> {
    let provider = provider();
    let endpoint_config = restart_stable_endpoint_config(&creds.key);
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(creds.roots), provider.clone())
            .build()
            .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain, creds.key)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(tuning.transport_config()));
    let socket = udp_socket(listen, tuning)?;
    Endpoint::new(
        endpoint_config,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Socket {
        addr: listen,
        source,
    })
}

/// A QUIC client endpoint presenting `creds` and trusting only our CA.
pub fn client_endpoint(
    bind: SocketAddr,
    creds: Credentials,
    tuning: &QuicTuning,
) -> Result<Endpoint, TransportError> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_root_certificates(creds.roots)
        .with_client_auth_cert(creds.chain, creds.key)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(tuning.transport_config()));
    let socket = udp_socket(bind, tuning)?;
    let mut endpoint = Endpoint::new(
        EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Socket { addr: bind, source })?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// The unspecified address of the same family as `peer`, port 0: where a client binds.
pub fn any_addr_for(peer: SocketAddr) -> SocketAddr {
    if peer.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    }
}

/// How long a stopping daemon waits for its peers to hear that it closed.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Closes `endpoint` and waits (at most [`CLOSE_GRACE`]) until its peers have been told:
/// without the wait the process may exit before the CONNECTION_CLOSE frames leave, and
/// each peer would find out only by its idle timeout (30 s), reporting the daemon as up
/// all that time and reconnecting late. A stopped daemon is seen as gone at once.
pub async fn close_gracefully(endpoint: &Endpoint, reason: &'static [u8]) {
    endpoint.close(VarInt::from_u32(0), reason);
    let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
}
