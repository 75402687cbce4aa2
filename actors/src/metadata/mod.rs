//! `Metadata`: the topic catalog, replicated by Raft group 0 over every broker of the cluster.
//!
//! An admin request (create, delete) is validated against the local catalog, then proposed to the
//! metadata group; any broker may propose (raft-rs forwards a follower's proposal to the leader).
//! Every broker applies the committed commands in the same order to the same state, so topic ids,
//! replica assignments and the catalog are identical everywhere. Applying is one atomic RocksDB
//! write (catalog change + applied index + hard state); then the [`BrokerSupervisor`] hosts or
//! retires this broker's replicas, and the proposing broker answers its client.
//!
//! Validation happens twice on purpose: at proposal, for a fast clear error, and at apply, where
//! it is authoritative (two brokers may propose the same name; the second to commit fails).
//!
//! `catalog_machine`: the catalog as a [`crate::state_machine::StateMachine`] — the commands, their
//! apply, the group's snapshot (the whole catalog) and its restore. `catalog_sync`: hosting
//! caught up with the durable catalog after a crash.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

mod catalog_machine;
mod catalog_sync;

use catalog_machine::{CatalogMachine, Command, Effect, Outcome};

use crate::broker_supervisor::{BrokerSupervisor, HostTopic, RetireTopic};
use crate::error::{StorageError, TopicError};
use crate::metrics::Metrics;
use crate::partition_replica::now_ms;
use crate::proposals::{Proposals, Unanswered};
use crate::raft_driver::{self, Driver, RaftDriven};
use crate::raft_group::{RaftGroup, RaftSettings};
use crate::registry::Registry;
use crate::state_machine::{apply_committed, Durability, StateMachine};
use crate::storage::{Catalog, Storage, WriteOp};
use crate::topic::{validate_name, LogId, TopicConfigs, TopicMeta};
use crate::transport::{Cluster, RaftInbound, Transport, METADATA_GROUP};

/// How long an admin request waits for its command to commit before the client is told to retry.
const COMMIT_WAIT: Duration = Duration::from_secs(10);

/// Bounds on what the catalog may hold.
#[derive(Debug, Clone, Copy)]
pub struct CatalogLimits {
    pub topics_max: usize,
    pub partitions_per_topic_max: u32,
}

/// Create a topic.
#[derive(Debug, Clone)]
pub struct CreateTopic {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u16,
    /// Kafka-style topic configs, e.g. `retention.ms`.
    pub configs: BTreeMap<String, String>,
}

impl Message for CreateTopic {
    type Result = Result<Arc<TopicMeta>, TopicError>;
}

/// Delete a topic and all its data.
#[derive(Debug, Clone)]
pub struct DeleteTopic {
    pub name: String,
}

impl Message for DeleteTopic {
    type Result = Result<(), TopicError>;
}

/// A new idempotent producer id (Kafka's InitProducerId without a transactional id): a fresh
/// id at epoch 0, unique across the cluster.
#[derive(Debug, Clone, Copy)]
pub struct InitProducerId;

impl Message for InitProducerId {
    type Result = Result<i64, TopicError>;
}

/// Producer ids a broker takes from the metadata group at a time.
const PRODUCER_ID_BLOCK: u32 = 1000;

/// Host every topic of the catalog (sent once, at start-up).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct HostAll;

type Reply = oneshot::Sender<Result<Outcome, TopicError>>;

/// One applied command: whose proposal it was (if ours), its outcome, and what follows.
type Done = (Option<u64>, Result<Outcome, TopicError>, Effect);

pub struct Metadata {
    storage: Storage,
    supervisor: Addr<BrokerSupervisor>,
    registry: Registry,
    cluster: Cluster,
    transport: Transport,
    metrics: Arc<Metrics>,
    limits: CatalogLimits,
    timing: RaftSettings,
    /// The applied catalog (including applies whose write is in flight).
    catalog: CatalogMachine,
    /// Term of the last entry applied since the last [`Metadata::announce`].
    applied_term: Option<u64>,
    /// Hosting and retiring a snapshot install calls for, done once it is durable.
    installed_effects: Vec<Done>,
    raft: Option<RaftGroup>,
    driver: Driver,
    /// Admin requests proposed here, waiting to be answered.
    proposals: Proposals<Reply>,
    /// Set when a panic stopped this actor: its supervisor starts it again, and `started` then
    /// reloads the catalog from storage (memory may be half-changed).
    crashed: bool,
    restarts: crate::broker_supervisor::Backoff,
    /// Producer ids allocated to this broker and not yet handed out: `[next, end)`. Lost on
    /// restart (ids are never reused, so a few go unused).
    producer_ids: (i64, i64),
}

