//! The sandbox's throwaway PKI: a CA, a server certificate for loopback and a client
//! certificate for mTLS tests, all generated at start (rcgen, ring).

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// PEM material the sandbox hands out, and the TLS server config built from it.
pub struct Pki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
    /// The server's private key (for running another broker, e.g. mosquitto, in tests).
    pub server_key_pem: String,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivatePkcs8KeyDer<'static>,
    ca_der: CertificateDer<'static>,
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("building the TLS server configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("building the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Where the sandbox's certificates end (year).
const NOT_AFTER_YEAR: i32 = 2040;

/// Names the server certificate is valid for.
pub const SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

impl Pki {
    /// Generate a fresh CA, server and client certificate. With `server_not_yet_valid`, the
    /// server certificate's validity starts in 2099: a client with a sane clock then sees
    /// "certificate not yet valid", as a device whose clock lags would.
    pub fn generate(server_not_yet_valid: bool) -> Result<Pki, PkiError> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "imlink-sandbox CA (development only)");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        // A plausible end (rcgen's default, the year 4096, is more than some brokers can
        // schedule: ejabberd's certificate-expiry timer crashes on it).
        ca_params.not_after = rcgen::date_time_ymd(NOT_AFTER_YEAR, 1, 1);
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate()?;
        let mut server_params = CertificateParams::new(
            SERVER_NAMES
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "imlink-sandbox");
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server_params.not_before = if server_not_yet_valid {
            rcgen::date_time_ymd(2099, 1, 1)
        } else {
            rcgen::date_time_ymd(2020, 1, 1)
        };
        server_params.not_after = if server_not_yet_valid {
            rcgen::date_time_ymd(2100, 1, 1)
        } else {
            rcgen::date_time_ymd(NOT_AFTER_YEAR, 1, 1)
        };
        let server_cert = server_params.signed_by(&server_key, &issuer)?;

        let client_key = KeyPair::generate()?;
        let mut client_params = CertificateParams::new(Vec::<String>::new())?;
        client_params
            .distinguished_name
            .push(DnType::CommonName, "imlink-sandbox device");
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        client_params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        client_params.not_after = rcgen::date_time_ymd(NOT_AFTER_YEAR, 1, 1);
        let client_cert = client_params.signed_by(&client_key, &issuer)?;

        Ok(Pki {
            ca_pem: ca_cert.pem(),
            server_cert_pem: server_cert.pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
            server_key_pem: server_key.serialize_pem(),
            server_chain: vec![server_cert.der().clone(), ca_cert.der().clone()],
            server_key: PrivatePkcs8KeyDer::from(server_key.serialize_der()),
            ca_der: ca_cert.der().clone(),
        })
    }

    /// A TLS 1.2/1.3 server config (ring) for the sandbox's listeners. Client certificates
    /// signed by the sandbox CA are accepted, and required when `require_client_cert`.
    pub fn server_config(
        &self,
        require_client_cert: bool,
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        let verifier = if require_client_cert {
            verifier.build()?
        } else {
            verifier.allow_unauthenticated().build()?
        };
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                self.server_chain.clone(),
                PrivateKeyDer::Pkcs8(self.server_key.clone_key()),
            )?;
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }
}
