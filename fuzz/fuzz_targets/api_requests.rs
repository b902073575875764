//! Arbitrary bodies on every route of the HTTP API that takes one — the clinical JSON
//! operations, the national-id search, bulk loads (NDJSON and FHIR transactions), the admin
//! bundle import and the offered roster — through the real router
//! with a valid token: a typed 4xx or a success, never a panic or a 5xx.
#![no_main]

mod common;

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, header};
use estuary_node::api::{ApiState, router};
use estuary_node::config::{ApiConfig, AppToken, Config, NetworkConfig, Scope};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const WRITER: &str = "writer-token-0123456789abcdef0123456789";
const ADMIN: &str = "admin-token-0123456789abcdef01234567890";

struct Api {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    _stop: tokio::sync::watch::Sender<bool>,
}

fn api() -> &'static Api {
    static API: OnceLock<Api> = OnceLock::new();
    API.get_or_init(|| {
        let member = common::member();
        let config = Config {
            data_dir: member.config.data_dir.clone(),
            authority: member.config.authority.to_string(),
            roster: None,
            store: Default::default(),
            network: NetworkConfig::default(),
            api: ApiConfig {
                admin_token: ADMIN.into(),
                body_bytes_max: 64 * 1024,
                apps: vec![AppToken {
                    name: "emr".into(),
                    token: WRITER.into(),
                    scope: Scope::ReadWrite,
                }],
                ..ApiConfig::default()
            },
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let state = ApiState::new(member.node.clone(), None, Arc::new(config), stopped);
        Api {
            runtime,
            router: router(state),
            _stop: stop,
        }
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&route, body)) = input.split_first() else {
        return;
    };
    let file = common::member().file;
    let (path, token, content_type) = match route % 11 {
        0 => ("/v1/health-files".to_owned(), WRITER, "application/json"),
        1 => (
            format!("/v1/health-files/{file}/operations"),
            WRITER,
            "application/json",
        ),
        2 => (
            "/v1/health-files/search".to_owned(),
            WRITER,
            "application/json",
        ),
        3 => ("/v1/referrals".to_owned(), WRITER, "application/json"),
        4 => (
            format!("/v1/referrals/{file}/operations"),
            WRITER,
            "application/json",
        ),
        5 => (
            "/fhir/Patient/_search".to_owned(),
            WRITER,
            "application/x-www-form-urlencoded",
        ),
        6 => (
            "/admin/quarantine/purge".to_owned(),
            ADMIN,
            "application/json",
        ),
        7 => ("/admin/roster".to_owned(), ADMIN, "application/cbor"),
        8 => ("/v1/import".to_owned(), WRITER, "application/x-ndjson"),
        9 => ("/fhir".to_owned(), WRITER, "application/fhir+json"),
        _ => (
            "/admin/import".to_owned(),
            ADMIN,
            "application/octet-stream",
        ),
    };
    let api = api();
    let request = Request::post(&path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body.to_vec()))
        .expect("a request");
    let status = api
        .runtime
        .block_on(api.router.clone().oneshot(request))
        .expect("the router answers")
        .status();
    assert!(!status.is_server_error(), "{path} answered {status}");
});
