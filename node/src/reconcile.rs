//! Range-based set reconciliation of two nodes' catalogues: which documents differ.
//!
//! A catalogue is the set of (document id, digest of its heads), ordered by document id. The
//! initiator asks about ranges of ids; for each range the responder answers with its items
//! when it has at most `LEAF_ITEMS_MAX` of them, and otherwise with the fingerprints of
//! `SPLIT_FANOUT` consecutive sub-ranges. The initiator compares each fingerprint with its own
//! and asks again only about the sub-ranges that differ. Finding `d` differences among `n`
//! documents takes about log₁₆(n / 32) rounds and O(d · log n) bytes; equal catalogues cost one
//! round and one fingerprint.
//!
//! On the wire (CBOR) fields and variants carry one-letter names: a split answer is sixteen
//! sub-range records, and their names would otherwise be most of its bytes.
//!
//! A fingerprint is the count of items in the range and the wrapping sum of their 128-bit item
//! hashes (SHA-256 of id ‖ digest, truncated): adding or changing any item changes it, and it
//! is maintained per item, so a range's fingerprint is a sum, not a re-hash.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteArray;
use sha2::{Digest as _, Sha256};

/// A range with at most this many items on the responder's side is answered with its items.
pub const LEAF_ITEMS_MAX: usize = 32;
/// A larger range is answered with this many sub-range fingerprints.
pub const SPLIT_FANOUT: usize = 16;
/// Most ranges one query may ask about (a peer asking for more is refused).
pub const QUERY_RANGES_MAX: usize = 4_096;
/// Most differing ranges an initiator keeps waiting to ask about: with 16 sub-ranges per
/// split, this is enough for any two catalogues of up to a few million documents.
pub const DIFFERING_RANGES_MAX: usize = 1 << 20;
/// Most rounds one reconciliation may take. Ranges still to ask about beyond
/// `QUERY_RANGES_MAX` wait for later rounds, so a node far behind a large catalogue takes
/// more rounds (an empty node against 700,000 documents: about 20).
pub const ROUNDS_MAX: usize = 1_024;

/// A document id as the catalogue orders it.
pub type Id = [u8; 16];
/// The digest of a document's heads.
pub type HeadsDigest = [u8; 32];

/// One catalogue entry, with its item hash kept beside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Digest of the document's heads.
    pub digest: HeadsDigest,
    hash: u128,
}

impl Entry {
    /// The entry for a document with this heads digest.
    pub fn new(id: &Id, digest: HeadsDigest) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(id);
        hasher.update(digest);
        let full = hasher.finalize();
        let mut hash = [0u8; 16];
        hash.copy_from_slice(&full[..16]);
        Self {
            digest,
            hash: u128::from_be_bytes(hash),
        }
    }
}

/// Changes of a catalogue remembered (about 7 MB): a reconciliation by coded symbols is
/// about one version of each side's catalogue, and must end before this many of its
/// documents change.
pub const CATALOGUE_LOG_MAX: usize = 65_536;

/// Coded symbols of a catalogue kept up to date as it changes (about 50 KB): an exchange of
/// up to this many symbols (a few hundred differing documents) costs no pass over the
/// catalogue on either side.
pub const CACHED_SYMBOLS: usize = 1_024;

/// A node's catalogue in memory: every document it holds, by id. Two catalogues are equal
/// when they hold the same entries.
#[derive(Clone, Debug)]
pub struct Catalogue {
    entries: BTreeMap<Id, Entry>,
    /// The wrapping sum of every item hash, kept up to date: the whole range's fingerprint —
    /// what an in-sync check compares — costs nothing to compute.
    sum: u128,
    /// Raised by every change of an entry.
    version: u64,
    /// The latest changes, oldest first (at most `CATALOGUE_LOG_MAX`): an earlier version's
    /// coded symbols are the current ones with these undone.
    log: VecDeque<Logged>,
    /// Its first `CACHED_SYMBOLS` coded symbols (`crate::riblt`), kept up to date.
    prefix: Vec<crate::riblt::Symbol>,
}

/// One change of a catalogue: the version it made, the item it replaced or removed, the item
/// it added.
#[derive(Clone, Copy, Debug)]
struct Logged {
    version: u64,
    removed: Option<crate::riblt::Item>,
    added: Option<crate::riblt::Item>,
}

impl PartialEq for Catalogue {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl Eq for Catalogue {}

impl Default for Catalogue {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            sum: 0,
            version: 0,
            log: VecDeque::new(),
            prefix: vec![crate::riblt::Symbol::default(); CACHED_SYMBOLS],
        }
    }
}

/// An entry as a rateless IBLT item: its id and its hash.
fn item(id: &Id, entry: &Entry) -> crate::riblt::Item {
    crate::riblt::Item {
        id: *id,
        tag: entry.hash,
    }
}

/// The ids from `lower` (inclusive) to `upper` (exclusive; `None`: to the end).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounds {
    /// First id in the range.
    #[serde(rename = "l")]
    pub lower: ByteArray<16>,
    /// First id after the range, if any.
    #[serde(rename = "u")]
    pub upper: Option<ByteArray<16>>,
}

impl Bounds {
    /// Every id.
    pub fn all() -> Self {
        Self {
            lower: ByteArray::new([0; 16]),
            upper: None,
        }
    }

