//! `Metadata`: the owner of the topic catalog (create, delete, and what exists after a restart).
//!
//! Admin changes are validated here, made durable in the `metadata` column family, and only then
//! handed to the [`BrokerSupervisor`] to host or retire partitions. Handlers are atomic (one admin
//! change at a time), so two creates of one name cannot both succeed. In a cluster this catalog
//! becomes the state machine of the metadata Raft group; its messages stay the same.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::prelude::*;
use bytes::Bytes;

use crate::broker_supervisor::{BrokerSupervisor, HostTopic, RetireTopic};
use crate::error::TopicError;
use crate::partition_replica::now_ms;
use crate::storage::{topic_key_range, topic_meta_key, Cf, Storage, WriteOp, NEXT_TOPIC_ID_KEY};
use crate::topic::{validate_name, TopicConfigs, TopicMeta};

/// Bounds on what one broker's catalog may hold.
#[derive(Debug, Clone, Copy)]
pub struct CatalogLimits {
    pub topics_max: usize,
    pub partitions_per_topic_max: u32,
    /// Brokers a replica can be placed on; a larger replication factor is refused.
    pub brokers: u16,
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

pub struct Metadata {
    storage: Storage,
    supervisor: Addr<BrokerSupervisor>,
    limits: CatalogLimits,
    topics: BTreeMap<String, Arc<TopicMeta>>,
    /// The id the next topic gets; persisted with each create so ids are never reused.
    next_topic_id: u32,
}

impl Metadata {
    pub fn new(
        storage: Storage,
        supervisor: Addr<BrokerSupervisor>,
        limits: CatalogLimits,
        catalog: (Vec<TopicMeta>, u32),
    ) -> Self {
        let (topics, next_topic_id) = catalog;
        let topics = topics
            .into_iter()
            .map(|t| (t.name.clone(), Arc::new(t)))
            .collect();
        Self {
            storage,
            supervisor,
            limits,
            topics,
            next_topic_id,
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
        if msg.replication_factor == 0 || msg.replication_factor > self.limits.brokers {
            return Err(TopicError::InvalidArgument {
                field: "replication_factor".into(),
                reason: format!(
                    "{} is not between 1 and the {} broker(s) in this cluster",
                    msg.replication_factor, self.limits.brokers
                ),
            });
        }
        if self.next_topic_id == u32::MAX {
            return Err(TopicError::InvalidArgument {
                field: "name".into(),
                reason: "topic ids are exhausted".into(),
            });
        }
        TopicConfigs::from_kafka(&msg.configs)
    }
}

impl Actor for Metadata {
    type Context = Context<Self>;
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
    type Result = AtomicResponse<Self, Result<Arc<TopicMeta>, TopicError>>;

    fn handle(&mut self, msg: CreateTopic, _ctx: &mut Self::Context) -> Self::Result {
        let configs = match self.validate(&msg) {
            Ok(configs) => configs,
            Err(e) => return AtomicResponse::new(Box::pin(actix::fut::ready(Err(e)))),
        };
        let meta = Arc::new(TopicMeta {
            name: msg.name,
            topic_id: self.next_topic_id,
            partitions: msg.partitions,
            replication_factor: msg.replication_factor,
            configs,
            created_at_ms: now_ms(),
            assignment: Vec::new(),
        });
        let encoded = rmp_serde::to_vec_named(meta.as_ref()).map(Bytes::from);
        let storage = self.storage.clone();
        let supervisor = self.supervisor.clone();
        let for_host = meta.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let encoded = encoded.map_err(|e| TopicError::InvalidArgument { field: "topic".into(), reason: e.to_string() })?;
                storage
                    .write(vec![
                        WriteOp::Put { cf: Cf::Metadata, key: topic_meta_key(&for_host.name), value: encoded },
                        WriteOp::Put {
                            cf: Cf::Metadata,
                            key: NEXT_TOPIC_ID_KEY.to_vec(),
                            value: Bytes::copy_from_slice(&(for_host.topic_id + 1).to_be_bytes()),
                        },
                    ])
                    .await?;
                supervisor.send(HostTopic { meta: for_host }).await.map_err(|_| TopicError::ShuttingDown)
            }
            .into_actor(self)
            .map(move |result, act, _ctx| {
                // The id is spent once the write was attempted, whatever its outcome.
                act.next_topic_id = act.next_topic_id.max(meta.topic_id + 1);
                result.map(|()| {
                    act.topics.insert(meta.name.clone(), meta.clone());
                    tracing::info!(topic = %meta.name, partitions = meta.partitions, topic_id = meta.topic_id, "topic created");
                    meta
                })
            }),
        ))
    }
}

impl Handler<DeleteTopic> for Metadata {
    type Result = AtomicResponse<Self, Result<(), TopicError>>;

    fn handle(&mut self, msg: DeleteTopic, _ctx: &mut Self::Context) -> Self::Result {
        let Some(meta) = self.topics.get(&msg.name).cloned() else {
            return AtomicResponse::new(Box::pin(actix::fut::ready(Err(TopicError::NotFound(
                msg.name,
            )))));
        };
        let storage = self.storage.clone();
        let supervisor = self.supervisor.clone();
        let name = msg.name;
        AtomicResponse::new(Box::pin(
            async move {
                // Retire first: no partition actor may write after its data is deleted.
                supervisor
                    .send(RetireTopic {
                        name: meta.name.clone(),
                    })
                    .await
                    .map_err(|_| TopicError::ShuttingDown)?;
                let (from, to) = topic_key_range(meta.topic_id);
                storage
                    .write(vec![
                        WriteOp::Delete {
                            cf: Cf::Metadata,
                            key: topic_meta_key(&meta.name),
                        },
                        WriteOp::DeleteRange {
                            cf: Cf::Records,
                            from: from.clone(),
                            to: to.clone(),
                        },
                        WriteOp::DeleteRange {
                            cf: Cf::LogState,
                            from: from.clone(),
                            to: to.clone(),
                        },
                        WriteOp::DeleteRange {
                            cf: Cf::RaftLog,
                            from: from.clone(),
                            to: to.clone(),
                        },
                        WriteOp::DeleteRange {
                            cf: Cf::RaftState,
                            from: from.clone(),
                            to: to.clone(),
                        },
                    ])
                    .await?;
                let compact = storage.clone();
                let _ =
                    tokio::task::spawn_blocking(move || compact.compact_records(&from, &to)).await;
                Ok(())
            }
            .into_actor(self)
            .map(move |result: Result<(), TopicError>, act, _ctx| {
                if result.is_ok() {
                    act.topics.remove(&name);
                    tracing::info!(topic = %name, "topic deleted");
                }
                result
            }),
        ))
    }
}
