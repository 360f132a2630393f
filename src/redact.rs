//! Keeps passwords out of logs, errors and `/readyz`. Knows nothing about connecting.

use std::sync::Arc;

/// The secrets of one configuration, to scrub from any text leaving the process.
#[derive(Clone, Debug, Default)]
pub struct Secrets(Arc<Vec<String>>);

impl Secrets {
    /// Collects the passwords of the Postgres and Redis connection strings.
    pub fn new(postgres_url: &str, redis_url: &str) -> Self {
        let mut found = Vec::new();
        if let Ok(pg) = postgres_url.parse::<tokio_postgres::Config>() {
            if let Some(pw) = pg.get_password() {
                found.push(String::from_utf8_lossy(pw).into_owned());
            }
        }
        if let Ok(info) = redis::IntoConnectionInfo::into_connection_info(redis_url) {
            if let Some(pw) = info.redis_settings().password() {
                found.push(pw.to_string());
            }
        }
        // Also the raw (possibly percent-encoded) password as written in either URL.
        for url in [postgres_url, redis_url] {
            if let Some(pw) = url_password(url) {
                found.push(pw.to_string());
            }
        }
        found.retain(|s| !s.is_empty());
        found.sort();
        found.dedup();
        // Longest first, so a password containing another is replaced whole.
        found.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Secrets(Arc::new(found))
    }

    /// Adds one more secret (the bearer token).
    pub fn with(self, secret: Option<&str>) -> Self {
        let Some(secret) = secret.filter(|s| !s.is_empty()) else {
            return self;
        };
        let mut all = (*self.0).clone();
        all.push(secret.to_string());
        all.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Secrets(Arc::new(all))
    }

    /// Replaces every secret in `text` with `***`.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in self.0.iter() {
            out = out.replace(secret.as_str(), "***");
        }
        out
    }
}

/// A connection string with its password replaced by `***`, safe to log.
pub fn redact_url(url: &str) -> String {
    if let Some(pw) = url_password(url) {
        let start = pw.as_ptr() as usize - url.as_ptr() as usize;
        return format!("{}***{}", &url[..start], &url[start + pw.len()..]);
    }
    // key=value form: password=secret
    let mut out = Vec::new();
    for part in url.split(' ') {
        match part.split_once('=') {
            Some((k, _)) if k.trim() == "password" => out.push(format!("{k}=***")),
            _ => out.push(part.to_string()),
        }
    }
    out.join(" ")
}

/// The password in `scheme://user:password@host...`, if any.
fn url_password(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let at = authority.rfind('@')?;
    let userinfo = &authority[..at];
    let (_, pw) = userinfo.split_once(':')?;
    (!pw.is_empty()).then_some(pw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact_url("postgres://app:s3cr%40t@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            redact_url("redis://:hunter2@cache:6379/0"),
            "redis://:***@cache:6379/0"
        );
        assert_eq!(
            redact_url("host=db user=app password=pw dbname=x"),
            "host=db user=app password=*** dbname=x"
        );
        assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
    }

    #[test]
    fn secrets_are_scrubbed_from_any_text() {
        let s = Secrets::new("postgres://app:pg-pass@db/x", "redis://:rd-pass@cache");
        assert_eq!(
            s.scrub("auth failed for pg-pass and rd-pass"),
            "auth failed for *** and ***"
        );
    }
}
