//! `PartitionReplica`: the actor that owns this broker's replica of one partition.
//!
//! It owns the partition's Raft group ([`RaftGroup`]). An append is encoded once as a Kafka v2
//! batch (base offset 0) and proposed; committed entries are applied in log order, each getting its
//! offsets from the applied log (`LogState::next_offset`), so every replica assigns the same ones.
//! Raft persistence and the apply of committed entries go to [`Storage`] as one atomic write per
//! Ready; the high watermark moves, and clients get their offsets, only once that write is durable.
//! Proposals keep flowing while a Ready is being written (raft-rs's async-ready API).
//!
//! A follower behind the leader's compacted Raft log is sent a snapshot and fetches the records
//! it lacks from other replicas before acknowledging it (see [`crate::snapshot`]).
//!
//! Crash safety: handler bodies run under `catch_unwind`; a panic stops this actor only, and the
//! [`crate::broker_supervisor::BrokerSupervisor`] starts a new one, which first waits for the
//! storage queue to drain (a barrier) and then recovers its state from RocksDB. Offsets therefore
//! continue after the last durable batch, with no gap and no reuse.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use tokio::sync::{oneshot, watch};

use crate::batch::{self, BatchHeader, NewRecord};
use crate::error::{PartitionError, StorageError};
use crate::metrics::Metrics;
use crate::proposals::{Proposals, Unanswered};
use crate::raft_driver::{self, Driver, RaftDriven};
use crate::raft_group::{ProposeError, RaftGroup, RaftSettings, SnapshotInstall};
use crate::snapshot::{Install, SnapshotChunk, SnapshotData, CHUNK_BYTES_MAX};
use crate::storage::{log_state_op, record_key, Cf, LogState, Replayable, Storage, WriteOp};
use crate::topic::{LogId, TopicConfigs};
use crate::transport::{
    ChunkInbound, Cluster, FetchInbound, Outbound, PartitionStatus, RaftInbound, Transport,
};

/// Messages a partition actor may hold before senders wait: bounds memory per partition.
pub const PARTITION_MAILBOX_CAPACITY: usize = 1024;

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
    addr: Mutex<Option<Addr<PartitionReplica>>>,
    /// Offset after the last durable record; consumers read strictly below it. Only grows.
    /// A watch channel so long-polling fetches wake when it moves instead of polling.
    high_watermark: watch::Sender<u64>,
    /// The highest high watermark the partition's leader reported (or this replica had while
    /// leading); only grows. A lagging replica answers a fetch below it as a long poll, not as
    /// out of range.
    leader_high_watermark: AtomicU64,
    /// When the leader's last status report arrived. A std Mutex: held only to copy it.
    leader_reported_at: Mutex<Option<Instant>>,
    /// First offset still retained; only grows.
    log_start_offset: AtomicU64,
    log_size_bytes: AtomicU64,
    /// (Raft term, leader's broker id) as this replica last saw them, read and written as one
    /// pair so no reader sees one term's leader with another's term; leader 0 = unknown.
    /// A std Mutex: held only to copy the pair.
    leadership: Mutex<(u64, u64)>,
    /// Set when the topic is deleted; a retired partition is never restarted.
    retired: AtomicBool,
    /// Replicas in sync with the leader, as the leader saw them at its last gauge refresh; empty
    /// when this broker is not the leader. A std Mutex: swapped whole, never held across awaits.
    in_sync: Mutex<Vec<u64>>,
    /// The partition's Raft voters; the first is the preferred leader.
    pub replicas: Vec<u64>,
    /// Whether this broker holds a replica (and so runs an actor for it).
    pub hosted: bool,
    /// This broker's id.
    broker_id: u64,
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
            retired: AtomicBool::new(false),
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

    /// Whether this broker's replica leads the partition (as it last saw it).
    pub fn is_led_here(&self) -> bool {
        self.hosted && self.leader() == self.broker_id
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

    fn set_leadership(&self, term: u64, leader: u64) {
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

    /// Append `records` as one batch and wait until it is durable.
    pub async fn append(&self, records: Vec<NewRecord>) -> Result<Appended, PartitionError> {
        let addr = self.addr().ok_or_else(|| self.unavailable())?;
        addr.send(Append { records })
            .await
            .map_err(|_| self.unavailable())?
    }
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: u64,
    pub record_count: u32,
    /// Raft term of the committed entry: the term of the leader that appended it (Kafka's
    /// leader epoch). Never decreases along a log.
    pub leader_epoch: u64,
}

/// Append records to the partition; replies once they are durable.
#[derive(Debug)]
pub struct Append {
    pub records: Vec<NewRecord>,
}

impl Message for Append {
    type Result = Result<Appended, PartitionError>;
}

/// Stop for good (topic deleted), after every write this actor queued is durable.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Retire;

/// Sent to the supervisor when an incarnation stops.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ReplicaStopped {
    pub shared: Arc<PartitionShared>,
    pub crashed: bool,
}

/// Makes the next handled message panic: exercises the crash-restart path in tests.
#[cfg(test)]
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct InjectPanic;

