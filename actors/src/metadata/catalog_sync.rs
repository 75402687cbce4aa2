//! The metadata group's snapshot, the whole catalog, and the two ways the catalog is caught up
//! at once rather than entry by entry: a snapshot install on a broker behind the leader's
//! compacted log, and hosting reconciled with the durable catalog after the actor crashed.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{encode_meta, Done, Effect, Metadata, Outcome};
use crate::error::{StorageError, TopicError};
use crate::storage::{
    topic_delete_ops, topic_meta_key, Cf, WriteOp, METADATA_APPLIED_KEY, NEXT_TOPIC_ID_KEY,
    TOPIC_META_PREFIX,
};
use crate::topic::TopicMeta;

/// The metadata group's snapshot: the whole catalog (it is small: topics and their assignment).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct CatalogSnapshot {
    pub(super) topics: Vec<TopicMeta>,
    pub(super) next_topic_id: u32,
}

impl CatalogSnapshot {
    pub(super) fn encode(&self) -> Bytes {
        match rmp_serde::to_vec_named(self) {
            Ok(encoded) => Bytes::from(encoded),
            Err(e) => panic!("encoding the catalog snapshot failed: {e}"),
        }
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Self, StorageError> {
        rmp_serde::from_slice(bytes).map_err(|e| StorageError::Corrupt {
            what: "metadata snapshot".into(),
            message: e.to_string(),
        })
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

impl Metadata {
    /// Replace the catalog with the leader's at Raft index `index`; returns the writes that
    /// make it durable and queues the hosting and retiring it implies.
    pub(super) fn install_catalog(
        &mut self,
        snapshot: CatalogSnapshot,
        index: u64,
    ) -> Vec<WriteOp> {
        let mut ops = vec![WriteOp::DeleteRange {
            cf: Cf::Metadata,
            from: TOPIC_META_PREFIX.to_vec(),
            to: prefix_end(TOPIC_META_PREFIX),
        }];
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
                self.installed_effects.push((
                    None,
                    Ok(Outcome::Deleted),
                    Effect::Retire(name.clone()),
                ));
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
                let effect = Effect::Host(new.clone());
                self.installed_effects
                    .push((None, Ok(Outcome::Created(new.clone())), effect));
            }
        }
        // Entries up to `index` were not applied one by one here: a waiting request may be
        // among them or not.
        for pending in self.proposals.skip_to(index) {
            let _ = pending.waiter.send(Err(TopicError::OutcomeUnknown));
        }
        tracing::info!(
            index,
            topics = incoming.len(),
            "metadata snapshot installed"
        );
        self.topics = incoming;
        self.next_topic_id = snapshot.next_topic_id.max(self.next_topic_id);
        self.applied_index = index;
        ops.push(WriteOp::Put {
            cf: Cf::Metadata,
            key: NEXT_TOPIC_ID_KEY.to_vec(),
            value: Bytes::copy_from_slice(&self.next_topic_id.to_be_bytes()),
        });
        ops.push(WriteOp::Put {
            cf: Cf::Metadata,
            key: METADATA_APPLIED_KEY.to_vec(),
            value: Bytes::copy_from_slice(&index.to_be_bytes()),
        });
        ops
    }

    /// After a crash: a durable apply whose hosting or retiring never ran (the crash dropped
    /// it) is caught up by comparing the durable catalog with what this broker hosts.
    pub(super) fn reconcile_hosting(&mut self) {
        let hosted = self.registry.list();
        let mut effects: Vec<Done> = Vec::new();
        for meta in self.topics.values() {
            if !hosted.iter().any(|h| h.meta.topic_id == meta.topic_id) {
                effects.push((
                    None,
                    Ok(Outcome::Created(meta.clone())),
                    Effect::Host(meta.clone()),
                ));
            }
        }
        for handle in &hosted {
            let kept = self
                .topics
                .get(&handle.meta.name)
                .is_some_and(|t| t.topic_id == handle.meta.topic_id);
            if !kept {
                let name = handle.meta.name.clone();
                effects.push((None, Ok(Outcome::Deleted), Effect::Retire(name)));
            }
        }
        if !effects.is_empty() {
            tracing::info!(
                changes = effects.len(),
                "hosting caught up with the catalog after a restart"
            );
            self.announce(effects);
        }
    }
}
