//! The log-structured engine (`StoreEngine::Lsm`): fjall, an LSM tree.
//!
//! A batch is appended to a journal and applied to a memtable; full memtables are written out
//! as sorted, compressed, checksummed tables and merged in the background. Against sled 0.34
//! (the other engine), a catch-up of realistic files (`bench sync bootstrap --store-engine`)
//! runs 1.2–1.4× as fast on two thirds of the disk, and acknowledged writes through the API
//! (`bench writes --store-engine`) run 1.26× as fast (docs/performance.md, *Storage
//! engines*): sled rewrites a page of its tree for every key written and keeps old page
//! versions until it reclaims a segment.
//!
//! Like sled's one tree, the store is one keyspace of fjall: the node's keyspaces are key
//! prefixes inside it, so a batch spanning them is one atomic write. A batch is durable once
//! `flush` has `fsync`ed the journal. At open fjall replays the journal: a batch cut short at
//! its end is dropped (the witness, `WitnessedStore`, then reports what it held as lost, as
//! for sled), and a batch whose checksum does not match refuses the store
//! (`StoreError::Damaged`). A table block that fails its checksum fails the read that meets
//! it (`StoreError::DamagedOnRead`). A creation of the store cut short before fjall wrote its
//! marker is cleared and made again (`clear_cut_creation`): fjall 3.1 cannot finish one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{Batch, Entries, KeyValue, STORE_CACHE_BYTES, STORE_LOCK_WAIT_MAX, StoreError};

/// The fjall keyspace that holds the store.
const KEYSPACE: &str = "estuary";