/// The broker-wide handles the metadata actor works with.
#[derive(Debug, Clone)]
pub struct MetadataWiring {
    pub storage: Storage,
    pub supervisor: Addr<BrokerSupervisor>,
    pub registry: Registry,
    pub cluster: Cluster,
    pub transport: Transport,
    pub metrics: Arc<Metrics>,
}

impl Metadata {
    pub fn new(
        wiring: MetadataWiring,
        limits: CatalogLimits,
        timing: RaftSettings,
        catalog: Catalog,
    ) -> Self {
        let MetadataWiring {
            storage,
            supervisor,
            registry,
            cluster,
            transport,
            metrics,
        } = wiring;
        Self {
            storage,
            supervisor,
            registry,
            cluster,
            transport,
            metrics,
            limits,
            timing,
            catalog: CatalogMachine::from_durable(catalog),
            applied_term: None,
            installed_effects: Vec::new(),
            raft: None,
            driver: Driver::default(),
            proposals: Proposals::new(),
            crashed: false,
            restarts: Default::default(),
            producer_ids: (0, 0),
        }
    }

    /// Take `catalog` as the applied state (at start, and after a crash).
    fn adopt_catalog(&mut self, catalog: Catalog) {
        self.catalog = CatalogMachine::from_durable(catalog);
    }

    fn validate(&self, msg: &CreateTopic) -> Result<TopicConfigs, TopicError> {
        validate_name(&msg.name)?;
        if self.catalog.topics.contains_key(&msg.name) {
            return Err(TopicError::AlreadyExists(msg.name.clone()));
        }
        if self.catalog.topics.len() >= self.limits.topics_max {
            return Err(TopicError::TooManyTopics {
                limit: self.limits.topics_max,
            });
        }
        if msg.partitions == 0 || msg.partitions > self.limits.partitions_per_topic_max {
            return Err(TopicError::InvalidArgument {
                field: "partitions".into(),
                reason: format!(
                    "{} is not between 1 and {}",
                    msg.partitions, self.limits.partitions_per_topic_max
                ),
            });
        }
        let brokers = self.cluster.brokers.len();
        if msg.replication_factor == 0 || usize::from(msg.replication_factor) > brokers {
            return Err(TopicError::InvalidArgument {
                field: "replication_factor".into(),
                reason: format!(
                    "{} is not between 1 and the {brokers} broker(s) in this cluster",
                    msg.replication_factor
                ),
            });
        }
        TopicConfigs::from_kafka(&msg.configs)
    }

    /// Replicas of each partition: consecutive brokers starting one further per partition, so
    /// preferred leaders (first replicas) spread evenly; the start rotates per topic.
    fn assign(&self, partitions: u32, replication_factor: u16) -> Vec<Vec<u64>> {
        let brokers = &self.cluster.brokers;
        let start = self.catalog.topics.len() + self.catalog.next_topic_id as usize;
        (0..partitions as usize)
            .map(|p| {
                (0..usize::from(replication_factor))
                    .map(|k| brokers[(start + p + k) % brokers.len()])
                    .collect()
            })
            .collect()
    }

    fn propose(
        &mut self,
        command: &Command,
        ctx: &mut Context<Self>,
    ) -> oneshot::Receiver<Result<Outcome, TopicError>> {
        let (reply, receiver) = oneshot::channel();
        let data = match rmp_serde::to_vec_named(command) {
            Ok(data) => data,
            Err(e) => {
                let _ = reply.send(Err(TopicError::Storage(StorageError::Corrupt {
                    what: "metadata command".into(),
                    message: e.to_string(),
                })));
                return receiver;
            }
        };
        let Some(raft) = self.raft.as_mut() else {
            let _ = reply.send(Err(TopicError::NoLeader));
            return receiver;
        };
        let (id, context) = self.proposals.next_context();
        if raft.propose(context, data).is_err() {
            let _ = reply.send(Err(TopicError::NoLeader));
            return receiver;
        }
        let appended_at = raft.is_leader().then(|| raft.last_index());
        let term = raft.term();
        self.proposals.insert(id, reply, appended_at, term);
        raft_driver::guarded(self, ctx, raft_driver::drive);
        receiver
    }

