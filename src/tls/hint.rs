//! What a failed TLS handshake means, for logs and `/readyz`: hints matched on the kinds of
//! rustls' errors and on Postgres' SQLSTATE, found inside the wrappers they arrive in.
//! Never reads a message's text, and builds no TLS configuration.

use std::sync::Arc;

/// What to check when `error`, or one of its causes, is a failed TLS handshake or a server
/// that refuses the connection as it was made; for logs and `/readyz`. Matched on kinds,
/// never on message text: rustls' [`rustls::Error`] (a certificate's [`rustls::CertificateError`],
/// an alert the server sent) and Postgres' SQLSTATE, through the wrappers they arrive in
/// (see [`causes`]).
pub fn explain(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    causes(error).find_map(|cause| {
        if let Some(e) = cause.downcast_ref::<rustls::Error>() {
            explain_rustls(e)
        } else if let Some(e) = cause.downcast_ref::<tokio_postgres::error::DbError>() {
            explain_postgres(e)
        } else {
            None
        }
    })
}

/// `message` (what `error` says) followed by [`explain`]'s hint in parentheses, when it has
/// one.
pub fn with_hint(message: String, error: &(dyn std::error::Error + 'static)) -> String {
    match explain(error) {
        Some(hint) => format!("{message} ({hint})"),
        None => message,
    }
}

/// `error` and its causes, looking inside the wrappers that hide a cause from
/// [`std::error::Error::source`]: an [`std::io::Error`] (tokio-rustls returns rustls' error
/// inside one; its `source` skips to the wrapped error's own cause) and an `Arc` of an error
/// (how the redis crate keeps an I/O error).
fn causes<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    type Shared = Arc<dyn std::error::Error + Send + Sync>;
    std::iter::successors(Some(error), |e| {
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner as &(dyn std::error::Error + 'static))
        } else if let Some(shared) = e.downcast_ref::<Shared>() {
            Some(shared.as_ref() as &(dyn std::error::Error + 'static))
        } else {
            e.source()
        }
    })
}

/// The hint for a handshake rustls gave up on, or the server did.
fn explain_rustls(error: &rustls::Error) -> Option<&'static str> {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
    match error {
        Error::InvalidCertificate(Cert::UnknownIssuer) => {
            Some("the server's certificate is not signed by a CA in sslrootcert (or tls_ca_file)")
        }
        Error::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            Some(
                "the server's certificate does not name the host connected to \
                 (sslmode=verify-full)",
            )
        }
        Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            Some("the server's certificate has expired")
        }
        Error::InvalidCertificate(Cert::NotValidYet | Cert::NotValidYetContext { .. }) => {
            Some("the server's certificate is not valid yet")
        }
        Error::AlertReceived(Alert::CertificateRequired) => Some(
            "the server requires a client certificate: set sslcert and sslkey (or \
             tls_cert_file and tls_key_file)",
        ),
        _ => None,
    }
}

/// The hint for a Postgres server that refused the connection as it was made: no
/// `pg_hba.conf` line admits it (28000), which is also how a server that accepts a client
/// only over TLS, or only with a certificate, answers.
fn explain_postgres(error: &tokio_postgres::error::DbError) -> Option<&'static str> {
    use tokio_postgres::error::SqlState;
    (*error.code() == SqlState::INVALID_AUTHORIZATION_SPECIFICATION).then_some(
        "pg_hba.conf admits no such connection: check its host, user and database, and \
         whether the server accepts them only over TLS (sslmode=require or stricter) or only \
         with a client certificate (sslcert, sslkey)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CertificateError;

    #[test]
    fn handshake_failures_are_explained_by_kind_through_their_wrappers() {
        use rustls::{AlertDescription, Error};
        let unknown = Error::InvalidCertificate(CertificateError::UnknownIssuer);
        // tokio-rustls: rustls' error inside an io::Error, boxed by tokio-postgres.
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown.clone());
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(io);
        assert!(explain(boxed.as_ref()).unwrap().contains("sslrootcert"));
        // redis: the io::Error kept in an Arc.
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown);
        let shared: Arc<dyn std::error::Error + Send + Sync> = Arc::new(io);
        assert!(explain(&shared).unwrap().contains("sslrootcert"));
        let name = Error::InvalidCertificate(CertificateError::NotValidForName);
        assert!(explain(&name).unwrap().contains("does not name the host"));
        let required = Error::AlertReceived(AlertDescription::CertificateRequired);
        assert!(explain(&required).unwrap().contains("sslcert"));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(explain(&refused).is_none());
        // The kind decides, not the text.
        let text = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        assert!(explain(&text).is_none());
        assert_eq!(
            with_hint("x".into(), &name),
            format!("x ({})", explain(&name).unwrap())
        );
    }
}
