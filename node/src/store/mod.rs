//! Durable storage behind a narrow interface of our own: ordered keys, atomic batches, flush.
//!
//! Two engines implement it: sled 0.34 (`SledStore`) and fjall, a log-structured tree
//! (`LsmStore`, in `lsm.rs`). A store keeps the engine it was created with; a sled store is
//! moved to the log-structured engine when the node is configured for it (`migrate_to_lsm`).
//! Writes are acknowledged only after a flush, and concurrent writers share flushes (group
//! commit).

pub(crate) mod keys;
mod lsm;

pub use lsm::LsmStore;

use std::path::Path;
use std::sync::{Condvar, Mutex};

/// Why the store failed. The messages name keys' kinds, never values.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend reported an error (I/O, corruption detected by the engine).
    #[error("storage backend error: {0}")]
    Backend(String),
    /// A stored record does not decode: the data directory is damaged.
    #[error("stored {what} is damaged; run `estuary verify` and re-sync the affected documents")]
    Corrupt {
        /// Which kind of record.
        what: &'static str,
    },
    /// The storage engine refuses to open the store: its files are damaged.
    #[error(
        "the store's files are damaged and the storage engine refuses to open them ({reason}). Stop the node, move the `store` folder aside and start it again: it opens an empty store and re-syncs every document from its peers (the witness reports the changes lost until then)"
    )]
    Damaged {
        /// The engine's own words.
        reason: String,
    },
    /// A read of the store met data that does not read back as the engine wrote it.
    #[error(
        "a read of the store met damaged data ({reason}). Run `estuary verify`; if it cannot finish, stop the node, move the `store` folder aside and start it again: it opens an empty store and re-syncs every document from its peers"
    )]
    DamagedOnRead {
        /// The engine's own words.
        reason: String,
    },
    /// The store was written by a newer release in a layout this one cannot read.
    #[error(
        "the store's format is version {found}; this release reads up to version {supported}. Run the newer release, or re-sync into a fresh data directory"
    )]
    Format {
        /// The store's format version.
        found: u32,
        /// The newest this release reads.
        supported: u32,
    },
}

/// The engine a store is kept in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreEngine {
    /// sled 0.34: one B-tree of pages in a log.
    Sled,
    /// fjall: a log-structured merge tree (journal, memtable, sorted compressed tables). The
    /// engine of a new store unless the config names another.
    #[default]
    Lsm,
}

impl StoreEngine {
    /// The engine of the store in `dir`, if there is one.
    pub fn found_in(dir: &Path) -> Option<Self> {
        if holds_sled_files(dir) {
            Some(Self::Sled)
        } else if dir.join(lsm::MARKER_FILE).exists() {
            Some(Self::Lsm)
        } else {
            None
        }
    }

    /// Opens (or creates) a store of this engine in `dir`.
    fn open(self, dir: &Path) -> Result<Box<dyn KeyValue>, StoreError> {
        Ok(match self {
            Self::Sled => Box::new(SledStore::open(dir)?),
            Self::Lsm => Box::new(LsmStore::open(dir)?),
        })
    }
}

/// Whether `dir` holds sled's files (its config or its data file).
fn holds_sled_files(dir: &Path) -> bool {
    dir.join("conf").exists() || dir.join("db").exists()
}

/// Opens the store in `dir` in the engine it is kept in, as a tool that reads or mends a
/// stopped node's store does: no store is created and none is moved.
pub fn open_existing(dir: &Path) -> Result<Box<dyn KeyValue>, StoreError> {
    match StoreEngine::found_in(dir) {
        Some(engine) => engine.open(dir),
        None => Err(StoreError::Backend(format!(
            "no store in {}",
            dir.display()
        ))),
    }
}

impl std::str::FromStr for StoreEngine {
    type Err = String;

    /// An engine by the name the config file and `Display` give it.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "sled" => Ok(Self::Sled),
            "lsm" => Ok(Self::Lsm),
            other => Err(format!("{other:?}: the engines are sled and lsm")),
        }
    }
}

impl std::fmt::Display for StoreEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sled => "sled",
            Self::Lsm => "lsm",
        })
    }
}

impl From<sled::Error> for StoreError {
    fn from(error: sled::Error) -> Self {
        StoreError::Backend(error.to_string())
    }
}

/// A set of writes applied atomically: all of them or none, even across a crash.
#[derive(Default, Debug)]
pub struct Batch {
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    /// Sets `key` to `value`.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.writes.push((key.into(), Some(value.into())));
    }

    /// Removes `key`.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.writes.push((key.into(), None));
    }

    /// Whether the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Takes back the value of a put of `key` among the batch's last `within` writes (the
    /// write is removed), so that what follows can replace it; `None` if there is none there,
    /// or if the last write of `key` there is a delete.
    pub fn take_recent_put(&mut self, key: &[u8], within: usize) -> Option<Vec<u8>> {
        let start = self.writes.len().saturating_sub(within);
        let index = (start..self.writes.len())
            .rev()
            .find(|&index| self.writes[index].0 == key)?;
        self.writes[index].1.as_ref()?;
        self.writes.remove(index).1
    }
}

/// Keys and values in key order, as a prefix scan returns them.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Entries read at a time by [`pages`].
pub const SCAN_PAGE_RECORDS: usize = 1_024;

/// The entries starting with `prefix`, in key order, a page of at most `SCAN_PAGE_RECORDS` at
/// a time: a walk over a whole keyspace holds one page in memory, not the keyspace.
pub fn pages<'a>(store: &'a dyn KeyValue, prefix: &[u8]) -> Pages<'a> {
    Pages {
        store,
        prefix: prefix.to_vec(),
        from: Some(prefix.to_vec()),
    }
}

/// See [`pages`]. Ends after the last page, or after the first error.
pub struct Pages<'a> {
    store: &'a dyn KeyValue,
    prefix: Vec<u8>,
    /// Where the next page starts; `None` once the keyspace is read.
    from: Option<Vec<u8>>,
}

