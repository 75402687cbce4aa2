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
//! Modules: `shared` ([`PartitionShared`], what readers use without messaging the actor),
//! `install` (a snapshot install's record fetch), `retention` (planning and applying it).
//!
//! Crash safety: handler bodies run under `catch_unwind`; a panic stops this actor only, and the
//! [`crate::broker_supervisor::BrokerSupervisor`] starts a new one, which first waits for the
//! storage queue to drain (a barrier) and then recovers its state from RocksDB. Offsets therefore
//! continue after the last durable batch, with no gap and no reuse.

mod append;
mod gauges;
mod install;
mod quiesce;
mod retention;
mod shared;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::batch::{NewRecord, ProducerSequence};
use crate::error::{PartitionError, StorageError};
use crate::metrics::Metrics;
use crate::producers::ProducerStates;
use crate::proposals::Proposals;
use crate::raft_driver::{self, Driver, RaftDriven};
use crate::raft_group::{RaftGroup, RaftSettings, SnapshotInstall};
use crate::snapshot::{Install, Installed};
use crate::state_machine::Durability;
use crate::storage::{leftover_delete, LogState, Storage, WriteOp};
use crate::topic::{LogId, TopicConfigs};
use crate::transport::{
    ChunkInbound, Cluster, FetchInbound, Outbound, PartitionStatus, QuiesceNotice, RaftInbound,
    Transport,
};

pub use retention::{RetentionPlan, RetentionPlanner};
pub use shared::PartitionShared;

/// Messages a partition actor may hold before senders wait: bounds memory per partition.
pub const PARTITION_MAILBOX_CAPACITY: usize = 1024;

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: u64,
    pub record_count: u32,
    /// Raft term of the committed entry: the term of the leader that appended it (Kafka's
    /// leader epoch). Never decreases along a log.
    pub leader_epoch: u64,
    /// An idempotent producer's retry of a batch already in the log: nothing was appended, and
    /// the offsets are the original batch's.
    pub duplicate: bool,
}

/// Append to the partition; replies once it is durable.
#[derive(Debug)]
pub struct Append {
    pub payload: Payload,
}

/// What an append carries.
#[derive(Debug)]
pub enum Payload {
    /// Records to encode as one batch (none: a barrier), from an idempotent producer if
    /// `producer` is set (checked against the producer's state when the entry is applied).
    Records {
        records: Vec<NewRecord>,
        producer: Option<ProducerSequence>,
    },
    /// A barrier that also fences producer `id` at `epoch` (see
    /// [`crate::producers::ProducerStates::fence`]): appends nothing.
    Fence { id: i64, epoch: i16 },
    /// A v2 batch as a Kafka client sent it, already checked ([`crate::batch::check_client_batch`]):
    /// stored as sent, compressed or not; only its base offset and leader epoch are set, both
    /// outside the CRC.
    Encoded(bytes::Bytes),
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
    done: oneshot::Sender<Result<Installed, StorageError>>,
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
    /// Appends of this incarnation that the entries decided, by proposal id: appended (or found
    /// to be a retry), or refused by the producer checks.
    completed: Vec<(u64, Result<Appended, PartitionError>)>,
    /// The last applied entry's index and term (None if nothing was applied).
    last: Option<(u64, u64)>,
}

pub struct PartitionReplica {
    shared: Arc<PartitionShared>,
    storage: Storage,
    metrics: Arc<Metrics>,
    /// This replica's gauge series; created as it recovers, when they first get values.
    gauges: Option<gauges::ReplicaGauges>,
    configs: TopicConfigs,
    settings: ReplicaSettings,
    /// The partition's Raft voters (broker ids); the first is the preferred leader.
    voters: Vec<u64>,
    supervisor: Recipient<ReplicaStopped>,
    /// The log as applied so far (including applies whose write is still in flight): offsets are
    /// assigned from `next_offset` at apply, identically on every replica.
    /// Invariant: `state.next_offset >= shared.high_watermark`.
    state: LogState,
    /// Idempotent producers' state as of `state.applied_index` (see [`crate::producers`]).
    producers: ProducerStates,
    /// When a snapshot point last carried the producers, and whether a refresh was skipped
    /// since (see `offer_snapshot_point`).
    producers_offered_at: Option<Instant>,
    snapshot_offer_owed: bool,
    /// `None` until recovered from storage; nothing is proposed or applied before.
    raft: Option<RaftGroup>,
    driver: Driver,
    /// Appends proposed through this replica, waiting to be answered.
    proposals: Proposals<PendingAppend>,
    retention_running: bool,
    retention_idle: retention::RetentionIdle,
    crashed: bool,
    /// Raft ticks since start; gauges are refreshed every [`RAFT_GAUGE_TICKS`].
    ticks: u64,
    /// The Raft tick timer; None while the group is quiesced (see `quiesce`).
    ticker: Option<SpawnHandle>,
    /// When something last happened in the group (a proposal, an apply, a role change): a
    /// leader quiesces only after [`quiesce::IDLE_BEFORE_QUIESCE`] of nothing.
    last_active: Instant,
    /// A brand-new group's other replicas leave the first election to the preferred one until
    /// then, unless they hear from a leader first.
    hold_election_until: Option<Instant>,
    /// On a follower: the leader's notice that the group is idle and when it came, while this
    /// replica is still applying up to it; it quiesces once it matches (see `quiesce`).
    quiesce_notice: Option<(QuiesceNotice, Instant)>,
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
            gauges: None,
            configs,
            settings,
            voters,
            supervisor,
            state: LogState::default(),
            producers: ProducerStates::default(),
            producers_offered_at: None,
            snapshot_offer_owed: false,
            raft: None,
            driver: Driver::default(),
            proposals: Proposals::new(),
            retention_running: false,
            retention_idle: Default::default(),
            crashed: false,
            ticks: 0,
            ticker: None,
            last_active: Instant::now(),
            hold_election_until: None,
            quiesce_notice: None,
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

