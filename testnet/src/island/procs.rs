//! Each node a real `estuary node run` process on 127.0.0.1 ports, written to and read through
//! its HTTP API. A crash is SIGKILL; a restart starts the process again on the same data
//! directory. Partitions and loss are not injected here (real TCP has no fault layer): this
//! mode proves the shipped binary, the in-process mode the fault schedule.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use estuary_node::config::{ApiConfig, AppToken, Config, NetworkConfig, Scope, generate_token};
use estuary_node::model::automerge::ChangeHash;
use estuary_node::model::{Bytes32, DocumentId, HealthFileView};
use estuary_node::sync::faults::Faults;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::check::{DocumentState, NodeState};
use super::cluster::{Cluster, Made, NetworkFaults, Skip, Traffic, Write, exam_correction};
use super::proxy::Proxy;

/// How long a started process may take to answer on its API.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node may take to stop on SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest admin answer read, in bytes (a page of 1,000 documents with their change hashes).
const RESPONSE_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// How long one API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

struct Process {
    config: PathBuf,
    api: String,
    admin: String,
    app: String,
    child: Option<Child>,
    log: PathBuf,
}

pub struct Procs {
    binary: PathBuf,
    nodes: Vec<Process>,
    agent: ureq::Agent,
    past: Traffic,
    /// The faults in force, which the proxy between the processes applies.
    faults: Arc<Faults>,
    applied: NetworkFaults,
    /// Every link between the processes runs through it; stopped last.
    _proxy: Proxy,
}

/// A port free now, below the system's ephemeral range: a port the system hands out would
/// soon be taken again by the nodes' own outgoing connections.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    for _ in 0..1_000 {
        let mut bytes = [0u8; 2];
        getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        let port = 20_000 + u16::from_le_bytes(bytes) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port between 20000 and 32000")
}

/// Each node's log, in its data directory.
pub const NODE_LOG: &str = "node.log";

impl Procs {
    /// Writes each node's config beside its key and roster, and starts the processes.
    /// Each node dials its peers through the fault proxy, which draws its faults from `seed`.
    pub fn start(
        binary: &Path,
        seed: u64,
        data_dirs: Vec<PathBuf>,
        authority: Bytes32,
        roster: &[u8],
        links: &[Vec<usize>],
    ) -> anyhow::Result<Self> {
        let p2p: Vec<u16> = (0..data_dirs.len())
            .map(|_| free_port())
            .collect::<anyhow::Result<_>>()?;
        let faults = Faults::new(seed);
        let proxy = Proxy::start(faults.clone(), links, &p2p)?;
        let mut nodes = Vec::new();
        for (i, dir) in data_dirs.iter().enumerate() {
            std::fs::write(dir.join("roster.signed"), roster)?;
            let api = ApiConfig {
                listen: format!("127.0.0.1:{}", free_port()?).parse()?,
                admin_token: generate_token()?,
                apps: vec![AppToken {
                    name: "island-workload".into(),
                    token: generate_token()?,
                    scope: Scope::ReadWrite,
                }],
                ..ApiConfig::default()
            };
            let config = Config {
                data_dir: ".".into(),
                authority: authority.to_string(),
                roster: Some("roster.signed".into()),
                store: Default::default(),
                network: NetworkConfig {
                    listen: vec![format!("/ip4/127.0.0.1/tcp/{}", p2p[i])],
                    bootstrap: links[i]
                        .iter()
                        .map(|p| {
                            proxy
                                .port(i, *p)
                                .map(|port| format!("/ip4/127.0.0.1/tcp/{port}"))
                                .context("a link the proxy does not carry")
                        })
                        .collect::<anyhow::Result<_>>()?,
                    reconcile_every_s: 1,
                    ..NetworkConfig::default()
                },
                api,
            };
            let path = dir.join("estuary.toml");
            std::fs::write(&path, config.template())?;
            nodes.push(Process {
                config: path,
                api: format!("http://{}", config.api.listen),
                admin: config.api.admin_token.clone(),
                app: config.api.apps[0].token.clone(),
                child: None,
                log: dir.join(NODE_LOG),
            });
        }
        let mut procs = Self {
            binary: binary.to_owned(),
            nodes,
            agent: crate::node_process::api_agent(REQUEST_TIMEOUT),
            past: Traffic::default(),
            faults,
            applied: NetworkFaults::default(),
            _proxy: proxy,
        };
        for node in 0..procs.nodes.len() {
            procs.restart(node)?;
        }
        Ok(procs)
    }

