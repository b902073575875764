//! Rateless invertible Bloom lookup tables: a set's endless sequence of coded symbols, any
//! prefix of which, set against the same prefix of another set's, yields their symmetric
//! difference once it is long enough — about 1.35 symbols per differing item, whatever the
//! sets' sizes (Yang, Gilad and Alizadeh, "Practical Rateless Set Reconciliation", 2024).
//!
//! An item is a catalogue entry reduced to what identifies it: the document id and the entry's
//! 128-bit hash (which covers the id and the digest of the document's heads), whole: two
//! versions of one document are two items unless their hashes collide, which a member that
//! writes could not bring about by trying versions of a change (about 2⁶⁴ tries). Coded
//! symbol `i` holds the XOR of the items mapped to it, the XOR of their checks and their
//! count; an item is mapped to symbol `i` with probability 1 / (1 + i/2), every item to
//! symbol 0. The sequence depends on the set alone: the responder needs no state, and the
//! initiator compares each symbol with its own and peels the items that stand alone.
//!
//! On the wire a symbol is 41 bytes: its id, tag and check sums and its count's last byte.
//! The initiator needs its count less its own only where that is small (a symbol of ±1 item),
//! and its other uses read it modulo 2⁸; symbol 0's whole count, the sets' sizes'
//! difference, travels whole.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::reconcile::{Catalogue, Difference, Id, ReconcileError};

/// Bytes of a coded symbol's sums on the wire: the id's (16), the tag's (16), the check's (8).
pub const SYMBOL_SUM_BYTES: usize = 40;
/// Symbols a reconciliation asks for first: one tells equal catalogues apart.
pub const FIRST_SYMBOLS: u32 = 1;
/// Symbols received by the end of the second round at least. Each round asks for what the
/// items found and an estimate of those left take (`symbols_for`), at least an eighth more
/// than received (and `MORE_SYMBOLS_MIN`), at most four times as many.
pub const SECOND_SYMBOLS_TOTAL: u64 = 8;
/// Fewest symbols a round after the second asks for.
pub const MORE_SYMBOLS_MIN: u64 = 4;
/// Rounds past the symbols each catalogue keeps (`reconcile::CACHED_SYMBOLS`), each a pass
/// over both catalogues, that may ask for as little as an eighth more; later ones ask for half
/// as many again at least. An honest exchange of thousands of differences takes one or two.
pub const PASSES_AT_AN_EIGHTH: usize = 3;
/// Most symbols one answer carries (about 10.7 MB).
pub const SYMBOLS_PER_REPLY_MAX: u32 = 262_144;
/// Most symbols one reconciliation takes (about 50 MB at the initiator): enough for about
/// 750,000 documents held by one side only. A node further behind reconciles again once it
/// has fetched those.
pub const SYMBOLS_MAX: u64 = 1 << 20;
/// Most rounds one reconciliation takes. Honest symbols take a handful: each round asks for
/// what the estimate says is left, up to four times as many as received (from 8, that
/// reaches `SYMBOLS_MAX` in 9 rounds). Symbols that keep the estimate low make each round ask
/// for an eighth more at least (half as many again after `PASSES_AT_AN_EIGHTH` rounds past
/// `CACHED_SYMBOLS`): about 36 rounds to `CACHED_SYMBOLS`, 20 more to `SYMBOLS_MAX`, within
/// this limit.
pub const ROUNDS_MAX: usize = 64;

const _: () = assert!(SYMBOLS_PER_REPLY_MAX as u64 <= SYMBOLS_MAX);

/// Most items peeled per symbol received: every item lands in symbol 0, and peeling stops
/// once it is empty, so honest symbols give far fewer (about one per 1.35 symbols).
const FOUND_PER_SYMBOL_MAX: usize = 2;

/// A set's element: a document id and a tag that changes with the document's heads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Item {
    /// The document id.
    pub id: [u8; 16],
    /// The entry's hash.
    pub tag: u128,
}

impl Item {
    /// The item's check: a non-linear function of its bytes, so that the XOR of several
    /// items' checks is not the check of their XOR. Also the seed of its mapping.
    pub fn check(&self) -> u64 {
        let (low, high) = self.id.split_at(8);
        let low = u64::from_le_bytes(low.try_into().unwrap_or_default());
        let high = u64::from_le_bytes(high.try_into().unwrap_or_default());
        let (tag_low, tag_high) = (self.tag as u64, (self.tag >> 64) as u64);
        mix(low ^ mix(high ^ mix(tag_low ^ mix(tag_high))))
    }
}

/// SplitMix64's finaliser.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One coded symbol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Symbol {
    id: [u8; 16],
    tag: u128,
    check: u64,
    count: i64,
}

