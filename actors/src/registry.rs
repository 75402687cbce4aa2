//! The broker's live view of its topics: name → partitions, shared by the HTTP layer (lookups on
//! every request) and the supervisor (which installs and removes entries).
//!
//! Lookups clone an `Arc` under a read lock and never touch an actor mailbox, so metadata reads and
//! routing stay off the write path.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use actix::Recipient;

use crate::groups::offsets_replica::OffsetsShared;
use crate::partition_replica::PartitionShared;
use crate::topic::{LogId, TopicMeta};
use crate::transport::RaftInbound;

/// One hosted topic and its partitions.
#[derive(Debug)]
pub struct TopicHandle {
    pub meta: Arc<TopicMeta>,
    /// Index = partition number; length = `meta.partitions`.
    pub partitions: Vec<Arc<PartitionShared>>,
    /// Spreads keyless records over partitions.
    round_robin: AtomicU32,
}

impl TopicHandle {
    pub fn new(meta: Arc<TopicMeta>, partitions: Vec<Arc<PartitionShared>>) -> Self {
        assert_eq!(
            partitions.len(),
            meta.partitions as usize,
            "one handle per partition"
        );
        Self {
            meta,
            partitions,
            round_robin: AtomicU32::new(0),
        }
    }

    pub fn partition(&self, partition: u32) -> Option<&Arc<PartitionShared>> {
        self.partitions.get(partition as usize)
    }

    /// The partition the next keyless record goes to.
    pub fn next_round_robin(&self) -> u32 {
        self.round_robin.fetch_add(1, Ordering::Relaxed) % self.meta.partitions
    }
}

/// Topic name → handle, and Raft group → partition for messages from peers. std `RwLock`s: held
/// only to clone an `Arc` or swap an entry.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    topics: Arc<RwLock<BTreeMap<String, Arc<TopicHandle>>>>,
    by_log: Arc<RwLock<HashMap<LogId, Arc<PartitionShared>>>>,
    metadata: Arc<OnceLock<Recipient<RaftInbound>>>,
    /// The offsets topic's partitions, by number; set once at start-up.
    offsets: Arc<OnceLock<Vec<Arc<OffsetsShared>>>>,
    /// Bumped by every change of the topic set, so readers can cache what they derive from it.
    version: Arc<AtomicU64>,
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<Arc<TopicHandle>> {
        self.topics.read().ok().and_then(|t| t.get(name).cloned())
    }

    pub fn list(&self) -> Vec<Arc<TopicHandle>> {
        self.topics
            .read()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default()
    }

    pub(crate) fn insert(&self, handle: Arc<TopicHandle>) {
        if let Ok(mut by_log) = self.by_log.write() {
            for p in &handle.partitions {
                by_log.insert(p.log, p.clone());
            }
        }
        if let Ok(mut topics) = self.topics.write() {
            topics.insert(handle.meta.name.clone(), handle);
        }
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// Changes whenever a topic is added or removed.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub(crate) fn remove(&self, name: &str) -> Option<Arc<TopicHandle>> {
        let removed = self.topics.write().ok().and_then(|mut t| t.remove(name))?;
        self.version.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut by_log) = self.by_log.write() {
            for p in &removed.partitions {
                by_log.remove(&p.log);
            }
        }
        Some(removed)
    }

    /// The partition a Raft group belongs to, if this broker knows it.
    pub fn partition_by_log(&self, log: LogId) -> Option<Arc<PartitionShared>> {
        self.by_log.read().ok().and_then(|m| m.get(&log).cloned())
    }

    /// Where metadata-group messages go; set once when the metadata actor starts.
    pub fn metadata(&self) -> Option<&Recipient<RaftInbound>> {
        self.metadata.get()
    }

    /// The offsets topic's partitions (empty before start-up set them).
    pub fn offsets(&self) -> &[Arc<OffsetsShared>] {
        self.offsets.get().map_or(&[], Vec::as_slice)
    }

    pub(crate) fn set_offsets(&self, partitions: Vec<Arc<OffsetsShared>>) {
        let _ = self.offsets.set(partitions);
    }

    pub(crate) fn set_metadata(&self, recipient: Recipient<RaftInbound>) {
        let _ = self.metadata.set(recipient);
    }
}
