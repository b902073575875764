//! The node's configuration file (TOML): where it keeps its data, whom it trusts, how it
//! reaches peers and which apps may use its API.
//!
//! `estuary init` writes a commented file with every default spelled out ([`Config::template`]);
//! `estuary node run` reads it ([`Config::load`]). Unknown keys are refused, so a misspelt
//! setting is an error rather than a silent default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::Bytes32;
use crate::sync::{Multiaddr, SyncConfig, TransportKind};

/// Largest config file read, in bytes: a config is a few KiB; anything larger is a wrong path.
pub const CONFIG_BYTES_MAX: u64 = 1024 * 1024;
/// Default API address: loopback only.
pub const API_LISTEN_DEFAULT: &str = "127.0.0.1:8080";
/// Default largest request body the API accepts, in bytes.
pub const API_BODY_BYTES_DEFAULT: usize = 256 * 1024;
/// The largest request body an operator may configure, in bytes.
pub const API_BODY_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Default requests the API serves at once; further requests wait.
pub const API_CONCURRENCY_DEFAULT: usize = 64;

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is larger than any config.
    #[error(
        "the config {path} is {bytes} bytes; a config is at most {CONFIG_BYTES_MAX} bytes (is this the right file?)"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// The TOML does not parse or does not match the settings.
    #[error("the config {path} is not valid: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (settings and positions; a config holds no patient data).
        reason: String,
    },
    /// A setting has a value that cannot work.
    #[error("the config setting `{setting}` is not usable: {reason}")]
    Invalid {
        /// The setting.
        setting: &'static str,
        /// Why.
        reason: String,
    },
}

/// What an app's token allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Read documents, search, follow the change feed.
    Read,
    /// All of `read`, and write health files and referrals.
    ReadWrite,
}

/// An app allowed to use the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppToken {
    /// The app's name, written in the audit log with everything it reads and writes.
    pub name: String,
    /// Its bearer token.
    pub token: String,
    /// What it may do.
    pub scope: Scope,
}

/// The store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The engine a new store is created in (the log-structured one if unset); a sled store
    /// moves to `lsm` at the next start when this says `lsm`, and only then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<crate::store::StoreEngine>,
}

/// The HTTP API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address to serve on. Loopback unless fronted by a TLS proxy (see the README).
    pub listen: SocketAddr,
    /// Largest request body, in bytes; larger bodies get 413.
    pub body_bytes_max: usize,
    /// Requests served at once.
    pub concurrency_max: usize,
    /// Whether `/metrics` needs the admin token. Without it, callers without a token get
    /// every figure except those that move with clinical reads (audit records, API request
    /// counts and time, storage bytes), which would tell anyone on the host when records
    /// are read.
    pub metrics_token_required: bool,
    /// The token of the `estuary` command (admin routes: status, peers, quarantine, audit,
    /// verify, export, import).
    pub admin_token: String,
    /// Apps and their tokens.
    pub apps: Vec<AppToken>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: API_LISTEN_DEFAULT.parse().expect("a valid default address"),
            body_bytes_max: API_BODY_BYTES_DEFAULT,
            concurrency_max: API_CONCURRENCY_DEFAULT,
            metrics_token_required: true,
            admin_token: String::new(),
            apps: Vec::new(),
        }
    }
}

/// Peer-to-peer sync.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Addresses to listen on (libp2p multiaddrs).
    pub listen: Vec<String>,
    /// Peers to dial at start and whenever the connection drops.
    pub bootstrap: Vec<String>,
    /// Find members on the local network with mDNS.
    pub mdns: bool,
    /// Relay for members behind NAT (the core hospital).
    pub relay_server: bool,
    /// Addresses others reach this node at; empty: its listen addresses.
    pub external: Vec<String>,
    /// Relays to be reachable through (`…/p2p/<relay peer id>`).
    pub relays: Vec<String>,
    /// Seconds between reconciliations with a random connected member.
    pub reconcile_every_s: u64,
    /// Seconds a sync request may take.
    pub request_timeout_s: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/4100".into(),
                "/ip4/0.0.0.0/udp/4100/quic-v1".into(),
            ],
            bootstrap: Vec::new(),
            mdns: false,
            relay_server: false,
            external: Vec::new(),
            relays: Vec::new(),
            reconcile_every_s: 5,
            request_timeout_s: 30,
        }
    }
}

