//! Idempotent producers: per (producer id, partition), the epoch and the last batches' sequence
//! ranges, checked when a committed entry is *applied*, so every replica decides the same.
//!
//! Kafka's rules (its `ProducerStateManager`): a batch carries (producer id, epoch, base
//! sequence); its records take sequences `base .. base + count` (wrapping after `i32::MAX`).
//! A batch equal to one of the producer's last [`RETAINED_BATCHES`] is a duplicate: not
//! appended, answered with the original batch's offsets. Otherwise, for the producer's current
//! epoch the batch must start right after the last one (a gap or an older batch is
//! OUT_OF_ORDER_SEQUENCE_NUMBER); an older epoch is INVALID_PRODUCER_EPOCH; a newer epoch must
//! start at sequence 0. A producer this partition has no state for (new, or expired) may start
//! at any sequence, as in Kafka since KIP-360.
//!
//! Pure: no I/O. The partition replica persists each changed entry next to its log's records
//! (see `storage::keys::producer_key`) in the same atomic write as the batch it describes.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::error::StorageError;

/// Batches remembered per producer and partition: Kafka's `max.in.flight.requests.per.connection`
/// limit for idempotence, so any retry a client can send is recognised.
pub const RETAINED_BATCHES: usize = 5;

/// A producer unheard of this long (by the clock of the leaders that proposed its batches) is
/// forgotten (Kafka's
/// `producer.id.expiration.ms` default: one day).
pub const PRODUCER_EXPIRATION_MS: i64 = 24 * 60 * 60 * 1000;

/// Producer ids from here up are the cluster's own (stream jobs: see `streams::job`); `POST
/// /producers` and InitProducerId never hand them out, and they never expire (a job's fence
/// must outlive any quiet spell; they go when their topic does).
pub const RESERVED_PRODUCER_IDS: i64 = 1 << 62;

/// What a batch says about its producer (from its header); `id < 0` means not idempotent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerBatch {
    pub id: i64,
    pub epoch: i16,
    pub base_sequence: i32,
    pub record_count: u32,
}

impl ProducerBatch {
    pub fn is_idempotent(&self) -> bool {
        self.id >= 0
    }

    /// Sequence of the batch's last record (Kafka wraps sequences after `i32::MAX` to 0).
    pub fn last_sequence(&self) -> i32 {
        add_sequence(self.base_sequence, self.record_count.saturating_sub(1))
    }
}

fn add_sequence(sequence: i32, n: u32) -> i32 {
    ((i64::from(sequence) + i64::from(n)) % (i64::from(i32::MAX) + 1)) as i32
}

/// One appended batch of a producer, as remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceRange {
    pub first: i32,
    pub last: i32,
    pub base_offset: u64,
    pub record_count: u32,
}

/// A producer's state on one partition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProducerEntry {
    pub epoch: i16,
    /// Oldest first; at most [`RETAINED_BATCHES`].
    pub batches: VecDeque<SequenceRange>,
    /// When its last batch was proposed (the proposing leader's clock): what expiry is
    /// measured against.
    pub last_timestamp_ms: i64,
}

/// The verdict on a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Append it (and then [`ProducerStates::record`] it).
    Append,
    /// Already appended: answer with this batch's offsets, append nothing.
    Duplicate(SequenceRange),
    /// A gap, or an old batch no longer remembered.
    OutOfOrder { expected: i32, got: i32 },
    /// The producer has moved on to a newer epoch.
    StaleEpoch { current: i16, got: i16 },
}

/// Every producer's state on one partition.
#[derive(Debug, Clone, Default)]
pub struct ProducerStates {
    producers: HashMap<i64, ProducerEntry>,
    /// At most the oldest `last_timestamp_ms` of all producers (None: no producers), so the
    /// expiry check on every append is one comparison until something may expire.
    oldest_ms: Option<i64>,
}

impl PartialEq for ProducerStates {
    fn eq(&self, other: &Self) -> bool {
        self.producers == other.producers
    }
}

impl Eq for ProducerStates {}