/// Bytes of journal kept on disk, about (fjall's own default is 512 MiB, its least 64 MiB):
/// fjall checks it as a journal fills (one journal file is about 64 MB), and past it writes
/// the memtables the oldest journal holds out as tables and deletes the journal. A journal
/// holds nothing a table does not once its memtable is written.
pub const JOURNALS_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Bytes of writes a memtable holds before it is sealed and written out as a table (fjall's
/// default is 64 MiB). fjall holds at most four sealed memtables before it stalls writes, so
/// a store's memtables stay under five times this. It is kept in the store when the store is
/// made.
pub const MEMTABLE_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// How the tables' data blocks are compressed, at every level. fjall's default leaves the
/// first two levels uncompressed, which at 100,000 files held most of the store (5.7 KB per
/// file on disk for 4.4 KB of keys and values); lz4 costs little CPU beside deciding a file.
/// Documents' snapshots are deflated already; the rest (keys sharing a document's prefix,
/// audit runs, index entries) compresses. It is kept in the store when the store is made.
const TABLE_BLOCK_COMPRESSION: fjall::CompressionType = fjall::CompressionType::Lz4;

/// Threads a store's background work (writing memtables out, merging tables) runs on. Tests
/// and the testnet run up to 21 nodes in one process.
pub const STORE_WORKER_THREADS: usize = 2;

/// Table files a store keeps open at once (fjall's default is 900; a process may have 1,024
/// open files in all by default, and up to 21 nodes share one process in the testnet).
pub const STORE_OPEN_FILES_MAX: usize = 32;

/// A file fjall keeps at the top of its directory (and sled never writes): how a store's
/// engine is recognised.
pub(super) const MARKER_FILE: &str = "version";

/// The store on fjall.
pub struct LsmStore {
    db: fjall::Database,
    tree: fjall::Keyspace,
    dir: PathBuf,
}

/// What a fjall error met on a read or write means for the node: an I/O failure (a full disk,
/// a permission) is the backend's error, to retry or fix; anything that says the files do not
/// read back as fjall wrote them (a checksum, a block that does not decode) is a damaged
/// store (`DamagedOnRead`).
fn error(error: fjall::Error) -> StoreError {
    match at_open(error) {
        StoreError::Damaged { reason } => StoreError::DamagedOnRead { reason },
        other => other,
    }
}

/// `error`, for an error met while opening the store.
fn at_open(error: fjall::Error) -> StoreError {
    match error {
        fjall::Error::Io(_) | fjall::Error::Storage(fjall::LsmError::Io(_)) => {
            StoreError::Backend(error.to_string())
        }
        fjall::Error::Poisoned => StoreError::Backend(
            "an earlier flush of the store failed (see the log); restart the node".into(),
        ),
        fjall::Error::Locked => StoreError::Backend("another process holds the store".into()),
        other => StoreError::Damaged {
            reason: other.to_string(),
        },
    }
}

/// Longest key fjall takes, in bytes (it asserts on longer ones and on empty ones).
const KEY_BYTES_MAX: usize = u16::MAX as usize;

impl LsmStore {
    /// Opens (or creates) the store in `dir`, waiting up to `STORE_LOCK_WAIT_MAX` for its
    /// file lock (fjall's background threads can hold it for a moment after a dropped
    /// store).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let started = std::time::Instant::now();
        clear_cut_creation(dir)?;
        loop {
            // fjall asserts on some files it cannot make sense of at recovery (a folder of
            // its own named otherwise than it names them): a damaged store, not a crash.
            let opened = std::panic::catch_unwind(|| {
                let db = fjall::Database::builder(dir)
                    .cache_size(STORE_CACHE_BYTES)
                    .max_journaling_size(JOURNALS_BYTES_MAX)
                    .worker_threads(STORE_WORKER_THREADS)
                    .max_cached_files(Some(STORE_OPEN_FILES_MAX))
                    .open()?;
                let tree = db.keyspace(KEYSPACE, || {
                    fjall::KeyspaceCreateOptions::default()
                        .max_memtable_size(MEMTABLE_BYTES_MAX)
                        .data_block_compression_policy(fjall::config::CompressionPolicy::all(
                            TABLE_BLOCK_COMPRESSION,
                        ))
                })?;
                Ok::<_, fjall::Error>((db, tree))
            })
            .map_err(|_| StoreError::Damaged {
                reason: "the log-structured store's files do not recover".into(),
            })?;
            match opened {
                Ok((db, tree)) => {
                    return Ok(Self {
                        db,
                        tree,
                        dir: dir.to_path_buf(),
                    });
                }
                Err(fjall::Error::Locked) if started.elapsed() < STORE_LOCK_WAIT_MAX => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(fjall::Error::Locked) => return Err(super::lock_held_error(dir)),
                Err(other) => return Err(at_open(other)),
            }
        }
    }
}

/// The files fjall makes, in this order, when it creates a database, before it writes its
/// `version` marker (`MARKER_FILE`) and `fsync`s it: its lock file, its keyspaces' folder
/// (empty until the marker is written) and its first journal.
const CREATION_FILES: [&str; 3] = ["lock", "keyspaces", "0.jnl"];