impl Symbol {
    fn apply(&mut self, item: &Item, check: u64, direction: i64) {
        for (sum, byte) in self.id.iter_mut().zip(item.id) {
            *sum ^= byte;
        }
        self.tag ^= item.tag;
        self.check ^= check;
        self.count = self.count.wrapping_add(direction);
    }

    fn subtract(&mut self, other: &Symbol) {
        for (sum, byte) in self.id.iter_mut().zip(other.id) {
            *sum ^= byte;
        }
        self.tag ^= other.tag;
        self.check ^= other.check;
        self.count = self.count.wrapping_sub(other.count);
    }

    /// Holds nothing (or items that cancel out).
    fn is_empty(&self) -> bool {
        self.count == 0 && self.tag == 0 && self.check == 0 && self.id == [0; 16]
    }

    /// Its count modulo 2⁸, as it travels for every symbol but a reply's first.
    fn short_count(&self) -> i8 {
        self.count as i8
    }

    /// The one item it holds, and on which side (+1: the peer's, -1: ours), if it holds one.
    /// Only the count's last byte is read: a count that agrees with ±1 there but is not is
    /// many items, whose sums fail the check.
    fn pure(&self) -> Option<(Item, i64)> {
        let side = i64::from(self.short_count());
        if side != 1 && side != -1 {
            return None;
        }
        let item = Item {
            id: self.id,
            tag: self.tag,
        };
        (item.check() == self.check).then_some((item, side))
    }
}

/// The coded symbols an item is mapped to, in increasing order: 0, then each index `i` with
/// probability 1 / (1 + i/2), drawn from a generator seeded with the item's check.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    prng: u64,
    index: u64,
}

impl Mapping {
    fn new(seed: u64) -> Self {
        Self {
            prng: seed,
            index: 0,
        }
    }

    /// Moves to the next index. The gap from index `i` is ⌈(i + 1.5)((1 − u)^(−1/2) − 1)⌉
    /// for `u` uniform in [0, 1), with 1 − u drawn as `r / 2⁶⁴`; at least 1.
    fn advance(&mut self) {
        self.prng = self.prng.wrapping_mul(0xda94_2042_e4dd_58b5);
        let r = self.prng as f64;
        let gap =
            ((self.index as f64 + 1.5) * ((1u64 << 32) as f64 / (r + 1.0).sqrt() - 1.0)).ceil();
        // Casting saturates: an enormous gap only takes the item past every symbol.
        self.index = self.index.saturating_add((gap as u64).max(1));
    }
}

/// A set's coded symbols, produced in order, as many as are asked for.
#[derive(Debug, Default)]
pub struct Encoder {
    /// Each item with its check, and its mapping at the first index not yet produced.
    items: Vec<(Item, u64, Mapping)>,
    /// Symbols produced so far.
    produced: u64,
}

impl Encoder {
    /// The encoder of a set (its items distinct).
    pub fn new(items: impl IntoIterator<Item = Item>) -> Self {
        Self {
            items: items
                .into_iter()
                .map(|item| {
                    let check = item.check();
                    (item, check, Mapping::new(check))
                })
                .collect(),
            produced: 0,
        }
    }

    /// Items in the set.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Symbols produced so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// Skips to symbol `to` (when it is ahead), producing nothing.
    pub fn skip_to(&mut self, to: u64) {
        if to <= self.produced {
            return;
        }
        for (_, _, mapping) in &mut self.items {
            while mapping.index < to {
                mapping.advance();
            }
        }
        self.produced = to;
    }

    /// The next `count` symbols.
    pub fn produce(&mut self, count: usize) -> Vec<Symbol> {
        let from = self.produced;
        let to = from + count as u64;
        let mut symbols = vec![Symbol::default(); count];
        for (item, check, mapping) in &mut self.items {
            while mapping.index < to {
                symbols[(mapping.index - from) as usize].apply(item, *check, 1);
                mapping.advance();
            }
        }
        self.produced = to;
        symbols
    }
}

/// The initiator's side: the peer's symbols, less its own, peeled into the items only one
/// side holds.
#[derive(Debug, Default)]
pub struct Decoder {
    /// The peer's symbols less ours, less every item found so far.
    symbols: Vec<Symbol>,
    /// Items found, with their side and their mapping at the first index past `symbols`.
    found: Vec<(Item, i64, u64, Mapping)>,
    /// The same items, to refuse one found twice.
    seen: std::collections::HashSet<Item>,
}

impl Decoder {
    /// Symbols taken so far.
    pub fn received(&self) -> usize {
        self.symbols.len()
    }

