//! The topic catalog as a [`StateMachine`]: the metadata group's committed commands (create,
//! delete) applied to topics and the next topic id, every write fsync'd with its Ready, the
//! whole catalog as the group's snapshot.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{StorageError, TopicError};
use crate::state_machine::{Durability, StateMachine};
use crate::storage::{
    topic_delete_ops, topic_meta_key, Catalog, Cf, WriteOp, METADATA_APPLIED_KEY,
    NEXT_PRODUCER_ID_KEY, NEXT_TOPIC_ID_KEY, TOPIC_META_PREFIX,
};
use crate::topic::{TopicConfigs, TopicMeta};

/// A committed catalog change: the metadata group's log entries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) enum Command {
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
    /// Hand out `count` producer ids (a broker takes a block and serves InitProducerId from
    /// it, as Kafka's brokers do).
    AllocateProducerIds {
        count: u32,
    },
}

/// The outcome of applying a command, sent to the proposer's client.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Created(Arc<TopicMeta>),
    Deleted,
    /// Producer ids `first .. first + count` are this proposer's.
    ProducerIds {
        first: i64,
        count: u32,
    },
}

/// What to do once an applied batch is durable.
#[derive(Debug)]
pub(crate) enum Effect {
    Host(Arc<TopicMeta>),
    Retire(String),
    Nothing,
}

/// What one applied command (or a snapshot's difference) leaves to do.
pub(super) type Applied = (Result<Outcome, TopicError>, Effect);

/// The metadata group's snapshot: the whole catalog (it is small: topics and their assignment).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CatalogSnapshot {
    topics: Vec<TopicMeta>,
    next_topic_id: u32,
    #[serde(default)]
    next_producer_id: i64,
}

/// The applied catalog (including applies whose write is in flight).
#[derive(Debug, Clone, Default)]
pub(super) struct CatalogMachine {
    pub(super) topics: BTreeMap<String, Arc<TopicMeta>>,
    /// The id the next created topic gets; ids are never reused (ids start at 1, 0 = metadata).
    pub(super) next_topic_id: u32,
    /// The first producer id not handed out yet.
    pub(super) next_producer_id: i64,
    applied_index: u64,
}

impl CatalogMachine {
    /// The catalog as storage holds it durably (at start, and after a crash).
    pub(super) fn from_durable(catalog: Catalog) -> Self {
        Self {
            topics: catalog
                .topics
                .into_iter()
                .map(|t| (t.name.clone(), Arc::new(t)))
                .collect(),
            next_topic_id: catalog.next_topic_id.max(1),
            next_producer_id: catalog.next_producer_id,
            applied_index: catalog.applied_index,
        }
    }

    /// Decode a committed entry. Every broker proposes commands it encoded itself: one that
    /// does not decode is a bug or corruption, and skipping it would fork the catalogs, so the
    /// actor stops (and restarts from the durable catalog).
    fn decode(index: u64, data: &[u8]) -> Command {
        match rmp_serde::from_slice(data) {
            Ok(command) => command,
            Err(e) => panic!("metadata entry {index} does not decode: {e}"),
        }
    }
}

impl StateMachine for CatalogMachine {
    type Effect = Applied;

    const DURABILITY: Durability = Durability::Synced;