/// A node's whole configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The data directory (key, store). Relative paths are relative to the config file.
    pub data_dir: PathBuf,
    /// The consortium authority's public key, hex.
    pub authority: String,
    /// A signed roster file to adopt at start if newer than the one held (needed at the first
    /// start). Relative paths are relative to the config file.
    #[serde(default)]
    pub roster: Option<PathBuf>,
    /// The store.
    #[serde(default)]
    pub store: StoreConfig,
    /// Peer-to-peer sync.
    #[serde(default)]
    pub network: NetworkConfig,
    /// The HTTP API.
    #[serde(default)]
    pub api: ApiConfig,
}

impl Config {
    /// Reads and checks a config file; relative paths in it become relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let io = |source| ConfigError::Io {
            path: path.to_owned(),
            source,
        };
        let bytes = std::fs::metadata(path).map_err(io)?.len();
        if bytes > CONFIG_BYTES_MAX {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
                bytes,
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            // The parser's message and line, not its excerpt of the file: the line may hold a
            // token.
            reason: match e.span() {
                Some(span) => format!(
                    "line {}: {}",
                    text.get(..span.start)
                        .map_or(0, |t| t.matches('\n').count())
                        + 1,
                    e.message()
                ),
                None => e.message().to_owned(),
            },
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.data_dir = base.join(&config.data_dir);
        config.roster = config.roster.map(|roster| base.join(roster));
        config.check()?;
        Ok(config)
    }

    /// Checks what the types cannot: keys, addresses, tokens and limits.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.authority_key()?;
        self.sync_config()?;
        let invalid = |setting, reason: &str| ConfigError::Invalid {
            setting,
            reason: reason.into(),
        };
        if self.api.admin_token.len() < TOKEN_CHARS_MIN {
            return Err(invalid(
                "api.admin_token",
                "must be at least 32 characters (estuary init generates one)",
            ));
        }
        if self.api.body_bytes_max == 0 || self.api.body_bytes_max > API_BODY_BYTES_MAX {
            return Err(invalid(
                "api.body_bytes_max",
                "must be between 1 and 16777216 bytes",
            ));
        }
        if self.api.concurrency_max == 0 {
            return Err(invalid("api.concurrency_max", "must be at least 1"));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut tokens = std::collections::BTreeSet::new();
        for app in &self.api.apps {
            if !tokens.insert(app.token.as_str()) {
                return Err(invalid(
                    "api.apps.token",
                    "two apps share a token; the audit log would name the wrong app",
                ));
            }
            if app.token.len() < TOKEN_CHARS_MIN {
                return Err(invalid(
                    "api.apps.token",
                    "every app token must be at least 32 characters",
                ));
            }
            if app.token == self.api.admin_token {
                return Err(invalid(
                    "api.apps.token",
                    "an app token must differ from the admin token",
                ));
            }
            if app.name.is_empty() || app.name.len() > 64 || !names.insert(app.name.as_str()) {
                return Err(invalid(
                    "api.apps.name",
                    "app names must be 1 to 64 characters and unique",
                ));
            }
        }
        Ok(())
    }

    /// The authority's key.
    pub fn authority_key(&self) -> Result<Bytes32, ConfigError> {
        Bytes32::parse_hex(&self.authority, "authority").map_err(|_| ConfigError::Invalid {
            setting: "authority",
            reason: "must be 64 hexadecimal characters (the authority's public key)".into(),
        })
    }

    /// The sync layer's settings.
    pub fn sync_config(&self) -> Result<SyncConfig, ConfigError> {
        let addresses = |setting: &'static str, list: &[String]| {
            list.iter()
                .map(|text| {
                    text.parse::<Multiaddr>().map_err(|e| ConfigError::Invalid {
                        setting,
                        reason: format!("`{text}` is not a multiaddr: {e}"),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let network = &self.network;
        if network.reconcile_every_s == 0 || network.request_timeout_s == 0 {
            return Err(ConfigError::Invalid {
                setting: "network.reconcile_every_s",
                reason: "intervals and timeouts must be at least 1 second".into(),
            });
        }
        Ok(SyncConfig {
            listen: addresses("network.listen", &network.listen)?,
            bootstrap: addresses("network.bootstrap", &network.bootstrap)?,
            mdns: network.mdns,
            relay_server: network.relay_server,
            external: addresses("network.external", &network.external)?,
            relays: addresses("network.relays", &network.relays)?,
            reconcile_every: Duration::from_secs(network.reconcile_every_s),
            request_timeout: Duration::from_secs(network.request_timeout_s),
            transport: TransportKind::Network,
            ..SyncConfig::default()
        })
    }

    /// The app a bearer token belongs to, compared in constant time per token.
    pub fn app_of(&self, token: &str) -> Option<&AppToken> {
        self.api
            .apps
            .iter()
            .find(|app| constant_time_eq(app.token.as_bytes(), token.as_bytes()))
    }

    /// Whether `token` is the admin token (constant time).
    pub fn is_admin(&self, token: &str) -> bool {
        constant_time_eq(self.api.admin_token.as_bytes(), token.as_bytes())
    }

    /// The config `estuary init` writes: every setting with its default and a comment.
    pub fn template(&self) -> String {
        let quote = |s: &str| toml::Value::String(s.to_owned()).to_string();
        let list = |items: &[String]| {
            let quoted: Vec<String> = items.iter().map(|s| quote(s)).collect();
            format!("[{}]", quoted.join(", "))
        };
        let n = &self.network;
        let a = &self.api;
        let mut text = format!(
            r#"# Estuary node configuration. Every setting is written out with its value; edit and
# restart the node (`estuary node run --config THIS_FILE`) to change one.
# Keep this file readable by the node's user only: it holds the API tokens.

# Where the node keeps its key (node.key) and its store. Relative to this file.
data_dir = {data_dir}

# The consortium authority's public key (hex), from `estuary init --authority`.
authority = {authority}

# The signed roster to adopt at start if newer than the one the node holds (the first start
# needs one). Nodes also learn newer rosters from each other.
{roster}

[store]
# The storage engine: "lsm" (a log-structured tree) or "sled". A new store is created in this
# engine, "lsm" if unset: a catch-up runs 1.4x as fast as on sled, on two thirds of its disk
# (docs/performance.md). A store made by an earlier release is on sled and stays there until
# this says "lsm": it then moves at the next start (the old files are kept beside it, in
# store.sled-<seconds since 1970>, until you delete them). A store never moves back.
{engine}

[network]
# Addresses to listen on for peers (libp2p multiaddrs: TCP and QUIC).
listen = {listen}
# Peers to dial at start and whenever the link drops, e.g. "/ip4/10.0.0.1/tcp/4100".
bootstrap = {bootstrap}
# Find members on the local network with mDNS.
mdns = {mdns}
# Serve as a relay for members behind NAT (usually the core hospital only).
relay_server = {relay_server}
# Addresses others reach this node at; empty: its listen addresses.
external = {external}
# Relays to be reachable through, "/ip4/…/tcp/4100/p2p/<relay peer id>".
relays = {relays}
# Seconds between reconciliations with a random connected member (anti-entropy).
reconcile_every_s = {reconcile}
# Seconds a sync request may take before it is abandoned and retried.
request_timeout_s = {timeout}

[api]
# Where clinical apps and the estuary command reach the node. Keep it on loopback; to expose
# it, put a TLS-terminating proxy in front (see the README).
listen = {api_listen}
# Largest request body, in bytes (larger requests get 413).
body_bytes_max = {body}
# Requests served at once; more wait their turn. /health and /metrics have a few slots of
# their own and do not count here.
concurrency_max = {concurrency}
# Whether /metrics needs the admin token (Authorization: Bearer). If false, a scraper without
# a token gets every figure except those that move whenever a record is read (audit records,
# API request counts and time, storage bytes): anyone who can reach the port could otherwise
# watch clinical activity.
metrics_token_required = {metrics_token}
# The estuary command's token (status, peers, quarantine, audit, verify, export, import).
admin_token = {admin}
"#,
            data_dir = quote(&self.data_dir.display().to_string()),
            authority = quote(&self.authority),
            roster = match &self.roster {
                Some(path) => format!("roster = {}", quote(&path.display().to_string())),
                None => "# roster = \"roster.signed\"".to_owned(),
            },
            engine = match self.store.engine {
                Some(engine) => format!("engine = {}", quote(&engine.to_string())),
                None => "# engine = \"lsm\"".to_owned(),
            },
            listen = list(&n.listen),
            bootstrap = list(&n.bootstrap),
            mdns = n.mdns,
            relay_server = n.relay_server,
            external = list(&n.external),
            relays = list(&n.relays),
            reconcile = n.reconcile_every_s,
            timeout = n.request_timeout_s,
            api_listen = quote(&a.listen.to_string()),
            body = a.body_bytes_max,
            concurrency = a.concurrency_max,
            metrics_token = a.metrics_token_required,
            admin = quote(&a.admin_token),
        );
        text.push_str(
            "\n# Apps allowed to use the API, one [[api.apps]] table each. scope is \"read\" or\n\
             # \"read-write\". The name is written in the audit log with every access.\n",
        );
        for app in &a.apps {
            text.push_str(&format!(
                "[[api.apps]]\nname = {}\ntoken = {}\nscope = {}\n\n",
                quote(&app.name),
                quote(&app.token),
                quote(match app.scope {
                    Scope::Read => "read",
                    Scope::ReadWrite => "read-write",
                }),
            ));
        }
        text
    }
}

/// A setting that works but exposes the node more than it should; `estuary node run` logs
/// each at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigWarning {
    /// The API listens on an address other machines can reach.
    ApiNotLoopback {
        /// `api.listen`.
        listen: SocketAddr,
    },
    /// Users other than the node's may read the config, which holds the tokens.
    ConfigReadable {
        /// The config file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ApiNotLoopback { listen } => write!(
                f,
                "api.listen is {listen}, not a loopback address: tokens and patient data cross the network as plain HTTP; listen on 127.0.0.1 and put a TLS proxy in front (see the README)"
            ),
            Self::ConfigReadable { path, mode } => write!(
                f,
                "{} is readable by other users (mode {mode:o}) and holds the API tokens; run `chmod 600` on it",
                path.display()
            ),
        }
    }
}