    /// Takes the peer's next symbols and this node's same symbols, and peels what it can.
    /// Both must be of the same length. Symbols that could not come from a set — an item
    /// found twice, or more items than the symbols could hold — are refused: peeling them
    /// could otherwise go on for ever.
    pub fn take(&mut self, theirs: &[Symbol], ours: &[Symbol]) -> Result<(), ReconcileError> {
        let from = self.symbols.len();
        let to = (from + theirs.len().min(ours.len())) as u64;
        self.symbols
            .extend(theirs.iter().zip(ours).enumerate().map(|(at, (t, o))| {
                let mut symbol = *t;
                symbol.subtract(o);
                // Past symbol 0 only the count's last byte travels (`Symbols`).
                if from + at > 0 {
                    symbol.count = i64::from(symbol.short_count());
                }
                symbol
            }));
        // Items found already are taken out of the new symbols too.
        for (item, side, check, mapping) in &mut self.found {
            while mapping.index < to {
                self.symbols[mapping.index as usize].apply(item, *check, -*side);
                mapping.advance();
            }
        }
        let mut pure: Vec<usize> = (from..self.symbols.len())
            .filter(|&i| self.symbols[i].pure().is_some())
            .collect();
        // Only the new symbols can be pure before peeling starts: an earlier call left none,
        // and peeling queues every symbol it touches.
        while let Some(index) = pure.pop() {
            let Some((item, side)) = self.symbols[index].pure() else {
                continue;
            };
            if !self.seen.insert(item) || self.found.len() >= FOUND_PER_SYMBOL_MAX * to as usize {
                return Err(ReconcileError::Malformed {
                    reason: "coded symbols that no set could give",
                });
            }
            let check = item.check();
            let mut mapping = Mapping::new(check);
            while mapping.index < to {
                let symbol = &mut self.symbols[mapping.index as usize];
                symbol.apply(&item, check, -side);
                if symbol.pure().is_some() {
                    pure.push(mapping.index as usize);
                }
                mapping.advance();
            }
            self.found.push((item, side, check, mapping));
        }
        Ok(())
    }

    /// Whether every item only one side holds has been found: symbol 0, which holds every
    /// item, is empty.
    pub fn is_done(&self) -> bool {
        self.symbols.first().is_some_and(Symbol::is_empty)
    }

    /// The difference in the sets' sizes (the peer's less ours), once a symbol is in: a
    /// lower bound on the items to find.
    pub fn size_difference(&self) -> Option<i64> {
        self.symbols.first().map(|s| s.count)
    }

    /// Items found so far: the peer's alone (`true`) and ours alone (`false`).
    pub fn found(&self) -> impl Iterator<Item = (Item, bool)> + '_ {
        self.found
            .iter()
            .map(|(item, side, _, _)| (*item, *side > 0))
    }

    /// Items found so far.
    pub fn found_len(&self) -> usize {
        self.found.len()
    }

    /// An estimate of the items not found yet, from what is left of the symbols after
    /// peeling: symbol `i` holds each of them with probability `p = 1 / (1 + i/2)`, so its
    /// count `c` (theirs less ours) has mean `μ·p` and variance `m·p(1 − p)`, where `m` is how
    /// many are left and `μ` their sides' difference (what is left of symbol 0's whole
    /// count). Past symbol 0 a count is known modulo 2⁸, so its distance from the mean is
    /// taken modulo 2⁸ too (small either way). Summed over the last `ESTIMATE_WINDOW`
    /// symbols. At least `|μ|`; `None` before any symbol.
    pub fn unfound_estimate(&self) -> Option<u64> {
        let net = self.symbols.first()?.count;
        let from = self.symbols.len().saturating_sub(ESTIMATE_WINDOW).max(1);
        let (mut spread, mut weight) = (0.0f64, 0.0f64);
        for (i, symbol) in self.symbols.iter().enumerate().skip(from) {
            let p = 1.0 / (1.0 + i as f64 / 2.0);
            let mean = (net as f64 * p).round() as i64;
            let distance = f64::from(symbol.count.wrapping_sub(mean) as i8);
            spread += distance * distance;
            weight += p * (1.0 - p);
        }
        let estimate = if weight > 0.0 {
            (spread / weight).round() as u64
        } else {
            0
        };
        Some(estimate.max(net.unsigned_abs()))
    }
}

/// Symbols the estimate of items not found yet reads (the latest ones).
const ESTIMATE_WINDOW: usize = 4_096;

/// About how many symbols it takes to find `items` differing items, a little above the
/// median (measured: 1.5 per item at 20, 1.41 at 200, 1.38 at 1,000, 1.36 at 5,000).
pub fn symbols_for(items: u64) -> u64 {
    if items == 0 {
        return 1;
    }
    let per_item = 1.35 + 1.0 / (items as f64).sqrt();
    (items as f64 * per_item).ceil() as u64
}

