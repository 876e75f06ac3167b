//! What a request can fail with, and the page each failure shows: bad
//! input is a 400 saying what is wrong, a refusal a 401/403 saying why,
//! and anything else a 500 whose details go to the log only.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::layout;

/// A failed request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DashboardError {
    /// The request's input is unusable; the message says how.
    #[error("{0}")]
    BadRequest(String),
    /// A mutation without a logged-in operator.
    #[error("log in to do this")]
    Unauthenticated,
    /// Refused: read-only dashboard, bad CSRF token, wrong token.
    #[error("{0}")]
    Forbidden(String),
    /// The operator's role does not allow the action.
    #[error("{action} needs the {needed} role; you are logged in with the {held} role")]
    RoleRequired {
        /// What was refused.
        action: String,
        /// The least role that may do it.
        needed: crate::role::Role,
        /// The operator's role.
        held: crate::role::Role,
    },
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The state changed since the operator looked (more jobs match than
    /// were confirmed).
    #[error("{0}")]
    Conflict(String),
    /// The broker could not be reached or did not confirm.
    #[error("the broker: {0}")]
    Broker(String),
    /// The library failed (database, ...).
    #[error(transparent)]
    Outbox(#[from] outbox::Error),
    /// Starting the server failed (bind, refused configuration).
    #[error("{0}")]
    Start(String),
}

impl DashboardError {
    fn status(&self) -> StatusCode {
        match self {
            DashboardError::BadRequest(_) => StatusCode::BAD_REQUEST,
            DashboardError::Unauthenticated => StatusCode::UNAUTHORIZED,
            DashboardError::Forbidden(_) | DashboardError::RoleRequired { .. } => StatusCode::FORBIDDEN,
            DashboardError::NotFound(_) => StatusCode::NOT_FOUND,
            DashboardError::Conflict(_) => StatusCode::CONFLICT,
            DashboardError::Broker(_) => StatusCode::BAD_GATEWAY,
            DashboardError::Outbox(outbox::Error::InvalidInput(_) | outbox::Error::Config(_)) => {
                StatusCode::BAD_REQUEST
            }
            DashboardError::Outbox(outbox::Error::NotFound(_)) => StatusCode::NOT_FOUND,
            // The job stays; the operator needs the broker's reason.
            DashboardError::Outbox(outbox::Error::Unconfirmed { .. } | outbox::Error::Broker { .. }) => {
                StatusCode::BAD_GATEWAY
            }
            DashboardError::Outbox(_) | DashboardError::Start(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for DashboardError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = if status.is_server_error() && status != StatusCode::BAD_GATEWAY {
            // The chain may name tables or hosts: the log gets it, the page
            // a generic line.
            tracing::error!(error = %outbox::error_chain(&self), "dashboard request failed");
            "the dashboard could not answer this request; its log says why".to_owned()
        } else {
            match &self {
                DashboardError::Outbox(error) => outbox::error_chain(error),
                other => other.to_string(),
            }
        };
        (status, layout::error_page(status, &message)).into_response()
    }
}

/// Result alias of handlers.
pub(crate) type Result<T, E = DashboardError> = std::result::Result<T, E>;
