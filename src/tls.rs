//! TLS to Postgres and Redis, with rustls (no OpenSSL in the image): the libpq settings
//! `sslmode`, `sslrootcert`, `sslcert` and `sslkey` read from a Postgres connection string
//! (Postgres docs, "SSL Support", 34.19), turned into a connector for tokio-postgres
//! (through `tokio-postgres-rustls`) and into settings for the relay's replication
//! connection; and the certificates of a `rediss://` connection; what a failed handshake
//! means (`hint.rs`). Imports nothing of the crate: configuration validation and the
//! connections both build on it.
//!
//! # `sslmode`, as libpq means it
//! - `disable`: never TLS. `prefer`: TLS when the server offers it, unverified. `require`:
//!   TLS, unverified, unless `sslrootcert` is given (then as `verify-ca`, as libpq does).
//! - `verify-ca`: the server's certificate chains to `sslrootcert`; any name.
//! - `verify-full`: that, and the certificate names the host connected to.
//!
//! `sslrootcert` is a PEM file of CA certificates (a mounted Secret, a cloud provider's
//! bundle), or `system` for the machine's trusted roots.

mod hint;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

pub use hint::{explain, with_hint};

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// libpq's default: TLS when offered, never verified.
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// libpq's name for a mode (`allow` is taken as `prefer`).
    ///
    /// # Errors
    /// [`TlsError::SslMode`] for any other value.
    fn parse(value: &str) -> Result<SslMode, TlsError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(TlsError::SslMode(other.to_string())),
        })
    }

    /// The name libpq gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where trusted CA certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Roots {
    /// A PEM file.
    File(PathBuf),
    /// The machine's trusted roots (`sslrootcert=system`).
    System,
}

