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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::broker_supervisor::{BrokerSupervisor, HostTopic, RetireTopic};
use crate::error::{StorageError, TopicError};
use crate::metrics::Metrics;
use crate::partition_replica::now_ms;
use crate::raft_driver::{self, Driver, RaftDriven};
use crate::raft_group::{RaftGroup, RaftSettings};
use crate::registry::Registry;
use crate::storage::{
    topic_key_range, topic_meta_key, Catalog, Cf, Storage, WriteOp, METADATA_APPLIED_KEY,
    NEXT_TOPIC_ID_KEY,
};
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

/// Host every topic of the catalog (sent once, at start-up).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct HostAll;

/// A committed catalog change: the metadata group's log entries.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Command {
    CreateTopic {
        name: String,
        partitions: u32,
        replication_factor: u16,
        configs: TopicConfigs,
        assignment: Vec<Vec<u64>>,
        created_at_ms: i64,
    },
    DeleteTopic {
        name: String,
    },
}

/// The outcome of applying a command, sent to the proposer's client.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Created(Arc<TopicMeta>),
    Deleted,
}

type Reply = oneshot::Sender<Result<Outcome, TopicError>>;

/// One applied command: whose proposal it was (if ours), its outcome, and what follows.
type Done = (Option<u64>, Result<Outcome, TopicError>, Effect);

