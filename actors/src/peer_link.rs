//! `PeerLink`: the one TCP connection from this broker to another, and the listener for theirs.
//!
//! Outbound, each link drains its broker's queue from [`Transport`], batching every queued Raft
//! message (of any partition) into one length-delimited frame per flush; on any error it
//! reconnects with backoff and drops the batch in hand (Raft retransmits). Inbound, each accepted
//! connection's frames are decoded and each message goes to the local replica of its group
//! through the [`Registry`]. Frames are rmp-serde envelopes; Raft messages inside them keep
//! raft-rs's own protobuf encoding.

use std::net::SocketAddr;
use std::time::Duration;

use actix::prelude::*;
use futures::{SinkExt, StreamExt};
use protobuf::Message as _;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::snapshot::{SnapshotChunk, SnapshotFetch};
use crate::topic::LogId;
use crate::transport::{
    ChunkInbound, Cluster, FetchInbound, Outbound, PartitionStatus, RaftInbound, METADATA_GROUP,
};

/// Largest frame accepted or sent; a batch is cut before it grows past this.
pub const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Raft messages packed into one frame at most.
const FRAME_MESSAGES_MAX: usize = 4096;
const RECONNECT_DELAY_INITIAL: Duration = Duration::from_millis(20);
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(1);

/// What travels between brokers.
#[derive(Debug, Serialize, Deserialize)]
enum Frame {
    /// First frame on a connection: who is calling, and where its HTTP API is.
    Hello { from: u64, http: String },
    /// Raft messages, each for one group, in raft-rs's protobuf encoding (as MessagePack
    /// binary: a `Vec<u8>` would be an array of numbers, a byte at a time both ways).
    Raft {
        messages: Vec<(LogId, bytes::Bytes)>,
    },
    /// A follower installing a snapshot asks for records.
    Fetch(SnapshotFetch),
    /// Records for a follower installing a snapshot.
    Chunk(SnapshotChunk),
    /// A partition leader's view of its partition, for brokers that are not its leader.
    Status(PartitionStatus),
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(FRAME_BYTES_MAX)
        .new_codec()
}

/// The outbound link to one peer broker.
pub struct PeerLink {
    peer: u64,
    address: SocketAddr,
    cluster: Cluster,
    metrics: std::sync::Arc<Metrics>,
    /// Taken by the connection task when the actor starts.
    queue: Option<mpsc::Receiver<Outbound>>,
}

impl PeerLink {
    pub fn new(
        peer: u64,
        address: SocketAddr,
        cluster: Cluster,
        metrics: std::sync::Arc<Metrics>,
        queue: mpsc::Receiver<Outbound>,
    ) -> Self {
        Self {
            peer,
            address,
            cluster,
            metrics,
            queue: Some(queue),
        }
    }
}

impl Actor for PeerLink {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(queue) = self.queue.take() else {
            return;
        };
        let hello = Frame::Hello {
            from: self.cluster.self_id,
            http: self
                .cluster
                .http_of(self.cluster.self_id)
                .unwrap_or_default(),
        };
        let Ok(hello) = rmp_serde::to_vec(&hello) else {
            return;
        };
        let task = run_outbound(self.peer, self.address, hello, queue, self.metrics.clone());
        ctx.spawn(actix::fut::wrap_future(task));
    }
}