/// Adds `item` to (`direction` 1) or takes it out of (-1) `symbols`, which are the set's
/// symbols from index `from` on: how a kept prefix follows the set, and how symbols of a
/// set's current version are turned into an earlier version's.
pub fn adjust(symbols: &mut [Symbol], from: u64, item: &Item, direction: i64) {
    let to = from + symbols.len() as u64;
    let check = item.check();
    let mut mapping = Mapping::new(check);
    while mapping.index < to {
        if mapping.index >= from {
            symbols[(mapping.index - from) as usize].apply(item, check, direction);
        }
        mapping.advance();
    }
}

/// Bytes of a coded symbol on the wire: its sums and its count's last byte.
pub const SYMBOL_WIRE_BYTES: usize = SYMBOL_SUM_BYTES + 1;

/// Coded symbols as they travel: `SYMBOL_WIRE_BYTES` each (sums, then the count's last
/// byte), and the first one's whole count.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Symbols {
    /// The symbols.
    #[serde(rename = "s")]
    pub bytes: ByteBuf,
    /// The first symbol's whole count (0 when there are none).
    #[serde(rename = "f")]
    pub first_count: i64,
}

impl Symbols {
    /// Symbols in wire form.
    pub fn encode(symbols: &[Symbol]) -> Self {
        let mut bytes = Vec::with_capacity(symbols.len() * SYMBOL_WIRE_BYTES);
        for symbol in symbols {
            bytes.extend_from_slice(&symbol.id);
            bytes.extend_from_slice(&symbol.tag.to_le_bytes());
            bytes.extend_from_slice(&symbol.check.to_le_bytes());
            bytes.push(symbol.short_count() as u8);
        }
        Self {
            bytes: ByteBuf::from(bytes),
            first_count: symbols.first().map_or(0, |s| s.count),
        }
    }

    /// How many symbols they are, if their bytes are whole symbols.
    pub fn len(&self) -> Option<usize> {
        self.bytes
            .len()
            .is_multiple_of(SYMBOL_WIRE_BYTES)
            .then_some(self.bytes.len() / SYMBOL_WIRE_BYTES)
    }

    /// Whether they are none.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The symbols, every count but the first's known modulo 2⁸ (`Symbol::short_count`);
    /// `None` if the bytes are not whole symbols or the first count disagrees with its byte.
    pub fn decode(&self) -> Option<Vec<Symbol>> {
        self.len()?;
        let symbols: Vec<Symbol> = self
            .bytes
            .chunks_exact(SYMBOL_WIRE_BYTES)
            .enumerate()
            .map(|(at, wire)| {
                let mut id = [0u8; 16];
                id.copy_from_slice(&wire[..16]);
                let mut tag = [0u8; 16];
                tag.copy_from_slice(&wire[16..32]);
                let mut check = [0u8; 8];
                check.copy_from_slice(&wire[32..40]);
                let short = i64::from(wire[40] as i8);
                Symbol {
                    id,
                    tag: u128::from_le_bytes(tag),
                    check: u64::from_le_bytes(check),
                    count: if at == 0 { self.first_count } else { short },
                }
            })
            .collect();
        match symbols.first() {
            Some(first) if first.short_count() as u8 != self.bytes[40] => None,
            None if self.first_count != 0 => None,
            _ => Some(symbols),
        }
    }
}

/// An initiator's question: the responder's coded symbols `from .. from + count`, of the
/// catalogue version its first answer named.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    /// The responder's catalogue version (`None` in the first round: its current one).
    #[serde(rename = "v")]
    pub version: Option<u64>,
    /// The first symbol asked for.
    #[serde(rename = "f")]
    pub from: u64,
    /// How many.
    #[serde(rename = "n")]
    pub count: u32,
}

/// The responder's answer: the symbols asked for, and the catalogue version they are of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The catalogue version.
    #[serde(rename = "v")]
    pub version: u64,
    /// The symbols.
    #[serde(rename = "s")]
    pub symbols: Symbols,
}

/// The responder's side: answers a peer's query from `catalogue`.
pub fn answer(catalogue: &Catalogue, query: &Query) -> Result<Reply, ReconcileError> {
    if query.count == 0 || query.count > SYMBOLS_PER_REPLY_MAX {
        return Err(ReconcileError::Malformed {
            reason: "no symbols, or more than one answer carries",
        });
    }
    if query.from.saturating_add(u64::from(query.count)) > SYMBOLS_MAX {
        return Err(ReconcileError::TooManySymbols);
    }
    let version = query.version.unwrap_or(catalogue.version());
    let symbols = catalogue.symbols(version, query.from, query.count as usize)?;
    Ok(Reply {
        version,
        symbols: Symbols::encode(&symbols),
    })
}

/// The initiator's side of one reconciliation: asks for the responder's symbols, a few at
/// first and more each round, until the decoder has found every document only one side
/// holds, or holds with other heads. Both catalogues are taken at one version each for the
/// whole exchange (`Catalogue::symbols`), so changes meanwhile do not spoil it.
#[derive(Debug)]
pub struct Reconciliation {
    /// This node's catalogue version.
    ours: u64,
    /// The responder's, from its first answer.
    theirs: Option<u64>,
    decoder: Decoder,
    query: Query,
    rounds: usize,
    /// Rounds so far that asked past the symbols each catalogue keeps (each a pass over both).
    passes: usize,
    differing: Vec<(Id, Difference)>,
}

