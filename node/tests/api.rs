//! The HTTP API in process: the router the node serves, driven request by request against a
//! real node on a real sled directory.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use estuary_node::api::{ApiState, Challenge, ChallengeError, router, routes};
use estuary_node::config::{ApiConfig, AppToken, Config, NetworkConfig, Scope};
use estuary_node::identity::Identity;
use estuary_node::membership::SignedRoster;
use estuary_node::model::*;
use estuary_node::replica::{Node, NodeConfig};
use futures::StreamExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const WRITER: &str = "writer-token-0123456789abcdef0123456789";
const READER: &str = "reader-token-0123456789abcdef0123456789";
const ADMIN: &str = "admin-token-0123456789abcdef01234567890";
/// The core hospital's node key (secret), for referrals it sends this centre.
const CORE: [u8; 32] = [7; 32];

struct Api {
    router: axum::Router,
    node: Arc<Node>,
    _stop: tokio::sync::watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

/// A node for `chc-a` in a roster that also lists the core hospital, behind its API.
fn api() -> Api {
    api_with(|_| {})
}

/// [`api`] with its config changed by `adjust`.
fn api_with(adjust: impl FnOnce(&mut Config)) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("node");
    std::fs::create_dir_all(&data_dir).unwrap();
    let key = Identity::load_or_create(&data_dir).unwrap().public_key();
    let authority = Identity::from_secret(AUTHORITY);
    let by = editor("chc-a");
    let mut roster = Roster::create(&authority.actor(), &by).unwrap();
    add_member(
        &mut roster,
        &by,
        "chc-a",
        InstitutionKind::CommunityCentre,
        key,
    );
    add_member(
        &mut roster,
        &by,
        "core",
        InstitutionKind::CoreHospital,
        Identity::from_secret(CORE).public_key(),
    );
    add_member(
        &mut roster,
        &by,
        "district",
        InstitutionKind::DistrictHospital,
        Bytes32([8; 32]),
    );
    let signed = SignedRoster::sign(&authority, &mut roster).encode();
    let node = Arc::new(
        Node::open(
            &NodeConfig {
                data_dir: data_dir.clone(),
                authority: authority.public_key(),
                store_engine: Default::default(),
            },
            Some(&signed),
        )
        .unwrap(),
    );
    let config = Config {
        data_dir,
        authority: authority.public_key().to_string(),
        roster: None,
        store: Default::default(),
        network: NetworkConfig::default(),
        api: ApiConfig {
            admin_token: ADMIN.into(),
            body_bytes_max: 64 * 1024,
            apps: vec![
                AppToken {
                    name: "emr".into(),
                    token: WRITER.into(),
                    scope: Scope::ReadWrite,
                },
                AppToken {
                    name: "dashboard".into(),
                    token: READER.into(),
                    scope: Scope::Read,
                },
            ],
            ..ApiConfig::default()
        },
    };
    let mut config = config;
    adjust(&mut config);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let state = ApiState::new(node.clone(), None, Arc::new(config), stopped);
    Api {
        router: router(state),
        node,
        _stop: stop,
        _dir: dir,
    }
}

/// Whether an answer is FHIR JSON (every answer under `/fhir`, errors included).
fn is_fhir(response: &axum::response::Response) -> bool {
    response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|kind| kind.starts_with("application/fhir+json"))
}

/// Every FHIR answer any test receives must validate against the official R4 JSON schema.
fn fhir_valid(method: &str, path: &str, answer: &Value) {
    if let Err(error) = schema::check_fhir(answer) {
        panic!("{method} {path} answered FHIR that R4's schema refuses: {error}\n{answer:#}");
    }
}

