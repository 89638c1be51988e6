//! How a PostgreSQL URL becomes connection options, TLS included (sqlx with
//! rustls and the webpki roots: the image has no system CA store).
//!
//! `sslmode` (`disable|allow|prefer|require|verify-ca|verify-full`) and
//! `sslrootcert` (a PEM file) are read from the URL, or from `PGSSLMODE` and
//! `PGSSLROOTCERT` as libpq does. A CA given without a mode means
//! `verify-full`: whoever names a CA asked for a verified connection, and
//! sqlx's own default (`prefer`) would fall back to plaintext silently. With
//! `require`, `verify-ca` or `verify-full` a server without TLS is refused.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgSslMode};

/// The connection options of a `postgres://` URL, with the rules above.
/// Errors on a malformed URL, an unknown `sslmode` or an unreadable `sslrootcert`.
pub fn pg_options(url: &str) -> anyhow::Result<PgConnectOptions> {
    // sqlx's verify-ca verifier takes the process's default provider (as
    // `init_process` sets it; callers that did not, e.g. tests, get ring too).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let parsed = url::Url::parse(url).map_err(|e| anyhow::anyhow!("the PostgreSQL URL is malformed: {e}"))?;
    let query = |keys: &[&str]| {
        parsed
            .query_pairs()
            .find(|(k, _)| keys.contains(&k.as_ref()))
            .map(|(_, v)| v.into_owned())
    };
    let mode = query(&["sslmode", "ssl-mode"]).or_else(|| std::env::var("PGSSLMODE").ok());
    if let Some(m) = &mode {
        PgSslMode::from_str(m).map_err(|_| {
            anyhow::anyhow!(
                "sslmode={m:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            )
        })?;
    }
    let root_cert = query(&["sslrootcert", "ssl-root-cert", "ssl-ca"])
        .or_else(|| std::env::var("PGSSLROOTCERT").ok())
        .filter(|c| !c.is_empty());
    if let Some(path) = root_cert
        .as_deref()
        .filter(|c| !c.trim_start().starts_with("-----BEGIN"))
    {
        std::fs::metadata(path).map_err(|e| anyhow::anyhow!("sslrootcert {path}: {e}"))?;
    }
    let opts =
        PgConnectOptions::from_str(url).map_err(|e| anyhow::anyhow!("the PostgreSQL URL is invalid: {e}"))?;
    Ok(match (&mode, &root_cert) {
        (None, Some(_)) => opts.ssl_mode(PgSslMode::VerifyFull),
        _ => opts,
    })
}

/// The `sslmode` of these options as the URL spells it.
pub fn ssl_mode_name(opts: &PgConnectOptions) -> &'static str {
    match opts.get_ssl_mode() {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

/// A connection error said so that its cause is plain: for TLS, which mode
/// was asked for and what the likely fix is.
pub fn describe_connect_error(e: &sqlx::Error, opts: &PgConnectOptions) -> anyhow::Error {
    let at = format!("{}:{}", opts.get_host(), opts.get_port());
    let mode = ssl_mode_name(opts);
    // rustls' verdicts reach sqlx as a TLS or an I/O error: read the text.
    let text = e.to_string();
    let hint = if text.contains("does not support TLS") {
        format!("the server does not offer TLS and sslmode={mode} refuses a plaintext connection")
    } else if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        "the server's certificate is not signed by the CA in sslrootcert (wrong CA?)".to_string()
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        format!(
            "the server's certificate does not name the host {}",
            opts.get_host()
        )
    } else if matches!(e, sqlx::Error::Tls(_)) || text.contains("peer certificate") {
        "the TLS handshake failed".to_string()
    } else {
        return anyhow::anyhow!("cannot connect to PostgreSQL at {at} (sslmode={mode}): {text}");
    };
    anyhow::anyhow!("cannot connect to PostgreSQL at {at} with TLS (sslmode={mode}): {hint}: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_without_a_mode_means_verify_full() {
        let dir = std::env::temp_dir().join(format!("pg-connect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, "x").unwrap();
        let url = format!("postgres://u@h/db?sslrootcert={}", ca.display());
        assert_eq!(ssl_mode_name(&pg_options(&url).unwrap()), "verify-full");
        let url = format!("postgres://u@h/db?sslmode=require&sslrootcert={}", ca.display());
        assert_eq!(ssl_mode_name(&pg_options(&url).unwrap()), "require");
    }

    #[test]
    fn an_unknown_mode_and_a_missing_ca_are_refused() {
        let e = pg_options("postgres://u@h/db?sslmode=verify-everything").unwrap_err();
        assert!(e.to_string().contains("verify-everything"), "{e}");
        let e =
            pg_options("postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.crt").unwrap_err();
        assert!(e.to_string().contains("sslrootcert /nonexistent/ca.crt"), "{e}");
    }
}
