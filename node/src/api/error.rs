//! The API's errors: a status, a stable code apps can match on, and a reason a person can
//! act on. Reasons name fields, rules and limits; never a value an app sent, so no patient
//! data ends up in an app's error log.

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::model::{OpError, ValidationError};
use crate::replica::{IngestError, NodeError};

/// An error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable code.
    pub code: &'static str,
    /// Why, and what to do.
    pub reason: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, reason: impl Into<String>) -> Self {
        Self {
            status,
            code,
            reason: reason.into(),
        }
    }

    /// 400: the request is malformed.
    pub fn bad_request(code: &'static str, reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, reason)
    }

    /// 401: no token, or not one of ours.
    pub fn unauthorized(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", reason)
    }

    /// 403: the token may not do this.
    pub fn forbidden(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", reason)
    }

    /// 404.
    pub fn not_found(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", reason)
    }

    /// 503: a bounded resource is full; retry later.
    pub fn busy(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "busy", reason)
    }

    /// 500: the node failed; its log says why (the response does not).
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the node could not complete the request; its log has the details",
        )
    }

    /// A JSON body that did not parse into the expected shape. serde's own messages may
    /// quote the offending value, so only its position and, for a missing field, the
    /// field's name (from our schema) are passed on; so is a value refused by the model's
    /// own checks (a date, a diagnosis code), whose `ValidationError` names the field and
    /// the rule and never the value.
    pub fn from_json(error: &serde_json::Error) -> Self {
        Self::bad_request(
            "malformed_json",
            crate::import::json_reason(error, "the body"),
        )
    }
}

impl From<NodeError> for ApiError {
    fn from(error: NodeError) -> Self {
        match error {
            NodeError::UnknownDocument(_) => {
                Self::not_found("this node holds no document with that id")
            }
            NodeError::BadCursor => Self::bad_request("bad_cursor", error.to_string()),
            NodeError::AlreadyHeld { .. } => {
                Self::new(StatusCode::CONFLICT, "already_held", error.to_string())
            }
            NodeError::UnknownMember { .. } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_member",
                error.to_string(),
            ),
            NodeError::LinkRefused { .. } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "link_refused",
                error.to_string(),
            ),
            NodeError::RepeatedInLoad { .. } => {
                Self::bad_request("repeated_in_load", error.to_string())
            }
            NodeError::WrongKind {
                expected, found, ..
            } => Self::not_found(format!(
                "the document is a {found}, not a {expected}; use the {found} routes"
            )),
            NodeError::Op(OpError::Invalid(validation)) => Self::from(validation),
            NodeError::Op(OpError::UnknownEntry { .. }) => {
                Self::new(StatusCode::NOT_FOUND, "unknown_entry", error.to_string())
            }
            NodeError::Op(OpError::Full { .. }) => {
                Self::new(StatusCode::CONFLICT, "full", error.to_string())
            }
            NodeError::NotAMember => {
                Self::new(StatusCode::FORBIDDEN, "not_a_member", error.to_string())
            }
            NodeError::Ingest(IngestError::Erased { .. }) => Self::new(
                StatusCode::GONE,
                "erased",
                "the document, or the resident it is about, was erased on the consortium authority's order",
            ),
            NodeError::Ingest(IngestError::QuarantineFull | IngestError::RevokedBacklogFull) => {
                Self::busy(error.to_string())
            }
            // The node's own pipeline refused the change (its reason names rules, not data).
            NodeError::LocalChangeRefused(_) => {
                Self::new(StatusCode::CONFLICT, "refused_by_node", error.to_string())
            }
            other => {
                // Node errors name documents, changes and fields, never patient data.
                tracing::error!(error = %other, "api request failed");
                Self::internal()
            }
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(error: ValidationError) -> Self {
        let reason = error.to_string();
        match error {
            ValidationError::IllegalTransition { .. } | ValidationError::EventBase { .. } => {
                Self::new(StatusCode::CONFLICT, "illegal_transition", reason)
            }
            ValidationError::NotAuthorised { .. } | ValidationError::Provenance { .. } => {
                Self::new(
                    StatusCode::FORBIDDEN,
                    "not_permitted_for_institution",
                    reason,
                )
            }
            _ => Self::bad_request("invalid", reason),
        }
    }
}

