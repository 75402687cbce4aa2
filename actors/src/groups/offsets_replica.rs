//! `OffsetsReplica`: one replica of one partition of the internal offsets topic, the Raft group
//! that holds its groups' committed offsets ([`OffsetsMachine`]), and — on the partition's
//! leader — the home of its groups' [`GroupCoordinator`]s.
//!
//! Placement is a pure function of the cluster's broker list (which every broker has from its
//! seeds): partition `p` is replicated on `min(3, brokers)` consecutive brokers starting at
//! broker `p`, and group `g` lives on partition `murmur2(g) % partitions`. No catalog entry is
//! needed, so the topic exists from a cluster's first start and never shows in topic listings.
//!
//! A coordinator serves only once this replica leads and has applied an entry of its own term
//! (everything an earlier leader committed is then in its state); it starts from the applied
//! state of its group. Losing leadership stops every coordinator here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::coordinator::{CoordinatorSettings, GroupCoordinator, StopCoordinator};
use super::error::GroupError;
use super::offsets_machine::{GroupApplied, GroupCommand, GroupState, OffsetsMachine};
use crate::broker_supervisor::Backoff;
use crate::error::StorageError;
use crate::metrics::Metrics;
use crate::partitioner::partition_for_key;
use crate::proposals::{Proposals, Unanswered};
use crate::raft_driver::{self, Driver, RaftDriven};
use crate::raft_group::{RaftGroup, RaftSettings, SnapshotInstall};
use crate::registry::Registry;
use crate::state_machine::{apply_committed, Durability, StateMachine};
use crate::storage::{Storage, WriteOp};
use crate::topic::LogId;
use crate::transport::{Cluster, RaftInbound, Transport};

mod jobs;

/// The offsets topic's name (in metrics and docs; it is not in the catalog).
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Topic id of the offsets topic's Raft groups: catalog ids count up from 1 and never get here.
pub const OFFSETS_TOPIC_ID: u32 = u32::MAX;
/// How long a proposal waits to commit before its client is told the outcome is unknown.
const COMMIT_WAIT: Duration = Duration::from_secs(10);
/// How often the leader refreshes the snapshot it offers followers behind its compacted log.
const SNAPSHOT_REFRESH: Duration = Duration::from_secs(1);

pub fn offsets_log(partition: u32) -> LogId {
    LogId {
        topic_id: OFFSETS_TOPIC_ID,
        partition,
    }
}

/// The replicas of offsets partition `partition`: `min(3, n)` consecutive brokers from the
/// `partition`-th, so preferred leaders spread over the cluster.
pub fn offsets_replicas(brokers: &[u64], partition: u32) -> Vec<u64> {
    let n = brokers.len();
    (0..n.min(3))
        .map(|k| brokers[(partition as usize + k) % n])
        .collect()
}

/// The offsets partition of `group` (Kafka's partitioner over the group name).
pub fn group_partition(group: &str, partitions: u32) -> u32 {
    partition_for_key(group.as_bytes(), partitions)
}

/// What the rest of the broker reads about one offsets partition without messaging its actor.
#[derive(Debug)]
pub struct OffsetsShared {
    pub partition: u32,
    pub replicas: Vec<u64>,
    pub hosted: bool,
    /// (term, leader) as this broker last saw them; leader 0 = unknown.
    leadership: Mutex<(u64, u64)>,
    addr: Mutex<Option<Addr<OffsetsReplica>>>,
}

impl OffsetsShared {
    pub fn new(partition: u32, replicas: Vec<u64>, me: u64) -> Self {
        Self {
            partition,
            hosted: replicas.contains(&me),
            replicas,
            leadership: Mutex::new((0, 0)),
            addr: Mutex::new(None),
        }
    }

    pub fn leader(&self) -> u64 {
        self.leadership.lock().map(|l| l.1).unwrap_or(0)
    }

    fn set_leadership(&self, term: u64, leader: u64) {
        if let Ok(mut l) = self.leadership.lock() {
            *l = (term, leader);
        }
    }

    pub fn addr(&self) -> Option<Addr<OffsetsReplica>> {
        self.addr.lock().ok().and_then(|a| a.clone())
    }

    fn set_addr(&self, addr: Option<Addr<OffsetsReplica>>) {
        if let Ok(mut slot) = self.addr.lock() {
            *slot = addr;
        }
    }
}

