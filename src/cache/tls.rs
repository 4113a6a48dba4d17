//! TLS to Redis (`rediss://`): turns the PEM files named in `[redis]` into the rustls client
//! configuration fred connects with.
//!
//! - Server verification is always on: the server's certificate must chain to `tls_ca_file`
//!   (a private CA, the usual case for Redis) or, without it, to the system's roots, and must
//!   name the URL's host. There is no "insecure" switch on purpose.
//! - A client certificate (`tls_cert_file` + `tls_key_file`) is sent when given: Redis asks for
//!   one by default (`tls-auth-clients yes`).
//!
//! Loading is done once at start by config validation (so a missing or unreadable file stops
//! the start and names its key) and again when the pool is built.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fred::types::config::{TlsConfig, TlsConnector};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The PEM files of a TLS connection to Redis. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// CA certificates (PEM) the server's certificate must chain to; `None` = system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM), for servers that authenticate clients.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

/// Why the TLS settings cannot be used. `key` is the config key to fix.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct TlsError {
    /// The config key at fault (`redis.tls_ca_file`, …).
    pub key: &'static str,
    /// What is wrong, with the file's path.
    pub reason: String,
}

impl TlsError {
    fn new(key: &'static str, reason: String) -> TlsError {
        TlsError { key, reason }
    }
}

impl RedisTls {
    /// The fred TLS configuration for these files.
    pub fn fred_config(&self) -> Result<TlsConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::new("redis.url", format!("TLS set-up failed: {e}")))?
            .with_root_certificates(self.roots()?);
        let config = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain = certificates("redis.tls_cert_file", cert)?;
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    TlsError::new(
                        "redis.tls_key_file",
                        format!("{}: no usable PEM private key ({e})", key.display()),
                    )
                })?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    TlsError::new(
                        "redis.tls_key_file",
                        format!(
                            "{}: cannot be used with {} ({e})",
                            key.display(),
                            cert.display()
                        ),
                    )
                })?
            }
            (None, None) => builder.with_no_client_auth(),
            // Named by the key that is set, so the message points at a line of the file.
            (Some(_), None) => {
                return Err(TlsError::new(
                    "redis.tls_cert_file",
                    "is set without redis.tls_key_file; set both or neither".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(TlsError::new(
                    "redis.tls_key_file",
                    "is set without redis.tls_cert_file; set both or neither".into(),
                ));
            }
        };
        Ok(TlsConnector::from(config).into())
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                for cert in certificates("redis.tls_ca_file", path)? {
                    roots.add(cert).map_err(|e| {
                        TlsError::new(
                            "redis.tls_ca_file",
                            format!("{}: not a usable CA certificate ({e})", path.display()),
                        )
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                // Unparsable system certificates are skipped, as browsers do.
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(TlsError::new(
                        "redis.tls_ca_file",
                        "no system CA certificates found; name the CA that signed the Redis server's certificate".into(),
                    ));
                }
            }
        }
        Ok(roots)
    }
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::new(key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError::new(
            key,
            format!("{}: holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("isrgate-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn missing_and_empty_files_name_their_key() {
        let tls = RedisTls {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..RedisTls::default()
        };
        let e = tls.fred_config().expect_err("missing file");
        assert_eq!(e.key, "redis.tls_ca_file");
        assert!(e.reason.contains("/nonexistent/ca.pem"), "{}", e.reason);

        let tls = RedisTls {
            ca_file: Some(file("empty.pem", "not pem at all\n")),
            ..RedisTls::default()
        };
        let e = tls.fred_config().expect_err("no certificate");
        assert_eq!(e.key, "redis.tls_ca_file");
        assert!(e.reason.contains("no PEM certificate"), "{}", e.reason);
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_the_other_way_round() {
        let tls = RedisTls {
            cert_file: Some("/x/cert.pem".into()),
            ..RedisTls::default()
        };
        assert_eq!(
            tls.fred_config().expect_err("no key").key,
            "redis.tls_cert_file"
        );
        let tls = RedisTls {
            key_file: Some("/x/key.pem".into()),
            ..RedisTls::default()
        };
        assert_eq!(
            tls.fred_config().expect_err("no cert").key,
            "redis.tls_key_file"
        );
    }
}
