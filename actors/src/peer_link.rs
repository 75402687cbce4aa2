//! `PeerLink`: the one TCP connection from this broker to another, and the listener for theirs.
//!
//! Outbound, each link drains its broker's queue from [`Transport`], batching every queued Raft
//! message (of any partition) into length-delimited frames of up to 8 MiB, sent with one write
//! per batch; on any error it reconnects with backoff and drops the batch in hand (Raft
//! retransmits). Inbound, each accepted
//! connection's frames are decoded and each message goes to the local replica of its group
//! through the [`Registry`]. Frames are rmp-serde envelopes; Raft messages inside them keep
//! raft-rs's own protobuf encoding.
//!
//! Entries are the bulk of the bytes, so neither side copies them more than it must: a batch is
//! encoded into one reused buffer and written with one call, and a received message is parsed
//! from the frame's own buffer, so its entries' data are slices of it, not copies.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use protobuf::Message as _;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use crate::groups::offsets_replica::OFFSETS_TOPIC_ID;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::snapshot::{SnapshotChunk, SnapshotFetch};
use crate::topic::LogId;
use crate::transport::{
    ChunkInbound, Cluster, FetchInbound, Outbound, PartitionStatus, PeerQueue, QuiesceInbound,
    QuiesceNotice, RaftInbound, METADATA_GROUP,
};

/// Largest frame accepted or sent; a batch is cut before it grows past this.
pub const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Raft messages packed into one frame at most.
const FRAME_MESSAGES_MAX: usize = 4096;
/// A frame of Raft messages is closed once its messages add up to this many bytes.
const FRAME_RAFT_BYTES: usize = 8 * 1024 * 1024;
/// The reused send buffers are shrunk back to this when a large batch grew them past it.
const SEND_BUFFER_KEEP_BYTES: usize = 4 * 1024 * 1024;
const RECONNECT_DELAY_INITIAL: Duration = Duration::from_millis(20);
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(1);

/// What travels between brokers. Decoded borrowing from the received frame.
#[derive(Debug, Serialize, Deserialize)]
enum Frame<'a> {
    /// First frame on a connection: who is calling, and where its HTTP API and its Kafka
    /// listener (if it has one) are.
    Hello {
        from: u64,
        http: String,
        #[serde(default)]
        kafka: Option<String>,
    },
    /// Raft messages, each for one group, in raft-rs's protobuf encoding (as MessagePack
    /// binary: a `Vec<u8>` would be an array of numbers, a byte at a time both ways).
    Raft {
        #[serde(borrow)]
        messages: Vec<(LogId, &'a serde_bytes::Bytes)>,
    },
    /// A follower installing a snapshot asks for records.
    Fetch(SnapshotFetch),
    /// Records for a follower installing a snapshot.
    Chunk(SnapshotChunk),
    /// A partition leader's view of its partition, for brokers that are not its leader.
    Status(PartitionStatus),
    /// A leader quiesces an idle group on this follower.
    Quiesce(QuiesceNotice),
    /// Sent on an idle link every [`PING_INTERVAL`]: brokers stay heard from (liveness) while
    /// every group between them is quiesced and sends nothing.
    Ping,
}

/// How often an idle link says it is alive.
pub const PING_INTERVAL: Duration = Duration::from_millis(100);

/// Append `frame` to `out` the way [`LengthDelimitedCodec`] reads it: a 4-byte big-endian
/// length, then the MessagePack envelope. A frame that cannot be encoded or is over
/// [`FRAME_BYTES_MAX`] is left out (logged): the peer would refuse it and drop the connection.
fn put_frame(out: &mut Vec<u8>, frame: &Frame<'_>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let encoded = rmp_serde::encode::write(out, frame);
    let length = out.len() - start - 4;
    match (encoded, u32::try_from(length)) {
        (Ok(()), Ok(prefix)) if length <= FRAME_BYTES_MAX => {
            out[start..start + 4].copy_from_slice(&prefix.to_be_bytes());
        }
        (result, _) => {
            out.truncate(start);
            tracing::warn!(length, error = ?result.err(), "peer frame not sent (unencodable or too large)");
        }
    }
}