impl Iterator for Pages<'_> {
    type Item = Result<Entries, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let from = self.from.take()?;
        let page = match self.store.scan_from(&self.prefix, &from, SCAN_PAGE_RECORDS) {
            Ok(page) => page,
            Err(error) => return Some(Err(error)),
        };
        if page.len() == SCAN_PAGE_RECORDS {
            // The smallest key after the page's last.
            self.from = page
                .last()
                .map(|(last, _)| [last.as_slice(), &[0]].concat());
        }
        (!page.is_empty()).then_some(Ok(page))
    }
}

/// The storage interface the node needs.
pub trait KeyValue: Send + Sync {
    /// The value of `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every key and value starting with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Entries, StoreError>;
    /// Every key starting with `prefix`, in key order, without reading values into memory.
    fn keys_with_prefix(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError>;
    /// At most `limit` keys and values starting with `prefix`, from `start` on, in key order:
    /// a page of a long keyspace without reading the rest.
    fn scan_from(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Entries, StoreError> {
        let mut entries = self.scan_prefix(prefix)?;
        entries.retain(|(key, _)| key.as_slice() >= start);
        entries.truncate(limit);
        Ok(entries)
    }
    /// Applies a batch atomically. Not durable until `flush` returns.
    fn apply(&self, batch: Batch) -> Result<(), StoreError>;
    /// Makes every applied batch durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Bytes the store occupies on disk.
    fn size_on_disk(&self) -> Result<u64, StoreError>;
    /// Of `size_on_disk`, the bytes of journals: writes kept until the engine has them in its
    /// tables, a bounded amount that does not grow with the store (none for sled, whose log
    /// is its data file).
    fn journal_bytes_on_disk(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
}

/// The sled backend: one tree, keyspaces separated by key prefixes so that a batch spanning
/// them stays atomic.
pub struct SledStore {
    db: sled::Db,
    /// The directory sled keeps its files in.
    dir: std::path::PathBuf,
    /// sled's data file, opened to `fdatasync` it: sled 0.34 flushes with `sync_file_range`,
    /// which neither flushes the drive's write cache nor persists a grown file's size.
    /// `fdatasync` does both; the rest of `fsync` (times) is not needed to read the data.
    data_file: std::fs::File,
    /// sled writes values over about 128 KiB as files in `blobs/` and never `fsync`s them;
    /// the store does, once per file. The names already synced.
    synced_blobs: Mutex<std::collections::HashSet<std::ffi::OsString>>,
}

/// Most bytes of pages sled keeps in memory (its cache), and of blocks the log-structured
/// engine keeps (its block cache), per store. sled's own default is 1 GiB, which a catch-up
/// of 100,000 files fills: the node's memory then grows with its store. Pages and blocks
/// beyond it are read back from the file system's cache.
pub const STORE_CACHE_BYTES: u64 = 256 * 1024 * 1024;

/// How long opening a store waits for another holder of its file lock to let go: sled's
/// threads can hold it for a moment after the store that owned them was dropped (a node
/// restarted in the same process), and a command reading a stopped store holds it briefly.
pub const STORE_LOCK_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(10);

impl SledStore {
    /// Opens (or creates) the store in `dir`, waiting up to `STORE_LOCK_WAIT_MAX` for its
    /// file lock.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let started = std::time::Instant::now();
        loop {
            let opened = sled::Config::new()
                .path(dir)
                // No background flusher: every acknowledged write is flushed by `GroupCommit`
                // already, and sled's flusher thread outlives a dropped `Db` for a moment,
                // holding the store's file lock, and takes sled's flush lock, which stops
                // every batch while it works.
                .flush_every_ms(None)
                .cache_capacity(STORE_CACHE_BYTES)
                .open();
            match opened {
                Ok(db) => {
                    let data_file = std::fs::File::open(dir.join("db"))
                        .map_err(|e| StoreError::Backend(format!("store data file: {e}")))?;
                    return Ok(Self {
                        db,
                        dir: dir.to_path_buf(),
                        data_file,
                        synced_blobs: Mutex::new(std::collections::HashSet::new()),
                    });
                }
                Err(sled::Error::Io(error))
                    if lock_held(&error) && started.elapsed() < STORE_LOCK_WAIT_MAX =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(sled::Error::Io(error)) if lock_held(&error) => {
                    return Err(lock_held_error(dir));
                }
                Err(error @ sled::Error::Corruption { .. }) => {
                    return Err(StoreError::Damaged {
                        reason: error.to_string(),
                    });
                }
                Err(other) => return Err(StoreError::from(other)),
            }
        }
    }
}

/// Another process holds the store in `dir`, past `STORE_LOCK_WAIT_MAX`.
fn lock_held_error(dir: &Path) -> StoreError {
    StoreError::Backend(format!(
        "another process holds the store in {} (its lock was not released within {} s); stop \
         it and start again",
        dir.display(),
        STORE_LOCK_WAIT_MAX.as_secs()
    ))
}

/// `allocated_bytes` of a store's directory, as the store's error.
fn size_on_disk(dir: &Path) -> Result<u64, StoreError> {
    size_on_disk_of(dir, &|_| true)
}

/// `allocated_bytes` of the files under `dir` that `counted` names, as the store's error.
fn size_on_disk_of(dir: &Path, counted: &dyn Fn(&Path) -> bool) -> Result<u64, StoreError> {
    allocated_bytes(dir, counted).map_err(|error| {
        StoreError::Backend(format!(
            "could not read the size of {}: {error}",
            dir.display()
        ))
    })
}

/// The bytes the file system holds for the files under `dir` that `counted` names, as `du`
/// counts them: sled punches holes in the segments it frees, and the log-structured engine
/// lays its journals out at full size ahead of the data, so a file's length overstates what
/// it holds.
fn allocated_bytes(dir: &Path, counted: &dyn Fn(&Path) -> bool) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let metadata = entry.metadata()?;
        total += if metadata.is_dir() {
            allocated_bytes(&entry.path(), counted)?
        } else if counted(&entry.path()) {
            metadata.blocks() * 512
        } else {
            0
        };
    }
    Ok(total)
}