    fn is_valid(&self) -> bool {
        self.upper.is_none_or(|upper| *self.lower < *upper)
    }
}

/// The summary of a range: how many items, and the sum of their hashes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Items in the range.
    #[serde(rename = "c")]
    pub count: u64,
    /// Wrapping sum of their hashes, big-endian.
    #[serde(rename = "s")]
    pub sum: ByteArray<16>,
}

/// An initiator's question: these ranges, please; here is what I hold in each. Or coded
/// symbols of the responder's catalogue (`crate::riblt`), which a responder that predates
/// them ignores: it answers without symbols, and the initiator goes on with ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    /// The ranges, in increasing order, not overlapping.
    #[serde(rename = "r")]
    pub ranges: Vec<Asked>,
    /// Coded symbols asked for. (Field `c` carried symbols with 64 bits of each entry's hash,
    /// which no node asked for; a node that answered it reads this query as one about no
    /// ranges and answers without symbols.)
    #[serde(rename = "y", default, skip_serializing_if = "Option::is_none")]
    pub symbols: Option<crate::riblt::Query>,
}

/// One range asked about, with the initiator's fingerprint of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Asked {
    /// The range.
    #[serde(rename = "b")]
    pub bounds: Bounds,
    /// The initiator's fingerprint of it: the responder answers `Same` when it matches.
    #[serde(rename = "f")]
    pub fingerprint: Fingerprint,
}

/// A sub-range's fingerprint: the sub-ranges of an answer are consecutive, from the queried
/// range's lower bound; each ends where the next begins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// First id after this sub-range (`None`: the queried range's end).
    #[serde(rename = "u")]
    pub upper: Option<ByteArray<16>>,
    /// Its fingerprint on the responder's side.
    #[serde(rename = "f")]
    pub fingerprint: Fingerprint,
}

/// The responder's answer for one queried range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// The responder's fingerprint matches the initiator's: nothing differs here.
    #[serde(rename = "=")]
    Same,
    /// All its items in the range.
    #[serde(rename = "i")]
    Items(Vec<(ByteArray<16>, ByteArray<32>)>),
    /// Fingerprints of consecutive sub-ranges covering it.
    #[serde(rename = "s")]
    Split(Vec<Part>),
}

/// The answers to a query, one per range, in order, and the coded symbols asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// One answer per queried range.
    #[serde(rename = "a")]
    pub answers: Vec<Answer>,
    /// The coded symbols asked for (absent from a responder that predates them).
    #[serde(rename = "y", default, skip_serializing_if = "Option::is_none")]
    pub symbols: Option<crate::riblt::Reply>,
}

/// Why a reconciliation message was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReconcileError {
    /// The peer asked about too many ranges at once.
    #[error(
        "a reconciliation of {ranges} ranges exceeds its limits ({QUERY_RANGES_MAX} per query, {DIFFERING_RANGES_MAX} waiting)"
    )]
    TooManyRanges {
        /// Ranges asked about.
        ranges: usize,
    },
    /// The message does not follow the protocol.
    #[error("malformed reconciliation message: {reason}")]
    Malformed {
        /// What is wrong.
        reason: &'static str,
    },
    /// The peer kept splitting past any catalogue's depth, or kept asking for more symbols.
    #[error("reconciliation did not finish within its rounds")]
    TooManyRounds,
    /// The catalogue version asked about is out of reach (more than `CATALOGUE_LOG_MAX`
    /// changes ago, or not reached).
    #[error("catalogue version {version} is out of reach; reconcile again")]
    Stale {
        /// The version asked about.
        version: u64,
    },
    /// More symbols than one reconciliation takes (`crate::riblt::SYMBOLS_MAX`).
    #[error("a reconciliation needs more symbols than its limit")]
    TooManySymbols,
}

impl ReconcileError {
    /// Whether the peer broke the protocol (rather than the catalogues changing too fast or
    /// differing too much for one reconciliation).
    pub fn is_peers_fault(&self) -> bool {
        !matches!(self, Self::Stale { .. } | Self::TooManySymbols)
    }
}

impl Catalogue {
    /// Sets a document's heads digest.
    pub fn insert(&mut self, id: Id, digest: HeadsDigest) {
        let entry = Entry::new(&id, digest);
        let old = self.entries.insert(id, entry);
        if old == Some(entry) {
            return;
        }
        if let Some(old) = old {
            self.sum = self.sum.wrapping_sub(old.hash);
        }
        self.sum = self.sum.wrapping_add(entry.hash);
        self.changed(old.map(|old| item(&id, &old)), Some(item(&id, &entry)));
    }

    /// Forgets a document.
    pub fn remove(&mut self, id: &Id) {
        if let Some(old) = self.entries.remove(id) {
            self.sum = self.sum.wrapping_sub(old.hash);
            self.changed(Some(item(id, &old)), None);
        }
    }

    fn changed(&mut self, removed: Option<crate::riblt::Item>, added: Option<crate::riblt::Item>) {
        if let Some(removed) = &removed {
            crate::riblt::adjust(&mut self.prefix, 0, removed, -1);
        }
        if let Some(added) = &added {
            crate::riblt::adjust(&mut self.prefix, 0, added, 1);
        }
        self.version += 1;
        if self.log.len() == CATALOGUE_LOG_MAX {
            self.log.pop_front();
        }
        self.log.push_back(Logged {
            version: self.version,
            removed,
            added,
        });
    }

