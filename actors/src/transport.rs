//! `Transport`: where Raft messages leave a replica for the other brokers.
//!
//! Each remote broker has one bounded queue, drained by its `PeerLink` (one TCP connection per
//! broker pair), which batches everything queued for that broker into one frame. Sending never
//! blocks an actor: when a peer's queue is full the message is dropped and counted, which Raft
//! tolerates (it retransmits on the next heartbeat), so a slow or dead peer cannot grow memory.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use raft::prelude::Message;
use tokio::sync::mpsc;

use crate::topic::LogId;

/// Raft messages queued for one peer before new ones are dropped.
pub const PEER_QUEUE_CAPACITY: usize = 16_384;

/// A Raft message for one group, on its way to another broker.
#[derive(Debug)]
pub struct Outbound {
    pub group: LogId,
    pub message: Message,
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
                    if queue.try_send(Outbound { group, message }).is_err() {
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
}
