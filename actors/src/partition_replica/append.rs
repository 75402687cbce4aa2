//! The write path of a partition replica: proposing an append (or a barrier) and applying
//! committed entries to the log, where offsets are assigned.

use std::sync::atomic::Ordering;

use tokio::sync::oneshot;

use super::{now_ms, Appended, AppliedEntries, PartitionReplica, Payload, PendingAppend};
use crate::batch;
use crate::error::PartitionError;
use crate::producers::Check;
use crate::proposals::Unanswered;
use crate::raft_group::ProposeError;
use crate::storage::{log_state_op, producer_key, record_key, Cf, WriteOp};

/// A barrier's entry: appends nothing (see [`PartitionShared::barrier`]). No batch is this: a
/// batch is at least 61 bytes, and a proposed one starts with a clock reading (see `propose`),
/// whose first byte is 0 for the next eight thousand years.
const BARRIER_ENTRY: &[u8] = b"pubg1 barrier";
/// A fence's entry: [`FENCE_PREFIX`], producer id, epoch and the proposer's clock (for the
/// producer's expiry), big-endian. No batch starts with the prefix (see [`BARRIER_ENTRY`]).
const FENCE_PREFIX: &[u8] = b"pubg1 fence ";
const FENCE_ENTRY_BYTES: usize = 12 + 8 + 2 + 8;

fn fence_entry(id: i64, epoch: i16, at_ms: i64) -> bytes::Bytes {
    let mut out = Vec::with_capacity(FENCE_ENTRY_BYTES);
    out.extend_from_slice(FENCE_PREFIX);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&at_ms.to_be_bytes());
    bytes::Bytes::from(out)
}

/// A barrier's or a fence's entry: not a batch.
fn is_marker(data: &[u8]) -> bool {
    data == BARRIER_ENTRY || data.starts_with(FENCE_PREFIX)
}

fn parse_fence(data: &[u8]) -> Option<(i64, i16, i64)> {
    let rest = data.strip_prefix(FENCE_PREFIX)?;
    if data.len() != FENCE_ENTRY_BYTES {
        return None;
    }
    Some((
        i64::from_be_bytes(rest[0..8].try_into().ok()?),
        i16::from_be_bytes(rest[8..10].try_into().ok()?),
        i64::from_be_bytes(rest[10..18].try_into().ok()?),
    ))
}

impl PartitionReplica {
    /// Encode the records once and propose; the answer comes on the returned channel. A batch's
    /// base offset is set at apply; until then that field (outside the CRC) carries the
    /// proposing leader's clock, the time producer expiry is measured by (a Kafka client's own
    /// timestamps are its clock, not ours).
    pub(super) fn propose(
        &mut self,
        payload: Payload,
    ) -> Result<oneshot::Receiver<Result<Appended, PartitionError>>, PartitionError> {
        let (topic, partition) = (self.shared.topic.to_string(), self.shared.partition);
        if self.storage.is_congested() {
            return Err(PartitionError::Overloaded {
                topic,
                partition,
                reason: format!(
                    "the broker's storage queue holds {} writes",
                    self.storage.queue_depth()
                ),
            });
        }
        let Some(raft) = self.raft.as_mut() else {
            return Err(self.shared.unavailable());
        };
        let bytes = match payload {
            // No records: a barrier (see `BARRIER_ENTRY`).
            Payload::Records { records, .. } if records.is_empty() => {
                bytes::Bytes::from_static(BARRIER_ENTRY)
            }
            // The clock in the base offset field, where the encoder puts it (no copy).
            Payload::Records { records, producer } => {
                let now = now_ms();
                batch::encode_as(now.max(1) as u64, now, &records, producer)?
            }
            Payload::Fence { id, epoch } => fence_entry(id, epoch, now_ms()),
            Payload::Encoded(batch) => batch,
        };
        let mut data = bytes.to_vec();
        if data.len() >= batch::HEADER_BYTES && !is_marker(&data) {
            batch::stamp_proposal(&mut data, now_ms());
        }
        let (id, context) = self.proposals.next_context();
        raft.propose(context, data).map_err(|e| match e {
            ProposeError::NoLeader => PartitionError::NoLeader { topic, partition },
            ProposeError::Dropped => PartitionError::Overloaded {
                topic,
                partition,
                reason: "too much of its log is uncommitted (a follower is slow or a \
                             leadership transfer is under way)"
                    .into(),
            },
        })?;
        let appended_at = raft.is_leader().then(|| raft.last_index());
        let term = raft.term();
        let (reply, receiver) = oneshot::channel();
        let pending = PendingAppend {
            reply,
            bytes: bytes.len() as u64,
        };
        self.proposals.insert(id, pending, appended_at, term);
        Ok(receiver)
    }

