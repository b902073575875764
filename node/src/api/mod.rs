//! The node's HTTP API (axum): clinical apps read and write the local replica; the `estuary`
//! command inspects and administers the node.
//!
//! - `/v1/…`: health files, referrals, worklists, conflicts, history and the change feed
//!   (Server-Sent Events), for apps with a bearer token of scope `read` or `read-write`.
//! - `/fhir/…`: FHIR R4 read views (Patient, ServiceRequest, AllergyIntolerance, Condition,
//!   Observation), same tokens.
//! - Residents are searched by POST (`/v1/health-files/search`, `/fhir/Patient/_search`), so
//!   that names and national ids stay out of URLs; the GET name searches remain, deprecated.
//! - `/admin/…`: status, sync figures, quarantine, audit, verify, export and import, for the
//!   admin token only.
//! - `/dashboard`: a web page for operators (static code embedded in the binary); its
//!   figures come from `/admin/dashboard` and the change feed with the admin token.
//! - `/health` needs no token; with `?challenge=<nonce>` it also proves, by the node key's
//!   signature, that this node is the process answering ([`Challenge`]), so the `estuary`
//!   command sends its token nowhere else.
//! - `/metrics` (Prometheus text) carries no patient data. It needs the admin token unless
//!   `api.metrics_token_required` is false; then callers without a token get every figure
//!   except those that move with clinical reads.
//! - `/health` and `/metrics` have slots of their own ([`HEALTH_REQUESTS_IN_FLIGHT_MAX`],
//!   [`METRICS_REQUESTS_IN_FLIGHT_MAX`]; beyond them 503), apart from `api.concurrency_max`,
//!   so scrapers and clinical requests cannot hold up each other.
//!
//! Every read and write of patient data is written to the node's hash-chained audit log with
//! the app's name before the response leaves. Errors are JSON `{"error": {"code", "reason"}}`
//! with a stable code; reasons name fields and rules, never values an app sent.
//!
//! The route table ([`routes`]) is the single list the router is built from; the OpenAPI
//! description in `node/openapi.json` is checked against it by a test.

mod admin;
mod challenge;
mod clinical;
pub mod dashboard;
mod error;
mod fhir;
mod metrics;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use tokio::sync::{Semaphore, watch};

pub use challenge::{CHALLENGE_NONCE_BYTES, Challenge, ChallengeError, answer as answer_challenge};
pub use error::ApiError;
pub use fhir::instant;

use crate::config::{Config, Scope};
use crate::model::{Editor, Timestamp};
use crate::replica::Node;
use crate::sync::StatsReader;

/// Change-feed subscribers served at once; more get 503 until one leaves.
pub const FEED_SUBSCRIBERS_MAX: usize = 64;
/// Largest body of an import request (a chunk of envelopes, or of residents' records), in
/// bytes.
pub const IMPORT_BODY_BYTES_MAX: usize = 8 * 1024 * 1024;
/// The routes whose bodies may be as large as [`IMPORT_BODY_BYTES_MAX`].
const IMPORT_ROUTES: &[&str] = &["/admin/import", "/v1/import", "/fhir"];
/// The name audit records carry for reads made with the admin token.
pub const ADMIN_APP: &str = "estuary-admin";
/// `/health` requests served at once; more get 503 at once. A probe answers in
/// microseconds, so a few slots are plenty, and they are apart from the clinical slots so that
/// a busy node still answers its health checks.
pub const HEALTH_REQUESTS_IN_FLIGHT_MAX: usize = 4;
/// `/metrics` requests served at once; more get 503 at once. A scraper asks every few
/// seconds, so a few slots are plenty, and they are apart from the clinical slots so that
/// scrapers cannot make clinical requests wait.
pub const METRICS_REQUESTS_IN_FLIGHT_MAX: usize = 4;

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiState {
    node: Arc<Node>,
    sync: Option<StatsReader>,
    config: Arc<Config>,
    requests: Arc<Semaphore>,
    health_requests: Arc<Semaphore>,
    metrics_requests: Arc<Semaphore>,
    feeds: Arc<Semaphore>,
    metrics: Arc<metrics::ApiMetrics>,
    dashboard: dashboard::SharedHistory,
    started: Instant,
    shutdown: watch::Receiver<bool>,
}