    /// Apply committed commands: the same state change on every broker.
    fn apply_entries(&mut self, entries: Vec<raft::prelude::Entry>) -> (Vec<WriteOp>, Vec<Done>) {
        let proposals = &self.proposals;
        let applied = apply_committed(&mut self.catalog, entries, |context| proposals.own(context));
        let mut ops = applied.ops;
        if let Some((_, term)) = applied.last {
            self.applied_term = Some(term);
            if let Some(raft) = &self.raft {
                ops.push(raft.hard_state_op());
            }
        }
        let done = applied
            .effects
            .into_iter()
            .map(|(own, (result, effect))| (own, result, effect))
            .collect();
        (ops, done)
    }

    /// Host or retire, then answer the proposer's client.
    fn announce(&mut self, results: Vec<Done>) {
        for (own, result, effect) in results {
            let reply = own
                .and_then(|id| self.proposals.take(id))
                .map(|pending| pending.waiter);
            let supervisor = self.supervisor.clone();
            // Host (or retire) before answering, so the client's next request sees the change.
            actix::spawn(async move {
                match effect {
                    Effect::Host(meta) => {
                        let _ = supervisor.send(HostTopic { meta }).await;
                    }
                    Effect::Retire(name) => {
                        let _ = supervisor.send(RetireTopic { name }).await;
                    }
                    Effect::Nothing => {}
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            });
        }
        let term = std::mem::take(&mut self.applied_term);
        for (pending, how) in self.proposals.settle(self.catalog.applied_index(), term) {
            let error = match how {
                Unanswered::NotWritten => TopicError::NoLeader,
                Unanswered::Unknown => TopicError::OutcomeUnknown,
            };
            let _ = pending.waiter.send(Err(error));
        }
    }

    /// A durable write failed: storage is failed closed and readiness reports it; fail waiters.
    fn fail(&mut self, error: StorageError) {
        tracing::error!(error = %error, "metadata write failed");
        for pending in self.proposals.drain() {
            let _ = pending.waiter.send(Err(TopicError::Storage(error.clone())));
        }
    }

    fn role_changed(&mut self) {
        let Some(raft) = &self.raft else { return };
        let leader = raft.leader_id();
        let leader_changed = self.cluster.metadata_leader() != leader;
        self.cluster.set_metadata_leader(leader);
        let labels = ["__metadata", "0"];
        self.metrics
            .raft_leader
            .with_label_values(&labels)
            .set(leader as i64);
        self.metrics
            .raft_term
            .with_label_values(&labels)
            .set(raft.term() as i64);
        if leader_changed {
            self.metrics
                .raft_leader_changes_total
                .with_label_values(&labels)
                .inc();
        }
        if raft.is_campaigning() {
            self.metrics
                .raft_elections_total
                .with_label_values(&labels)
                .inc();
        }
        tracing::info!(term = raft.term(), leader, "metadata leadership changed");
    }

    fn expire_pending(&mut self) {
        for pending in self.proposals.expire(COMMIT_WAIT) {
            let _ = pending.waiter.send(Err(TopicError::OutcomeUnknown));
        }
    }
}

impl RaftDriven for Metadata {
    type Applied = Vec<Done>;

    fn raft_mut(&mut self) -> Option<&mut RaftGroup> {
        self.raft.as_mut()
    }

    fn driver(&mut self) -> &mut Driver {
        &mut self.driver
    }

    fn group(&self) -> LogId {
        METADATA_GROUP
    }

    fn transport(&self) -> &Transport {
        &self.transport
    }

    fn storage(&self) -> &Storage {
        &self.storage
    }

    fn applied_index(&self) -> u64 {
        self.catalog.applied_index()
    }

    fn durability(&self) -> Durability {
        CatalogMachine::DURABILITY
    }

