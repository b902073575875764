//! How the command reaches a node: its admin API on loopback when it runs, or, when it is
//! stopped, its data directory opened here and served by the same API on an ephemeral
//! loopback port for the life of the command. Every command then takes one path.
//!
//! The admin token goes only to a process that has proved it holds this node's key: before
//! any request with the token, the command sends a fresh nonce to `/health` without a token
//! and checks the node key's signature over it (`estuary_node::api::Challenge`). Another
//! process that took the port while the node was down gets the nonce, never the token.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use estuary_node::api::{ApiState, Challenge, serve};
use estuary_node::config::{Config, generate_token};
use estuary_node::identity::{Identity, KEY_FILE};
use estuary_node::model::Bytes32;
use estuary_node::replica::{Node, NodeConfig};
use estuary_node::store::StoreEngine;
use serde_json::Value;

use crate::Failure;

/// How long a request to the node may take; `verify` and `export` on a large store take
/// minutes, so they get [`LONG_REQUEST`].
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// For whole-store work.
pub const LONG_REQUEST: Duration = Duration::from_secs(3600);
/// Largest JSON response read, in bytes.
const RESPONSE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// How long the first request, the challenge, may take: a running node answers at once, and
/// a port nobody answers on should not hold the command up before it opens the data directory.
const CHALLENGE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest answer to the challenge read, in bytes: `/health` is a few hundred bytes, and
/// whatever else answers on the port is not trusted with more.
const CHALLENGE_RESPONSE_BYTES_MAX: u64 = 16 * 1024;
/// Length of the node key file: the 32-byte ed25519 secret.
const KEY_FILE_BYTES: u64 = 32;

/// A connection to a node.
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
    /// A stopped node opened here, with the runtime serving it; stops when dropped.
    _offline: Option<Offline>,
}