    /// An admin read; anything but success is an error.
    fn get(&self, node: usize, path: &str) -> anyhow::Result<Value> {
        let process = &self.nodes[node];
        self.get_as(node, path, &process.admin)?
            .with_context(|| format!("node {node}: GET {path} answered 404"))
    }

    /// A read with `token`: `None` if the node answers 404, an error for any other failure.
    fn get_as(&self, node: usize, path: &str, token: &str) -> anyhow::Result<Option<Value>> {
        let process = &self.nodes[node];
        let mut response = self
            .agent
            .get(format!("{}{path}", process.api))
            .header("Authorization", format!("Bearer {token}"))
            .call()
            .with_context(|| format!("node {node}: GET {path}"))?;
        if response.status().as_u16() == 404 {
            return Ok(None);
        }
        anyhow::ensure!(
            response.status().is_success(),
            "node {node}: GET {path} answered {}",
            response.status()
        );
        Ok(Some(
            response
                .body_mut()
                .with_config()
                .limit(RESPONSE_BYTES_MAX)
                .read_json()?,
        ))
    }

    /// Every document with its heads and changes, page by page.
    fn documents(&self, node: usize) -> anyhow::Result<Vec<Value>> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(after) => format!("/admin/documents?after={after}"),
                None => "/admin/documents".into(),
            };
            let page = self.get(node, &path)?;
            all.extend(page["documents"].as_array().cloned().unwrap_or_default());
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => return Ok(all),
            }
        }
    }

    fn traffic_of(&self, node: usize) -> Traffic {
        let mut traffic = Traffic::default();
        if let Ok(stats) = self.get(node, "/admin/sync") {
            for peer in stats["peers"]
                .as_object()
                .into_iter()
                .flat_map(|p| p.values())
            {
                let n = |k: &str| peer[k].as_u64().unwrap_or(0);
                traffic.wire_bytes += n("bytes_out");
                traffic.messages += n("messages_out");
                traffic.rejected_changes += n("changes_rejected");
            }
        }
        traffic
    }
}