/// Raft messages being gathered into frames: their protobuf encodings, back to back in one
/// reused buffer.
#[derive(Default)]
struct RaftBatch {
    encoded: Vec<u8>,
    messages: Vec<(LogId, Range<usize>)>,
}

impl RaftBatch {
    /// Add `message`; once the gathered messages reach [`FRAME_RAFT_BYTES`], they go to `out` as
    /// one frame.
    fn push(&mut self, group: LogId, message: &raft::prelude::Message, out: &mut Vec<u8>) {
        let start = self.encoded.len();
        match message.write_to_vec(&mut self.encoded) {
            Ok(()) => self.messages.push((group, start..self.encoded.len())),
            Err(e) => {
                self.encoded.truncate(start);
                tracing::warn!(error = %e, "raft message not encodable; dropped");
            }
        }
        if self.encoded.len() >= FRAME_RAFT_BYTES {
            self.put_frame(out);
        }
    }

    /// Append the gathered messages to `out` as one frame and start over.
    fn put_frame(&mut self, out: &mut Vec<u8>) {
        if self.messages.is_empty() {
            return;
        }
        let messages = self
            .messages
            .iter()
            .map(|(group, range)| {
                (
                    *group,
                    serde_bytes::Bytes::new(&self.encoded[range.clone()]),
                )
            })
            .collect();
        put_frame(out, &Frame::Raft { messages });
        self.encoded.clear();
        self.messages.clear();
    }
}

/// A slice of `frame` (which `part` must borrow from) sharing its buffer; a copy otherwise.
fn share(frame: &Bytes, part: &[u8]) -> Bytes {
    let inside = frame.as_ptr_range();
    let range = part.as_ptr_range();
    if inside.start <= range.start && range.end <= inside.end {
        frame.slice_ref(part)
    } else {
        Bytes::copy_from_slice(part)
    }
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
    queue: Option<PeerQueue>,
}

impl PeerLink {
    pub fn new(
        peer: u64,
        address: SocketAddr,
        cluster: Cluster,
        metrics: std::sync::Arc<Metrics>,
        queue: PeerQueue,
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
            kafka: self.cluster.kafka_of(self.cluster.self_id),
        };
        let mut encoded = Vec::new();
        put_frame(&mut encoded, &hello);
        let task = run_outbound(
            self.peer,
            self.address,
            encoded,
            queue,
            self.metrics.clone(),
        );
        ctx.spawn(actix::fut::wrap_future(task));
    }
}

/// Run the link until its queue closes (the broker shuts down). A panic in the link is
/// contained here: the link starts over from a fresh connection with the same queue (what was
/// in hand is dropped; Raft retransmits), and `pubg1_actor_restarts_total{actor="peer_link"}`
/// counts it.
async fn run_outbound(
    peer: u64,
    address: SocketAddr,
    hello: Vec<u8>,
    mut queue: PeerQueue,
    metrics: std::sync::Arc<Metrics>,
) {
    loop {
        let link = run_link(peer, address, &hello, &mut queue, &metrics);
        match std::panic::AssertUnwindSafe(link).catch_unwind().await {
            Ok(()) => return,
            Err(panic) => {
                tracing::error!(peer, %address, message = %crate::raft_driver::panic_message(&*panic), "peer link crashed; starting it again");
                metrics
                    .actor_restarts_total
                    .with_label_values(&["peer_link"])
                    .inc();
                tokio::time::sleep(RECONNECT_DELAY_INITIAL).await;
            }
        }
    }
}

