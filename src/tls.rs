//! rustls client configurations, always with the ring provider (no aws-lc, no OpenSSL: they
//! break ARM cross-builds). Used for both the MQTT connection and provisioning.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where to find the CAs that may sign the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// The operating system's trust store.
    System,
    File(PathBuf),
}

/// A client certificate and its key (mTLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    pub cert: PathBuf,
    pub key: PathBuf,
}

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Read every PEM certificate in `path`. The error names the file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file ({e})", path.display()))
}

/// Read the first private key (PKCS#8, PKCS#1 or SEC1) in `path`. The error names the file,
/// never the key.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|_| format!("{}: holds no PEM private key", path.display()))
}

/// Build a TLS 1.2/1.3 client config trusting `ca`, presenting `auth` when given.
pub fn client_config(
    ca: &CaSource,
    auth: Option<&ClientAuth>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    match ca {
        CaSource::File(path) => {
            for cert in read_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: unusable CA certificate ({e})", path.display()))?;
            }
        }
        CaSource::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "no CA certificates in the system trust store: install ca-certificates, \
                     or set ca_file in the config"
                        .into(),
                );
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots);
    let mut cfg = match auth {
        None => builder.with_no_client_auth(),
        Some(a) => builder
            .with_client_auth_cert(read_certs(&a.cert)?, read_key(&a.key)?)
            .map_err(|e| {
                format!(
                    "{} / {}: the client certificate and key do not go together ({e})",
                    a.cert.display(),
                    a.key.display()
                )
            })?,
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Whether an error chain says a certificate is not valid *yet* (the local clock is behind).
pub fn is_not_yet_valid(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(rustls::Error::InvalidCertificate(c)) = e.downcast_ref::<rustls::Error>() {
            return matches!(
                c,
                rustls::CertificateError::NotValidYet
                    | rustls::CertificateError::NotValidYetContext { .. }
            );
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && is_not_yet_valid(inner)
        {
            return true;
        }
        cur = e.source();
    }
    false
}