/// Settings every replica of a broker shares.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    pub retention_check_interval: Duration,
    /// This broker's id: its node id in every Raft group.
    pub broker_id: u64,
    pub timing: RaftSettings,
    /// Sends Raft messages to the other replicas.
    pub transport: Transport,
    /// Liveness of the other brokers, for reporting in-sync replicas.
    pub cluster: Cluster,
}

/// How long an append may wait for its entry to commit before the client is told to retry.
const APPEND_COMMIT_WAIT: Duration = Duration::from_secs(5);

/// How long a snapshot fetch may go unanswered before another replica is asked.
const SNAPSHOT_FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before asking again after a replica could not serve a fetch.
const SNAPSHOT_FETCH_RETRY: Duration = Duration::from_millis(200);

/// A snapshot install in progress: the records it needs are being fetched.
struct Installing {
    install: Install,
    done: oneshot::Sender<Result<(Vec<WriteOp>, LogState), StorageError>>,
    /// Id of the outstanding fetch (0: none; ask again after [`SNAPSHOT_FETCH_RETRY`]).
    request: u64,
    /// The replica asked last, and when.
    source: u64,
    asked_at: Instant,
}

/// An append waiting for its entry to be committed and applied.
struct PendingAppend {
    reply: oneshot::Sender<Result<Appended, PartitionError>>,
    bytes: u64,
}

/// What an apply hands on to be answered once it is durable.
pub struct AppliedEntries {
    /// Appends of this incarnation that the entries committed, by proposal id.
    completed: Vec<(u64, Appended)>,
    /// The last applied entry's index and term (None if nothing was applied).
    last: Option<(u64, u64)>,
}

pub struct PartitionReplica {
    shared: Arc<PartitionShared>,
    storage: Storage,
    metrics: Arc<Metrics>,
    configs: TopicConfigs,
    settings: ReplicaSettings,
    /// The partition's Raft voters (broker ids); the first is the preferred leader.
    voters: Vec<u64>,
    supervisor: Recipient<ReplicaStopped>,
    /// The log as applied so far (including applies whose write is still in flight): offsets are
    /// assigned from `next_offset` at apply, identically on every replica.
    /// Invariant: `state.next_offset >= shared.high_watermark`.
    state: LogState,
    /// `None` until recovered from storage; nothing is proposed or applied before.
    raft: Option<RaftGroup>,
    driver: Driver,
    /// Appends proposed through this replica, waiting to be answered.
    proposals: Proposals<PendingAppend>,
    retention_running: bool,
    crashed: bool,
    /// Raft ticks since start; gauges are refreshed every [`RAFT_GAUGE_TICKS`].
    ticks: u64,
    installing: Option<Installing>,
    /// Ids of snapshot fetches, so stale answers are told apart.
    fetch_requests: u64,
}

/// Ticks between refreshes of the commit/apply/follower-lag gauges (cheap, but not per tick).
const RAFT_GAUGE_TICKS: u64 = 10;

impl PartitionReplica {
    pub fn new(
        shared: Arc<PartitionShared>,
        storage: Storage,
        metrics: Arc<Metrics>,
        configs: TopicConfigs,
        settings: ReplicaSettings,
        voters: Vec<u64>,
        supervisor: Recipient<ReplicaStopped>,
    ) -> Self {
        Self {
            shared,
            storage,
            metrics,
            configs,
            settings,
            voters,
            supervisor,
            state: LogState::default(),
            raft: None,
            driver: Driver::default(),
            proposals: Proposals::new(),
            retention_running: false,
            crashed: false,
            ticks: 0,
            installing: None,
            fetch_requests: 0,
        }
    }

    fn labels(&self) -> [String; 2] {
        [
            self.shared.topic.to_string(),
            self.shared.partition.to_string(),
        ]
    }

    /// Take `state` as the log's (recovered, or installed from a snapshot): shared offsets,
    /// sizes and gauges follow. The high watermark moves once the state is durable.
    fn adopt_state(&mut self, state: LogState) {
        self.state = state;
        self.shared
            .log_start_offset
            .store(state.log_start_offset, Ordering::Release);
        self.shared
            .log_size_bytes
            .store(state.size_bytes, Ordering::Release);
        self.publish_log_gauges();
    }

    fn recovered(&mut self, state: LogState, raft: RaftGroup, ctx: &mut Context<Self>) {
        self.adopt_state(state);
        self.publish_durable(state.next_offset);
        let mut raft = raft;
        // A brand-new group elects its preferred replica at once instead of waiting for a
        // timeout: leaders spread as the assignment spreads first replicas.
        // A single-voter group is its own quorum: it need not wait for a timeout either.
        let me = self.settings.broker_id;
        let preferred = raft.is_fresh() && self.voters.first() == Some(&me);
        if preferred || self.voters == [me] {
            raft.campaign();
        }
        self.raft = Some(raft);
        tracing::debug!(topic = %self.shared.topic, partition = self.shared.partition, ?state, "partition recovered");
        raft_driver::drive(self, ctx);
    }