/// What to do once an applied batch is durable.
pub(crate) enum Effect {
    Host(Arc<TopicMeta>),
    Retire(String),
    Nothing,
}

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
    topics: BTreeMap<String, Arc<TopicMeta>>,
    /// The id the next created topic gets; ids are never reused (ids start at 1, 0 = metadata).
    next_topic_id: u32,
    applied_index: u64,
    raft: Option<RaftGroup>,
    driver: Driver,
    pending: HashMap<u64, (Reply, std::time::Instant)>,
    nonce: u64,
    next_proposal: u64,
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
        let topics = catalog
            .topics
            .into_iter()
            .map(|t| (t.name.clone(), Arc::new(t)))
            .collect();
        Self {
            storage,
            supervisor,
            registry,
            nonce: now_ms() as u64 ^ (cluster.self_id << 56),
            cluster,
            transport,
            metrics,
            limits,
            timing,
            topics,
            next_topic_id: catalog.next_topic_id.max(1),
            applied_index: catalog.applied_index,
            raft: None,
            driver: Driver::default(),
            pending: HashMap::new(),
            next_proposal: 0,
        }
    }

    fn validate(&self, msg: &CreateTopic) -> Result<TopicConfigs, TopicError> {
        validate_name(&msg.name)?;
        if self.topics.contains_key(&msg.name) {
            return Err(TopicError::AlreadyExists(msg.name.clone()));
        }
        if self.topics.len() >= self.limits.topics_max {
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
        let start = self.topics.len() + self.next_topic_id as usize;
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
        let id = self.next_proposal;
        let mut context = self.nonce.to_be_bytes().to_vec();
        context.extend_from_slice(&id.to_be_bytes());
        if raft.propose(context, data).is_err() {
            let _ = reply.send(Err(TopicError::NoLeader));
            return receiver;
        }
        self.next_proposal += 1;
        self.pending.insert(id, (reply, std::time::Instant::now()));
        raft_driver::drive(self, ctx);
        receiver
    }

    /// Apply committed commands: the same state change on every broker.
    fn apply_entries(&mut self, entries: Vec<raft::prelude::Entry>) -> (Vec<WriteOp>, Vec<Done>) {
        let mut ops = Vec::new();
        let mut results = Vec::new();
        let Some(last) = entries.last().map(|e| e.index) else {
            return (ops, results);
        };
        for entry in entries {
            if entry.data.is_empty() {
                continue;
            }
            let own = own_proposal(self.nonce, &entry.context);
            let command: Command = match rmp_serde::from_slice(&entry.data) {
                Ok(command) => command,
                Err(e) => {
                    tracing::error!(index = entry.index, error = %e, "undecodable metadata command; skipped");
                    continue;
                }
            };
            let (result, effect) = self.apply_one(command, &mut ops);
            results.push((own, result, effect));
        }
        self.applied_index = last;
        ops.push(WriteOp::Put {
            cf: Cf::Metadata,
            key: METADATA_APPLIED_KEY.to_vec(),
            value: Bytes::copy_from_slice(&last.to_be_bytes()),
        });
        if let Some(raft) = &self.raft {
            ops.push(raft.hard_state_op());
        }
        (ops, results)
    }

    fn apply_one(
        &mut self,
        command: Command,
        ops: &mut Vec<WriteOp>,
    ) -> (Result<Outcome, TopicError>, Effect) {
        match command {
            Command::CreateTopic {
                name,
                partitions,
                replication_factor,
                configs,
                assignment,
                created_at_ms,
            } => {
                if self.topics.contains_key(&name) {
                    return (Err(TopicError::AlreadyExists(name)), Effect::Nothing);
                }
                let meta = Arc::new(TopicMeta {
                    name,
                    topic_id: self.next_topic_id,
                    partitions,
                    replication_factor,
                    configs,
                    created_at_ms,
                    assignment,
                });
                self.next_topic_id += 1;
                let Ok(encoded) = rmp_serde::to_vec_named(meta.as_ref()) else {
                    return (Err(TopicError::ShuttingDown), Effect::Nothing);
                };
                ops.push(WriteOp::Put {
                    cf: Cf::Metadata,
                    key: topic_meta_key(&meta.name),
                    value: Bytes::from(encoded),
                });
                ops.push(WriteOp::Put {
                    cf: Cf::Metadata,
                    key: NEXT_TOPIC_ID_KEY.to_vec(),
                    value: Bytes::copy_from_slice(&self.next_topic_id.to_be_bytes()),
                });
                self.topics.insert(meta.name.clone(), meta.clone());
                tracing::info!(topic = %meta.name, partitions = meta.partitions, topic_id = meta.topic_id, "topic created");
                (Ok(Outcome::Created(meta.clone())), Effect::Host(meta))
            }
            Command::DeleteTopic { name } => {
                let Some(meta) = self.topics.remove(&name) else {
                    return (Err(TopicError::NotFound(name)), Effect::Nothing);
                };
                ops.push(WriteOp::Delete {
                    cf: Cf::Metadata,
                    key: topic_meta_key(&name),
                });
                let (from, to) = topic_key_range(meta.topic_id);
                for cf in [Cf::Records, Cf::LogState, Cf::RaftLog, Cf::RaftState] {
                    ops.push(WriteOp::DeleteRange {
                        cf,
                        from: from.clone(),
                        to: to.clone(),
                    });
                }
                tracing::info!(topic = %name, "topic deleted");
                (Ok(Outcome::Deleted), Effect::Retire(name))
            }
        }
    }

    /// Host or retire, then answer the proposer's client.
    fn announce(&mut self, results: Vec<Done>) {
        for (own, result, effect) in results {
            let reply = own
                .and_then(|id| self.pending.remove(&id))
                .map(|(reply, _)| reply);
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
    }

    /// A durable write failed: storage is failed closed and readiness reports it; fail waiters.
    fn fail(&mut self, error: StorageError) {
        tracing::error!(error = %error, "metadata write failed");
        for (_, (reply, _)) in self.pending.drain() {
            let _ = reply.send(Err(TopicError::Storage(error.clone())));
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
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, (_, at))| at.elapsed() > COMMIT_WAIT)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some((reply, _)) = self.pending.remove(&id) {
                let _ = reply.send(Err(TopicError::NoLeader));
            }
        }
    }
}