/// Whether sled refused to open because another holder has the store's file lock (sled 0.34
/// reports it as an `Other` error saying so).
fn lock_held(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::WouldBlock
        || error.to_string().contains("could not acquire lock")
}

impl KeyValue for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Entries, StoreError> {
        self.db
            .scan_prefix(prefix)
            .map(|item| {
                item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(Into::into)
            })
            .collect()
    }

    fn keys_with_prefix(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.db
            .scan_prefix(prefix)
            .keys()
            .map(|key| key.map(|k| k.to_vec()).map_err(Into::into))
            .collect()
    }

    fn scan_from(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Entries, StoreError> {
        self.db
            .range(start..)
            .take_while(|item| item.as_ref().map_or(true, |(k, _)| k.starts_with(prefix)))
            .take(limit)
            .map(|item| {
                item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(Into::into)
            })
            .collect()
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let mut sled_batch = sled::Batch::default();
        for (key, value) in batch.writes {
            match value {
                Some(value) => sled_batch.insert(key, value),
                None => sled_batch.remove(key),
            }
        }
        Ok(self.db.apply_batch(sled_batch)?)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        // Power-loss durability, beyond what sled's own flush gives (see `data_file`).
        self.data_file
            .sync_data()
            .map_err(|e| StoreError::Backend(format!("store data file: {e}")))?;
        self.sync_new_blobs()
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        size_on_disk(&self.dir)
    }
}

/// A store whose flushes also record, in a small file outside the store, how many changes
/// the store had accepted when the flush began.
///
/// sled 0.34 recovers from a damaged log entry by discarding it and everything after it,
/// silently, and then opens normally, and fjall drops a journal's torn tail the same way:
/// within the store nothing is inconsistent, so nothing inside it can notice. The witness
/// can: if it records more accepted changes than the store holds, acknowledged writes were
/// lost, and the node says so (and re-syncs from peers).
pub struct WitnessedStore {
    inner: Box<dyn KeyValue>,
    engine: StoreEngine,
    witness: Mutex<std::fs::File>,
    accepted: std::sync::atomic::AtomicU64,
    /// What the witness said at open.
    witnessed_at_open: u64,
}

/// Name of the witness file in the data directory.
pub const WITNESS_FILE: &str = "store.witness";
/// Witness record: accepted count (8 bytes, big-endian) and its first 8 SHA-256 bytes.
const WITNESS_BYTES: usize = 16;

impl WitnessedStore {
    /// Opens the store in `dir` and its witness file beside it. A new store is created in
    /// `engine` (`StoreEngine::default()` if none is named); an existing one keeps its own,
    /// except that a sled store is moved to the log-structured engine when `engine` names it
    /// (`migrate_to_lsm`): a store moves only when its operator asks.
    pub fn open(
        dir: &Path,
        witness: &Path,
        engine: Option<StoreEngine>,
    ) -> Result<Self, StoreError> {
        use std::io::Read;
        // Held until the store is open: one process at a time finishes, discards or makes a
        // move between engines (a command run while the node moves its store waits, then
        // meets the store's own lock).
        let _opening = OpeningLock::take(dir)?;
        finish_migration(dir)?;
        if holds_sled_files(dir) && dir.join(lsm::MARKER_FILE).exists() {
            return Err(StoreError::Backend(format!(
                "{} holds a log-structured store and sled's files beside it: a release that \
                 knows only sled opened it. Move sled's files (conf, db, snap.*, blobs) out \
                 of it and start again",
                dir.display()
            )));
        }
        let engine = match (StoreEngine::found_in(dir), engine) {
            (Some(StoreEngine::Sled), Some(StoreEngine::Lsm)) => {
                migrate_to_lsm(dir)?;
                StoreEngine::Lsm
            }
            (Some(found), Some(wanted)) if found != wanted => {
                tracing::warn!(
                    %found, %wanted,
                    "the store keeps the engine it was created with"
                );
                found
            }
            (Some(found), _) => found,
            (None, wanted) => wanted.unwrap_or_default(),
        };
        let inner = engine.open(dir)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(witness)
            .map_err(|e| StoreError::Backend(format!("witness file: {e}")))?;
        let mut record = Vec::with_capacity(WITNESS_BYTES);
        file.read_to_end(&mut record)
            .map_err(|e| StoreError::Backend(format!("witness file: {e}")))?;
        let witnessed_at_open = match record.as_slice() {
            [] => 0,
            bytes => decode_witness(bytes).ok_or(StoreError::Corrupt {
                what: "witness file",
            })?,
        };
        Ok(Self {
            inner,
            engine,
            witness: Mutex::new(file),
            accepted: std::sync::atomic::AtomicU64::new(0),
            witnessed_at_open,
        })
    }

    /// The engine the store is kept in.
    pub fn engine(&self) -> StoreEngine {
        self.engine
    }

    /// How many accepted changes the witness recorded at open.
    pub fn witnessed_at_open(&self) -> u64 {
        self.witnessed_at_open
    }

    /// Sets the number of accepted changes the next flush will witness.
    pub fn set_accepted(&self, accepted: u64) {
        self.accepted
            .store(accepted, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An exclusive lock on a file beside the store (`<dir>.open-lock`), held while a store is
/// opened, and so while it moves between engines. The lock lives as long as the file is open.
struct OpeningLock {
    _held: std::fs::File,
}

impl OpeningLock {
    /// Takes the lock, waiting up to `STORE_LOCK_WAIT_MAX` for another holder.
    fn take(dir: &Path) -> Result<Self, StoreError> {
        let path = beside(dir, ".open-lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
        let started = std::time::Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Self { _held: file }),
                Err(std::fs::TryLockError::WouldBlock)
                    if started.elapsed() < STORE_LOCK_WAIT_MAX =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => return Err(lock_held_error(dir)),
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(StoreError::Backend(format!("{}: {e}", path.display())));
                }
            }
        }
    }
}