/// What in a config at `path`, with permission bits `mode`, exposes the node: an API address
/// that is not loopback, a file others may read.
pub fn config_warnings(listen: SocketAddr, path: &Path, mode: u32) -> Vec<ConfigWarning> {
    let mut warnings = Vec::new();
    // An IPv4 address written as IPv6 (`::ffff:127.0.0.1`) is loopback too.
    if !listen.ip().to_canonical().is_loopback() {
        warnings.push(ConfigWarning::ApiNotLoopback { listen });
    }
    if mode & 0o077 != 0 {
        warnings.push(ConfigWarning::ConfigReadable {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    warnings
}

/// Shortest token accepted, in characters (a generated token is 64 hex characters).
pub const TOKEN_CHARS_MIN: usize = 32;

/// A fresh random token: 32 bytes as hex.
pub fn generate_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares without stopping at the first difference, so response time does not reveal how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreEngine;

    fn sample() -> Config {
        Config {
            data_dir: "data".into(),
            authority: "ab".repeat(32),
            roster: Some("roster.signed".into()),
            store: Default::default(),
            network: NetworkConfig::default(),
            api: ApiConfig {
                admin_token: generate_token().unwrap(),
                apps: vec![AppToken {
                    name: "emr".into(),
                    token: generate_token().unwrap(),
                    scope: Scope::ReadWrite,
                }],
                ..ApiConfig::default()
            },
        }
    }

    #[test]
    fn the_template_reads_back_as_the_config_it_was_written_from() {
        for engine in [None, Some(StoreEngine::Sled), Some(StoreEngine::Lsm)] {
            let mut config = sample();
            config.store.engine = engine;
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("estuary.toml");
            std::fs::write(&path, config.template()).unwrap();
            assert_eq!(Config::load(&path).unwrap().store, config.store);
        }
        let config = sample();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("estuary.toml");
        std::fs::write(&path, config.template()).unwrap();
        let loaded = Config::load(&path).unwrap();
        assert_eq!(loaded.data_dir, dir.path().join("data"));
        assert_eq!(loaded.roster, Some(dir.path().join("roster.signed")));
        assert_eq!(loaded.network, config.network);
        assert_eq!(loaded.api, config.api);
        assert!(loaded.is_admin(&config.api.admin_token));
        assert_eq!(
            loaded.app_of(&config.api.apps[0].token).unwrap().name,
            "emr"
        );
        assert!(loaded.app_of("not a token").is_none());
    }

    #[test]
    fn a_config_without_the_metrics_setting_requires_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("estuary.toml");
        let text = sample()
            .template()
            .replace("metrics_token_required = true\n", "");
        assert!(!text.contains("metrics_token_required"));
        std::fs::write(&path, text).unwrap();
        assert!(Config::load(&path).unwrap().api.metrics_token_required);
    }

    #[test]
    fn an_api_off_loopback_and_a_config_others_can_read_are_warned_of() {
        let path = Path::new("/srv/estuary/estuary.toml");
        for listen in [
            "127.0.0.1:8080",
            "127.1.2.3:8080",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:8080",
        ] {
            assert_eq!(config_warnings(listen.parse().unwrap(), path, 0o100600), []);
        }
        for listen in ["0.0.0.0:8080", "10.0.0.5:8080", "[::]:8080"] {
            let listen = listen.parse().unwrap();
            assert_eq!(
                config_warnings(listen, path, 0o600),
                [ConfigWarning::ApiNotLoopback { listen }]
            );
        }
        for mode in [0o100640, 0o604, 0o644, 0o660] {
            let warnings = config_warnings("127.0.0.1:8080".parse().unwrap(), path, mode);
            assert_eq!(
                warnings,
                [ConfigWarning::ConfigReadable {
                    path: path.to_owned(),
                    mode: mode & 0o777
                }]
            );
            assert!(warnings[0].to_string().contains("chmod 600"));
        }
        assert_eq!(
            config_warnings("0.0.0.0:8080".parse().unwrap(), path, 0o644).len(),
            2
        );
    }

    #[test]
    fn misspelt_and_unusable_settings_are_refused_with_the_setting_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("estuary.toml");
        let text = sample().template().replace("mdns =", "mdsn =");
        std::fs::write(&path, text).unwrap();
        let error = Config::load(&path).unwrap_err().to_string();
        assert!(error.contains("mdsn"), "{error}");
        // A parse error names the line, never quotes it (it may hold a token).
        let config = sample();
        let text = config
            .template()
            .replace("admin_token = \"", "admin_token = \"unterminated ");
        let text = text.replacen(
            &format!("{}\"", config.api.admin_token),
            &config.api.admin_token,
            1,
        );
        std::fs::write(&path, text).unwrap();
        let error = Config::load(&path).unwrap_err().to_string();
        assert!(!error.contains(&config.api.admin_token), "{error}");
        assert!(error.contains("line"), "{error}");

        let mut config = sample();
        config.network.bootstrap = vec!["not an address".into()];
        let error = config.check().unwrap_err().to_string();
        assert!(error.contains("network.bootstrap"), "{error}");

        let mut config = sample();
        config.api.admin_token = "short".into();
        assert!(
            config
                .check()
                .unwrap_err()
                .to_string()
                .contains("admin_token")
        );
    }
}