/// Propose a group command (only while this replica serves as its groups' coordinator home);
/// resolves once it is applied (and durable) here, with a takeover's group state.
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<GroupState>, GroupError>")]
pub struct ProposeGroup(pub GroupCommand);

/// The coordinator of `group`. With `create`, one is started if none runs (creating a
/// consumer instance); without, a group nobody coordinates answers with its stored state, or
/// [`GroupError::UnknownGroup`] — so a request naming a made-up group creates nothing.
#[derive(Debug, Message)]
#[rtype(result = "Result<Coordinated, GroupError>")]
pub struct Coordinate {
    pub group: String,
    pub create: bool,
}

/// Where a group stands on its coordinator broker.
#[derive(Debug)]
pub enum Coordinated {
    Running(Addr<GroupCoordinator>),
    /// No coordinator runs (no instance since this broker took the partition over); the
    /// group's committed state.
    Stored(GroupState),
}

/// Every group this replica's applied state holds, with its state.
#[derive(Debug, Message)]
#[rtype(result = "Vec<(String, GroupState)>")]
pub struct ListGroups;

type Reply = oneshot::Sender<Result<Option<GroupState>, GroupError>>;

/// The broker-wide handles an offsets replica works with.
#[derive(Debug, Clone)]
pub struct OffsetsWiring {
    pub storage: Storage,
    pub registry: Registry,
    pub cluster: Cluster,
    pub transport: Transport,
    pub metrics: Arc<Metrics>,
    pub timing: RaftSettings,
    pub coordinator: CoordinatorSettings,
}

pub struct OffsetsReplica {
    wiring: OffsetsWiring,
    shared: Arc<OffsetsShared>,
    log: LogId,
    machine: OffsetsMachine,
    /// Term of the last entry applied since the last [`OffsetsReplica::announce`].
    applied_term: Option<u64>,
    /// The term of the last applied entry: coordinators serve once it is the leader's own.
    last_applied_term: u64,
    raft: Option<RaftGroup>,
    driver: Driver,
    proposals: Proposals<Reply>,
    coordinators: HashMap<String, Addr<GroupCoordinator>>,
    /// Stream jobs run here (see `jobs`).
    jobs: HashMap<String, jobs::RunningJob>,
    snapshot_at: Option<(u64, Instant)>,
    crashed: bool,
    restarts: Backoff,
}

impl OffsetsReplica {
    pub fn new(wiring: OffsetsWiring, shared: Arc<OffsetsShared>) -> Self {
        let log = offsets_log(shared.partition);
        Self {
            wiring,
            machine: OffsetsMachine::new(log),
            shared,
            log,
            applied_term: None,
            last_applied_term: 0,
            raft: None,
            driver: Driver::default(),
            proposals: Proposals::new(),
            coordinators: HashMap::new(),
            jobs: HashMap::new(),
            snapshot_at: None,
            crashed: false,
            restarts: Backoff::default(),
        }
    }

    fn label(&self) -> [String; 2] {
        [OFFSETS_TOPIC.to_owned(), self.shared.partition.to_string()]
    }

    fn not_coordinator(&self, group: &str) -> GroupError {
        GroupError::NotCoordinator {
            group: group.to_owned(),
            me: self.wiring.cluster.self_id,
            leader: self.raft.as_ref().map_or(0, RaftGroup::leader_id),
            replicas: self.shared.replicas.clone(),
        }
    }

    /// Whether coordinators may serve here: this replica leads, and has applied an entry of
    /// its own term (so every entry of earlier terms is in its state).
    fn serving(&self) -> bool {
        self.raft
            .as_ref()
            .is_some_and(|raft| raft.is_leader() && self.last_applied_term == raft.term())
    }

    fn propose(
        &mut self,
        command: &GroupCommand,
        ctx: &mut Context<Self>,
    ) -> oneshot::Receiver<Result<Option<GroupState>, GroupError>> {
        let (reply, receiver) = oneshot::channel();
        let group = command_group(command).to_owned();
        let data = match rmp_serde::to_vec_named(command) {
            Ok(data) => data,
            Err(e) => {
                let _ = reply.send(Err(GroupError::Storage(StorageError::Corrupt {
                    what: "group command".into(),
                    message: e.to_string(),
                })));
                return receiver;
            }
        };
        let Some(raft) = self.raft.as_mut() else {
            let _ = reply.send(Err(GroupError::NotWritten(group)));
            return receiver;
        };
        let (id, context) = self.proposals.next_context();
        if raft.propose(context, data).is_err() {
            let _ = reply.send(Err(GroupError::NotWritten(group)));
            return receiver;
        }
        let appended_at = raft.is_leader().then(|| raft.last_index());
        let term = raft.term();
        self.proposals.insert(id, reply, appended_at, term);
        raft_driver::guarded(self, ctx, raft_driver::drive);
        receiver
    }