    /// Its version: raised by every change of an entry.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Coded symbols `from .. from + count` of this catalogue as it was at `version` (at
    /// most `CATALOGUE_LOG_MAX` changes ago). The first `CACHED_SYMBOLS` cost no pass over
    /// the catalogue; any later, one.
    pub fn symbols(
        &self,
        version: u64,
        from: u64,
        count: usize,
    ) -> Result<Vec<crate::riblt::Symbol>, ReconcileError> {
        let reachable = self
            .log
            .front()
            .map_or(self.version, |oldest| oldest.version - 1);
        if version > self.version || version < reachable {
            return Err(ReconcileError::Stale { version });
        }
        let cached = usize::try_from(from)
            .ok()
            .and_then(|from| self.prefix.get(from..from.checked_add(count)?));
        let mut symbols = if let Some(cached) = cached {
            cached.to_vec()
        } else {
            let mut encoder = crate::riblt::Encoder::new(self.riblt_items());
            encoder.skip_to(from);
            encoder.produce(count)
        };
        for logged in self.log.iter().rev().take_while(|l| l.version > version) {
            if let Some(added) = &logged.added {
                crate::riblt::adjust(&mut symbols, from, added, -1);
            }
            if let Some(removed) = &logged.removed {
                crate::riblt::adjust(&mut symbols, from, removed, 1);
            }
        }
        Ok(symbols)
    }

    /// How many documents it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds no document.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every document id, in order.
    pub fn ids(&self) -> impl Iterator<Item = &Id> {
        self.entries.keys()
    }

    /// Every entry as a rateless IBLT item (`crate::riblt`): its id and its hash.
    pub fn riblt_items(&self) -> impl Iterator<Item = crate::riblt::Item> + '_ {
        self.entries.iter().map(|(id, entry)| item(id, entry))
    }

    /// A document's heads digest.
    pub fn get(&self, id: &Id) -> Option<HeadsDigest> {
        self.entries.get(id).map(|e| e.digest)
    }

    fn range(&self, bounds: &Bounds) -> impl Iterator<Item = (&Id, &Entry)> {
        let upper = match &bounds.upper {
            Some(upper) => Bound::Excluded(**upper),
            None => Bound::Unbounded,
        };
        self.entries.range((Bound::Included(*bounds.lower), upper))
    }

    fn fingerprint(&self, bounds: &Bounds) -> Fingerprint {
        if *bounds == Bounds::all() {
            return Fingerprint {
                count: self.entries.len() as u64,
                sum: ByteArray::new(self.sum.to_be_bytes()),
            };
        }
        let (count, sum) = self
            .range(bounds)
            .fold((0u64, 0u128), |(count, sum), (_, entry)| {
                (count + 1, sum.wrapping_add(entry.hash))
            });
        Fingerprint {
            count,
            sum: ByteArray::new(sum.to_be_bytes()),
        }
    }

    /// The responder's side: answers a peer's query.
    pub fn answer(&self, query: &Query) -> Result<Reply, ReconcileError> {
        if query.ranges.len() > QUERY_RANGES_MAX {
            return Err(ReconcileError::TooManyRanges {
                ranges: query.ranges.len(),
            });
        }
        if !query.ranges.iter().all(|asked| asked.bounds.is_valid()) {
            return Err(ReconcileError::Malformed {
                reason: "a range ends before it begins",
            });
        }
        // In increasing order and not overlapping: each item is then summed at most once per
        // query, so a query costs at most one pass over the catalogue.
        let ordered = query.ranges.windows(2).all(|pair| {
            pair[0]
                .bounds
                .upper
                .is_some_and(|upper| *upper <= *pair[1].bounds.lower)
        });
        if !ordered {
            return Err(ReconcileError::Malformed {
                reason: "ranges out of order or overlapping",
            });
        }
        let answers = query
            .ranges
            .iter()
            .map(|asked| {
                let bounds = &asked.bounds;
                if self.fingerprint(bounds) == asked.fingerprint {
                    return Answer::Same;
                }
                let items: Vec<(&Id, &Entry)> = self.range(bounds).collect();
                if items.len() <= LEAF_ITEMS_MAX {
                    return Answer::Items(
                        items
                            .into_iter()
                            .map(|(id, entry)| (ByteArray::new(*id), ByteArray::new(entry.digest)))
                            .collect(),
                    );
                }
                let chunk = items.len().div_ceil(SPLIT_FANOUT);
                let chunks: Vec<&[(&Id, &Entry)]> = items.chunks(chunk).collect();
                let parts = chunks
                    .iter()
                    .enumerate()
                    .map(|(i, chunk)| {
                        let sum = chunk
                            .iter()
                            .fold(0u128, |sum, (_, entry)| sum.wrapping_add(entry.hash));
                        Part {
                            upper: match chunks.get(i + 1) {
                                Some(next) => Some(ByteArray::new(*next[0].0)),
                                None => bounds.upper,
                            },
                            fingerprint: Fingerprint {
                                count: chunk.len() as u64,
                                sum: ByteArray::new(sum.to_be_bytes()),
                            },
                        }
                    })
                    .collect();
                Answer::Split(parts)
            })
            .collect();
        // A query asks for ranges or for symbols, and for no symbols past those the hybrid
        // takes: each such query then costs at most one pass over the catalogue.
        if let Some(asked) = &query.symbols {
            if !query.ranges.is_empty() {
                return Err(ReconcileError::Malformed {
                    reason: "ranges and coded symbols asked for at once",
                });
            }
            if asked.from.saturating_add(u64::from(asked.count)) > SYMBOLS_HYBRID_MAX {
                return Err(ReconcileError::TooManySymbols);
            }
        }
        let symbols = query
            .symbols
            .as_ref()
            .map(|asked| crate::riblt::answer(self, asked))
            .transpose()?;
        Ok(Reply { answers, symbols })
    }
}

