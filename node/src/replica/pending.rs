//! Changes held until their dependencies arrive: parked and woken by what they wait for,
//! bounded per author and in total, the oldest of a bucket evicted first.

use super::*;

#[derive(Serialize, Deserialize)]
pub(super) struct PendingRecord {
    pub(super) document: DocumentId,
    /// The dependencies it waits for, when it was parked.
    pub(super) missing: Vec<[u8; 32]>,
    #[serde(with = "serde_bytes")]
    pub(super) envelope: Vec<u8>,
    /// Whose share it counts against: its author's key, or `STRANGERS_BUCKET`.
    #[serde(default)]
    pub(super) bucket: [u8; 32],
    /// Its place in the bucket's order (`keys::PENDING_ORDER`).
    #[serde(default)]
    pub(super) sequence: u64,
    /// It waits for itself: woken by name (a revoked key's change until the cut-off can be
    /// drawn, a stranger's change until a roster names its author).
    #[serde(default)]
    pub(super) waits_on_itself: bool,
    /// The revoked key whose cut-off it waits for, if any (`keys::HELD`).
    #[serde(default)]
    pub(super) held_for: Option<[u8; 32]>,
}

impl PendingRecord {
    pub(super) fn usage(&self) -> Usage {
        Usage {
            changes: 1,
            bytes: self.envelope.len(),
            waits: self.missing.len() + usize::from(self.waits_on_itself),
        }
    }
}

/// What a held change waits for, besides its missing dependencies.
pub(super) enum Hold {
    /// Only its dependencies; it counts against its author's share.
    Dependencies,
    /// The cut-off of its revoked author's key to be drawable here, or a mark within it.
    Cutoff(Bytes32),
    /// A roster that names its author.
    Roster,
}

/// What `Node::unpark` took out of the store, to take off its bucket's share.
#[derive(Clone, Copy, Debug)]
pub(super) struct Unparked {
    pub(super) bucket: [u8; 32],
    pub(super) sequence: u64,
    pub(super) usage: Usage,
}

/// The bucket of every author the roster does not know: they share one small quota.
pub(super) const STRANGERS_BUCKET: [u8; 32] = [0xff; 32];

/// What pending changes hold: of one bucket, or of all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Usage {
    pub(super) changes: usize,
    pub(super) bytes: usize,
    pub(super) waits: usize,
}

impl Usage {
    pub(super) fn plus(self, other: Usage) -> Usage {
        Usage {
            changes: self.changes + other.changes,
            bytes: self.bytes + other.bytes,
            waits: self.waits + other.waits,
        }
    }

    pub(super) fn minus(self, other: Usage) -> Usage {
        Usage {
            changes: self.changes.saturating_sub(other.changes),
            bytes: self.bytes.saturating_sub(other.bytes),
            waits: self.waits.saturating_sub(other.waits),
        }
    }

    pub(super) fn exceeds(self, quota: Usage) -> bool {
        self.changes > quota.changes || self.bytes > quota.bytes || self.waits > quota.waits
    }

    pub(super) fn encode(self) -> Vec<u8> {
        [
            (self.bytes as u64).to_be_bytes(),
            (self.waits as u64).to_be_bytes(),
        ]
        .concat()
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<Usage> {
        let bytes_held = u64::from_be_bytes(bytes.get(0..8)?.try_into().ok()?);
        let waits = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        Some(Usage {
            changes: 1,
            bytes: usize::try_from(bytes_held).ok()?,
            waits: usize::try_from(waits).ok()?,
        })
    }
}

/// The pending changes' shares, counted at open from the order keys and kept in step with
/// every batch that parks or settles a change.
#[derive(Debug, Default)]
pub(super) struct PendingBook {
    pub(super) buckets: HashMap<[u8; 32], Usage>,
    pub(super) total: Usage,
    pub(super) next_sequence: u64,
}

impl PendingBook {
    /// Whether no change is held pending: the book counts every pending record (each is
    /// parked with its order key, which the book is counted from at open), so the store need
    /// not be asked.
    pub(super) fn holds_none(&self) -> bool {
        self.total.changes == 0
    }

    pub(super) fn quota(bucket: &[u8; 32]) -> Usage {
        if *bucket == STRANGERS_BUCKET {
            Usage {
                changes: PENDING_CHANGES_OF_STRANGERS_MAX,
                bytes: PENDING_BYTES_OF_STRANGERS_MAX,
                waits: PENDING_CHANGES_OF_STRANGERS_MAX,
            }
        } else {
            Usage {
                changes: PENDING_CHANGES_PER_AUTHOR_MAX,
                bytes: PENDING_BYTES_PER_AUTHOR_MAX,
                waits: PENDING_WAITS_PER_AUTHOR_MAX,
            }
        }
    }

