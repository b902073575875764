//! Catch-up work at a lower CPU priority than the node's other work.
//!
//! Ingesting fetched documents is the bulk of a catch-up. Run beside the API's work at the same
//! priority, documents judged side by side took both cores, and a clinical read on the
//! catching-up node waited up to 141 ms (p99, `bench sync bootstrap`); judged one at a time,
//! reads stayed fast but catch-up used one core. The threads here lower their own scheduling
//! priority once, as they start (nice `CATCH_UP_NICE`; Linux sets it per thread): a read, a
//! write or the network that becomes runnable gets most of a core at once, and catch-up gets
//! every cycle they leave.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

/// Threads that ingest fetched documents: one per core of the machines nodes run on.
pub const CATCH_UP_THREADS: usize = 2;
/// Their nice value: at 10 the kernel weighs a thread about a tenth of one at 0.
pub const CATCH_UP_NICE: i32 = 10;

type Task = Box<dyn FnOnce() + Send>;

/// The catch-up threads, and the thread that waits for their decisions to be durable.
/// Dropping it lets them finish the tasks queued, then end. Tasks queue without a bound of
/// their own: the sync driver bounds them (each holds documents in progress, at most
/// `DOCUMENTS_IN_PROGRESS_MAX`).
pub struct Background {
    sender: Sender<Task>,
    durable: Waiter,
}

/// Runs tasks that wait for decisions to be durable, in the order given, on a thread of their
/// own (`Background::waiter`): a catch-up thread that hands its wait there takes its next
/// work while a flush runs, instead of leaving its core idle for it.
#[derive(Clone)]
pub struct Waiter {
    sender: Sender<Task>,
}

impl Waiter {
    /// Queues `task`; false if the thread is gone (then it is dropped, not run).
    pub fn run(&self, task: impl FnOnce() + Send + 'static) -> bool {
        self.sender.send(Box::new(task)).is_ok()
    }
}

impl Background {
    /// Starts the threads.
    pub fn start() -> std::io::Result<Self> {
        let (sender, receiver) = channel::<Task>();
        let receiver = Arc::new(Mutex::new(receiver));
        for n in 0..CATCH_UP_THREADS {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("estuary-catch-up-{n}"))
                .spawn(move || {
                    lower_priority();
                    while let Some(task) = next(&receiver) {
                        task();
                    }
                })?;
        }
        // It only waits (for a flush, or leads one): at the usual priority, so that a flush
        // every decision waits for is not put off.
        let (durable, waits) = channel::<Task>();
        std::thread::Builder::new()
            .name("estuary-durable".into())
            .spawn(move || {
                while let Ok(task) = waits.recv() {
                    task();
                }
            })?;
        Ok(Self {
            sender,
            durable: Waiter { sender: durable },
        })
    }

    /// Where to queue a wait for durability (see [`Waiter`]).
    pub fn waiter(&self) -> Waiter {
        self.durable.clone()
    }

    /// Queues `task`; false if the threads are gone (then it is dropped, not run).
    pub fn run(&self, task: impl FnOnce() + Send + 'static) -> bool {
        self.sender.send(Box::new(task)).is_ok()
    }
}

fn next(receiver: &Mutex<Receiver<Task>>) -> Option<Task> {
    receiver
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .recv()
        .ok()
}

/// Lowers the calling thread's priority to `CATCH_UP_NICE`. Where it cannot (another system,
/// or a refusal), the work runs at the usual priority, with a log line.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let thread = rustix::thread::gettid();
        if let Err(error) = rustix::process::setpriority_process(Some(thread), CATCH_UP_NICE) {
            tracing::warn!(%error, "catch-up runs at the usual priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_threads_of_lower_priority() {
        let background = Background::start().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        assert!(background.run(move || {
            let nice = {
                #[cfg(target_os = "linux")]
                {
                    rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
                }
                #[cfg(not(target_os = "linux"))]
                {
                    CATCH_UP_NICE
                }
            };
            sender.send(nice).unwrap();
        }));
        let nice = receiver
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        assert!(nice >= CATCH_UP_NICE, "nice {nice}");
    }

    #[test]
    fn waits_for_durability_run_in_order_on_their_own_thread() {
        let background = Background::start().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        // Handed over from a catch-up thread, as a fetch's wait is.
        let waiter = background.waiter();
        assert!(background.run(move || {
            for n in 0..3 {
                let sender = sender.clone();
                assert!(waiter.run(move || {
                    let thread = std::thread::current().name().map(str::to_string);
                    sender.send((n, thread)).unwrap();
                }));
            }
        }));
        for n in 0..3 {
            let (ran, thread) = receiver
                .recv_timeout(std::time::Duration::from_secs(10))
                .unwrap();
            assert_eq!(ran, n);
            assert_eq!(thread.as_deref(), Some("estuary-durable"));
        }
    }
}