/// How a document differs between the two sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Difference {
    /// Only the initiator holds it.
    OnlyOurs,
    /// Only the responder holds it.
    OnlyTheirs,
    /// Both hold it, with different heads.
    Both,
}

/// The initiator's side of one reconciliation.
#[derive(Debug)]
pub struct Reconciliation {
    asked: Query,
    /// Ranges found differing that wait for a later round (in order).
    waiting: std::collections::VecDeque<Asked>,
    rounds: usize,
    differing: Vec<(Id, Difference)>,
}

impl Reconciliation {
    /// Starts a reconciliation of `ours` over every id.
    pub fn new(ours: &Catalogue) -> Self {
        let all = Bounds::all();
        Self {
            asked: Query {
                ranges: vec![Asked {
                    bounds: all,
                    fingerprint: ours.fingerprint(&all),
                }],
                symbols: None,
            },
            waiting: std::collections::VecDeque::new(),
            rounds: 0,
            differing: Vec::new(),
        }
    }

    /// The query to send now.
    pub fn query(&self) -> &Query {
        &self.asked
    }

    /// Takes the peer's reply to the last query; returns whether another query is needed.
    pub fn receive(&mut self, ours: &Catalogue, reply: &Reply) -> Result<bool, ReconcileError> {
        self.rounds += 1;
        if self.rounds > ROUNDS_MAX {
            return Err(ReconcileError::TooManyRounds);
        }
        if reply.answers.len() != self.asked.ranges.len() {
            return Err(ReconcileError::Malformed {
                reason: "not one answer per range asked",
            });
        }
        let mut next = Vec::new();
        for (asked, answer) in self.asked.ranges.iter().zip(&reply.answers) {
            if next.len() + self.waiting.len() > DIFFERING_RANGES_MAX {
                return Err(ReconcileError::TooManyRanges {
                    ranges: next.len() + self.waiting.len(),
                });
            }
            let bounds = &asked.bounds;
            match answer {
                Answer::Same => {}
                Answer::Items(theirs) => {
                    let mut theirs_by_id = BTreeMap::new();
                    for (id, digest) in theirs {
                        let inside =
                            **id >= *bounds.lower && bounds.upper.is_none_or(|upper| **id < *upper);
                        if !inside || theirs_by_id.insert(**id, **digest).is_some() {
                            return Err(ReconcileError::Malformed {
                                reason: "an item outside its range, or twice",
                            });
                        }
                    }
                    for (id, entry) in ours.range(bounds) {
                        match theirs_by_id.remove(id) {
                            None => self.differing.push((*id, Difference::OnlyOurs)),
                            Some(digest) if digest != entry.digest => {
                                self.differing.push((*id, Difference::Both));
                            }
                            Some(_) => {}
                        }
                    }
                    self.differing.extend(
                        theirs_by_id
                            .into_keys()
                            .map(|id| (id, Difference::OnlyTheirs)),
                    );
                }
                Answer::Split(parts) => {
                    if parts.len() > SPLIT_FANOUT || parts.is_empty() {
                        return Err(ReconcileError::Malformed {
                            reason: "a split into too many or no parts",
                        });
                    }
                    let mut lower = bounds.lower;
                    for (i, part) in parts.iter().enumerate() {
                        let last = i + 1 == parts.len();
                        let sub = Bounds {
                            lower,
                            upper: part.upper,
                        };
                        let ends_right = if last {
                            part.upper == bounds.upper
                        } else {
                            part.upper.is_some_and(|upper| {
                                bounds.upper.is_none_or(|outer| *upper < *outer)
                            })
                        };
                        if !ends_right || !sub.is_valid() {
                            return Err(ReconcileError::Malformed {
                                reason: "sub-ranges that do not tile the range",
                            });
                        }
                        let fingerprint = ours.fingerprint(&sub);
                        if fingerprint != part.fingerprint {
                            next.push(Asked {
                                bounds: sub,
                                fingerprint,
                            });
                        }
                        if let Some(upper) = part.upper {
                            lower = upper;
                        }
                    }
                }
            }
        }
        // Sub-ranges of one range come in order, and ranges were asked in order; the waiting
        // ranges all lie after the ones just asked about, so the new ones go first.
        for asked in next.into_iter().rev() {
            self.waiting.push_front(asked);
        }
        let take = self.waiting.len().min(QUERY_RANGES_MAX);
        self.asked = Query {
            ranges: self.waiting.drain(..take).collect(),
            symbols: None,
        };
        Ok(!self.asked.ranges.is_empty())
    }

    /// Documents found to differ so far (held by one side only, or with different heads).
    pub fn differing(&self) -> &[(Id, Difference)] {
        &self.differing
    }

    /// Rounds taken so far.
    pub fn rounds(&self) -> usize {
        self.rounds
    }
}