    fn apply_entries(
        &mut self,
        entries: Vec<raft::prelude::Entry>,
    ) -> (Vec<WriteOp>, Vec<(Option<u64>, GroupApplied)>) {
        let proposals = &self.proposals;
        let applied = apply_committed(&mut self.machine, entries, |c| proposals.own(c));
        let mut ops = applied.ops;
        if let Some((_, term)) = applied.last {
            self.applied_term = Some(term);
            self.last_applied_term = term;
            if let Some(raft) = &self.raft {
                ops.push(raft.hard_state_op());
            }
        }
        (ops, applied.effects)
    }

    fn announce(&mut self, results: Vec<(Option<u64>, GroupApplied)>) {
        for (own, result) in results {
            if let Some(pending) = own.and_then(|id| self.proposals.take(id)) {
                let _ = pending.waiter.send(result.map_err(GroupError::from));
            }
        }
        let term = std::mem::take(&mut self.applied_term);
        for (pending, how) in self.proposals.settle(self.machine.applied_index(), term) {
            let error = match how {
                Unanswered::NotWritten => GroupError::NotWritten(String::new()),
                Unanswered::Unknown => GroupError::OutcomeUnknown(String::new()),
            };
            let _ = pending.waiter.send(Err(error));
        }
    }

    /// Offer the applied state as the snapshot for followers behind the compacted log, at
    /// most once a [`SNAPSHOT_REFRESH`] (it encodes every group of the partition). The state
    /// in memory is the durable one when an apply just became durable (`durable`: Synced
    /// applies are fsync'd with their Ready), or when no Ready is in flight.
    fn refresh_snapshot(&mut self, durable: bool) {
        let index = self.machine.applied_index();
        let due = match self.snapshot_at {
            None => true,
            Some((at, when)) => at < index && when.elapsed() >= SNAPSHOT_REFRESH,
        };
        if !due || (!durable && self.driver.is_busy()) {
            return;
        }
        if let Some(raft) = self.raft.as_mut().filter(|raft| raft.is_leader()) {
            raft.set_snapshot_point(index, self.machine.snapshot());
            self.snapshot_at = Some((index, Instant::now()));
        }
    }

    fn role_changed(&mut self) {
        let Some(raft) = &self.raft else { return };
        let (term, leader) = (raft.term(), raft.leader_id());
        self.shared.set_leadership(term, leader);
        let labels = self.label();
        let labels = [labels[0].as_str(), labels[1].as_str()];
        let metrics = &self.wiring.metrics;
        metrics
            .raft_leader
            .with_label_values(&labels)
            .set(leader as i64);
        metrics
            .raft_term
            .with_label_values(&labels)
            .set(term as i64);
        metrics
            .raft_leader_changes_total
            .with_label_values(&labels)
            .inc();
        if !raft.is_leader() {
            self.stop_coordinators("this broker no longer leads the group's offsets partition");
            self.stop_jobs();
        } else {
            self.snapshot_at = None;
        }
        tracing::info!(
            partition = self.shared.partition,
            term,
            leader,
            "offsets partition leadership changed"
        );
    }

    fn stop_coordinators(&mut self, reason: &'static str) {
        for (_, coordinator) in self.coordinators.drain() {
            coordinator.do_send(StopCoordinator { reason });
        }
    }

    fn fail_all(&mut self, error: &GroupError) {
        for pending in self.proposals.drain() {
            let _ = pending.waiter.send(Err(error.clone()));
        }
    }
}

fn command_group(command: &GroupCommand) -> &str {
    match command {
        GroupCommand::Generation { group, .. }
        | GroupCommand::Commit { group, .. }
        | GroupCommand::DeleteGroup { group } => group,
        GroupCommand::Job(command) => command.job(),
    }
}

impl RaftDriven for OffsetsReplica {
    type Applied = Vec<(Option<u64>, GroupApplied)>;

    fn raft_mut(&mut self) -> Option<&mut RaftGroup> {
        self.raft.as_mut()
    }

    fn driver(&mut self) -> &mut Driver {
        &mut self.driver
    }

    fn group(&self) -> LogId {
        self.log
    }

    fn transport(&self) -> &Transport {
        &self.wiring.transport
    }

