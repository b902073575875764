//! `estuary init`: a node's key, config and data directory, or an authority's key and roster.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use estuary_node::config::{ApiConfig, AppToken, Config, NetworkConfig, Scope, generate_token};
use estuary_node::identity::Identity;

use crate::{AUTHORITY_DIR_DEFAULT, Failure, authority, output};

/// The config file's name inside the data directory.
pub const CONFIG_FILE: &str = "estuary.toml";
/// The signed roster's file name, beside the config.
pub const ROSTER_FILE: &str = "roster.signed";

#[derive(clap::Args)]
pub struct InitArgs {
    /// Create a consortium authority (its key and a first, empty signed roster) instead of a
    /// node.
    #[arg(long)]
    authority: bool,
    /// The directory to create (default `estuary-data`, or `estuary-authority` with
    /// --authority).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The authority's public key (hex), from `estuary init --authority`.
    #[arg(long, conflicts_with = "authority")]
    authority_key: Option<String>,
    /// Peer-to-peer addresses to listen on (libp2p multiaddrs); default TCP and QUIC on
    /// port 4100.
    #[arg(long, conflicts_with = "authority")]
    listen: Vec<String>,
    /// Peers to dial at start and whenever the link drops.
    #[arg(long, conflicts_with = "authority")]
    bootstrap: Vec<String>,
    /// The API's address (keep it on loopback).
    #[arg(long, conflicts_with = "authority")]
    api_listen: Option<std::net::SocketAddr>,
    /// Apps to create tokens for, as NAME:read or NAME:read-write (default: one
    /// `clinical-app` with read-write).
    #[arg(long = "app", conflicts_with = "authority")]
    apps: Vec<String>,
}

/// Creates a directory only its owner can enter; refuses one that holds a config already.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Writes a file only its owner can read, failing if it exists.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {} (does it exist already?)", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

fn parse_app(text: &str) -> anyhow::Result<AppToken> {
    let (name, scope) = text
        .split_once(':')
        .context("--app takes NAME:read or NAME:read-write")?;
    let scope = match scope {
        "read" => Scope::Read,
        "read-write" => Scope::ReadWrite,
        _ => anyhow::bail!("an app's scope is read or read-write"),
    };
    Ok(AppToken {
        name: name.to_owned(),
        token: generate_token()?,
        scope,
    })
}

pub fn init(args: InitArgs, json: bool) -> Result<(), Failure> {
    if args.authority {
        let dir = args
            .data_dir
            .unwrap_or_else(|| PathBuf::from(AUTHORITY_DIR_DEFAULT));
        return authority::init(&dir, json);
    }
    let dir = args
        .data_dir
        .unwrap_or_else(|| PathBuf::from("estuary-data"));
    let config_path = dir.join(CONFIG_FILE);
    if config_path.exists() {
        return Err(Failure::error(anyhow::anyhow!(
            "{} exists already; this directory holds a node",
            config_path.display()
        )));
    }
    let authority = args.authority_key.context(
        "--authority-key is needed: the consortium authority's public key, which `estuary init --authority` prints",
    )?;
    let mut apps = args
        .apps
        .iter()
        .map(|a| parse_app(a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if apps.is_empty() {
        apps.push(parse_app("clinical-app:read-write")?);
    }
    let mut network = NetworkConfig::default();
    if !args.listen.is_empty() {
        network.listen = args.listen;
    }
    network.bootstrap = args.bootstrap;
    let mut api = ApiConfig {
        admin_token: generate_token().context("no randomness for the admin token")?,
        apps,
        ..ApiConfig::default()
    };
    if let Some(listen) = args.api_listen {
        api.listen = listen;
    }
    let config = Config {
        data_dir: PathBuf::from("."),
        authority,
        roster: Some(PathBuf::from(ROSTER_FILE)),
        store: Default::default(),
        network,
        api,
    };
    config.check().map_err(|e| Failure::error(e.into()))?;
    private_dir(&dir)?;
    let identity = Identity::load_or_create(&dir).context("cannot create the node key")?;
    write_private(&config_path, config.template().as_bytes())?;
    let key = identity.public_key().to_string();
    let peer = identity.peer_id().to_string();
    if json {
        output::json(&serde_json::json!({
            "node_key": key,
            "peer_id": peer,
            "config": config_path,
        }));
    } else {
        output::fields(&[
            ("node key", key.clone()),
            ("peer id", peer),
            ("config", config_path.display().to_string()),
        ]);
        println!(
            "\nNext: ask the consortium authority to add this node's key\n  estuary roster add --institution <id> --name <name> --kind <kind> --key {key}\nthen place the signed roster at {} and run\n  estuary node run --config {}",
            dir.join(ROSTER_FILE).display(),
            config_path.display()
        );
    }
    Ok(())
}