/// Most coded symbols a reconciliation asks for before it goes on with ranges (about 12,000
/// differing items, 670 KB). Symbols cost about 1.35 × 41 bytes per differing document
/// on either side, and each round past the `CACHED_SYMBOLS` each catalogue keeps up to date
/// a pass over both catalogues; ranges about 50 bytes per document only the responder holds
/// where the differences are dense, but about 2 KB per difference where they are sparse.
pub const SYMBOLS_HYBRID_MAX: u64 = 16_384;
/// How nodes reconcile: coded symbols first (a few bytes tell equal catalogues apart, about
/// 117–160 bytes per difference find up to thousands), then ranges once at least half the
/// larger catalogue is known to differ — from the catalogues' sizes (a node catching up, or
/// one that holds twice what its peer does), from the symbols taken without decoding, or from
/// the estimate of the items that differ — for ranges
/// then cost no more bytes (only the responder's documents travel, about 50 bytes each) and
/// no passes over the catalogues; also when `SYMBOLS_HYBRID_MAX` symbols did not suffice, or
/// the responder predates symbols. Where differences are sparser, symbols cost a fraction of
/// the ranges' bytes (a range leaf of 32 items travels whole for one difference).
#[derive(Debug)]
pub enum Hybrid {
    /// Asking for coded symbols.
    Symbols(crate::riblt::Reconciliation),
    /// Asking about ranges.
    Ranges {
        /// The exchange of ranges.
        run: Reconciliation,
        /// Whether the responder answered without symbols (it predates them).
        older_responder: bool,
    },
}

impl Hybrid {
    /// Starts a reconciliation of `ours` as it is now.
    pub fn new(ours: &Catalogue) -> Self {
        Self::Symbols(crate::riblt::Reconciliation::new(ours))
    }

    /// Starts a reconciliation of `ours` as it is now by ranges alone, with a responder that
    /// predates symbols.
    pub fn by_ranges(ours: &Catalogue) -> Self {
        Self::Ranges {
            run: Reconciliation::new(ours),
            older_responder: true,
        }
    }

    /// The query to send now.
    pub fn query(&self) -> Query {
        match self {
            Self::Symbols(run) => Query {
                ranges: Vec::new(),
                symbols: Some(run.query().clone()),
            },
            Self::Ranges { run, .. } => run.query().clone(),
        }
    }

    /// Takes the peer's reply to the last query; returns whether another query is needed.
    pub fn receive(&mut self, ours: &Catalogue, reply: &Reply) -> Result<bool, ReconcileError> {
        let run = match self {
            Self::Ranges { run, .. } => return run.receive(ours, reply),
            Self::Symbols(run) => run,
        };
        if !reply.answers.is_empty() {
            return Err(ReconcileError::Malformed {
                reason: "answers about ranges not asked about",
            });
        }
        let more = match &reply.symbols {
            Some(symbols) => run.receive(ours, symbols)?,
            None => return self.go_on_with_ranges(ours, true),
        };
        if !more {
            return Ok(false);
        }
        // About this many documents differ at least: the sizes' difference, two thirds of
        // the symbols taken without decoding (it takes about 1.35 per difference), or half
        // the items estimated to differ (a heuristic, which only decides how the differences
        // are found, never which).
        let at_least = run
            .size_difference()
            .unsigned_abs()
            .max(run.received() * 2 / 3)
            .max(run.differing_estimate() / 2);
        let larger = (ours.len() as u64).saturating_add_signed(run.size_difference().max(0));
        let dense = at_least.saturating_mul(2) >= larger;
        match dense || run.next_end() > SYMBOLS_HYBRID_MAX {
            true => self.go_on_with_ranges(ours, false),
            false => Ok(true),
        }
    }

    /// Goes on with ranges; `older_responder`: because the responder answered without
    /// symbols.
    fn go_on_with_ranges(
        &mut self,
        ours: &Catalogue,
        older_responder: bool,
    ) -> Result<bool, ReconcileError> {
        *self = Self::Ranges {
            run: Reconciliation::new(ours),
            older_responder,
        };
        Ok(true)
    }

    /// Documents found to differ (held by one side only, or with different heads), by id;
    /// complete once `receive` returned false.
    pub fn differing(&self) -> &[(Id, Difference)] {
        match self {
            Self::Symbols(run) => run.differing(),
            Self::Ranges { run, .. } => run.differing(),
        }
    }

    /// Whether it went on with ranges.
    pub fn is_ranges(&self) -> bool {
        matches!(self, Self::Ranges { .. })
    }