async fn run_link(
    peer: u64,
    address: SocketAddr,
    hello: &[u8],
    queue: &mut PeerQueue,
    metrics: &Metrics,
) {
    let mut delay = RECONNECT_DELAY_INITIAL;
    let label = peer.to_string();
    let mut raft = RaftBatch::default();
    let mut out = Vec::new();
    loop {
        // Whatever queued while the peer was unreachable is stale (old appends, heartbeats of
        // past terms): drop it rather than flood the peer when it comes back. Raft retransmits.
        while queue.try_recv().is_some() {}
        let mut stream = match TcpStream::connect(address).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                stream
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RECONNECT_DELAY_MAX);
                continue;
            }
        };
        if stream.write_all(hello).await.is_err() {
            continue;
        }
        metrics
            .peer_connects_total
            .with_label_values(&[label.as_str()])
            .inc();
        tracing::info!(peer, %address, "peer link connected");
        delay = RECONNECT_DELAY_INITIAL;
        loop {
            let first = match tokio::time::timeout(PING_INTERVAL, queue.recv()).await {
                Ok(Some(first)) => first,
                Ok(None) => return,
                Err(_) => {
                    let mut ping = Vec::new();
                    put_frame(&mut ping, &Frame::Ping);
                    if stream.write_all(&ping).await.is_err() {
                        tracing::warn!(peer, %address, "peer link lost; reconnecting");
                        break;
                    }
                    continue;
                }
            };
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(item) = next.take() {
                taken += 1;
                encode(item, &mut raft, &mut out);
                if taken < FRAME_MESSAGES_MAX {
                    next = queue.try_recv();
                }
            }
            raft.put_frame(&mut out);
            metrics
                .peer_queue_depth
                .with_label_values(&[label.as_str()])
                .set(queue.len() as i64);
            let written = stream.write_all(&out).await;
            out.clear();
            if out.capacity() > SEND_BUFFER_KEEP_BYTES {
                out.shrink_to(SEND_BUFFER_KEEP_BYTES);
                raft.encoded.shrink_to(SEND_BUFFER_KEEP_BYTES);
            }
            if written.is_err() {
                tracing::warn!(peer, %address, "peer link lost; reconnecting");
                break;
            }
        }
    }
}

/// Accept peer connections on `listener` (non-blocking; see [`crate::port`]) and deliver their
/// Raft messages locally, on `thread`.
pub fn serve(
    listener: std::net::TcpListener,
    registry: Registry,
    cluster: Cluster,
    metrics: std::sync::Arc<Metrics>,
    thread: &ArbiterHandle,
) {
    thread.spawn(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!(error = %e, "peer listener");
                return;
            }
        };
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let connection = serve_inbound(stream, registry.clone(), cluster.clone());
                    let metrics = metrics.clone();
                    // A panic ends this connection only; the peer reconnects.
                    actix::spawn(async move {
                        let served = std::panic::AssertUnwindSafe(connection).catch_unwind();
                        if let Err(panic) = served.await {
                            tracing::error!(message = %crate::raft_driver::panic_message(&*panic), "inbound peer connection crashed; closed");
                            metrics
                                .actor_restarts_total
                                .with_label_values(&["peer_inbound"])
                                .inc();
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "accepting a peer connection"),
            }
        }
    });
}