impl Reconciliation {
    /// Starts a reconciliation of `ours` as it is now.
    pub fn new(ours: &Catalogue) -> Self {
        Self {
            ours: ours.version(),
            theirs: None,
            decoder: Decoder::default(),
            query: Query {
                version: None,
                from: 0,
                count: FIRST_SYMBOLS,
            },
            rounds: 0,
            passes: 0,
            differing: Vec::new(),
        }
    }

    /// The query to send now.
    pub fn query(&self) -> &Query {
        &self.query
    }

    /// Takes the peer's reply to the last query; returns whether another query is needed.
    pub fn receive(&mut self, ours: &Catalogue, reply: &Reply) -> Result<bool, ReconcileError> {
        self.rounds += 1;
        if self.next_end() > crate::reconcile::CACHED_SYMBOLS as u64 {
            self.passes += 1;
        }
        if self.rounds > ROUNDS_MAX {
            return Err(ReconcileError::TooManyRounds);
        }
        if self.theirs.is_some_and(|version| version != reply.version) {
            return Err(ReconcileError::Malformed {
                reason: "an answer about another version of the catalogue",
            });
        }
        self.theirs = Some(reply.version);
        let theirs = reply
            .symbols
            .decode()
            .filter(|symbols| symbols.len() == self.query.count as usize)
            .ok_or(ReconcileError::Malformed {
                reason: "not the symbols asked for",
            })?;
        let own = ours.symbols(self.ours, self.query.from, theirs.len())?;
        self.decoder.take(&theirs, &own)?;
        if self.decoder.is_done() {
            let mut sides: BTreeMap<Id, (bool, bool)> = BTreeMap::new();
            for (item, theirs) in self.decoder.found() {
                let side = sides.entry(item.id).or_default();
                if theirs {
                    side.0 = true;
                } else {
                    side.1 = true;
                }
            }
            self.differing = sides
                .into_iter()
                .map(|(id, sides)| {
                    let difference = match sides {
                        (true, true) => Difference::Both,
                        (true, false) => Difference::OnlyTheirs,
                        _ => Difference::OnlyOurs,
                    };
                    (id, difference)
                })
                .collect();
            return Ok(false);
        }
        let received = self.decoder.received() as u64;
        if received >= SYMBOLS_MAX {
            return Err(ReconcileError::TooManySymbols);
        }
        // As many as the items found and those estimated left take, a few more at least, and
        // at most four times as many as received (the estimate is rough while few are in).
        // After `PASSES_AT_AN_EIGHTH` rounds past the symbols each catalogue keeps (each a
        // pass over both), half as many again at least: symbols that keep the estimate low
        // cost few passes.
        let differing = self.differing_estimate();
        let at_least = if received < SECOND_SYMBOLS_TOTAL {
            SECOND_SYMBOLS_TOTAL
        } else if self.passes < PASSES_AT_AN_EIGHTH {
            received + (received / 8).max(MORE_SYMBOLS_MIN)
        } else {
            received + received / 2
        };
        let wanted = symbols_for(differing)
            .clamp(at_least, received.saturating_mul(4).max(at_least))
            - received;
        let count = wanted
            .min(u64::from(SYMBOLS_PER_REPLY_MAX))
            .min(SYMBOLS_MAX - received)
            .max(1);
        self.query = Query {
            version: self.theirs,
            from: received,
            count: count as u32,
        };
        Ok(true)
    }

    /// Documents found to differ (held by one side only, or with different heads), by id;
    /// complete once `receive` returned false.
    pub fn differing(&self) -> &[(Id, Difference)] {
        &self.differing
    }

    /// Rounds taken so far.
    pub fn rounds(&self) -> usize {
        self.rounds
    }

    /// The difference of the two catalogues' sizes, theirs less ours (known from the first
    /// answer on).
    pub fn size_difference(&self) -> i64 {
        self.decoder.size_difference().unwrap_or(0)
    }

    /// About how many items differ: those found and an estimate of those left
    /// (`Decoder::unfound_estimate`). A document held by both sides with other heads is two.
    pub fn differing_estimate(&self) -> u64 {
        (self.decoder.found_len() as u64)
            .saturating_add(self.decoder.unfound_estimate().unwrap_or(0))
    }

    /// Symbols received so far.
    pub fn received(&self) -> u64 {
        self.decoder.received() as u64
    }