    /// A broker further behind than the leader's kept log gets the whole catalog: it replaces
    /// this broker's, and the topics it adds or drops are hosted or retired once it is durable.
    fn install_snapshot(
        &mut self,
        snapshot: crate::raft_group::SnapshotInstall,
    ) -> ResponseActFuture<Self, Result<Vec<WriteOp>, StorageError>> {
        let installed =
            self.catalog
                .restore(snapshot.index, &snapshot.data)
                .map(|(ops, effects)| {
                    self.installed_effects.extend(
                        effects
                            .into_iter()
                            .map(|(result, effect)| (None, result, effect)),
                    );
                    // Entries up to the snapshot were not applied one by one here: a waiting
                    // request may be among them or not.
                    for pending in self.proposals.skip_to(snapshot.index) {
                        let _ = pending.waiter.send(Err(TopicError::OutcomeUnknown));
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

    fn on_durable(&mut self, mut applied: Self::Applied) {
        applied.append(&mut self.installed_effects);
        self.announce(applied);
        // The leader offers its catalog as the snapshot for brokers behind its compacted log.
        let index = self.catalog.applied_index();
        if let Some(raft) = self.raft.as_mut().filter(|raft| raft.is_leader()) {
            raft.set_snapshot_point(index, self.catalog.snapshot());
        }
    }

    fn on_failure(&mut self, _ctx: &mut Context<Self>, error: StorageError) {
        self.fail(error);
    }

    fn on_panic(&mut self, ctx: &mut Context<Self>, panic: Box<dyn std::any::Any + Send>) {
        let message = raft_driver::panic_message(&*panic);
        tracing::error!(%message, "metadata actor crashed; restarting from the durable catalog");
        for pending in self.proposals.drain() {
            let _ = pending.waiter.send(Err(TopicError::OutcomeUnknown));
        }
        self.metrics
            .actor_restarts_total
            .with_label_values(&["metadata"])
            .inc();
        self.crashed = true;
        ctx.stop();
    }
}

/// Started under an actix `Supervisor`: a stopped (crashed) actor is started again with the
/// same address, so the registry and every sender keep reaching it.
impl actix::Supervised for Metadata {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.raft = None;
        self.driver = Driver::default();
        self.proposals = Proposals::new();
        // Effects of a half-done install: the reload reconciles hosting with the catalog.
        self.installed_effects.clear();
        self.applied_term = None;
    }
}

impl Actor for Metadata {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.registry.set_metadata(ctx.address().recipient());
        let reload = std::mem::take(&mut self.crashed);
        // A crash-looping actor (say, an entry it cannot apply) retries with backoff rather
        // than as fast as the supervisor restarts it.
        let delay = if reload {
            self.restarts.next_delay()
        } else {
            Duration::ZERO
        };
        // Waits hold the mailbox: requests queue until the group is recovered, as at start.
        if !delay.is_zero() {
            ctx.wait(actix::fut::wrap_future(tokio::time::sleep(delay)));
        }
        self.recover(ctx, reload);
        ctx.run_interval(Duration::from_millis(self.timing.tick_ms), |act, ctx| {
            raft_driver::guarded(act, ctx, |act, ctx| {
                if let Some(raft) = act.raft.as_mut() {
                    raft.tick();
                    raft_driver::drive(act, ctx);
                }
            });
        });
        ctx.run_interval(Duration::from_secs(1), |act, _ctx| act.expire_pending());
    }
}

impl Metadata {
    /// Load the Raft group (and after a crash the catalog, once the crashed incarnation's
    /// writes are in) and start driving it.
    fn recover(&mut self, ctx: &mut Context<Self>, reload: bool) {
        let storage = self.storage.clone();
        let (id, voters, applied, timing) = (
            self.cluster.self_id,
            self.cluster.brokers.to_vec(),
            self.catalog.applied_index(),
            self.timing,
        );
        let recover = async move {
            if reload {
                storage.barrier_patiently().await?;
            }
            tokio::task::spawn_blocking(move || {
                let catalog = reload.then(|| storage.load_catalog()).transpose()?;
                let applied = catalog.as_ref().map_or(applied, |c| c.applied_index);
                let persisted = storage.load_raft(METADATA_GROUP)?;
                let raft =
                    RaftGroup::restore(METADATA_GROUP, id, &voters, persisted, applied, timing)
                        .map_err(|e| StorageError::Corrupt {
                            what: "metadata raft group".into(),
                            message: e.to_string(),
                        })?;
                Ok((catalog, raft))
            })
            .await
            .unwrap_or(Err(StorageError::ShutDown))
        };
        ctx.wait(recover.into_actor(self).map(|result, act, ctx| match result {
            Ok((catalog, mut raft)) => {
                if let Some(catalog) = catalog {
                    act.adopt_catalog(catalog);
                    act.reconcile_hosting();
                }
                let me = act.cluster.self_id;
                // The lowest id campaigns at once in a new cluster; a lone broker always does.
                if (raft.is_fresh() && act.cluster.brokers.first() == Some(&me))
                    || act.cluster.brokers.as_slice() == [me]
                {
                    raft.campaign();
                }
                act.raft = Some(raft);
                raft_driver::guarded(act, ctx, raft_driver::drive);
            }
            Err(e) => {
                tracing::error!(error = %e, "metadata recovery failed; the broker stays unready");
            }
        }));
    }
}

impl Handler<RaftInbound> for Metadata {
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

impl Handler<HostAll> for Metadata {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: HostAll, _ctx: &mut Self::Context) -> Self::Result {
        let supervisor = self.supervisor.clone();
        let topics: Vec<_> = self.catalog.topics.values().cloned().collect();
        Box::pin(async move {
            for meta in topics {
                let _ = supervisor.send(HostTopic { meta }).await;
            }
        })
    }
}

impl Handler<CreateTopic> for Metadata {
    type Result = ResponseFuture<Result<Arc<TopicMeta>, TopicError>>;

    fn handle(&mut self, msg: CreateTopic, ctx: &mut Self::Context) -> Self::Result {
        let configs = match self.validate(&msg) {
            Ok(configs) => configs,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let command = Command::CreateTopic {
            assignment: self.assign(msg.partitions, msg.replication_factor),
            name: msg.name,
            partitions: msg.partitions,
            replication_factor: msg.replication_factor,
            configs,
            created_at_ms: now_ms(),
        };
        let receiver = self.propose(&command, ctx);
        Box::pin(async move {
            match receiver.await.unwrap_or(Err(TopicError::ShuttingDown))? {
                Outcome::Created(meta) => Ok(meta),
                Outcome::Deleted | Outcome::ProducerIds { .. } => Err(TopicError::ShuttingDown),
            }
        })
    }
}

impl Handler<DeleteTopic> for Metadata {
    type Result = ResponseFuture<Result<(), TopicError>>;

    fn handle(&mut self, msg: DeleteTopic, ctx: &mut Self::Context) -> Self::Result {
        if !self.catalog.topics.contains_key(&msg.name) {
            return Box::pin(async move { Err(TopicError::NotFound(msg.name)) });
        }
        let receiver = self.propose(&Command::DeleteTopic { name: msg.name }, ctx);
        Box::pin(async move {
            receiver
                .await
                .unwrap_or(Err(TopicError::ShuttingDown))
                .map(|_| ())
        })
    }
}

impl Handler<InitProducerId> for Metadata {
    type Result = ResponseActFuture<Self, Result<i64, TopicError>>;

    fn handle(&mut self, _msg: InitProducerId, ctx: &mut Self::Context) -> Self::Result {
        let (next, end) = self.producer_ids;
        if next < end {
            self.producer_ids.0 += 1;
            return Box::pin(actix::fut::ready(Ok(next)));
        }
        let command = Command::AllocateProducerIds {
            count: PRODUCER_ID_BLOCK,
        };
        let receiver = self.propose(&command, ctx);
        let allocated = async move { receiver.await.unwrap_or(Err(TopicError::ShuttingDown)) };
        Box::pin(allocated.into_actor(self).map(|outcome, act, _ctx| {
            let Outcome::ProducerIds { first, count } = outcome? else {
                return Err(TopicError::ShuttingDown);
            };
            // Requests that raced for a block each got one: keep the one with more left.
            let rest = (first + 1, first + i64::from(count));
            if rest.1 - rest.0 > act.producer_ids.1 - act.producer_ids.0 {
                act.producer_ids = rest;
            }
            Ok(first)
        }))
    }
}