impl ApiError {
    /// The error as a FHIR `OperationOutcome`: what a FHIR client expects from `/fhir`. The
    /// stable code is the issue's `details` coding (system `urn:estuary:error`); the reason
    /// its text.
    pub fn operation_outcome(&self) -> serde_json::Value {
        // The FHIR issue type closest to each status (FHIR R4 `issue-type`).
        let issue_type = match self.status {
            StatusCode::BAD_REQUEST => "invalid",
            StatusCode::UNAUTHORIZED => "login",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::NOT_FOUND => "not-found",
            StatusCode::METHOD_NOT_ALLOWED => "not-supported",
            StatusCode::CONFLICT => "conflict",
            StatusCode::GONE => "deleted",
            StatusCode::PAYLOAD_TOO_LARGE => "too-costly",
            StatusCode::UNPROCESSABLE_ENTITY => "processing",
            StatusCode::SERVICE_UNAVAILABLE => "transient",
            status if status.is_client_error() => "invalid",
            _ => "exception",
        };
        serde_json::json!({
            "resourceType": "OperationOutcome",
            "issue": [{
                "severity": "error",
                "code": issue_type,
                "details": {
                    "coding": [{ "system": ERROR_CODE_SYSTEM, "code": self.code }],
                    "text": self.reason,
                },
            }],
        })
    }

    /// The response: `{"error": {code, reason}}`, or, for a `/fhir` request, an
    /// `OperationOutcome` (`fhir_errors` rewrites it on the way out).
    fn response(&self, body: serde_json::Value, content_type: &'static str) -> Response {
        let mut response = (
            self.status,
            [(axum::http::header::CONTENT_TYPE, content_type)],
            body.to_string(),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// The system of the stable error codes in an `OperationOutcome`.
pub const ERROR_CODE_SYSTEM: &str = "urn:estuary:error";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "code": self.code, "reason": self.reason }
        });
        let mut response = self.response(body, "application/json");
        // Kept for `fhir_errors`, which answers a FHIR client in its own terms.
        response.extensions_mut().insert(self);
        response
    }
}

/// Rewrites every error answered to a `/fhir` request — from a handler, an extractor, the
/// token check or the router's fallbacks — as an `OperationOutcome`.
pub(super) async fn fhir_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let fhir = request.uri().path() == "/fhir" || request.uri().path().starts_with("/fhir/");
    let response = next.run(request).await;
    match response.extensions().get::<ApiError>() {
        Some(error) if fhir => error.response(error.operation_outcome(), "application/fhir+json"),
        _ => response,
    }
}

/// A JSON body read within the body limit and parsed with [`ApiError::from_json`].
pub struct JsonBody<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let RawBody(bytes) = RawBody::from_request(request, state).await?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::from_json(&e))
    }
}

/// A body read within the route's limit, with JSON errors for a body too large or unreadable.
pub struct RawBody(pub axum::body::Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        axum::body::Bytes::from_request(request, state)
            .await
            .map(RawBody)
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        "the body is larger than this route's limit (api.body_bytes_max, or 8 MiB for an import chunk)",
                    )
                } else {
                    ApiError::bad_request("unreadable_body", "the request body could not be read")
                }
            })
    }
}

/// A form body (`application/x-www-form-urlencoded`, as FHIR's search by POST sends its
/// parameters), with reasons that do not quote it when it does not parse.
pub struct FormBody<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for FormBody<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        axum::Form::<T>::from_request(request, state)
            .await
            .map(|form| FormBody(form.0))
            .map_err(|rejection| match rejection.status() {
                StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "send the parameters as application/x-www-form-urlencoded",
                ),
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the body is larger than this route's limit (api.body_bytes_max)",
                ),
                _ => ApiError::bad_request(
                    "malformed_form",
                    "the form's parameters do not match this route's (see node/openapi.json)",
                ),
            })
    }
}

/// Query parameters, with a reason that does not quote them when they do not parse.
pub struct QueryParams<T>(pub T);

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|query| QueryParams(query.0))
            .map_err(|_| {
                ApiError::bad_request(
                    "malformed_query",
                    "the query parameters do not match this route's (see node/openapi.json)",
                )
            })
    }
}