    fn recovered(
        &mut self,
        state: LogState,
        producers: ProducerStates,
        raft: RaftGroup,
        ctx: &mut Context<Self>,
    ) {
        self.producers = producers;
        self.gauges = Some(gauges::ReplicaGauges::new(
            &self.metrics,
            &self.shared.topic,
            self.shared.partition,
        ));
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
        } else if raft.is_fresh() {
            self.hold_election_until =
                Some(Instant::now() + quiesce::fresh_election_hold(&self.settings.timing));
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
        if let Some(gauges) = &self.gauges {
            gauges
                .high_watermark
                .set(self.shared.high_watermark() as i64);
        }
    }

    fn publish_log_gauges(&self) {
        if let Some(gauges) = &self.gauges {
            gauges
                .log_start_offset
                .set(self.state.log_start_offset as i64);
            gauges.log_size_bytes.set(self.state.size_bytes as i64);
        }
    }

    /// Leadership moved. Pending appends stay pending: what the new leader commits of them is
    /// answered with offsets, the rest is settled as the log decides ([`Proposals::settle`]).
    fn role_changed(&mut self) {
        let Some(raft) = &self.raft else { return };
        tracing::info!(topic = %self.shared.topic, partition = self.shared.partition, term = raft.term(), leader = raft.leader_id(), "partition leadership changed");
        let leader_changed = self.shared.leader() != raft.leader_id();
        self.shared.set_leadership(raft.term(), raft.leader_id());
        if let Some(gauges) = &self.gauges {
            gauges.raft_leader.set(raft.leader_id() as i64);
            gauges.raft_term.set(raft.term() as i64);
        }
        let labels = self.labels();
        let labels = [labels[0].as_str(), labels[1].as_str()];
        let metrics = &self.metrics;
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
        if let Some(gauges) = &self.gauges {
            gauges.raft_commit_index.set(raft.commit_index() as i64);
            gauges.raft_applied_index.set(raft.applied_index() as i64);
            gauges
                .raft_follower_lag_entries
                .set(raft.follower_lag() as i64);
        }
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

    fn durability(&self) -> Durability {
        Durability::Replayable
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
        self.last_active = Instant::now();
        self.role_changed();
    }

    fn on_durable(&mut self, applied: Self::Applied) {
        if applied.last.is_some() {
            self.last_active = Instant::now();
        }
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
            let reader = storage.clone();
            let (recovered, producers, raft) = tokio::task::spawn_blocking(move || {
                let recovered = reader.recover_log(log)?;
                let producers = reader.load_producers(log)?;
                let applied = recovered.state.applied_index;
                let persisted = reader.load_raft(log)?;
                let raft = RaftGroup::restore(log, id, &voters, persisted, applied, timing)
                    .map_err(|e| StorageError::Corrupt {
                        what: format!("raft group {}/{}", log.topic_id, log.partition),
                        message: e.to_string(),
                    })?;
                Ok::<_, StorageError>((recovered, producers, raft))
            })
            .await
            .unwrap_or(Err(StorageError::ShutDown))?;
            let state = recovered.state;
            if recovered.leftovers {
                // Batches an interrupted snapshot install wrote past the log's end: not part of
                // the log; gone before it grows over their offsets.
                tracing::info!(
                    ?log,
                    next_offset = state.next_offset,
                    "deleting what an interrupted snapshot install left"
                );
                storage.write(vec![leftover_delete(log, &state)]).await?;
            }
            storage.note_recovered(log, state.applied_index);
            Ok::<_, StorageError>((state, producers, raft))
        };
        ctx.wait(recover.into_actor(self).map(|result, act, ctx| match result {
            Ok((state, producers, raft)) => {
                raft_driver::guarded(act, ctx, |act, ctx| {
                    act.recovered(state, producers, raft, ctx)
                });
            }
            Err(e) => {
                tracing::error!(topic = %act.shared.topic, partition = act.shared.partition, error = %e, "partition recovery failed");
                act.crashed = true;
                ctx.stop();
            }
        }));
        self.start_ticking(ctx);
        ctx.run_interval(self.settings.retention_check_interval, |act, ctx| {
            raft_driver::guarded(act, ctx, Self::check_retention);
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if self.is_quiesced() {
            self.metrics.raft_quiesced_groups.dec();
            self.shared.quiesced.store(false, Ordering::Release);
        }
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
            act.wake(ctx);
            act.last_active = Instant::now();
            let receiver = act.propose(msg.payload)?;
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
        let shared = self.shared.clone();
        Box::pin(async move {
            receiver.await.unwrap_or_else(|_| {
                let (topic, partition) = (shared.topic.to_string(), shared.partition);
                // The actor stopped with the append in flight: because its topic was deleted
                // (what was written went with it), or it crashed and the outcome is unknown.
                Err(if shared.is_retired() {
                    PartitionError::Deleted { topic, partition }
                } else {
                    PartitionError::OutcomeUnknown { topic, partition }
                })
            })
        })
    }
}

impl Handler<RaftInbound> for PartitionReplica {
    type Result = ();

    fn handle(&mut self, msg: RaftInbound, ctx: &mut Self::Context) {
        raft_driver::guarded(self, ctx, |act, ctx| {
            // Any message from another replica means the group is active again, except the
            // answers to the heartbeat a leader sent just before it quiesced.
            if msg.0.get_msg_type() != raft::prelude::MessageType::MsgHeartbeatResponse {
                act.wake(ctx);
                // A notice is the leader's last word before it quiesced; anything after it
                // means the group is busy again.
                act.quiesce_notice = None;
            }
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