impl Api {
    async fn call(&self, method: &str, path: &str, token: &str, body: &str) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let fhir = is_fhir(&response);
        let bytes = axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024)
            .await
            .unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if fhir {
            fhir_valid(method, path, &value);
        }
        (status, value)
    }

    /// A GET with the given token, or none; the status and the body as text.
    async fn get_text(&self, path: &str, token: Option<&str>) -> (StatusCode, String) {
        let mut request = Request::builder().method("GET").uri(path);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = self
            .router
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024)
            .await
            .unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    /// A request with a form body, as FHIR's search by POST sends it.
    async fn call_form(&self, path: &str, token: &str, form: &str) -> (StatusCode, Value) {
        let request = Request::builder()
            .method("POST")
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(form.to_owned()))
            .unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let fhir = is_fhir(&response);
        let bytes = axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024)
            .await
            .unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if fhir {
            fhir_valid("POST", path, &value);
        }
        (status, value)
    }

    /// Reads recorded in the audit log under `app`.
    fn reads_by(&self, app: &str) -> usize {
        self.node
            .audit(1, 1_000)
            .unwrap()
            .iter()
            .filter(|r| {
                r.app.as_deref() == Some(app) && r.action == estuary_node::audit::AuditAction::Read
            })
            .count()
    }

    /// A FHIR search of `resource` for one patient, as the reader app.
    async fn fhir_search(&self, resource: &str, patient: &str) -> serde_json::Value {
        let (status, bundle) = self
            .call(
                "GET",
                &format!("/fhir/{resource}?patient={patient}"),
                READER,
                "",
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{bundle}");
        bundle
    }

    async fn register(&self, given: &str) -> String {
        let (status, written) = self
            .call(
                "POST",
                "/v1/health-files",
                WRITER,
                &json!({
                    "name": { "family": "Lu", "given": given },
                    "sex": "male",
                    "birth_date": "1954-10-17",
                    "national_id": "310230195410170433",
                })
                .to_string(),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{written}");
        written["id"].as_str().unwrap().to_owned()
    }

    /// Sends a referral of `patient` from this node's institution to the core hospital;
    /// returns its id.
    async fn refer(&self, patient: &str, urgency: &str, direction: &str) -> String {
        let (status, created) = self
            .call(
                "POST",
                "/v1/referrals",
                WRITER,
                &json!({
                    "patient": patient, "direction": direction, "to": "core",
                    "reason": "review", "urgency": urgency, "handover": "",
                })
                .to_string(),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        created["id"].as_str().unwrap().to_owned()
    }
}

/// A referral the core hospital sends this centre, every change of it signed by the core's
/// node and ingested here, with the moves `moves` made at the centre's desk: a desk's
/// receiving side without a second node.
fn referral_from_core(api: &Api, patient: &str, moves: &[ReferralOp]) -> String {
    // Each one its own document: the reason tells them apart.
    static SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let core = Identity::from_secret(CORE);
    let new = NewReferral {
        patient: DocumentId::parse(patient).unwrap(),
        direction: Direction::Down,
        to: institution("chc-a"),
        reason: format!(
            "recovery after a stroke, referral {n}",
            n = SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ),
        urgency: Urgency::Routine,
        handover: "rehabilitation twice a week".into(),
    };
    let mut referral = Referral::create(&core.actor(), &editor("core"), &new).unwrap();
    // The centre answers, here written as its desk would (the envelopes are signed by the
    // centre's own key, which the roster names).
    let centre = Identity::load_or_create(&api._dir.path().join("node")).unwrap();
    let id = referral.id();
    let mut doc = referral.automerge().clone();
    let mut envelopes: Vec<Vec<u8>> = doc
        .get_changes(&[])
        .into_iter()
        .map(|mut c| estuary_node::envelope::Envelope::sign(&core, id, &mut c).encode())
        .collect();
    let mut desk = Referral::load(&referral.save(), &centre.actor()).unwrap();
    for (n, op) in moves.iter().enumerate() {
        let heads = desk.automerge().clone().get_heads();
        let at = Editor {
            institution: institution("chc-a"),
            at: Timestamp(2_000 + n as i64),
        };
        desk.apply(&at, op).unwrap();
        let mut doc = desk.automerge().clone();
        envelopes.extend(
            doc.get_changes(&heads)
                .into_iter()
                .map(|mut c| estuary_node::envelope::Envelope::sign(&centre, id, &mut c).encode()),
        );
    }
    drop(referral);
    for envelope in envelopes {
        let outcome = api.node.ingest(&envelope).unwrap();
        assert!(
            matches!(outcome, estuary_node::replica::Ingested::Accepted(_)),
            "{outcome:?}"
        );
    }
    id.to_string()
}

/// A desk that cannot take a resident redirects the referral to another member: the node
/// sends the onward referral, which names the original, and the original moves to
/// redirected; a second attempt after a crash finds the onward referral already sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desk_redirects_a_referral_to_another_member_through_an_onward_referral() {
    let api = api();
    let patient = api.register("Jianguo").await;
    let original = referral_from_core(&api, &patient, &[ReferralOp::Accept]);
    let operations = format!("/v1/referrals/{original}/operations");
    let redirect = |to: &str| json!({"op": "redirect", "args": {"to": to, "reason": "no rehabilitation bed this month"}});
    // Only to a member the roster names, and not back to either side.
    let (status, answer) = api
        .call(
            "POST",
            &operations,
            WRITER,
            &redirect("nowhere").to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["code"], "unknown_member", "{answer}");
    let (status, answer) = api
        .call("POST", &operations, WRITER, &redirect("core").to_string())
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(
        api.node
            .referrals_of(&DocumentId::parse(&patient).unwrap())
            .unwrap()
            .len(),
        1
    );

    let (status, answer) = api
        .described(
            "POST",
            "/v1/referrals/{id}/operations",
            &operations,
            WRITER,
            Some(&redirect("district")),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let onward = answer["onward"]["id"].as_str().unwrap().to_owned();
    let (_, view) = api
        .call("GET", &format!("/v1/referrals/{original}"), READER, "")
        .await;
    assert_eq!(view["view"]["status"], "redirected", "{view}");
    assert_eq!(view["view"]["redirected_to"], "district");
    let (_, sent) = api
        .call("GET", &format!("/v1/referrals/{onward}"), READER, "")
        .await;
    let sent = &sent["view"];
    assert_eq!(sent["from"], "chc-a");
    assert_eq!(sent["to"], "district");
    assert_eq!(sent["redirected_from"], original.as_str());
    assert_eq!(sent["status"], "requested");
    assert_eq!(sent["reason"], view["view"]["reason"]);
    assert_eq!(sent["patient"], patient.as_str());
    // Each on its desk: the onward one at the district hospital's, the original among the
    // centre's redirected ones.
    let (_, desk) = api
        .call("GET", "/v1/referrals?to=district", READER, "")
        .await;
    assert_eq!(ids_of(&desk["results"]), vec![onward.clone()]);
    let (_, desk) = api
        .call(
            "GET",
            "/v1/referrals?to=chc-a&status=redirected",
            READER,
            "",
        )
        .await;
    assert_eq!(ids_of(&desk["results"]), vec![original.clone()]);
    // FHIR: the original's Task is rejected with why and where; the onward request replaces it.
    let (_, task) = api
        .call("GET", &format!("/fhir/Task/{original}"), READER, "")
        .await;
    assert_eq!(task["status"], "rejected");
    assert_eq!(task["businessStatus"]["text"], "redirected");
    assert_eq!(
        task["statusReason"]["text"],
        "redirected by chc-a to district: no rehabilitation bed this month"
    );
    let (_, request) = api
        .call("GET", &format!("/fhir/ServiceRequest/{onward}"), READER, "")
        .await;
    assert_eq!(
        request["replaces"][0]["reference"],
        format!("ServiceRequest/{original}")
    );
    // Redirected is final.
    let (status, _) = api
        .call(
            "POST",
            &operations,
            WRITER,
            &redirect("district").to_string(),
        )
        .await;
    assert_ne!(status, StatusCode::OK);

    // After a crash between the two writes, the onward referral is sent and the original not
    // yet redirected: the second attempt finds it rather than sending another.
    let second = referral_from_core(&api, &patient, &[]);
    let centre = Identity::load_or_create(&api._dir.path().join("node")).unwrap();
    let second_view = api
        .node
        .referral(DocumentId::parse(&second).unwrap())
        .unwrap();
    let sent_before = Referral::create_onward(
        &centre.actor(),
        &editor("chc-a"),
        DocumentId::parse(&second).unwrap(),
        &second_view,
        &institution("district"),
    )
    .unwrap();
    let sent_id = sent_before.id();
    let mut doc = sent_before.automerge().clone();
    for mut change in doc.get_changes(&[]) {
        let envelope = estuary_node::envelope::Envelope::sign(&centre, sent_id, &mut change);
        api.node.ingest(&envelope.encode()).unwrap();
    }
    let (status, answer) = api
        .call(
            "POST",
            &format!("/v1/referrals/{second}/operations"),
            WRITER,
            &redirect("district").to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["onward"]["id"], sent_id.to_string());
    let (_, desk) = api
        .call("GET", "/v1/referrals?to=district", READER, "")
        .await;
    assert_eq!(ids_of(&desk["results"]).len(), 2, "{desk}");
}

/// Every FHIR answer of every test here is checked against the official FHIR R4 JSON schema
/// (`Api::call`). This one makes sure each kind is among them, Appointment in each of its
/// states, and that the check refuses what R4 refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_fhir_answer_validates_against_the_r4_schema() {
    let api = api();
    let before = schema::fhir_checked();
    // A resident with records of every kind (a line of the gen.js data set), loaded in bulk.
    let request = Request::builder()
        .method("POST")
        .uri("/v1/import")
        .header("authorization", format!("Bearer {WRITER}"))
        .header("content-type", "application/x-ndjson")
        .body(Body::from(include_str!("data/resident.json").trim()))
        .unwrap();
    let response = api.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (_, found) = api
        .call_form(
            "/fhir/Patient/_search",
            READER,
            "identifier=310230195410170433",
        )
        .await;
    let patient = found["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let up = api.refer(&patient, "priority", "up").await;
    let slot = |minutes| ReferralOp::Schedule {
        appointment: Timestamp(1_800_000_000_000),
        minutes,
    };
    let booked = referral_from_core(&api, &patient, &[ReferralOp::Accept, slot(Some(30))]);
    let missed = referral_from_core(
        &api,
        &patient,
        &[ReferralOp::Accept, slot(Some(20)), ReferralOp::MarkNoShow],
    );
    let done = referral_from_core(
        &api,
        &patient,
        &[
            ReferralOp::Accept,
            slot(Some(45)),
            ReferralOp::MarkArrived,
            ReferralOp::Complete,
        ],
    );
    let lengthless = referral_from_core(&api, &patient, &[ReferralOp::Accept, slot(None)]);
    let declined = referral_from_core(
        &api,
        &patient,
        &[ReferralOp::Decline {
            reason: "no therapist this month".into(),
        }],
    );

    // Appointments: one per booking whose slot has a length, its status with the referral's.
    let expected = [
        (&booked, "booked", Some(30)),
        (&missed, "noshow", Some(20)),
        (&done, "fulfilled", Some(45)),
    ];
    for (id, status, minutes) in expected {
        let (code, appointment) = api
            .call("GET", &format!("/fhir/Appointment/{id}"), READER, "")
            .await;
        assert_eq!(code, StatusCode::OK, "{appointment}");
        assert_eq!(appointment["status"], status);
        assert_eq!(appointment["minutesDuration"], json!(minutes));
        assert_eq!(
            appointment["basedOn"][0]["reference"],
            format!("ServiceRequest/{id}")
        );
    }
    for id in [&lengthless, &declined, &up] {
        let (code, outcome) = api
            .call("GET", &format!("/fhir/Appointment/{id}"), READER, "")
            .await;
        assert_eq!(code, StatusCode::NOT_FOUND, "{outcome}");
        assert_eq!(outcome["resourceType"], "OperationOutcome");
    }
    let (_, bundle) = api
        .call(
            "GET",
            &format!("/fhir/Appointment?patient={patient}"),
            READER,
            "",
        )
        .await;
    assert_eq!(bundle["total"], 3, "{bundle}");

    // Every other kind of answer, each checked on the way in.
    let mut kinds = BTreeSet::new();
    for path in [
        "/fhir/metadata".to_string(),
        format!("/fhir/Patient/{patient}"),
        format!("/fhir/Patient/{patient}/$everything"),
        format!("/fhir/ServiceRequest/{up}"),
        "/fhir/ServiceRequest?performer=chc-a".into(),
        format!("/fhir/Task/{declined}"),
        format!("/fhir/Task?patient={patient}"),
        "/fhir/Organization".into(),
        "/fhir/Organization/core".into(),
        format!("/fhir/AllergyIntolerance?patient={patient}"),
        format!("/fhir/Condition?patient={patient}"),
        format!("/fhir/MedicationRequest?patient={patient}"),
        format!("/fhir/Encounter?patient={patient}"),
        format!("/fhir/Observation?patient={patient}"),
        format!("/fhir/DiagnosticReport?patient={patient}"),
        format!("/fhir/Patient/{patient}/$everything?_count=2"),
    ] {
        let (code, answer) = api.call("GET", &path, READER, "").await;
        assert_eq!(code, StatusCode::OK, "{path}: {answer}");
        kinds.insert(answer["resourceType"].as_str().unwrap().to_owned());
        for entry in answer["entry"].as_array().into_iter().flatten() {
            kinds.insert(
                entry["resource"]["resourceType"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
    }
    let served: BTreeSet<String> = [
        "Appointment",
        "Bundle",
        "CapabilityStatement",
        "Condition",
        "DiagnosticReport",
        "Encounter",
        "MedicationRequest",
        "Observation",
        "Organization",
        "Patient",
        "ServiceRequest",
        "Task",
    ]
    .map(String::from)
    .into();
    assert!(
        served.is_subset(&kinds),
        "missing: {:?}",
        served.difference(&kinds).collect::<Vec<_>>()
    );
    // Errors are OperationOutcomes, checked too.
    let (code, _) = api.call("GET", "/fhir/Patient/not-an-id", READER, "").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(
        schema::fhir_checked() - before >= 30,
        "the answers were not all checked"
    );

    // The check refuses what R4 refuses.
    let (_, patient_resource) = api
        .call("GET", &format!("/fhir/Patient/{patient}"), READER, "")
        .await;
    let broken = [
        ("gender", json!("unknown-to-r4")),
        ("birthDate", json!("17-10-1954")),
        ("nickname", json!("Lu")),
        ("resourceType", json!("Resident")),
    ];
    for (field, value) in broken {
        let mut wrong = patient_resource.clone();
        wrong[field] = value;
        assert!(schema::check_fhir(&wrong).is_err(), "{field} passed");
    }
}

#[test]
fn every_route_is_described_in_the_openapi_file_and_every_described_route_exists() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap();
    let openapi: Value = serde_json::from_str(&text).unwrap();
    let described: BTreeSet<(String, String)> = openapi["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, methods)| {
            methods
                .as_object()
                .unwrap()
                .keys()
                .map(|method| (method.to_uppercase(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let served: BTreeSet<(String, String)> = routes()
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    let undocumented: Vec<_> = served.difference(&described).collect();
    let missing: Vec<_> = described.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not described: {undocumented:?}"
    );
    assert!(missing.is_empty(), "described but not served: {missing:?}");
}

/// A FHIR client discovers the server without a token: every resource type a `/fhir` route
/// serves is in the CapabilityStatement, and nothing else is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_capability_statement_names_every_resource_served_and_needs_no_token() {
    let api = api();
    let request = Request::builder()
        .method("GET")
        .uri("/fhir/metadata")
        .body(Body::empty())
        .unwrap();
    let response = api.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), 1024 * 1024)
        .await
        .unwrap();
    let statement: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(statement["resourceType"], "CapabilityStatement");
    assert_eq!(statement["fhirVersion"], "4.0.1");
    assert_eq!(statement["kind"], "instance");
    let described: BTreeSet<String> = statement["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["type"].as_str().unwrap().to_owned())
        .collect();
    let served: BTreeSet<String> = routes()
        .iter()
        .filter_map(|r| r.path.strip_prefix("/fhir/"))
        .map(|rest| rest.split('/').next().unwrap().to_owned())
        .filter(|kind| kind != "metadata")
        .collect();
    assert_eq!(described, served);
}

/// The dashboard's page needs no token and holds no figures; its figures need the admin
/// token, name members, peers and documents by id only, and estimate what a disconnected
/// peer lacks from the changes decided since it left. A static copy carries them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_members_lag_and_audit_by_id_and_needs_the_admin_token() {
    use estuary_node::api::dashboard;
    use estuary_node::sync::{PeerStats, SyncStats};

    let api = api();
    let request = Request::builder()
        .uri("/dashboard")
        .body(Body::empty())
        .unwrap();
    let response = api.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    let page = axum::body::to_bytes(response.into_body(), 1024 * 1024)
        .await
        .unwrap();
    let page = String::from_utf8(page.to_vec()).unwrap();
    assert!(page.contains(r#"id="map""#) && page.contains("/admin/dashboard"));
    // Nothing from elsewhere (the SVG namespace is a name, not an address).
    let elsewhere = page.replace("http://www.w3.org/2000/svg", "");
    assert!(!elsewhere.contains("http://") && !elsewhere.contains("https://"));
    assert!(!elsewhere.contains(" src=") && !elsewhere.contains("<link"));

    let (status, _) = api.call("GET", "/admin/dashboard", READER, "").await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "an app token is not the admin's"
    );

    // The core hospital's node was connected, 2 documents apart, then left; this node then
    // registers 3 residents, which it cannot have had.
    let left_at = api.node.audit_sequence();
    for given in ["Jianguo", "Meilan", "Xiaoming"] {
        api.register(given).await;
    }
    let mut stats = SyncStats::default();
    stats.peers.insert(
        "12D3KooWcore".into(),
        PeerStats {
            institution: Some("core".into()),
            connected: false,
            lag: Some(2),
            bytes_in: 4_096,
            strikes: 1,
            disconnected_ms: Some(1),
            audit_sequence_at_disconnect: Some(left_at),
            ..PeerStats::default()
        },
    );
    let history = dashboard::SharedHistory::default();
    dashboard::sample_once(&api.node, Some(&stats), &history);
    let snapshot = dashboard::snapshot(&api.node, Some(&stats), &history, 5).unwrap();
    let member = |id: &str| snapshot.members.iter().find(|m| m.id == id).unwrap();
    assert_eq!(member("chc-a").state, "this_node");
    assert_eq!(member("core").state, "disconnected");
    assert_eq!(member("core").lag, Some(2 + 3));
    assert_eq!(member("core").peers[0].strikes, 1);
    assert_eq!(member("district").state, "not_seen");
    assert!(snapshot.node.documents >= 3);
    assert!(snapshot.audit.sound);
    assert_eq!(snapshot.audit.checked, snapshot.audit.records);
    assert_eq!(snapshot.lag_history.len(), 1);
    assert_eq!(snapshot.lag_history[0].points[0][1], 5);
    // The page opens with the latest decisions: the three registrations among them.
    let recent = serde_json::to_value(&snapshot.recent_changes).unwrap();
    let registered = recent
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "accepted" && e["kind"] == "health_file")
        .count();
    assert!(registered >= 3, "{recent}");

    // Ids and counts only: no name, birth date or national id, live or in a static copy.
    let copy = dashboard::static_page(&snapshot).unwrap();
    let json = serde_json::to_string(&snapshot).unwrap();
    for text in [&copy, &json] {
        for private in ["Jianguo", "Meilan", "1954-10-17", "310230195410170433"] {
            assert!(!text.contains(private), "{private} is on the dashboard");
        }
    }
    assert!(
        copy.contains(r#""state":"disconnected""#),
        "the copy carries the figures"
    );

    // Through the API, as described (the node runs no network layer here).
    let (status, answer) = api
        .described("GET", "/admin/dashboard", "/admin/dashboard", ADMIN, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["node"]["network"], false);
    assert_eq!(answer["members"].as_array().unwrap().len(), 3);
}

/// Which `HealthFileOp` an operation is: the one exhaustive match, so that a new operation
/// cannot be left out of the description check below.
fn health_file_op_index(op: &HealthFileOp) -> usize {
    match op {
        HealthFileOp::SetDemographic(_) => 0,
        HealthFileOp::SetContract(_) => 1,
        HealthFileOp::AddAllergy(_) => 2,
        HealthFileOp::RemoveAllergy { .. } => 3,
        HealthFileOp::SetAllergyVerification { .. } => 4,
        HealthFileOp::MarkEnteredInError { .. } => 5,
        HealthFileOp::Amend { .. } => 6,
        HealthFileOp::RecordNoKnownAllergies => 7,
        HealthFileOp::AddProblem(_) => 8,
        HealthFileOp::SetProblemStatus { .. } => 9,
        HealthFileOp::RemoveProblem { .. } => 10,
        HealthFileOp::AddMedication(_) => 11,
        HealthFileOp::StopMedication { .. } => 12,
        HealthFileOp::AddEncounter(_) => 13,
        HealthFileOp::EditEncounterNote { .. } => 14,
        HealthFileOp::AddExamResult(_) => 15,
        HealthFileOp::AddFollowUp(_) => 16,
        HealthFileOp::Link { .. } => 17,
        HealthFileOp::Unlink { .. } => 18,
    }
}
const HEALTH_FILE_OPS: usize = 19;

/// As `health_file_op_index`, for referrals.
fn referral_op_index(op: &ReferralOp) -> usize {
    match op {
        ReferralOp::Accept => 0,
        ReferralOp::Decline { .. } => 1,
        ReferralOp::Schedule { .. } => 2,
        ReferralOp::MarkArrived => 3,
        ReferralOp::Complete => 4,
        ReferralOp::Cancel => 5,
        ReferralOp::EditHandover { .. } => 6,
        ReferralOp::SetUrgency { .. } => 7,
        ReferralOp::Reschedule { .. } => 8,
        ReferralOp::MarkNoShow => 9,
        ReferralOp::WriteReturnSummary { .. } => 10,
        ReferralOp::Redirect { .. } => 11,
    }
}
const REFERRAL_OPS: usize = 12;

impl Api {
    /// Sends `body` (JSON) as a request of the described operation `method path` (the path
    /// as described, `{id}` for its parameter; `concrete` the path sent) and checks the
    /// request against its described body and the answer against the description of its
    /// status. Returns the status and the answer.
    async fn described(
        &self,
        method: &str,
        path: &str,
        concrete: &str,
        token: &str,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let openapi = schema::openapi();
        if let Some(body) = body {
            let request = &openapi["paths"][path][method.to_lowercase()]["requestBody"]["content"]
                ["application/json"]["schema"];
            schema::check(&openapi, request, body, "request").unwrap_or_else(|e| {
                panic!("{method} {path}: the request is not as described: {e}")
            });
        }
        let text = body.map(Value::to_string).unwrap_or_default();
        let (status, answer) = self.call(method, concrete, token, &text).await;
        let described = schema::response_schema(&openapi, method, path, status.as_u16())
            .unwrap_or_else(|| {
                panic!("{method} {path}: status {status} is not described: {answer}")
            });
        schema::check(&openapi, described, &answer, "answer").unwrap_or_else(|e| {
            panic!("{method} {path} answered {status}, not as described: {e}: {answer}")
        });
        (status, answer)
    }
}

/// Every route that takes a token refuses a request without one, and its answer is the one
/// `node/openapi.json` describes for 401: `{"error"}` for `/v1` and `/admin`, an
/// OperationOutcome for `/fhir`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_a_request_without_a_token_as_described() {
    let api = api();
    let openapi = schema::openapi();
    let mut checked = 0;
    for (path, methods) in openapi["paths"].as_object().unwrap() {
        for (method, operation) in methods.as_object().unwrap() {
            if operation["security"].as_array().is_some_and(Vec::is_empty) {
                continue;
            }
            let concrete = path
                .replace("{id}", &"0".repeat(32))
                .replace("{change}", &"0".repeat(64));
            let request = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(&concrete)
                .body(Body::empty())
                .unwrap();
            let response = api.router.clone().oneshot(request).await.unwrap();
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), 1024 * 1024)
                .await
                .unwrap();
            let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path}: {answer}"
            );
            let described = schema::response_schema(&openapi, method, path, 401)
                .unwrap_or_else(|| panic!("{method} {path}: 401 is not described"));
            schema::check(&openapi, described, &answer, "answer")
                .unwrap_or_else(|e| panic!("{method} {path}: {e}: {answer}"));
            checked += 1;
        }
    }
    assert!(checked > 40, "{checked}");
}

