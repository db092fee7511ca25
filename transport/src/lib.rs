//! Mutual-TLS QUIC transport for swarm.
//!
//! The crate is message-agnostic: it moves any `serde` type between two authenticated
//! peers and knows nothing about what the messages mean. It is layered bottom-up:
//!
//! * [`pki`]: the cluster PKI. [`pki::init_certs`] writes a cluster CA (plus a
//!   coordinator and a worker pool certificate for one machine), [`pki::issue_cert`] a
//!   certificate per node and [`pki::renew_cert`] renews one. A certificate's subject
//!   names the holder's [`Role`] and name ([`CertSubject`]). Enrollment keeps a node's
//!   key on the node: [`pki::new_key_and_request`] makes a key and a signing request,
//!   [`pki::Issuer::sign_request`] signs it at the CA and [`pki::install_enrolled`]
//!   stores the answer.
//! * [`tls`]: [`tls::Identity`] loads a node's certificate and the cluster CAs it
//!   trusts, and takes new ones from disk while running ([`tls::Identity::reload`]: a
//!   renewed certificate, or a new `ca.pem` to move the cluster to a new CA without a
//!   restart); [`tls::server_config`] / [`tls::client_config`] turn it into quinn
//!   configs that *require* a certificate from a trusted cluster CA on both sides (a
//!   dialer also requires the role it wants to reach), speak TLS 1.3 only and allow
//!   0-RTT resumption. [`tls::peer_subject`] reads who the
//!   peer is; [`tls::Identity::prove`] / [`tls::Identity::verify_proof`] let a node prove
//!   its identity across a relay.
//! * [`revocation`]: a deny list of revoked certificate serials ([`Revocations`]). Each
//!   identity holds one and every handshake verifier built from it refuses a revoked
//!   peer; since resumed sessions skip verification, acceptors also check
//!   [`tls::peer_serial`] after the handshake ([`tls::require_not_revoked`]).
//! * [`endpoint`]: binding endpoints, dialing with 0-RTT ([`endpoint::dial`],
//!   [`endpoint::open_session`]) and accepting connections ([`endpoint::accept`]).
//! * [`frame`]: length-delimited frames (4-byte big-endian length + payload) on quinn
//!   streams ([`FrameWriter`], [`FrameReader`]).
//! * [`codec`]: the binary encoding of a frame's payload. It is the only module that
//!   knows which encoding is used.
//!
//! Errors from the connection-level layers are reported as [`TransportError`]; errors on
//! a single stream as [`FrameError`].

#![warn(missing_docs)]

pub mod endpoint;
pub mod frame;
pub mod pki;
pub mod revocation;
pub mod tls;

pub use endpoint::{
    accept, accept_stream, client_endpoint, dial, endpoint_on, open_session, server_endpoint,
    Accepted, Dialed, Handshake, Session,
};
pub use frame::{FrameError, FrameReader, FrameWriter, DEFAULT_MAX_FRAME};
pub use pki::{
    install_enrolled, install_renewed, new_key_and_request, request_for_existing_key, Issuer,
    MAX_CSR_LEN,
};
pub use revocation::Revocations;
/// The binary encoding of every frame (the `swarm-codec` crate).
pub use swarm_codec as codec;
pub use swarm_codec::CodecError;
pub use tls::{
    client_config, close_when_distrusted, https_client_config, https_server_config, init_certs,
    is_peer_revoked, issue_cert, peer_role, peer_serial, peer_subject, renew_cert,
    require_not_revoked, require_role, serial_of_der, server_config, set_liveness,
    set_server_liveness, CertFiles, CertInfo, CertName, CertSubject, Identity, IdentityProof, Role,
};

/// A failure to establish, authenticate or use a connection.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The connection could not even be started (bad server name, endpoint stopping, ...).
    #[error("cannot start connection: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed (includes TLS handshake failures, which quinn
    /// reports as connection errors carrying the TLS alert).
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A stream failed or carried an invalid frame.
    #[error("stream: {0}")]
    Frame(FrameError),
    /// The peer's certificate is missing or unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The peer authenticated with a certificate of the wrong role.
    #[error("peer has role {got}, expected {expected}")]
    WrongRole {
        /// The role the caller required.
        expected: Role,
        /// The role in the peer's certificate.
        got: Role,
    },
    /// The peer authenticated with a certificate whose serial is on the deny list
    /// ([`Revocations`]).
    #[error("peer certificate {serial} is revoked")]
    Revoked {
        /// The certificate's serial, lower-case hex.
        serial: String,
    },
    /// Data sent as 0-RTT early data was rejected by the server and must be resent.
    #[error("0-RTT data was rejected by the server")]
    ZeroRttRejected,
}

impl From<FrameError> for TransportError {
    /// Lifts 0-RTT rejection to its own variant so callers can match on it without
    /// digging through stream errors.
    fn from(e: FrameError) -> Self {
        if e.is_zero_rtt_rejected() {
            TransportError::ZeroRttRejected
        } else {
            TransportError::Frame(e)
        }
    }
}

impl TransportError {
    /// Whether the error is the peer misbehaving on a stream (oversize, malformed or
    /// truncated frame) rather than a network or local failure.
    pub fn is_malformed(&self) -> bool {
        matches!(self, TransportError::Frame(e) if e.is_malformed())
    }
}