/// The TLS settings of one Postgres connection string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PostgresTls {
    pub mode: SslMode,
    pub root: Option<Roots>,
    /// `sslcert` and `sslkey`: a client certificate and its key, PEM files.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Why TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Settings that cannot work together, with what to do.
    #[error("{0}")]
    Invalid(String),
    /// An `sslmode` libpq does not know.
    #[error("sslmode {0:?}: use disable, prefer, require, verify-ca or verify-full")]
    SslMode(String),
    #[error("cannot read {what} {path}: {message}")]
    File {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("tls settings refused: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The keys of a connection string that this module owns: tokio-postgres refuses
/// `verify-ca`, `verify-full` and the others.
const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

impl PostgresTls {
    /// Splits a Postgres connection string (URL or `key=value` form) into what tokio-postgres
    /// should parse (with `sslmode` reduced to what it knows: `disable`, `prefer`, `require`)
    /// and the TLS settings, checked for consistency (files are read by
    /// [`PostgresTls::check_files`] and when connecting).
    ///
    /// # Errors
    /// An unknown `sslmode`, `verify-ca`/`verify-full` without `sslrootcert`, `sslcert`
    /// without `sslkey` or the reverse.
    pub fn split(url: &str) -> Result<(String, PostgresTls), TlsError> {
        let (rest, pairs) = split_tls_keys(url);
        let mut tls = PostgresTls::default();
        let (mut cert, mut key) = (None, None);
        for (k, v) in pairs {
            match k.as_str() {
                "sslmode" => tls.mode = SslMode::parse(&v)?,
                "sslrootcert" if v == "system" => tls.root = Some(Roots::System),
                "sslrootcert" => tls.root = Some(Roots::File(PathBuf::from(v))),
                "sslcert" => cert = Some(PathBuf::from(v)),
                _ => key = Some(PathBuf::from(v)),
            }
        }
        tls.client = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(TlsError::Invalid(
                    "sslcert and sslkey go together: a client certificate needs its key".into(),
                ))
            }
        };
        if matches!(tls.mode, SslMode::VerifyCa | SslMode::VerifyFull) && tls.root.is_none() {
            return Err(TlsError::Invalid(format!(
                "sslmode={} needs sslrootcert: a PEM file of the CA certificates that sign the \
                 server's (e.g. your cloud provider's bundle, mounted from a Secret), or \
                 sslrootcert=system for the machine's trusted roots",
                tls.mode.as_str()
            )));
        }
        if tls.root == Some(Roots::System) && tls.mode != SslMode::VerifyFull {
            // Any publicly trusted certificate for any name would pass: libpq refuses it too.
            return Err(TlsError::Invalid(format!(
                "sslrootcert=system with sslmode={}: the machine's public roots vouch for \
                 every public name, so only sslmode=verify-full makes them mean anything",
                tls.mode.as_str()
            )));
        }
        if tls.mode == SslMode::Disable && (tls.root.is_some() || tls.client.is_some()) {
            return Err(TlsError::Invalid(
                "sslmode=disable with sslrootcert, sslcert or sslkey: certificates need TLS".into(),
            ));
        }
        let mode = match tls.mode {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            _ => "require",
        };
        Ok((append_param(&rest, "sslmode", mode), tls))
    }

    /// Reads every file the settings name, so a missing or malformed one is reported at
    /// start, with its key.
    ///
    /// # Errors
    /// The first file that cannot be read or parsed.
    pub fn check_files(&self) -> Result<(), TlsError> {
        self.client_config().map(|_| ())
    }

    /// The rustls configuration these settings call for.
    ///
    /// # Errors
    /// A file that cannot be read or parsed; rustls refusing a key.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let verifier: Arc<dyn ServerCertVerifier> = match (&self.root, self.mode) {
            (Some(root), SslMode::VerifyFull) => {
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots(root)?), provider)
                    .build()
                    .map_err(|e| TlsError::Invalid(e.to_string()))?
            }
            (Some(root), _) => Arc::new(ChainOnly(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots(root)?), provider)
                    .build()
                    .map_err(|e| TlsError::Invalid(e.to_string()))?,
            )),
            (None, _) => Arc::new(Unverified(provider)),
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        Ok(match &self.client {
            Some((cert, key)) => {
                let chain = certificates("sslcert", cert)?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
                    what: "sslkey",
                    path: key.clone(),
                    message: e.to_string(),
                })?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        })
    }

    /// A connector for tokio-postgres (the pool and the dedicated connections).
    ///
    /// # Errors
    /// As [`PostgresTls::client_config`].
    pub fn connector(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, TlsError> {
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
            self.client_config()?,
        ))
    }

    /// The same settings for the relay's replication connection (`pgwire-replication`).
    pub fn replication(&self) -> pgwire_replication::TlsConfig {
        use pgwire_replication::{SslMode as Mode, TlsConfig};
        let ca = match &self.root {
            Some(Roots::File(path)) => Some(path.clone()),
            // The crate's bundled web roots stand for the machine's.
            Some(Roots::System) | None => None,
        };
        let mut tls = match (self.mode, &self.root) {
            (SslMode::Disable, _) => TlsConfig::disabled(),
            (SslMode::VerifyFull, _) => TlsConfig::verify_full(ca),
            // With a root given, `prefer` verifies what it gets on the pool's connections; the
            // replication connection is held to the same, and so requires TLS.
            (SslMode::VerifyCa, _) | (SslMode::Require | SslMode::Prefer, Some(_)) => {
                TlsConfig::verify_ca(ca)
            }
            (SslMode::Require, None) => TlsConfig::require(),
            (SslMode::Prefer, _) => {
                let mut tls = TlsConfig::require();
                tls.mode = Mode::Prefer;
                tls
            }
        };
        if let Some((cert, key)) = &self.client {
            tls = tls.with_client_cert(cert.clone(), key.clone());
        }
        tls
    }
}