impl ApiState {
    /// The state for a node; `sync` is absent when the node runs without a network layer.
    /// `shutdown` turning true ends open change feeds, so a graceful shutdown is not held
    /// up by apps that follow the feed.
    pub fn new(
        node: Arc<Node>,
        sync: Option<StatsReader>,
        config: Arc<Config>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let history = dashboard::SharedHistory::default();
        // The dashboard's sampler runs as long as the API (where a runtime is running it).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(dashboard::sample(
                node.clone(),
                sync.clone(),
                history.clone(),
                shutdown.clone(),
            ));
        }
        Self {
            dashboard: history,
            requests: Arc::new(Semaphore::new(config.api.concurrency_max)),
            health_requests: Arc::new(Semaphore::new(HEALTH_REQUESTS_IN_FLIGHT_MAX)),
            metrics_requests: Arc::new(Semaphore::new(METRICS_REQUESTS_IN_FLIGHT_MAX)),
            feeds: Arc::new(Semaphore::new(FEED_SUBSCRIBERS_MAX)),
            node,
            sync,
            config,
            metrics: Arc::default(),
            started: Instant::now(),
            shutdown,
        }
    }

    /// The editor for a write made now at this node.
    fn editor(&self) -> Editor {
        Editor {
            institution: self.node.institution().clone(),
            at: Timestamp(crate::audit::now_ms()),
        }
    }
}

/// Who is calling, from the bearer token.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The app's name (the admin token reads as [`ADMIN_APP`]).
    pub app: String,
    /// What it may do.
    pub scope: Scope,
    /// Whether it holds the admin token.
    pub admin: bool,
}

impl Caller {
    fn require_write(&self) -> Result<(), ApiError> {
        match self.scope {
            Scope::ReadWrite => Ok(()),
            Scope::Read => Err(ApiError::forbidden(
                "this token has the read scope; writes need a read-write token",
            )),
        }
    }

    fn require_admin(&self) -> Result<(), ApiError> {
        if self.admin {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "admin routes need the admin token from the node's config",
            ))
        }
    }
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers)?
            .ok_or_else(|| ApiError::unauthorized("send `Authorization: Bearer <token>`"))?;
        if state.config.is_admin(token) {
            return Ok(Caller {
                app: ADMIN_APP.into(),
                scope: Scope::Read,
                admin: true,
            });
        }
        let app = state.config.app_of(token).ok_or_else(|| {
            ApiError::unauthorized("the token is not one this node's config lists")
        })?;
        Ok(Caller {
            app: app.name.clone(),
            scope: app.scope,
            admin: false,
        })
    }
}

/// The bearer token of a request, `None` without an Authorization header.
fn bearer_token(headers: &axum::http::HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(header) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    header
        .to_str()
        .ok()
        .and_then(|h| {
            let (scheme, token) = h.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
        .map(Some)
        .ok_or_else(|| ApiError::unauthorized("the Authorization header must be `Bearer <token>`"))
}

/// A caller whose token may write; checked before the body is read.
pub struct Writer(pub Caller);

impl FromRequestParts<ApiState> for Writer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        caller.require_write()?;
        Ok(Writer(caller))
    }
}

/// A caller that may load residents' records in bulk: an app with a read-write token, or
/// the admin token (institution IT loading a member's records with `estuary import`).
/// Checked before the body is read.
pub struct Loader(pub Caller);

impl FromRequestParts<ApiState> for Loader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        if !caller.admin {
            caller.require_write()?;
        }
        Ok(Loader(caller))
    }
}

/// A caller holding the admin token; checked before the body is read.
pub struct Admin(pub Caller);

impl FromRequestParts<ApiState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        caller.require_admin()?;
        Ok(Admin(caller))
    }
}

/// One route: its method and path as the OpenAPI description names them, and its handler.
pub struct Route {
    /// `GET` or `POST`.
    pub method: &'static str,
    /// The path, with `{parameters}`.
    pub path: &'static str,
    handler: MethodRouter<ApiState>,
}

