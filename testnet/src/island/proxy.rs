//! A fault-injecting TCP proxy between node processes: each node dials each of its peers
//! through a port of its own for that link, so the proxy knows both ends of every connection
//! and puts it under the faults in force (`sync::faults::Faults`, the same seeded schedule
//! and the same decisions as the in-process fault layer): a partition refuses new connections
//! across it and cuts those open; loss delays a share of the writes by a retransmission's
//! delay and cuts connections after a random byte budget.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use estuary_node::sync::faults::Faults;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Bytes read from one side before they are passed on (one write of the other side).
const CHUNK_BYTES_MAX: usize = 16 * 1024;
/// How often an idle connection looks again at the faults in force (a partition cuts it
/// within this long).
const RECHECK_EVERY: Duration = Duration::from_millis(100);
/// How long the proxy waits for a node to accept the connection it passes on.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the proxy waits after a failed accept before the next.
const ACCEPT_RETRY_AFTER: Duration = Duration::from_millis(10);

/// The proxy's listeners, one per link, and the tasks that run them.
pub struct Proxy {
    /// Taken when the proxy stops.
    runtime: Option<tokio::runtime::Runtime>,
    /// The port node `from` dials to reach node `to`, by `(from, to)`.
    ports: BTreeMap<(usize, usize), u16>,
    /// Stops every listener and connection when it changes.
    stop: watch::Sender<bool>,
}

impl Proxy {
    /// Listens for each link `from → to` of `links` (node `from` dials each node in
    /// `links[from]`), passing connections on to `127.0.0.1:targets[to]` under `faults`.
    pub fn start(
        faults: Arc<Faults>,
        links: &[Vec<usize>],
        targets: &[u16],
    ) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .context("starting the fault proxy's runtime")?;
        let (stop, stopped) = watch::channel(false);
        let mut ports = BTreeMap::new();
        for (from, peers) in links.iter().enumerate() {
            for &to in peers {
                let target = *targets
                    .get(to)
                    .context("a link to a node that does not exist")?;
                let listener = runtime
                    .block_on(TcpListener::bind(("127.0.0.1", 0)))
                    .context("the fault proxy could not listen")?;
                ports.insert((from, to), listener.local_addr()?.port());
                runtime.spawn(accept(
                    listener,
                    Link { from, to },
                    target,
                    faults.clone(),
                    stopped.clone(),
                ));
            }
        }
        Ok(Self {
            runtime: Some(runtime),
            ports,
            stop,
        })
    }

    /// The port node `from` dials to reach node `to`.
    pub fn port(&self, from: usize, to: usize) -> Option<u16> {
        self.ports.get(&(from, to)).copied()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        // Tasks still running end with the runtime.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// The two ends of a link.
#[derive(Clone, Copy, Debug)]
struct Link {
    from: usize,
    to: usize,
}

async fn accept(
    listener: TcpListener,
    link: Link,
    target: u16,
    faults: Arc<Faults>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.changed() => return,
        };
        let Ok((dialer, _)) = accepted else {
            // Out of descriptors, say: wait rather than spin.
            tokio::time::sleep(ACCEPT_RETRY_AFTER).await;
            continue;
        };
        if faults.separated(link.from, link.to) {
            faults.count_cut();
            continue;
        }
        let faults = faults.clone();
        let stopped = stopped.clone();
        tokio::spawn(async move {
            let connected =
                tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(("127.0.0.1", target)))
                    .await;
            // A node down refuses: the dialer sees its connection closed, as it would.
            let Ok(Ok(node)) = connected else {
                return;
            };
            let _ = dialer.set_nodelay(true);
            let _ = node.set_nodelay(true);
            // Drawn when loss is first in force on the connection, as the in-process layer
            // draws it: a connection made before loss began is cut too.
            let budget = Arc::new(std::sync::OnceLock::new());
            let (dialer_read, dialer_write) = dialer.into_split();
            let (node_read, node_write) = node.into_split();
            let (cut, cut_seen) = watch::channel(false);
            let used = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let there = pump(
                dialer_read,
                node_write,
                Pump {
                    link,
                    faults: faults.clone(),
                    budget: budget.clone(),
                    used: used.clone(),
                    cut: cut.clone(),
                },
                cut_seen.clone(),
                stopped.clone(),
            );
            let back = pump(
                node_read,
                dialer_write,
                Pump {
                    link,
                    faults,
                    budget,
                    used,
                    cut,
                },
                cut_seen,
                stopped,
            );
            tokio::join!(there, back);
        });
    }
}

