//! The upload API's one error type. A client error (4xx, 503) says what to
//! change; an internal error (database, unexpected API-server answer) is
//! logged with the request's id and answered with a generic message and that
//! id, never with the underlying text (which may name tables, hosts or users).
//!
//! Every request gets an id ([`request_id`] middleware), returned as the
//! `x-request-id` header and kept in a task-local for the handlers' errors.

use axum::{
    extract::Request,
    http::{HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The response header carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// An error of the upload API.
#[derive(Debug)]
pub enum ApiError {
    /// The client's mistake (or a temporary state, 503): the message is
    /// answered as is and must say what to change.
    Client(StatusCode, String),
    /// Ours: logged with the request id, answered with a generic message.
    Internal(String),
}

impl ApiError {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::Client(StatusCode::BAD_REQUEST, msg.into())
    }

    pub fn unauthorized(msg: impl Into<String>) -> Self {
        Self::Client(StatusCode::UNAUTHORIZED, msg.into())
    }

    pub fn forbidden(msg: impl Into<String>) -> Self {
        Self::Client(StatusCode::FORBIDDEN, msg.into())
    }

    /// An internal error with its cause (logged, not answered).
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        Self::Internal(cause.to_string())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Client(code, msg) => write!(f, "{code}: {msg}"),
            Self::Internal(cause) => write!(f, "internal error: {cause}"),
        }
    }
}

/// The current request's id (a fresh one outside a request).
pub fn current_request_id() -> String {
    REQUEST_ID
        .try_with(Clone::clone)
        .unwrap_or_else(|_| new_request_id())
}

fn new_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Client(code, msg) => (code, Json(json!({"error": msg}))).into_response(),
            Self::Internal(cause) => {
                let id = current_request_id();
                tracing::error!(request_id = %id, "upload API internal error: {cause}");
                let body = json!({
                    "error": format!("internal error; the operator's log has the cause under request id {id}"),
                    "requestId": id,
                });
                (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
            }
        }
    }
}

impl From<kube::Error> for ApiError {
    /// The API server's answers the client can act on pass through (not
    /// found, already exists, invalid); anything else is ours.
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) if s.code == 404 => Self::Client(StatusCode::NOT_FOUND, s.message),
            kube::Error::Api(s) if s.code == 409 => Self::Client(
                StatusCode::CONFLICT,
                format!(
                    "{}: choose another name, or delete the existing import first",
                    s.message
                ),
            ),
            // A namespace being deleted, a ResourceQuota full: the caller can
            // act on it. The operator's own RBAC refusing ("… cannot create …")
            // is a misconfiguration, ours.
            kube::Error::Api(s) if s.code == 403 && !s.message.contains(" cannot ") => {
                Self::Client(StatusCode::FORBIDDEN, s.message)
            }
            kube::Error::Api(s) if s.code == 400 || s.code == 422 => Self::Client(
                StatusCode::from_u16(s.code).unwrap_or(StatusCode::BAD_REQUEST),
                s.message,
            ),
            other => Self::internal(format!("Kubernetes API: {other}")),
        }
    }
}

/// Middleware: gives every request an id, in the task-local read by
/// [`ApiError`] and in the `x-request-id` response header.
pub async fn request_id(req: Request, next: Next) -> Response {
    let id = new_request_id();
    let mut resp = REQUEST_ID.scope(id.clone(), next.run(req)).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_internal_error_answers_the_request_id_and_not_its_cause() {
        let resp = REQUEST_ID
            .scope("abc123".into(), async {
                ApiError::internal("relation \"uploads\" does not exist").into_response()
            })
            .await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.contains("abc123"), "{text}");
        assert!(!text.contains("uploads"), "{text}");
    }
}