/// `dir`'s path with `suffix` added to its name.
fn beside(dir: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    dir.with_file_name(name)
}

/// Where a store being moved to the log-structured engine is built, beside `dir`.
fn migration_dir(dir: &Path) -> std::path::PathBuf {
    beside(dir, ".migrating")
}

/// Written (and made durable) beside the copy once it holds every key and is durable itself:
/// only then may the sled store be renamed aside.
fn migration_done(dir: &Path) -> std::path::PathBuf {
    beside(dir, ".migrating.done")
}

/// Finishes or discards a move to the log-structured engine that stopped part-way. The sled
/// store is renamed aside only once the copy is whole and `migration_done` says so; so a copy
/// beside a store is discarded (the move starts again if still asked for), a copy without a
/// store is put in its place if it was finished, and discarded if not (the store was moved
/// away by hand, as for a damaged store).
fn finish_migration(dir: &Path) -> Result<(), StoreError> {
    let (copy, done) = (migration_dir(dir), migration_done(dir));
    let io = |e: std::io::Error| {
        StoreError::Backend(format!(
            "cannot finish moving the store to the log-structured engine ({}): {e}",
            copy.display()
        ))
    };
    if copy.exists() {
        if !dir.exists() && done.exists() {
            std::fs::rename(&copy, dir).map_err(io)?;
            sync_parent(dir).map_err(io)?;
        } else {
            std::fs::remove_dir_all(&copy).map_err(io)?;
        }
    }
    match std::fs::remove_file(&done) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
        _ => Ok(()),
    }
}

/// `fsync`s the directory holding `path`, so a rename in it survives a power loss.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) => std::fs::File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

/// Moves the sled store in `dir` to the log-structured engine: every key is copied, a page
/// at a time (`pages`), into a new store beside it, which is made durable; the sled store is
/// renamed to `<dir>.sled-<seconds since the epoch>` (kept for whoever wants to check the
/// copy; the node never reads it again) and the copy takes its place. A stop part-way leaves
/// the sled store in place (or the finished copy, which `finish_migration` puts there).
fn migrate_to_lsm(dir: &Path) -> Result<(), StoreError> {
    let copy_dir = migration_dir(dir);
    let started = std::time::Instant::now();
    tracing::warn!(
        store = %dir.display(),
        "moving the store from sled to the log-structured engine: every key is copied beside \
         it (room for about the live data is needed); the node starts once the copy is done"
    );
    let (mut keys, mut bytes) = (0u64, 0u64);
    let copied = (|| {
        let sled = SledStore::open(dir)?;
        let copy = LsmStore::open(&copy_dir)?;
        for page in pages(&sled, &[]) {
            let mut batch = Batch::default();
            for (key, value) in page? {
                keys += 1;
                bytes += (key.len() + value.len()) as u64;
                batch.put(key, value);
            }
            copy.apply(batch)?;
        }
        copy.flush()
    })();
    let io = |e: std::io::Error| {
        StoreError::Backend(format!(
            "cannot move the store in {} to the log-structured engine: {e}",
            dir.display()
        ))
    };
    if let Err(error) = copied {
        // The sled store is untouched; the next open starts the move again.
        let _ = std::fs::remove_dir_all(&copy_dir);
        return Err(error);
    }
    let done = migration_done(dir);
    std::fs::File::create(&done)
        .and_then(|file| file.sync_all())
        .and_then(|()| sync_parent(dir))
        .map_err(io)?;
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let aside = beside(dir, &format!(".sled-{seconds}"));
    std::fs::rename(dir, &aside).map_err(io)?;
    if let Err(error) = std::fs::rename(&copy_dir, dir) {
        // Put the sled store back rather than leave no store where the node looks for one.
        let _ = std::fs::rename(&aside, dir);
        return Err(io(error));
    }
    sync_parent(dir).map_err(io)?;
    std::fs::remove_file(&done).map_err(io)?;
    tracing::warn!(
        keys,
        bytes,
        seconds = started.elapsed().as_secs_f64(),
        old = %aside.display(),
        "the store moved to the log-structured engine; the old sled store is kept beside it \
         and can be deleted once the node runs"
    );
    Ok(())
}

impl SledStore {
    /// `fsync`s the blob files sled wrote since the last flush, and their directory.
    fn sync_new_blobs(&self) -> Result<(), StoreError> {
        let io = |e: std::io::Error| StoreError::Backend(format!("store blob files: {e}"));
        let blobs = self.dir.join("blobs");
        let entries = match std::fs::read_dir(&blobs) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(io(error)),
        };
        let mut synced = self.synced_blobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut present = std::collections::HashSet::new();
        let mut new = false;
        for entry in entries {
            let name = entry.map_err(io)?.file_name();
            if !synced.contains(&name) {
                std::fs::File::open(blobs.join(&name))
                    .and_then(|f| f.sync_all())
                    .map_err(io)?;
                new = true;
            }
            present.insert(name);
        }
        if new {
            std::fs::File::open(&blobs)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        // Forget blobs sled has since removed: the set stays as small as the directory.
        *synced = present;
        Ok(())
    }
}

fn encode_witness(accepted: u64) -> [u8; WITNESS_BYTES] {
    use sha2::{Digest, Sha256};
    let count = accepted.to_be_bytes();
    let check = Sha256::digest(count);
    let mut record = [0u8; WITNESS_BYTES];
    record[..8].copy_from_slice(&count);
    record[8..].copy_from_slice(&check[..8]);
    record
}

fn decode_witness(bytes: &[u8]) -> Option<u64> {
    let count: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    (bytes.len() == WITNESS_BYTES && encode_witness(u64::from_be_bytes(count))[..] == *bytes)
        .then(|| u64::from_be_bytes(count))
}

