//! How the command reaches a node: its admin API on loopback when it runs, or, when it is
//! stopped, its data directory opened here and served by the same API on an ephemeral
//! loopback port for the life of the command. Every command then takes one path.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use estuary_node::api::{ApiState, serve};
use estuary_node::config::{Config, generate_token};
use estuary_node::node::{Node, NodeConfig};
use serde_json::Value;

use crate::Failure;

/// How long a request to the node may take; `verify` and `export` on a large store take
/// minutes, so they get [`LONG_REQUEST`].
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// For whole-store work.
pub const LONG_REQUEST: Duration = Duration::from_secs(3600);
/// Largest JSON response read, in bytes.
const RESPONSE_BYTES_MAX: u64 = 64 * 1024 * 1024;

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
        // node (sled flushes on close).
        let _ = self.shutdown.send(true);
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

impl Client {
    /// Connects to the node the config describes: its API if it answers, else its data
    /// directory.
    pub fn connect(config_path: &Path) -> Result<Self, Failure> {
        let config = Config::load(config_path).map_err(|e| Failure::unreachable(e.into()))?;
        let base = format!("http://{}", config.api.listen);
        let probe = agent(Duration::from_secs(2))
            .get(format!("{base}/health"))
            .call();
        if probe.is_ok_and(|r| r.status().is_success()) {
            return Ok(Self {
                base,
                token: config.api.admin_token.clone(),
                agent: agent(REQUEST_TIMEOUT),
                _offline: None,
            });
        }
        Self::open_stopped(config).map_err(Failure::unreachable)
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

    /// POSTs bytes, reads JSON.
    pub fn post_bytes(&self, path: &str, body: &[u8]) -> Result<Value, Failure> {
        let response = agent(LONG_REQUEST)
            .post(self.url(path))
            .header("Authorization", self.bearer())
            .header("Content-Type", "application/cbor")
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
    let reason = body["error"]["reason"]
        .as_str()
        .unwrap_or("no reason given")
        .to_owned();
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or("unknown")
        .to_owned();
    Err(Failure::refused(status.as_u16(), code, reason))
}
