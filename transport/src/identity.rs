//! Who is on the other end of a connection, read from its (already verified) certificate.
//!
//! rustls has checked the chain against our CA before any of this runs; here we only read
//! the URI SANs described in [`crate::pki`] to learn the peer's role and entitlements.

use fbr_protocol::stream::Entitlement;
use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// URI SAN prefix naming a role.
pub const ROLE_URI_PREFIX: &str = "urn:fbr:role:";
/// URI SAN prefix naming a VM the holder may write.
pub const VM_URI_PREFIX: &str = "urn:fbr:vm:";

/// The part a certificate holder plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Agent,
    Relay,
    MasterTarget,
    /// The site's configuration server (its HTTPS API's certificate).
    ConfigServer,
    /// A person or script driving the failback controller's API (`relay ctl`).
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Relay => "relay",
            Role::MasterTarget => "master-target",
            Role::ConfigServer => "config-server",
            Role::Operator => "operator",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "agent" => Some(Role::Agent),
            "relay" => Some(Role::Relay),
            "master-target" => Some(Role::MasterTarget),
            "config-server" => Some(Role::ConfigServer),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

/// A verified peer: its roles and the VMs it may write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub common_name: String,
    pub roles: Vec<Role>,
    /// The VMs the peer may write (`urn:fbr:vm:<name>`, or `urn:fbr:vm:*` for any).
    pub entitlement: Entitlement,
}

impl PeerIdentity {
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Whether the peer's certificate entitles it to write disks of `vm`.
    pub fn may_write(&self, vm: &str) -> bool {
        self.entitlement.may_write(vm)
    }
}

/// Reads the identity out of a DER certificate.
pub fn identity_from_der(der: &[u8]) -> Result<PeerIdentity, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("unparseable certificate: {e}"))?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut id = PeerIdentity {
        common_name,
        roles: vec![],
        entitlement: Entitlement::default(),
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Some(role) = uri.strip_prefix(ROLE_URI_PREFIX) {
                    if let Some(r) = Role::parse(role) {
                        id.roles.push(r);
                    }
                } else if let Some(vm) = uri.strip_prefix(VM_URI_PREFIX) {
                    if vm == "*" {
                        id.entitlement.all_vms = true;
                    } else {
                        id.entitlement.vms.push(vm.to_owned());
                    }
                }
            }
        }
    }
    Ok(id)
}

/// The identity of the peer of an established QUIC connection (mutual TLS, so there is
/// always a client certificate once the handshake completed).
pub fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, String> {
    let any = conn
        .peer_identity()
        .ok_or_else(|| "peer presented no certificate".to_string())?;
    let chain = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "peer identity is not a certificate chain".to_string())?;
    let leaf = chain
        .first()
        .ok_or_else(|| "empty certificate chain".to_string())?;
    identity_from_der(leaf)
}

/// The identity of the peer of `conn` if it holds `role`. Otherwise the connection is
/// closed with code `unauthenticated` and the reason (a peer cannot tell an accepted
/// connection from a refused one any other way), and the reason is returned for the
/// caller to log and count.
pub fn require_role(conn: &quinn::Connection, role: Role) -> Result<PeerIdentity, String> {
    let why = match peer_identity(conn) {
        Ok(p) if p.has_role(role) => return Ok(p),
        Ok(p) => format!(
            "certificate {:?} lacks {ROLE_URI_PREFIX}{}",
            p.common_name,
            role.as_str()
        ),
        Err(e) => e,
    };
    let code = fbr_protocol::ErrorCode::Unauthenticated.as_u16();
    conn.close(quinn::VarInt::from_u32(code.into()), why.as_bytes());
    Err(why)
}