impl KeyValue for WitnessedStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Entries, StoreError> {
        self.inner.scan_prefix(prefix)
    }

    fn keys_with_prefix(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.inner.keys_with_prefix(prefix)
    }

    fn scan_from(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Entries, StoreError> {
        self.inner.scan_from(prefix, start, limit)
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        self.inner.apply(batch)
    }

    fn flush(&self) -> Result<(), StoreError> {
        use std::io::{Seek, SeekFrom, Write};
        // Captured before the flush: every change counted was applied before it began.
        let accepted = self.accepted.load(std::sync::atomic::Ordering::SeqCst);
        self.inner.flush()?;
        let mut file = self.witness.lock().unwrap_or_else(|p| p.into_inner());
        let io = |e: std::io::Error| StoreError::Backend(format!("witness file: {e}"));
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&encode_witness(accepted)).map_err(io)?;
        file.sync_data().map_err(io)
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.inner.size_on_disk()
    }

    fn journal_bytes_on_disk(&self) -> Result<u64, StoreError> {
        self.inner.journal_bytes_on_disk()
    }
}

/// Group commit: a writer that needs durability waits for a flush that began after its batch
/// was applied. The first waiter runs the flush for everyone waiting; writers that arrive
/// during it are covered by the next one. So N concurrent writers cost about one flush, not N.
///
/// sled applies a batch under its global write lock and holds the read side through a whole
/// flush, so no batch is applied while a flush runs. A flush started as soon as the first
/// writer is done would therefore cover that writer alone, and every other writer, blocked
/// behind it, would get a flush of its own. Writers deciding (`enter`) hold a flush back, at
/// most `COMMIT_WAIT_MAX`, until they have applied their batches: one flush then covers them
/// all. A writer alone waits for nothing.
pub struct GroupCommit {
    state: Mutex<FlushState>,
    flushed: Condvar,
    /// `COMMIT_WAIT_MAX`, longer in a test that must not depend on the scheduler.
    wait_max: std::time::Duration,
}

impl Default for GroupCommit {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            flushed: Condvar::default(),
            wait_max: COMMIT_WAIT_MAX,
        }
    }
}

/// Longest a flush waits for writers that are deciding to apply their batches. Writers
/// blocked behind a flush apply one after another once it ends (about 0.1 ms each); 16 API
/// writers take longer than 2 ms to, so a 2 ms wait left stragglers to a flush of their own
/// (`bench writes`, alternated: 1,226 writes/s against 1,156 at 2 ms, ack p99 26.6–29.8 ms
/// against 28.7–37.3; 10 ms measured no clear gain over 5). The price: while a peer's batch
/// is being decided, a flush waits the whole 5 ms.
pub const COMMIT_WAIT_MAX: std::time::Duration = std::time::Duration::from_millis(5);

/// A writer deciding: while it lives, a flush waits for it (see `GroupCommit`).
pub struct Deciding<'a> {
    commit: &'a GroupCommit,
}

impl Drop for Deciding<'_> {
    fn drop(&mut self) {
        let mut state = self.commit.lock();
        state.deciding -= 1;
        if state.deciding == 0 {
            self.commit.flushed.notify_all();
        }
    }
}

#[derive(Default)]
struct FlushState {
    /// Batches applied so far.
    applied: u64,
    /// Batches known durable.
    durable: u64,
    /// Whether a writer is flushing now.
    flushing: bool,
    /// Flushes run so far (for metrics and tests).
    flushes: u64,
    /// Writers deciding, whose batches a flush about to start waits for.
    deciding: usize,
}

impl GroupCommit {
    /// Applies `batch` and returns once it is durable.
    pub fn commit(&self, store: &dyn KeyValue, batch: Batch) -> Result<(), StoreError> {
        let ticket = self.apply(store, batch)?;
        self.wait_durable(store, ticket)
    }

    /// Applies `batch` (visible, not yet durable) and returns its ticket for `wait_durable`.
    pub fn apply(&self, store: &dyn KeyValue, batch: Batch) -> Result<u64, StoreError> {
        // Apply under the lock so that `applied` counts exactly the batches a flush that
        // starts afterwards will cover.
        let mut state = self.lock();
        store.apply(batch)?;
        state.applied += 1;
        Ok(state.applied)
    }