/// The certificates of a `rediss://` connection: a CA bundle (else the machine's trusted
/// roots) and an optional client certificate, all PEM files.
///
/// # Errors
/// A file that cannot be read, or a client certificate without its key.
pub fn redis_certificates(
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<redis::TlsCertificates, TlsError> {
    let read = |what: &'static str, path: &Path| {
        std::fs::read(path).map_err(|e| TlsError::File {
            what,
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    };
    let root_cert = match ca {
        Some(path) => {
            let pem = read("redis.tls_ca_file", path)?;
            if CertificateDer::pem_slice_iter(&pem).next().is_none() {
                return Err(TlsError::File {
                    what: "redis.tls_ca_file",
                    path: path.to_path_buf(),
                    message: "no PEM certificate in it".into(),
                });
            }
            Some(pem)
        }
        None => None,
    };
    let client_tls = match client {
        Some((cert, key)) => Some(redis::ClientTlsConfig {
            client_cert: read("redis.tls_cert_file", cert)?,
            client_key: read("redis.tls_key_file", key)?,
        }),
        None => None,
    };
    Ok(redis::TlsCertificates {
        client_tls,
        root_cert,
    })
}

/// Makes ring the process's rustls provider (the redis crate builds its configuration from
/// the process default, and more than one provider is compiled in). Harmless when done twice.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = |message: String| TlsError::File {
        what,
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file(e.to_string()))?;
    if certs.is_empty() {
        return Err(file("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn roots(root: &Roots) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match root {
        Roots::File(path) => {
            for cert in certificates("sslrootcert", path)? {
                store.add(cert).map_err(|e| TlsError::File {
                    what: "sslrootcert",
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(TlsError::Invalid(
                    "sslrootcert=system, but this machine has no trusted root certificates".into(),
                ));
            }
        }
    }
    Ok(store)
}

/// The connection string without the TLS keys, and their values (URL form: query
/// parameters, percent-decoded; `key=value` form: the pairs, quotes removed).
fn split_tls_keys(url: &str) -> (String, Vec<(String, String)>) {
    let mut found = Vec::new();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_string(), found);
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_encoding::percent_decode_str(k).decode_utf8_lossy();
            if TLS_KEYS.contains(&key.as_ref()) {
                let value = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
                found.push((key.into_owned(), value.into_owned()));
            } else {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, found);
    }
    let mut kept = Vec::new();
    for (k, v, raw) in key_values(url) {
        if TLS_KEYS.contains(&k.as_str()) {
            found.push((k, v));
        } else {
            kept.push(raw);
        }
    }
    (kept.join(" "), found)
}

/// `key=value` pairs of a libpq connection string: (key, unquoted value, the pair as
/// written).
fn key_values(s: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut chars = s.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            return out;
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        chars.next_if(|(_, c)| *c == '=');
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, c)) = chars.next() {
                            value.push(c);
                        }
                    }
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some((_, c)) = chars.next() {
                        value.push(c);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        let end = chars.peek().map_or(s.len(), |(i, _)| *i);
        out.push((key, value, s[start..end].trim_end().to_string()));
    }
}

/// `url` with `key=value` added, in its form.
fn append_param(url: &str, key: &str, value: &str) -> String {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}{key}={value}")
    } else if url.trim().is_empty() {
        format!("{key}={value}")
    } else {
        // In front: after a trailing backslash it would be read as part of the last value.
        format!("{key}={value} {url}")
    }
}

/// `sslmode=prefer` or `require` without `sslrootcert`: encryption without verification,
/// as libpq does. The signature over the handshake is still checked.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the name is not checked
/// (webpki checks the chain first, so a name mismatch means the chain passed).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_keys_are_taken_out_of_urls_and_key_value_strings() {
        let (rest, tls) = PostgresTls::split(
            "postgres://u:p@db:5432/app?sslmode=verify-full&sslrootcert=%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p@db:5432/app?application_name=x&sslmode=require"
        );
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root, Some(Roots::File("/ca.pem".into())));
        rest.parse::<tokio_postgres::Config>().unwrap();

        let (rest, tls) = PostgresTls::split(
            "host=db user=u password='a b' sslmode=verify-ca sslrootcert=/ca.pem sslcert=/c sslkey='/k k'",
        )
        .unwrap();
        assert_eq!(rest, "sslmode=require host=db user=u password='a b'");
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(tls.client, Some(("/c".into(), "/k k".into())));
        let pg: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(pg.get_password(), Some(&b"a b"[..]));

        let (rest, tls) = PostgresTls::split("postgres://db/app").unwrap();
        assert_eq!(rest, "postgres://db/app?sslmode=prefer");
        assert_eq!(tls, PostgresTls::default());
    }

    #[test]
    fn settings_that_cannot_work_are_refused_with_what_to_do() {
        let err = |url| PostgresTls::split(url).unwrap_err().to_string();
        assert!(err("postgres://db/app?sslmode=verify-full").contains("needs sslrootcert"));
        assert!(err("postgres://db/app?sslmode=verify-ca").contains("sslrootcert=system"));
        assert!(err("postgres://db/app?sslmode=sometimes").contains("verify-full"));
        assert!(err("postgres://db/app?sslmode=require&sslcert=/c").contains("go together"));
        assert!(err("postgres://db/app?sslmode=disable&sslrootcert=/ca").contains("need TLS"));
        assert!(
            err("postgres://db/app?sslmode=verify-ca&sslrootcert=system").contains("verify-full")
        );
        let missing = PostgresTls::split(
            "postgres://db/app?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        )
        .unwrap()
        .1
        .check_files()
        .unwrap_err()
        .to_string();
        assert!(
            missing.contains("sslrootcert") && missing.contains("/nonexistent/ca.pem"),
            "{missing}"
        );
    }
}