/// Every route that answers JSON answers a request that succeeds as `node/openapi.json`
/// describes: searches, views, histories, worklists, FHIR reads and the admin API. (Bodies
/// that are not JSON — NDJSON, CBOR, FHIR transactions — and the streams are checked by
/// their own tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_route_answers_success_as_described() {
    let api = api();
    let file = api.register("Jianguo").await;
    let (status, created) = api
        .described(
            "POST",
            "/v1/referrals",
            "/v1/referrals",
            WRITER,
            Some(&json!({"patient": file, "direction": "up", "to": "core",
                         "reason": "chest pain", "urgency": "priority", "handover": ""})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let referral = created["id"].as_str().unwrap().to_owned();
    let booked = referral_from_core(
        &api,
        &file,
        &[
            ReferralOp::Accept,
            ReferralOp::Schedule {
                appointment: Timestamp(1_800_000_000_000),
                minutes: Some(30),
            },
        ],
    );
    let registration = json!({
        "name": {"family": "Gu", "given": "Guilan"}, "sex": "female", "birth_date": "1948-05-02",
    });
    let search = json!({"name": "lu jian"});
    let purge = json!({});
    let routes: Vec<(&str, &str, String, &str, Option<&Value>)> = vec![
        ("GET", "/health", "/health".into(), READER, None),
        (
            "GET",
            "/v1/health-files",
            "/v1/health-files?name=lu".into(),
            READER,
            None,
        ),
        (
            "POST",
            "/v1/health-files",
            "/v1/health-files".into(),
            WRITER,
            Some(&registration),
        ),
        (
            "POST",
            "/v1/health-files/search",
            "/v1/health-files/search".into(),
            READER,
            Some(&search),
        ),
        (
            "GET",
            "/v1/health-files/{id}",
            format!("/v1/health-files/{file}"),
            READER,
            None,
        ),
        (
            "GET",
            "/v1/health-files/{id}/history",
            format!("/v1/health-files/{file}/history"),
            READER,
            None,
        ),
        (
            "GET",
            "/v1/referrals",
            "/v1/referrals?to=core&_count=1".into(),
            READER,
            None,
        ),
        (
            "GET",
            "/v1/referrals",
            format!("/v1/referrals?patient={file}"),
            READER,
            None,
        ),
        (
            "GET",
            "/v1/referrals/{id}",
            format!("/v1/referrals/{referral}"),
            READER,
            None,
        ),
        (
            "GET",
            "/v1/referrals/{id}/history",
            format!("/v1/referrals/{referral}/history"),
            READER,
            None,
        ),
        ("GET", "/v1/conflicts", "/v1/conflicts".into(), READER, None),
        (
            "GET",
            "/fhir/metadata",
            "/fhir/metadata".into(),
            READER,
            None,
        ),
        (
            "GET",
            "/fhir/Patient",
            "/fhir/Patient?name=lu".into(),
            READER,
            None,
        ),
        (
            "GET",
            "/fhir/Patient/{id}",
            format!("/fhir/Patient/{file}"),
            READER,
            None,
        ),
        (
            "GET",
            "/fhir/Patient/{id}/$everything",
            format!("/fhir/Patient/{file}/$everything"),
            READER,
            None,
        ),
        (
            "GET",
            "/fhir/ServiceRequest",
            "/fhir/ServiceRequest?performer=core".into(),
            READER,
            None,
        ),
        (
            "GET",
            "/fhir/ServiceRequest/{id}",
            format!("/fhir/ServiceRequest/{referral}"),
            READER,
            None,
        ),
        (
            "GET",
            "/fhir/Task",
            "/fhir/Task?owner=core".into(),
            READER,
            None,
        ),
        (
            "GET",
            "/fhir/Task/{id}",
            format!("/fhir/Task/{referral}"),
            READER,
            None,
        ),
        (
            "GET",
            "/fhir/Appointment",
            format!("/fhir/Appointment?patient={file}"),
            READER,
            None,
        ),
        (
            "GET",
            "/fhir/Appointment/{id}",
            format!("/fhir/Appointment/{booked}"),
            READER,
            None,
        ),
        (
            "GET",
            "/fhir/Organization",
            "/fhir/Organization".into(),
            READER,
            None,
        ),
        (
            "GET",
            "/fhir/Organization/{id}",
            "/fhir/Organization/core".into(),
            READER,
            None,
        ),
        (
            "GET",
            "/fhir/AllergyIntolerance",
            format!("/fhir/AllergyIntolerance?patient={file}"),
            READER,
            None,
        ),
        (
            "GET",
            "/fhir/Condition",
            format!("/fhir/Condition?patient={file}"),
            READER,
            None,
        ),
        (
            "GET",
            "/fhir/Observation",
            format!("/fhir/Observation?patient={file}"),
            READER,
            None,
        ),
        (
            "GET",
            "/fhir/MedicationRequest",
            format!("/fhir/MedicationRequest?patient={file}"),
            READER,
            None,
        ),
        (
            "GET",
            "/fhir/Encounter",
            format!("/fhir/Encounter?patient={file}"),
            READER,
            None,
        ),
        (
            "GET",
            "/fhir/DiagnosticReport",
            format!("/fhir/DiagnosticReport?patient={file}"),
            READER,
            None,
        ),
        ("GET", "/admin/status", "/admin/status".into(), ADMIN, None),
        ("GET", "/admin/roster", "/admin/roster".into(), ADMIN, None),
        (
            "GET",
            "/admin/documents",
            "/admin/documents".into(),
            ADMIN,
            None,
        ),
        (
            "GET",
            "/admin/quarantine",
            "/admin/quarantine".into(),
            ADMIN,
            None,
        ),
        ("GET", "/admin/audit", "/admin/audit".into(), ADMIN, None),
        (
            "GET",
            "/admin/audit/verify",
            "/admin/audit/verify".into(),
            ADMIN,
            None,
        ),
        ("GET", "/admin/verify", "/admin/verify".into(), ADMIN, None),
        (
            "POST",
            "/admin/quarantine/purge",
            "/admin/quarantine/purge".into(),
            ADMIN,
            Some(&purge),
        ),
        ("POST", "/admin/repair", "/admin/repair".into(), ADMIN, None),
        (
            "GET",
            "/admin/dashboard",
            "/admin/dashboard".into(),
            ADMIN,
            None,
        ),
    ];
    let mut described = std::collections::BTreeSet::from([("POST", "/v1/referrals")]);
    for (method, path, concrete, token, body) in routes {
        let (status, answer) = api.described(method, path, &concrete, token, body).await;
        assert!(
            status.is_success(),
            "{method} {concrete}: {status}: {answer}"
        );
        described.insert((method, path));
    }
    // This node runs no network layer: its sync figures are absent, as described.
    let (status, answer) = api
        .described("GET", "/admin/sync", "/admin/sync", ADMIN, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    described.insert(("GET", "/admin/sync"));
    // Every JSON route with a JSON body or none is among them (the operations routes are
    // checked operation by operation below).
    let openapi = schema::openapi();
    for (path, methods) in openapi["paths"].as_object().unwrap() {
        for (method, operation) in methods.as_object().unwrap() {
            let answers_json = operation["responses"]
                .as_object()
                .unwrap()
                .iter()
                .filter(|(status, _)| status.starts_with('2'))
                .any(|(_, answer)| {
                    answer["content"]
                        .as_object()
                        .is_some_and(|c| c.keys().any(|k| k.ends_with("json")))
                });
            let json_or_no_body = operation["requestBody"].is_null()
                || operation["requestBody"]["content"]["application/json"].is_object();
            let method = method.to_uppercase();
            let elsewhere = path.contains("{change}") || path.ends_with("/operations");
            if answers_json && json_or_no_body && !elsewhere {
                assert!(
                    described.contains(&(method.as_str(), path.as_str())),
                    "{method} {path} answers JSON and is not checked here"
                );
            }
        }
    }
}

/// Every operation on a health file and on a referral, as an app sends it, is what
/// `node/openapi.json` describes; so is every answer, success or error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_and_its_answer_are_as_the_openapi_file_describes() {
    let api = api();
    let file = api.register("Jianguo").await;
    let other = api.register("Jianhua").await;
    let (path, concrete) = (
        "/v1/health-files/{id}/operations",
        format!("/v1/health-files/{file}/operations"),
    );
    let (status, view) = api
        .described(
            "GET",
            "/v1/health-files/{id}",
            &format!("/v1/health-files/{file}"),
            READER,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");

    let encounter = NewEncounter {
        time: Timestamp(1_790_000_000_000),
        kind: EncounterKind::Outpatient,
        diagnoses: vec![Diagnosis {
            icd10: Icd10::new("I10").unwrap(),
            display: "Hypertension".into(),
        }],
        note: "seen".into(),
    };
    let exam = NewExamResult {
        kind: ExamKind::Lab,
        time: Timestamp(1_790_000_000_000),
        name: "potassium".into(),
        measurements: vec![Measurement {
            name: "potassium".into(),
            value: 6.4,
            unit: Some("mmol/L".into()),
        }],
        report: None,
    };
    let medication = NewMedication {
        drug: "amlodipine".into(),
        dose: "5 mg".into(),
        frequency: "once daily".into(),
        start: Date::new("2026-03-01").unwrap(),
        days: 30,
    };
    let mut sent = vec![false; HEALTH_FILE_OPS];
    let mut send = |op: HealthFileOp, expected: StatusCode| {
        sent[health_file_op_index(&op)] = true;
        let (api, path, concrete) = (&api, path, concrete.clone());
        async move {
            let body = serde_json::to_value(&op).unwrap();
            let (status, answer) = api
                .described("POST", path, &concrete, WRITER, Some(&body))
                .await;
            assert_eq!(status, expected, "{body}: {answer}");
        }
    };
    // Writes that add entries, then those that name them.
    for (op, expected) in [
        (
            HealthFileOp::SetDemographic(DemographicField::Phone("+86 139".into())),
            StatusCode::OK,
        ),
        (
            HealthFileOp::SetContract(FamilyDoctorContract {
                community_centre: InstitutionId::new("chc-a").unwrap(),
                district_hospital: InstitutionId::new("core").unwrap(),
                municipal_hospital: InstitutionId::new("core").unwrap(),
                doctor_id: "doc-1".into(),
                doctor_name: "Dr Shen".into(),
                since: Date::new("2026-01-01").unwrap(),
            }),
            StatusCode::OK,
        ),
        (
            HealthFileOp::AddAllergy(NewAllergy {
                substance: "penicillin".into(),
                reaction: "rash".into(),
                severity: Severity::Severe,
            }),
            StatusCode::OK,
        ),
        // Refused while an allergy stands: the error is as described too.
        (
            HealthFileOp::RecordNoKnownAllergies,
            StatusCode::BAD_REQUEST,
        ),
        (
            HealthFileOp::AddProblem(NewProblem {
                icd10: Icd10::new("I10").unwrap(),
                display: "Hypertension".into(),
                onset: None,
                status: ProblemStatus::Active,
            }),
            StatusCode::OK,
        ),
        (
            HealthFileOp::AddMedication(medication.clone()),
            StatusCode::OK,
        ),
        (
            HealthFileOp::AddEncounter(encounter.clone()),
            StatusCode::OK,
        ),
        (HealthFileOp::AddExamResult(exam.clone()), StatusCode::OK),
        (
            HealthFileOp::AddFollowUp(NewFollowUp {
                time: Timestamp(1_790_000_000_000),
                systolic_mmhg: Some(150),
                diastolic_mmhg: Some(95),
                glucose_mmol_per_l: None,
            }),
            StatusCode::OK,
        ),
    ] {
        send(op, expected).await;
    }
    let (_, view) = api
        .call("GET", &format!("/v1/health-files/{file}"), READER, "")
        .await;
    let entry =
        |list: &str| EntryId::parse(view["view"][list][0]["entry"].as_str().unwrap()).unwrap();
    for (op, expected) in [
        (
            HealthFileOp::SetAllergyVerification {
                entry: entry("allergies"),
                status: AllergyVerification::Confirmed,
            },
            StatusCode::OK,
        ),
        (
            HealthFileOp::SetProblemStatus {
                entry: entry("problems"),
                status: ProblemStatus::Resolved,
            },
            StatusCode::OK,
        ),
        (
            HealthFileOp::StopMedication {
                entry: entry("medications"),
                on: Date::new("2026-03-20").unwrap(),
            },
            StatusCode::OK,
        ),
        (
            HealthFileOp::EditEncounterNote {
                entry: entry("encounters"),
                note: "seen; BP high".into(),
            },
            StatusCode::OK,
        ),
        (
            HealthFileOp::MarkEnteredInError {
                list: CorrectableList::FollowUps,
                entry: entry("follow_ups"),
                reason: "another resident's".into(),
            },
            StatusCode::OK,
        ),
        (
            HealthFileOp::Amend {
                entry: entry("exams"),
                reason: "haemolysed".into(),
                with: Amendment::ExamResult(NewExamResult {
                    measurements: vec![Measurement {
                        name: "potassium".into(),
                        value: 4.1,
                        unit: Some("mmol/L".into()),
                    }],
                    ..exam
                }),
            },
            StatusCode::OK,
        ),
        (
            HealthFileOp::RemoveProblem {
                icd10: Icd10::new("I10").unwrap(),
            },
            StatusCode::OK,
        ),
        (
            HealthFileOp::RemoveAllergy {
                substance: "Penicillin".into(),
            },
            StatusCode::OK,
        ),
        (
            HealthFileOp::Link {
                to: DocumentId::parse(&other).unwrap(),
                reason: "same national id".into(),
            },
            StatusCode::OK,
        ),
        (
            HealthFileOp::Unlink {
                reason: "two residents".into(),
            },
            StatusCode::OK,
        ),
        // A link to the file itself: refused, as described.
        (
            HealthFileOp::Link {
                to: DocumentId::parse(&file).unwrap(),
                reason: "itself".into(),
            },
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        send(op, expected).await;
    }
    assert!(
        sent.iter().all(|s| *s),
        "an operation was not sent: {sent:?}"
    );
    let (status, _) = api
        .described(
            "GET",
            "/v1/health-files/{id}",
            &format!("/v1/health-files/{file}"),
            READER,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    // A referral to the core hospital: this node sends it, so the receiver's operations are
    // refused (403), the sender's applied; every one is sent, and each answer is described.
    let new_referral = json!({"patient": file, "direction": "up", "to": "core",
                              "reason": "chest pain", "urgency": "priority", "handover": ""});
    let (status, created) = api
        .described(
            "POST",
            "/v1/referrals",
            "/v1/referrals",
            WRITER,
            Some(&new_referral),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let referral = created["id"].as_str().unwrap().to_owned();
    let mut sent = vec![false; REFERRAL_OPS];
    let ops = [
        (
            ReferralOp::EditHandover {
                handover: "ECG attached".into(),
            },
            StatusCode::OK,
        ),
        (
            ReferralOp::SetUrgency {
                urgency: Urgency::Routine,
            },
            StatusCode::OK,
        ),
        (ReferralOp::Accept, StatusCode::FORBIDDEN),
        (
            ReferralOp::Schedule {
                appointment: Timestamp(1_800_000_000_000),
                minutes: Some(30),
            },
            StatusCode::FORBIDDEN,
        ),
        (
            ReferralOp::Reschedule {
                appointment: Timestamp(1_800_086_400_000),
                minutes: None,
            },
            StatusCode::FORBIDDEN,
        ),
        (ReferralOp::MarkNoShow, StatusCode::FORBIDDEN),
        (
            ReferralOp::Redirect {
                to: institution("district"),
                reason: "no rehabilitation bed".into(),
            },
            StatusCode::FORBIDDEN,
        ),
        (ReferralOp::MarkArrived, StatusCode::FORBIDDEN),
        (ReferralOp::Complete, StatusCode::FORBIDDEN),
        (
            ReferralOp::WriteReturnSummary {
                summary: "seen; back to the centre".into(),
            },
            StatusCode::FORBIDDEN,
        ),
        (
            ReferralOp::Decline {
                reason: "no bed".into(),
            },
            StatusCode::FORBIDDEN,
        ),
        (ReferralOp::Cancel, StatusCode::OK),
    ];
    let concrete = format!("/v1/referrals/{referral}/operations");
    for (op, expected) in ops {
        sent[referral_op_index(&op)] = true;
        let body = serde_json::to_value(&op).unwrap();
        let (status, answer) = api
            .described(
                "POST",
                "/v1/referrals/{id}/operations",
                &concrete,
                WRITER,
                Some(&body),
            )
            .await;
        assert_eq!(status, expected, "{body}: {answer}");
    }
    assert!(
        sent.iter().all(|s| *s),
        "a referral operation was not sent: {sent:?}"
    );
    let (status, _) = api
        .described(
            "GET",
            "/v1/referrals/{id}",
            &format!("/v1/referrals/{referral}"),
            READER,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

/// Every `estuary_` metric an expression names.
fn metrics_named(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("estuary_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

/// The alert rules and the Grafana dashboard shipped in `deploy/` name only metrics a node
/// serves (a renamed metric would silence an alert), and every rule says how severe it is and
/// what it means.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_alert_rules_and_dashboard_name_only_metrics_the_node_serves() {
    let api = api();
    let patient = api.register("Jianguo").await;
    api.call("GET", &format!("/v1/health-files/{patient}"), READER, "")
        .await;
    let request = Request::builder()
        .uri("/metrics")
        .header("authorization", format!("Bearer {ADMIN}"))
        .body(Body::empty())
        .unwrap();
    let response = api.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = String::from_utf8(
        axum::body::to_bytes(response.into_body(), 1024 * 1024)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    // Families and their kinds, from the `# TYPE` lines.
    let families: std::collections::BTreeMap<String, String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
        .collect();
    for expected in [
        "estuary_api_request_duration_seconds",
        "estuary_decision_duration_seconds",
        "estuary_peer_lag_documents",
    ] {
        assert!(
            families.contains_key(expected),
            "{expected} is not served: {text}"
        );
    }
    // The write of the registration and the read were timed.
    assert!(
        text.contains("estuary_api_request_duration_seconds_count{kind=\"read\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("estuary_decision_duration_seconds_count 1"),
        "{text}"
    );
    let served = |name: &str| {
        families.contains_key(name)
            || ["_bucket", "_count", "_sum"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| families.get(base).is_some_and(|k| k == "histogram"))
            })
    };

    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    let read = |path: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(format!("{deploy}/{path}")).unwrap()).unwrap()
    };
    let rules = read("prometheus/estuary-alerts.yml");
    let mut alerts = BTreeSet::new();
    for rule in rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
    {
        let alert = rule["alert"].as_str().expect("every rule is an alert");
        assert!(alerts.insert(alert.to_owned()), "{alert} twice");
        assert!(
            ["warning", "critical"].contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
            "{alert}"
        );
        assert!(
            !rule["annotations"]["summary"]
                .as_str()
                .unwrap_or("")
                .is_empty(),
            "{alert}"
        );
        assert!(
            rule["for"].as_str().is_some_and(|f| f.ends_with('m')),
            "{alert}"
        );
        for name in metrics_named(rule["expr"].as_str().unwrap()) {
            assert!(
                served(&name),
                "{alert} names {name}, which a node does not serve"
            );
        }
    }
    assert!(alerts.len() >= 8, "{alerts:?}");
    let dashboard = read("grafana/estuary-dashboard.json");
    let mut named = 0;
    for target in dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
    {
        for name in metrics_named(target["expr"].as_str().unwrap()) {
            assert!(
                served(&name),
                "the dashboard names {name}, which a node does not serve"
            );
            named += 1;
        }
    }
    assert!(named > 10);
}

/// A member's existing records load in bulk: each resident one health file written as one
/// change, every bad line refused with its number and a reason that quotes nothing, and a
/// load run twice adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_load_writes_each_resident_once_and_refuses_bad_lines_by_number() {
    let api = api();
    let first = include_str!("data/resident.json").trim();
    let record: Value = serde_json::from_str(first).unwrap();
    let other = first.replace("310230195410170433", "310230195410170999");
    let bad_date = other
        .replace("310230195410170999", "310230195410170777")
        .replace("\"birthDate\":\"1954", "\"birthDate\":\"19x4");
    let body = [first, "{\"id\": ", other.as_str(), first, bad_date.as_str()].join("\n");
    let load = |token: &'static str| {
        let (api, body) = (&api, body.clone());
        async move {
            let request = Request::builder()
                .method("POST")
                .uri("/v1/import")
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/x-ndjson")
                .body(Body::from(body))
                .unwrap();
            let response = api.router.clone().oneshot(request).await.unwrap();
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap())
        }
    };
    assert_eq!(load(READER).await.0, StatusCode::FORBIDDEN);

    let (status, answer) = load(WRITER).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let lines = |key: &str| -> Vec<(u64, String)> {
        answer[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let what = r.get("code").unwrap_or(&r["id"]);
                (
                    r["line"].as_u64().unwrap(),
                    what.as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let loaded = lines("loaded");
    assert_eq!(loaded.iter().map(|l| l.0).collect::<Vec<_>>(), vec![1, 3]);
    let refused = lines("refused");
    assert_eq!(
        refused,
        vec![
            (2, "invalid_record".to_owned()),
            (4, "repeated_in_load".to_owned()),
            (5, "invalid_record".to_owned()),
        ],
        "{answer}"
    );
    let reasons = answer["refused"].to_string();
    assert!(
        reasons.contains("line 1") && reasons.contains("demographics.birthDate"),
        "{reasons}"
    );
    assert!(
        !reasons.contains("19x4") && !reasons.contains("3102301954"),
        "{reasons}"
    );

    // One change made the whole file, every record in it.
    let id = DocumentId::parse(&loaded[0].1).unwrap();
    assert_eq!(api.node.history(id).unwrap().len(), 1);
    let view = api.node.health_file(id).unwrap();
    assert_eq!(view.demographics.name.value.family, "Lu");
    assert_eq!(
        view.problems.len(),
        record["problems"].as_array().unwrap().len()
    );
    assert_eq!(
        view.encounters.len(),
        record["encounters"].as_array().unwrap().len()
    );
    assert_eq!(view.exams.len(), record["exams"].as_array().unwrap().len());
    assert_eq!(view.contract.unwrap().value.doctor_id, "doc-44552");

    // Run again (with the admin token, as `estuary import` loads): nothing more is written.
    let (status, answer) = load(ADMIN).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer["loaded"].as_array().unwrap().is_empty(), "{answer}");
    let codes: Vec<&str> = answer["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        codes,
        [
            "already_held",
            "invalid_record",
            "already_held",
            "already_held",
            "invalid_record"
        ]
    );
}

/// A FHIR client loads a member's records as a transaction Bundle: each Patient one health
/// file with its records, all or nothing; a Bundle with one bad entry loads nothing and names
/// the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fhir_transaction_loads_each_patient_with_its_records_all_or_nothing() {
    let api = api();
    let patient = |url: &str, national_id: &str, family: &str| {
        json!({
            "fullUrl": url,
            "request": { "method": "POST", "url": "Patient" },
            "resource": {
                "resourceType": "Patient",
                "identifier": [{ "system": "urn:estuary:national-id", "value": national_id }],
                "name": [{ "use": "official", "family": family, "given": ["Guilan"] }],
                "gender": "female",
                "birthDate": "1948-05-02",
                "telecom": [{ "system": "phone", "value": "+86 138 0000 0000" }],
                "address": [{ "line": ["12 Nanmen Rd"], "city": "Shanghai", "postalCode": "202150" }],
            },
        })
    };
    let record = |resource: Value| json!({ "request": { "method": "POST" }, "resource": resource });
    let guilan = "urn:uuid:0c1a2b3c-0000-4000-8000-000000000001";
    let mut entries = vec![
        patient(guilan, "310230194805020024", "Gu"),
        record(json!({
            "resourceType": "AllergyIntolerance",
            "patient": { "reference": guilan },
            "code": { "text": "Penicillin" },
            "recordedDate": "2012-03-04",
            "reaction": [{ "manifestation": [{ "text": "urticaria" }], "severity": "severe" }],
        })),
        record(json!({
            "resourceType": "Condition",
            "subject": { "reference": guilan },
            "clinicalStatus": { "coding": [{ "code": "active" }] },
            "code": { "coding": [{
                "system": "urn:estuary:code-system:icd-10-cn-clinical",
                "code": "I10.x00x002",
                "display": "高血压1级",
            }] },
            "onsetDateTime": "2009-06-01",
        })),
        record(json!({
            "resourceType": "MedicationRequest",
            "subject": { "reference": guilan },
            "medicationCodeableConcept": { "text": "Amlodipine 5 mg tablet" },
            "authoredOn": "2026-11-02T09:30:00+08:00",
            "dosageInstruction": [{
                "text": "5 mg once daily",
                "timing": { "code": { "text": "once daily" } },
                "doseAndRate": [{ "doseQuantity": { "value": 5, "unit": "mg" } }],
            }],
            "dispenseRequest": { "expectedSupplyDuration": { "value": 30, "code": "d" } },
        })),
        record(json!({
            "resourceType": "Encounter",
            "subject": { "reference": guilan },
            "class": { "code": "AMB" },
            "period": { "start": "2026-11-02T09:00:00+08:00" },
            "reasonCode": [{ "coding": [{ "system": "http://hl7.org/fhir/sid/icd-10", "code": "I10", "display": "Hypertension" }] }],
        })),
        record(json!({
            "resourceType": "Observation",
            "status": "final",
            "subject": { "reference": guilan },
            "category": [{ "coding": [{ "code": "vital-signs" }] }],
            "code": { "coding": [{ "system": "http://loinc.org", "code": "85354-9" }] },
            "effectiveDateTime": "2026-11-02T09:05:00+08:00",
            "component": [
                { "code": { "coding": [{ "system": "http://loinc.org", "code": "8480-6" }] }, "valueQuantity": { "value": 148, "unit": "mmHg" } },
                { "code": { "coding": [{ "system": "http://loinc.org", "code": "8462-4" }] }, "valueQuantity": { "value": 92, "unit": "mmHg" } },
            ],
        })),
        record(json!({
            "resourceType": "Observation",
            "status": "final",
            "subject": { "reference": guilan },
            "category": [{ "coding": [{ "code": "laboratory" }] }],
            "code": { "text": "HbA1c" },
            "effectiveDateTime": "2026-10-20",
            "valueQuantity": { "value": 6.9, "unit": "%" },
        })),
    ];
    let other = "urn:uuid:0c1a2b3c-0000-4000-8000-000000000002";
    entries.push(patient(other, "310230195101010011", "Shen"));
    entries.push(record(json!({
        "resourceType": "AllergyIntolerance",
        "patient": { "reference": other },
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "716186003" }] },
    })));
    let bundle = |entries: &[Value]| {
        json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries }).to_string()
    };
    let before = api.node.catalogue().len();

    // One bad entry (a code in no accepted system): nothing is loaded, and the entry is named.
    let mut bad = entries.clone();
    bad[2]["resource"]["code"]["coding"][0]["system"] = json!("http://snomed.info/sct");
    let (status, answer) = api.call("POST", "/fhir", WRITER, &bundle(&bad)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    // A FHIR client gets an OperationOutcome.
    assert_eq!(answer["resourceType"], "OperationOutcome", "{answer}");
    assert_eq!(answer["issue"][0]["code"], "invalid");
    let reason = answer["issue"][0]["details"]["text"].as_str().unwrap();
    assert!(reason.starts_with("entry 2 (Condition): "), "{reason}");
    assert_eq!(api.node.catalogue().len(), before);

    let (status, answer) = api.call("POST", "/fhir", WRITER, &bundle(&entries)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["type"], "transaction-response");
    let responses = answer["entry"].as_array().unwrap();
    assert_eq!(responses.len(), entries.len());
    let location = responses[0]["response"]["location"].as_str().unwrap();
    let id = DocumentId::parse(location.strip_prefix("Patient/").unwrap()).unwrap();
    assert_eq!(api.node.history(id).unwrap().len(), 1, "one change");
    let view = api.node.health_file(id).unwrap();
    assert_eq!(view.allergies[0].substance, "Penicillin");
    assert_eq!(view.problems[0].icd10.as_str(), "I10.x00x002");
    assert_eq!(view.medications[0].days, 30);
    assert_eq!(view.encounters[0].diagnoses[0].icd10.as_str(), "I10");
    assert_eq!(view.follow_ups[0].systolic_mmhg, Some(148));
    assert_eq!(view.exams[0].measurements[0].value, 6.9);
    let second = responses[7]["response"]["location"].as_str().unwrap();
    let second = DocumentId::parse(second.strip_prefix("Patient/").unwrap()).unwrap();
    assert!(
        api.node
            .health_file(second)
            .unwrap()
            .no_known_allergies_now()
            .is_some()
    );

    // The same Bundle again: the residents are held already; nothing more is written.
    let (status, answer) = api.call("POST", "/fhir", WRITER, &bundle(&entries)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(api.node.catalogue().len(), before + 2);
}

/// A resident registered again (offline at a centre, then at the hospital) is registered,
/// and the answer names the files that may be the same person: the same national id, or
/// the same name and birth date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_names_the_files_that_may_be_the_same_resident() {
    let api = api();
    let register = |body: serde_json::Value| {
        let api = &api;
        async move {
            let (status, answer) = api
                .call("POST", "/v1/health-files", WRITER, &body.to_string())
                .await;
            assert_eq!(status, StatusCode::CREATED, "{answer}");
            let candidates = ids_of(&answer["possible_duplicates"]);
            (answer["id"].as_str().unwrap().to_owned(), candidates)
        }
    };
    let (first, candidates) = register(json!({
        "name": { "family": "Shen", "given": "Meilan" },
        "sex": "female",
        "birth_date": "1941-03-02",
        "national_id": "310230194103020021",
    }))
    .await;
    assert!(candidates.is_empty());
    // The hospital registers her again, without the national id, spacing the name its way.
    let (_, candidates) = register(json!({
        "name": { "family": "SHEN", "given": " Meilan " },
        "sex": "female",
        "birth_date": "1941-03-02",
    }))
    .await;
    assert_eq!(candidates, vec![first.clone()]);
    // A centre registers her with her national id and a mistyped name: found by the id.
    let (_, candidates) = register(json!({
        "name": { "family": "Shen", "given": "Meilin" },
        "sex": "female",
        "birth_date": "1941-03-02",
        "national_id": "310230194103020021",
    }))
    .await;
    assert_eq!(candidates, vec![first.clone()]);
    // A namesake born another year is not a candidate; nor a name that only starts the same.
    for (given, born) in [("Meilan", "1952-07-19"), ("Mei", "1941-03-02")] {
        let (_, candidates) = register(json!({
            "name": { "family": "Shen", "given": given },
            "sex": "female",
            "birth_date": born,
        }))
        .await;
        assert!(candidates.is_empty(), "{given} {born}: {candidates:?}");
    }
}

