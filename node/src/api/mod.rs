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
//! - `/metrics` (Prometheus text) and `/health` carry no patient data and need no token.
//!
//! Every read and write of patient data is written to the node's hash-chained audit log with
//! the app's name before the response leaves. Errors are JSON `{"error": {"code", "reason"}}`
//! with a stable code; reasons name fields and rules, never values an app sent.
//!
//! The route table ([`routes`]) is the single list the router is built from; the OpenAPI
//! description in `node/openapi.json` is checked against it by a test.

mod admin;
mod clinical;
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
use axum::response::Response;
use axum::routing::MethodRouter;
use tokio::sync::{Semaphore, watch};

pub use error::ApiError;
pub use fhir::instant;

use crate::config::{Config, Scope};
use crate::model::{Editor, Timestamp};
use crate::node::Node;
use crate::sync::StatsReader;

/// Change-feed subscribers served at once; more get 503 until one leaves.
pub const FEED_SUBSCRIBERS_MAX: usize = 64;
/// Largest body of an import request (a chunk of envelopes), in bytes.
pub const IMPORT_BODY_BYTES_MAX: usize = 8 * 1024 * 1024;
/// The name audit records carry for reads made with the admin token.
pub const ADMIN_APP: &str = "estuary-admin";

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiState {
    node: Arc<Node>,
    sync: Option<StatsReader>,
    config: Arc<Config>,
    requests: Arc<Semaphore>,
    feeds: Arc<Semaphore>,
    metrics: Arc<metrics::ApiMetrics>,
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
        Self {
            requests: Arc::new(Semaphore::new(config.api.concurrency_max)),
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
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("send `Authorization: Bearer <token>`"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| {
                let (scheme, token) = h.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(token.trim())
            })
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
            })?;
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
    routes
}

/// The router: every route, JSON errors for unknown paths, the body limit, and the
/// concurrency limit and request metrics around every request.
pub fn router(state: ApiState) -> Router {
    let mut router = Router::new();
    for route in routes() {
        let handler = if route.path == "/admin/import" {
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
        .layer(axum::middleware::from_fn_with_state(state.clone(), admit))
        .with_state(state)
}

/// Waits for one of the concurrent-request slots, runs the request, counts it.
async fn admit(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = request.method().clone();
    // The semaphore is never closed.
    let _slot = state.requests.acquire().await;
    let response = next.run(request).await;
    let status = response.status();
    state.metrics.record(status, started.elapsed());
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
