//! A runner's side of its output topic: the job's idempotent producer, the fencing read
//! barrier, the look for its own results, and writes (see ARCHITECTURE.md "Stream jobs").

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::super::checkpoint::{result_tag, OutputRecord};
use super::super::remote::{self, FENCED};
use super::{PartitionError, Runner, READ_BYTES};
use crate::batch::{NewRecord, ProducerSequence};
use crate::log_reader::{self, FetchRequest};
use crate::partition_replica::PartitionShared;
use crate::producers::RESERVED_PRODUCER_IDS;

impl Runner {
    /// The job writes its output as an idempotent producer of its own: the id is unique to
    /// this incarnation of the job (its offsets partition and the index that created it, in a
    /// range `POST /producers` never reaches), the epoch is the runner's. A new runner fences
    /// each output partition at its epoch before it looks at it, so nothing a deposed runner
    /// still has on its way (a paused process, a write in a socket, a forwarded proposal) can
    /// land after that look; and its own resends are recognised as duplicates.
    pub(super) fn producer(&self) -> Result<(i64, i16), String> {
        let partitions = self.settings.registry.offsets().len().max(1) as u32;
        let home = i64::from(super::super::job_partition(&self.spec.name, partitions));
        let id = RESERVED_PRODUCER_IDS | (home << 48) | (self.uid as i64 & ((1 << 48) - 1));
        let epoch = i16::try_from(self.epoch).map_err(|_| {
            format!(
                "{FENCED}: the job has been taken over {} times, more than a producer epoch counts; delete it and create it again",
                self.epoch
            )
        })?;
        Ok((id, epoch))
    }

    pub(super) fn output_partition(&self, partition: u32) -> Result<Arc<PartitionShared>, String> {
        self.topic(&self.spec.output)?
            .partition(partition)
            .cloned()
            .ok_or_else(|| format!("output partition {partition} is gone"))
    }

    /// Why the output cannot take this job's results any more (deleted, or deleted and
    /// created again: its offsets are not the positions here), if it cannot. Not retried.
    pub(super) fn output_gone(&self) -> Option<String> {
        let expected = self.with_state(|s| s.topic_ids.map(|ids| ids.1)).ok()?;
        match self.settings.registry.get(&self.spec.output) {
            None => Some(format!("output topic '{}' was deleted", self.spec.output)),
            Some(t) if expected.is_some_and(|id| id != t.meta.topic_id) => Some(format!(
                "output topic '{}' was deleted and created again; delete the job and create it again",
                self.spec.output
            )),
            Some(_) => None,
        }
    }

    /// The log end of output `partition` after a barrier through its leader that fences this
    /// job's producer at this runner's epoch (see [`Runner::producer`]).
    pub(super) async fn barrier(&mut self, partition: u32) -> Result<u64, String> {
        let shared = self.output_partition(partition)?;
        let (id, epoch) = self.producer()?;
        let end = if shared.is_led_here() {
            shared
                .fence(id, epoch)
                .await
                .map(|a| a.base_offset)
                .map_err(|e| match e {
                    PartitionError::InvalidProducerEpoch { .. } => format!("{FENCED}: {e}"),
                    e => e.to_string(),
                })?
        } else {
            let leader = self.leader_http(&shared).ok_or("no leader known")?;
            let topic = shared.topic.to_string();
            tokio::task::spawn_blocking(move || {
                remote::barrier(&leader, &topic, partition, Some((id, epoch)))
            })
            .await
            .map_err(|e| e.to_string())??
        };
        self.sequences.entry(partition).or_insert(0);
        Ok(end)
    }