    const TOTAL: Usage = Usage {
        changes: PENDING_CHANGES_MAX,
        bytes: PENDING_BYTES_MAX,
        waits: PENDING_WAITS_MAX,
    };

    pub(super) fn of(&self, bucket: &[u8; 32]) -> Usage {
        self.buckets.get(bucket).copied().unwrap_or_default()
    }

    pub(super) fn add(&mut self, bucket: [u8; 32], usage: Usage) {
        let entry = self.buckets.entry(bucket).or_default();
        *entry = entry.plus(usage);
        self.total = self.total.plus(usage);
    }

    /// Takes a change `unpark` removed off its share (after its batch was applied).
    pub(super) fn settled(&mut self, unparked: Option<Unparked>) {
        if let Some(unparked) = unparked {
            self.remove(&unparked.bucket, unparked.usage);
        }
    }

    pub(super) fn remove(&mut self, bucket: &[u8; 32], usage: Usage) {
        if let Some(entry) = self.buckets.get_mut(bucket) {
            *entry = entry.minus(usage);
            if entry.changes == 0 {
                self.buckets.remove(bucket);
            }
        }
        self.total = self.total.minus(usage);
    }

    /// The bucket holding the largest part of the whole, in whichever measure it holds most
    /// of: the one to evict from when the whole is full.
    pub(super) fn largest(&self) -> Option<[u8; 32]> {
        let per_mille = |part: usize, whole: usize| part.saturating_mul(1_000) / whole.max(1);
        self.buckets
            .iter()
            .max_by_key(|(_, usage)| {
                per_mille(usage.changes, Self::TOTAL.changes)
                    .max(per_mille(usage.bytes, Self::TOTAL.bytes))
                    .max(per_mille(usage.waits, Self::TOTAL.waits))
            })
            .map(|(bucket, _)| *bucket)
    }
}

/// A change waiting for its dependencies, as operators see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingEntry {
    /// The change.
    pub change: [u8; 32],
    /// Its document.
    pub document: DocumentId,
    /// The dependencies it was waiting for when it arrived.
    pub missing: Vec<[u8; 32]>,
}