fn hex_to_bytes<const N: usize>(text: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Cluster for Procs {
    fn len(&self) -> usize {
        self.nodes.len()
    }

    fn is_up(&self, node: usize) -> bool {
        self.nodes[node].child.is_some()
    }

    fn write(&mut self, node: usize, write: &Write) -> anyhow::Result<Result<Made, Skip>> {
        let process = &self.nodes[node];
        if process.child.is_none() {
            return Ok(Err(Skip::NodeDown));
        }
        let corrected;
        let write = match write {
            Write::CorrectOwnExam(id, institution) => {
                let path = format!("/v1/health-files/{id}");
                let Some(answer) = self.get_as(node, &path, &process.app)? else {
                    return Ok(Err(Skip::NotYetHere));
                };
                let file: HealthFileView = serde_json::from_value(answer["view"].clone())
                    .with_context(|| format!("node {node}: GET {path}: not a health file"))?;
                let Some(op) = exam_correction(&file, institution) else {
                    return Ok(Err(Skip::NothingToCorrect));
                };
                corrected = Write::HealthFile(*id, op);
                &corrected
            }
            write => write,
        };
        let (path, body) = match write {
            Write::CreateHealthFile(d) => ("/v1/health-files".to_owned(), serde_json::to_value(d)?),
            Write::HealthFile(id, op) => (
                format!("/v1/health-files/{id}/operations"),
                serde_json::to_value(op)?,
            ),
            Write::CreateReferral(r) => ("/v1/referrals".to_owned(), serde_json::to_value(r)?),
            Write::CorrectOwnExam(..) => {
                anyhow::bail!("a correction is made as a health-file write")
            }
            Write::Referral(id, op) => (
                format!("/v1/referrals/{id}/operations"),
                serde_json::to_value(op)?,
            ),
        };
        let mut response = self
            .agent
            .post(format!("{}{path}", process.api))
            .header("Authorization", format!("Bearer {}", process.app))
            .send_json(&body)
            .with_context(|| format!("node {node}: POST {path}"))?;
        let status = response.status().as_u16();
        let answer: Value = response.body_mut().read_json().unwrap_or(Value::Null);
        match status {
            200 | 201 => {
                let id = answer["id"]
                    .as_str()
                    .and_then(|t| DocumentId::parse(t).ok())
                    .context("a write's answer without an id")?;
                let change = answer["change"]
                    .as_str()
                    .and_then(hex_to_bytes::<32>)
                    .map(ChangeHash)
                    .context("a write's answer without a change")?;
                let onward = &answer["onward"];
                let onward = match onward.is_null() {
                    true => None,
                    false => Some((
                        onward["id"]
                            .as_str()
                            .and_then(|t| DocumentId::parse(t).ok())
                            .context("a redirect's answer without its onward referral")?,
                        onward["change"]
                            .as_str()
                            .and_then(hex_to_bytes::<32>)
                            .map(ChangeHash)
                            .context("a redirect's answer without its onward change")?,
                    )),
                };
                Ok(Ok(Made { id, change, onward }))
            }
            404 => Ok(Err(Skip::NotYetHere)),
            // A link to a file that has not reached the node yet.
            422 if answer["error"]["code"] == "link_refused" => Ok(Err(Skip::NotYetHere)),
            403 | 409 => Ok(Err(Skip::Refused)),
            _ => anyhow::bail!(
                "node {node}: POST {path} answered {status}: {}",
                answer["error"]["reason"]
            ),
        }
    }

    fn load(
        &mut self,
        node: usize,
        ndjson: &str,
    ) -> anyhow::Result<Result<Vec<(DocumentId, ChangeHash)>, Skip>> {
        let process = &self.nodes[node];
        if process.child.is_none() {
            return Ok(Err(Skip::NodeDown));
        }
        let mut response = self
            .agent
            .post(format!("{}/v1/import", process.api))
            .header("Authorization", format!("Bearer {}", process.app))
            .header("Content-Type", "application/x-ndjson")
            .send(ndjson)
            .with_context(|| format!("node {node}: POST /v1/import"))?;
        let status = response.status().as_u16();
        let answer: Value = response.body_mut().read_json().unwrap_or(Value::Null);
        match status {
            200 => answer["loaded"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|loaded| {
                    let id = loaded["id"]
                        .as_str()
                        .and_then(|t| DocumentId::parse(t).ok());
                    let change = loaded["change"].as_str().and_then(hex_to_bytes::<32>);
                    id.zip(change.map(ChangeHash))
                        .context("a load's answer without an id or a change")
                })
                .collect::<anyhow::Result<_>>()
                .map(Ok),
            403 | 409 => Ok(Err(Skip::Refused)),
            _ => anyhow::bail!(
                "node {node}: POST /v1/import answered {status}: {}",
                answer["error"]["reason"]
            ),
        }
    }

    fn main_file(&mut self, node: usize, id: DocumentId) -> anyhow::Result<Option<DocumentId>> {
        let process = &self.nodes[node];
        if process.child.is_none() {
            return Ok(None);
        }
        let path = format!("/v1/health-files/{id}");
        let Some(answer) = self.get_as(node, &path, &process.app)? else {
            return Ok(None);
        };
        Ok(match answer["linked"]["main"].as_str() {
            Some(main) => {
                Some(DocumentId::parse(main).ok().with_context(|| {
                    format!("node {node}: GET {path}: a main file that is no id")
                })?)
            }
            None => Some(id),
        })
    }

    fn read(&mut self, node: usize, id: DocumentId) -> anyhow::Result<Option<Duration>> {
        let process = &self.nodes[node];
        if process.child.is_none() {
            return Ok(None);
        }
        let path = format!("/v1/health-files/{id}");
        let started = Instant::now();
        let mut response = self
            .agent
            .get(format!("{}{path}", process.api))
            .header("Authorization", format!("Bearer {}", process.app))
            .call()
            .with_context(|| format!("node {node}: GET {path}"))?;
        let took = started.elapsed();
        match response.status().as_u16() {
            200 => Ok(Some(took)),
            404 => Ok(None),
            status => {
                let answer: Value = response.body_mut().read_json().unwrap_or(Value::Null);
                anyhow::bail!(
                    "node {node}: GET {path} answered {status}: {}",
                    answer["error"]["reason"]
                )
            }
        }
    }

    fn crash(&mut self, node: usize) -> anyhow::Result<()> {
        let traffic = self.traffic_of(node);
        self.past.wire_bytes += traffic.wire_bytes;
        self.past.messages += traffic.messages;
        self.past.rejected_changes += traffic.rejected_changes;
        if let Some(mut child) = self.nodes[node].child.take() {
            // SIGKILL: no chance to flush or say goodbye.
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    fn restart(&mut self, node: usize) -> anyhow::Result<()> {
        if self.nodes[node].child.is_some() {
            return Ok(());
        }
        let process = &self.nodes[node];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&process.log)?;
        let child = Command::new(&self.binary)
            .args(["--config"])
            .arg(&process.config)
            .args(["node", "run"])
            // The demo's own log filter, if it has one, applies to its nodes too.
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.nodes[node].child = Some(child);
        let started = Instant::now();
        loop {
            let health = self
                .agent
                .get(format!("{}/health", self.nodes[node].api))
                .call();
            if health.is_ok_and(|r| r.status().is_success()) {
                // Our admin token is accepted only by the process started here.
                self.get(node, "/admin/status").with_context(|| {
                    format!("node {node}: another process answers on its API port")
                })?;
                return Ok(());
            }
            if let Some(child) = self.nodes[node].child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                anyhow::bail!(
                    "node {node} exited with {status} at start; see {}",
                    self.nodes[node].log.display()
                );
            }
            anyhow::ensure!(
                started.elapsed() < START_TIMEOUT,
                "node {node} did not answer within {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn set_faults(&mut self, faults: &NetworkFaults) {
        if *faults == self.applied {
            return;
        }
        faults.apply_to(&self.faults);
        self.applied = faults.clone();
    }

    fn catalogue(&mut self, node: usize) -> anyhow::Result<BTreeMap<[u8; 16], [u8; 32]>> {
        let mut catalogue = BTreeMap::new();
        for document in self.documents(node)? {
            let id = document["id"]
                .as_str()
                .and_then(hex_to_bytes::<16>)
                .context("a document without an id")?;
            let mut heads: Vec<&str> = document["heads"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            heads.sort_unstable();
            let digest: [u8; 32] = Sha256::digest(heads.join(",")).into();
            catalogue.insert(id, digest);
        }
        Ok(catalogue)
    }

    fn dashboard(&mut self, node: usize) -> anyhow::Result<Option<String>> {
        if !self.is_up(node) {
            return Ok(None);
        }
        let figures = self.get(node, "/admin/dashboard")?;
        Ok(Some(estuary_node::api::dashboard::static_page(&figures)?))
    }

    fn metrics(&mut self, node: usize) -> anyhow::Result<Option<String>> {
        if !self.is_up(node) {
            return Ok(None);
        }
        let mut response = self
            .agent
            .get(format!("{}/metrics", self.nodes[node].api))
            .header(
                "Authorization",
                format!("Bearer {}", self.nodes[node].admin),
            )
            .call()
            .with_context(|| format!("node {node}: GET /metrics"))?;
        Ok(Some(response.body_mut().read_to_string()?))
    }

    fn state(&mut self, node: usize, _authored_by: Option<Bytes32>) -> anyhow::Result<NodeState> {
        let mut state = NodeState::default();
        for document in self.documents(node)? {
            let strings = |key: &str| -> Vec<String> {
                document[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            };
            let mut heads = strings("heads");
            heads.sort();
            let changes: BTreeSet<String> = strings("changes").into_iter().collect();
            let id = document["id"].as_str().unwrap_or_default().to_owned();
            state.documents.insert(id, DocumentState { heads, changes });
        }
        let quarantine = self.get(node, "/admin/quarantine")?;
        for entry in quarantine["entries"].as_array().into_iter().flatten() {
            state.quarantine.insert((
                entry["document"].as_str().unwrap_or_default().to_owned(),
                entry["change"].as_str().unwrap_or_default().to_owned(),
                entry["reason"].as_str().unwrap_or_default().to_owned(),
            ));
        }
        state.pending = self.get(node, "/admin/status")?["pending"]
            .as_u64()
            .unwrap_or(0);
        // `verify` rebuilds and validates every document.
        let verify = self.get(node, "/admin/verify")?;
        for problem in verify["problems"].as_array().into_iter().flatten() {
            state
                .violations
                .push(format!("verify: {}", problem["what"]));
        }
        Ok(state)
    }

    fn traffic(&mut self) -> Traffic {
        let mut total = self.past;
        for node in 0..self.nodes.len() {
            if self.is_up(node) {
                let traffic = self.traffic_of(node);
                total.wire_bytes += traffic.wire_bytes;
                total.messages += traffic.messages;
                total.rejected_changes += traffic.rejected_changes;
            }
        }
        total.connections_cut = self.faults.cuts();
        total.writes_delayed = self.faults.delays();
        total
    }

    fn reconcile_now(&mut self) {}

    fn shutdown(&mut self) {
        for process in &mut self.nodes {
            if let Some(mut child) = process.child.take() {
                // SIGTERM and a clean stop; SIGKILL if it takes too long.
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let started = Instant::now();
                while child.try_wait().ok().flatten().is_none() {
                    if started.elapsed() > STOP_TIMEOUT {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for process in &mut self.nodes {
            if let Some(mut child) = process.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