    /// The symbol after the last one the next query asks for.
    pub fn next_end(&self) -> u64 {
        self.query.from + u64::from(self.query.count)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn item(n: u64) -> Item {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&mix(n).to_le_bytes());
        id[8..].copy_from_slice(&mix(n ^ 0xabcd).to_le_bytes());
        Item {
            id,
            tag: u128::from(mix(n ^ 0x1234)) << 64 | u128::from(mix(n ^ 0x5678)),
        }
    }

    /// Two sets sharing `shared` items, each with items of its own besides: (ours, theirs).
    fn two_sets(shared: u64, ours_only: u64, theirs_only: u64) -> (Vec<Item>, Vec<Item>) {
        let mut ours: Vec<Item> = (0..shared).map(item).collect();
        let mut theirs = ours.clone();
        ours.extend((1_000_000..1_000_000 + ours_only).map(item));
        theirs.extend((2_000_000..2_000_000 + theirs_only).map(item));
        (ours, theirs)
    }

    /// Symbols that contradict each other (an item in symbol 0 but missing from another
    /// symbol it maps to) are refused, where peeling them would take the item out and put it
    /// back for ever.
    #[test]
    fn symbols_that_no_set_could_give_are_refused_not_peeled_for_ever() {
        let a = item(7);
        let mut mapping = Mapping::new(a.check());
        mapping.advance();
        let second = mapping.index as usize;
        let count = second + 4;
        let mut theirs = Encoder::new([a]).produce(count);
        theirs[second] = Symbol::default();
        let ours = Encoder::new([]).produce(count);
        let mut decoder = Decoder::default();
        assert!(matches!(
            decoder.take(&theirs, &ours),
            Err(ReconcileError::Malformed { .. })
        ));
    }

    /// Reconciles `ours` against `theirs` as the protocol does (doubling batches from one
    /// symbol); returns what was found and the symbols it took.
    fn reconcile(ours: &[Item], theirs: &[Item]) -> (BTreeSet<(Item, bool)>, usize) {
        let mut decoder = Decoder::default();
        let mut own = Encoder::new(ours.iter().copied());
        let mut encoder = Encoder::new(theirs.iter().copied());
        let mut batch = 1;
        while !decoder.is_done() {
            assert!(decoder.received() < 64 + 4 * (ours.len() + theirs.len()));
            let wire = Symbols::encode(&encoder.produce(batch));
            decoder
                .take(&wire.decode().unwrap(), &own.produce(batch))
                .unwrap();
            batch = decoder.received();
        }
        (decoder.found().collect(), decoder.received())
    }

    #[test]
    fn equal_sets_are_settled_by_one_symbol() {
        let items: Vec<Item> = (0..10_000).map(item).collect();
        let (found, symbols) = reconcile(&items, &items);
        assert!(found.is_empty());
        assert_eq!(symbols, 1);
    }

    #[test]
    fn about_one_and_a_half_symbols_find_each_difference_among_many_items() {
        let (ours, theirs) = two_sets(50_000, 500, 500);
        let (found, _) = reconcile(&ours, &theirs);
        assert_eq!(found.len(), 1_000);
        assert_eq!(found.iter().filter(|(_, theirs)| *theirs).count(), 500);
        // One batch at a time, as a peer would be asked.
        let mut decoder = Decoder::default();
        let mut own = Encoder::new(ours.iter().copied());
        let mut encoder = Encoder::new(theirs.iter().copied());
        while !decoder.is_done() {
            decoder
                .take(&encoder.produce(50), &own.produce(50))
                .unwrap();
        }
        let per_difference = decoder.received() as f64 / 1_000.0;
        assert!(
            per_difference < 1.8,
            "{per_difference} symbols per difference"
        );
    }

    #[test]
    fn symbols_follow_items_added_and_taken_out_and_skipping_ahead_changes_nothing() {
        let items: Vec<Item> = (0..500).map(item).collect();
        let mut all = Encoder::new(items.iter().copied());
        let mut kept = Encoder::new(items[..400].iter().copied()).produce(300);
        for extra in &items[400..] {
            adjust(&mut kept, 0, extra, 1);
        }
        let whole = all.produce(300);
        assert_eq!(kept, whole);
        // From index 100 on, and back again.
        let mut later = whole[100..].to_vec();
        adjust(&mut later, 100, &items[7], -1);
        let mut without = Encoder::new(items.iter().copied().filter(|i| *i != items[7]));
        without.skip_to(100);
        assert_eq!(later, without.produce(200));
    }