async fn serve_inbound(stream: TcpStream, registry: Registry, cluster: Cluster) {
    let mut frames = FramedRead::new(stream, codec());
    let mut peer = None;
    while let Some(Ok(frame)) = frames.next().await {
        if let Some(id) = peer {
            cluster.heard_from(id);
        }
        let frame = frame.freeze();
        match rmp_serde::from_slice::<Frame<'_>>(&frame) {
            Ok(Frame::Hello { from, http, kafka }) => {
                peer = Some(from);
                cluster.heard_from(from);
                cluster.set_http(from, http);
                if let Some(kafka) = kafka {
                    cluster.set_kafka(from, kafka);
                }
            }
            Ok(Frame::Raft { messages }) => {
                for (group, encoded) in messages {
                    let encoded = share(&frame, encoded);
                    let Ok(message) = raft::prelude::Message::parse_from_carllerche_bytes(&encoded)
                    else {
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
            Ok(Frame::Quiesce(notice)) => {
                if let Some(addr) = registry
                    .partition_by_log(notice.group)
                    .and_then(|p| p.addr())
                {
                    addr.do_send(QuiesceInbound(notice));
                }
            }
            Ok(Frame::Ping) => {}
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
    } else if group.topic_id == OFFSETS_TOPIC_ID {
        if let Some(addr) = registry
            .offsets()
            .get(group.partition as usize)
            .and_then(|p| p.addr())
        {
            addr.do_send(RaftInbound(message));
        }
    } else if let Some(addr) = registry.partition_by_log(group).and_then(|p| p.addr()) {
        addr.do_send(RaftInbound(message));
    }
}

/// Put one queued item into `out`, in queue order. Raft messages of every group go out
/// together (in frames of at most FRAME_RAFT_BYTES); anything else is a frame of its own, after
/// the Raft messages queued before it. Order matters: a quiesce notice that overtook the
/// heartbeat its leader sent just before it would quiesce a follower that the heartbeat then
/// wakes, with the leader silent; the follower times out and unseats an idle, healthy leader.
fn encode(item: Outbound, raft: &mut RaftBatch, out: &mut Vec<u8>) {
    let frame = match item {
        Outbound::Raft { group, message } => return raft.push(group, &message, out),
        Outbound::Fetch(fetch) => Frame::Fetch(fetch),
        Outbound::Chunk(chunk) => Frame::Chunk(chunk),
        Outbound::Status(status) => Frame::Status(status),
        Outbound::Quiesce(notice) => Frame::Quiesce(notice),
    };
    raft.put_frame(out);
    put_frame(out, &frame);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use raft::prelude::{Entry, Message, MessageType};
    use tokio_util::codec::Decoder;

    fn append(to: u64, index: u64, data: Vec<u8>) -> Message {
        let mut entry = Entry::default();
        entry.set_index(index);
        entry.set_term(3);
        entry.set_data(Bytes::from(data));
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgAppend);
        message.set_to(to);
        message.set_term(3);
        message.mut_entries().push(entry);
        message
    }

    /// What a peer's `serve_inbound` reads from a stream of `out`'s bytes.
    fn read_frames(out: &[u8]) -> Vec<Bytes> {
        let mut codec = codec();
        let mut buffer = BytesMut::from(out);
        let mut frames = Vec::new();
        while let Some(frame) = codec.decode(&mut buffer).expect("decodes") {
            frames.push(frame.freeze());
        }
        assert!(buffer.is_empty(), "no partial frame left over");
        frames
    }

    #[test]
    fn raft_batches_arrive_whole_and_entries_share_the_received_frame() {
        let partition = LogId {
            topic_id: 7,
            partition: 2,
        };
        let first = append(2, 10, vec![0xAB; 3000]);
        let second = append(2, 11, (0..=255).collect());
        let mut raft = RaftBatch::default();
        let mut out = Vec::new();
        raft.push(partition, &first, &mut out);
        raft.push(METADATA_GROUP, &second, &mut out);
        raft.put_frame(&mut out);
        put_frame(
            &mut out,
            &Frame::Hello {
                from: 3,
                http: "127.0.0.1:8083".into(),
                kafka: Some("127.0.0.1:9093".into()),
            },
        );
        assert!(
            raft.messages.is_empty() && raft.encoded.is_empty(),
            "batch starts over"
        );

        let frames = read_frames(&out);
        assert_eq!(frames.len(), 2);
        let Ok(Frame::Raft { messages }) = rmp_serde::from_slice::<Frame<'_>>(&frames[0]) else {
            panic!("first frame is the raft batch");
        };
        let decoded: Vec<(LogId, Message)> = messages
            .into_iter()
            .map(|(group, encoded)| {
                let shared = share(&frames[0], encoded);
                let message = Message::parse_from_carllerche_bytes(&shared).expect("parses");
                (group, message)
            })
            .collect();
        assert_eq!(
            decoded,
            vec![(partition, first), (METADATA_GROUP, second)],
            "same groups, same messages, same order"
        );
        let frame = frames[0].as_ptr_range();
        for (_, message) in &decoded {
            let data = message.get_entries()[0].get_data().as_ptr_range();
            assert!(
                frame.start <= data.start && data.end <= frame.end,
                "entry data is a slice of the received frame, not a copy"
            );
        }
        match rmp_serde::from_slice::<Frame<'_>>(&frames[1]) {
            Ok(Frame::Hello { from, http, kafka }) => {
                assert_eq!((from, http.as_str()), (3, "127.0.0.1:8083"));
                assert_eq!(kafka.as_deref(), Some("127.0.0.1:9093"));
            }
            other => panic!("second frame is the hello: {other:?}"),
        }
    }

    /// The heartbeat a leader sends as it quiesces must reach the follower before the notice:
    /// the other way round, the heartbeat wakes the follower the notice just quiesced.
    #[test]
    fn frames_leave_in_the_order_their_items_were_queued() {
        let group = LogId {
            topic_id: 7,
            partition: 2,
        };
        let mut heartbeat = Message::default();
        heartbeat.set_msg_type(MessageType::MsgHeartbeat);
        heartbeat.set_to(2);
        heartbeat.set_term(3);
        let notice = QuiesceNotice {
            group,
            term: 3,
            index: 10,
            leader: 1,
        };
        let mut raft = RaftBatch::default();
        let mut out = Vec::new();
        let items = [
            Outbound::Raft {
                group,
                message: append(2, 10, vec![1; 16]),
            },
            Outbound::Raft {
                group,
                message: heartbeat.clone(),
            },
            Outbound::Quiesce(notice),
            Outbound::Raft {
                group: METADATA_GROUP,
                message: heartbeat,
            },
        ];
        for item in items {
            encode(item, &mut raft, &mut out);
        }
        raft.put_frame(&mut out);
        let kinds: Vec<String> = read_frames(&out)
            .iter()
            .map(|frame| match rmp_serde::from_slice::<Frame<'_>>(frame) {
                Ok(Frame::Raft { messages }) => format!("raft x{}", messages.len()),
                Ok(Frame::Quiesce(got)) => {
                    assert_eq!(got, notice);
                    "quiesce".into()
                }
                other => panic!("unexpected frame {other:?}"),
            })
            .collect();
        assert_eq!(kinds, vec!["raft x2", "quiesce", "raft x1"]);
    }

    #[test]
    fn a_large_batch_is_cut_into_frames_of_bounded_size() {
        let mut raft = RaftBatch::default();
        let mut out = Vec::new();
        let entry_bytes = 1024 * 1024;
        let count = FRAME_RAFT_BYTES / entry_bytes * 2 + 1;
        for index in 0..count as u64 {
            let message = append(2, index, vec![index as u8; entry_bytes]);
            raft.push(METADATA_GROUP, &message, &mut out);
        }
        raft.put_frame(&mut out);
        let frames = read_frames(&out);
        assert!(frames.len() >= 3, "{} frames", frames.len());
        let mut indexes = Vec::new();
        for frame in &frames {
            assert!(frame.len() <= FRAME_RAFT_BYTES + entry_bytes + 4096);
            let Ok(Frame::Raft { messages }) = rmp_serde::from_slice::<Frame<'_>>(frame) else {
                panic!("raft frame");
            };
            for (_, encoded) in messages {
                let message = Message::parse_from_bytes(encoded).expect("parses");
                let entry = &message.get_entries()[0];
                assert_eq!(entry.get_data().len(), entry_bytes);
                assert!(entry
                    .get_data()
                    .iter()
                    .all(|&b| b == entry.get_index() as u8));
                indexes.push(entry.get_index());
            }
        }
        assert_eq!(
            indexes,
            (0..count as u64).collect::<Vec<_>>(),
            "all, in order"
        );
    }

    #[test]
    fn a_frame_over_the_limit_is_left_out_not_sent_broken() {
        let mut out = Vec::new();
        put_frame(
            &mut out,
            &Frame::Hello {
                from: 1,
                http: "x".repeat(FRAME_BYTES_MAX + 1),
                kafka: None,
            },
        );
        assert!(out.is_empty());
        put_frame(
            &mut out,
            &Frame::Hello {
                from: 1,
                http: "ok".into(),
                kafka: None,
            },
        );
        assert_eq!(read_frames(&out).len(), 1);
    }

    #[test]
    fn share_copies_what_is_not_inside_the_frame() {
        let frame = Bytes::from_static(b"abcdef");
        let inside = share(&frame, &frame[1..3]);
        assert_eq!(inside.as_ptr(), frame[1..].as_ptr());
        let elsewhere = [1u8, 2, 3];
        assert_eq!(&share(&frame, &elsewhere)[..], &elsewhere);
    }
}