    fn storage(&self) -> &Storage {
        &self.wiring.storage
    }

    fn applied_index(&self) -> u64 {
        self.machine.applied_index()
    }

    fn durability(&self) -> Durability {
        OffsetsMachine::DURABILITY
    }

    fn install_snapshot(
        &mut self,
        snapshot: SnapshotInstall,
    ) -> ResponseActFuture<Self, Result<Vec<WriteOp>, StorageError>> {
        let labels = self.label();
        self.wiring
            .metrics
            .raft_snapshots_installed_total
            .with_label_values(&[labels[0].as_str(), labels[1].as_str()])
            .inc();
        let installed = self
            .machine
            .restore(snapshot.index, &snapshot.data)
            .map(|(ops, _)| {
                for pending in self.proposals.skip_to(snapshot.index) {
                    let _ = pending
                        .waiter
                        .send(Err(GroupError::OutcomeUnknown(String::new())));
                }
                ops
            });
        Box::pin(actix::fut::ready(installed))
    }

    fn apply(&mut self, entries: Vec<raft::prelude::Entry>) -> (Vec<WriteOp>, Self::Applied) {
        self.apply_entries(entries)
    }

    fn on_role_change(&mut self) {
        self.role_changed();
    }

    fn on_durable(&mut self, applied: Self::Applied) {
        self.announce(applied);
        self.refresh_snapshot(true);
        self.sync_jobs();
    }

    fn on_failure(&mut self, _ctx: &mut Context<Self>, error: StorageError) {
        tracing::error!(error = %error, partition = self.shared.partition, "offsets write failed");
        self.fail_all(&GroupError::Storage(error));
        self.stop_coordinators("the broker's storage failed");
        self.stop_jobs();
    }

    fn on_panic(&mut self, ctx: &mut Context<Self>, panic: Box<dyn std::any::Any + Send>) {
        let message = raft_driver::panic_message(&*panic);
        tracing::error!(%message, partition = self.shared.partition, "offsets replica crashed; restarting from durable state");
        self.fail_all(&GroupError::OutcomeUnknown(String::new()));
        self.stop_coordinators("the offsets replica restarted");
        self.stop_jobs();
        self.wiring
            .metrics
            .actor_restarts_total
            .with_label_values(&["offsets"])
            .inc();
        self.crashed = true;
        ctx.stop();
    }
}

/// Restarted by an actix `Supervisor` at the same address; `started` then reloads everything
/// from durable state.
impl actix::Supervised for OffsetsReplica {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.raft = None;
        self.driver = Driver::default();
        self.proposals = Proposals::new();
        self.applied_term = None;
        self.last_applied_term = 0;
        self.snapshot_at = None;
    }
}

impl Actor for OffsetsReplica {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.shared.set_addr(Some(ctx.address()));
        let crashed = std::mem::take(&mut self.crashed);
        if crashed {
            let delay = self.restarts.next_delay();
            ctx.wait(actix::fut::wrap_future(tokio::time::sleep(delay)));
        }
        self.recover(ctx, crashed);
        let tick = Duration::from_millis(self.wiring.timing.tick_ms);
        ctx.run_interval(tick, |act, ctx| {
            raft_driver::guarded(act, ctx, |act, ctx| {
                if let Some(raft) = act.raft.as_mut() {
                    raft.tick();
                    raft_driver::drive(act, ctx);
                }
            });
        });
        ctx.run_interval(Duration::from_secs(1), |act, _ctx| {
            for pending in act.proposals.expire(COMMIT_WAIT) {
                let _ = pending
                    .waiter
                    .send(Err(GroupError::OutcomeUnknown(String::new())));
            }
            act.coordinators.retain(|_, addr| addr.connected());
            act.refresh_snapshot(false);
            act.sync_jobs();
            act.refresh_job_gauges();
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.stop_coordinators("the broker is shutting down");
        self.stop_jobs();
    }
}

impl OffsetsReplica {
    /// Load the machine and the Raft group from RocksDB (after a crash, once the crashed
    /// incarnation's writes are in) and start driving the group.
    fn recover(&mut self, ctx: &mut Context<Self>, crashed: bool) {
        let storage = self.wiring.storage.clone();
        let (log, me, voters, timing) = (
            self.log,
            self.wiring.cluster.self_id,
            self.shared.replicas.clone(),
            self.wiring.timing,
        );
        let recover = async move {
            if crashed {
                storage.barrier_patiently().await?;
            }
            tokio::task::spawn_blocking(move || {
                let machine = OffsetsMachine::from_durable(log, &storage)?;
                let persisted = storage.load_raft(log)?;
                let raft = RaftGroup::restore(
                    log,
                    me,
                    &voters,
                    persisted,
                    machine.applied_index(),
                    timing,
                )
                .map_err(|e| StorageError::Corrupt {
                    what: format!("offsets raft group {log:?}"),
                    message: e.to_string(),
                })?;
                Ok((machine, raft))
            })
            .await
            .unwrap_or(Err(StorageError::ShutDown))
        };
        ctx.wait(recover.into_actor(self).map(|result, act, ctx| match result {
            Ok((machine, mut raft)) => {
                act.machine = machine;
                let me = act.wiring.cluster.self_id;
                // The preferred replica campaigns at once in a new group; a lone one always.
                if (raft.is_fresh() && act.shared.replicas.first() == Some(&me))
                    || act.shared.replicas.as_slice() == [me]
                {
                    raft.campaign();
                }
                act.raft = Some(raft);
                raft_driver::guarded(act, ctx, raft_driver::drive);
            }
            Err(e) => {
                tracing::error!(error = %e, log = ?act.log, "offsets recovery failed; its groups stay unavailable here");
            }
        }));
    }
}

impl Handler<RaftInbound> for OffsetsReplica {
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

impl Handler<ProposeGroup> for OffsetsReplica {
    type Result = ResponseFuture<Result<Option<GroupState>, GroupError>>;

