//! The web page of the upload API, served at `/` by the same endpoint: plain
//! HTML, CSS and JavaScript compiled into the binary (no build step). It
//! uploads a CSV with a progress bar, follows the import's progress, lists
//! the imports the caller may see, downloads `results.csv` and draws the
//! points by latitude/longitude coloured by status. Everything it shows comes
//! from `/v1` with the bearer token its user types in (kept in the tab's
//! `sessionStorage` only); the files themselves hold nothing secret.
//!
//! Served with a Content-Security-Policy allowing only this origin's scripts
//! and styles (no inline script), and never framed.

use axum::{
    http::{header, HeaderName, HeaderValue},
    response::IntoResponse,
    routing::get,
    Router,
};

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const APP_CSS: &str = include_str!("web/app.css");

/// `default-src 'self'`; the picture is a canvas, the download a `blob:` URL.
const CSP: &str = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                HeaderName::from_static("referrer-policy"),
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        body,
    )
}

/// `/`, `/app.js`, `/app.css`.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { file("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app.js",
            get(|| async { file("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/app.css",
            get(|| async { file("text/css; charset=utf-8", APP_CSS) }),
        )
}
