//! `Transport`: where Raft messages (and snapshot fetches) leave a replica for the other brokers.
//!
//! Each remote broker has one bounded queue, drained by its `PeerLink` (one TCP connection per
//! broker pair), which batches everything queued for that broker into one frame. Sending never
//! blocks an actor: when a peer's queue is full the message is dropped and counted, which Raft
//! tolerates (it retransmits on the next heartbeat), so a slow or dead peer cannot grow memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use raft::prelude::Message;
use tokio::sync::mpsc;

use crate::snapshot::{SnapshotChunk, SnapshotFetch};
use crate::topic::LogId;

/// Raft messages queued for one peer before new ones are dropped.
pub const PEER_QUEUE_CAPACITY: usize = 16_384;
/// Bytes of messages queued for one peer before new ones are dropped: a paused or slow peer
/// (its socket full) holds at most this much of this broker's memory in its queue, whatever the
/// size of the entries (a message can carry 1 MiB of them).
pub const PEER_QUEUE_BYTES_MAX: usize = 64 * 1024 * 1024;

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
    /// A leader whose group is idle tells a follower to stop ticking (see `PartitionReplica`).
    Quiesce(QuiesceNotice),
}

/// "This group is idle and fully replicated at `index` in `term`: stop ticking until you hear
/// from it again." A follower commits through `index` on it and quiesces once its own view
/// matches exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuiesceNotice {
    pub group: LogId,
    pub term: u64,
    pub index: u64,
    pub leader: u64,
}

/// Delivers a leader's [`QuiesceNotice`] to the local replica of its group.
#[derive(Debug, actix::Message)]
#[rtype(result = "()")]
pub struct QuiesceInbound(pub QuiesceNotice);

/// Start ticking again: a broker holding a replica of the group stopped being heard from (its
/// leader may be gone, or this replica, if it leads, may be cut off).
#[derive(Debug, actix::Message)]
#[rtype(result = "()")]
pub struct Wake;

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

impl Outbound {
    /// Roughly the bytes this holds in memory (its payload; a fixed allowance for the rest).
    pub fn bytes(&self) -> usize {
        const OVERHEAD: usize = 128;
        OVERHEAD
            + match self {
                Outbound::Raft { message, .. } => {
                    message
                        .entries
                        .iter()
                        .map(|e| e.data.len() + e.context.len())
                        .sum::<usize>()
                        + message.snapshot.as_ref().map_or(0, |s| s.data.len())
                }
                Outbound::Chunk(chunk) => chunk.batches.iter().map(|b| b.len()).sum(),
                Outbound::Fetch(_) | Outbound::Status(_) | Outbound::Quiesce(_) => 0,
            }
    }
}

/// One peer's queue: bounded in messages by the channel and in bytes by a counter the sender
/// raises and the [`PeerQueue`] lowers as the link takes messages.
#[derive(Debug, Clone)]
struct PeerSender {
    sender: mpsc::Sender<Outbound>,
    bytes: Arc<AtomicUsize>,
}

impl PeerSender {
    fn try_send(&self, item: Outbound) -> bool {
        let bytes = item.bytes();
        if self.bytes.fetch_add(bytes, Ordering::AcqRel) + bytes > PEER_QUEUE_BYTES_MAX {
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        if self.sender.try_send(item).is_err() {
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        true
    }
}

/// The receiving end of one peer's queue, for its `PeerLink`.
#[derive(Debug)]
pub struct PeerQueue {
    receiver: mpsc::Receiver<Outbound>,
    bytes: Arc<AtomicUsize>,
}

impl PeerQueue {
    fn taken(&self, item: Option<Outbound>) -> Option<Outbound> {
        if let Some(item) = &item {
            self.bytes.fetch_sub(item.bytes(), Ordering::AcqRel);
        }
        item
    }

    /// The next message; None once every sender is gone.
    pub async fn recv(&mut self) -> Option<Outbound> {
        let item = self.receiver.recv().await;
        self.taken(item)
    }

    /// The next message if one is queued.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        let item = self.receiver.try_recv().ok();
        self.taken(item)
    }

    /// Messages queued.
    pub fn len(&self) -> usize {
        self.receiver.len()
    }

    pub fn is_empty(&self) -> bool {
        self.receiver.is_empty()
    }

    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

/// Cheap-to-clone map of broker id → that broker's outbound queue.
#[derive(Debug, Clone, Default)]
pub struct Transport {
    /// A std RwLock: written when peers are registered at start-up, then only read.
    peers: Arc<RwLock<HashMap<u64, PeerSender>>>,
}

impl Transport {
    /// Register the queue of broker `id`; returns its receiving end for the peer link.
    pub fn register(&self, id: u64) -> PeerQueue {
        let (sender, receiver) = mpsc::channel(PEER_QUEUE_CAPACITY);
        let bytes = Arc::new(AtomicUsize::new(0));
        if let Ok(mut peers) = self.peers.write() {
            let sender = PeerSender {
                sender,
                bytes: bytes.clone(),
            };
            peers.insert(id, sender);
        }
        PeerQueue { receiver, bytes }
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
                    if !queue.try_send(Outbound::Raft { group, message }) {
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
        peers.get(&to).is_some_and(|queue| queue.try_send(item))
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
    /// Broker id → the Kafka listener address it advertises (host:port), for Metadata answers.
    kafka: Arc<RwLock<HashMap<u64, String>>>,
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

    pub fn set_kafka(&self, id: u64, kafka: String) {
        if let Ok(mut map) = self.kafka.write() {
            map.insert(id, kafka);
        }
    }

    /// The Kafka address broker `id` advertises, if it has a listener and it is known.
    pub fn kafka_of(&self, id: u64) -> Option<String> {
        self.kafka.read().ok().and_then(|m| m.get(&id).cloned())
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