    fn handle(&mut self, msg: ProposeGroup, ctx: &mut Self::Context) -> Self::Result {
        let group = command_group(&msg.0).to_owned();
        // A replica that does not lead would forward the proposal: a deposed coordinator's
        // commit could then land after its successor took over.
        if !self.serving() {
            let error = self.not_coordinator(&group);
            return Box::pin(async move { Err(error) });
        }
        let receiver = self.propose(&msg.0, ctx);
        Box::pin(async move {
            match receiver.await {
                Ok(Err(GroupError::NotWritten(_))) => Err(GroupError::NotWritten(group)),
                Ok(Err(GroupError::OutcomeUnknown(_))) => Err(GroupError::OutcomeUnknown(group)),
                Ok(result) => result,
                Err(_) => Err(GroupError::Stopping(group)),
            }
        })
    }
}

impl Handler<Coordinate> for OffsetsReplica {
    type Result = Result<Coordinated, GroupError>;

    fn handle(&mut self, msg: Coordinate, ctx: &mut Self::Context) -> Self::Result {
        if !self.serving() {
            let leading = self.raft.as_ref().is_some_and(RaftGroup::is_leader);
            return Err(if leading {
                GroupError::Loading(msg.group)
            } else {
                self.not_coordinator(&msg.group)
            });
        }
        if let Some(addr) = self.coordinators.get(&msg.group).filter(|a| a.connected()) {
            return Ok(Coordinated::Running(addr.clone()));
        }
        if !msg.create {
            return match self.machine.group(&msg.group) {
                Some(state) => Ok(Coordinated::Stored(state.clone())),
                None => Err(GroupError::UnknownGroup(msg.group)),
            };
        }
        let offsets = ctx.address();
        let settings = self.wiring.coordinator.clone();
        let (registry, metrics) = (self.wiring.registry.clone(), self.wiring.metrics.clone());
        let epoch = self.machine.group(&msg.group).map_or(0, |g| g.generation);
        // Two election timeouts: by then a deposed leader has stepped down (check-quorum) and
        // its coordinators have stopped serving polls.
        let timing = self.wiring.timing;
        let hold = Duration::from_millis(2 * timing.election_tick as u64 * timing.tick_ms);
        let group = msg.group.clone();
        // On this replica's thread: a coordinator and its offsets partition talk a lot. It
        // starts from the state its takeover returns, not from one read now.
        let addr = GroupCoordinator::create(move |_| {
            GroupCoordinator::new(group, epoch, offsets, registry, metrics, settings, hold)
        });
        self.coordinators.insert(msg.group, addr.clone());
        Ok(Coordinated::Running(addr))
    }
}

impl Handler<ListGroups> for OffsetsReplica {
    type Result = MessageResult<ListGroups>;

    fn handle(&mut self, _msg: ListGroups, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.machine
                .groups()
                .map(|(name, state)| (name.clone(), state.clone()))
                .collect(),
        )
    }
}
