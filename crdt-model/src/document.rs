//! What every model document shares: its identity fields, its schema version, and the replica
//! API (load, save, merge, heads) that each typed document exposes.

use automerge::transaction::Transactable;
use automerge::{ObjId, ReadDoc};

use crate::access::{Obj, checked, uint};
use crate::error::ValidationError;
use crate::ids::DocumentId;
use crate::vocab::vocabulary;

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: u64 = 1;

vocabulary! {
    /// The three kinds of document in a consortium.
    DocumentKind {
        /// A resident's health file.
        HealthFile = "health_file",
        /// A referral between two member institutions.
        Referral = "referral",
        /// The consortium roster.
        Roster = "roster",
    }
}

/// Root keys every document has.
pub(crate) const IDENTITY_KEYS: [&str; 2] = ["type", "schema"];

/// Reads and checks a document's kind and schema version.
pub(crate) fn read_identity<D: ReadDoc>(doc: &D) -> Result<DocumentKind, ValidationError> {
    read_identity_of(&Obj::root(doc))
}

/// [`read_identity`] of the document whose root is `root`.
pub(crate) fn read_identity_of<D: ReadDoc>(
    root: &Obj<'_, D>,
) -> Result<DocumentKind, ValidationError> {
    let kind = root
        .register("type", "type", checked("type", DocumentKind::parse))
        .map_err(|_| ValidationError::UnknownDocumentType)?
        .ok_or(ValidationError::UnknownDocumentType)?;
    if kind.is_conflicted() {
        return Err(ValidationError::IdentityChanged);
    }
    let schema = root.once("schema", "schema", uint("schema"))?;
    if schema != SCHEMA_VERSION {
        return Err(ValidationError::UnsupportedSchema {
            found: schema,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(kind.value)
}

/// The containers of each kind of document: written once at creation, edited in place after.
fn containers(kind: DocumentKind) -> &'static [&'static str] {
    match kind {
        DocumentKind::HealthFile => &crate::health_file::CONTAINERS,
        DocumentKind::Referral => &["events"],
        DocumentKind::Roster => &["institutions", "revocations"],
    }
}

/// Checks that a change kept every container of the document: replacing one with a new object
/// would hide what other replicas concurrently wrote into the old one.
pub(crate) fn check_containers_kept<B: ReadDoc, A: ReadDoc>(
    before: &B,
    after: &A,
    kind: DocumentKind,
) -> Result<(), ValidationError> {
    for key in containers(kind) {
        let old = before
            .get(automerge::ROOT, *key)
            .ok()
            .flatten()
            .map(|(_, id)| id);
        let new = after
            .get(automerge::ROOT, *key)
            .ok()
            .flatten()
            .map(|(_, id)| id);
        if old != new {
            return Err(ValidationError::ReplacedObject { field: key });
        }
    }
    Ok(())
}

/// Writes a new document's identity.
pub(crate) fn write_identity(
    tx: &mut impl Transactable,
    kind: DocumentKind,
) -> Result<(), automerge::AutomergeError> {
    let root: ObjId = automerge::ROOT;
    tx.put(&root, "type", kind.as_str())?;
    tx.put(&root, "schema", SCHEMA_VERSION)?;
    Ok(())
}

/// The id of the document created by the change with hash `creation`: its first 16 bytes.
///
/// Binding the id to the creation change means no other change can claim to create the same
/// document: a node accepts a change without dependencies for document `d` only if
/// `document_id_of(hash) == d`, a decision every node makes the same way.
pub fn document_id_of(creation: &automerge::ChangeHash) -> DocumentId {
    let mut id = [0u8; 16];
    id.copy_from_slice(&creation.0[..16]);
    DocumentId::from_bytes(id)
}

/// The id of a document: that of its one creation change (the only change without
/// dependencies). A document with several is refused: two documents were mixed.
pub fn document_id(doc: &mut automerge::AutoCommit) -> Result<DocumentId, ValidationError> {
    let mut roots = doc
        .get_changes_meta(&[])
        .into_iter()
        .filter(|change| change.deps.is_empty())
        .map(|change| change.hash);
    match (roots.next(), roots.next()) {
        (Some(creation), None) => Ok(document_id_of(&creation)),
        _ => Err(ValidationError::IdentityChanged),
    }
}

/// Runs one of automerge's decoders on untrusted bytes, turning a panic inside it into
/// `LoadError::DecoderFault`.
///
/// automerge 0.12 can panic on malformed input (found by fuzzing: an `unwrap` in its column
/// decoder). Containing the panic is sound because every caller decodes into a fresh document
/// or a fork that is dropped on failure: no state the panic may have left half-built survives.
pub(crate) fn guard_decoder<T>(
    decode: impl FnOnce() -> Result<T, automerge::AutomergeError>,
) -> Result<T, crate::LoadError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)) {
        Ok(result) => Ok(result?),
        Err(_) => Err(crate::LoadError::DecoderFault),
    }
}

