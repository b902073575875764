//! One `estuary node run` process on 127.0.0.1, reached through its HTTP API as an app and as
//! the operator: what the benchmarks that measure as a user would start. Stopped (SIGKILL) when
//! dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use estuary_node::config::{
    ApiConfig, AppToken, Config, NetworkConfig, Scope, StoreConfig, generate_token,
};
use estuary_node::model::Bytes32;
use serde_json::Value;

use crate::island::procs::free_port;

/// How long a started process may take to answer on its API.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest answer read, in bytes (a 1,000-encounter file's view is about 0.6 MiB).
const RESPONSE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// The process's log, in its data directory.
const LOG: &str = "node.log";

/// The agent the benchmarks reach a node's API with, each request within `timeout`:
/// connections kept alive, and the API's address, an IP literal, taken as it is. ureq's own
/// resolver starts a thread per request when a timeout is set, which on this 2-core machine
/// took CPU from the node being measured.
pub(crate) fn api_agent(timeout: Duration) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build();
    ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::default(),
        LiteralResolver::default(),
    )
}

/// Takes an address written as an IP literal as it is; any other goes to ureq's resolver.
#[derive(Debug, Default)]
struct LiteralResolver(ureq::unversioned::resolver::DefaultResolver);

impl ureq::unversioned::resolver::Resolver for LiteralResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let literal = uri.authority().and_then(|authority| {
            let ip = authority.host().parse::<std::net::IpAddr>().ok()?;
            Some(std::net::SocketAddr::new(ip, authority.port_u16()?))
        });
        match literal {
            Some(address) => {
                let mut addresses = self.empty();
                addresses.push(address);
                Ok(addresses)
            }
            None => self.0.resolve(uri, config, timeout),
        }
    }
}

/// A running node process.
pub struct NodeProcess {
    api: String,
    admin: String,
    app: String,
    child: Child,
    log: PathBuf,
    agent: ureq::Agent,
}

/// Who a request is made as.
#[derive(Clone, Copy)]
pub enum As {
    /// A clinical app with a read-write token.
    App,
    /// The operator (admin token).
    Admin,
}

impl NodeProcess {
    /// The node's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes a config into `dir` (which holds the node's key) and starts the node, admitted by
    /// `roster`, dialling `bootstrap`.
    pub fn start(
        binary: &Path,
        dir: &Path,
        authority: &Bytes32,
        roster: &[u8],
        bootstrap: &[String],
        store_engine: estuary_node::store::StoreEngine,
    ) -> anyhow::Result<Self> {
        std::fs::write(dir.join("roster.signed"), roster)?;
        let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port()?);
        let config = Config {
            data_dir: ".".into(),
            authority: authority.to_string(),
            roster: Some("roster.signed".into()),
            store: StoreConfig {
                engine: Some(store_engine),
            },
            network: NetworkConfig {
                listen: vec![listen],
                bootstrap: bootstrap.to_vec(),
                ..NetworkConfig::default()
            },
            api: ApiConfig {
                listen: format!("127.0.0.1:{}", free_port()?).parse()?,
                admin_token: generate_token()?,
                apps: vec![AppToken {
                    name: "bench".into(),
                    token: generate_token()?,
                    scope: Scope::ReadWrite,
                }],
                ..ApiConfig::default()
            },
        };
        let path = dir.join("estuary.toml");
        std::fs::write(&path, config.template())?;
        let log = dir.join(LOG);
        let child = Command::new(binary)
            .arg("--config")
            .arg(&path)
            .args(["node", "run"])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut process = Self {
            api: format!("http://{}", config.api.listen),
            admin: config.api.admin_token.clone(),
            app: config.api.apps[0].token.clone(),
            child,
            log,
            agent: api_agent(REQUEST_TIMEOUT),
        };
        let started = Instant::now();
        loop {
            // Our admin token is accepted only by the process started here.
            if process
                .get("/admin/status", As::Admin)
                .is_ok_and(|(status, _)| status == 200)
            {
                return Ok(process);
            }
            if let Some(status) = process.child.try_wait()? {
                anyhow::bail!(
                    "the node exited with {status} at start; see {}",
                    process.log.display()
                );
            }
            anyhow::ensure!(
                started.elapsed() < START_TIMEOUT,
                "the node did not answer within {START_TIMEOUT:?}; see {}",
                process.log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn token(&self, who: As) -> &str {
        match who {
            As::App => &self.app,
            As::Admin => &self.admin,
        }
    }

    fn call_get(&self, path: &str, who: As) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
        self.agent
            .get(format!("{}{path}", self.api))
            .header("Authorization", format!("Bearer {}", self.token(who)))
            .call()
            .with_context(|| format!("GET {path}"))
    }

    /// `GET path`: the status and the JSON answer.
    pub fn get(&self, path: &str, who: As) -> anyhow::Result<(u16, Value)> {
        let mut response = self.call_get(path, who)?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(RESPONSE_BYTES_MAX)
            .read_json()
            .unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// `GET path`: the status and the answer's bytes, read to the last byte and not parsed
    /// (what the node's answer costs, without the client's JSON parsing).
    pub fn get_bytes(&self, path: &str, who: As) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut response = self.call_get(path, who)?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(RESPONSE_BYTES_MAX)
            .read_to_vec()
            .with_context(|| format!("GET {path}: the answer"))?;
        Ok((status, body))
    }

    /// `POST path` with a JSON body, as an app: the answer, which must be a success.
    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let mut response = self
            .agent
            .post(format!("{}{path}", self.api))
            .header("Authorization", format!("Bearer {}", self.app))
            .send_json(body)
            .with_context(|| format!("POST {path}"))?;
        let status = response.status().as_u16();
        let answer: Value = response.body_mut().read_json().unwrap_or(Value::Null);
        anyhow::ensure!(
            (200..300).contains(&status),
            "POST {path} answered {status}: {}",
            answer["error"]
        );
        Ok(answer)
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