/// A diagnosis coded in the national clinical edition, as a hospital EMR writes it, is
/// accepted as written, read back in its own system, and named in FHIR by that system's URI;
/// a code not of the system named is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn national_edition_diagnosis_codes_are_written_read_and_served_in_their_own_system() {
    let api = api();
    let patient = api.register("Guifang").await;
    let operations = format!("/v1/health-files/{patient}/operations");
    let national = json!({"system": "icd-10-cn-clinical", "code": "I10.x00x002"});
    let op = json!({"op": "add_problem", "args": {"icd10": national, "display": "高血压1级", "status": "active"}});
    let (status, body) = api.call("POST", &operations, WRITER, &op.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, view) = api
        .call("GET", &format!("/v1/health-files/{patient}"), READER, "")
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["view"]["problems"][0]["icd10"], national, "{view}");
    let bundle = api.fhir_search("Condition", &patient).await;
    let coding = &bundle["entry"][0]["resource"]["code"]["coding"][0];
    assert_eq!(
        coding["system"],
        "urn:estuary:code-system:icd-10-cn-clinical"
    );
    assert_eq!(coding["code"], "I10.x00x002");

    for (icd10, says) in [
        (json!("I10.x00x002"), "needs its system"),
        (
            json!({"system": "icd-10-cn-clinical", "code": "I10"}),
            "national-edition",
        ),
        (
            json!({"system": "icd-9", "code": "401.9"}),
            "code system is one of",
        ),
    ] {
        let op = json!({"op": "add_problem", "args": {"icd10": icd10, "display": "x", "status": "active"}});
        let (status, body) = api.call("POST", &operations, WRITER, &op.to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{icd10}: {body}");
        let reason = body["error"]["reason"].as_str().unwrap();
        assert!(reason.contains(says), "{icd10}: {reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_scopes_and_malformed_input_get_typed_errors_that_quote_nothing() {
    let api = api();
    let (status, body) = api.call("GET", "/v1/conflicts", "not-a-token", "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "unauthorized");

    let (status, body) = api.call("POST", "/v1/health-files", READER, "{}").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    let (status, body) = api.call("GET", "/admin/status", WRITER, "").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // A value that is patient data in the wrong place is not echoed back.
    let (status, body) = api
        .call(
            "POST",
            "/v1/health-files",
            WRITER,
            r#"{"name":{"family":"Zhang","given":"Wei"},"sex":"Zhang Wei 13800138000","birth_date":"1954-10-17"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "malformed_json");
    let reason = body["error"]["reason"].as_str().unwrap();
    assert!(
        !reason.contains("Zhang") && !reason.contains("13800138000"),
        "{reason}"
    );

    let (status, body) = api
        .call(
            "POST",
            "/v1/health-files",
            WRITER,
            r#"{"name":{"family":"Lu","given":"A"},"sex":"male"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["reason"]
            .as_str()
            .unwrap()
            .contains("birth_date"),
        "{body}"
    );

    let (status, body) = api
        .call("POST", "/v1/health-files", WRITER, "{\"name\":")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["reason"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );

    let oversized = format!("{{\"pad\":\"{}\"}}", "x".repeat(100 * 1024));
    let (status, body) = api
        .call("POST", "/v1/health-files", WRITER, &oversized)
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");

    let (status, body) = api.call("DELETE", "/v1/conflicts", WRITER, "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["error"]["code"], "method_not_allowed");
    let (status, body) = api
        .call(
            "GET",
            &format!("/v1/changes?cursor={}", u64::MAX),
            READER,
            "",
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "cursor_ahead");

    let (status, _) = api
        .call("GET", "/v1/health-files/not-an-id", WRITER, "")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api
        .call(
            "GET",
            &format!("/v1/health-files/{}", "0".repeat(32)),
            WRITER,
            "",
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referral_transitions_are_checked_and_every_access_is_audited_with_the_app() {
    let api = api();
    let patient = api.register("Jianguo").await;
    let (status, created) = api
        .call(
            "POST",
            "/v1/referrals",
            WRITER,
            &json!({
                "patient": patient, "direction": "up", "to": "core",
                "reason": "chest pain", "urgency": "priority", "handover": "ECG attached",
            })
            .to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let referral = created["id"].as_str().unwrap().to_owned();
    let operations = format!("/v1/referrals/{referral}/operations");
    // A destination no member is named (a typo) is refused: no desk would ever see it.
    let (status, body) = api
        .call(
            "POST",
            "/v1/referrals",
            WRITER,
            &json!({
                "patient": patient, "direction": "up", "to": "coer",
                "reason": "chest pain", "urgency": "priority", "handover": "",
            })
            .to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "unknown_member", "{body}");

    // Only the receiving institution may accept.
    let (status, body) = api
        .call("POST", &operations, WRITER, r#"{"op":"accept"}"#)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "not_permitted_for_institution");
    let (status, _) = api
        .call("POST", &operations, WRITER, r#"{"op":"cancel"}"#)
        .await;
    assert_eq!(status, StatusCode::OK);
    // Cancelled is final.
    let (status, body) = api
        .call("POST", &operations, WRITER, r#"{"op":"cancel"}"#)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "illegal_transition");

    let (status, list) = api
        .call("GET", "/v1/referrals?to=core&status=cancelled", READER, "")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["results"][0]["id"], referral.as_str());
    let (status, list) = api.call("GET", "/v1/referrals?to=core", READER, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["results"][0]["id"], referral.as_str());
    let (status, _) = api
        .call("GET", "/v1/referrals?to=core&from=chc-a", READER, "")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (_, search) = api
        .call("GET", "/v1/health-files?name=lu%20jian", READER, "")
        .await;
    assert_eq!(search["results"][0]["id"], patient.as_str());
    let (_, search) = api
        .call(
            "POST",
            "/v1/health-files/search",
            READER,
            r#"{"national_id":"310230195410170433"}"#,
        )
        .await;
    assert_eq!(search["results"][0]["id"], patient.as_str());

    let records = api.node.audit(1, 1_000).unwrap();
    let by = |app: &str, action: estuary_node::audit::AuditAction| {
        records
            .iter()
            .filter(|r| r.app.as_deref() == Some(app) && r.action == action)
            .count()
    };
    use estuary_node::audit::AuditAction::{Read, Written};
    // Patient created, referral created, cancelled.
    assert_eq!(by("emr", Written), 3);
    // The two worklists and the two searches.
    assert_eq!(by("dashboard", Read), 4);
    assert!(
        records
            .iter()
            .all(|r| r.app.is_none() || r.institution.is_some())
    );
    let (_, check) = api.call("GET", "/admin/audit/verify", ADMIN, "").await;
    assert_eq!(check["sound"], true, "{check}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_searches_by_post_answer_as_the_get_forms_do_and_are_audited_alike() {
    let api = api();
    let patient = api.register("Jianguo").await;
    api.register("Xiuying").await;

    let (status, by_get) = api
        .call("GET", "/v1/health-files?name=lu%20jian", READER, "")
        .await;
    assert_eq!(status, StatusCode::OK, "{by_get}");
    let reads = api.reads_by("dashboard");
    let (status, by_post) = api
        .call(
            "POST",
            "/v1/health-files/search",
            READER,
            r#"{"name":"lu jian"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{by_post}");
    assert_eq!(by_post, by_get);
    assert_eq!(by_post["results"].as_array().unwrap().len(), 1);
    assert_eq!(by_post["results"][0]["id"], patient.as_str());
    assert_eq!(
        api.reads_by("dashboard"),
        2 * reads,
        "the same reads are audited"
    );
    for body in [
        r#"{}"#,
        r#"{"name":"lu","national_id":"310230195410170433"}"#,
    ] {
        let (status, error) = api
            .call("POST", "/v1/health-files/search", READER, body)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {error}");
    }
    let (status, _) = api
        .call(
            "POST",
            "/v1/health-files/search",
            "not-a-token",
            r#"{"name":"lu"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, by_get) = api.call("GET", "/fhir/Patient?name=lu", READER, "").await;
    assert_eq!(status, StatusCode::OK, "{by_get}");
    let reads = api.reads_by("dashboard");
    let (status, by_post) = api
        .call_form("/fhir/Patient/_search", READER, "name=lu")
        .await;
    assert_eq!(status, StatusCode::OK, "{by_post}");
    // The same Bundle, but for its self link, which is the request's own.
    assert_eq!(by_post["entry"], by_get["entry"]);
    assert_eq!(by_post["total"], by_get["total"]);
    assert!(
        by_get["link"][0]["url"]
            .as_str()
            .unwrap()
            .ends_with("/fhir/Patient?name=lu")
    );
    assert_eq!(by_post["type"], "searchset");
    assert_eq!(by_post["total"], 2);
    assert_eq!(api.reads_by("dashboard") - reads, 2);
    let (status, by_post) = api
        .call_form("/fhir/Patient/_search", READER, "name=lu+jian")
        .await;
    assert_eq!(status, StatusCode::OK, "{by_post}");
    assert_eq!(by_post["entry"][0]["resource"]["id"], patient.as_str());
    // FHIR's search by POST is a form; JSON is refused, and so is a form without the name.
    let (status, body) = api
        .call("POST", "/fhir/Patient/_search", READER, r#"{"name":"lu"}"#)
        .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");
    let (status, body) = api
        .call_form("/fhir/Patient/_search", READER, "family=Zhangsan")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        !body["issue"][0]["details"]["text"]
            .as_str()
            .unwrap()
            .contains("Zhangsan"),
        "{body}"
    );
    let (status, body) = api
        .call_form("/fhir/Patient/_search", "not-a-token", "name=lu")
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["issue"][0]["code"], "login", "{body}");
    // Every FHIR error is an OperationOutcome: an unknown resource, an unknown id.
    let (status, body) = api.call("GET", "/fhir/Practitioner/1", READER, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    let (status, body) = api
        .call(
            "GET",
            &format!("/fhir/Patient/{}", "0".repeat(32)),
            READER,
            "",
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["issue"][0]["code"], "not-found", "{body}");
    assert_eq!(
        body["issue"][0]["details"]["coding"][0]["code"], "not_found",
        "{body}"
    );
}

/// A resident registered twice, the duplicate linked to the main file: reads through either
/// file show both files' records, FHIR says how the files relate, and an unlink separates them
/// again. Links that cannot be made are refused with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_duplicate_reads_as_one_record_through_either_file_until_unlinked() {
    let api = api();
    let main = api.register("Jianguo").await;
    // Registered again with the given name misspelt.
    let duplicate = api.register("Jiangguo").await;
    let operate = |file: &str, op: Value| {
        let (path, body) = (
            format!("/v1/health-files/{file}/operations"),
            op.to_string(),
        );
        let api = &api;
        async move { api.call("POST", &path, WRITER, &body).await }
    };
    let allergy = |substance: &str| json!({"op": "add_allergy", "args": {"substance": substance, "reaction": "urticaria", "severity": "severe"}});
    assert_eq!(
        operate(&main, allergy("penicillin")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        operate(&duplicate, allergy("iodine contrast")).await.0,
        StatusCode::OK
    );
    let link = |to: &str| json!({"op": "link", "args": {"to": to, "reason": "same national id"}});
    let (status, body) = operate(&duplicate, link(&main)).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let read = |file: &str| {
        let path = format!("/v1/health-files/{file}");
        let api = &api;
        async move {
            let (status, body) = api.call("GET", &path, READER, "").await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body
        }
    };
    let through_duplicate = read(&duplicate).await;
    let through_main = read(&main).await;
    assert_eq!(through_duplicate["view"], through_main["view"]);
    assert_eq!(through_duplicate["linked"], through_main["linked"]);
    let linked = &through_duplicate["linked"];
    assert_eq!(linked["main"], main.as_str());
    assert_eq!(linked["files"], json!([main, duplicate]));
    assert_eq!(linked["links"][&duplicate]["value"]["to"], main.as_str());
    assert_eq!(linked["links"][&duplicate]["value"]["recorded_by"], "chc-a");
    let allergies = through_duplicate["view"]["allergies"].as_array().unwrap();
    let substances: Vec<&str> = allergies
        .iter()
        .map(|a| a["substance"].as_str().unwrap())
        .collect();
    assert_eq!(substances, ["penicillin", "iodine contrast"]);
    let iodine = allergies[1]["entry"].as_str().unwrap();
    assert_eq!(linked["entry_files"][iodine], duplicate.as_str());

    // FHIR: the duplicate is replaced by the main file, which sees the duplicate also; the
    // allergies of the resident are every file's.
    let patient = |file: &str| {
        let path = format!("/fhir/Patient/{file}");
        let api = &api;
        async move { api.call("GET", &path, READER, "").await.1 }
    };
    let link_of = |patient: &Value| {
        (
            patient["link"][0]["type"].clone(),
            patient["link"][0]["other"]["reference"].clone(),
        )
    };
    assert_eq!(
        link_of(&patient(&duplicate).await),
        (json!("replaced-by"), json!(format!("Patient/{main}")))
    );
    assert_eq!(
        link_of(&patient(&main).await),
        (json!("seealso"), json!(format!("Patient/{duplicate}")))
    );
    assert_eq!(
        api.fhir_search("AllergyIntolerance", &duplicate).await["total"],
        2
    );

    // Refused: a link to the file itself, or to a file this node does not hold.
    for to in [duplicate.clone(), "0".repeat(32)] {
        let (status, body) = operate(&duplicate, link(&to)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["error"]["code"], "link_refused", "{body}");
    }

    let unlink = json!({"op": "unlink", "args": {"reason": "two residents with one name"}});
    let (status, body) = operate(&duplicate, unlink.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let apart = read(&duplicate).await;
    assert!(apart.get("linked").is_none(), "{apart}");
    assert_eq!(apart["view"]["allergies"].as_array().unwrap().len(), 1);
    assert_eq!(
        apart["view"]["link"]["value"]["reason"],
        "two residents with one name"
    );
    assert!(read(&main).await.get("linked").is_none());
    assert!(patient(&main).await.get("link").is_none());
    // Nothing is linked any more: a second unlink says so.
    let (status, body) = operate(&duplicate, unlink).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["reason"]
            .as_str()
            .unwrap()
            .contains("not linked"),
        "{body}"
    );
}

/// A result amended by the institution that filed it: the view keeps both records, the
/// original marked; FHIR serves the corrected value under the original's id, as amended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amended_result_is_served_as_amended_with_the_corrected_value() {
    let api = api();
    let patient = api.register("Jianguo").await;
    let operations = format!("/v1/health-files/{patient}/operations");
    let result = |value: f64| {
        json!({"kind": "lab", "time": 1_790_000_000_000i64, "name": "potassium",
               "measurements": [{"name": "potassium", "value": value, "unit": "mmol/L"}]})
    };
    let op = json!({"op": "add_exam_result", "args": result(6.4)});
    let (status, body) = api.call("POST", &operations, WRITER, &op.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, file) = api
        .call("GET", &format!("/v1/health-files/{patient}"), READER, "")
        .await;
    let entry = file["view"]["exams"][0]["entry"]
        .as_str()
        .unwrap()
        .to_owned();
    let op = json!({"op": "amend", "args": {"entry": entry, "reason": "haemolysed sample; re-measured",
                    "with": {"exam_result": result(4.1)}}});
    let (status, body) = api.call("POST", &operations, WRITER, &op.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (_, file) = api
        .call("GET", &format!("/v1/health-files/{patient}"), READER, "")
        .await;
    let exams = file["view"]["exams"].as_array().unwrap();
    assert_eq!(exams.len(), 2, "{file}");
    assert_eq!(
        exams[0]["measurements"][0]["value"], 6.4,
        "the original is kept"
    );
    assert_eq!(exams[0]["amended"]["value"]["by"], exams[1]["entry"]);
    let bundle = api.fhir_search("Observation", &patient).await;
    assert_eq!(
        bundle["total"], 1,
        "the correction is served once, as the original: {bundle}"
    );
    let resource = &bundle["entry"][0]["resource"];
    assert_eq!(resource["status"], "amended");
    assert_eq!(resource["identifier"][0]["value"], entry.as_str());
    assert_eq!(resource["component"][0]["valueQuantity"]["value"], 4.1);
    // Potassium in mmol/L has one LOINC code; eGFR's depends on the formula, so it is text,
    // and says so.
    assert_eq!(
        resource["code"]["coding"][0]["code"], "2823-3",
        "{resource}"
    );
    let egfr = json!({"op": "add_exam_result", "args": {"kind": "lab", "time": 1_790_000_000_000i64, "name": "eGFR",
                      "measurements": [{"name": "eGFR", "value": 62.0, "unit": "mL/min/1.73m2"}]}});
    let (status, body) = api
        .call("POST", &operations, WRITER, &egfr.to_string())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let bundle = api.fhir_search("Observation", &patient).await;
    let code = &bundle["entry"][1]["resource"]["code"];
    assert_eq!(code["text"], "eGFR", "{bundle}");
    assert!(code["coding"].is_null(), "{code}");
    assert_eq!(code["extension"][0]["url"], "urn:estuary:fhir:uncoded");
    // Each exam is also a DiagnosticReport whose result is its Observation.
    let reports = api.fhir_search("DiagnosticReport", &patient).await;
    assert_eq!(reports["total"], 2, "{reports}");
    let report = &reports["entry"][0]["resource"];
    assert_eq!(report["status"], "amended");
    assert_eq!(report["category"][0]["coding"][0]["code"], "LAB");
    let observation = bundle["entry"][0]["resource"]["id"].as_str().unwrap();
    assert_eq!(
        report["result"][0]["reference"],
        format!("Observation/{observation}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhir_views_carry_the_required_elements() {
    let api = api();
    let patient = api.register("Jianguo").await;
    let operations = format!("/v1/health-files/{patient}/operations");
    for op in [
        json!({"op": "add_allergy", "args": {"substance": "penicillin", "reaction": "rash", "severity": "severe"}}),
        json!({"op": "add_problem", "args": {"icd10": "I10", "display": "Essential hypertension", "status": "active"}}),
        json!({"op": "add_follow_up", "args": {"time": 1_790_000_000_000i64, "systolic_mmhg": 150, "diastolic_mmhg": 95, "glucose_mmol_per_l": 6.1}}),
    ] {
        let (status, body) = api.call("POST", &operations, WRITER, &op.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{op}: {body}");
    }
    let (status, resource) = api
        .call("GET", &format!("/fhir/Patient/{patient}"), READER, "")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(resource["resourceType"], "Patient");
    assert_eq!(resource["id"], patient.as_str());
    assert!(
        resource["meta"]["lastUpdated"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(resource["gender"], "male");
    assert_eq!(resource["birthDate"], "1954-10-17");
    assert_eq!(resource["name"][0]["family"], "Lu");
    let systems: Vec<&str> = resource["identifier"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["system"].as_str().unwrap())
        .collect();
    assert!(systems.contains(&"urn:estuary:national-id"), "{systems:?}");

    let (_, bundle) = api
        .call(
            "GET",
            &format!("/fhir/Condition?patient=Patient/{patient}"),
            READER,
            "",
        )
        .await;
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "searchset");
    let coding = &bundle["entry"][0]["resource"]["code"]["coding"][0];
    assert_eq!(coding["system"], "http://hl7.org/fhir/sid/icd-10");
    assert_eq!(coding["code"], "I10");

    let bundle = api.fhir_search("Observation", &patient).await;
    assert_eq!(bundle["total"], 2, "{bundle}");
    let id_ok = |id: &str| {
        id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    for entry in bundle["entry"].as_array().unwrap() {
        assert!(id_ok(entry["resource"]["id"].as_str().unwrap()), "{entry}");
        assert_eq!(
            entry["resource"]["subject"]["reference"],
            format!("Patient/{patient}")
        );
    }
    // The follow-up was recorded in error: its institution marks it, and both of its
    // observations say so; the values stay.
    let (_, file) = api
        .call("GET", &format!("/v1/health-files/{patient}"), READER, "")
        .await;
    let entry = file["view"]["follow_ups"][0]["entry"].as_str().unwrap();
    let op = json!({"op": "mark_entered_in_error", "args": {"list": "follow_ups", "entry": entry, "reason": "another resident's reading"}});
    let (status, body) = api.call("POST", &operations, WRITER, &op.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let bundle = api.fhir_search("Observation", &patient).await;
    assert_eq!(bundle["total"], 2, "{bundle}");
    for entry in bundle["entry"].as_array().unwrap() {
        assert_eq!(entry["resource"]["status"], "entered-in-error", "{entry}");
    }
    let bundle = api.fhir_search("AllergyIntolerance", &patient).await;
    assert_eq!(
        bundle["entry"][0]["resource"]["reaction"][0]["severity"],
        "severe"
    );
    assert!(bundle["entry"][0]["resource"]["verificationStatus"].is_null());

    // A test shows the resident is not allergic: the record is refuted, not removed.
    let (_, file) = api
        .call("GET", &format!("/v1/health-files/{patient}"), READER, "")
        .await;
    let entry = file["view"]["allergies"][0]["entry"].as_str().unwrap();
    let op =
        json!({"op": "set_allergy_verification", "args": {"entry": entry, "status": "refuted"}});
    let (status, body) = api.call("POST", &operations, WRITER, &op.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let bundle = api.fhir_search("AllergyIntolerance", &patient).await;
    let resource = &bundle["entry"][0]["resource"];
    assert_eq!(
        resource["verificationStatus"]["coding"][0]["code"],
        "refuted"
    );
    assert_eq!(resource["clinicalStatus"]["coding"][0]["code"], "inactive");
    assert_eq!(resource["code"]["text"], "penicillin");

    // With the only allergy refuted, "no known allergies" can be said, and FHIR serves it.
    let op = json!({"op": "record_no_known_allergies"});
    let (status, body) = api.call("POST", &operations, WRITER, &op.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let bundle = api.fhir_search("AllergyIntolerance", &patient).await;
    assert_eq!(bundle["total"], 2, "{bundle}");
    let statement = &bundle["entry"][1]["resource"];
    assert_eq!(statement["code"]["coding"][0]["code"], "716186003");
    assert_eq!(
        statement["verificationStatus"]["coding"][0]["code"],
        "confirmed"
    );
}

/// A FHIR client pages through a search with `_count`, finds a resident by national id
/// without putting it in a URL, and reads the whole record with `$everything`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhir_searches_page_find_by_identifier_and_read_everything() {
    let api = api();
    let patient = api.register("Jianguo").await;
    api.register("Jianhua").await;
    api.register("Jianping").await;
    let (status, page) = api
        .call_form("/fhir/Patient/_search?_count=2", READER, "name=lu")
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["total"], 3);
    assert_eq!(page["entry"].as_array().unwrap().len(), 2);
    let next = page["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .expect("a next page")["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = &next[next.find("/fhir").unwrap()..];
    assert!(
        path.contains("_offset=2") && path.contains("_count=2"),
        "{path}"
    );
    let (status, second) = api.call_form(path, READER, "name=lu").await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second["entry"].as_array().unwrap().len(), 1);
    assert!(
        second["link"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["relation"] == "previous")
    );
    let (status, body) = api
        .call_form("/fhir/Patient/_search?_count=0", READER, "name=lu")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // By national id, in the body only.
    let (status, found) = api
        .call_form(
            "/fhir/Patient/_search",
            READER,
            "identifier=urn%3Aestuary%3Anational-id%7C310230195410170433",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(
        found["total"], 3,
        "all three registrations carry the id: {found}"
    );
    let (status, body) = api
        .call_form(
            "/fhir/Patient/_search",
            READER,
            "identifier=urn%3Aother%7C1",
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["resourceType"], "OperationOutcome");

    // The whole record.
    let operations = format!("/v1/health-files/{patient}/operations");
    for op in [
        json!({"op": "add_allergy", "args": {"substance": "penicillin", "reaction": "rash", "severity": "severe"}}),
        json!({"op": "add_medication", "args": {"drug": "amlodipine", "dose": "5 mg", "frequency": "once daily", "start": "2026-03-01", "days": 30}}),
    ] {
        let (status, body) = api.call("POST", &operations, WRITER, &op.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let referral = json!({"patient": patient, "direction": "up", "to": "core",
                          "reason": "chest pain", "urgency": "priority", "handover": ""});
    let (status, body) = api
        .call("POST", "/v1/referrals", WRITER, &referral.to_string())
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, everything) = api
        .call(
            "GET",
            &format!("/fhir/Patient/{patient}/$everything"),
            READER,
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{everything}");
    let kinds: Vec<&str> = everything["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["resourceType"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "Patient",
            "AllergyIntolerance",
            "MedicationRequest",
            "ServiceRequest"
        ],
        "{everything}"
    );

    // The referral's workflow as a Task, and the members as Organizations.
    let referral = body["id"].as_str().unwrap();
    let (status, task) = api
        .call("GET", &format!("/fhir/Task/{referral}"), READER, "")
        .await;
    assert_eq!(status, StatusCode::OK, "{task}");
    assert_eq!(task["status"], "requested");
    assert_eq!(task["businessStatus"]["text"], "requested");
    assert_eq!(task["owner"]["identifier"]["value"], "core");
    assert_eq!(
        task["focus"]["reference"],
        format!("ServiceRequest/{referral}")
    );
    let (_, desk) = api
        .call("GET", "/fhir/Task?owner=Organization/core", READER, "")
        .await;
    assert_eq!(desk["total"], 1, "{desk}");
    let (_, members) = api.call("GET", "/fhir/Organization", READER, "").await;
    assert_eq!(members["total"], 3, "{members}");
    let (status, core) = api.call("GET", "/fhir/Organization/core", READER, "").await;
    assert_eq!(status, StatusCode::OK, "{core}");
    assert_eq!(core["identifier"][0]["value"], "core");
}

/// Prescriptions and encounters are served as MedicationRequest and Encounter, and what is
/// served loads back, through a FHIR transaction, as the same records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prescriptions_and_encounters_are_served_and_load_back_as_the_same_records() {
    let api = api();
    let patient = api.register("Jianguo").await;
    let operations = format!("/v1/health-files/{patient}/operations");
    for op in [
        json!({"op": "add_medication", "args": {"drug": "amlodipine", "dose": "5 mg", "frequency": "once daily", "start": "2020-02-20", "days": 14}}),
        json!({"op": "add_medication", "args": {"drug": "metformin", "dose": "500 mg", "frequency": "twice daily", "start": "2099-12-20", "days": 60}}),
        json!({"op": "add_encounter", "args": {"time": 1_790_000_000_000i64, "kind": "outpatient", "note": "seen",
               "diagnoses": [{"icd10": "I10", "display": "Essential hypertension"},
                             {"icd10": {"system": "icd-10-cn-clinical", "code": "E11.900"}, "display": "Type 2 diabetes"}]}}),
    ] {
        let (status, body) = api.call("POST", &operations, WRITER, &op.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{op}: {body}");
    }
    let requests = api.fhir_search("MedicationRequest", &patient).await;
    assert_eq!(requests["total"], 2, "{requests}");
    let past = &requests["entry"][0]["resource"];
    assert_eq!(past["status"], "completed", "{past}");
    assert_eq!(past["intent"], "order");
    let validity = &past["dispenseRequest"]["validityPeriod"];
    // 14 days from 20 February 2020, a leap year.
    assert_eq!(
        (validity["start"].as_str(), validity["end"].as_str()),
        (Some("2020-02-20"), Some("2020-03-04"))
    );
    assert_eq!(
        past["dispenseRequest"]["expectedSupplyDuration"]["value"],
        14
    );
    let future = &requests["entry"][1]["resource"];
    assert_eq!(future["status"], "active", "{future}");
    assert_eq!(
        future["dispenseRequest"]["validityPeriod"]["end"],
        "2100-02-17"
    );

    let encounters = api.fhir_search("Encounter", &patient).await;
    let encounter = &encounters["entry"][0]["resource"];
    assert_eq!(encounter["status"], "finished");
    assert_eq!(encounter["class"]["code"], "AMB");
    assert_eq!(
        encounter["subject"]["reference"],
        format!("Patient/{patient}")
    );
    assert_eq!(encounter["reasonCode"][1]["coding"][0]["code"], "E11.900");
    assert_eq!(
        encounter["contained"][0]["category"][0]["coding"][0]["code"],
        "encounter-diagnosis"
    );
    assert_eq!(
        encounter["diagnosis"][1]["condition"]["reference"],
        "#diagnosis-1"
    );

    // What was served, posted back for a new resident, holds the same records.
    let url = "urn:uuid:0c1a2b3c-0000-4000-8000-0000000000aa";
    let mut entries = vec![json!({
        "fullUrl": url,
        "request": { "method": "POST", "url": "Patient" },
        "resource": { "resourceType": "Patient", "name": [{ "family": "Gu", "given": ["Guilan"] }],
                      "gender": "female", "birthDate": "1948-05-02" },
    })];
    for served in [
        &requests["entry"][0],
        &requests["entry"][1],
        &encounters["entry"][0],
    ] {
        let mut resource = served["resource"].clone();
        resource["subject"] = json!({ "reference": url });
        entries.push(json!({ "request": { "method": "POST" }, "resource": resource }));
    }
    let bundle = json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries });
    let (status, answer) = api.call("POST", "/fhir", WRITER, &bundle.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let location = answer["entry"][0]["response"]["location"].as_str().unwrap();
    let loaded = location.trim_start_matches("Patient/").to_owned();
    let read = |file: String| {
        let api = &api;
        async move {
            api.call("GET", &format!("/v1/health-files/{file}"), READER, "")
                .await
                .1["view"]
                .clone()
        }
    };
    let (original, copy) = (read(patient.clone()).await, read(loaded).await);
    for field in ["drug", "dose", "frequency", "start", "days"] {
        for index in 0..2 {
            assert_eq!(
                original["medications"][index][field], copy["medications"][index][field],
                "{field}"
            );
        }
    }
    assert_eq!(
        original["encounters"][0]["diagnoses"],
        copy["encounters"][0]["diagnoses"]
    );
    assert_eq!(
        original["encounters"][0]["kind"],
        copy["encounters"][0]["kind"]
    );
    assert_eq!(
        original["encounters"][0]["time"],
        copy["encounters"][0]["time"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_resumes_from_a_cursor_and_follows_new_changes() {
    let api = api();
    let first = api.register("First").await;
    let feed = |cursor: u64| {
        Request::builder()
            .uri(format!("/v1/changes?cursor={cursor}"))
            .header("authorization", format!("Bearer {READER}"))
            .body(Body::empty())
            .unwrap()
    };
    let mut events = Events::open(&api, feed(0)).await;
    let event = events.next().await;
    assert!(event.contains(&first), "{event}");
    assert!(event.contains("\"accepted\""), "{event}");
    let cursor: u64 = event
        .lines()
        .find_map(|l| l.strip_prefix("id:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // A change made while the feed waits arrives on it.
    let second = api.register("Second").await;
    let mut seen = events.next().await;
    while !seen.contains(&second) {
        seen = events.next().await;
    }
    // Resuming after the first event starts with the second.
    let mut resumed = Events::open(&api, feed(cursor)).await;
    let event = resumed.next().await;
    assert!(
        event.contains(&second) && !event.contains(&first),
        "{event}"
    );
}

/// A desk follows only its own referrals, or only priority ones, each event with the
/// referral's status: "accepted" reaches the sender's desk at once, and no health file's
/// event reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desk_follows_its_own_priority_referrals_with_their_status_on_the_feed() {
    let api = api();
    let patient = api.register("Jianguo").await;
    let routine = api.refer(&patient, "routine", "up").await;
    let priority = api.refer(&patient, "priority", "up").await;
    let (status, _) = api
        .call(
            "POST",
            &format!("/v1/referrals/{priority}/operations"),
            WRITER,
            r#"{"op":"cancel"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let feed = |query: &str| {
        Request::builder()
            .uri(format!("/v1/changes?{query}"))
            .header("authorization", format!("Bearer {READER}"))
            .body(Body::empty())
            .unwrap()
    };
    let mut desk = Events::open(&api, feed("referrals_of=chc-a&priority=true")).await;
    let first = desk.next().await;
    assert!(first.contains(&priority), "{first}");
    assert!(first.contains("\"priority\":true"), "{first}");
    assert!(first.contains("\"status\":\"cancelled\""), "{first}");
    // The priority referral's second change comes next: nothing of the routine one, and
    // nothing of the health file, in between.
    let second = desk.next().await;
    assert!(second.contains(&priority), "{second}");
    let mut core = Events::open(&api, feed("referrals_of=core")).await;
    let first = core.next().await;
    assert!(
        first.contains(&routine) && !first.contains(&patient),
        "{first}"
    );
    assert!(first.contains("\"status\":\"requested\""), "{first}");
    // A malformed institution is refused.
    let (status, _) = api
        .call("GET", "/v1/changes?referrals_of=not%20an%20id", READER, "")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// Server-Sent Events read off a response body.
struct Events {
    stream: axum::body::BodyDataStream,
    text: String,
}

impl Events {
    async fn open(api: &Api, request: Request<Body>) -> Self {
        let response = api.router.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        Self {
            stream: response.into_body().into_data_stream(),
            text: String::new(),
        }
    }

    /// The next event that carries data (keep-alives skipped).
    async fn next(&mut self) -> String {
        loop {
            if let Some(end) = self.text.find("\n\n") {
                let event: String = self.text.drain(..end + 2).collect();
                if event.contains("data:") {
                    return event;
                }
                continue;
            }
            let chunk =
                tokio::time::timeout(std::time::Duration::from_secs(10), self.stream.next())
                    .await
                    .expect("an event within 10 s")
                    .unwrap()
                    .unwrap();
            self.text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

#[tokio::test]
async fn repair_is_for_the_admin_and_leaves_a_sound_store_as_it_was() {
    let api = api();
    let id = api.register("Sound").await;
    let (status, _) = api.call("POST", "/admin/repair", WRITER, "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, repaired) = api.call("POST", "/admin/repair", ADMIN, "").await;
    assert_eq!(status, StatusCode::OK, "{repaired}");
    assert_eq!(repaired["discarded"], json!([]));
    assert_eq!(repaired["lost_changes"], 0);
    assert_eq!(repaired["unrepaired"], json!([]));
    let (status, _) = api
        .call("GET", &format!("/v1/health-files/{id}"), READER, "")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(api.node.verify().unwrap().problems.is_empty());
}

/// The value of the unlabelled sample `name` in Prometheus text, if present.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.parse().unwrap())
    })
}

/// Figures that move with every clinical read.
const READ_FIGURES: [&str; 4] = [
    "estuary_audit_records",
    "estuary_api_requests_total",
    "estuary_api_request_seconds_total",
    "estuary_storage_bytes",
];

#[tokio::test]
async fn metrics_that_move_with_reads_are_served_only_to_the_admin_token() {
    // The default: /metrics needs the admin token.
    let api = api();
    let id = api.register("Watched").await;
    let read = format!("/v1/health-files/{id}");
    for token in [None, Some(READER)] {
        let (status, body) = api.get_text("/metrics", token).await;
        assert!(
            [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(&status),
            "{status}: {body}"
        );
        assert!(!body.contains("estuary_"), "{body}");
    }
    let (status, before) = api.get_text("/metrics", Some(ADMIN)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(api.call("GET", &read, READER, "").await.0, StatusCode::OK);
    let (_, after) = api.get_text("/metrics", Some(ADMIN)).await;
    let audit = |text: &str| sample(text, "estuary_audit_records").unwrap();
    assert!(
        audit(&after) > audit(&before),
        "a read adds an audit record"
    );

    // Without the requirement, a caller without a token gets the rest, and the admin all.
    let api = api_with(|config| config.api.metrics_token_required = false);
    let id = api.register("Watched").await;
    let read = format!("/v1/health-files/{id}");
    let (status, before) = api.get_text("/metrics", None).await;
    assert_eq!(status, StatusCode::OK, "{before}");
    assert_eq!(api.call("GET", &read, READER, "").await.0, StatusCode::OK);
    let (_, after) = api.get_text("/metrics", None).await;
    for figure in READ_FIGURES {
        assert!(!after.contains(figure), "{figure} served without a token");
    }
    assert_eq!(sample(&after, "estuary_documents"), Some(1.0), "{after}");
    assert_eq!(before, after.replace(&uptime(&after), &uptime(&before)));
    let (status, full) = api.get_text("/metrics", Some(ADMIN)).await;
    assert_eq!(status, StatusCode::OK);
    for figure in READ_FIGURES {
        assert!(full.contains(figure), "{figure} missing for the admin");
    }
    assert!(sample(&full, "estuary_audit_records").unwrap() >= 3.0);
    let (status, _) = api.get_text("/metrics", Some(READER)).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "an app token is not the admin's"
    );
}

/// The uptime line of Prometheus text (the one figure that moves with the clock alone).
fn uptime(metrics: &str) -> String {
    metrics
        .lines()
        .find(|line| line.starts_with("estuary_uptime_seconds "))
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn health_signs_a_challenge_with_the_node_key_for_its_address() {
    let api = api();
    let challenge = Challenge::new().unwrap();
    let (status, body) = api
        .get_text(
            &format!("/health?challenge={}", challenge.nonce_hex()),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let key = api.node.public_key();
    assert_eq!(body["challenge"]["key"], key.to_string());
    let listen = ApiConfig::default().listen;
    let signature = body["challenge"]["signature"].as_str();
    challenge.verify(&key, listen, signature).unwrap();
    assert!(matches!(
        challenge.verify(&key, "127.0.0.1:9".parse().unwrap(), signature),
        Err(ChallengeError::WrongKey)
    ));
    // Without a challenge, /health answers as it always did.
    let (status, body) = api.get_text("/health", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!body.contains("signature"), "{body}");
    let (status, body) = api.get_text("/health?challenge=not-hex", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

/// The `id` of each object of a JSON array.
fn ids_of(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_owned())
        .collect()
}

/// A referral desk's worklist: green channel first, then oldest first; filtered by status,
/// urgency, direction and date; paged with `next`; and the sender's list of what it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desk_works_urgent_first_then_oldest_with_filters_and_pages() {
    let api = api();
    let patient = api.register("Jianguo").await;
    let mut sent = Vec::new();
    for (urgency, direction) in [
        ("routine", "up"),
        ("priority", "up"),
        ("routine", "down"),
        ("priority", "up"),
        ("routine", "up"),
    ] {
        sent.push(api.refer(&patient, urgency, direction).await);
        // Sent a moment apart, so that oldest first is an order to check.
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    let list = |query: String| {
        let api = &api;
        async move {
            let (status, page) = api
                .call("GET", &format!("/v1/referrals?{query}"), READER, "")
                .await;
            assert_eq!(status, StatusCode::OK, "{query}: {page}");
            (
                ids_of(&page["results"]),
                page["next"].as_str().map(str::to_owned),
            )
        }
    };
    let ids =
        |indices: &[usize]| -> Vec<String> { indices.iter().map(|&i| sent[i].clone()).collect() };
    let worked = ids(&[1, 3, 0, 2, 4]);
    assert_eq!(list("to=core".into()).await, (worked.clone(), None));
    // The sender's list holds the same referrals in the same order; no one else's desk does.
    assert_eq!(list("from=chc-a".into()).await.0, worked);
    assert!(list("from=core".into()).await.0.is_empty());
    assert_eq!(
        list("to=core&urgency=routine".into()).await.0,
        ids(&[0, 2, 4])
    );
    assert_eq!(list("to=core&direction=down".into()).await.0, ids(&[2]));
    assert_eq!(
        list("to=core&urgency=priority&direction=up".into()).await.0,
        ids(&[1, 3])
    );
    assert_eq!(list("to=core&since=1970-01-02".into()).await.0, worked);
    assert!(list("to=core&since=2999-01-01".into()).await.0.is_empty());
    assert!(list("to=core&until=1970-01-01".into()).await.0.is_empty());
    assert_eq!(list("to=core&until=2999-01-01".into()).await.0, worked);

    // Pages of two follow one another to the end.
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..5 {
        let query = match &cursor {
            None => "to=core&_count=2".to_owned(),
            Some(next) => format!("to=core&_count=2&cursor={next}"),
        };
        let (page, next) = list(query).await;
        assert!(page.len() <= 2);
        paged.extend(page);
        cursor = next;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(paged, worked);
    assert!(cursor.is_none());

    // A cancelled referral leaves the desk's open list and shows among the cancelled.
    let (status, _) = api
        .call(
            "POST",
            &format!("/v1/referrals/{}/operations", sent[1]),
            WRITER,
            r#"{"op":"cancel"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        list("to=core&status=requested".into()).await.0,
        ids(&[3, 0, 2, 4])
    );
    assert_eq!(list("to=core&status=cancelled".into()).await.0, ids(&[1]));
    assert_eq!(
        list("to=core&status=requested,cancelled".into()).await.0,
        worked
    );

    let with_patient = format!("patient={patient}&to=core");
    for (query, code) in [
        ("to=core&_count=0", "malformed_query"),
        ("to=core&_count=501", "malformed_query"),
        ("to=core&cursor=zz", "bad_cursor"),
        ("to=core&urgency=high", "malformed_query"),
        ("to=core&since=2026-02-30", "malformed_query"),
        ("to=core&status=open", "malformed_status"),
        (with_patient.as_str(), "malformed_query"),
    ] {
        let (status, body) = api
            .call("GET", &format!("/v1/referrals?{query}"), READER, "")
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(body["error"]["code"], code, "{query}: {body}");
    }
}