    #[test]
    fn symbols_read_back_as_written_and_mismatched_parts_are_refused() {
        let symbols = Encoder::new((0..100).map(item)).produce(40);
        let wire = Symbols::encode(&symbols);
        assert_eq!(wire.bytes.len(), 40 * SYMBOL_WIRE_BYTES);
        assert_eq!(wire.decode().unwrap(), symbols);
        // Past the first, counts travel modulo 2⁸; the first whole.
        let symbols = Encoder::new((0..1_000).map(item)).produce(40);
        let read = Symbols::encode(&symbols).decode().unwrap();
        assert_eq!(read[0], symbols[0]);
        assert_eq!(read[0].count, 1_000);
        for (read, written) in read.iter().zip(&symbols).skip(1) {
            assert_eq!(read.short_count(), written.short_count());
            assert_eq!(
                (read.id, read.tag, read.check),
                (written.id, written.tag, written.check)
            );
        }
        let mut broken = wire.clone();
        broken.bytes.pop();
        assert!(broken.decode().is_none());
        let mut broken = wire.clone();
        broken.first_count += 1;
        assert!(broken.decode().is_none());
        let none = Symbols {
            bytes: ByteBuf::new(),
            first_count: 3,
        };
        assert!(none.decode().is_none());
    }

    /// The estimate of the items left reads their number from a few symbols, whether both
    /// sides hold some or one holds far more (where counts wrap modulo 2⁸).
    #[test]
    fn the_estimate_of_differing_items_is_near_their_number() {
        for (ours_only, theirs_only) in [(100u64, 100u64), (2_000, 3_000), (0, 4_000), (20, 0)] {
            let (ours, theirs) = two_sets(2_000, ours_only, theirs_only);
            let mut decoder = Decoder::default();
            let wire = Symbols::encode(&Encoder::new(theirs).produce(64));
            let own = Encoder::new(ours).produce(64);
            decoder.take(&wire.decode().unwrap(), &own).unwrap();
            let differing = (ours_only + theirs_only) as f64;
            let estimate =
                (decoder.found_len() as u64 + decoder.unfound_estimate().unwrap()) as f64;
            assert!(
                estimate > differing / 2.0 && estimate < differing * 2.0,
                "{estimate} estimated for {differing}"
            );
        }
    }

    /// Two sets of a thousand items each, differing in a few: the decoder finds them from
    /// symbols whose counts travelled modulo 2⁸.
    #[test]
    fn differences_are_found_from_counts_that_travelled_short() {
        let (ours, theirs) = two_sets(1_000, 3, 300);
        let mut decoder = Decoder::default();
        let mut own = Encoder::new(ours.iter().copied());
        let mut encoder = Encoder::new(theirs.iter().copied());
        let mut first = true;
        while !decoder.is_done() {
            let wire = Symbols::encode(&encoder.produce(64));
            decoder
                .take(&wire.decode().unwrap(), &own.produce(64))
                .unwrap();
            if first {
                // Symbol 0's whole count: the sets' sizes' difference, less what was peeled.
                let peeled: i64 = decoder
                    .found()
                    .map(|(_, theirs)| if theirs { 1 } else { -1 })
                    .sum();
                assert_eq!(decoder.size_difference().unwrap() + peeled, 297);
                first = false;
            }
        }
        let found: Vec<(Item, bool)> = decoder.found().collect();
        assert_eq!(found.len(), 303);
        assert_eq!(found.iter().filter(|(_, theirs)| *theirs).count(), 300);
    }

    fn doc(n: u64) -> Id {
        item(n).id
    }

    /// Runs a reconciliation of `ours` against `theirs`, calling `meanwhile` between rounds.
    fn run_against(
        ours: &mut Catalogue,
        theirs: &mut Catalogue,
        mut meanwhile: impl FnMut(&mut Catalogue, &mut Catalogue, usize),
    ) -> Result<(Vec<(Id, Difference)>, usize), ReconcileError> {
        let mut run = Reconciliation::new(ours);
        loop {
            let reply = answer(theirs, run.query())?;
            let more = run.receive(ours, &reply)?;
            if !more {
                return Ok((run.differing().to_vec(), run.rounds()));
            }
            meanwhile(ours, theirs, run.rounds());
        }
    }

    #[test]
    fn every_kind_of_difference_is_found_at_the_versions_the_exchange_began_with() {
        let mut ours = Catalogue::default();
        for n in 0..2_000 {
            ours.insert(doc(n), [1; 32]);
        }
        let mut theirs = ours.clone();
        for n in 0..40 {
            theirs.insert(doc(n), [2; 32]);
        }
        for n in 2_000..2_030 {
            theirs.insert(doc(n), [1; 32]);
        }
        for n in 3_000..3_020 {
            ours.insert(doc(n), [1; 32]);
        }
        // Equal catalogues: one round.
        let mut same = ours.clone();
        let (differing, rounds) = run_against(&mut ours.clone(), &mut same, |_, _, _| {}).unwrap();
        assert!(differing.is_empty());
        assert_eq!(rounds, 1);
        // Documents written on both sides while the exchange runs change nothing.
        let (differing, rounds) = run_against(&mut ours, &mut theirs, |ours, theirs, round| {
            for k in 0..50 {
                let n = 10_000 + round as u64 * 100 + k;
                ours.insert(doc(n), [3; 32]);
                theirs.insert(doc(n + 50), [3; 32]);
                theirs.insert(doc(k), [4; 32]);
            }
        })
        .unwrap();
        assert!(rounds > 2, "{rounds} rounds");
        let mut expected: Vec<(Id, Difference)> = (0..40)
            .map(|n| (doc(n), Difference::Both))
            .chain((2_000..2_030).map(|n| (doc(n), Difference::OnlyTheirs)))
            .chain((3_000..3_020).map(|n| (doc(n), Difference::OnlyOurs)))
            .collect();
        expected.sort_by_key(|(id, _)| *id);
        assert_eq!(differing, expected);
    }

