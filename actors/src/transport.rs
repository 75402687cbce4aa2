//! `Transport`: where Raft messages (and snapshot fetches) leave a replica for the other brokers.
//!
//! Each remote broker has one bounded queue, drained by its `PeerLink` (one TCP connection per
//! broker pair), which batches everything queued for that broker into one frame. Sending never
//! blocks an actor: when a peer's queue is full the message is dropped and counted, which Raft
//! tolerates (it retransmits on the next heartbeat), so a slow or dead peer cannot grow memory.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use raft::prelude::Message;
use tokio::sync::mpsc;

use crate::snapshot::{SnapshotChunk, SnapshotFetch};
use crate::topic::LogId;

/// Raft messages queued for one peer before new ones are dropped.
pub const PEER_QUEUE_CAPACITY: usize = 16_384;

/// Something on its way to another broker.
#[derive(Debug)]
pub enum Outbound {
    /// A Raft message for one group.
    Raft { group: LogId, message: Message },
    /// A follower asks for records it needs to install a snapshot.
    Fetch(SnapshotFetch),
    /// Records for a follower installing a snapshot.
    Chunk(SnapshotChunk),
    /// A partition leader tells the other brokers how the partition stands.
    Status(PartitionStatus),
}

/// What a partition's leader tells every other broker every few ticks, so any broker can answer
/// metadata about any partition: brokers without a replica learn leader, term, watermarks and
/// in-sync replicas; followers learn the in-sync replicas, which only the leader knows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionStatus {
    pub group: LogId,
    pub term: u64,
    pub leader: u64,
    pub high_watermark: u64,
    pub log_start_offset: u64,
    pub log_size_bytes: u64,
    pub in_sync: Vec<u64>,
}

/// Cheap-to-clone map of broker id → that broker's outbound queue.
#[derive(Debug, Clone, Default)]
pub struct Transport {
    /// A std RwLock: written when peers are registered at start-up, then only read.
    peers: Arc<RwLock<HashMap<u64, mpsc::Sender<Outbound>>>>,
}

impl Transport {
    /// Register the queue of broker `id`; returns its receiving end for the peer link.
    pub fn register(&self, id: u64) -> mpsc::Receiver<Outbound> {
        let (sender, receiver) = mpsc::channel(PEER_QUEUE_CAPACITY);
        if let Ok(mut peers) = self.peers.write() {
            peers.insert(id, sender);
        }
        receiver
    }

    /// Queue `messages` of `group` to their destinations; returns how many were dropped.
    pub fn send(&self, group: LogId, messages: Vec<Message>) -> usize {
        if messages.is_empty() {
            return 0;
        }
        let Ok(peers) = self.peers.read() else {
            return messages.len();
        };
        let mut dropped = 0;
        for message in messages {
            match peers.get(&message.to) {
                Some(queue) => {
                    if queue.try_send(Outbound::Raft { group, message }).is_err() {
                        dropped += 1;
                    }
                }
                None => dropped += 1,
            }
        }
        if dropped > 0 {
            tracing::debug!(
                ?group,
                dropped,
                "raft messages dropped (peer unknown or its queue is full)"
            );
        }
        dropped
    }

    /// Queue a snapshot fetch or chunk for broker `to`; false if it was dropped (the asker
    /// retries after a timeout).
    pub fn send_to(&self, to: u64, item: Outbound) -> bool {
        let Ok(peers) = self.peers.read() else {
            return false;
        };
        peers
            .get(&to)
            .is_some_and(|queue| queue.try_send(item).is_ok())
    }
}

/// Delivers a Raft message from another broker to the local replica of its group.
#[derive(Debug, actix::Message)]
#[rtype(result = "()")]
pub struct RaftInbound(pub Message);

/// Delivers another broker's snapshot fetch to the local replica of its group.
#[derive(Debug, actix::Message)]
#[rtype(result = "()")]
pub struct FetchInbound(pub SnapshotFetch);

/// Delivers records for a snapshot install to the local replica of its group.
#[derive(Debug, actix::Message)]
#[rtype(result = "()")]
pub struct ChunkInbound(pub SnapshotChunk);

/// The Raft group id of the metadata group (topic ids start at 1).
pub const METADATA_GROUP: LogId = LogId {
    topic_id: 0,
    partition: 0,
};

/// What this broker knows about the cluster: who is in it, where their HTTP APIs are, and who
/// leads the metadata group. Shared by the actors and the HTTP layer.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// Every broker id in the cluster (from the seeds), sorted.
    pub brokers: Arc<Vec<u64>>,
    pub self_id: u64,
    /// Broker id → its HTTP address, learned from peer handshakes. A std RwLock: tiny, no awaits.
    http: Arc<RwLock<HashMap<u64, String>>>,
    /// Leader of the metadata group as last seen; 0 = unknown (then the broker is not ready).
    metadata_leader: Arc<std::sync::atomic::AtomicU64>,
    /// When a frame last arrived from each broker: liveness for "in sync".
    heard: Arc<RwLock<HashMap<u64, std::time::Instant>>>,
}

impl Cluster {
    pub fn new(self_id: u64, mut brokers: Vec<u64>, self_http: String) -> Self {
        brokers.sort_unstable();
        brokers.dedup();
        let cluster = Self {
            brokers: Arc::new(brokers),
            self_id,
            ..Self::default()
        };
        cluster.set_http(self_id, self_http);
        cluster
    }

    pub fn set_http(&self, id: u64, http: String) {
        if let Ok(mut map) = self.http.write() {
            map.insert(id, http);
        }
    }

    /// The HTTP address of broker `id`, if known.
    pub fn http_of(&self, id: u64) -> Option<String> {
        self.http.read().ok().and_then(|m| m.get(&id).cloned())
    }

    /// A frame from broker `id` just arrived.
    pub fn heard_from(&self, id: u64) {
        if let Ok(mut heard) = self.heard.write() {
            heard.insert(id, std::time::Instant::now());
        }
    }

    /// Whether broker `id` (this one always) was heard from within `window`.
    pub fn is_alive(&self, id: u64, window: std::time::Duration) -> bool {
        id == self.self_id
            || self
                .heard
                .read()
                .ok()
                .and_then(|h| h.get(&id).map(|at| at.elapsed() <= window))
                .unwrap_or(false)
    }

    pub fn metadata_leader(&self) -> u64 {
        self.metadata_leader
            .load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn set_metadata_leader(&self, id: u64) {
        self.metadata_leader
            .store(id, std::sync::atomic::Ordering::Release);
    }
}
