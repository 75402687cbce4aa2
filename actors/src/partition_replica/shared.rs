//! [`PartitionShared`]: the state of one partition every part of the broker reads without
//! messaging its actor (watermarks, leadership, in-sync replicas, the live actor's address).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::Addr;
use tokio::sync::watch;

use super::{Append, Appended, PartitionReplica, Payload};
use crate::batch::{NewRecord, ProducerSequence};
use crate::error::PartitionError;
use crate::topic::LogId;
use crate::transport::PartitionStatus;

/// What the rest of the broker shares with a partition's actor, across its restarts.
///
/// Readers (fetch, describe, metrics) use this directly and never queue behind appends.
#[derive(Debug)]
pub struct PartitionShared {
    pub topic: Arc<str>,
    pub partition: u32,
    pub log: LogId,
    /// The live actor incarnation; `None` while it restarts and after retirement.
    /// A std Mutex: held only to clone or swap the address, never across an await.
    pub(super) addr: Mutex<Option<Addr<PartitionReplica>>>,
    /// Offset after the last durable record; consumers read strictly below it. Only grows.
    /// A watch channel so long-polling fetches wake when it moves instead of polling.
    pub(super) high_watermark: watch::Sender<u64>,
    /// The highest high watermark the partition's leader reported (or this replica had while
    /// leading); only grows. A lagging replica answers a fetch below it as a long poll, not as
    /// out of range.
    pub(super) leader_high_watermark: AtomicU64,
    /// When the leader's last status report arrived. A std Mutex: held only to copy it.
    pub(super) leader_reported_at: Mutex<Option<Instant>>,
    /// First offset still retained; only grows.
    pub(super) log_start_offset: AtomicU64,
    pub(super) log_size_bytes: AtomicU64,
    /// (Raft term, leader's broker id) as this replica last saw them, read and written as one
    /// pair so no reader sees one term's leader with another's term; leader 0 = unknown.
    /// A std Mutex: held only to copy the pair.
    pub(super) leadership: Mutex<(u64, u64)>,
    /// Set while this replica's group is quiesced: idle and fully replicated, so this replica's
    /// high watermark is the leader's.
    pub(super) quiesced: AtomicBool,
    /// Set when the topic is deleted; a retired partition is never restarted.
    pub(super) retired: AtomicBool,
    /// The last term in which this replica, as leader, applied an entry of its own term.
    pub(super) caught_up_term: AtomicU64,
    /// Replicas in sync with the leader, as the leader saw them at its last gauge refresh; empty
    /// when this broker is not the leader. A std Mutex: swapped whole, never held across awaits.
    pub(super) in_sync: Mutex<Vec<u64>>,
    /// The partition's Raft voters; the first is the preferred leader.
    pub replicas: Vec<u64>,
    /// Whether this broker holds a replica (and so runs an actor for it).
    pub hosted: bool,
    /// This broker's id.
    pub(super) broker_id: u64,
}

impl PartitionShared {
    pub fn new(topic: Arc<str>, partition: u32, log: LogId, replicas: Vec<u64>, me: u64) -> Self {
        let hosted = replicas.contains(&me);
        Self {
            topic,
            partition,
            log,
            addr: Mutex::new(None),
            high_watermark: watch::Sender::new(0),
            leader_high_watermark: AtomicU64::new(0),
            leader_reported_at: Mutex::new(None),
            log_start_offset: AtomicU64::new(0),
            log_size_bytes: AtomicU64::new(0),
            leadership: Mutex::new((0, 0)),
            quiesced: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            caught_up_term: AtomicU64::new(0),
            in_sync: Mutex::new(Vec::new()),
            replicas,
            hosted,
            broker_id: me,
        }
    }

    pub fn high_watermark(&self) -> u64 {
        *self.high_watermark.borrow()
    }

    pub fn subscribe_high_watermark(&self) -> watch::Receiver<u64> {
        self.high_watermark.subscribe()
    }

    pub fn log_start_offset(&self) -> u64 {
        self.log_start_offset.load(Ordering::Acquire)
    }

    /// The end of the partition's committed log as far as this broker knows: its own high
    /// watermark, or what the leader last reported, whichever is higher.
    pub fn known_log_end(&self) -> u64 {
        self.leader_high_watermark
            .load(Ordering::Acquire)
            .max(self.high_watermark())
    }

    /// Whether the leader reported how the log stands after `since` (so its report already
    /// covers anything a client had seen by then).
    pub fn leader_reported_since(&self, since: Instant) -> bool {
        self.leader_reported_at
            .lock()
            .ok()
            .and_then(|at| *at)
            .is_some_and(|at| at >= since)
    }

    /// Whether this replica's group is quiesced (its high watermark is then the leader's).
    pub fn is_quiesced(&self) -> bool {
        self.quiesced.load(Ordering::Acquire)
    }

    /// Whether this broker's replica leads the partition (as it last saw it).
    pub fn is_led_here(&self) -> bool {
        self.hosted && self.leader() == self.broker_id
    }

    /// Led here, and this leader has applied an entry of its own term: its high watermark then
    /// covers everything an earlier leader got committed. Until then a new leader's log end
    /// may be behind what readers were told, and an offset past it is not "out of range".
    pub fn is_led_here_caught_up(&self) -> bool {
        let (term, _) = self.leadership();
        self.is_led_here() && self.caught_up_term.load(Ordering::Acquire) == term
    }

    /// This replica, leading, applied an entry of `term`.
    pub(super) fn note_caught_up(&self, term: u64) {
        self.caught_up_term.fetch_max(term, Ordering::AcqRel);
    }