    /// Sequence numbers of this job's results in output `partition` within `[from, end)`.
    pub(super) async fn scan(
        &self,
        partition: u32,
        from: u64,
        end: u64,
    ) -> Result<HashSet<u64>, String> {
        let shared = self.output_partition(partition)?;
        let mut seqs = HashSet::new();
        let mut offset = from.max(shared.log_start_offset());
        while offset < end {
            let records = if shared.hosted && shared.high_watermark() >= end {
                let request = FetchRequest {
                    offset,
                    records_max: usize::MAX,
                    bytes_max: READ_BYTES,
                    wait: Duration::ZERO,
                };
                let storage = &self.settings.storage;
                log_reader::fetch(storage, &shared, &self.settings.metrics, request)
                    .await
                    .map_err(|e| e.to_string())?
                    .records
            } else {
                let leader = self.leader_http(&shared).ok_or("no leader known")?;
                let topic = shared.topic.to_string();
                tokio::task::spawn_blocking(move || {
                    remote::fetch(&leader, &topic, partition, offset, READ_BYTES)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?
            };
            let Some(last) = records.last() else {
                return Err(format!("output partition {partition} ends before {end}"));
            };
            offset = last.offset + 1;
            for record in records.iter().filter(|r| r.offset < end) {
                if let Some((job, uid, seq)) = record.value.as_deref().and_then(result_tag) {
                    if job == self.spec.name && uid == self.uid {
                        seqs.insert(seq);
                    }
                }
            }
        }
        Ok(seqs)
    }

    /// Append `records` to output `partition` through its leader, as the job's producer with
    /// the partition's next sequence numbers; the offset after them. A failed write is sent
    /// again with the same records and numbers (the caller keeps them pending), so whichever
    /// copy lands second is recognised as a duplicate.
    pub(super) async fn publish(
        &mut self,
        partition: u32,
        records: &[OutputRecord],
    ) -> Result<u64, String> {
        let shared = self.output_partition(partition)?;
        let count = records.len() as u64;
        let (id, epoch) = self.producer()?;
        let base_sequence = *self
            .sequences
            .get(&partition)
            .ok_or_else(|| format!("output partition {partition} was not fenced"))?;
        if i64::from(base_sequence) + records.len() as i64 > i64::from(i32::MAX) {
            // A new runner (a new epoch) starts its sequences again.
            return Err(format!(
                "{FENCED}: this runner's sequence numbers on output partition {partition} are used up"
            ));
        }
        let producer = ProducerSequence {
            id,
            epoch,
            base_sequence,
        };
        let (first, last) = (records[0].seq, records[records.len() - 1].seq);
        if let Some(unanswered) = self.unanswered {
            if unanswered.0 == partition && unanswered != (partition, base_sequence, first, last) {
                // Never expected (settle resends the same chunk), and unsafe to go on: a new
                // runner starts over.
                return Err(format!(
                    "{FENCED}: the resend to output partition {partition} is not the write that failed"
                ));
            }
        }
        let written = self.write(&shared, partition, records, producer).await;
        match &written {
            Ok(_) => {
                self.unanswered = None;
                self.sequences
                    .insert(partition, base_sequence + records.len() as i32);
            }
            Err(_) => self.unanswered = Some((partition, base_sequence, first, last)),
        }
        written.map(|first| first + count)
    }

    /// One write of [`Runner::publish`]: the first record's offset.
    pub(super) async fn write(
        &self,
        shared: &Arc<PartitionShared>,
        partition: u32,
        records: &[OutputRecord],
        producer: ProducerSequence,
    ) -> Result<u64, String> {
        if shared.is_led_here() {
            let batch = records
                .iter()
                .map(|r| NewRecord {
                    key: Some(r.key.clone()),
                    value: Some(r.value.clone()),
                })
                .collect();
            return shared
                .append_as(batch, Some(producer))
                .await
                .map(|a| a.base_offset)
                .map_err(|e| match e {
                    // Deposed, or out of step with the partition: a new runner starts over.
                    PartitionError::InvalidProducerEpoch { .. }
                    | PartitionError::OutOfOrderSequence { .. } => format!("{FENCED}: {e}"),
                    e => e.to_string(),
                });
        }
        let leader = self.leader_http(shared).ok_or("no leader known")?;
        let topic = shared.topic.to_string();
        let pairs: Vec<(Bytes, Bytes)> = records
            .iter()
            .map(|r| (r.key.clone(), r.value.clone()))
            .collect();
        tokio::task::spawn_blocking(move || {
            remote::publish(&leader, &topic, partition, &pairs, producer)
        })
        .await
        .map_err(|e| e.to_string())?
    }
}