    #[test]
    fn a_catalogues_kept_symbols_are_its_symbols_at_each_version() {
        let mut catalogue = Catalogue::default();
        for n in 0..3_000 {
            catalogue.insert(doc(n), [1; 32]);
        }
        let before = catalogue.version();
        let at_before = Encoder::new(catalogue.riblt_items()).produce(1_100);
        for n in 0..100 {
            catalogue.insert(doc(n), [2; 32]);
            catalogue.remove(&doc(1_000 + n));
            catalogue.insert(doc(5_000 + n), [1; 32]);
        }
        let now = Encoder::new(catalogue.riblt_items()).produce(1_100);
        let cached = crate::reconcile::CACHED_SYMBOLS;
        let version = catalogue.version();
        // Kept, computed, and across the two; now and as it was.
        assert_eq!(
            catalogue.symbols(version, 0, cached).unwrap(),
            now[..cached]
        );
        assert_eq!(
            catalogue.symbols(version, 1_000, 100).unwrap(),
            now[1_000..]
        );
        assert_eq!(
            catalogue.symbols(before, 0, cached).unwrap(),
            at_before[..cached]
        );
        assert_eq!(
            catalogue.symbols(before, 1_000, 100).unwrap(),
            at_before[1_000..]
        );
    }

    #[test]
    fn an_exchange_outrun_by_changes_or_asked_out_of_bounds_is_refused() {
        let mut ours = Catalogue::default();
        let mut theirs = Catalogue::default();
        for n in 0..10 {
            theirs.insert(doc(n), [1; 32]);
        }
        let outrun = run_against(&mut ours, &mut theirs, |_, theirs, _| {
            for n in 0..=crate::reconcile::CATALOGUE_LOG_MAX as u64 {
                theirs.insert(doc(100 + n), [1; 32]);
            }
        });
        assert!(
            matches!(outrun, Err(ReconcileError::Stale { .. })),
            "{outrun:?}"
        );
        assert!(!outrun.unwrap_err().is_peers_fault());
        let ask = |from: u64, count: u32| {
            answer(
                &theirs,
                &Query {
                    version: None,
                    from,
                    count,
                },
            )
        };
        assert!(ask(0, 0).is_err());
        assert!(ask(0, SYMBOLS_PER_REPLY_MAX + 1).is_err());
        assert_eq!(ask(SYMBOLS_MAX, 1), Err(ReconcileError::TooManySymbols));
        let future = answer(
            &theirs,
            &Query {
                version: Some(theirs.version() + 1),
                from: 0,
                count: 1,
            },
        );
        assert!(matches!(future, Err(ReconcileError::Stale { .. })));
        // An answer of the wrong length or about another version breaks the protocol.
        let mut run = Reconciliation::new(&ours);
        let mut reply = answer(&theirs, run.query()).unwrap();
        reply.symbols = Symbols::default();
        assert!(run.receive(&ours, &reply).unwrap_err().is_peers_fault());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn the_symmetric_difference_is_found_exactly(
            shared in prop::collection::btree_set(any::<u64>(), 0..300),
            only_ours in prop::collection::btree_set(any::<u64>(), 0..60),
            only_theirs in prop::collection::btree_set(any::<u64>(), 0..60),
        ) {
            let only_ours: BTreeSet<u64> = only_ours.difference(&shared).copied().collect();
            let only_theirs: BTreeSet<u64> = only_theirs
                .difference(&shared)
                .filter(|n| !only_ours.contains(n))
                .copied()
                .collect();
            let ours: Vec<Item> = shared.iter().chain(&only_ours).map(|n| item(*n)).collect();
            let theirs: Vec<Item> = shared.iter().chain(&only_theirs).map(|n| item(*n)).collect();
            let (found, _) = reconcile(&ours, &theirs);
            let expected: BTreeSet<(Item, bool)> = only_ours
                .iter()
                .map(|n| (item(*n), false))
                .chain(only_theirs.iter().map(|n| (item(*n), true)))
                .collect();
            prop_assert_eq!(found, expected);
        }
    }
}