    /// Apply committed entries to the log: each non-empty entry is a batch whose base offset is
    /// set here, from the applied log, so every replica assigns the same offsets. Returns the
    /// writes (records + log state + hard state, one atomic batch) and the appends it completes.
    pub(super) fn apply_entries(
        &mut self,
        entries: Vec<raft::prelude::Entry>,
    ) -> (Vec<WriteOp>, AppliedEntries) {
        let mut ops = Vec::new();
        let mut completed = Vec::new();
        let Some((last, last_term)) = entries.last().map(|e| (e.index, e.term)) else {
            let applied = AppliedEntries {
                completed,
                last: None,
            };
            return (ops, applied);
        };
        let log = self.shared.log;
        for entry in entries {
            if entry.data.is_empty() {
                continue; // a new leader's empty entry
            }
            let base_offset = self.state.next_offset;
            let own = self.proposals.own(&entry.context);
            if entry.data.as_ref() == BARRIER_ENTRY {
                if let Some(id) = own {
                    let appended = Appended {
                        base_offset,
                        record_count: 0,
                        leader_epoch: entry.term,
                        duplicate: false,
                    };
                    completed.push((id, Ok(appended)));
                }
                continue;
            }
            if let Some((producer_id, epoch, at_ms)) = parse_fence(&entry.data) {
                let outcome = match self.producers.fence(producer_id, epoch, at_ms) {
                    Ok(state) => {
                        ops.push(WriteOp::Put {
                            cf: Cf::Records,
                            key: producer_key(log, producer_id),
                            value: state.encode(),
                        });
                        Ok(Appended {
                            base_offset,
                            record_count: 0,
                            leader_epoch: entry.term,
                            duplicate: false,
                        })
                    }
                    Err(current) => Err(PartitionError::InvalidProducerEpoch {
                        topic: self.shared.topic.to_string(),
                        partition: self.shared.partition,
                        producer_id,
                        current,
                        got: epoch,
                    }),
                };
                if let Some(id) = own {
                    completed.push((id, outcome));
                }
                continue;
            }
            // Every entry was encoded by `batch::encode` or checked by `batch::check_client_batch`
            // on some replica, and carried with its
            // CRC: one that does not parse is a bug or corruption, and skipping it would make
            // this replica's offsets differ from the others'. Stop instead (the supervisor
            // restarts the replica from durable state).
            // The fixed header fields, read without the CRC pass (`with_base_offset_and_epoch`
            // below checks it before anything is stored); an idempotent batch's are checked
            // first, since they decide whether it is stored at all.
            let Some((proposed_base, producer)) = batch::peek_proposal(&entry.data) else {
                panic!(
                    "committed entry {} of {}/{} is not a valid batch: too short",
                    entry.index, self.shared.topic, self.shared.partition
                )
            };
            if producer.is_idempotent() {
                if let Err(e) = batch::parse_header(&entry.data) {
                    panic!(
                        "committed entry {} of {}/{} is not a valid batch: {e}",
                        entry.index, self.shared.topic, self.shared.partition
                    );
                }
                // Decided here, at apply, from replicated state: every replica decides alike,
                // and a retry that reaches a new leader finds the batch it retries.
                let refused = match self.producers.check(&producer) {
                    Check::Append => None,
                    Check::Duplicate(original) => Some(Ok(Appended {
                        base_offset: original.base_offset,
                        record_count: original.record_count,
                        leader_epoch: entry.term,
                        duplicate: true,
                    })),
                    Check::OutOfOrder { expected, got } => {
                        Some(Err(PartitionError::OutOfOrderSequence {
                            topic: self.shared.topic.to_string(),
                            partition: self.shared.partition,
                            producer_id: producer.id,
                            expected,
                            got,
                        }))
                    }
                    Check::StaleEpoch { current, got } => {
                        Some(Err(PartitionError::InvalidProducerEpoch {
                            topic: self.shared.topic.to_string(),
                            partition: self.shared.partition,
                            producer_id: producer.id,
                            current,
                            got,
                        }))
                    }
                };
                if let Some(outcome) = refused {
                    if let Some(id) = own {
                        completed.push((id, outcome));
                    }
                    continue;
                }
            }
            let stored =
                match batch::with_base_offset_and_epoch(&entry.data, base_offset, entry.term) {
                    Ok(stored) => stored,
                    Err(e) => panic!(
                        "committed entry {} of {}/{} is not a valid batch: {e}",
                        entry.index, self.shared.topic, self.shared.partition
                    ),
                };
            let header = stored.1;
            // The proposer's clock (see `propose`); entries proposed before it was stamped
            // carry 0 there, and their own time instead.
            let proposed_at = match proposed_base {
                0 => header.max_timestamp_ms,
                at => at,
            };
            ops.push(WriteOp::Put {
                cf: Cf::Records,
                key: record_key(log, base_offset),
                value: stored.0,
            });
            if producer.is_idempotent() {
                let state = self.producers.record(&producer, base_offset, proposed_at);
                ops.push(WriteOp::Put {
                    cf: Cf::Records,
                    key: producer_key(log, producer.id),
                    value: state.encode(),
                });
            }
            for id in self.producers.expire(proposed_at) {
                ops.push(WriteOp::Delete {
                    cf: Cf::Records,
                    key: producer_key(log, id),
                });
            }
            self.state.next_offset = header.next_offset();
            self.state.size_bytes += header.size_bytes;
            if let Some(id) = own {
                completed.push((
                    id,
                    Ok(Appended {
                        base_offset,
                        record_count: header.record_count,
                        leader_epoch: entry.term,
                        duplicate: false,
                    }),
                ));
            }
        }
        // Offsets and applied indexes only grow: the pair to `recover_log`'s check on restart.
        assert!(
            last > self.state.applied_index,
            "raft applied an entry twice"
        );
        self.state.applied_index = last;
        ops.push(log_state_op(log, &self.state));
        if let Some(raft) = &self.raft {
            ops.push(raft.hard_state_op());
        }
        self.shared
            .log_size_bytes
            .store(self.state.size_bytes, Ordering::Release);
        let applied = AppliedEntries {
            completed,
            last: Some((last, last_term)),
        };
        (ops, applied)
    }