struct Offline {
    _runtime: tokio::runtime::Runtime,
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl Drop for Offline {
    fn drop(&mut self) {
        // Requests are over by now; the server stops, and dropping the runtime closes the
        // node (the store flushes on close).
        let _ = self.shutdown.send(true);
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        // The node never redirects; the answer to a challenge must come from the process on
        // the node's address, not from wherever that process points.
        .max_redirects(0)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

impl Client {
    /// Connects to the node the config describes: its API if it answers and proves it is
    /// this node, else its data directory. Whatever answers HTTP on the API's address without
    /// that proof stops the command, and is never sent the token.
    pub fn connect(config_path: &Path) -> Result<Self, Failure> {
        let config = Config::load(config_path).map_err(|e| Failure::unreachable(e.into()))?;
        let base = format!("http://{}", config.api.listen);
        let challenge = Challenge::new().map_err(|e| Failure::error(e.into()))?;
        let probe = agent(CHALLENGE_TIMEOUT)
            .get(format!("{base}/health?challenge={}", challenge.nonce_hex()))
            .call();
        match probe {
            // Nothing speaks HTTP there: the node is stopped.
            Err(_) => Self::open_stopped(config).map_err(Failure::unreachable),
            Ok(response) => {
                check_answer(&config, &challenge, response)?;
                Ok(Self {
                    base,
                    token: config.api.admin_token.clone(),
                    agent: agent(REQUEST_TIMEOUT),
                    _offline: None,
                })
            }
        }
    }

    fn open_stopped(mut config: Config) -> anyhow::Result<Self> {
        let roster = match &config.roster {
            Some(path) if path.exists() => Some(std::fs::read(path)?),
            _ => None,
        };
        let node = Node::open(
            &NodeConfig {
                data_dir: config.data_dir.clone(),
                authority: config.authority_key()?,
                // A command on a stopped node opens its store as it is: a move to another
                // engine, which copies the whole store, is the node's to make at its start.
                store_engine: StoreEngine::found_in(
                    &config.data_dir.join(estuary_node::replica::STORE_DIR),
                )
                .or(config.store.engine),
            },
            roster.as_deref(),
        )
        .with_context(|| {
            format!(
                "the node's API at {} does not answer and its data directory {} cannot be opened (is the node starting, or its API on another address?)",
                config.api.listen,
                config.data_dir.display()
            )
        })?;
        config.api.admin_token = generate_token()?;
        config.api.apps.clear();
        let token = config.api.admin_token.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let (shutdown, stopped) = tokio::sync::watch::channel(false);
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let address = listener.local_addr()?;
        let state = ApiState::new(Arc::new(node), None, Arc::new(config), stopped.clone());
        let mut until = stopped;
        runtime.spawn(async move {
            let stop = async move {
                let _ = until.wait_for(|stop| *stop).await;
            };
            if let Err(error) = serve(listener, state, stop).await {
                eprintln!("error: serving the stopped node's data failed: {error}");
            }
        });
        Ok(Self {
            base: format!("http://{address}"),
            token,
            agent: agent(REQUEST_TIMEOUT),
            _offline: Some(Offline {
                _runtime: runtime,
                shutdown,
            }),
        })
    }

    /// The address of the node's dashboard with the admin token in its fragment.
    pub fn dashboard_url(&self) -> String {
        self.url(&format!("/dashboard#token={}", self.token))
    }

    /// Whether the node is not running: the command reads its stopped data directory.
    pub fn is_offline(&self) -> bool {
        self._offline.is_some()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// GETs JSON.
    pub fn get(&self, path: &str) -> Result<Value, Failure> {
        self.get_with(path, &self.agent)
    }

    /// GETs JSON from a route that works through the whole store.
    pub fn get_long(&self, path: &str) -> Result<Value, Failure> {
        self.get_with(path, &agent(LONG_REQUEST))
    }

    fn get_with(&self, path: &str, agent: &ureq::Agent) -> Result<Value, Failure> {
        let response = agent
            .get(self.url(path))
            .header("Authorization", self.bearer())
            .call()
            .map_err(|e| Failure::unreachable(anyhow::anyhow!("cannot reach the node: {e}")))?;
        read_json(response)
    }

    /// POSTs JSON, reads JSON.
    pub fn post_json(&self, path: &str, body: &Value) -> Result<Value, Failure> {
        let response = self
            .agent
            .post(self.url(path))
            .header("Authorization", self.bearer())
            .send_json(body)
            .map_err(|e| Failure::unreachable(anyhow::anyhow!("cannot reach the node: {e}")))?;
        read_json(response)
    }

    /// POSTs CBOR bytes, reads JSON.
    pub fn post_bytes(&self, path: &str, body: &[u8]) -> Result<Value, Failure> {
        self.post_bytes_as(path, body, "application/cbor")
    }

    /// POSTs bytes of `content_type`, reads JSON.
    pub fn post_bytes_as(
        &self,
        path: &str,
        body: &[u8],
        content_type: &str,
    ) -> Result<Value, Failure> {
        let response = agent(LONG_REQUEST)
            .post(self.url(path))
            .header("Authorization", self.bearer())
            .header("Content-Type", content_type)
            .send(body)
            .map_err(|e| Failure::unreachable(anyhow::anyhow!("cannot reach the node: {e}")))?;
        read_json(response)
    }

    /// GETs a byte stream (an export).
    pub fn get_stream(&self, path: &str) -> Result<impl std::io::Read + use<>, Failure> {
        let response = agent(LONG_REQUEST)
            .get(self.url(path))
            .header("Authorization", self.bearer())
            .call()
            .map_err(|e| Failure::unreachable(anyhow::anyhow!("cannot reach the node: {e}")))?;
        if !response.status().is_success() {
            return Err(read_json(response).err().unwrap_or_else(|| {
                Failure::error(anyhow::anyhow!("the node refused the export"))
            }));
        }
        Ok(response.into_body().into_reader())
    }
}

/// Whether `response`, the answer to `challenge` on `api.listen`, carries this node's
/// signature; if not, a failure that says the token was not sent.
fn check_answer(
    config: &Config,
    challenge: &Challenge,
    mut response: ureq::http::Response<ureq::Body>,
) -> Result<(), Failure> {
    let listen = config.api.listen;
    let status = response.status();
    if !status.is_success() {
        return Err(Failure::unreachable(anyhow::anyhow!(
            "the process answering on {listen} did not prove it is this node (it answered HTTP {status} to the challenge); the token was not sent"
        )));
    }
    let body: Value = response
        .body_mut()
        .with_config()
        .limit(CHALLENGE_RESPONSE_BYTES_MAX)
        .read_json()
        .unwrap_or(Value::Null);
    let key = node_key(config)?;
    challenge
        .verify(&key, listen, body["challenge"]["signature"].as_str())
        .map_err(|why| {
            Failure::unreachable(anyhow::anyhow!(
                "the process answering on {listen} is not this node ({why}); the token was not sent"
            ))
        })
}

/// This node's public key, from the key file in its data directory.
fn node_key(config: &Config) -> Result<Bytes32, Failure> {
    let path = config.data_dir.join(KEY_FILE);
    let unreadable = |why: String| {
        Failure::unreachable(anyhow::anyhow!(
            "cannot read the node key {} to check that the process answering on {} is this node ({why}); the token was not sent",
            path.display(),
            config.api.listen
        ))
    };
    let mut bytes = Vec::new();
    // One byte more than a key, to tell a longer file from a key.
    std::fs::File::open(&path)
        .and_then(|file| file.take(KEY_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| unreadable(e.to_string()))?;
    let secret: [u8; KEY_FILE_BYTES as usize] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| unreadable(format!("it is not {KEY_FILE_BYTES} bytes")))?;
    Ok(Identity::from_secret(secret).public_key())
}

/// A response's JSON, or the node's error as a [`Failure`] with its code.
fn read_json(mut response: ureq::http::Response<ureq::Body>) -> Result<Value, Failure> {
    let status = response.status();
    let body: Value = response
        .body_mut()
        .with_config()
        .limit(RESPONSE_BYTES_MAX)
        .read_json()
        .map_err(|e| Failure::error(anyhow::anyhow!("the node's answer is not JSON: {e}")))?;
    if status.is_success() {
        return Ok(body);
    }
    // `/fhir` answers errors as an OperationOutcome, the rest as `{"error": {code, reason}}`.
    let issue = &body["issue"][0]["details"];
    let reason = body["error"]["reason"]
        .as_str()
        .or(issue["text"].as_str())
        .unwrap_or("no reason given")
        .to_owned();
    let code = body["error"]["code"]
        .as_str()
        .or(issue["coding"][0]["code"].as_str())
        .unwrap_or("unknown")
        .to_owned();
    Err(Failure::refused(status.as_u16(), code, reason))
}