async fn run_outbound(
    peer: u64,
    address: SocketAddr,
    hello: Vec<u8>,
    mut queue: mpsc::Receiver<Outbound>,
    metrics: std::sync::Arc<Metrics>,
) {
    let mut delay = RECONNECT_DELAY_INITIAL;
    let label = peer.to_string();
    loop {
        // Whatever queued while the peer was unreachable is stale (old appends, heartbeats of
        // past terms): drop it rather than flood the peer when it comes back. Raft retransmits.
        while queue.try_recv().is_ok() {}
        let mut framed = match TcpStream::connect(address).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                Framed::new(stream, codec())
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RECONNECT_DELAY_MAX);
                continue;
            }
        };
        if framed
            .send(bytes::Bytes::from(hello.clone()))
            .await
            .is_err()
        {
            continue;
        }
        metrics
            .peer_connects_total
            .with_label_values(&[label.as_str()])
            .inc();
        tracing::info!(peer, %address, "peer link connected");
        delay = RECONNECT_DELAY_INITIAL;
        loop {
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < FRAME_MESSAGES_MAX {
                match queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            metrics
                .peer_queue_depth
                .with_label_values(&[label.as_str()])
                .set(queue.len() as i64);
            // Raft messages of every group go out as one frame; snapshot traffic as its own.
            let mut frames = Vec::new();
            let mut messages = Vec::new();
            for item in batch {
                match item {
                    Outbound::Raft { group, message } => {
                        if let Ok(bytes) = message.write_to_bytes() {
                            messages.push((group, bytes::Bytes::from(bytes)));
                        }
                    }
                    Outbound::Fetch(fetch) => frames.push(Frame::Fetch(fetch)),
                    Outbound::Chunk(chunk) => frames.push(Frame::Chunk(chunk)),
                    Outbound::Status(status) => frames.push(Frame::Status(status)),
                }
            }
            if !messages.is_empty() {
                frames.insert(0, Frame::Raft { messages });
            }
            let mut lost = false;
            for frame in frames {
                let Ok(frame) = rmp_serde::to_vec(&frame) else {
                    continue;
                };
                if framed.feed(bytes::Bytes::from(frame)).await.is_err() {
                    lost = true;
                    break;
                }
            }
            if lost || SinkExt::<bytes::Bytes>::flush(&mut framed).await.is_err() {
                tracing::warn!(peer, %address, "peer link lost; reconnecting");
                break;
            }
        }
    }
}

/// Accept peer connections on `address` and deliver their Raft messages locally.
pub async fn listen(
    address: SocketAddr,
    registry: Registry,
    cluster: Cluster,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(address).await?;
    actix::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    actix::spawn(serve_inbound(stream, registry.clone(), cluster.clone()));
                }
                Err(e) => tracing::warn!(error = %e, "accepting a peer connection"),
            }
        }
    });
    Ok(())
}

async fn serve_inbound(stream: TcpStream, registry: Registry, cluster: Cluster) {
    let mut framed = Framed::new(stream, codec());
    let mut peer = None;
    while let Some(Ok(bytes)) = framed.next().await {
        if let Some(id) = peer {
            cluster.heard_from(id);
        }
        match rmp_serde::from_slice::<Frame>(&bytes) {
            Ok(Frame::Hello { from, http }) => {
                peer = Some(from);
                cluster.heard_from(from);
                cluster.set_http(from, http);
            }
            Ok(Frame::Raft { messages }) => {
                for (group, bytes) in messages {
                    let Ok(message) = raft::prelude::Message::parse_from_bytes(&bytes) else {
                        continue;
                    };
                    deliver(&registry, group, message);
                }
            }
            Ok(Frame::Fetch(fetch)) => {
                if let Some(addr) = registry
                    .partition_by_log(fetch.group)
                    .and_then(|p| p.addr())
                {
                    addr.do_send(FetchInbound(fetch));
                }
            }
            Ok(Frame::Status(status)) => {
                if let Some(partition) = registry.partition_by_log(status.group) {
                    partition.observe_status(&status);
                }
            }
            Ok(Frame::Chunk(chunk)) => {
                if let Some(addr) = registry
                    .partition_by_log(chunk.group)
                    .and_then(|p| p.addr())
                {
                    addr.do_send(ChunkInbound(chunk));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "undecodable peer frame; closing the connection");
                return;
            }
        }
    }
}

fn deliver(registry: &Registry, group: LogId, message: raft::prelude::Message) {
    if group == METADATA_GROUP {
        if let Some(metadata) = registry.metadata() {
            metadata.do_send(RaftInbound(message));
        }
    } else if let Some(addr) = registry.partition_by_log(group).and_then(|p| p.addr()) {
        addr.do_send(RaftInbound(message));
    }
}