impl Node {
    /// How many changes are held waiting (for dependencies, a cut-off or a roster), as of the
    /// last decision (without the decision lock).
    pub fn pending_count(&self) -> Result<usize, NodeError> {
        Ok(self
            .counts
            .pending
            .load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The dependencies that changes of `document` held pending wait for and this node does
    /// not hold: what to ask peers for by name. Reads only that document's pending records.
    pub fn missing_dependencies(&self, document: DocumentId) -> Result<Vec<ChangeHash>, NodeError> {
        // Most of the time nothing is pending and this is one empty prefix scan.
        let mut missing = BTreeSet::new();
        for (_, value) in self
            .store
            .scan_prefix(&keys::per_document(keys::PENDING, &document))?
        {
            let record: PendingRecord = decode(&value, "pending record")?;
            for dependency in record.missing {
                let hash = ChangeHash(dependency);
                let held = self.has_change(document, &hash)?
                    || self.store.get(&keys::pending(&document, &hash))?.is_some();
                if !held {
                    missing.insert(hash);
                }
            }
        }
        Ok(missing.into_iter().collect())
    }

    /// The changes waiting for their dependencies, with the dependencies they wait for.
    pub fn pending(&self) -> Result<Vec<PendingEntry>, NodeError> {
        let mut entries = Vec::new();
        for page in pages(&self.store, &[keys::PENDING]) {
            for (key, value) in page? {
                let record: PendingRecord = decode(&value, "pending record")?;
                let (_, change) = keys::parse_pending(&key).ok_or(StoreError::Corrupt {
                    what: "pending key",
                })?;
                entries.push(PendingEntry {
                    change: change.0,
                    document: record.document,
                    missing: record.missing,
                });
            }
        }
        Ok(entries)
    }

    /// Decides the pending changes that waited for `decided`, and in turn those that waited
    /// for them. Only changes waiting for a decided change are read: the cost follows what a
    /// decision settles, not how many changes wait. A pending record that can no longer be
    /// decided (damaged, or its author no longer in the roster) is dropped with a log line: a
    /// peer will offer it again if it matters. Errors here never fail the ingest that
    /// triggered the retry.
    pub(super) fn retry_pending(&self, ledger: &mut Ledger, ticket: &mut u64, decided: ChangeHash) {
        if let Err(error) = self.retry_pending_inner(ledger, ticket, decided) {
            tracing::warn!(%error, "retrying pending changes stopped early");
        }
    }

    /// Decides what the decisions so far unblocked: pending changes whose dependencies were
    /// settled, held changes of a revoked key that were just vouched for, and — once a
    /// revoked key's cut-off can be drawn — every change of that key still held. Errors are
    /// logged, never returned: they must not fail the call that triggered the work.
    pub(super) fn settle(&self, ledger: &mut Ledger, ticket: &mut u64) {
        loop {
            if let Some(hash) = ledger.woken.pop_front() {
                self.retry_pending(ledger, ticket, hash);
            } else if let Some(key) = ledger.recheck.pop_first() {
                match self.held_past_cutoff(&key) {
                    Ok(held) => ledger.woken.extend(held),
                    Err(error) => {
                        tracing::warn!(%error, "rechecking a revoked key's held changes failed")
                    }
                }
            } else {
                return;
            }
        }
    }

    /// Holds a change until what it waits for arrives: its `missing` dependencies, or (when
    /// `waits_on_itself`) a wake by name. It counts against `bucket`'s share; a bucket over
    /// its share evicts its own oldest held change, and a full whole evicts the oldest of the
    /// bucket holding most of it. Evicted changes are dropped, not refused: a peer offers
    /// them again. Parking a change held already replaces its record.
    pub(super) fn park(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        verified: &VerifiedChange,
        missing: Vec<[u8; 32]>,
        hold: Hold,
    ) -> Result<Ingested, IngestError> {
        let (id, hash) = (verified.document, verified.hash);
        if missing.len() > PENDING_MISSING_PER_CHANGE_MAX {
            return Err(IngestError::TooManyMissing {
                missing: missing.len(),
            });
        }
        let (bucket, waits_on_itself, held_for) = match hold {
            Hold::Dependencies => (verified.author.0, false, None),
            Hold::Cutoff(key) => (key.0, true, Some(key.0)),
            Hold::Roster => (STRANGERS_BUCKET, true, None),
        };
        let mut batch = Batch::default();
        let replaced = self.unpark(&mut batch, &id, &hash)?;
        // Decided again and held again (at every start, every roster change), a change keeps
        // its place: its age is when it first arrived.
        let sequence = match replaced {
            Some(old) if old.bucket == bucket => old.sequence,
            _ => {
                ledger.pending.next_sequence += 1;
                ledger.pending.next_sequence - 1
            }
        };
        let record = PendingRecord {
            document: id,
            missing,
            envelope: verified.encoded.clone(),
            bucket,
            sequence,
            waits_on_itself,
            held_for,
        };
        let usage = record.usage();
        let room = replaced.map_or(usage, |old| usage.minus(old.usage));
        self.make_room(ledger, ticket, &bucket, room, (&id, &hash))?;
        for dependency in &record.missing {
            batch.put(keys::waiting(dependency, &id, &hash), Vec::new());
        }
        if waits_on_itself {
            batch.put(keys::waiting(&hash.0, &id, &hash), Vec::new());
            batch.put(keys::waits_on_itself(&hash, &id), Vec::new());
        }
        if let Some(key) = held_for {
            batch.put(keys::held(&Bytes32(key), &hash, &id), Vec::new());
        }
        batch.put(
            keys::pending_order(&bucket, record.sequence, &id, &hash),
            usage.encode(),
        );
        batch.put(keys::pending(&id, &hash), encode(&record));
        *ticket = self.commit.apply(&self.store, batch)?;
        ledger.pending.settled(replaced);
        ledger.pending.add(bucket, usage);
        Ok(Ingested::Pending(hash))
    }

    /// Adds to `batch` the deletion of a pending change's record and every key that points at
    /// it. Returns what it held, to take off its bucket's share once the batch is applied
    /// (`PendingBook::settled`); `None` if it was not pending.
    pub(super) fn unpark(
        &self,
        batch: &mut Batch,
        document: &DocumentId,
        hash: &ChangeHash,
    ) -> Result<Option<Unparked>, StoreError> {
        let key = keys::pending(document, hash);
        let Some(value) = self.store.get(&key)? else {
            return Ok(None);
        };
        batch.delete(key);
        batch.delete(keys::waiting(&hash.0, document, hash));
        batch.delete(keys::waits_on_itself(hash, document));
        // A record that no longer decodes still goes; its order key goes when its bucket
        // next evicts.
        let Ok(record) = decode::<PendingRecord>(&value, "pending record") else {
            return Ok(None);
        };
        for dependency in &record.missing {
            batch.delete(keys::waiting(dependency, document, hash));
        }
        if let Some(key) = record.held_for {
            batch.delete(keys::held(&Bytes32(key), hash, document));
        }
        batch.delete(keys::pending_order(
            &record.bucket,
            record.sequence,
            document,
            hash,
        ));
        Ok(Some(Unparked {
            bucket: record.bucket,
            sequence: record.sequence,
            usage: record.usage(),
        }))
    }

    /// Evicts held changes until `usage` more fits `bucket`'s share and the whole. The change
    /// being parked (`parking`) is never its own victim.
    pub(super) fn make_room(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        bucket: &[u8; 32],
        usage: Usage,
        parking: (&DocumentId, &ChangeHash),
    ) -> Result<(), StoreError> {
        while ledger
            .pending
            .of(bucket)
            .plus(usage)
            .exceeds(PendingBook::quota(bucket))
        {
            if !self.evict_oldest(ledger, ticket, bucket, parking)? {
                break;
            }
        }
        while ledger.pending.total.plus(usage).exceeds(PendingBook::TOTAL) {
            let Some(largest) = ledger.pending.largest() else {
                break;
            };
            if !self.evict_oldest(ledger, ticket, &largest, parking)? {
                break;
            }
        }
        Ok(())
    }

    /// Drops the oldest held change of `bucket`; false if it has none to drop.
    pub(super) fn evict_oldest(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        bucket: &[u8; 32],
        parking: (&DocumentId, &ChangeHash),
    ) -> Result<bool, StoreError> {
        let prefix = keys::pending_order_of(bucket);
        // Two: the oldest may be the change being parked, which is never its own victim.
        for (key, value) in self.store.scan_from(&prefix, &prefix, 2)? {
            let Some(keys::PendingOrder { document, hash, .. }) = keys::parse_pending_order(&key)
            else {
                return Err(StoreError::Corrupt {
                    what: "pending order key",
                });
            };
            if (&document, &hash) == parking {
                continue;
            }
            let mut batch = Batch::default();
            let unparked = self.unpark(&mut batch, &document, &hash)?;
            // An order key whose record is gone (or no longer decodes) goes with its share.
            batch.delete(key.clone());
            *ticket = self.commit.apply(&self.store, batch)?;
            match unparked {
                Some(unparked) => ledger.pending.settled(Some(unparked)),
                None => ledger
                    .pending
                    .remove(bucket, Usage::decode(&value).unwrap_or_default()),
            }
            tracing::warn!(%document, change = %hash, "a held change was evicted to keep pending changes within their bounds");
            return Ok(true);
        }
        Ok(false)
    }

    pub(super) fn retry_pending_inner(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        decided: ChangeHash,
    ) -> Result<(), IngestError> {
        // With none held, no change waits for this one, and the store need not be asked.
        if ledger.pending.holds_none() {
            return Ok(());
        }
        let mut settled = vec![decided];
        while let Some(dependency) = settled.pop() {
            for key in self
                .store
                .keys_with_prefix(&keys::waiting_for(&dependency.0))?
            {
                let Some((document, hash)) = keys::parse_waiting(&key) else {
                    self.drop_keys(vec![key], ticket)?;
                    continue;
                };
                let pending_key = keys::pending(&document, &hash);
                let Some(value) = self.store.get(&pending_key)? else {
                    self.drop_keys(vec![key], ticket)?;
                    continue;
                };
                let Ok(record) = decode::<PendingRecord>(&value, "pending record") else {
                    self.drop_pending(ledger, ticket, vec![key], &document, &hash)?;
                    continue;
                };
                // Still waiting for another of its dependencies?
                let mut ready = true;
                for missing in &record.missing {
                    let missing = ChangeHash(*missing);
                    let accepted = self
                        .store
                        .get(&keys::envelope(&document, &missing))?
                        .is_some();
                    let refused = self
                        .store
                        .get(&keys::quarantined(&missing, &document))?
                        .is_some();
                    ready &= accepted || refused;
                }
                if !ready {
                    continue;
                }
                // Verified when it was parked; failing now means the stored copy is damaged.
                let Ok(verified) = Envelope::verify(&record.envelope) else {
                    self.drop_pending(ledger, ticket, Vec::new(), &document, &hash)?;
                    continue;
                };
                match self.decide(ledger, verified, None, ticket, None) {
                    Ok(Ingested::Accepted(_) | Ingested::Quarantined(..)) => settled.push(hash),
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "a pending change could not be decided; dropped");
                        self.drop_pending(ledger, ticket, Vec::new(), &document, &hash)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Drops a pending change that can no longer be decided, with every key pointing at it,
    /// and `extra` keys.
    pub(super) fn drop_pending(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        extra: Vec<Vec<u8>>,
        document: &DocumentId,
        hash: &ChangeHash,
    ) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        let unparked = self.unpark(&mut batch, document, hash)?;
        for key in extra {
            batch.delete(key);
        }
        *ticket = self.commit.apply(&self.store, batch)?;
        ledger.pending.settled(unparked);
        Ok(())
    }

    pub(super) fn drop_keys(&self, keys: Vec<Vec<u8>>, ticket: &mut u64) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for key in keys {
            batch.delete(key);
        }
        *ticket = self.commit.apply(&self.store, batch)?;
        Ok(())
    }
}