    /// Appends are durable and applied: the high watermark moves and their clients get offsets;
    /// then the appends those entries decided otherwise are told how.
    pub(super) fn complete(&mut self, applied: AppliedEntries) {
        self.publish_durable(self.state.next_offset);
        if let (Some((_, term)), Some(raft)) = (applied.last, &self.raft) {
            if raft.is_leader() && term == raft.term() {
                self.shared.note_caught_up(term);
            }
        }
        let topic = [self.shared.topic.as_ref()];
        for (id, outcome) in applied.completed {
            let Some(pending) = self.proposals.take(id) else {
                continue;
            };
            if matches!(&outcome, Ok(a) if a.duplicate) {
                self.metrics
                    .produce_duplicates_total
                    .with_label_values(&topic)
                    .inc();
            }
            let appended = match outcome {
                Ok(appended) if appended.record_count > 0 && !appended.duplicate => appended,
                // A barrier, a producer's retry or a refusal: nothing was appended.
                other => {
                    let _ = pending.waiter.reply.send(other);
                    continue;
                }
            };
            let metrics = &self.metrics;
            metrics
                .produce_records_total
                .with_label_values(&topic)
                .inc_by(u64::from(appended.record_count));
            metrics
                .produce_bytes_total
                .with_label_values(&topic)
                .inc_by(pending.waiter.bytes);
            metrics
                .produce_latency_seconds
                .with_label_values(&topic)
                .observe(pending.proposed_at.elapsed().as_secs_f64());
            let _ = pending.waiter.reply.send(Ok(appended));
        }
        let (index, term) = applied.last.unzip();
        let index = index.unwrap_or(self.state.applied_index);
        for (pending, how) in self.proposals.settle(index, term) {
            let _ = pending.waiter.reply.send(Err(self.unanswered(how)));
        }
    }

    pub(super) fn unanswered(&self, how: Unanswered) -> PartitionError {
        let (topic, partition) = (self.shared.topic.to_string(), self.shared.partition);
        match how {
            Unanswered::NotWritten => PartitionError::NotWritten { topic, partition },
            Unanswered::Unknown => PartitionError::OutcomeUnknown { topic, partition },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_entries_round_trip_and_are_never_batches() {
        let entry = fence_entry(1 << 62, 7, 1_796_000_000_000);
        assert_eq!(parse_fence(&entry), Some((1 << 62, 7, 1_796_000_000_000)));
        assert_eq!(parse_fence(BARRIER_ENTRY), None);
        assert_eq!(parse_fence(&entry[..entry.len() - 1]), None);
        let batch = batch::encode(
            0,
            1,
            &[batch::NewRecord {
                key: None,
                value: None,
            }],
        )
        .expect("encode");
        assert_eq!(parse_fence(&batch), None);
    }
}