    /// Marks a writer that is about to decide and apply batches; a flush waits for it (at most
    /// `COMMIT_WAIT_MAX`) until the returned guard is dropped, which the writer does once its
    /// batches are applied, before it waits for durability.
    pub fn enter(&self) -> Deciding<'_> {
        self.lock().deciding += 1;
        Deciding { commit: self }
    }

    /// The ticket of the last batch applied: waiting on it covers everything applied so far.
    pub fn applied(&self) -> u64 {
        self.lock().applied
    }

    /// Returns once batch number `ticket` is durable, flushing if no one else is.
    pub fn wait_durable(&self, store: &dyn KeyValue, ticket: u64) -> Result<(), StoreError> {
        let mut state = self.lock();
        loop {
            if state.durable >= ticket {
                return Ok(());
            }
            if state.flushing {
                state = self
                    .flushed
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                continue;
            }
            // Writers still deciding get to apply first: one flush then covers them too.
            let deadline = std::time::Instant::now() + self.wait_max;
            while state.deciding > 0 && !state.flushing {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                state = self
                    .flushed
                    .wait_timeout(state, left)
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0;
            }
            if state.durable >= ticket {
                return Ok(());
            }
            if state.flushing {
                continue;
            }
            state.flushing = true;
            let target = state.applied;
            drop(state);
            let result = store.flush();
            state = self.lock();
            state.flushing = false;
            state.flushes += 1;
            if result.is_ok() {
                state.durable = state.durable.max(target);
            }
            self.flushed.notify_all();
            result?;
        }
    }

    /// Flushes run so far.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FlushState> {
        // A panic while holding this lock cannot leave the counters inconsistent (each update
        // is a single assignment), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Both engines, each in a new store in `dir`.
    fn both_engines(dir: &Path) -> [(StoreEngine, Box<dyn KeyValue>); 2] {
        [StoreEngine::Sled, StoreEngine::Lsm].map(|engine| {
            let store = engine.open(&dir.join(engine.to_string())).unwrap();
            (engine, store)
        })
    }

    #[test]
    fn pages_walk_a_keyspace_whole_in_order_and_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        for (engine, store) in both_engines(dir.path()) {
            walk_pages(&*store, engine);
        }
    }

    fn walk_pages(store: &dyn KeyValue, engine: StoreEngine) {
        // A keyspace of exactly two pages, one of two and a half, with neighbours on both sides.
        for (prefix, count) in [
            (b'a', 3),
            (b'b', 2 * SCAN_PAGE_RECORDS),
            (b'c', 2_560),
            (b'd', 3),
        ] {
            let mut batch = Batch::default();
            for n in 0..count as u32 {
                batch.put(
                    [&[prefix][..], &n.to_be_bytes()].concat(),
                    n.to_le_bytes().to_vec(),
                );
            }
            store.apply(batch).unwrap();
        }
        for (prefix, count) in [(b'b', 2 * SCAN_PAGE_RECORDS), (b'c', 2_560), (b'e', 0)] {
            let pages: Vec<Entries> = pages(store, &[prefix]).map(Result::unwrap).collect();
            assert!(pages.iter().all(|page| page.len() <= SCAN_PAGE_RECORDS));
            let keys: Vec<Vec<u8>> = pages.into_iter().flatten().map(|(key, _)| key).collect();
            let expected: Vec<Vec<u8>> = (0..count as u32)
                .map(|n| [&[prefix][..], &n.to_be_bytes()].concat())
                .collect();
            assert_eq!(keys, expected, "{engine}");
        }
    }

    #[test]
    fn a_sled_snapshot_whose_writing_was_cut_short_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("store");
        {
            let store = SledStore::open(&store_dir).unwrap();
            let mut batch = Batch::default();
            batch.put(b"k".to_vec(), b"v".to_vec());
            GroupCommit::default().commit(&store, batch).unwrap();
        }
        // What a kill leaves while sled writes a snapshot: the file it renames once whole,
        // named after a later point of the log than any snapshot before it, cut short.
        for partial in [&b""[..], &b"\x01\x02\x03"[..], &[0u8; 64][..]] {
            std::fs::write(store_dir.join("snap.FFFFFFFFFFFFFFFF.generating"), partial).unwrap();
            let store = SledStore::open(&store_dir)
                .unwrap_or_else(|e| panic!("a cut snapshot of {} bytes: {e}", partial.len()));
            assert_eq!(store.get(b"k").unwrap(), Some(b"v".to_vec()));
        }
    }

    #[test]
    fn a_value_too_large_for_sleds_log_is_stored_as_a_synced_blob_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("store");
        let big = vec![7u8; 300 * 1024];
        {
            let store = SledStore::open(&store_dir).unwrap();
            let mut batch = Batch::default();
            batch.put(b"big".to_vec(), big.clone());
            GroupCommit::default().commit(&store, batch).unwrap();
            assert!(
                std::fs::read_dir(store_dir.join("blobs")).unwrap().count() > 0,
                "sled wrote the value as a blob file"
            );
            assert!(
                !store.synced_blobs.lock().unwrap().is_empty(),
                "and the node synced it"
            );
        }
        let store = SledStore::open(&store_dir).unwrap();
        assert_eq!(store.get(b"big").unwrap(), Some(big));
    }

    #[test]
    fn a_batch_survives_reopening_and_keeps_the_last_write_of_each_key() {
        let dir = tempfile::tempdir().unwrap();
        for engine in [StoreEngine::Sled, StoreEngine::Lsm] {
            let dir = dir.path().join(engine.to_string());
            {
                let store = engine.open(&dir).unwrap();
                let mut batch = Batch::default();
                batch.put(b"a/1".to_vec(), b"one".to_vec());
                batch.put(b"b/1".to_vec(), b"two".to_vec());
                // A key written twice in a batch holds the last write; one put then deleted
                // in the same batch is gone.
                batch.put(b"b/2".to_vec(), b"first".to_vec());
                batch.put(b"b/2".to_vec(), b"second".to_vec());
                batch.put(b"b/3".to_vec(), b"gone".to_vec());
                batch.delete(b"b/3".to_vec());
                GroupCommit::default().commit(&*store, batch).unwrap();
            }
            assert_eq!(StoreEngine::found_in(&dir), Some(engine));
            let store = engine.open(&dir).unwrap();
            assert_eq!(
                store.get(b"a/1").unwrap(),
                Some(b"one".to_vec()),
                "{engine}"
            );
            assert_eq!(
                store.scan_prefix(b"b/").unwrap(),
                vec![
                    (b"b/1".to_vec(), b"two".to_vec()),
                    (b"b/2".to_vec(), b"second".to_vec())
                ],
                "{engine}"
            );
            assert_eq!(
                store.keys_with_prefix(b"a/").unwrap(),
                vec![b"a/1".to_vec()]
            );
            assert_eq!(
                store.scan_from(b"b/", b"b/2", 10).unwrap(),
                vec![(b"b/2".to_vec(), b"second".to_vec())],
                "{engine}"
            );
        }
    }

    /// A witnessed store of `engine` in `dir`, its witness beside it.
    fn witnessed(dir: &Path, engine: StoreEngine) -> WitnessedStore {
        WitnessedStore::open(&dir.join("store"), &dir.join(WITNESS_FILE), Some(engine)).unwrap()
    }

    #[test]
    fn a_sled_store_moves_to_the_log_structured_engine_whole_and_keeps_its_old_files_aside() {
        let dir = tempfile::tempdir().unwrap();
        // More than a page of keys, and a value sled keeps as a blob file.
        let keys = 2 * SCAN_PAGE_RECORDS + 7;
        {
            let store = witnessed(dir.path(), StoreEngine::Sled);
            let mut batch = Batch::default();
            for n in 0..keys as u32 {
                batch.put(n.to_be_bytes().to_vec(), vec![n as u8; 40]);
            }
            batch.put(b"big".to_vec(), vec![9u8; 300 * 1024]);
            store.set_accepted(keys as u64);
            GroupCommit::default().commit(&store, batch).unwrap();
        }
        // Asking for sled again keeps it; asking for lsm moves it.
        assert_eq!(
            witnessed(dir.path(), StoreEngine::Sled).engine(),
            StoreEngine::Sled
        );
        let store = witnessed(dir.path(), StoreEngine::Lsm);
        assert_eq!(store.engine(), StoreEngine::Lsm);
        assert_eq!(store.witnessed_at_open(), keys as u64);
        let copied: Vec<(Vec<u8>, Vec<u8>)> = pages(&store, &[])
            .flat_map(Result::unwrap)
            .filter(|(key, _)| key.len() == 4)
            .collect();
        let expected: Vec<(Vec<u8>, Vec<u8>)> = (0..keys as u32)
            .map(|n| (n.to_be_bytes().to_vec(), vec![n as u8; 40]))
            .collect();
        assert_eq!(copied, expected);
        assert_eq!(store.get(b"big").unwrap(), Some(vec![9u8; 300 * 1024]));
        drop(store);
        let aside: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("store.sled-"))
            .collect();
        assert_eq!(aside.len(), 1, "the old store is kept aside");
        assert_eq!(
            StoreEngine::found_in(&dir.path().join(&aside[0])),
            Some(StoreEngine::Sled)
        );
        // Opened again, nothing moves: the store is the log-structured one.
        assert_eq!(
            witnessed(dir.path(), StoreEngine::Sled).engine(),
            StoreEngine::Lsm
        );
    }

    #[test]
    fn a_log_structured_store_whose_creation_was_cut_short_is_created_again() {
        let dir = tempfile::tempdir().unwrap();
        // The first journal as fjall makes it, from a creation that finished.
        let finished = dir.path().join("finished");
        drop(fjall::Database::builder(&finished).open().unwrap());
        let journal = std::fs::read(finished.join("0.jnl")).unwrap();
        // Each point at which a kill can stop fjall's creation before its marker is written
        // (lock file, keyspaces' folder, first journal, marker), in the order fjall makes them.
        let cuts: [&dyn Fn(&Path); 5] = [
            &|dir| std::fs::write(dir.join("lock"), b"").unwrap(),
            &|dir| std::fs::create_dir(dir.join("keyspaces")).unwrap(),
            &|dir| std::fs::write(dir.join("0.jnl"), b"").unwrap(),
            &|dir| std::fs::write(dir.join("0.jnl"), &journal).unwrap(),
            &|dir| std::fs::write(dir.join(lsm::MARKER_FILE), b"").unwrap(),
        ];
        for made in 1..=cuts.len() {
            let store_dir = dir.path().join(format!("cut-{made}"));
            std::fs::create_dir(&store_dir).unwrap();
            for cut in &cuts[..made] {
                cut(&store_dir);
            }
            {
                let store = LsmStore::open(&store_dir)
                    .unwrap_or_else(|e| panic!("cut after {made} steps: {e}"));
                let mut batch = Batch::default();
                batch.put(b"k".to_vec(), b"v".to_vec());
                GroupCommit::default().commit(&store, batch).unwrap();
            }
            assert_eq!(StoreEngine::found_in(&store_dir), Some(StoreEngine::Lsm));
            let store = LsmStore::open(&store_dir).unwrap();
            assert_eq!(store.get(b"k").unwrap(), Some(b"v".to_vec()), "cut {made}");
        }
        // A folder without the marker that holds anything else is refused, untouched.
        let store_dir = dir.path().join("other");
        std::fs::create_dir(&store_dir).unwrap();
        for cut in &cuts[..3] {
            cut(&store_dir);
        }
        std::fs::write(store_dir.join("notes.txt"), b"kept").unwrap();
        match LsmStore::open(&store_dir) {
            Err(StoreError::Damaged { reason }) => {
                assert!(reason.contains("notes.txt"), "{reason}")
            }
            other => panic!("a folder holding a stray file: {:?}", other.err()),
        }
        assert_eq!(std::fs::read(store_dir.join("notes.txt")).unwrap(), b"kept");
        assert!(store_dir.join("0.jnl").exists());
    }

    #[test]
    fn a_move_to_the_log_structured_engine_stopped_part_way_is_redone_or_finished() {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("store");
        let copy_dir = migration_dir(&store_dir);
        let put = |store: &dyn KeyValue, value: &[u8]| {
            let mut batch = Batch::default();
            batch.put(b"k".to_vec(), value.to_vec());
            GroupCommit::default().commit(store, batch).unwrap();
        };
        // Stopped while copying: the sled store is still in place; the copy is discarded
        // and the move done again from the store.
        put(&witnessed(dir.path(), StoreEngine::Sled), b"sled");
        put(&LsmStore::open(&copy_dir).unwrap(), b"half-made copy");
        let store = witnessed(dir.path(), StoreEngine::Lsm);
        assert_eq!(store.get(b"k").unwrap(), Some(b"sled".to_vec()));
        assert!(!copy_dir.exists());
        drop(store);
        // Stopped between the two renames: the finished copy takes the store's place.
        std::fs::rename(&store_dir, &copy_dir).unwrap();
        std::fs::File::create(migration_done(&store_dir)).unwrap();
        let store = witnessed(dir.path(), StoreEngine::Sled);
        assert_eq!(store.engine(), StoreEngine::Lsm);
        assert_eq!(store.get(b"k").unwrap(), Some(b"sled".to_vec()));
        assert!(!migration_done(&store_dir).exists());
        drop(store);
        // A copy never finished, with no store beside it (moved away by hand): discarded,
        // never taken for the store.
        std::fs::rename(&store_dir, &copy_dir).unwrap();
        let store = witnessed(dir.path(), StoreEngine::Lsm);
        assert_eq!(store.get(b"k").unwrap(), None);
        assert!(!copy_dir.exists());
    }

    #[test]
    fn a_folder_holding_both_engines_files_is_refused_not_read_as_either() {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("store");
        {
            let store = witnessed(dir.path(), StoreEngine::Lsm);
            let mut batch = Batch::default();
            batch.put(b"k".to_vec(), b"held".to_vec());
            GroupCommit::default().commit(&store, batch).unwrap();
        }
        // A release that knows only sled opens the folder: sled makes its files beside.
        drop(SledStore::open(&store_dir).unwrap());
        let refused = WitnessedStore::open(&store_dir, &dir.path().join(WITNESS_FILE), None);
        let Err(StoreError::Backend(reason)) = refused else {
            panic!("opened a folder holding both engines' files");
        };
        assert!(reason.contains("Move sled's files"), "{reason}");
    }

    #[test]
    fn a_store_being_opened_is_opened_by_one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("store");
        let held = OpeningLock::take(&store_dir).unwrap();
        let waiting = std::thread::spawn({
            let dir = dir.path().to_path_buf();
            move || witnessed(&dir, StoreEngine::Lsm).engine()
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!waiting.is_finished(), "it waits for the lock");
        assert!(!store_dir.exists(), "and touches nothing meanwhile");
        drop(held);
        assert_eq!(waiting.join().unwrap(), StoreEngine::Lsm);
    }

    /// An in-memory store whose flushes wait at a gate, so a test can hold one flush open.
    #[derive(Default)]
    struct GatedStore {
        map: Mutex<std::collections::BTreeMap<Vec<u8>, Vec<u8>>>,
        gate: Mutex<bool>,
        opened: Condvar,
        flushes_started: std::sync::atomic::AtomicU64,
    }

    impl KeyValue for GatedStore {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(self.map.lock().unwrap().get(key).cloned())
        }
        fn scan_prefix(&self, prefix: &[u8]) -> Result<Entries, StoreError> {
            let map = self.map.lock().unwrap();
            Ok(map
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect())
        }
        fn keys_with_prefix(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
            Ok(self
                .scan_prefix(prefix)?
                .into_iter()
                .map(|(k, _)| k)
                .collect())
        }
        fn apply(&self, batch: Batch) -> Result<(), StoreError> {
            let mut map = self.map.lock().unwrap();
            for (key, value) in batch.writes {
                match value {
                    Some(value) => map.insert(key, value),
                    None => map.remove(&key),
                };
            }
            Ok(())
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.flushes_started
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut open = self.gate.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
            Ok(())
        }
        fn size_on_disk(&self) -> Result<u64, StoreError> {
            Ok(0)
        }
    }

    fn write(commit: &GroupCommit, store: &dyn KeyValue, key: String) {
        let mut batch = Batch::default();
        batch.put(key.into_bytes(), b"v".to_vec());
        commit.commit(store, batch).unwrap();
    }

    #[test]
    fn writers_arriving_during_a_flush_share_the_next_one() {
        let store = Arc::new(GatedStore::default());
        let commit = Arc::new(GroupCommit::default());
        let spawn = |key: String| {
            let (store, commit) = (Arc::clone(&store), Arc::clone(&commit));
            std::thread::spawn(move || write(&commit, store.as_ref(), key))
        };
        // The first writer starts a flush and is held in it.
        let first = spawn("k/first".into());
        while store
            .flushes_started
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
        {
            std::thread::yield_now();
        }
        // Fifteen more apply their batches while that flush is open, then wait.
        let others: Vec<_> = (0..15).map(|i| spawn(format!("k/{i}"))).collect();
        while store.map.lock().unwrap().len() < 16 {
            std::thread::yield_now();
        }
        *store.gate.lock().unwrap() = true;
        store.opened.notify_all();
        first.join().unwrap();
        for other in others {
            other.join().unwrap();
        }
        // One flush for the first writer, one shared by the fifteen that came during it.
        assert_eq!(commit.flushes(), 2);
    }

    #[test]
    fn a_flush_waits_for_writers_still_deciding_and_then_covers_them() {
        let store = Arc::new(GatedStore::default());
        *store.gate.lock().unwrap() = true;
        // A wait long enough that the scheduler cannot end it: the second writer does.
        let commit = Arc::new(GroupCommit {
            wait_max: std::time::Duration::from_secs(60),
            ..GroupCommit::default()
        });
        // Two writers deciding at once; the first is done and waits for durability while the
        // second is still deciding.
        let first = commit.enter();
        let second = commit.enter();
        let mut batch = Batch::default();
        batch.put(b"k/1".to_vec(), b"v".to_vec());
        let ticket = commit.apply(store.as_ref(), batch).unwrap();
        drop(first);
        let waiter = {
            let (store, commit) = (Arc::clone(&store), Arc::clone(&commit));
            std::thread::spawn(move || commit.wait_durable(store.as_ref(), ticket).unwrap())
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut batch = Batch::default();
        batch.put(b"k/2".to_vec(), b"v".to_vec());
        let ticket = commit.apply(store.as_ref(), batch).unwrap();
        drop(second);
        commit.wait_durable(store.as_ref(), ticket).unwrap();
        waiter.join().unwrap();
        // The flush waited for the second writer: one flush made both durable.
        assert_eq!(commit.flushes(), 1);
        // A writer alone, with no one deciding, flushes at once (a 60 s wait would show).
        write(&commit, store.as_ref(), "k/3".into());
        assert_eq!(commit.flushes(), 2);
    }
}
