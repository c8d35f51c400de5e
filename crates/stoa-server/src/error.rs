//! The API's one error type.
//!
//! Policy: every error has a status and a message meant for the caller; 422s carry a
//! FastAPI-style `detail` list naming each bad field. Internal detail (store and IO
//! errors) is logged with the request, never returned: the caller sees "internal error".

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use stoa_types::FieldError;

/// An error answered by the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 422 with the fields that failed validation.
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 401.
    #[error("{0}")]
    Unauthorized(String),
    /// 403.
    #[error("{0}")]
    Forbidden(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409.
    #[error("{0}")]
    Conflict(String),
    /// 413: the body is over `limits.max_body_bytes`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 429: a quota is reached.
    #[error("{0}")]
    TooManyRequests(String),
    /// 503: the server cannot do this now (shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// 502: what the request was passed to (a run's port) did not answer.
    #[error("{0}")]
    BadGateway(String),
    /// 500; the detail is logged, not returned.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The 404 for a run that does not exist or belongs to another org.
    pub fn run_not_found() -> Self {
        ApiError::NotFound("Execution not found".into())
    }

    /// A 422 for one query parameter.
    pub fn query(
        field: &str,
        kind: &str,
        msg: impl Into<String>,
        input: Option<serde_json::Value>,
    ) -> Self {
        ApiError::Validation(vec![FieldError {
            loc: vec!["query".into(), field.into()],
            msg: msg.into(),
            kind: kind.into(),
            input,
        }])
    }
}

impl From<stoa_store::StoreError> for ApiError {
    fn from(e: stoa_store::StoreError) -> Self {
        match &e {
            // The database is down or restarting: the client may try again shortly.
            stoa_store::StoreError::Database {
                kind: stoa_store::DbFailure::Unavailable,
                ..
            } => {
                tracing::warn!(error = %e, "the store is unavailable");
                ApiError::Unavailable(
                    "the database is unavailable (restarting or unreachable); try again shortly"
                        .into(),
                )
            }
            _ => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    /// A store error inside keeps its meaning (503 while the database is unavailable);
    /// anything else is a 500.
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<stoa_store::StoreError>() {
            Ok(store) => store.into(),
            Err(e) => match e
                .chain()
                .find_map(|c| c.downcast_ref::<stoa_store::StoreError>())
            {
                Some(stoa_store::StoreError::Database {
                    kind: stoa_store::DbFailure::Unavailable,
                    message,
                }) => stoa_store::StoreError::Database {
                    kind: stoa_store::DbFailure::Unavailable,
                    message: message.clone(),
                }
                .into(),
                _ => ApiError::Internal(format!("{e:#}")),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, detail) = match self {
            ApiError::Validation(errs) => (StatusCode::UNPROCESSABLE_ENTITY, json!(errs)),
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, json!(m)),
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, json!(m)),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, json!(m)),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, json!(m)),
            ApiError::BadGateway(m) => (StatusCode::BAD_GATEWAY, json!(m)),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, json!(m)),
            ApiError::TooManyRequests(m) => (StatusCode::TOO_MANY_REQUESTS, json!(m)),
            ApiError::PayloadTooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, json!(m)),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, json!(m)),
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, json!("internal error"))
            }
        };
        (status, Json(json!({ "detail": detail }))).into_response()
    }
}