/// The first bytes of every automerge chunk.
const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_DOCUMENT: u8 = 0;
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED_CHANGE: u8 = 2;
/// The bit of an automerge column specification that marks the column's data as DEFLATE.
const COLUMN_DEFLATE: u32 = 0x08;
/// Bytes of one change hash in a document chunk's heads.
const CHANGE_HASH_BYTES: u64 = 32;

/// Walks the chunk framing of untrusted automerge bytes before automerge parses them. No
/// bytes at all is an empty increment, and passes.
///
/// Refuses chunk types Estuary never writes (automerge 0.12's bundle parser panics and
/// allocates gigabytes on crafted bundles, found by fuzzing) and inflates what automerge would
/// inflate without a bound — compressed changes, and the compressed columns of a document
/// chunk — through bounds first, counting the bytes and never holding them.
pub(crate) fn check_chunks(bytes: &[u8]) -> Result<(), crate::LoadError> {
    check_framing(bytes, true)
}

/// `check_chunks`, inflating the compressed parts to count them only if `inflate`.
fn check_framing(bytes: &[u8], inflate: bool) -> Result<(), crate::LoadError> {
    let mut inflated_bytes = 0;
    for chunk in (Chunks { bytes }) {
        let Chunk {
            chunk_type, data, ..
        } = chunk?;
        match chunk_type {
            // A change chunk's columns are never compressed: automerge refuses one that is.
            CHUNK_CHANGE => {}
            CHUNK_DOCUMENT => check_document_columns(data, inflate, &mut inflated_bytes)?,
            CHUNK_COMPRESSED_CHANGE if inflate => inflate_within(
                data,
                Compressed::Change,
                crate::limits::CHANGE_INFLATED_BYTES_MAX,
                &mut inflated_bytes,
            )?,
            CHUNK_COMPRESSED_CHANGE => {}
            _ => {
                return Err(refused(
                    "chunk type not accepted (only documents and changes)",
                ));
            }
        }
    }
    Ok(())
}

/// Whether `bytes` are exactly one document chunk (a `save()`, with no change chunks after
/// it): such bytes, once loaded, can be kept as the document's snapshot instead of saving the
/// loaded document again.
pub fn is_one_document_chunk(bytes: &[u8]) -> bool {
    let mut chunks = Chunks { bytes };
    matches!(
        chunks.next(),
        Some(Ok(Chunk {
            chunk_type: CHUNK_DOCUMENT,
            ..
        }))
    ) && chunks.next().is_none()
}

/// One automerge chunk of untrusted bytes, framed but not parsed.
struct Chunk<'a> {
    chunk_type: u8,
    /// The whole chunk, header included.
    whole: &'a [u8],
    /// Its data, after the header.
    data: &'a [u8],
}

/// The chunks of untrusted automerge bytes, in order; an error ends the walk.
struct Chunks<'a> {
    bytes: &'a [u8],
}