impl ProducerStates {
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    pub fn get(&self, id: i64) -> Option<&ProducerEntry> {
        self.producers.get(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (i64, &ProducerEntry)> {
        self.producers.iter().map(|(id, e)| (*id, e))
    }

    pub fn insert(&mut self, id: i64, entry: ProducerEntry) {
        self.note_timestamp(entry.last_timestamp_ms);
        self.producers.insert(id, entry);
    }

    fn note_timestamp(&mut self, timestamp_ms: i64) {
        // (A reserved producer's time lowers the bound too: harmless, it only costs a scan.)
        self.oldest_ms = Some(self.oldest_ms.map_or(timestamp_ms, |t| t.min(timestamp_ms)));
    }

    /// Decide what to do with `batch` (an idempotent one).
    pub fn check(&self, batch: &ProducerBatch) -> Check {
        let Some(entry) = self.producers.get(&batch.id) else {
            return Check::Append;
        };
        if batch.epoch < entry.epoch {
            return Check::StaleEpoch {
                current: entry.epoch,
                got: batch.epoch,
            };
        }
        if batch.epoch > entry.epoch {
            return if batch.base_sequence == 0 {
                Check::Append
            } else {
                Check::OutOfOrder {
                    expected: 0,
                    got: batch.base_sequence,
                }
            };
        }
        let last = batch.last_sequence();
        if let Some(original) = entry
            .batches
            .iter()
            .find(|b| b.first == batch.base_sequence && b.last == last)
        {
            return Check::Duplicate(*original);
        }
        let expected = entry
            .batches
            .back()
            .map_or(batch.base_sequence, |b| add_sequence(b.last, 1));
        if batch.base_sequence == expected {
            Check::Append
        } else {
            Check::OutOfOrder {
                expected,
                got: batch.base_sequence,
            }
        }
    }

    /// Remember `batch`, appended at `base_offset` (after [`Check::Append`]); returns the
    /// producer's entry as it now is, to persist.
    pub fn record(
        &mut self,
        batch: &ProducerBatch,
        base_offset: u64,
        timestamp_ms: i64,
    ) -> &ProducerEntry {
        let entry = self.producers.entry(batch.id).or_default();
        if batch.epoch != entry.epoch {
            entry.batches.clear();
        }
        entry.epoch = batch.epoch;
        if entry.batches.len() == RETAINED_BATCHES {
            entry.batches.pop_front();
        }
        entry.batches.push_back(SequenceRange {
            first: batch.base_sequence,
            last: batch.last_sequence(),
            base_offset,
            record_count: batch.record_count,
        });
        // The latest batch's time, as Kafka keeps it: one batch stamped far ahead does not
        // keep its producer forever.
        entry.last_timestamp_ms = timestamp_ms;
        self.oldest_ms = Some(self.oldest_ms.map_or(timestamp_ms, |t| t.min(timestamp_ms)));
        self.producers
            .get(&batch.id)
            .unwrap_or_else(|| unreachable!("inserted above"))
    }

    /// Fence producer `id` at `epoch` (a stream job's runner does this before it looks at its
    /// output): from then on its batches of any older epoch are refused. A newer epoch starts
    /// with no batches remembered; the same epoch again changes nothing. An older epoch than
    /// the producer's is refused with the producer's epoch: the caller is itself fenced.
    pub fn fence(&mut self, id: i64, epoch: i16, at_ms: i64) -> Result<&ProducerEntry, i16> {
        let entry = self.producers.entry(id).or_insert_with(|| ProducerEntry {
            epoch: -1,
            batches: VecDeque::new(),
            last_timestamp_ms: at_ms,
        });
        if epoch < entry.epoch {
            return Err(entry.epoch);
        }
        if epoch > entry.epoch {
            entry.epoch = epoch;
            entry.batches.clear();
            entry.last_timestamp_ms = at_ms;
        }
        let last = entry.last_timestamp_ms;
        self.oldest_ms = Some(self.oldest_ms.map_or(last, |t| t.min(last)));
        Ok(self
            .producers
            .get(&id)
            .unwrap_or_else(|| unreachable!("inserted above")))
    }

    /// Forget producers last heard of more than [`PRODUCER_EXPIRATION_MS`] before `now_ms`;
    /// returns their ids (to delete from storage). Called on every append, with the time in the
    /// appended batch: the same decision on every replica, at the same entry.
    pub fn expire(&mut self, now_ms: i64) -> Vec<i64> {
        let horizon = now_ms.saturating_sub(PRODUCER_EXPIRATION_MS);
        if self.oldest_ms.is_none_or(|oldest| oldest >= horizon) {
            return Vec::new();
        }
        let expired: Vec<i64> = self
            .producers
            .iter()
            .filter(|(id, e)| **id < RESERVED_PRODUCER_IDS && e.last_timestamp_ms < horizon)
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            self.producers.remove(id);
        }
        self.oldest_ms = self
            .producers
            .iter()
            .filter(|(id, _)| **id < RESERVED_PRODUCER_IDS)
            .map(|(_, e)| e.last_timestamp_ms)
            .min();
        expired
    }
}

impl ProducerEntry {
    /// Fixed-width big-endian encoding: epoch, last timestamp, count, then each batch.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(11 + self.batches.len() * 20);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.last_timestamp_ms.to_be_bytes());
        out.push(self.batches.len() as u8);
        for b in &self.batches {
            out.extend_from_slice(&b.first.to_be_bytes());
            out.extend_from_slice(&b.last.to_be_bytes());
            out.extend_from_slice(&b.base_offset.to_be_bytes());
            out.extend_from_slice(&b.record_count.to_be_bytes());
        }
        Bytes::from(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StorageError> {
        let corrupt = |message: String| StorageError::Corrupt {
            what: "producer state".into(),
            message,
        };
        if bytes.len() < 11 {
            return Err(corrupt(format!("{} bytes", bytes.len())));
        }
        let count = usize::from(bytes[10]);
        if bytes.len() != 11 + count * 20 || count > RETAINED_BATCHES {
            return Err(corrupt(format!(
                "{} bytes for {count} batches",
                bytes.len()
            )));
        }
        let take = |at: usize, n: usize| &bytes[at..at + n];
        let mut entry = ProducerEntry {
            epoch: i16::from_be_bytes([bytes[0], bytes[1]]),
            last_timestamp_ms: i64::from_be_bytes(take(2, 8).try_into().unwrap_or_default()),
            batches: VecDeque::with_capacity(count),
        };
        for i in 0..count {
            let at = 11 + i * 20;
            entry.batches.push_back(SequenceRange {
                first: i32::from_be_bytes(take(at, 4).try_into().unwrap_or_default()),
                last: i32::from_be_bytes(take(at + 4, 4).try_into().unwrap_or_default()),
                base_offset: u64::from_be_bytes(take(at + 8, 8).try_into().unwrap_or_default()),
                record_count: u32::from_be_bytes(take(at + 16, 4).try_into().unwrap_or_default()),
            });
        }
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(id: i64, epoch: i16, base_sequence: i32, record_count: u32) -> ProducerBatch {
        ProducerBatch {
            id,
            epoch,
            base_sequence,
            record_count,
        }
    }

    #[test]
    fn a_retry_of_any_of_the_last_five_batches_is_a_duplicate_with_its_offsets() {
        let mut states = ProducerStates::default();
        let mut offset = 100;
        for seq in (0..60).step_by(10) {
            let b = batch(7, 0, seq, 10);
            assert_eq!(states.check(&b), Check::Append);
            states.record(&b, offset, 1);
            offset += 10;
        }
        // Batches 10..60 are retained; 0..10 fell out and is now just out of order.
        let retry = states.check(&batch(7, 0, 20, 10));
        assert!(
            matches!(retry, Check::Duplicate(r) if r.base_offset == 120 && r.record_count == 10)
        );
        assert_eq!(
            states.check(&batch(7, 0, 0, 10)),
            Check::OutOfOrder {
                expected: 60,
                got: 0
            }
        );
        // Same start, different length: not the same batch.
        assert_eq!(
            states.check(&batch(7, 0, 50, 3)),
            Check::OutOfOrder {
                expected: 60,
                got: 50
            }
        );
        assert_eq!(states.check(&batch(7, 0, 60, 1)), Check::Append);
        assert_eq!(
            states.check(&batch(7, 0, 61, 1)),
            Check::OutOfOrder {
                expected: 60,
                got: 61
            }
        );
    }

    #[test]
    fn epochs_fence_older_producers_and_a_new_epoch_starts_at_zero() {
        let mut states = ProducerStates::default();
        states.record(&batch(1, 3, 0, 5), 0, 1);
        assert_eq!(
            states.check(&batch(1, 2, 5, 1)),
            Check::StaleEpoch { current: 3, got: 2 }
        );
        assert_eq!(
            states.check(&batch(1, 4, 5, 1)),
            Check::OutOfOrder {
                expected: 0,
                got: 5
            }
        );
        assert_eq!(states.check(&batch(1, 4, 0, 1)), Check::Append);
        states.record(&batch(1, 4, 0, 1), 5, 2);
        // The old epoch's batches are forgotten with it.
        assert_eq!(states.get(1).map(|e| e.batches.len()), Some(1));
        assert_eq!(
            states.check(&batch(1, 3, 0, 5)),
            Check::StaleEpoch { current: 4, got: 3 }
        );
    }

    #[test]
    fn a_fence_refuses_older_epochs_from_then_on() {
        let mut states = ProducerStates::default();
        // A runner of epoch 3 writes; its successor (epoch 4) fences the partition.
        states.record(&batch(9, 3, 0, 2), 0, 1);
        assert_eq!(states.fence(9, 4, 2).map(|e| e.epoch), Ok(4));
        assert_eq!(
            states.check(&batch(9, 3, 2, 1)),
            Check::StaleEpoch { current: 4, got: 3 }
        );
        assert_eq!(states.check(&batch(9, 4, 0, 1)), Check::Append);
        states.record(&batch(9, 4, 0, 1), 2, 3);
        // The same epoch again keeps the batches (a retry of the last one is still known).
        states.fence(9, 4, 4).expect("same epoch");
        assert!(matches!(
            states.check(&batch(9, 4, 0, 1)),
            Check::Duplicate(_)
        ));
        // The deposed runner's own fence is refused.
        assert_eq!(states.fence(9, 3, 5).map(|e| e.epoch), Err(4));
        // A fence is what makes a producer known: a first fence at any epoch is taken.
        assert_eq!(states.fence(10, 0, 6).map(|e| e.epoch), Ok(0));
    }

    #[test]
    fn an_unknown_producer_starts_anywhere_and_sequences_wrap() {
        let mut states = ProducerStates::default();
        let b = batch(9, 0, i32::MAX - 1, 2);
        assert_eq!(states.check(&b), Check::Append);
        assert_eq!(b.last_sequence(), i32::MAX);
        states.record(&b, 0, 1);
        assert_eq!(states.check(&batch(9, 0, 0, 3)), Check::Append);
        let wrapping = batch(9, 0, i32::MAX, 3);
        assert_eq!(wrapping.last_sequence(), 1);
    }

    #[test]
    fn producers_expire_by_their_batches_timestamps() {
        let mut states = ProducerStates::default();
        states.record(&batch(1, 0, 0, 1), 0, 1_000);
        states.record(&batch(2, 0, 0, 1), 1, 1_000 + PRODUCER_EXPIRATION_MS);
        assert!(states.expire(1_000 + PRODUCER_EXPIRATION_MS).is_empty());
        assert_eq!(states.expire(2_000 + PRODUCER_EXPIRATION_MS), vec![1]);
        assert!(states.get(1).is_none() && states.get(2).is_some());
        // A batch stamped far ahead is forgotten by the next one's time.
        states.record(&batch(2, 0, 1, 1), 2, i64::MAX / 2);
        states.record(&batch(2, 0, 2, 1), 3, 5_000 + PRODUCER_EXPIRATION_MS);
        assert_eq!(states.expire(6_000 + 2 * PRODUCER_EXPIRATION_MS), vec![2]);
        assert!(states.is_empty());
        // A stream job's producer (a reserved id) is never expired: its fence must hold.
        states
            .fence(RESERVED_PRODUCER_IDS + 5, 3, 1)
            .expect("fence");
        assert!(states.expire(i64::MAX / 2).is_empty());
        assert_eq!(states.len(), 1);
    }

    proptest! {
        #[test]
        fn entries_round_trip(epoch in any::<i16>(), ts in any::<i64>(),
                              ranges in proptest::collection::vec((any::<i32>(), any::<i32>(), any::<u64>(), any::<u32>()), 0..=5)) {
            let entry = ProducerEntry {
                epoch,
                last_timestamp_ms: ts,
                batches: ranges.into_iter().map(|(first, last, base_offset, record_count)| SequenceRange { first, last, base_offset, record_count }).collect(),
            };
            prop_assert_eq!(ProducerEntry::decode(&entry.encode()).expect("decode"), entry);
        }

        /// A producer sending batches in order, each retried any number of times (as a client
        /// retries after a lost answer): every batch is appended exactly once, every retry is a
        /// duplicate with the original's offsets.
        #[test]
        fn retries_in_order_append_each_batch_once(sizes in proptest::collection::vec((1u32..20, 0usize..4), 1..40)) {
            let mut states = ProducerStates::default();
            let (mut seq, mut next_offset) = (0i32, 0u64);
            let mut appended = Vec::new();
            for (count, retries) in sizes {
                let b = batch(3, 0, seq, count);
                for attempt in 0..=retries {
                    match states.check(&b) {
                        Check::Append => {
                            prop_assert_eq!(attempt, 0);
                            states.record(&b, next_offset, 0);
                            appended.push(next_offset);
                            next_offset += u64::from(count);
                        }
                        Check::Duplicate(r) => {
                            prop_assert!(attempt > 0);
                            prop_assert_eq!(Some(&r.base_offset), appended.last());
                        }
                        other => prop_assert!(false, "{:?}", other),
                    }
                }
                seq = add_sequence(seq, count);
            }
        }
    }
}
