//! End to end with real processes: an authority and three nodes set up with `estuary init`,
//! a roster signed with `estuary roster`, three `estuary node run` on loopback ports, and
//! clinical work through the HTTP API and the command.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::estuary;
use estuary_node::config::Config;
use serde_json::{Value, json};

/// Id, name, kind and area on the map of each institution.
const INSTITUTIONS: [(&str, &str, &str, &str); 3] = [
    (
        "xinhua",
        "Xinhua Hospital Chongming",
        "core_hospital",
        "south shore",
    ),
    (
        "chc-jianshe",
        "Jianshe Community Health Centre",
        "community_centre",
        "north shore",
    ),
    (
        "chc-baozhen",
        "Baozhen Community Health Centre",
        "community_centre",
        "south shore",
    ),
];
/// How long anything in this test may take to propagate or start.
const PATIENCE: Duration = Duration::from_secs(60);

/// Runs a command that must succeed and print JSON.
fn estuary_json(dir: &Path, args: &[&str]) -> Value {
    let output = estuary(dir, args);
    assert!(
        output.status.success(),
        "estuary {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "estuary {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `estuary node run`, killed if the test fails.
struct Running {
    child: Option<Child>,
    config: PathBuf,
    api: String,
    writer: String,
    reader: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Running {
    fn start(dir: &Path, name: &str) -> Self {
        let config_path = dir.join(name).join("estuary.toml");
        let config = Config::load(&config_path).unwrap();
        let token = |app: &str| {
            config
                .api
                .apps
                .iter()
                .find(|a| a.name == app)
                .unwrap()
                .token
                .clone()
        };
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_estuary"))
            .current_dir(dir)
            .args(["--config", config_path.to_str().unwrap(), "node", "run"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut running = Self {
            child: Some(child),
            config: config_path,
            api: format!("http://{}", config.api.listen),
            writer: token("clinical-app"),
            reader: token("dashboard"),
        };
        // Until the API answers; a node that exits or never answers fails the test with the
        // end of its log, which says why (a port taken meanwhile, a store that did not open).
        let start = Instant::now();
        while !http()
            .get(format!("{}/health", running.api))
            .call()
            .is_ok_and(|r| r.status() == 200)
        {
            let exited = running
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if exited.is_some() || start.elapsed() >= PATIENCE {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                match exited {
                    Some(status) => {
                        panic!("{name} exited ({status}) before its API answered:\n{tail}")
                    }
                    None => panic!("{name}'s API did not answer within {PATIENCE:?}:\n{tail}"),
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        running
    }

    fn wait_until(&self, what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < PATIENCE,
                "{what}: not within {PATIENCE:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn call(&self, method: &str, path: &str, token: &str, body: Option<&str>) -> (u16, Value) {
        let url = format!("{}{path}", self.api);
        let agent = http();
        let bearer = format!("Bearer {token}");
        let response = match (method, body) {
            ("GET", _) => agent.get(url).header("Authorization", bearer).call(),
            (_, body) => agent
                .post(url)
                .header("Authorization", bearer)
                .header("Content-Type", "application/json")
                .send(body.unwrap_or("")),
        }
        .unwrap();
        let status = response.status().as_u16();
        let value = response
            .into_body()
            .read_json::<Value>()
            .unwrap_or(Value::Null);
        (status, value)
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, &self.writer, None)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call("POST", path, &self.writer, Some(&body.to_string()))
    }

    /// Sends SIGTERM and waits for a clean exit.
    fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        let killed = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "the node exited with {status} on SIGTERM");
                return;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "the node did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// Data lines of the change feed of `node`, from the start, as they arrive.
fn follow_feed(node: &Running) -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    let url = format!("{}/v1/changes", node.api);
    let bearer = format!("Bearer {}", node.reader);
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        // As an SSE client does: a stream that ends is resumed from the last event seen.
        let started = Instant::now();
        let mut last_id: Option<String> = None;
        while started.elapsed() < PATIENCE {
            let mut request = agent.get(&url).header("Authorization", &bearer);
            if let Some(id) = &last_id {
                request = request.header("Last-Event-ID", id);
            }
            let Ok(response) = request.call() else {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            };
            let reader = BufReader::new(response.into_body().into_reader());
            for line in reader.lines() {
                let Ok(line) = line else { break };
                if let Some(id) = line.strip_prefix("id:") {
                    last_id = Some(id.trim().to_owned());
                } else if let Some(data) = line.strip_prefix("data:")
                    && sender.send(data.trim().to_owned()).is_err()
                {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    receiver
}

/// An authority and three institutions set up with `estuary init`, `estuary roster add` (each
/// placed on the map) and a signed roster, each node reconciling every second; not started.
fn consortium(root: &Path) {
    let authority = estuary_json(
        root,
        &["init", "--authority", "--data-dir", "auth", "--json"],
    );
    let authority_key = authority["authority_key"].as_str().unwrap().to_owned();

    let p2p: Vec<u16> = (0..3).map(|_| free_port()).collect();
    for (i, (id, name, kind, area)) in INSTITUTIONS.iter().enumerate() {
        let data_dir = format!("n{i}");
        let listen = format!("/ip4/127.0.0.1/tcp/{}", p2p[i]);
        let api = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            "init",
            "--data-dir",
            &data_dir,
            "--authority-key",
            &authority_key,
            "--listen",
            &listen,
            "--api-listen",
            &api,
            "--app",
            "clinical-app:read-write",
            "--app",
            "dashboard:read",
            "--json",
        ];
        let bootstrap = format!("/ip4/127.0.0.1/tcp/{}", p2p[0]);
        if i > 0 {
            args.extend(["--bootstrap", &bootstrap]);
        }
        let created = estuary_json(root, &args);
        let key = created["node_key"].as_str().unwrap();
        estuary_json(
            root,
            &[
                "roster",
                "add",
                "--dir",
                "auth",
                "--institution",
                id,
                "--name",
                name,
                "--kind",
                kind,
                "--key",
                key,
                "--area",
                area,
                "--json",
            ],
        );
        // Reconcile every second, so that the test does not wait on the default interval.
        let config = root.join(&data_dir).join("estuary.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(
            &config,
            text.replace("reconcile_every_s = 5", "reconcile_every_s = 1"),
        )
        .unwrap();
    }
    let signed = estuary_json(root, &["roster", "sign", "--dir", "auth", "--json"]);
    assert!(signed["version"].as_u64().unwrap() >= 9);
    for i in 0..3 {
        std::fs::copy(
            root.join("auth/roster.signed"),
            root.join(format!("n{i}/roster.signed")),
        )
        .unwrap();
    }
    let roster = estuary_json(root, &["roster", "show", "--dir", "auth", "--json"]);
    let institutions = roster["institutions"].as_array().unwrap();
    assert_eq!(institutions.len(), 3);
    assert!(
        institutions
            .iter()
            .all(|i| i["area"].as_str().unwrap().ends_with("shore"))
    );
}

#[test]
fn three_institutions_share_a_health_file_and_a_referral_through_the_api_and_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    consortium(root);
    let hospital = Running::start(root, "n0");
    let jianshe = Running::start(root, "n1");
    let baozhen = Running::start(root, "n2");
    let feed = follow_feed(&baozhen);

    // A resident registered at Jianshe.
    let (status, written) = jianshe.post(
        "/v1/health-files",
        &json!({
            "name": { "family": "Lu", "given": "Jianguo" },
            "sex": "male",
            "birth_date": "1954-10-17",
            "phone": "13800000000",
            "national_id": "310230195410170433",
        }),
    );
    assert_eq!(status, 201, "{written}");
    let patient = written["id"].as_str().unwrap().to_owned();

    // Readable at the hospital through the API and the command.
    let path = format!("/v1/health-files/{patient}");
    hospital.wait_until("the file reaches the hospital", || {
        hospital.get(&path).0 == 200
    });
    let (_, file) = hospital.get(&path);
    assert_eq!(
        file["view"]["demographics"]["name"]["value"]["family"],
        "Lu"
    );
    let config0 = hospital.config.to_str().unwrap().to_owned();
    let shown = estuary_json(
        root,
        &["--config", &config0, "--json", "patient", "show", &patient],
    );
    assert_eq!(
        shown["view"]["demographics"]["birth_date"]["value"],
        "1954-10-17"
    );

    // Baozhen's change feed delivers it.
    let start = Instant::now();
    loop {
        let line = feed
            .recv_timeout(PATIENCE.saturating_sub(start.elapsed()))
            .expect("the change feed delivers the new file");
        let event: Value = serde_json::from_str(&line).unwrap();
        if event["document"] == patient.as_str() {
            assert_eq!(event["action"], "accepted");
            assert_eq!(event["institution"], "chc-jianshe");
            break;
        }
    }

    // A priority referral up to the hospital: requested → accepted → scheduled.
    let (status, created) = jianshe.post(
        "/v1/referrals",
        &json!({
            "patient": patient, "direction": "up", "to": "xinhua",
            "reason": "suspected unstable angina", "urgency": "priority",
            "handover": "ECG and troponin attached",
        }),
    );
    assert_eq!(status, 201, "{created}");
    let referral = created["id"].as_str().unwrap().to_owned();
    let referral_path = format!("/v1/referrals/{referral}");
    hospital.wait_until("the referral reaches the hospital", || {
        hospital.get(&referral_path).0 == 200
    });
    let (_, worklist) = hospital.get("/v1/referrals?to=xinhua&status=requested");
    assert_eq!(
        worklist["results"][0]["id"],
        referral.as_str(),
        "{worklist}"
    );
    let operations = format!("{referral_path}/operations");
    let (status, body) = hospital.post(&operations, &json!({ "op": "accept" }));
    assert_eq!(status, 200, "{body}");
    let (status, body) = hospital.post(
        &operations,
        &json!({ "op": "schedule", "args": { "appointment": 1_795_600_000_000i64 } }),
    );
    assert_eq!(status, 200, "{body}");
    jianshe.wait_until("the booking reaches Jianshe", || {
        jianshe.get(&referral_path).1["view"]["status"] == "scheduled"
    });

    // Mistakes get their codes.
    let (status, body) = hospital.post(&operations, &json!({ "op": "accept" }));
    assert_eq!(status, 409, "an illegal transition: {body}");
    assert_eq!(body["error"]["code"], "illegal_transition");
    let (status, _) = jianshe.call("GET", &path, "a-token-nobody-was-given", None);
    assert_eq!(status, 401);
    let (status, body) = jianshe.call(
        "POST",
        &format!("{path}/operations"),
        &jianshe.reader,
        Some(r#"{"op":"add_allergy","args":{"substance":"penicillin","reaction":"rash","severity":"severe"}}"#),
    );
    assert_eq!(status, 403, "a read-only token writing: {body}");
    let (status, body) = jianshe.call(
        "POST",
        "/v1/health-files",
        &jianshe.writer,
        Some(r#"{"name": {"family": "Lu""#),
    );
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "malformed_json");
    assert!(!body["error"]["reason"].as_str().unwrap().is_empty());

    // FHIR views.
    let (status, fhir_patient) = hospital.get(&format!("/fhir/Patient/{patient}"));
    assert_eq!(status, 200);
    assert_eq!(fhir_patient["resourceType"], "Patient");
    assert_eq!(fhir_patient["id"], patient.as_str());
    assert!(fhir_patient["meta"]["lastUpdated"].is_string());
    assert!(fhir_patient["identifier"].as_array().unwrap().len() >= 2);
    assert_eq!(fhir_patient["name"][0]["family"], "Lu");
    assert_eq!(fhir_patient["gender"], "male");
    assert_eq!(fhir_patient["birthDate"], "1954-10-17");
    let (status, request) = hospital.get(&format!("/fhir/ServiceRequest/{referral}"));
    assert_eq!(status, 200);
    assert_eq!(request["resourceType"], "ServiceRequest");
    assert_eq!(request["status"], "active");
    assert_eq!(request["intent"], "order");
    assert_eq!(request["priority"], "urgent");
    assert_eq!(
        request["subject"]["reference"],
        format!("Patient/{patient}")
    );
    assert_eq!(request["performer"][0]["identifier"]["value"], "xinhua");
    assert!(request["meta"]["lastUpdated"].is_string());
    assert!(request["occurrenceDateTime"].is_string());
    let (_, searchset) = hospital.get("/fhir/ServiceRequest?performer=xinhua&status=active");
    assert_eq!(searchset["type"], "searchset");
    assert_eq!(searchset["total"], 1);

    // The audit log shows the hospital's read with the app's name, and its chain holds.
    let audit = estuary_json(
        root,
        &[
            "--config",
            &config0,
            "--json",
            "audit",
            "--patient",
            &patient,
        ],
    );
    let read = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "read" && r["document"] == patient.as_str())
        .unwrap_or_else(|| panic!("no read of the file in the audit log: {audit}"));
    assert_eq!(read["app"], "clinical-app");
    assert_eq!(read["institution"], "xinhua");
    let verified = estuary(root, &["--config", &config0, "audit", "--verify"]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );

    let status = estuary_json(root, &["--config", &config0, "--json", "status"]);
    assert_eq!(status["institution"], "xinhua");
    assert_eq!(status["documents"], 2);
    assert_eq!(status["network"], true);
    let peers = estuary_json(root, &["--config", &config0, "--json", "peers"]);
    assert_eq!(peers.as_object().unwrap().len(), 2, "{peers}");
    // The hospital's desk as an operator lists it: the priority referral it receives, and
    // none that it sent.
    let desk = estuary_json(
        root,
        &[
            "--config",
            &config0,
            "--json",
            "referral",
            "list",
            "--to",
            "xinhua",
            "--urgency",
            "priority",
        ],
    );
    assert_eq!(desk["results"][0]["id"], referral.as_str(), "{desk}");
    let sent = estuary_json(
        root,
        &[
            "--config", &config0, "--json", "referral", "list", "--from", "xinhua",
        ],
    );
    assert!(sent["results"].as_array().unwrap().is_empty(), "{sent}");

    // A watch reads again every second, each reading a line of JSON for a script.
    let watched = common::estuary(
        root,
        &[
            "--config", &config0, "--json", "sync", "--watch", "--every", "1", "--count", "2",
        ],
    );
    assert!(
        watched.status.success(),
        "{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    let readings: Vec<Value> = serde_json::Deserializer::from_slice(&watched.stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(readings.len(), 2);
    assert!(
        readings.iter().all(|r| r["peers"].is_object()),
        "{readings:?}"
    );

    // The courier path: Baozhen stopped, a bundle exported at the hospital and imported.
    let config2 = baozhen.config.to_str().unwrap().to_owned();
    baozhen.stop();
    let offline = estuary_json(root, &["--config", &config2, "--json", "status"]);
    assert_eq!(offline["network"], false);
    // Read as a person would, it says so first.
    let shown = common::estuary(root, &["--config", &config2, "status"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.lines()
            .next()
            .is_some_and(|first| first.starts_with("the node is not running")),
        "{text}"
    );
    let exported = estuary_json(
        root,
        &["--config", &config0, "--json", "export", "courier.bundle"],
    );
    let imported = estuary_json(
        root,
        &["--config", &config2, "--json", "import", "courier.bundle"],
    );
    assert_eq!(imported["exported_by"], "xinhua");
    // Each document carried is taken whole: at least one change of each is accepted or held.
    assert!(
        imported["accepted"].as_u64().unwrap() + imported["duplicate"].as_u64().unwrap()
            >= exported["documents_carried"].as_u64().unwrap(),
        "{imported}"
    );
    assert_eq!(
        estuary_json(root, &["--config", &config2, "--json", "status"])["documents"],
        estuary_json(root, &["--config", &config0, "--json", "status"])["documents"],
    );
    assert_eq!(imported["quarantined"], 0);
    let verify = estuary(root, &["--config", &config2, "verify"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    jianshe.stop();
    hospital.stop();
}

/// The first API port of the nodes of `stopped_consortium` (on 127.43.0.1).
const OFFLINE_API_PORT: usize = 1001;

/// An authority and three institutions set up with `estuary init` and a signed roster, none
/// of them running: commands open their data directories. Returns each node's config path
/// and node key.
fn stopped_consortium(root: &Path) -> Vec<(String, String)> {
    let authority = estuary_json(
        root,
        &["init", "--authority", "--data-dir", "auth", "--json"],
    );
    let authority_key = authority["authority_key"].as_str().unwrap().to_owned();
    let mut nodes = Vec::new();
    for (i, (id, name, kind, _)) in INSTITUTIONS.iter().enumerate() {
        let data_dir = format!("n{i}");
        let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
        // These nodes never run, so commands reach their stores directly; but a free port
        // handed out here can be taken meanwhile by a node of a test running beside this
        // one, and a command would then meet that node on the API address (and refuse to
        // send it the token). An address of the loopback range no test listens on, at a
        // port below the range the system hands out, is never taken.
        let api = format!("127.43.0.1:{}", OFFLINE_API_PORT + i);
        let created = estuary_json(
            root,
            &[
                "init",
                "--data-dir",
                &data_dir,
                "--authority-key",
                &authority_key,
                "--listen",
                &listen,
                "--api-listen",
                &api,
                "--json",
            ],
        );
        let key = created["node_key"].as_str().unwrap().to_owned();
        estuary_json(
            root,
            &[
                "roster",
                "add",
                "--dir",
                "auth",
                "--institution",
                id,
                "--name",
                name,
                "--kind",
                kind,
                "--key",
                &key,
                "--json",
            ],
        );
        let config = root.join(&data_dir).join("estuary.toml");
        nodes.push((config.to_str().unwrap().to_owned(), key));
    }
    estuary_json(root, &["roster", "sign", "--dir", "auth", "--json"]);
    for i in 0..nodes.len() {
        std::fs::copy(
            root.join("auth/roster.signed"),
            root.join(format!("n{i}/roster.signed")),
        )
        .unwrap();
    }
    nodes
}

/// Registers a resident on a stopped node, through the library as its API would.
fn register_offline(config_path: &str) {
    use estuary_node::model::{Editor, Timestamp};
    use estuary_node::replica::{Node, NodeConfig};
    let config = Config::load(Path::new(config_path)).unwrap();
    let roster = std::fs::read(config.roster.as_ref().unwrap()).unwrap();
    let node = Node::open(
        &NodeConfig {
            data_dir: config.data_dir.clone(),
            authority: config.authority_key().unwrap(),
            store_engine: Default::default(),
        },
        Some(&roster),
    )
    .unwrap();
    let editor = Editor {
        institution: node.institution().clone(),
        at: Timestamp(1_790_000_000_000),
    };
    let demographics = serde_json::from_value(json!({
        "name": { "family": "Lu", "given": "Jianguo" },
        "sex": "male",
        "birth_date": "1954-10-17",
    }))
    .unwrap();
    node.create_health_file(&editor, &demographics).unwrap();
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Runs a command that must fail with `code`; returns its error output.
fn estuary_fails(dir: &Path, args: &[&str], code: i32) -> String {
    let output = estuary(dir, args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(code),
        "estuary {args:?}: {stderr}"
    );
    stderr
}

#[test]
fn a_courier_bundle_is_private_to_its_owner_and_opens_only_on_the_node_it_is_encrypted_to() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let nodes = stopped_consortium(root);
    let [(hospital, _), (jianshe, jianshe_key), (baozhen, _)] = &nodes[..] else {
        unreachable!("three institutions");
    };
    register_offline(hospital);

    // In clear: readable by its owner only, and never written over unless asked.
    let exported = estuary_json(
        root,
        &["--config", hospital, "--json", "export", "clear.bundle"],
    );
    assert!(
        exported["documents_carried"].as_u64().unwrap() >= 1,
        "{exported}"
    );
    assert_eq!(mode_of(&root.join("clear.bundle")), 0o600);
    let before = std::fs::read(root.join("clear.bundle")).unwrap();
    let refused = estuary_fails(root, &["--config", hospital, "export", "clear.bundle"], 1);
    assert!(refused.contains("--force"), "{refused}");
    assert_eq!(std::fs::read(root.join("clear.bundle")).unwrap(), before);
    estuary_json(
        root,
        &[
            "--config",
            hospital,
            "--json",
            "export",
            "--force",
            "clear.bundle",
        ],
    );
    assert_eq!(mode_of(&root.join("clear.bundle")), 0o600);

    // Encrypted to Jianshe's node key.
    let sealed = estuary_json(
        root,
        &[
            "--config",
            hospital,
            "--json",
            "export",
            "--to",
            jianshe_key,
            "sealed.bundle",
        ],
    );
    assert_eq!(sealed["encrypted_to"], jianshe_key.as_str(), "{sealed}");
    assert_eq!(sealed["recipient"], "chc-jianshe", "{sealed}");
    let path = root.join("sealed.bundle");
    assert_eq!(mode_of(&path), 0o600);
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes.starts_with(b"ESTUARY-SEALED1\n"));
    assert!(
        !bytes.windows(b"Jianguo".len()).any(|w| w == b"Jianguo"),
        "the resident's name is in the encrypted bundle in clear"
    );
    assert!(!root.join("sealed.partial").exists());
    // A key the roster does not list is refused before anything is written.
    let stranger = "ab".repeat(32);
    let refused = estuary_fails(
        root,
        &[
            "--config",
            hospital,
            "export",
            "--to",
            &stranger,
            "stranger.bundle",
        ],
        1,
    );
    assert!(refused.contains("roster"), "{refused}");
    assert!(!root.join("stranger.bundle").exists());

    // Another node's key refuses it, naming the key it is for.
    let refused = estuary_fails(root, &["--config", baozhen, "import", "sealed.bundle"], 3);
    assert!(
        refused.contains(&format!("encrypted to node key {}", &jianshe_key[..16]))
            && refused.contains("not to this node's"),
        "{refused}"
    );
    // A flipped byte, and a file cut short, are refused.
    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    std::fs::write(root.join("flipped.bundle"), &flipped).unwrap();
    let refused = estuary_fails(root, &["--config", jianshe, "import", "flipped.bundle"], 3);
    assert!(refused.contains("altered or cut short"), "{refused}");
    std::fs::write(root.join("short.bundle"), &bytes[..bytes.len() - 1]).unwrap();
    let refused = estuary_fails(root, &["--config", jianshe, "import", "short.bundle"], 3);
    assert!(refused.contains("altered or cut short"), "{refused}");
    let status = estuary_json(root, &["--config", jianshe, "--json", "status"]);
    assert_eq!(
        status["documents"], 0,
        "nothing of a refused bundle is imported"
    );

    // Jianshe opens it with its own key.
    let imported = estuary_json(
        root,
        &["--config", jianshe, "--json", "import", "sealed.bundle"],
    );
    assert_eq!(imported["exported_by"], "xinhua");
    assert_eq!(imported["encrypted"], true);
    assert!(
        imported["accepted"].as_u64().unwrap() >= sealed["documents_carried"].as_u64().unwrap(),
        "{imported}"
    );
    assert_eq!(imported["quarantined"], 0);
    let status = estuary_json(root, &["--config", jianshe, "--json", "status"]);
    assert_eq!(status["documents"], 1);
}

/// A stand-in for a node's API that answers every request and keeps each request line and
/// body, so a test sees exactly what the command sent.
/// An HTTP stand-in on loopback that records every request line and body. It answers the
/// command's `/health` challenge as the node whose data directory is `node_dir` would (the
/// key is read when the challenge comes, after `init` made it), so the command goes on.
fn recording_server(
    node_dir: std::path::PathBuf,
) -> (std::net::SocketAddr, mpsc::Receiver<(String, String)>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let sender = sender.clone();
            let node_dir = node_dir.clone();
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut length = 0;
                    loop {
                        let mut header = String::new();
                        reader.read_line(&mut header).unwrap();
                        let header = header.trim();
                        if header.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = header.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    let answer = if request_line.starts_with("GET /health") {
                        challenge_answer(&node_dir, &request_line, address)
                    } else {
                        r#"{"results":[]}"#.to_owned()
                    };
                    let _ = sender.send((
                        request_line.trim().to_owned(),
                        String::from_utf8_lossy(&body).into_owned(),
                    ));
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if writer.write_all(response.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (address, receiver)
}

/// `/health`'s answer, signing the request's challenge with the key in `node_dir`.
fn challenge_answer(
    node_dir: &std::path::Path,
    request_line: &str,
    listen: std::net::SocketAddr,
) -> String {
    let Some(nonce) = request_line
        .split_whitespace()
        .nth(1)
        .and_then(|target| target.split_once("challenge="))
        .map(|(_, nonce)| nonce.to_owned())
    else {
        return r#"{"status":"ok"}"#.to_owned();
    };
    let identity = estuary_node::identity::Identity::load(node_dir).unwrap();
    let nonce: [u8; 32] = (0..32)
        .map(|i| u8::from_str_radix(&nonce[2 * i..2 * i + 2], 16).unwrap())
        .collect::<Vec<u8>>()
        .try_into()
        .unwrap();
    json!({
        "status": "ok",
        "challenge": {
            "key": identity.public_key().to_string(),
            "signature": estuary_node::api::answer_challenge(&identity, &nonce, listen),
        },
    })
    .to_string()
}

#[test]
fn patient_search_sends_the_name_in_the_body_never_in_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let authority = estuary_json(
        root,
        &["init", "--authority", "--data-dir", "auth", "--json"],
    );
    let (address, requests) = recording_server(root.join("n0"));
    let api = address.to_string();
    estuary_json(
        root,
        &[
            "init",
            "--data-dir",
            "n0",
            "--authority-key",
            authority["authority_key"].as_str().unwrap(),
            "--api-listen",
            &api,
            "--json",
        ],
    );
    estuary_json(
        root,
        &[
            "--config",
            "n0/estuary.toml",
            "--json",
            "patient",
            "search",
            "Zhang Xiuying",
        ],
    );
    let seen: Vec<(String, String)> = requests.try_iter().collect();
    let search = seen
        .iter()
        .find(|(line, _)| !line.starts_with("GET /health"))
        .unwrap_or_else(|| panic!("no search request: {seen:?}"));
    assert!(
        search.0.starts_with("POST /v1/health-files/search "),
        "{seen:?}"
    );
    let body: Value = serde_json::from_str(&search.1).unwrap();
    assert_eq!(body, json!({ "name": "Zhang Xiuying" }));
    for (line, _) in &seen {
        assert!(
            !line.contains("Zhang") && !line.contains("name="),
            "a name in a URL: {line}"
        );
    }
}

/// A member joining loads its residents' records with `estuary import`: each resident one
/// health file, a bad line refused by its number (counted across the chunks the command
/// sends), and a second run adds nothing.
#[test]
fn a_member_loads_its_residents_records_and_a_second_load_adds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let nodes = stopped_consortium(root);
    let jianshe = &nodes[1].0;
    let record = include_str!("../../node/tests/data/resident.json").trim();
    let mut lines = Vec::new();
    for i in 0..700 {
        lines.push(record.replace("310230195410170433", &format!("3102301954101{i:05}")));
    }
    lines[9] = String::new(); // A blank line: skipped, still counted.
    lines[599] = lines[599].replace("\"sex\":\"female\"", "\"sex\":\"feminine\"");
    std::fs::write(root.join("members.ndjson"), lines.join("\n") + "\n").unwrap();
    let documents = |root| {
        estuary_json(root, &["--config", jianshe, "--json", "status"])["documents"]
            .as_u64()
            .unwrap()
    };
    let before = documents(root);

    let output = estuary(
        root,
        &["--config", jianshe, "--json", "import", "members.ndjson"],
    );
    assert_eq!(output.status.code(), Some(6), "{output:?}");
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["loaded"], 698, "{answer}");
    let refused = answer["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{answer}");
    assert_eq!(refused[0]["line"], 600);
    assert_eq!(refused[0]["code"], "invalid_record");
    assert!(
        refused[0]["reason"]
            .as_str()
            .unwrap()
            .contains("demographics.sex"),
        "{answer}"
    );

    let again = estuary(
        root,
        &["--config", jianshe, "--json", "import", "members.ndjson"],
    );
    let answer: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(answer["loaded"], 0, "{answer}");
    let codes: std::collections::BTreeMap<String, usize> = answer["refused"]
        .as_array()
        .unwrap()
        .iter()
        .fold(Default::default(), |mut counts, r| {
            *counts
                .entry(r["code"].as_str().unwrap().to_owned())
                .or_default() += 1;
            counts
        });
    assert_eq!(codes["already_held"], 698, "{codes:?}");
    assert_eq!(documents(root), before + 698);

    // A FHIR transaction Bundle (`.json`): all or nothing.
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{
            "fullUrl": "urn:uuid:7f000000-0000-4000-8000-000000000001",
            "request": { "method": "POST", "url": "Patient" },
            "resource": {
                "resourceType": "Patient",
                "name": [{ "family": "Cai", "given": ["Xiuying"] }],
                "gender": "female",
                "birthDate": "1939-02-11",
            },
        }],
    });
    std::fs::write(root.join("members.json"), bundle.to_string()).unwrap();
    let loaded = estuary_json(
        root,
        &["--config", jianshe, "--json", "import", "members.json"],
    );
    assert_eq!(loaded["loaded"], 1, "{loaded}");
    assert_eq!(documents(root), before + 699);
}

/// A headless Chromium: Debian's `chromium` package (which `bash .ci/test` installs).
fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "the dashboard test needs Chromium: install Debian's chromium package (bash .ci/test does)"
    )
}

/// How long the browser may take to answer one command.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);

/// A headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
/// it reads NUL-terminated JSON commands on fd 3 and writes answers and events on fd 4), with
/// one page open: what a person watching the dashboard sees, as it updates.
struct Browser {
    child: Child,
    commands: std::process::ChildStdin,
    answers: mpsc::Receiver<Value>,
    session: String,
    next_id: u64,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Starts Chromium with a fresh profile under `profile` and opens `url` in a page of
    /// `width` × `height` CSS pixels.
    fn open(chromium: &Path, profile: &Path, url: &str, width: u32, height: u32) -> Self {
        // The shell hands Chromium this process's pipes as the fds the protocol uses.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null"#)
            .arg(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium starts");
        let commands = child.stdin.take().unwrap();
        let mut output = child.stdout.take().unwrap();
        let (sender, answers) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buffered = Vec::new();
            let mut chunk = [0u8; 64 * 1024];
            loop {
                let read = match std::io::Read::read(&mut output, &mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(read) => read,
                };
                buffered.extend_from_slice(&chunk[..read]);
                while let Some(end) = buffered.iter().position(|b| *b == 0) {
                    let message: Vec<u8> = buffered.drain(..=end).collect();
                    let Ok(value) = serde_json::from_slice::<Value>(&message[..end]) else {
                        continue;
                    };
                    if sender.send(value).is_err() {
                        return;
                    }
                }
            }
        });
        let mut browser = Self {
            child,
            commands,
            answers,
            session: String::new(),
            next_id: 0,
        };
        let target = browser.command("Target.createTarget", json!({ "url": "about:blank" }));
        let attached = browser.command(
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        browser.session = attached["sessionId"].as_str().unwrap().to_owned();
        browser.command(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
        browser.command("Page.navigate", json!({ "url": url }));
        browser
    }

    /// Sends a command (to the page, once one is attached) and returns its result.
    fn command(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        std::io::Write::write_all(&mut self.commands, &bytes).expect("chromium takes commands");
        let start = Instant::now();
        loop {
            let left = BROWSER_TIMEOUT.saturating_sub(start.elapsed());
            let answer = self.answers.recv_timeout(left).unwrap_or_else(|_| {
                panic!("chromium did not answer {method} within {BROWSER_TIMEOUT:?}")
            });
            if answer["id"] == id {
                assert!(answer["error"].is_null(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    fn evaluate(&mut self, expression: &str) -> Value {
        let result = self.command(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        result["result"]["value"].clone()
    }

    /// What the dashboard shows now: each member's state and lag in the table and on the map,
    /// the feed's rows (cursor and text), and the whole page's markup (nothing while the page
    /// is still loading).
    fn dashboard(&mut self) -> Dashboard {
        let shown = self.evaluate(
            r##"JSON.stringify({
                ready: document.body?.dataset.ready === "true",
                rows: [...document.querySelectorAll("tr[data-member]")].map(r =>
                    [r.dataset.member, r.dataset.state, r.dataset.lag]),
                map: [...document.querySelectorAll("[data-map-member]")].map(g =>
                    [g.getAttribute("data-map-member"), g.getAttribute("data-state")]),
                feed: [...document.querySelectorAll("#feed-rows tr")].map(r =>
                    [Number(r.dataset.cursor), r.textContent]),
                feedState: document.getElementById("feed-state")?.textContent ?? "",
                records: Number((/^(\d+) records/.exec(document.getElementById("audit")?.textContent ?? "") || [0, 0])[1]),
                html: document.documentElement.outerHTML,
            })"##,
        );
        // Before the page has loaded (the navigation has only started), nothing is shown.
        match shown.as_str() {
            Some(text) => serde_json::from_str(text).unwrap(),
            None => Dashboard::default(),
        }
    }

    /// A screenshot of the page as it is, PNG.
    fn screenshot(&mut self) -> Vec<u8> {
        let shot = self.command("Page.captureScreenshot", json!({ "format": "png" }));
        base64_decode(shot["data"].as_str().unwrap())
    }
}

/// What the dashboard page shows, as `Browser::dashboard` reads it.
#[derive(serde::Deserialize, Debug, Default)]
struct Dashboard {
    ready: bool,
    rows: Vec<(String, String, String)>,
    map: Vec<(String, String)>,
    feed: Vec<(u64, String)>,
    #[serde(rename = "feedState")]
    feed_state: String,
    records: u64,
    html: String,
}

impl Dashboard {
    /// A member's state and lag in the table, and its state on the map.
    fn member(&self, id: &str) -> Option<(&str, Option<u64>, Option<&str>)> {
        let (_, state, lag) = self.rows.iter().find(|(member, _, _)| member == id)?;
        let on_map = self
            .map
            .iter()
            .find(|(member, _)| member == id)
            .map(|(_, state)| state.as_str());
        Some((state, lag.parse().ok(), on_map))
    }
}

/// Standard base64 (what the DevTools protocol sends binary data as).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|c| *c != b'=').map(value).collect();
    digits
        .chunks(4)
        .flat_map(|group| {
            let word = group
                .iter()
                .enumerate()
                .fold(0u32, |word, (i, d)| word | u32::from(*d) << (18 - 6 * i));
            let bytes = word.to_be_bytes();
            bytes[1..group.len()].to_vec()
        })
        .collect()
}

/// Where tests leave what a person looks at afterwards: `ESTUARY_REPORT_DIR`, or the
/// workspace's `testnet-report/`.
fn report_dir() -> PathBuf {
    let dir = std::env::var_os("ESTUARY_REPORT_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../testnet-report"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The operators' dashboard in a real browser, watched live. Three node processes; headless
/// Chromium keeps the hospital's `/dashboard` open (the address `estuary dashboard` prints)
/// and waits for the two other members to show connected. One of them is stopped (a
/// partition, as far as the hospital can tell): the open page turns it disconnected, and its
/// lag grows with each file the hospital registers while it is gone; the registrations
/// reach the page's feed through its live stream. A screenshot is kept in the report folder.
#[test]
fn the_dashboard_shows_a_member_disconnect_and_its_lag_grow_in_a_browser() {
    let chromium = chromium();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    consortium(root);
    let hospital = Running::start(root, "n0");
    let _jianshe = Running::start(root, "n1");
    let baozhen = Running::start(root, "n2");
    // The address as the command gives it to an operator.
    let config = hospital.config.to_str().unwrap().to_owned();
    let shown = estuary_json(root, &["--config", &config, "dashboard", "--json"]);
    let url = shown["url"].as_str().unwrap().to_owned();
    let admin = Config::load(&hospital.config).unwrap().api.admin_token;
    assert_eq!(url, format!("{}/dashboard#token={admin}", hospital.api));
    let mut browser = Browser::open(&chromium, &root.join("browser"), &url, 1400, 1600);

    let mut page = Dashboard::default();
    hospital.wait_until("the dashboard shows both other members connected", || {
        page = browser.dashboard();
        page.member("xinhua").is_some_and(|m| m.0 == "this_node")
            && page.member("chc-jianshe") == Some(("connected", Some(0), Some("connected")))
            && page.member("chc-baozhen") == Some(("connected", Some(0), Some("connected")))
    });
    assert!(page.ready);
    assert!(page.html.contains("north shore") && page.html.contains("south shore"));
    // What the feed held when the page opened; what comes later arrives live.
    let opened_at = page.records;

    baozhen.stop();
    let mut lag_when_gone = 0;
    hospital.wait_until("the open page turns Baozhen disconnected", || {
        page = browser.dashboard();
        match page.member("chc-baozhen") {
            Some(("disconnected", Some(lag), Some("disconnected"))) => {
                lag_when_gone = lag;
                true
            }
            _ => false,
        }
    });

    let mut registered = Vec::new();
    for given in ["Jianguo", "Meilan", "Xiaoming"] {
        let (status, written) = hospital.post(
            "/v1/health-files",
            &json!({"name": {"family": "Lu", "given": given}, "sex": "female",
                    "birth_date": "1950-03-02"}),
        );
        assert_eq!(status, 201, "{written}");
        registered.push(written["id"].as_str().unwrap().to_owned());
    }
    hospital.wait_until(
        "Baozhen's lag grows and the feed shows the files, live",
        || {
            page = browser.dashboard();
            let grown = matches!(page.member("chc-baozhen"),
            Some(("disconnected", Some(lag), _)) if lag >= lag_when_gone + 3);
            let live = registered.iter().all(|id| {
                page.feed
                    .iter()
                    .any(|(cursor, text)| *cursor > opened_at && text.contains(&id[..12]))
            });
            grown && live
        },
    );
    assert_eq!(page.feed_state, "(live)");
    let lag = page.member("chc-baozhen").unwrap().1.unwrap();
    assert!(
        page.html.contains(&format!("lag {lag}")),
        "the map shows the lag"
    );
    for private in ["Jianguo", "Meilan", "1950-03-02"] {
        assert!(
            !page.html.contains(private),
            "{private} is on the dashboard"
        );
    }

    let png = browser.screenshot();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    std::fs::write(report_dir().join("dashboard.png"), &png).unwrap();
}