impl Route {
    fn get<H, T>(path: &'static str, handler: H) -> Self
    where
        H: axum::handler::Handler<T, ApiState>,
        T: 'static,
    {
        Self {
            method: "GET",
            path,
            handler: axum::routing::get(handler),
        }
    }

    fn post<H, T>(path: &'static str, handler: H) -> Self
    where
        H: axum::handler::Handler<T, ApiState>,
        T: 'static,
    {
        Self {
            method: "POST",
            path,
            handler: axum::routing::post(handler),
        }
    }
}

/// Every route the API serves.
pub fn routes() -> Vec<Route> {
    let mut routes = vec![
        Route::get("/health", metrics::health),
        Route::get("/metrics", metrics::metrics),
    ];
    routes.extend(clinical::routes());
    routes.extend(fhir::routes());
    routes.extend(admin::routes());
    routes.extend(dashboard::routes());
    routes
}

/// The router: every route, JSON errors for unknown paths, the body limit, and the
/// concurrency limit and request metrics around every request.
pub fn router(state: ApiState) -> Router {
    let mut router = Router::new();
    for route in routes() {
        let handler = if IMPORT_ROUTES.contains(&route.path) {
            route
                .handler
                .layer(DefaultBodyLimit::max(IMPORT_BODY_BYTES_MAX))
        } else {
            route.handler
        };
        router = router.route(route.path, handler);
    }
    router
        .fallback(|| async { ApiError::not_found("no such route; see node/openapi.json") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method; see node/openapi.json",
            )
        })
        .layer(DefaultBodyLimit::max(state.config.api.body_bytes_max))
        .layer(axum::middleware::from_fn(error::fhir_errors))
        .layer(axum::middleware::from_fn_with_state(state.clone(), admit))
        .with_state(state)
}

/// Takes one of the request's slots — waiting for a clinical one, or refusing with 503 when
/// `/health` or `/metrics` has none free — runs the request, counts it.
async fn admit(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = request.method().clone();
    let monitoring = match route.as_str() {
        "/health" => Some(&state.health_requests),
        "/metrics" => Some(&state.metrics_requests),
        _ => None,
    };
    let _slot = match monitoring {
        // A monitor retries on its own schedule; queueing its requests would only pile them up.
        Some(slots) => match slots.try_acquire() {
            Ok(slot) => Some(slot),
            Err(_) => {
                let response = ApiError::busy(
                    "this route's few request slots are all in use; retry in a moment",
                )
                .into_response();
                state
                    .metrics
                    .record(&method, &route, response.status(), started.elapsed());
                return response;
            }
        },
        // The semaphore is never closed.
        None => state.requests.acquire().await.ok(),
    };
    let response = next.run(request).await;
    let status = response.status();
    state
        .metrics
        .record(&method, &route, status, started.elapsed());
    // The matched route, never the URI: query strings may carry names.
    tracing::debug!(%method, route, status = status.as_u16(), "api request");
    response
}

/// Serves the API on `listener` until `shutdown` completes; requests in flight finish first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Runs blocking node work on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| ApiError::internal())?
}

/// Counts the requests served, by status class.
#[derive(Default)]
struct Counter(AtomicU64);

impl Counter {
    fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::StatusCode;
    use tower::ServiceExt;

    use super::*;
    use crate::config::{ApiConfig, NetworkConfig};

    /// How long a request that must not wait may take on a loaded machine.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// A one-member node behind an API with a single clinical slot.
    fn state(dir: &std::path::Path) -> ApiState {
        let (node, node_config) = crate::replica::tests::one_member_node(dir);
        let (data_dir, authority) = (node_config.data_dir, node_config.authority);
        let config = Config {
            data_dir,
            authority: authority.to_string(),
            roster: None,
            store: Default::default(),
            network: NetworkConfig::default(),
            api: ApiConfig {
                admin_token: "admin-token-0123456789abcdef01234567890".into(),
                concurrency_max: 1,
                metrics_token_required: false,
                ..ApiConfig::default()
            },
        };
        // The sender is dropped: no change feed runs in this test.
        let (_, stopped) = watch::channel(false);
        ApiState::new(Arc::new(node), None, Arc::new(config), stopped)
    }

    async fn get(router: &Router, path: &str) -> StatusCode {
        let request = axum::http::Request::get(path).body(Body::empty()).unwrap();
        tokio::time::timeout(PATIENCE, router.clone().oneshot(request))
            .await
            .unwrap_or_else(|_| panic!("GET {path} waited for a slot"))
            .unwrap()
            .status()
    }

    #[tokio::test]
    async fn health_and_metrics_have_slots_of_their_own_and_refuse_when_they_are_full() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path());
        let router = router(state.clone());

        // Every clinical slot taken: health checks and scrapes are still answered.
        let clinical = state.requests.try_acquire_many(1).unwrap();
        assert_eq!(get(&router, "/health").await, StatusCode::OK);
        assert_eq!(get(&router, "/metrics").await, StatusCode::OK);
        drop(clinical);

        // Every /health slot taken: /health is refused at once, /metrics still answers.
        let health = state
            .health_requests
            .try_acquire_many(HEALTH_REQUESTS_IN_FLIGHT_MAX as u32)
            .unwrap();
        assert_eq!(
            get(&router, "/health").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(get(&router, "/metrics").await, StatusCode::OK);
        drop(health);
        assert_eq!(get(&router, "/health").await, StatusCode::OK);

        // Every /metrics slot taken: /metrics is refused at once, /health still answers.
        let metrics = state
            .metrics_requests
            .try_acquire_many(METRICS_REQUESTS_IN_FLIGHT_MAX as u32)
            .unwrap();
        assert_eq!(
            get(&router, "/metrics").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(get(&router, "/health").await, StatusCode::OK);
        drop(metrics);
        assert_eq!(get(&router, "/metrics").await, StatusCode::OK);
    }
}