    /// The applied end of the log moved to `next_offset` and is durable: wake readers.
    fn publish_durable(&self, next_offset: u64) {
        self.shared.high_watermark.send_if_modified(|hw| {
            let moved = next_offset > *hw;
            if moved {
                *hw = next_offset;
            }
            moved
        });
        let labels = self.labels();
        let labels = [labels[0].as_str(), labels[1].as_str()];
        self.metrics
            .partition_high_watermark
            .with_label_values(&labels)
            .set(self.shared.high_watermark() as i64);
    }

    fn publish_log_gauges(&self) {
        let labels = self.labels();
        let labels = [labels[0].as_str(), labels[1].as_str()];
        self.metrics
            .partition_log_start_offset
            .with_label_values(&labels)
            .set(self.state.log_start_offset as i64);
        self.metrics
            .partition_log_size_bytes
            .with_label_values(&labels)
            .set(self.state.size_bytes as i64);
    }

    /// Encode the records once, with base offset 0 (the real one is set at apply), and propose;
    /// the answer comes on the returned channel.
    fn propose(
        &mut self,
        records: &[NewRecord],
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
        let bytes = batch::encode(0, now_ms(), records)?;
        let (id, context) = self.proposals.next_context();
        raft.propose(context, bytes.to_vec()).map_err(|e| match e {
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
    fn apply_entries(
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
            // Every entry was encoded by `batch::encode` on some replica and carried with its
            // CRC: one that does not parse is a bug or corruption, and skipping it would make
            // this replica's offsets differ from the others'. Stop instead (the supervisor
            // restarts the replica from durable state).
            let stored = match batch::with_base_offset(&entry.data, base_offset) {
                Ok(stored) => stored,
                Err(e) => panic!(
                    "committed entry {} of {}/{} is not a valid batch: {e}",
                    entry.index, self.shared.topic, self.shared.partition
                ),
            };
            let header = stored.1;
            ops.push(WriteOp::Put {
                cf: Cf::Records,
                key: record_key(log, base_offset),
                value: stored.0,
            });
            self.state.next_offset = header.next_offset();
            self.state.size_bytes += header.size_bytes;
            if let Some(id) = self.proposals.own(&entry.context) {
                completed.push((
                    id,
                    Appended {
                        base_offset,
                        record_count: header.record_count,
                        leader_epoch: entry.term,
                    },
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
    fn complete(&mut self, applied: AppliedEntries) {
        self.publish_durable(self.state.next_offset);
        let topic = [self.shared.topic.as_ref()];
        for (id, appended) in applied.completed {
            let Some(pending) = self.proposals.take(id) else {
                continue;
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

    fn unanswered(&self, how: Unanswered) -> PartitionError {
        let (topic, partition) = (self.shared.topic.to_string(), self.shared.partition);
        match how {
            Unanswered::NotWritten => PartitionError::NotWritten { topic, partition },
            Unanswered::Unknown => PartitionError::OutcomeUnknown { topic, partition },
        }
    }

    /// Leadership moved. Pending appends stay pending: what the new leader commits of them is
    /// answered with offsets, the rest is settled as the log decides ([`Proposals::settle`]).
    fn role_changed(&mut self) {
        let Some(raft) = &self.raft else { return };
        tracing::info!(topic = %self.shared.topic, partition = self.shared.partition, term = raft.term(), leader = raft.leader_id(), "partition leadership changed");
        let leader_changed = self.shared.leader() != raft.leader_id();
        self.shared.set_leadership(raft.term(), raft.leader_id());
        let labels = self.labels();
        let labels = [labels[0].as_str(), labels[1].as_str()];
        let metrics = &self.metrics;
        metrics
            .raft_leader
            .with_label_values(&labels)
            .set(raft.leader_id() as i64);
        metrics
            .raft_term
            .with_label_values(&labels)
            .set(raft.term() as i64);
        if leader_changed {
            metrics
                .raft_leader_changes_total
                .with_label_values(&labels)
                .inc();
        }
        if raft.is_campaigning() {
            metrics
                .raft_elections_total
                .with_label_values(&labels)
                .inc();
        }
    }

    fn publish_raft_gauges(&self) {
        let Some(raft) = &self.raft else { return };
        // A term can change without a change of leader seen by a Ready (a leader re-elected
        // within one Ready): keep the pair fresh.
        self.shared.set_leadership(raft.term(), raft.leader_id());
        let labels = self.labels();
        let labels = [labels[0].as_str(), labels[1].as_str()];
        let metrics = &self.metrics;
        metrics
            .raft_commit_index
            .with_label_values(&labels)
            .set(raft.commit_index() as i64);
        metrics
            .raft_applied_index
            .with_label_values(&labels)
            .set(raft.applied_index() as i64);
        metrics
            .raft_follower_lag_entries
            .with_label_values(&labels)
            .set(raft.follower_lag() as i64);
        if !raft.is_leader() {
            return; // followers learn the in-sync replicas from the leader's status reports
        }
        let window = Duration::from_millis(
            self.settings.timing.tick_ms * self.settings.timing.election_tick as u64,
        );
        let cluster = &self.settings.cluster;
        let in_sync = raft.in_sync_voters(|id| cluster.is_alive(id, window));
        if let Ok(mut shared) = self.shared.in_sync.lock() {
            shared.clone_from(&in_sync);
        }
        let status = PartitionStatus {
            group: self.shared.log,
            term: raft.term(),
            leader: raft.leader_id(),
            high_watermark: self.shared.high_watermark(),
            log_start_offset: self.shared.log_start_offset(),
            log_size_bytes: self.shared.log_size_bytes(),
            in_sync,
        };
        let me = self.settings.broker_id;
        for broker in cluster.brokers.iter().filter(|id| **id != me) {
            // Best effort: a dropped report is replaced by the next one.
            self.settings
                .transport
                .send_to(*broker, Outbound::Status(status.clone()));
        }
    }

    fn expire_pending(&mut self) {
        for pending in self.proposals.expire(APPEND_COMMIT_WAIT) {
            let _ = pending.waiter.reply.send(Err(PartitionError::Timeout {
                topic: self.shared.topic.to_string(),
                partition: self.shared.partition,
                waited_ms: APPEND_COMMIT_WAIT.as_millis() as u64,
            }));
        }
    }

    /// A durable write failed: storage is failed closed, so stop; the supervisor restarts us and
    /// recovery reports the failure for as long as it lasts.
    fn fail_stop(&mut self, ctx: &mut Context<Self>, error: StorageError) {
        tracing::error!(topic = %self.shared.topic, partition = self.shared.partition, error = %error, "partition write failed");
        for pending in self.proposals.drain() {
            let _ = pending.waiter.reply.send(Err(error.clone().into()));
        }
        self.crashed = true;
        ctx.stop();
    }

    /// A handler panicked: stop this incarnation so the supervisor starts a fresh one.
    fn crash(&mut self, ctx: &mut Context<Self>, panic: Box<dyn std::any::Any + Send>) {
        let message = raft_driver::panic_message(&*panic);
        tracing::error!(topic = %self.shared.topic, partition = self.shared.partition, %message, "partition actor crashed; restarting");
        // Whatever was proposed may be in the log: the clients cannot be told more.
        for pending in self.proposals.drain() {
            let _ = pending
                .waiter
                .reply
                .send(Err(PartitionError::OutcomeUnknown {
                    topic: self.shared.topic.to_string(),
                    partition: self.shared.partition,
                }));
        }
        self.crashed = true;
        ctx.stop();
    }

    fn check_retention(&mut self, ctx: &mut Context<Self>) {
        let configs = self.configs;
        if self.retention_running
            || self.raft.is_none()
            || self.installing.is_some()
            || (configs.retention_ms.is_none() && configs.retention_bytes.is_none())
        {
            return;
        }
        self.retention_running = true;
        let storage = self.storage.clone();
        let log = self.shared.log;
        let mut planner =
            RetentionPlanner::new(self.state, self.shared.high_watermark(), configs, now_ms());
        let scan = async move {
            tokio::task::spawn_blocking(move || {
                storage
                    .scan_headers(log, planner.start, |h| planner.offer(h))
                    .map(|()| planner.plan())
            })
            .await
            .unwrap_or(Err(StorageError::ShutDown))
        };
        ctx.spawn(scan.into_actor(self).map(|result, act, _ctx| {
            act.retention_running = false;
            match result {
                Ok(Some(plan)) => act.apply_retention(plan),
                Ok(None) => {}
                Err(e) => tracing::warn!(topic = %act.shared.topic, partition = act.shared.partition, error = %e, "retention scan failed"),
            }
        }));
    }

    fn apply_retention(&mut self, plan: RetentionPlan) {
        let old_start = self.state.log_start_offset;
        // Retention writes the log state as it is in memory. While a Ready is in hand (its
        // write queued, retried on a full queue, or a snapshot being fetched) memory is ahead
        // of what is written, and that write, landing after this one, would put the old log
        // start back over deleted batches. The next check plans again.
        if plan.new_start <= old_start || self.driver.is_busy() {
            return;
        }
        let next = LogState {
            log_start_offset: plan.new_start,
            size_bytes: self.state.size_bytes - plan.freed_bytes,
            ..self.state
        };
        let log = self.shared.log;
        let (from, to) = (record_key(log, old_start), record_key(log, plan.new_start));
        // Replayable like an apply: lost in a crash, retention simply deletes again.
        let ops = Replayable {
            log,
            applied_index: next.applied_index,
            ops: vec![
                WriteOp::DeleteRange {
                    cf: Cf::Records,
                    from: from.clone(),
                    to: to.clone(),
                },
                log_state_op(log, &next),
            ],
        };
        // Readers must stop asking for the range before it disappears.
        self.shared
            .log_start_offset
            .store(plan.new_start, Ordering::Release);
        match self.storage.submit_replayable(Vec::new(), false, ops) {
            Ok(done) => {
                self.state = next;
                self.shared
                    .log_size_bytes
                    .store(next.size_bytes, Ordering::Release);
                self.publish_log_gauges();
                // A snapshot offered from now on says where the log starts now.
                self.offer_snapshot_point();
                tracing::info!(topic = %self.shared.topic, partition = self.shared.partition, from = old_start, to = plan.new_start, freed_bytes = plan.freed_bytes, "retention deleted old batches");
                let storage = self.storage.clone();
                actix::spawn(async move {
                    if matches!(done.await, Ok(Ok(()))) {
                        let _ = tokio::task::spawn_blocking(move || {
                            storage.compact_records(&from, &to)
                        })
                        .await;
                    }
                });
            }
            Err(e) => {
                self.shared
                    .log_start_offset
                    .store(old_start, Ordering::Release);
                tracing::warn!(error = %e, "retention deferred: storage queue refused the delete");
            }
        }
    }
}

impl PartitionReplica {
    /// Start installing the leader's snapshot: fetch the records this replica lacks. Resolves
    /// to the writes that install it; the in-memory log state moves when it resolves.
    ///
    /// First `records` is flushed: this replica's applies so far may live only in the memtable
    /// (they skip the WAL and are replayed from the Raft log after a crash), and the install
    /// deletes that Raft log. Without the flush a kill -9 after the install would lose every
    /// record between the last flush and the install's start, with nothing left to replay.
    fn start_install(
        &mut self,
        snapshot: SnapshotInstall,
    ) -> ResponseActFuture<Self, Result<Vec<WriteOp>, StorageError>> {
        let storage = self.storage.clone();
        let flushed = async move { storage.flush_records().await };
        Box::pin(flushed.into_actor(self).then(move |flushed, act, _ctx| {
            let started = flushed.map(|()| act.fetch_for_install(snapshot));
            match started {
                Ok(fetching) => fetching,
                Err(e) => Box::pin(actix::fut::ready(Err(e))),
            }
        }))
    }

    /// The fetch part of [`PartitionReplica::start_install`], once the applies so far are
    /// flushed: everything from this replica's applied end to the snapshot's.
    fn fetch_for_install(
        &mut self,
        snapshot: SnapshotInstall,
    ) -> ResponseActFuture<Self, Result<Vec<WriteOp>, StorageError>> {
        // The flush holds every apply so far, this log's included.
        self.storage
            .note_durable_applied(self.shared.log, self.state.applied_index);
        let install = SnapshotData::decode(&snapshot.data)
            .and_then(|data| Install::new(self.shared.log, self.state, snapshot.index, data));
        let install = match install {
            Ok(install) => install,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        tracing::info!(topic = %self.shared.topic, partition = self.shared.partition, index = snapshot.index, target = ?install.target(), from_offset = self.state.next_offset, "installing a snapshot: fetching records");
        let (done, receiver) = oneshot::channel();
        let source = install.target().source;
        self.installing = Some(Installing {
            install,
            done,
            request: 0,
            source,
            asked_at: Instant::now(),
        });
        self.fetch_next(source);
        let wait = async move { receiver.await.unwrap_or(Err(StorageError::ShutDown)) };
        Box::pin(wait.into_actor(self).map(move |result, act, _ctx| {
            let (ops, state) = result?;
            act.adopt_state(state);
            // Entries up to the snapshot were not applied here one by one: whether a waiting
            // append is among them cannot be told.
            for pending in act.proposals.skip_to(snapshot.index) {
                let _ = pending.waiter.reply.send(Err(act.unanswered(Unanswered::Unknown)));
            }
            let labels = act.labels();
            let labels = [labels[0].as_str(), labels[1].as_str()];
            act.metrics
                .raft_snapshots_installed_total
                .with_label_values(&labels)
                .inc();
            tracing::info!(topic = %act.shared.topic, partition = act.shared.partition, ?state, "snapshot installed");
            Ok(ops)
        }))
    }

    /// A leader offers its applied state as the snapshot for followers behind its log.
    fn offer_snapshot_point(&mut self) {
        let data = SnapshotData {
            log_start_offset: self.state.log_start_offset,
            next_offset: self.state.next_offset,
            source: self.settings.broker_id,
        };
        let applied_index = self.state.applied_index;
        if let Some(raft) = self.raft.as_mut().filter(|raft| raft.is_leader()) {
            raft.set_snapshot_point(applied_index, data.encode());
        }
    }

    /// Ask `source` for the next records the install needs, or finish it if none are missing.
    fn fetch_next(&mut self, source: u64) {
        self.fetch_requests += 1;
        let (request, me) = (self.fetch_requests, self.settings.broker_id);
        let Some(installing) = self.installing.as_mut() else {
            return;
        };
        match installing.install.request(me, request) {
            Some(fetch) => {
                installing.request = request;
                installing.source = source;
                installing.asked_at = Instant::now();
                // A dropped fetch is retried after SNAPSHOT_FETCH_TIMEOUT.
                self.settings
                    .transport
                    .send_to(source, Outbound::Fetch(fetch));
            }
            None => {
                if let Some(installing) = self.installing.take() {
                    let _ = installing.done.send(installing.install.finish());
                }
            }
        }
    }

    /// The replica to ask after `current` failed: the partition's other voters in turn.
    fn next_source(&self, current: u64) -> u64 {
        let me = self.settings.broker_id;
        let others: Vec<u64> = self.voters.iter().copied().filter(|v| *v != me).collect();
        let at = others.iter().position(|v| *v == current);
        match at {
            Some(i) => others[(i + 1) % others.len()],
            None => others.first().copied().unwrap_or(current),
        }
    }

    /// On every tick: re-ask (another replica) if a fetch went unanswered or failed.
    fn retry_install(&mut self) {
        let Some(installing) = &self.installing else {
            return;
        };
        let wait = if installing.request == 0 {
            SNAPSHOT_FETCH_RETRY
        } else {
            SNAPSHOT_FETCH_TIMEOUT
        };
        if installing.asked_at.elapsed() >= wait {
            let next = self.next_source(installing.source);
            self.fetch_next(next);
        }
    }

    fn chunk_arrived(&mut self, chunk: SnapshotChunk) {
        let Some(installing) = self.installing.as_mut() else {
            return;
        };
        if chunk.request != installing.request || installing.request == 0 {
            return; // an answer to a request given up on
        }
        let before = installing.install.fetched_bytes();
        let outcome = match (chunk.error, chunk.deleted_below) {
            // Retention on the source deleted what this install still needs since the
            // snapshot was made: those committed records are gone there, so this log restarts
            // where the source's starts (as when the snapshot itself says so).
            (Some(error), Some(start)) => installing.install.restart_at(start).ok_or(error),
            (Some(error), None) => Err(error),
            (None, _) => installing.install.offer(&chunk.batches),
        };
        match outcome {
            Ok(_) => {
                let fetched = installing.install.fetched_bytes() - before;
                let source = installing.source;
                let labels = self.labels();
                let labels = [labels[0].as_str(), labels[1].as_str()];
                self.metrics
                    .raft_snapshot_fetched_bytes_total
                    .with_label_values(&labels)
                    .inc_by(fetched);
                self.fetch_next(source);
            }
            Err(why) => {
                tracing::warn!(topic = %self.shared.topic, partition = self.shared.partition, source = installing.source, %why, "snapshot fetch failed; asking another replica");
                installing.request = 0;
                installing.asked_at = Instant::now();
            }
        }
    }

    /// Another replica installing a snapshot asks for records: serve committed ones from
    /// storage, off this actor, and send them back.
    fn serve_fetch(&self, fetch: crate::snapshot::SnapshotFetch) {
        let below = fetch.below.min(self.shared.high_watermark());
        let start = self.shared.log_start_offset();
        let (storage, transport, log) = (
            self.storage.clone(),
            self.settings.transport.clone(),
            self.shared.log,
        );
        actix::spawn(async move {
            let deleted_below = (fetch.offset < start).then_some(start);
            let batches = if fetch.offset < start {
                Err(format!(
                    "offset {} was deleted by retention (log starts at {start})",
                    fetch.offset
                ))
            } else if fetch.offset >= below {
                Err(format!(
                    "this replica has only applied up to offset {below}"
                ))
            } else {
                tokio::task::spawn_blocking(move || {
                    storage.read_batches(log, fetch.offset, below, CHUNK_BYTES_MAX)
                })
                .await
                .unwrap_or(Err(StorageError::ShutDown))
                .map_err(|e| e.to_string())
            };
            let (batches, error) = match batches {
                Ok(batches) => (batches, None),
                Err(error) => (Vec::new(), Some(error)),
            };
            let chunk = SnapshotChunk {
                group: log,
                request: fetch.request,
                batches,
                error,
                deleted_below,
            };
            transport.send_to(fetch.from, Outbound::Chunk(chunk));
        });
    }
}

impl RaftDriven for PartitionReplica {
    type Applied = AppliedEntries;

    fn raft_mut(&mut self) -> Option<&mut RaftGroup> {
        self.raft.as_mut()
    }

    fn driver(&mut self) -> &mut Driver {
        &mut self.driver
    }

    fn group(&self) -> LogId {
        self.shared.log
    }

    fn transport(&self) -> &Transport {
        &self.settings.transport
    }

    fn storage(&self) -> &Storage {
        &self.storage
    }

    fn applied_index(&self) -> u64 {
        self.state.applied_index
    }

    fn replayable_apply(&self) -> bool {
        true
    }

    fn apply(&mut self, entries: Vec<raft::prelude::Entry>) -> (Vec<WriteOp>, Self::Applied) {
        self.apply_entries(entries)
    }

    fn install_snapshot(
        &mut self,
        snapshot: SnapshotInstall,
    ) -> ResponseActFuture<Self, Result<Vec<WriteOp>, StorageError>> {
        self.start_install(snapshot)
    }

    fn on_role_change(&mut self) {
        self.role_changed();
    }

    fn on_durable(&mut self, applied: Self::Applied) {
        self.complete(applied);
        self.offer_snapshot_point();
    }

    fn on_failure(&mut self, ctx: &mut Context<Self>, error: StorageError) {
        self.fail_stop(ctx, error);
    }

    fn on_panic(&mut self, ctx: &mut Context<Self>, panic: Box<dyn std::any::Any + Send>) {
        self.crash(ctx, panic);
    }
}

impl Actor for PartitionReplica {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(PARTITION_MAILBOX_CAPACITY);
        let storage = self.storage.clone();
        let log = self.shared.log;
        let (id, voters, timing) = (
            self.settings.broker_id,
            self.voters.clone(),
            self.settings.timing,
        );
        // Writes a previous incarnation queued must land before its state is read back; the
        // reads are blocking RocksDB work, so they run on the blocking pool, not this arbiter.
        let recover = async move {
            storage.barrier_patiently().await?;
            tokio::task::spawn_blocking(move || {
                let state = storage.recover_log(log)?;
                storage.note_recovered(log, state.applied_index);
                let persisted = storage.load_raft(log)?;
                let raft =
                    RaftGroup::restore(log, id, &voters, persisted, state.applied_index, timing)
                        .map_err(|e| StorageError::Corrupt {
                            what: format!("raft group {}/{}", log.topic_id, log.partition),
                            message: e.to_string(),
                        })?;
                Ok::<_, StorageError>((state, raft))
            })
            .await
            .unwrap_or(Err(StorageError::ShutDown))
        };
        ctx.wait(recover.into_actor(self).map(|result, act, ctx| match result {
            Ok((state, raft)) => {
                raft_driver::guarded(act, ctx, |act, ctx| act.recovered(state, raft, ctx));
            }
            Err(e) => {
                tracing::error!(topic = %act.shared.topic, partition = act.shared.partition, error = %e, "partition recovery failed");
                act.crashed = true;
                ctx.stop();
            }
        }));
        ctx.run_interval(
            Duration::from_millis(self.settings.timing.tick_ms),
            |act, ctx| {
                raft_driver::guarded(act, ctx, |act, ctx| {
                    let Some(raft) = act.raft.as_mut() else {
                        return;
                    };
                    raft.tick();
                    act.ticks += 1;
                    if act.ticks % RAFT_GAUGE_TICKS == 0 {
                        act.publish_raft_gauges();
                        act.expire_pending();
                    }
                    act.retry_install();
                    raft_driver::drive(act, ctx);
                });
            },
        );
        ctx.run_interval(self.settings.retention_check_interval, |act, ctx| {
            raft_driver::guarded(act, ctx, Self::check_retention);
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.supervisor.do_send(ReplicaStopped {
            shared: self.shared.clone(),
            crashed: self.crashed,
        });
    }
}

impl Handler<Append> for PartitionReplica {
    type Result = ResponseFuture<Result<Appended, PartitionError>>;

    fn handle(&mut self, msg: Append, ctx: &mut Self::Context) -> Self::Result {
        let proposed = raft_driver::guarded(self, ctx, |act, ctx| {
            let receiver = act.propose(&msg.records)?;
            raft_driver::drive(act, ctx);
            Ok(receiver)
        });
        let receiver = match proposed {
            Some(Ok(receiver)) => receiver,
            Some(Err(e)) => return Box::pin(async move { Err(e) }),
            None => {
                let error = PartitionError::OutcomeUnknown {
                    topic: self.shared.topic.to_string(),
                    partition: self.shared.partition,
                };
                return Box::pin(async move { Err(error) });
            }
        };
        let gone = PartitionError::OutcomeUnknown {
            topic: self.shared.topic.to_string(),
            partition: self.shared.partition,
        };
        Box::pin(async move { receiver.await.unwrap_or(Err(gone)) })
    }
}

impl Handler<RaftInbound> for PartitionReplica {
    type Result = ();

    fn handle(&mut self, msg: RaftInbound, ctx: &mut Self::Context) {
        raft_driver::guarded(self, ctx, |act, ctx| {
            if let Some(raft) = act.raft.as_mut() {
                raft.step(msg.0);
                raft_driver::drive(act, ctx);
            }
        });
    }
}

impl Handler<FetchInbound> for PartitionReplica {
    type Result = ();

    fn handle(&mut self, msg: FetchInbound, ctx: &mut Self::Context) {
        raft_driver::guarded(self, ctx, |act, _ctx| act.serve_fetch(msg.0));
    }
}

impl Handler<ChunkInbound> for PartitionReplica {
    type Result = ();

    fn handle(&mut self, msg: ChunkInbound, ctx: &mut Self::Context) {
        raft_driver::guarded(self, ctx, |act, _ctx| act.chunk_arrived(msg.0));
    }
}

impl Handler<Retire> for PartitionReplica {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _msg: Retire, _ctx: &mut Self::Context) -> Self::Result {
        self.shared.retire();
        let storage = self.storage.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let _ = storage.barrier_patiently().await;
            }
            .into_actor(self)
            .map(|(), _act, ctx| ctx.stop()),
        ))
    }
}

#[cfg(test)]
impl Handler<InjectPanic> for PartitionReplica {
    type Result = ();

    fn handle(&mut self, _msg: InjectPanic, ctx: &mut Self::Context) {
        raft_driver::guarded(self, ctx, |_act, _ctx| panic!("injected by test"));
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Which prefix of a log retention deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPlan {
    pub new_start: u64,
    pub freed_bytes: u64,
}

/// Walks batches from the log start and decides, batch by batch, whether retention deletes it.
/// Pure, so the rule is unit-tested without a store: a batch goes if it is durable and either
/// older than `retention.ms` or the log stays at least `retention.bytes` without it.
#[derive(Debug, Clone)]
pub struct RetentionPlanner {
    start: u64,
    new_start: u64,
    size_after: u64,
    freed_bytes: u64,
    durable_end: u64,
    cutoff_ms: Option<i64>,
    bytes_min: Option<u64>,
}

impl RetentionPlanner {
    pub fn new(state: LogState, durable_end: u64, configs: TopicConfigs, now_ms: i64) -> Self {
        Self {
            start: state.log_start_offset,
            new_start: state.log_start_offset,
            size_after: state.size_bytes,
            freed_bytes: 0,
            durable_end,
            cutoff_ms: configs
                .retention_ms
                .map(|ms| now_ms.saturating_sub(ms as i64)),
            bytes_min: configs.retention_bytes,
        }
    }

    /// Offer the next batch; true if it is deleted and the walk should go on.
    pub fn offer(&mut self, header: &BatchHeader) -> bool {
        if header.next_offset() > self.durable_end || header.size_bytes > self.size_after {
            return false;
        }
        let expired = self
            .cutoff_ms
            .is_some_and(|cutoff| header.max_timestamp_ms < cutoff);
        let oversize = self
            .bytes_min
            .is_some_and(|min| self.size_after - header.size_bytes >= min);
        if !(expired || oversize) {
            return false;
        }
        self.size_after -= header.size_bytes;
        self.freed_bytes += header.size_bytes;
        self.new_start = header.next_offset();
        true
    }

    pub fn plan(&self) -> Option<RetentionPlan> {
        (self.new_start > self.start).then_some(RetentionPlan {
            new_start: self.new_start,
            freed_bytes: self.freed_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(
        configs: TopicConfigs,
        durable_end: u64,
        now: i64,
        batches: &[BatchHeader],
    ) -> Option<RetentionPlan> {
        let size = batches.iter().map(|b| b.size_bytes).sum();
        let state = LogState {
            log_start_offset: batches[0].base_offset,
            next_offset: durable_end,
            size_bytes: size,
            applied_index: 0,
        };
        let mut planner = RetentionPlanner::new(state, durable_end, configs, now);
        for b in batches {
            if !planner.offer(b) {
                break;
            }
        }
        planner.plan()
    }

    const LOG: [BatchHeader; 3] = [
        BatchHeader {
            base_offset: 0,
            size_bytes: 100,
            record_count: 10,
            max_timestamp_ms: 1_000,
        },
        BatchHeader {
            base_offset: 10,
            size_bytes: 100,
            record_count: 5,
            max_timestamp_ms: 2_000,
        },
        BatchHeader {
            base_offset: 15,
            size_bytes: 100,
            record_count: 5,
            max_timestamp_ms: 3_000,
        },
    ];

    #[test]
    fn time_retention_deletes_batches_older_than_the_cutoff() {
        let configs = TopicConfigs {
            retention_ms: Some(1_500),
            retention_bytes: None,
        };
        // now 3_600: cutoff 2_100, so batches with max timestamps 1_000 and 2_000 go; now 2_600:
        // cutoff 1_100, only the first; now 2_000: cutoff 500, none.
        assert_eq!(
            plan(configs, 20, 3_600, &LOG),
            Some(RetentionPlan {
                new_start: 15,
                freed_bytes: 200
            })
        );
        assert_eq!(
            plan(configs, 20, 2_600, &LOG),
            Some(RetentionPlan {
                new_start: 10,
                freed_bytes: 100
            })
        );
        assert_eq!(plan(configs, 20, 2_000, &LOG), None);
    }

    #[test]
    fn size_retention_keeps_at_least_the_limit() {
        let configs = TopicConfigs {
            retention_ms: None,
            retention_bytes: Some(150),
        };
        // 300 bytes: dropping one leaves 200 >= 150, dropping two would leave 100 < 150.
        assert_eq!(
            plan(configs, 20, 0, &LOG),
            Some(RetentionPlan {
                new_start: 10,
                freed_bytes: 100
            })
        );
        let exact = TopicConfigs {
            retention_ms: None,
            retention_bytes: Some(100),
        };
        assert_eq!(
            plan(exact, 20, 0, &LOG),
            Some(RetentionPlan {
                new_start: 15,
                freed_bytes: 200
            })
        );
    }

    #[test]
    fn nothing_past_the_durable_end_is_touched() {
        let configs = TopicConfigs {
            retention_ms: Some(1),
            retention_bytes: None,
        };
        assert_eq!(
            plan(configs, 14, 1_000_000, &LOG),
            Some(RetentionPlan {
                new_start: 10,
                freed_bytes: 100
            })
        );
        assert_eq!(
            plan(configs, 20, 1_000_000, &LOG),
            Some(RetentionPlan {
                new_start: 20,
                freed_bytes: 300
            })
        );
    }
}
