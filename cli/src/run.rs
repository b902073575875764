//! `estuary node run`: the node in the foreground, until SIGTERM or Ctrl-C.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use estuary_node::api::{ApiState, serve};
use estuary_node::config::{Config, config_warnings};
use estuary_node::replica::{Node, NodeConfig};
use estuary_node::sync::SyncHandle;

use crate::Failure;

/// How long requests in flight may take to finish after SIGTERM.
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(clap::Subcommand)]
pub enum NodeCommand {
    /// Run the node in the foreground: sync with peers and serve the API. Stops cleanly on
    /// SIGTERM or Ctrl-C: requests in flight finish (a write is acknowledged only once
    /// durable), then the network closes.
    Run {
        /// Log format: text for people, json for a log collector. The level comes from
        /// RUST_LOG (default info).
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
    },
}

pub fn node(command: NodeCommand, config_path: &Path) -> Result<(), Failure> {
    let NodeCommand::Run { log_format } = command;
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    for cap in estuary_node::LOG_CAPS {
        filter = filter.add_directive(
            cap.parse()
                .map_err(|e| Failure::error(anyhow::anyhow!("{e}")))?,
        );
    }
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    let config = Config::load(config_path).map_err(|e| Failure::error(e.into()))?;
    // The config was just read, so its metadata is there; if not, there is nothing to warn of.
    if let Ok(metadata) = std::fs::metadata(config_path) {
        let mode = metadata.permissions().mode();
        for warning in config_warnings(config.api.listen, config_path, mode) {
            tracing::warn!("{warning}");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(run(config)).map_err(Failure::error)
}

async fn run(config: Config) -> anyhow::Result<()> {
    let roster = match &config.roster {
        Some(path) if path.exists() => {
            Some(std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?)
        }
        _ => None,
    };
    let node_config = NodeConfig {
        data_dir: config.data_dir.clone(),
        authority: config.authority_key()?,
        store_engine: config.store.engine,
    };
    let node = tokio::task::spawn_blocking(move || {
        Node::open(&node_config, roster.as_deref()).map_err(anyhow::Error::from)
    })
    .await?
    .context("cannot open the node")?;
    let node = Arc::new(node);
    let sync =
        SyncHandle::start(node.clone(), config.sync_config()?).context("cannot start sync")?;
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .with_context(|| format!("cannot serve the API on {}", config.api.listen))?;
    tracing::info!(
        institution = %node.institution(),
        peer = %sync.peer_id(),
        api = %config.api.listen,
        documents = node.catalogue().len(),
        "node running"
    );
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let state = ApiState::new(
        node.clone(),
        Some(sync.stats_reader()),
        Arc::new(config),
        stopped,
    );
    let mut stopped_signal = stopping.subscribe();
    let signal = async move {
        wait_for_signal().await;
        tracing::info!("stopping: finishing requests in flight");
        let _ = stopping.send(true);
    };
    let server = serve(listener, state, signal);
    tokio::pin!(server);
    // Requests in flight get a bounded time to finish; a client holding a connection open
    // (a long export) does not keep the node from stopping.
    let drained = async {
        let _ = stopped_signal.wait_for(|stop| *stop).await;
        tokio::time::sleep(SHUTDOWN_DRAIN).await;
    };
    tokio::select! {
        served = &mut server => served.context("the API failed")?,
        () = drained => tracing::warn!(
            seconds = SHUTDOWN_DRAIN.as_secs(),
            "requests still open after the drain time; stopping anyway"
        ),
    }
    sync.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; stop with Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