impl<'a> Iterator for Chunks<'a> {
    type Item = Result<Chunk<'a>, crate::LoadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.bytes.is_empty() {
            return None;
        }
        let bytes = std::mem::take(&mut self.bytes);
        // magic (4) | checksum (4) | chunk type (1) | data length (LEB128) | data
        if bytes.len() < 9 || bytes[..4] != CHUNK_MAGIC {
            return Some(Err(refused("not automerge chunk framing")));
        }
        let Some((length, length_bytes)) = read_uleb128(&bytes[9..]) else {
            return Some(Err(refused("bad chunk length")));
        };
        let start = 9 + length_bytes;
        let Some(end) = usize::try_from(length)
            .ok()
            .and_then(|length| start.checked_add(length))
            .filter(|end| *end <= bytes.len())
        else {
            return Some(Err(refused("chunk longer than the bytes given")));
        };
        self.bytes = &bytes[end..];
        Some(Ok(Chunk {
            chunk_type: bytes[8],
            whole: &bytes[..end],
            data: &bytes[start..end],
        }))
    }
}

fn refused(reason: &'static str) -> crate::LoadError {
    crate::LoadError::Refused { reason }
}

/// Walks the column layout of one document chunk's data and, if `inflate`, inflates its
/// compressed columns through their bounds, counting into `inflated_bytes`.
///
/// The layout is automerge 0.12's (`storage/document.rs`): the actors (a count, then each
/// as a length and its bytes); the heads (a count, then 32-byte hashes); the change columns'
/// metadata, then the op columns' metadata (each a count, then a column specification and a
/// data length per column); the change columns' data and the op columns' data, in the order
/// of their metadata; then the heads' indices, which this walk does not need.
fn check_document_columns(
    data: &[u8],
    inflate: bool,
    inflated_bytes: &mut u64,
) -> Result<(), crate::LoadError> {
    let malformed = || refused("malformed document chunk: its column layout is unreadable");
    let mut cursor = Cursor { bytes: data };
    // Each actor takes at least one byte, so a huge count ends at the end of the data.
    let actors = cursor.uleb128().ok_or_else(malformed)?;
    for _ in 0..actors {
        let length = cursor.uleb128().ok_or_else(malformed)?;
        cursor.take(length).ok_or_else(malformed)?;
    }
    let heads = cursor.uleb128().ok_or_else(malformed)?;
    let heads_bytes = heads.checked_mul(CHANGE_HASH_BYTES).ok_or_else(malformed)?;
    cursor.take(heads_bytes).ok_or_else(malformed)?;
    let change_columns = column_metadata(&mut cursor)?;
    let op_columns = column_metadata(&mut cursor)?;
    for (specification, length) in change_columns.into_iter().chain(op_columns) {
        let column = cursor
            .take(length)
            .ok_or_else(|| refused("malformed document chunk: a column runs past its end"))?;
        if inflate && specification & COLUMN_DEFLATE != 0 {
            inflate_within(
                column,
                Compressed::DocumentColumn,
                crate::limits::DOCUMENT_COLUMN_INFLATED_BYTES_MAX,
                inflated_bytes,
            )?;
        }
    }
    Ok(())
}

/// Reads one block of column metadata: each column's specification and data length.
fn column_metadata(cursor: &mut Cursor<'_>) -> Result<Vec<(u32, u64)>, crate::LoadError> {
    let malformed = || refused("malformed document chunk: its column layout is unreadable");
    let count = cursor.uleb128().ok_or_else(malformed)?;
    let count = usize::try_from(count)
        .ok()
        .filter(|count| *count <= crate::limits::DOCUMENT_COLUMNS_MAX)
        .ok_or_else(|| refused("malformed document chunk: too many columns"))?;
    let mut columns = Vec::with_capacity(count);
    for _ in 0..count {
        // automerge reads a specification as a 32-bit value and refuses a larger one.
        let specification = cursor
            .uleb128()
            .and_then(|specification| u32::try_from(specification).ok())
            .ok_or_else(malformed)?;
        let length = cursor.uleb128().ok_or_else(malformed)?;
        columns.push((specification, length));
    }
    Ok(columns)
}

/// What a DEFLATE stream in untrusted bytes is, for the reason given when it is refused.
#[derive(Clone, Copy)]
enum Compressed {
    Change,
    DocumentColumn,
}