/// One direction of a connection and what decides its fate.
struct Pump {
    link: Link,
    faults: Arc<Faults>,
    /// Bytes the connection may carry (both ways) before it is cut, while loss is in force;
    /// drawn when loss is first seen in force (shared by both directions).
    budget: Arc<std::sync::OnceLock<u64>>,
    used: Arc<std::sync::atomic::AtomicU64>,
    /// Set by whichever direction cuts the connection first.
    cut: watch::Sender<bool>,
}

impl Pump {
    /// Whether the connection is to be cut now: a partition between its ends, or its budget
    /// spent while loss is in force. Counts the cut once.
    fn cutting(&self) -> bool {
        if self.budget.get().is_none()
            && let Some(budget) = self.faults.draw_budget()
        {
            let _ = self.budget.set(budget);
        }
        let spent = self.faults.cutting()
            && self.budget.get().is_some_and(|budget| {
                self.used.load(std::sync::atomic::Ordering::Relaxed) > *budget
            });
        if self.faults.separated(self.link.from, self.link.to) || spent {
            if !self.cut.send_replace(true) {
                self.faults.count_cut();
            }
            return true;
        }
        false
    }
}

/// Passes bytes from `read` to `write` under the faults in force, until either side closes,
/// the connection is cut, or the proxy stops.
async fn pump(
    mut read: OwnedReadHalf,
    mut write: OwnedWriteHalf,
    pump: Pump,
    mut cut_seen: watch::Receiver<bool>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; CHUNK_BYTES_MAX];
    loop {
        if *cut_seen.borrow() || pump.cutting() {
            break;
        }
        let read = tokio::select! {
            read = tokio::time::timeout(RECHECK_EVERY, read.read(&mut buffer)) => read,
            _ = cut_seen.changed() => break,
            _ = stopped.changed() => break,
        };
        let n = match read {
            // Idle: look at the faults again.
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
        };
        pump.used
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        if let Some(delay) = pump.faults.draw_delay() {
            tokio::time::sleep(delay).await;
        }
        if pump.cutting() || write.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    // Closing the write half ends the other side's reads; a cut reaches the other direction
    // through `cut`.
    let _ = write.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener as StdListener, TcpStream as StdStream};
    use std::time::Instant;

    /// A server on node 1's port that echoes what it reads.
    fn echo_server() -> u16 {
        let listener = StdListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                std::thread::spawn(move || {
                    let mut buffer = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buffer) {
                        if n == 0 || stream.write_all(&buffer[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        port
    }

    /// Node 0 dials node 1 through the proxy and sends `ping`; the echo, or `None` if the
    /// connection was closed first.
    fn round_trip(proxy: &Proxy) -> Option<Vec<u8>> {
        let mut stream = StdStream::connect(("127.0.0.1", proxy.port(0, 1)?)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        stream.write_all(b"ping").ok()?;
        let mut echo = [0u8; 4];
        stream.read_exact(&mut echo).ok()?;
        Some(echo.to_vec())
    }

    #[test]
    fn the_proxy_passes_bytes_on_and_applies_partitions_and_delays() {
        let faults = Faults::new(7);
        let proxy = Proxy::start(faults.clone(), &[vec![1], vec![]], &[0, echo_server()]).unwrap();
        assert_eq!(proxy.port(1, 0), None);
        assert_eq!(round_trip(&proxy), Some(b"ping".to_vec()));

        // Across a partition a connection is closed at once.
        faults.partition(&[vec![0], vec![1]]);
        assert_eq!(round_trip(&proxy), None);
        assert!(faults.cuts() >= 1);

        // An open connection is cut when a partition comes.
        faults.heal();
        let mut open = StdStream::connect(("127.0.0.1", proxy.port(0, 1).unwrap())).unwrap();
        open.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        open.write_all(b"ping").unwrap();
        let mut echo = [0u8; 4];
        open.read_exact(&mut echo).unwrap();
        faults.partition(&[vec![0], vec![1]]);
        std::thread::sleep(RECHECK_EVERY * 3);
        let mut rest = Vec::new();
        let closed = open
            .write_all(b"ping")
            .and_then(|()| open.read_to_end(&mut rest));
        // Closed (end of stream, or reset), not merely quiet until the read timeout.
        let timed_out = closed.as_ref().is_err_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        });
        assert!(rest.is_empty() && !timed_out, "{closed:?}, {rest:?}");

        // Every write delayed: a round trip (two writes) waits twice.
        faults.heal();
        faults.delay(100, Duration::from_millis(150));
        let started = Instant::now();
        assert_eq!(round_trip(&proxy), Some(b"ping".to_vec()));
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(faults.delays() >= 2);
    }
}