fn own_proposal(nonce: u64, context: &[u8]) -> Option<u64> {
    let (n, id) = context.split_at_checked(8)?;
    (n == nonce.to_be_bytes()).then(|| u64::from_be_bytes(id.try_into().unwrap_or_default()))
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
        self.applied_index
    }

    /// The metadata group never offers snapshots (it sets no snapshot point), so a follower
    /// catches up from the log; receiving one means a foreign or newer leader: stop.
    fn install_snapshot(
        &mut self,
        snapshot: crate::raft_group::SnapshotInstall,
    ) -> ResponseActFuture<Self, Result<Vec<WriteOp>, StorageError>> {
        let error = StorageError::Corrupt {
            what: "metadata group".into(),
            message: format!(
                "received a snapshot at index {}, which the metadata group never sends",
                snapshot.index
            ),
        };
        Box::pin(actix::fut::ready(Err(error)))
    }

    fn apply(&mut self, entries: Vec<raft::prelude::Entry>) -> (Vec<WriteOp>, Self::Applied) {
        self.apply_entries(entries)
    }

    fn on_role_change(&mut self) {
        self.role_changed();
    }

    fn on_durable(&mut self, applied: Self::Applied) {
        self.announce(applied);
    }

    fn on_failure(&mut self, _ctx: &mut Context<Self>, error: StorageError) {
        self.fail(error);
    }
}

impl Actor for Metadata {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.registry.set_metadata(ctx.address().recipient());
        let storage = self.storage.clone();
        let (id, voters, applied, timing) = (
            self.cluster.self_id,
            self.cluster.brokers.to_vec(),
            self.applied_index,
            self.timing,
        );
        let recover = async move {
            tokio::task::spawn_blocking(move || {
                let persisted = storage.load_raft(METADATA_GROUP)?;
                RaftGroup::restore(METADATA_GROUP, id, &voters, persisted, applied, timing).map_err(
                    |e| StorageError::Corrupt {
                        what: "metadata raft group".into(),
                        message: e.to_string(),
                    },
                )
            })
            .await
            .unwrap_or(Err(StorageError::ShutDown))
        };
        ctx.wait(recover.into_actor(self).map(|result, act, ctx| match result {
            Ok(mut raft) => {
                let me = act.cluster.self_id;
                // The lowest id campaigns at once in a new cluster; a lone broker always does.
                if (raft.is_fresh() && act.cluster.brokers.first() == Some(&me)) || act.cluster.brokers.as_slice() == [me] {
                    raft.campaign();
                }
                act.raft = Some(raft);
                raft_driver::drive(act, ctx);
            }
            Err(e) => {
                tracing::error!(error = %e, "metadata recovery failed; the broker stays unready");
            }
        }));
        ctx.run_interval(Duration::from_millis(self.timing.tick_ms), |act, ctx| {
            if let Some(raft) = act.raft.as_mut() {
                raft.tick();
                raft_driver::drive(act, ctx);
            }
        });
        ctx.run_interval(Duration::from_secs(1), |act, _ctx| act.expire_pending());
    }
}

impl Handler<RaftInbound> for Metadata {
    type Result = ();

    fn handle(&mut self, msg: RaftInbound, ctx: &mut Self::Context) {
        if let Some(raft) = self.raft.as_mut() {
            raft.step(msg.0);
            raft_driver::drive(self, ctx);
        }
    }
}

impl Handler<HostAll> for Metadata {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: HostAll, _ctx: &mut Self::Context) -> Self::Result {
        let supervisor = self.supervisor.clone();
        let topics: Vec<_> = self.topics.values().cloned().collect();
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
                Outcome::Deleted => Err(TopicError::ShuttingDown),
            }
        })
    }
}

impl Handler<DeleteTopic> for Metadata {
    type Result = ResponseFuture<Result<(), TopicError>>;

    fn handle(&mut self, msg: DeleteTopic, ctx: &mut Self::Context) -> Self::Result {
        if !self.topics.contains_key(&msg.name) {
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