/// Inflates one DEFLATE stream into a counting sink, so that the inflated bytes are never
/// held, and adds their count to `inflated_bytes`, the running total of one decode. Refuses
/// a stream that does not inflate, that inflates past `limit_bytes`, or that takes the total
/// past `INFLATED_BYTES_PER_DECODE_MAX`.
fn inflate_within(
    compressed: &[u8],
    what: Compressed,
    limit_bytes: u64,
    inflated_bytes: &mut u64,
) -> Result<(), crate::LoadError> {
    use std::io::Read;
    let left_bytes = crate::limits::INFLATED_BYTES_PER_DECODE_MAX.saturating_sub(*inflated_bytes);
    let bound_bytes = limit_bytes.min(left_bytes);
    // One byte past the bound tells a stream at the bound from one beyond it.
    let mut inflated =
        flate2::bufread::DeflateDecoder::new(compressed).take(bound_bytes.saturating_add(1));
    let size = std::io::copy(&mut inflated, &mut std::io::sink()).map_err(|_| {
        refused(match what {
            Compressed::Change => "compressed change does not inflate",
            Compressed::DocumentColumn => "compressed document column does not inflate",
        })
    })?;
    if size > limit_bytes {
        return Err(refused(match what {
            Compressed::Change => "compressed change inflates past its limit",
            Compressed::DocumentColumn => "compressed document column inflates past its limit",
        }));
    }
    if size > left_bytes {
        return Err(refused(
            "compressed chunks and columns inflate past the limit of one decode",
        ));
    }
    *inflated_bytes += size;
    Ok(())
}

/// A cursor over untrusted bytes: reads past the end fail instead of panicking.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn uleb128(&mut self) -> Option<u64> {
        let (value, length) = read_uleb128(self.bytes)?;
        self.bytes = &self.bytes[length..];
        Some(value)
    }

    fn take(&mut self, length: u64) -> Option<&'a [u8]> {
        let length = usize::try_from(length).ok()?;
        if length > self.bytes.len() {
            return None;
        }
        let (taken, rest) = self.bytes.split_at(length);
        self.bytes = rest;
        Some(taken)
    }
}

/// Reads an unsigned LEB128 value of at most 64 bits: the value and the bytes it took.
fn read_uleb128(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (index, byte) in bytes.iter().take(10).enumerate() {
        let bits = u64::from(byte & 0x7f);
        let shift = 7 * index as u32;
        if shift == 63 && bits > 1 {
            return None;
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            return Some((value, index + 1));
        }
    }
    None
}

/// Decodes a saved automerge document from untrusted bytes, without panicking.
pub fn load_document(bytes: &[u8]) -> Result<automerge::AutoCommit, crate::LoadError> {
    if bytes.is_empty() {
        return Err(crate::LoadError::Refused { reason: "no bytes" });
    }
    load_checked(bytes, || automerge::AutoCommit::load(bytes))
}

/// Decodes a saved automerge document from untrusted bytes, without panicking, with its
/// changes as `get_changes(&[])` lists them: loading one document chunk builds every change
/// to check the document's heads, and they are kept rather than built again.
pub fn load_document_with_changes(
    bytes: &[u8],
) -> Result<(automerge::AutoCommit, Vec<automerge::Change>), crate::LoadError> {
    if bytes.is_empty() {
        return Err(crate::LoadError::Refused { reason: "no bytes" });
    }
    load_checked(bytes, || automerge::AutoCommit::load_with_changes(bytes))
}

/// Runs one of automerge's loaders on untrusted bytes once their framing is checked
/// (`check_chunks`). Bytes too few to inflate past any bound (`cannot_inflate_past_bounds`)
/// skip inflating their compressed parts to count them, which automerge does again: if
/// automerge then fails, the full check runs, so a stream that does not inflate is refused
/// with the same reason as before.
fn load_checked<T>(
    bytes: &[u8],
    load: impl FnOnce() -> Result<T, automerge::AutomergeError>,
) -> Result<T, crate::LoadError> {
    if !cannot_inflate_past_bounds(bytes.len()) {
        check_chunks(bytes)?;
        return guard_decoder(load);
    }
    // Refused by the walk alone: the reason the full check gives, as it would have first.
    if let Err(refused) = check_framing(bytes, false) {
        return Err(check_chunks(bytes).err().unwrap_or(refused));
    }
    guard_decoder(load).map_err(|error| match check_chunks(bytes) {
        Err(refused) => refused,
        Ok(()) => error,
    })
}