    fn column_families(&self) -> &'static [Cf] {
        // Deleting a topic deletes its partitions' records and Raft state too.
        &[
            Cf::Metadata,
            Cf::Records,
            Cf::LogState,
            Cf::RaftLog,
            Cf::RaftState,
        ]
    }

    fn applied_index(&self) -> u64 {
        self.applied_index
    }

    fn apply(&mut self, index: u64, data: &[u8], ops: &mut Vec<WriteOp>) -> Applied {
        match Self::decode(index, data) {
            Command::CreateTopic {
                name,
                partitions,
                replication_factor,
                configs,
                assignment,
                created_at_ms,
            } => {
                // Validated at proposal too; here is where it counts: two brokers may propose
                // the same name, and the second to commit fails.
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
                ops.push(WriteOp::Put {
                    cf: Cf::Metadata,
                    key: topic_meta_key(&meta.name),
                    value: Bytes::from(encode_meta(&meta)),
                });
                ops.push(next_topic_id_op(self.next_topic_id));
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
                ops.extend(topic_delete_ops(meta.topic_id));
                tracing::info!(topic = %name, "topic deleted");
                (Ok(Outcome::Deleted), Effect::Retire(name))
            }
            Command::AllocateProducerIds { count } => {
                let first = self.next_producer_id;
                self.next_producer_id = first.saturating_add(i64::from(count));
                ops.push(next_producer_id_op(self.next_producer_id));
                (Ok(Outcome::ProducerIds { first, count }), Effect::Nothing)
            }
        }
    }

    fn applied_op(&mut self, index: u64) -> WriteOp {
        self.applied_index = index;
        applied_index_op(index)
    }

    fn snapshot(&self) -> Bytes {
        let snapshot = CatalogSnapshot {
            topics: self.topics.values().map(|t| t.as_ref().clone()).collect(),
            next_topic_id: self.next_topic_id,
            next_producer_id: self.next_producer_id,
        };
        match rmp_serde::to_vec_named(&snapshot) {
            Ok(encoded) => Bytes::from(encoded),
            Err(e) => panic!("encoding the catalog snapshot failed: {e}"),
        }
    }

    /// The leader's catalog replaces this one: topics it lacks (or holds under another id) are
    /// deleted with their data and retired, topics new to this broker are hosted.
    fn restore(
        &mut self,
        index: u64,
        data: &[u8],
    ) -> Result<(Vec<WriteOp>, Vec<Applied>), StorageError> {
        let snapshot: CatalogSnapshot =
            rmp_serde::from_slice(data).map_err(|e| StorageError::Corrupt {
                what: "metadata snapshot".into(),
                message: e.to_string(),
            })?;
        let mut ops = vec![WriteOp::DeleteRange {
            cf: Cf::Metadata,
            from: TOPIC_META_PREFIX.to_vec(),
            to: prefix_end(TOPIC_META_PREFIX),
        }];
        let mut effects = Vec::new();
        let incoming: BTreeMap<String, Arc<TopicMeta>> = snapshot
            .topics
            .into_iter()
            .map(|t| (t.name.clone(), Arc::new(t)))
            .collect();
        for (name, old) in &self.topics {
            if incoming
                .get(name)
                .is_none_or(|new| new.topic_id != old.topic_id)
            {
                ops.extend(topic_delete_ops(old.topic_id));
                effects.push((Ok(Outcome::Deleted), Effect::Retire(name.clone())));
            }
        }
        for (name, new) in &incoming {
            ops.push(WriteOp::Put {
                cf: Cf::Metadata,
                key: topic_meta_key(name),
                value: Bytes::from(encode_meta(new)),
            });
            if self
                .topics
                .get(name)
                .is_none_or(|old| old.topic_id != new.topic_id)
            {
                effects.push((Ok(Outcome::Created(new.clone())), Effect::Host(new.clone())));
            }
        }
        tracing::info!(
            index,
            topics = incoming.len(),
            "metadata snapshot installed"
        );
        self.topics = incoming;
        self.next_topic_id = snapshot.next_topic_id.max(self.next_topic_id);
        ops.push(next_topic_id_op(self.next_topic_id));
        self.next_producer_id = snapshot.next_producer_id.max(self.next_producer_id);
        ops.push(next_producer_id_op(self.next_producer_id));
        ops.push(self.applied_op(index));
        Ok((ops, effects))
    }
}

fn next_topic_id_op(next: u32) -> WriteOp {
    WriteOp::Put {
        cf: Cf::Metadata,
        key: NEXT_TOPIC_ID_KEY.to_vec(),
        value: Bytes::copy_from_slice(&next.to_be_bytes()),
    }
}

fn next_producer_id_op(next: i64) -> WriteOp {
    WriteOp::Put {
        cf: Cf::Metadata,
        key: NEXT_PRODUCER_ID_KEY.to_vec(),
        value: Bytes::copy_from_slice(&next.to_be_bytes()),
    }
}

fn applied_index_op(index: u64) -> WriteOp {
    WriteOp::Put {
        cf: Cf::Metadata,
        key: METADATA_APPLIED_KEY.to_vec(),
        value: Bytes::copy_from_slice(&index.to_be_bytes()),
    }
}

/// A topic's catalog entry as stored. Encoding plain data cannot fail; persisting something else
/// would fork the catalogs, so a failure is a bug.
fn encode_meta(meta: &TopicMeta) -> Vec<u8> {
    match rmp_serde::to_vec_named(meta) {
        Ok(encoded) => encoded,
        Err(e) => panic!("encoding topic {}'s metadata failed: {e}", meta.name),
    }
}

/// The first key after every key starting with `prefix` (its last byte incremented; the
/// prefixes used here end in an ASCII character).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

#[cfg(test)]
mod tests;