/// Clears what a creation of the store cut short left in `dir`, so that the creation starts
/// over.
///
/// fjall writes its `version` marker last when it creates a database, so a folder with
/// fjall's first files and no marker (or an empty one) is a creation that a kill or a power
/// cut stopped: nothing was written to it yet, let alone acknowledged. fjall 3.1 cannot
/// finish such a creation (it refuses to make its first journal again, "File exists"), so
/// without this a node killed while it first opened its store would never start again.
/// Only fjall's own creation files are cleared, and only while fjall's lock on them is ours;
/// a folder holding anything else is refused, untouched.
fn clear_cut_creation(dir: &Path) -> Result<(), StoreError> {
    let marker = dir.join(MARKER_FILE);
    let marker_bytes = match std::fs::metadata(&marker) {
        Ok(metadata) => Some(metadata.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(StoreError::Backend(format!("{}: {e}", marker.display()))),
    };
    if marker_bytes.is_some_and(|bytes| bytes > 0) {
        return Ok(()); // a store fjall finished creating
    }
    let lock_path = dir.join(CREATION_FILES[0]);
    let lock = match std::fs::OpenOptions::new().write(true).open(&lock_path) {
        Ok(lock) => lock,
        // No lock file: fjall never began here (or `dir` does not exist yet).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::Backend(format!("{}: {e}", lock_path.display()))),
    };
    match lock.try_lock() {
        Ok(()) => {}
        // Another process is creating it now: fjall's own lock wait takes over.
        Err(std::fs::TryLockError::WouldBlock) => return Ok(()),
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(StoreError::Backend(format!("{}: {e}", lock_path.display())));
        }
    }
    // Read again under the lock: another process may have finished the creation meanwhile.
    if std::fs::metadata(&marker).is_ok_and(|metadata| metadata.len() > 0) {
        return Ok(());
    }
    let io = |e: std::io::Error| StoreError::Backend(format!("{}: {e}", dir.display()));
    let refused = |what: String| StoreError::Damaged {
        reason: format!(
            "the log-structured store has no version marker, so its creation never finished, \
             but it holds {what}, which its creation does not make"
        ),
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let name = entry.map_err(io)?.file_name();
        let known = name == MARKER_FILE || CREATION_FILES.iter().any(|file| name == *file);
        if !known {
            return Err(refused(format!("{name:?}")));
        }
    }
    let keyspaces = dir.join(CREATION_FILES[1]);
    if keyspaces.exists() {
        if !keyspaces.is_dir() || std::fs::read_dir(&keyspaces).map_err(io)?.next().is_some() {
            return Err(refused("a keyspace".into()));
        }
        std::fs::remove_dir(&keyspaces).map_err(io)?;
    }
    for file in [MARKER_FILE, CREATION_FILES[2]] {
        match std::fs::remove_file(dir.join(file)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
    }
    tracing::warn!(
        store = %dir.display(),
        "the log-structured store's creation was cut short (no writes reached it); it starts over"
    );
    Ok(())
}

fn owned(pair: fjall::Guard) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
    let (key, value) = pair.into_inner().map_err(error)?;
    Ok((key.to_vec(), value.to_vec()))
}

impl KeyValue for LsmStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(key).map_err(error)?.map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Entries, StoreError> {
        self.tree.prefix(prefix).map(owned).collect()
    }

    fn keys_with_prefix(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.tree
            .prefix(prefix)
            .map(|pair| pair.key().map(|k| k.to_vec()).map_err(error))
            .collect()
    }

    fn scan_from(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Entries, StoreError> {
        self.tree
            .range(start..)
            .map(owned)
            .take_while(|item| item.as_ref().map_or(true, |(k, _)| k.starts_with(prefix)))
            .take(limit)
            .collect()
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        // Every write of a fjall batch carries the batch's one sequence number, so two writes
        // of one key in it would be ambiguous: the last one per key is kept, as sled keeps it.
        let writes: BTreeMap<Vec<u8>, Option<Vec<u8>>> = batch.writes.into_iter().collect();
        if let Some(key) = writes
            .keys()
            .find(|key| key.is_empty() || key.len() > KEY_BYTES_MAX)
        {
            return Err(StoreError::Backend(format!(
                "a key of {} bytes: the log-structured store takes keys of 1 to {KEY_BYTES_MAX} \
                 bytes",
                key.len()
            )));
        }
        let mut fjall_batch = self.db.batch();
        for (key, value) in writes {
            match value {
                Some(value) => fjall_batch.insert(&self.tree, key, value),
                None => fjall_batch.remove(&self.tree, key),
            }
        }
        fjall_batch.commit().map_err(error)
    }

    fn flush(&self) -> Result<(), StoreError> {
        // `SyncAll`: the journal's data and its size, and a journal fjall has just started.
        self.db.persist(fjall::PersistMode::SyncAll).map_err(error)
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        super::size_on_disk(&self.dir)
    }

    fn journal_bytes_on_disk(&self) -> Result<u64, StoreError> {
        super::size_on_disk_of(&self.dir, &|path| {
            path.extension().is_some_and(|extension| extension == "jnl")
        })
    }
}
