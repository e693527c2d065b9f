//! What the server answers: an HTTP [`Reply`] (every body is JSON), Google's error
//! shape for the APIs it plays ([`ApiError`], a `google.rpc.Status`:
//! <https://cloud.google.com/apis/design/errors>), and the [`Refusal`] a test can make
//! publishes answer with.
//!
//! It uses no other module of the crate (see the layering in the crate docs), so every
//! module above can answer with these.

use serde_json::{Value, json};

/// An HTTP answer; every body this server sends is JSON.
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: Value,
    pub(crate) headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub(crate) fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            body,
            headers: Vec::new(),
        }
    }

    pub(crate) fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }
}

/// A `google.rpc.Status` error: `{"error": {"code", "message", "status"}}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) code: u16,
    pub(crate) message: String,
    headers: Vec<(&'static str, String)>,
    /// Google's `status` when the HTTP code alone does not say it (409 is
    /// both ALREADY_EXISTS and ABORTED).
    status: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn new(code: u16, message: String) -> ApiError {
        ApiError {
            code,
            message,
            headers: Vec::new(),
            status: None,
        }
    }

    /// 409 ABORTED: a transient conflict, to be retried (Google's error
    /// table maps ABORTED to HTTP 409, like ALREADY_EXISTS).
    pub(crate) fn aborted() -> ApiError {
        ApiError {
            status: Some("ABORTED"),
            ..ApiError::new(
                409,
                "The operation was aborted (pubsub-test-server abort_next_creates).".into(),
            )
        }
    }

    /// What a caller whose role lacks `pubsub.topics.create` gets, whether or
    /// not the topic exists.
    pub(crate) fn topic_create_denied() -> ApiError {
        ApiError::new(403, "User not authorized to perform this action.".into())
    }

    pub(crate) fn refused(refusal: Refusal) -> ApiError {
        ApiError {
            status: Some(refusal.status),
            ..ApiError::new(refusal.code, refusal.message.into())
        }
    }

    /// A publish stored, whose answer the client never gets.
    pub(crate) fn answer_lost() -> ApiError {
        ApiError::new(
            503,
            "The service is currently unavailable (pubsub-test-server lose_next_publish_answers: \
             the messages were stored)."
                .into(),
        )
    }

    pub(crate) fn invalid(message: String) -> ApiError {
        ApiError::new(400, message)
    }

    /// The real service names only the resource ID in NOT_FOUND messages.
    pub(crate) fn not_found(id: &str) -> ApiError {
        ApiError::new(404, format!("Resource not found (resource={id})."))
    }

    pub(crate) fn already_exists(id: &str) -> ApiError {
        ApiError::new(
            409,
            format!("Resource already exists in the project (resource={id})."),
        )
    }

    pub(crate) fn method_not_allowed(method: &str, allow: &'static str) -> ApiError {
        let mut e = ApiError::new(
            405,
            format!("HTTP method {method} is not allowed here; allowed: {allow}."),
        );
        e.headers.push(("Allow", allow.to_owned()));
        e
    }

    /// For features the real service has but this server does not model: refusing
    /// loudly beats pretending, since delivery would silently differ.
    pub(crate) fn not_emulated(what: &str) -> ApiError {
        ApiError::invalid(format!("{what} is not emulated by pubsub-test-server."))
    }

    pub(crate) fn unauthenticated(missing: bool, reason: &str) -> ApiError {
        let lead = if missing {
            "Request is missing required authentication credential."
        } else {
            "Request had invalid authentication credentials."
        };
        let mut e = ApiError::new(
            401,
            format!(
                "{lead} Expected OAuth 2 access token, login cookie or other valid \
                 authentication credential. See \
                 https://developers.google.com/identity/sign-in/web/devconsole-project. \
                 (pubsub-test-server: {reason})"
            ),
        );
        let challenge = if missing {
            "Bearer realm=\"https://accounts.google.com/\"".to_owned()
        } else {
            "Bearer realm=\"https://accounts.google.com/\", error=\"invalid_token\"".to_owned()
        };
        e.headers.push(("WWW-Authenticate", challenge));
        e
    }

    /// The error `fail_next` injects, with the message Google sends for that status.
    pub(crate) fn injected(code: u16) -> ApiError {
        let message = match code {
            429 => "Resource has been exhausted (e.g. check quota).",
            500 => "Internal error encountered.",
            503 => "The service is currently unavailable.",
            504 => "The request deadline was exceeded.",
            _ => "Injected failure (pubsub-test-server fail_next).",
        };
        ApiError::new(code, message.to_owned())
    }

    pub(crate) fn into_reply(self) -> Reply {
        let mut reply = Reply::json(
            self.code,
            json!({"error": {
                "code": self.code,
                "message": self.message,
                "status": self.status.unwrap_or(status_name(self.code)),
            }}),
        );
        reply.headers = self.headers;
        reply
    }
}

/// The canonical `google.rpc.Code` name Google pairs with an HTTP status.
fn status_name(code: u16) -> &'static str {
    match code {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        // No RPC code means "wrong HTTP method"; UNIMPLEMENTED is the closest real one,
        // so clients that parse `status` as a google.rpc.Code still can.
        405 | 501 => "UNIMPLEMENTED",
        409 => "ALREADY_EXISTS",
        412 => "FAILED_PRECONDITION",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        500 => "INTERNAL",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "UNKNOWN",
    }
}

/// An error for [`crate::PubSubTestServer::refuse_publishes`] to answer with:
/// Google's HTTP code and `status`, and a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub status: &'static str,
    pub message: &'static str,
}

impl Refusal {
    /// What a project without billing gets (code and status per Google's
    /// error table; the wording is a stand-in, not Google's).
    pub const BILLING_DISABLED: Refusal = Refusal {
        code: 400,
        status: "FAILED_PRECONDITION",
        message: "Billing is disabled for this project (pubsub-test-server stand-in wording).",
    };
    /// What a role without `pubsub.topics.publish` gets.
    pub const PERMISSION_DENIED: Refusal = Refusal {
        code: 403,
        status: "PERMISSION_DENIED",
        message: "User not authorized to perform this action.",
    };
    /// A request the service can never take as it is.
    pub const INVALID_ARGUMENT: Refusal = Refusal {
        code: 400,
        status: "INVALID_ARGUMENT",
        message: "Invalid request (pubsub-test-server refuse_publishes).",
    };
}
