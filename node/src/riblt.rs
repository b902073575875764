//! Rateless invertible Bloom lookup tables: a set's endless sequence of coded symbols, any
//! prefix of which, set against the same prefix of another set's, yields their symmetric
//! difference once it is long enough — about 1.35 symbols per differing item, whatever the
//! sets' sizes (Yang, Gilad and Alizadeh, "Practical Rateless Set Reconciliation", 2024).
//!
//! An item is a catalogue entry reduced to what identifies it: the document id and 64 bits of
//! the entry's hash (which covers the id and the digest of the document's heads). Coded
//! symbol `i` holds the XOR of the items mapped to it, the XOR of their checks and their
//! count; an item is mapped to symbol `i` with probability 1 / (1 + i/2), every item to
//! symbol 0. The sequence depends on the set alone: the responder needs no state, and the
//! initiator compares each symbol with its own and peels the items that stand alone.
//!
//! On the wire a symbol is 32 bytes (id, tag and check sums) and its count.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// Bytes of a coded symbol's sums on the wire: the id's (16), the tag's (8), the check's (8).
pub const SYMBOL_SUM_BYTES: usize = 32;

/// A set's element: a document id and a tag that changes with the document's heads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Item {
    /// The document id.
    pub id: [u8; 16],
    /// 64 bits of the entry's hash.
    pub tag: u64,
}

impl Item {
    /// The item's check: a non-linear function of its bytes, so that the XOR of several
    /// items' checks is not the check of their XOR. Also the seed of its mapping.
    pub fn check(&self) -> u64 {
        let (low, high) = self.id.split_at(8);
        let low = u64::from_le_bytes(low.try_into().unwrap_or_default());
        let high = u64::from_le_bytes(high.try_into().unwrap_or_default());
        mix(low ^ mix(high ^ mix(self.tag)))
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
    tag: u64,
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

    /// The one item it holds, and on which side (+1: the peer's, -1: ours), if it holds one.
    fn pure(&self) -> Option<(Item, i64)> {
        if self.count != 1 && self.count != -1 {
            return None;
        }
        let item = Item {
            id: self.id,
            tag: self.tag,
        };
        (item.check() == self.check).then_some((item, self.count))
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
    ours: Encoder,
    /// The peer's symbols less ours, less every item found so far.
    symbols: Vec<Symbol>,
    /// Items found, with their side and their mapping at the first index past `symbols`.
    found: Vec<(Item, i64, u64, Mapping)>,
}

impl Decoder {
    /// The decoder of this node's set.
    pub fn new(ours: Encoder) -> Self {
        Self {
            ours,
            symbols: Vec::new(),
            found: Vec::new(),
        }
    }

    /// Symbols taken so far.
    pub fn received(&self) -> usize {
        self.symbols.len()
    }

    /// Takes the peer's next symbols and peels what it can.
    pub fn take(&mut self, theirs: &[Symbol]) {
        let from = self.symbols.len();
        let to = (from + theirs.len()) as u64;
        let ours = self.ours.produce(theirs.len());
        self.symbols.extend(theirs.iter().zip(&ours).map(|(t, o)| {
            let mut symbol = *t;
            symbol.subtract(o);
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
}

/// Coded symbols as they travel: their sums, 32 bytes each, and their counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Symbols {
    /// The sums, `SYMBOL_SUM_BYTES` per symbol.
    #[serde(rename = "s")]
    pub sums: ByteBuf,
    /// The counts.
    #[serde(rename = "c")]
    pub counts: Vec<i64>,
}

impl Symbols {
    /// Symbols in wire form.
    pub fn encode(symbols: &[Symbol]) -> Self {
        let mut sums = Vec::with_capacity(symbols.len() * SYMBOL_SUM_BYTES);
        for symbol in symbols {
            sums.extend_from_slice(&symbol.id);
            sums.extend_from_slice(&symbol.tag.to_le_bytes());
            sums.extend_from_slice(&symbol.check.to_le_bytes());
        }
        Self {
            sums: ByteBuf::from(sums),
            counts: symbols.iter().map(|s| s.count).collect(),
        }
    }

    /// How many symbols they are, if their parts agree.
    pub fn len(&self) -> Option<usize> {
        (self.sums.len() == self.counts.len() * SYMBOL_SUM_BYTES).then_some(self.counts.len())
    }

    /// Whether they are none.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// The symbols; `None` if the sums and counts disagree in number.
    pub fn decode(&self) -> Option<Vec<Symbol>> {
        self.len()?;
        Some(
            self.sums
                .chunks_exact(SYMBOL_SUM_BYTES)
                .zip(&self.counts)
                .map(|(sum, &count)| {
                    let mut id = [0u8; 16];
                    id.copy_from_slice(&sum[..16]);
                    let word = |at: usize| {
                        let mut bytes = [0u8; 8];
                        bytes.copy_from_slice(&sum[at..at + 8]);
                        u64::from_le_bytes(bytes)
                    };
                    Symbol {
                        id,
                        tag: word(16),
                        check: word(24),
                        count,
                    }
                })
                .collect(),
        )
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
            tag: mix(n ^ 0x1234),
        }
    }

    /// Reconciles `ours` against `theirs` as the protocol does (doubling batches from one
    /// symbol); returns what was found and the symbols it took.
    fn reconcile(ours: &[Item], theirs: &[Item]) -> (BTreeSet<(Item, bool)>, usize) {
        let mut decoder = Decoder::new(Encoder::new(ours.iter().copied()));
        let mut encoder = Encoder::new(theirs.iter().copied());
        let mut batch = 1;
        while !decoder.is_done() {
            assert!(decoder.received() < 64 + 4 * (ours.len() + theirs.len()));
            let wire = Symbols::encode(&encoder.produce(batch));
            decoder.take(&wire.decode().unwrap());
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
        let shared: Vec<Item> = (0..50_000).map(item).collect();
        let mut ours = shared.clone();
        let mut theirs = shared;
        ours.extend((1_000_000..1_000_500).map(item));
        theirs.extend((2_000_000..2_000_500).map(item));
        let (found, _) = reconcile(&ours, &theirs);
        assert_eq!(found.len(), 1_000);
        assert_eq!(found.iter().filter(|(_, theirs)| *theirs).count(), 500);
        // One batch at a time, as a peer would be asked.
        let mut decoder = Decoder::new(Encoder::new(ours.iter().copied()));
        let mut encoder = Encoder::new(theirs.iter().copied());
        while !decoder.is_done() {
            decoder.take(&encoder.produce(50));
        }
        let per_difference = decoder.received() as f64 / 1_000.0;
        assert!(
            per_difference < 1.8,
            "{per_difference} symbols per difference"
        );
    }

    #[test]
    fn symbols_read_back_as_written_and_mismatched_parts_are_refused() {
        let symbols = Encoder::new((0..100).map(item)).produce(40);
        let wire = Symbols::encode(&symbols);
        assert_eq!(wire.decode().unwrap(), symbols);
        let mut broken = wire.clone();
        broken.counts.pop();
        assert!(broken.decode().is_none());
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