/// The most bytes one byte of a DEFLATE stream can inflate to: a length-258 match at distance
/// 1 coded in two bits (a one-bit length code and a one-bit distance code) gives 1,032 bytes
/// per byte, and no other coding gives more.
const DEFLATE_INFLATION_RATIO_MAX: u64 = 1_032;

/// Whether `bytes` bytes of anything are too few for the DEFLATE streams in them to inflate
/// past any bound of one decode, alone or together: then inflating them to count is
/// pointless.
fn cannot_inflate_past_bounds(bytes: usize) -> bool {
    let bound = crate::limits::CHANGE_INFLATED_BYTES_MAX
        .min(crate::limits::DOCUMENT_COLUMN_INFLATED_BYTES_MAX)
        .min(crate::limits::INFLATED_BYTES_PER_DECODE_MAX);
    (bytes as u64).saturating_mul(DEFLATE_INFLATION_RATIO_MAX) <= bound
}

/// Decodes the changes of untrusted automerge bytes that `base` lacks (a sync message's
/// document chunk: the sender's whole document), without panicking and without changing
/// `base`. Changes whose dependencies are in neither are left out.
pub fn decode_changes_onto(
    base: &automerge::AutoCommit,
    bytes: &[u8],
) -> Result<Vec<automerge::Change>, crate::LoadError> {
    if bytes.is_empty() {
        return Err(crate::LoadError::Refused { reason: "no bytes" });
    }
    check_chunks(bytes)?;
    let mut fork = base.clone();
    let before = fork.get_heads();
    guard_decoder(|| fork.load_incremental(bytes))?;
    Ok(fork.get_changes(&before))
}

/// A piece of a sync message's changes: one change, or a document.
pub enum SyncChunk<'a> {
    /// One change.
    Change(Box<automerge::Change>),
    /// A document chunk: decoded onto what the receiver holds (`decode_changes_onto`).
    Document(&'a [u8]),
}

/// Splits one chunk of a sync message's changes, from untrusted bytes, without panicking.
///
/// automerge's sync messages carry a change as its own chunk, several changes concatenated
/// in one chunk (its version-2 messages), or a whole document (`save()`, which puts any
/// change automerge holds aside for its dependencies after the document, as change chunks).
/// Each change is decoded on its own, so one whose dependencies the receiver lacks comes out
/// like any other, for the receiver to hold until they arrive. (Loaded onto the receiver's
/// document, such a change would wait inside automerge, out of sight.) The framing and its
/// inflation bounds are checked once, for the whole chunk.
pub fn split_sync_chunk(bytes: &[u8]) -> Result<Vec<SyncChunk<'_>>, crate::LoadError> {
    if bytes.is_empty() {
        return Err(crate::LoadError::Refused { reason: "no bytes" });
    }
    check_chunks(bytes)?;
    (Chunks { bytes })
        .map(|chunk| {
            let chunk = chunk?;
            Ok(match chunk.chunk_type {
                CHUNK_DOCUMENT => SyncChunk::Document(chunk.whole),
                _ => SyncChunk::Change(Box::new(decode_checked_change(chunk.whole)?)),
            })
        })
        .collect()
}

/// Decodes one automerge change from untrusted bytes (a peer's envelope), without panicking.
pub fn decode_change(bytes: &[u8]) -> Result<automerge::Change, crate::LoadError> {
    if bytes.is_empty() {
        return Err(crate::LoadError::Refused { reason: "no bytes" });
    }
    check_chunks(bytes)?;
    decode_checked_change(bytes)
}

/// `decode_change` on bytes whose framing `check_chunks` has passed.
fn decode_checked_change(bytes: &[u8]) -> Result<automerge::Change, crate::LoadError> {
    match std::panic::catch_unwind(|| automerge::Change::from_bytes(bytes.to_vec())) {
        Ok(Ok(change)) => Ok(change),
        Ok(Err(_)) => Err(crate::LoadError::Refused {
            reason: "not a well-formed automerge change",
        }),
        Err(_) => Err(crate::LoadError::DecoderFault),
    }
}