    /// Whether the responder answered without symbols: a node that predates them, to be
    /// asked by ranges alone (`Hybrid::by_ranges`).
    pub fn older_responder(&self) -> bool {
        matches!(
            self,
            Self::Ranges {
                older_responder: true,
                ..
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> Id {
        let mut id = [0u8; 16];
        // Spread ids over the whole space, as document ids (hash prefixes) are.
        id.copy_from_slice(&Sha256::digest(n.to_be_bytes())[..16]);
        id
    }

    fn digest(n: u64, version: u8) -> HeadsDigest {
        let mut d = [version; 32];
        d[..8].copy_from_slice(&n.to_be_bytes());
        d
    }

    /// Runs a whole reconciliation; returns the differing ids (sorted) and the bytes sent
    /// both ways (CBOR).
    fn reconcile(ours: &Catalogue, theirs: &Catalogue) -> (Vec<Id>, usize, usize) {
        let mut run = Reconciliation::new(ours);
        let mut bytes = 0;
        loop {
            let query = run.query().clone();
            let mut encoded = Vec::new();
            ciborium::into_writer(&query, &mut encoded).unwrap();
            bytes += encoded.len();
            let reply = theirs.answer(&query).unwrap();
            let mut encoded = Vec::new();
            ciborium::into_writer(&reply, &mut encoded).unwrap();
            bytes += encoded.len();
            if !run.receive(ours, &reply).unwrap() {
                break;
            }
        }
        let mut differing: Vec<Id> = run.differing().iter().map(|(id, _)| *id).collect();
        differing.sort();
        (differing, bytes, run.rounds())
    }

    fn catalogue(n: u64) -> Catalogue {
        let mut catalogue = Catalogue::default();
        for i in 0..n {
            catalogue.insert(id(i), digest(i, 0));
        }
        catalogue
    }

    /// Runs a whole hybrid reconciliation against a responder answering with `answer`;
    /// returns the differences (sorted), the bytes sent both ways (CBOR), the rounds, and
    /// whether it went on with ranges.
    fn hybrid_with(
        ours: &Catalogue,
        answer: impl Fn(&Query) -> Reply,
    ) -> (Vec<(Id, Difference)>, usize, usize, bool) {
        let mut run = Hybrid::new(ours);
        let (mut bytes, mut rounds) = (0, 0);
        loop {
            let query = run.query();
            let reply = answer(&query);
            bytes += crate::cbor::encode(&query).len() + crate::cbor::encode(&reply).len();
            rounds += 1;
            if !run.receive(ours, &reply).unwrap() {
                break;
            }
        }
        let mut differing = run.differing().to_vec();
        differing.sort();
        (differing, bytes, rounds, run.is_ranges())
    }

    fn hybrid(ours: &Catalogue, theirs: &Catalogue) -> (Vec<(Id, Difference)>, usize, usize, bool) {
        hybrid_with(ours, |query| theirs.answer(query).unwrap())
    }

    /// The differences as ranges find them, sorted.
    fn by_ranges(ours: &Catalogue, theirs: &Catalogue) -> Vec<(Id, Difference)> {
        let mut run = Reconciliation::new(ours);
        while run
            .receive(ours, &theirs.answer(run.query()).unwrap())
            .unwrap()
        {}
        let mut differing = run.differing().to_vec();
        differing.sort();
        differing
    }

    #[test]
    fn the_hybrid_tells_equal_catalogues_apart_with_one_symbol() {
        let a = catalogue(10_000);
        let (differing, bytes, rounds, ranges) = hybrid(&a, &a.clone());
        assert!(differing.is_empty());
        assert_eq!((rounds, ranges), (1, false));
        assert!(bytes < 128, "{bytes} bytes");
    }

    #[test]
    fn the_hybrid_finds_a_few_differences_by_symbols_at_a_fraction_of_the_ranges_bytes() {
        let ours = catalogue(20_000);
        let mut theirs = ours.clone();
        for k in 0..40 {
            theirs.insert(id(k * 97), digest(k * 97, 1)); // changed
            theirs.remove(&id(k * 97 + 1)); // only ours
            theirs.insert(id(100_000 + k), digest(100_000 + k, 0)); // only theirs
        }
        let (differing, bytes, _, ranges) = hybrid(&ours, &theirs);
        assert!(!ranges, "a few differences stay with symbols");
        assert_eq!(differing, by_ranges(&ours, &theirs));
        assert_eq!(differing.len(), 120);
        let (_, range_bytes, _) = reconcile(&ours, &theirs);
        assert!(
            bytes * 5 < range_bytes,
            "{bytes} bytes against {range_bytes}"
        );
        assert!(bytes < 150 * 120, "{bytes} bytes for 120 differences");
    }

    #[test]
    fn the_hybrid_goes_on_with_ranges_for_a_node_far_behind() {
        let full = catalogue(5_000);
        let mut partial = Catalogue::default();
        for i in 0..100 {
            partial.insert(id(i), digest(i, 0));
        }
        let (differing, _, rounds, ranges) = hybrid(&partial, &full);
        assert!(ranges);
        assert_eq!(differing, by_ranges(&partial, &full));
        assert_eq!(differing.len(), 4_900);
        // The first symbol shows the sizes apart: ranges from the second round on.
        let (_, _, range_rounds) = reconcile(&partial, &full);
        assert_eq!(rounds, range_rounds + 1);
    }

    #[test]
    fn the_hybrid_goes_on_with_ranges_when_most_of_both_catalogues_differ() {
        // A long partition healed: each side wrote 2,000 files the other lacks, beside 500
        // they share.
        let mut north = catalogue(500);
        let mut south = north.clone();
        for k in 0..2_000 {
            north.insert(id(10_000 + k), digest(10_000 + k, 0));
            south.insert(id(20_000 + k), digest(20_000 + k, 0));
        }
        let (differing, _, _, ranges) = hybrid(&north, &south);
        assert!(ranges);
        assert_eq!(differing, by_ranges(&north, &south));
        assert_eq!(differing.len(), 4_000);
    }

    #[test]
    fn the_hybrid_goes_on_with_ranges_with_a_responder_that_predates_symbols() {
        let ours = catalogue(2_000);
        let mut theirs = ours.clone();
        theirs.insert(id(5), digest(5, 1));
        theirs.insert(id(50_000), digest(50_000, 0));
        // Such a responder reads only the ranges of a query and answers no symbols.
        let old = |query: &Query| {
            let old_query = Query {
                ranges: query.ranges.clone(),
                symbols: None,
            };
            theirs.answer(&old_query).unwrap()
        };
        let (differing, _, _, ranges) = hybrid_with(&ours, old);
        assert!(ranges);
        assert_eq!(differing, by_ranges(&ours, &theirs));
        assert_eq!(differing.len(), 2);
        // The hybrid says so, and one started by ranges asks no symbols.
        let mut run = Hybrid::new(&ours);
        assert!(!run.older_responder());
        assert!(run.receive(&ours, &old(&run.query())).unwrap());
        assert!(run.older_responder());
        let run = Hybrid::by_ranges(&ours);
        assert_eq!(run.query().symbols, None);
        assert!(run.older_responder());
    }

    /// The fields of a query and a reply as nodes read them before coded symbols.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct OldQuery {
        #[serde(rename = "r")]
        ranges: Vec<Asked>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct OldReply {
        #[serde(rename = "a")]
        answers: Vec<Answer>,
    }

    /// A query as nodes read it when symbols carried 64 bits of each entry's hash (field `c`).
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct ShortTagQuery {
        #[serde(rename = "r")]
        ranges: Vec<Asked>,
        #[serde(rename = "c", default)]
        symbols: Option<crate::riblt::Query>,
    }

    /// Such a node reads today's symbol query as one about no ranges, so it answers no symbols
    /// (which it would encode in the old form) and the hybrid goes on with ranges.
    #[test]
    fn a_node_of_short_tags_reads_a_symbol_query_as_one_without_symbols() {
        let ours = catalogue(100);
        let query = Hybrid::new(&ours).query();
        let old: ShortTagQuery = crate::cbor::decode_exact(&crate::cbor::encode(&query)).unwrap();
        assert_eq!(old.symbols, None);
        assert!(old.ranges.is_empty());
    }

    #[test]
    fn queries_and_replies_with_symbols_read_as_before_by_older_nodes_and_back() {
        let ours = catalogue(100);
        let query = Hybrid::new(&ours).query();
        let old: OldQuery = crate::cbor::decode_exact(&crate::cbor::encode(&query)).unwrap();
        assert!(old.ranges.is_empty());
        let reply = ours.answer(&query).unwrap();
        assert!(reply.symbols.is_some());
        let old: OldReply = crate::cbor::decode_exact(&crate::cbor::encode(&reply)).unwrap();
        assert!(old.answers.is_empty());
        // An older node's messages read as ones without symbols.
        let ranges = Reconciliation::new(&ours).query().clone();
        let old = OldQuery {
            ranges: ranges.ranges.clone(),
        };
        let read: Query = crate::cbor::decode_exact(&crate::cbor::encode(&old)).unwrap();
        assert_eq!(read, ranges);
        let old = OldReply {
            answers: vec![Answer::Same],
        };
        let read: Reply = crate::cbor::decode_exact(&crate::cbor::encode(&old)).unwrap();
        assert_eq!(read.symbols, None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever the two catalogues, the hybrid finds exactly what ranges find.
        #[test]
        fn the_hybrid_finds_what_ranges_find(
            shared in 0u64..3_000,
            ours_only in 0u64..1_200,
            theirs_only in 0u64..1_200,
            changed in 0u64..300,
        ) {
            let mut ours = catalogue(shared);
            let mut theirs = ours.clone();
            for k in 0..ours_only {
                ours.insert(id(1_000_000 + k), digest(k, 0));
            }
            for k in 0..theirs_only {
                theirs.insert(id(2_000_000 + k), digest(k, 0));
            }
            for k in 0..changed.min(shared) {
                theirs.insert(id(k), digest(k, 2));
            }
            let (differing, _, _, _) = hybrid(&ours, &theirs);
            proptest::prop_assert_eq!(differing, by_ranges(&ours, &theirs));
        }
    }

    #[test]
    fn equal_catalogues_cost_one_round() {
        let a = catalogue(10_000);
        let (differing, bytes, rounds) = reconcile(&a, &a.clone());
        assert!(differing.is_empty());
        assert_eq!(rounds, 1);
        assert!(bytes < 128, "{bytes} bytes");
    }

    #[test]
    fn every_kind_of_difference_is_found() {
        let ours = catalogue(5_000);
        let mut theirs = ours.clone();
        theirs.insert(id(7), digest(7, 1)); // changed
        theirs.remove(&id(8)); // only ours
        theirs.insert(id(90_000), digest(90_000, 0)); // only theirs
        let (differing, _, _) = reconcile(&ours, &theirs);
        let mut expected = vec![id(7), id(8), id(90_000)];
        expected.sort();
        assert_eq!(differing, expected);
        let mut run = Reconciliation::new(&ours);
        while run
            .receive(&ours, &theirs.answer(run.query()).unwrap())
            .unwrap()
        {}
        let kinds: BTreeMap<Id, Difference> = run.differing().iter().copied().collect();
        assert_eq!(kinds[&id(7)], Difference::Both);
        assert_eq!(kinds[&id(8)], Difference::OnlyOurs);
        assert_eq!(kinds[&id(90_000)], Difference::OnlyTheirs);
        // And from the other side.
        assert_eq!(reconcile(&theirs, &ours).0, expected);
    }

    #[test]
    fn empty_sides_find_everything() {
        let full = catalogue(1_000);
        let empty = Catalogue::default();
        assert_eq!(reconcile(&empty, &full).0.len(), 1_000);
        assert_eq!(reconcile(&full, &empty).0.len(), 1_000);
        assert!(reconcile(&empty, &empty).0.is_empty());
    }

    #[test]
    fn bytes_grow_with_the_differences_and_the_log_of_the_size_not_the_size() {
        let mut figures = Vec::new();
        for n in [10_000u64, 100_000] {
            let ours = catalogue(n);
            let mut theirs = ours.clone();
            for k in 0..10 {
                let i = k * (n / 10) + 3;
                theirs.insert(id(i), digest(i, 1));
            }
            let (differing, bytes, rounds) = reconcile(&ours, &theirs);
            assert_eq!(differing.len(), 10);
            figures.push((n, bytes, rounds));
        }
        let (small, large) = (figures[0].1, figures[1].1);
        // Ten times the documents: a few more rounds, nowhere near ten times the bytes.
        assert!(large < small * 2, "{figures:?}");
        // Sending the catalogue itself would take 48 bytes per document.
        assert!(large < 100_000 * 48 / 50, "{figures:?}");
    }

    #[test]
    fn the_kept_total_always_matches_the_items() {
        let mut a = catalogue(1_000);
        a.insert(id(3), digest(3, 9));
        a.remove(&id(4));
        a.remove(&id(4));
        a.insert(id(5_000), digest(5_000, 0));
        let mut b = Catalogue::default();
        for (id, entry) in &a.entries {
            b.insert(*id, entry.digest);
        }
        assert_eq!(a, b);
        // The whole range uses the kept total; any other range sums its items.
        let almost_all = Bounds {
            lower: ByteArray::new([0; 16]),
            upper: Some(ByteArray::new([0xff; 16])),
        };
        assert_eq!(a.fingerprint(&almost_all), a.fingerprint(&Bounds::all()));
    }

    #[test]
    fn a_node_far_behind_a_large_catalogue_reconciles_over_more_rounds() {
        let full = catalogue(150_000);
        let (differing, _, rounds) = reconcile(&Catalogue::default(), &full);
        assert_eq!(differing.len(), 150_000);
        assert!(rounds > 4, "{rounds}");
        // Many scattered differences: more differing ranges than one query may carry.
        let mut theirs = full.clone();
        for i in (0..150_000).step_by(20) {
            theirs.insert(id(i), digest(i, 1));
        }
        assert_eq!(reconcile(&full, &theirs).0.len(), 7_500);
    }

    /// A query asking for symbols past what the hybrid takes, or for ranges and symbols at
    /// once, is refused before any pass over the catalogue.
    #[test]
    fn symbol_queries_beyond_the_hybrids_bound_are_refused() {
        let ours = catalogue(1_000);
        let far = Query {
            ranges: Vec::new(),
            symbols: Some(crate::riblt::Query {
                version: None,
                from: SYMBOLS_HYBRID_MAX,
                count: 1,
            }),
        };
        assert_eq!(ours.answer(&far), Err(ReconcileError::TooManySymbols));
        let mut both = Reconciliation::new(&ours).query().clone();
        both.symbols = Hybrid::new(&ours).query().symbols;
        assert!(matches!(
            ours.answer(&both),
            Err(ReconcileError::Malformed { .. })
        ));
    }

    #[test]
    fn malformed_replies_and_queries_are_refused() {
        let ours = catalogue(100);
        let mut run = Reconciliation::new(&ours);
        let wrong_count = Reply::default();
        assert!(run.receive(&ours, &wrong_count).is_err());
        let mut run = Reconciliation::new(&Catalogue::default());
        let gap = Reply {
            answers: vec![Answer::Split(vec![Part {
                upper: Some(ByteArray::new([9; 16])),
                fingerprint: Fingerprint::default(),
            }])],
            symbols: None,
        };
        assert!(run.receive(&ours, &gap).is_err());
        let backwards = Query {
            ranges: vec![Asked {
                bounds: Bounds {
                    lower: ByteArray::new([9; 16]),
                    upper: Some(ByteArray::new([1; 16])),
                },
                fingerprint: Fingerprint::default(),
            }],
            symbols: None,
        };
        assert!(ours.answer(&backwards).is_err());
        let overlapping = Query {
            ranges: vec![
                Asked {
                    bounds: Bounds::all(),
                    fingerprint: Fingerprint::default(),
                };
                2
            ],
            symbols: None,
        };
        assert!(matches!(
            ours.answer(&overlapping),
            Err(ReconcileError::Malformed { .. })
        ));
        let huge = Query {
            ranges: vec![
                Asked {
                    bounds: Bounds::all(),
                    fingerprint: Fingerprint::default(),
                };
                QUERY_RANGES_MAX + 1
            ],
            symbols: None,
        };
        assert!(matches!(
            ours.answer(&huge),
            Err(ReconcileError::TooManyRanges { .. })
        ));
    }
}
