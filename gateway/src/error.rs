//! The gateway's HTTP errors, rendered as `{"error":{"code","message"}}`.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};

/// An error an HTTP handler returns.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No token, or one that does not verify.
    #[error("{message}")]
    Unauthorized {
        /// `missing_token`, `invalid_token` or `token_expired`.
        code: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A request the client must fix.
    #[error("{message}")]
    BadRequest {
        /// A specific code.
        code: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A valid token without the right to do this.
    #[error("{0}")]
    Forbidden(String),
    /// The route exists but is switched off.
    #[error("{0}")]
    NotFound(String),
    /// A dependency (NATS) is not available right now.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure; logged, never shown.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthorized { code, .. } => (StatusCode::UNAUTHORIZED, code),
            Self::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = if status.is_server_error() && !matches!(self, Self::Unavailable(_)) {
            tracing::error!(error = ?self, "Request failed.");
            "internal error".to_owned()
        } else {
            self.to_string()
        };
        bus::ops::error_response(status, code, message)
    }
}