/// Ends the change `written` made on `doc`: committed (with the editor's time) if it
/// succeeded, rolled back if it failed. Returns the change's hash, `None` if nothing was
/// written.
pub(crate) fn commit_or_roll_back(
    doc: &mut automerge::AutoCommit,
    editor: &crate::Editor,
    written: Result<(), crate::OpError>,
) -> Result<Option<automerge::ChangeHash>, crate::OpError> {
    match written {
        Ok(()) => {
            // automerge records change times in seconds.
            let options = automerge::transaction::CommitOptions::default()
                .with_time(editor.at.0.div_euclid(1000));
            Ok(doc.commit_with(options))
        }
        Err(error) => {
            doc.rollback();
            Err(error)
        }
    }
}

/// Implements the replica API shared by every typed document: a struct with fields
/// `doc: AutoCommit` and `id: DocumentId`, a `KIND`, and a `parse` function.
macro_rules! replica {
    ($name:ident, $kind:expr, $view:ty, $parse:path) => {
        impl $name {
            /// The kind of document this type holds.
            pub const KIND: $crate::DocumentKind = $kind;

            /// Loads a saved document, checking it is of this kind and valid, and sets the
            /// actor this replica will write as.
            pub fn load(bytes: &[u8], actor: &$crate::Actor) -> Result<Self, $crate::LoadError> {
                let doc = $crate::document::load_document(bytes)?;
                Self::from_automerge(doc, actor)
            }

            /// Wraps an automerge document after checking it is of this kind and valid.
            pub fn from_automerge(
                mut doc: automerge::AutoCommit,
                actor: &$crate::Actor,
            ) -> Result<Self, $crate::LoadError> {
                let found = $crate::document::read_identity(&doc)?;
                if found != Self::KIND {
                    return Err($crate::LoadError::WrongKind {
                        expected: Self::KIND,
                        found,
                    });
                }
                $parse(&doc)?;
                let id = $crate::document::document_id(&mut doc)?;
                doc.set_actor(actor.to_automerge());
                Ok(Self { doc, id })
            }

            /// The document's id.
            pub fn id(&self) -> $crate::DocumentId {
                self.id
            }

            /// The typed view of the whole document, with conflicts.
            pub fn view(&self) -> $view {
                // Every constructor validates, and every operation writes only what validation
                // accepts, so a failure here is a bug in this crate, not bad input.
                let mut view = $parse(&self.doc)
                    .expect("a typed document is valid on every path that builds it");
                view.id = self.id;
                view
            }

            /// The current heads (hashes of the changes no other change depends on).
            pub fn heads(&mut self) -> Vec<automerge::ChangeHash> {
                self.doc.get_heads()
            }

            /// The whole document, compacted.
            pub fn save(&mut self) -> Vec<u8> {
                self.doc.save()
            }

            /// The changes made since the last `save` or `save_incremental`.
            pub fn save_incremental(&mut self) -> Vec<u8> {
                self.doc.save_incremental()
            }

            /// Applies saved changes (from `save` or `save_incremental` of another replica).
            /// The result is validated on a fork first; an invalid result leaves this replica
            /// unchanged.
            pub fn load_incremental(&mut self, bytes: &[u8]) -> Result<(), $crate::LoadError> {
                $crate::document::check_chunks(bytes)?;
                let mut fork = self.doc.fork();
                $crate::document::guard_decoder(|| fork.load_incremental(bytes))?;
                self.adopt(fork)
            }

            /// Merges another replica of the same document into this one. The result is
            /// validated on a fork first; an invalid result leaves this replica unchanged.
            pub fn merge(&mut self, other: &mut Self) -> Result<(), $crate::LoadError> {
                let mut fork = self.doc.fork();
                fork.merge(&mut other.doc)?;
                self.adopt(fork)
            }

            /// Applies changes (for instance from `get_changes` of another replica), validated as
            /// `merge` is.
            pub fn apply_changes(
                &mut self,
                changes: Vec<automerge::Change>,
            ) -> Result<(), $crate::LoadError> {
                let mut fork = self.doc.fork();
                $crate::document::guard_decoder(|| fork.apply_changes(changes))?;
                self.adopt(fork)
            }

            /// The changes this replica holds that are not ancestors of `have`.
            pub fn changes_since(
                &mut self,
                have: &[automerge::ChangeHash],
            ) -> Vec<automerge::Change> {
                self.doc.get_changes(have)
            }

            /// Read-only access to the underlying automerge document, for sync and storage.
            /// Edits go through the typed operations only.
            pub fn automerge(&self) -> &automerge::AutoCommit {
                &self.doc
            }

            /// The underlying automerge document, given up: for a store that keeps the
            /// document a new replica was created in, instead of applying its first change
            /// again.
            pub fn into_automerge(self) -> automerge::AutoCommit {
                self.doc
            }

            fn adopt(&mut self, mut fork: automerge::AutoCommit) -> Result<(), $crate::LoadError> {
                $crate::document::read_identity(&fork)?;
                if $crate::document::document_id(&mut fork)? != self.id {
                    return Err($crate::ValidationError::IdentityChanged.into());
                }
                $parse(&fork)?;
                fork.set_actor(self.doc.get_actor().clone());
                self.doc = fork;
                Ok(())
            }

            /// Commits a new document's first change, its identity and what `write` writes,
            /// and derives its id from it.
            #[allow(dead_code)] // Not every document type creates itself this way.
            fn create_with(
                actor: &$crate::Actor,
                editor: &$crate::Editor,
                write: impl FnOnce(&mut automerge::AutoCommit) -> Result<(), $crate::OpError>,
            ) -> Result<Self, $crate::OpError> {
                Self::create_blank(actor, editor, |tx| {
                    $crate::document::write_identity(tx, Self::KIND)?;
                    write(tx)
                })
            }

            /// Commits a new document's first change, which `write` makes whole (its
            /// identity included), and derives its id from it.
            fn create_blank(
                actor: &$crate::Actor,
                editor: &$crate::Editor,
                write: impl FnOnce(&mut automerge::AutoCommit) -> Result<(), $crate::OpError>,
            ) -> Result<Self, $crate::OpError> {
                let mut created = Self {
                    doc: automerge::AutoCommit::new().with_actor(actor.to_automerge()),
                    id: $crate::DocumentId::from_bytes([0; 16]),
                };
                created.transact(editor, write)?;
                let creation = created.doc.get_heads();
                let [creation] = creation.as_slice() else {
                    unreachable!("a new document has exactly one change");
                };
                created.id = $crate::document::document_id_of(creation);
                Ok(created)
            }

            /// Runs `write` as one change: committed if it succeeds, rolled back if it fails.
            fn transact<T>(
                &mut self,
                editor: &$crate::Editor,
                write: impl FnOnce(&mut automerge::AutoCommit) -> Result<T, $crate::OpError>,
            ) -> Result<T, $crate::OpError> {
                match write(&mut self.doc) {
                    Ok(value) => {
                        $crate::document::commit_or_roll_back(&mut self.doc, editor, Ok(()))?;
                        Ok(value)
                    }
                    Err(error) => {
                        self.doc.rollback();
                        Err(error)
                    }
                }
            }
        }
    };
}
pub(crate) use replica;

#[cfg(test)]
mod tests {
    use super::*;

    /// The best compression of the most compressible input stays within the ratio that lets
    /// small bytes skip their inflation check.
    #[test]
    fn deflate_never_inflates_past_its_ratio() {
        use std::io::Write;
        let zeros = vec![0u8; 64 * 1024 * 1024];
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(&zeros).expect("deflating into memory");
        let deflated = encoder.finish().expect("deflating into memory");
        assert!((zeros.len() as u64) <= deflated.len() as u64 * DEFLATE_INFLATION_RATIO_MAX);
        // The bound admits no more bytes than inflate within every limit.
        assert!(cannot_inflate_past_bounds(16_256));
        assert!(!cannot_inflate_past_bounds(16_257));
    }
}
