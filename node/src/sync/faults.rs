//! A fault-injecting wrapper around the in-process memory transport, driven by a seed: cut a
//! connection after a random byte budget, delay writes, partition nodes into groups. Used by
//! the sync tests and the in-process testnet, and (through `separated`, `draw_budget`,
//! `draw_delay`, `count_cut`) by the testnet's TCP proxy between node processes; never by a
//! deployed node.
//!
//! The seed fixes every random draw (byte budgets, which writes are delayed); the order in
//! which connections draw them follows the scheduler, so a failing seed reproduces the same
//! fault pattern, not the same interleaving.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::io::{AsyncRead, AsyncWrite};
use libp2p::Multiaddr;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;

/// The faults in force for a set of in-process nodes.
#[derive(Debug)]
pub struct Faults {
    seed: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    rng: u64,
    /// Memory port → node index, so a dialer knows whom it reached.
    nodes: HashMap<u64, usize>,
    /// Connections are cut after a budget drawn from this range of bytes.
    cut_after: Option<(u64, u64)>,
    /// This percentage of writes waits this long first.
    delay: Option<(u64, Duration)>,
    /// Each node's group; nodes in different groups cannot talk.
    groups: Option<HashMap<usize, usize>>,
    /// Connections cut so far (budget or partition).
    cuts: u64,
    /// Writes delayed so far.
    delays: u64,
}

impl State {
    /// xorshift64*: small, seeded, good enough to pick faults.
    fn next(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

impl Faults {
    /// No faults yet; every later draw follows from `seed`.
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Self {
            seed,
            state: Mutex::new(State {
                rng: seed | 1,
                ..State::default()
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Records that node `node` listens on `/memory/port`.
    pub fn register(&self, address: &Multiaddr, node: usize) {
        if let Some(port) = memory_port(address) {
            self.state().nodes.insert(port, node);
        }
    }

    /// Cuts every connection after a random budget of `min..=max` bytes (read and written).
    pub fn cut_after(&self, min: u64, max: u64) {
        self.state().cut_after = Some((min, max.max(min)));
    }

    /// Delays `percent` of writes by `delay`.
    pub fn delay(&self, percent: u64, delay: Duration) {
        self.state().delay = Some((percent.min(100), delay));
    }

    /// Splits the nodes into groups that cannot reach each other (nodes not named form a
    /// group of their own).
    pub fn partition(&self, groups: &[Vec<usize>]) {
        let mut by_node = HashMap::new();
        for (group, nodes) in groups.iter().enumerate() {
            for node in nodes {
                by_node.insert(*node, group);
            }
        }
        self.state().groups = Some(by_node);
    }

    /// Ends every fault.
    pub fn heal(&self) {
        let mut state = self.state();
        state.cut_after = None;
        state.delay = None;
        state.groups = None;
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> u64 {
        self.state().cuts
    }

    /// Whether nodes `a` and `b` are in different groups of a partition in force.
    pub fn separated(&self, a: usize, b: usize) -> bool {
        let state = self.state();
        state.groups.as_ref().is_some_and(|groups| {
            groups.get(&a).copied().unwrap_or(usize::MAX - a)
                != groups.get(&b).copied().unwrap_or(usize::MAX - b)
        })
    }

    /// A new connection's byte budget, while connections are being cut.
    pub fn draw_budget(&self) -> Option<u64> {
        let mut state = self.state();
        let (min, max) = state.cut_after?;
        let span = max - min + 1;
        Some(min + state.next() % span)
    }

    /// How long the next write waits first, if it is one of those delayed.
    pub fn draw_delay(&self) -> Option<Duration> {
        let mut state = self.state();
        let (percent, delay) = state.delay?;
        let delayed = (state.next() % 100 < percent).then_some(delay);
        state.delays += u64::from(delayed.is_some());
        delayed
    }

    /// Whether connections are being cut after their budget.
    pub fn cutting(&self) -> bool {
        self.state().cut_after.is_some()
    }

    /// Counts a connection cut (budget spent, or a partition).
    pub fn count_cut(&self) {
        self.state().cuts += 1;
    }

    /// Writes delayed so far.
    pub fn delays(&self) -> u64 {
        self.state().delays
    }

    /// Wraps one connection's byte stream of node `local`.
    pub(crate) fn wrap<S>(
        self: &Arc<Self>,
        inner: S,
        local: usize,
        point: &ConnectedPoint,
    ) -> FaultyStream<S> {
        let remote = match point {
            ConnectedPoint::Dialer { address, .. } => {
                memory_port(address).and_then(|port| self.state().nodes.get(&port).copied())
            }
            ConnectedPoint::Listener { .. } => None,
        };
        FaultyStream {
            inner,
            faults: self.clone(),
            local,
            remote,
            budget: None,
            used: 0,
            sleep: None,
            cut: false,
        }
    }
}

fn memory_port(address: &Multiaddr) -> Option<u64> {
    match address.iter().next()? {
        Protocol::Memory(port) => Some(port),
        _ => None,
    }
}

/// A connection's byte stream under the faults in force.
pub struct FaultyStream<S> {
    inner: S,
    faults: Arc<Faults>,
    local: usize,
    /// The node reached, when this side dialled (the listener side cannot tell).
    remote: Option<usize>,
    budget: Option<u64>,
    used: u64,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    cut: bool,
}

impl<S> FaultyStream<S> {
    fn check(&mut self) -> io::Result<()> {
        let partitioned = self
            .remote
            .is_some_and(|remote| self.faults.separated(self.local, remote));
        if self.budget.is_none() {
            self.budget = self.faults.draw_budget();
        }
        let cutting = self.faults.cutting();
        let spent = cutting && self.budget.is_some_and(|budget| self.used > budget);
        if partitioned || spent || self.cut {
            if !self.cut {
                self.cut = true;
                self.faults.count_cut();
            }
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FaultyStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        let read = ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        self.used += read as u64;
        Poll::Ready(Ok(read))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FaultyStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        if self.sleep.is_none()
            && let Some(delay) = self.faults.draw_delay()
        {
            self.sleep = Some(Box::pin(tokio::time::sleep(delay)));
        }
        if let Some(sleep) = self.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
            self.sleep = None;
        }
        let written = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.used += written as u64;
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}