    pub fn log_size_bytes(&self) -> u64 {
        self.log_size_bytes.load(Ordering::Acquire)
    }

    /// The leader's broker id as last seen, 0 when unknown.
    pub fn leader(&self) -> u64 {
        self.leadership().1
    }

    /// (Raft term, leader's broker id) as last seen, consistent with each other.
    pub fn leadership(&self) -> (u64, u64) {
        self.leadership.lock().map(|pair| *pair).unwrap_or((0, 0))
    }

    /// The partition's leader (on another broker) reported how it stands. A broker without a
    /// replica takes all of it; a follower only the in-sync replicas (the rest it knows itself).
    /// Reports from an older term than last seen are ignored.
    pub fn observe_status(&self, status: &PartitionStatus) {
        let (term, _) = self.leadership();
        if status.term < term {
            return;
        }
        self.leader_high_watermark
            .fetch_max(status.high_watermark, Ordering::AcqRel);
        if let Ok(mut at) = self.leader_reported_at.lock() {
            *at = Some(Instant::now());
        }
        if !self.hosted {
            self.set_leadership(status.term, status.leader);
            self.high_watermark.send_if_modified(|hw| {
                let moved = status.high_watermark > *hw;
                *hw = (*hw).max(status.high_watermark);
                moved
            });
            self.log_start_offset
                .fetch_max(status.log_start_offset, Ordering::AcqRel);
            self.log_size_bytes
                .store(status.log_size_bytes, Ordering::Release);
        }
        if let Ok(mut in_sync) = self.in_sync.lock() {
            in_sync.clone_from(&status.in_sync);
        }
    }

    /// A broker without a replica read the partition from its leader (a group poll): what
    /// that answer said of the log counts like a status report's, without its term.
    pub fn observe_remote_read(&self, high_watermark: u64, log_start_offset: u64) {
        if self.hosted {
            return;
        }
        self.leader_high_watermark
            .fetch_max(high_watermark, Ordering::AcqRel);
        self.high_watermark.send_if_modified(|hw| {
            let moved = high_watermark > *hw;
            *hw = (*hw).max(high_watermark);
            moved
        });
        self.log_start_offset
            .fetch_max(log_start_offset, Ordering::AcqRel);
    }

    pub(super) fn set_leadership(&self, term: u64, leader: u64) {
        if let Ok(mut pair) = self.leadership.lock() {
            *pair = (term, leader);
        }
    }

    /// In-sync replicas if this broker leads the partition (None: ask the leader).
    pub fn in_sync(&self) -> Option<Vec<u64>> {
        let in_sync = self.in_sync.lock().ok()?.clone();
        (!in_sync.is_empty()).then_some(in_sync)
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    pub(crate) fn set_addr(&self, addr: Option<Addr<PartitionReplica>>) {
        if let Ok(mut slot) = self.addr.lock() {
            *slot = addr;
        }
    }

    pub(crate) fn addr(&self) -> Option<Addr<PartitionReplica>> {
        self.addr.lock().ok().and_then(|slot| slot.clone())
    }

    pub fn unavailable(&self) -> PartitionError {
        if !self.hosted {
            PartitionError::NotReplica {
                topic: self.topic.to_string(),
                partition: self.partition,
                replicas: self.replicas.clone(),
            }
        } else if self.is_retired() {
            PartitionError::Deleted {
                topic: self.topic.to_string(),
                partition: self.partition,
            }
        } else {
            PartitionError::Restarting {
                topic: self.topic.to_string(),
                partition: self.partition,
            }
        }
    }

    /// A read barrier through the leader: an entry that appends nothing, answered once it is
    /// applied and durable, with `base_offset` = the log's end at that point. Every entry an
    /// earlier leader got committed is below it (a leader commits nothing of an earlier term
    /// before an entry of its own), so a read up to it sees everything that will ever be
    /// committed before it, which a plain read of the high watermark right after a failover
    /// does not.
    pub async fn barrier(&self) -> Result<Appended, PartitionError> {
        self.append(Vec::new()).await
    }

    /// Append `records` as one batch and wait until it is durable.
    pub async fn append(&self, records: Vec<NewRecord>) -> Result<Appended, PartitionError> {
        self.append_as(records, None).await
    }

    /// [`PartitionShared::append`] for an idempotent producer: a retry of a batch the log
    /// already holds is answered with its original offsets and appends nothing.
    pub async fn append_as(
        &self,
        records: Vec<NewRecord>,
        producer: Option<ProducerSequence>,
    ) -> Result<Appended, PartitionError> {
        self.append_payload(Payload::Records { records, producer })
            .await
    }

    /// A barrier ([`PartitionShared::barrier`]) that also fences producer `id` at `epoch`:
    /// once it is answered, no batch of an older epoch of that producer is appended any more.
    /// Refused with [`PartitionError::InvalidProducerEpoch`] if the producer has a newer epoch.
    pub async fn fence(&self, id: i64, epoch: i16) -> Result<Appended, PartitionError> {
        self.append_payload(Payload::Fence { id, epoch }).await
    }

    /// Append a batch a Kafka client encoded (checked with [`crate::batch::check_client_batch`]).
    pub async fn append_encoded(&self, batch: bytes::Bytes) -> Result<Appended, PartitionError> {
        self.append_payload(Payload::Encoded(batch)).await
    }

    async fn append_payload(&self, payload: Payload) -> Result<Appended, PartitionError> {
        let addr = self.addr().ok_or_else(|| self.unavailable())?;
        addr.send(Append { payload })
            .await
            .map_err(|_| self.unavailable())?
    }
}
