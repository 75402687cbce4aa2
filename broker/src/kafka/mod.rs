//! The Kafka wire protocol listener: real Kafka clients (kcat, librdkafka, kafka-python, the Java
//! client) produce to and fetch from the same partitions as the HTTP API.
//!
//! One task per connection. Frames are length-prefixed (`LengthDelimitedCodec`, bounded by
//! `kafka_frame_bytes_max`); each is decoded with the `kafka-protocol` codec and handled by the
//! module of its API. Clients pipeline requests, so a connection runs up to
//! `kafka_in_flight_max` of them at once and writes the answers in request order
//! (`StreamExt::buffered`). A frame that cannot be decoded, an unknown API or an unsupported
//! version of an API other than ApiVersions closes that connection (Kafka does the same), with
//! a log line, and no request after it is started; it touches no other connection and not the
//! broker (the codec's allocations are bounded by the bytes a frame holds: see
//! `vendor/kafka-protocol/PUBG1-PATCH.md`, and `fuzz/` for the search). ApiVersions of a version we
//! do not know is answered in version 0 with UNSUPPORTED_VERSION and our versions (KIP-511), so
//! a newer client can pick one.
//!
//! Connections are spread over a few arbiters of their own, so the protocol's decoding and
//! encoding never run on a partition's or the HTTP server's threads.

mod apis;
pub mod codec;
mod errors;
mod fetch;
mod groups;
mod metadata;
mod offsets;
mod produce;
mod topics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix_rt::Arbiter;
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use kafka_protocol::messages::{ApiKey, RequestKind, ResponseKind};
use pubg1_actors::port::ClaimedPort;
use pubg1_actors::Broker;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::config::Config;

/// What every connection's handlers share.
pub struct Context {
    pub broker: Broker,
    pub config: Config,
}

/// The running listener; [`Listener::stop`] stops accepting.
pub struct Listener {
    accept: actix_rt::task::JoinHandle<()>,
    arbiters: Vec<Arbiter>,
}

impl Listener {
    pub fn stop(self) {
        self.accept.abort();
        for arbiter in self.arbiters {
            arbiter.stop();
        }
    }
}

/// Listen on `port` and serve every connection until [`Listener::stop`].
pub fn start(broker: Broker, config: &Config, port: ClaimedPort) -> std::io::Result<Listener> {
    let listener = tokio::net::TcpListener::from_std(port.listen()?)?;
    let context = Arc::new(Context {
        broker,
        config: config.clone(),
    });
    let arbiters: Vec<Arbiter> = (0..config.http_workers().clamp(1, 4))
        .map(|_| Arbiter::new())
        .collect();
    let handles: Vec<_> = arbiters.iter().map(Arbiter::handle).collect();
    tracing::info!(kafka = ?listener.local_addr().ok(), "Kafka listener started");
    let next = AtomicUsize::new(0);
    let accept = actix_rt::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "accepting a Kafka connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(stream) = stream.into_std() else {
                continue;
            };
            let context = context.clone();
            let arbiter = &handles[next.fetch_add(1, Ordering::Relaxed) % handles.len()];
            arbiter.spawn_fn(move || {
                let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
                    return;
                };
                actix_rt::spawn(serve_connection(stream, peer, context));
            });
        }
    });
    Ok(Listener { accept, arbiters })
}

/// Why a connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum Closed {
    #[error("{0}")]
    Malformed(String),
    #[error("reading: {0}")]
    Io(#[from] std::io::Error),
    #[error("an acks=0 batch was refused: {0}")]
    AcksZeroRefused(String),
}

impl From<codec::Malformed> for Closed {
    fn from(why: codec::Malformed) -> Self {
        Closed::Malformed(why.0)
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, peer: SocketAddr, context: Arc<Context>) {
    let _ = stream.set_nodelay(true);
    let codec = LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(context.config.kafka_frame_bytes_max)
        .new_codec();
    let (mut sink, frames) = Framed::new(stream, codec).split();
    let in_flight = context.config.kafka_in_flight_max;
    // Frames are decoded in order as they are read, and the stream ends at the first that
    // cannot be: no request after a malformed one is started (they run up to `in_flight` at
    // once, answered in order).
    let mut answers = frames
        .map(|frame| frame.map_err(Closed::Io).and_then(|f| prepare(f.freeze())))
        .scan(false, |ended, prepared| {
            if *ended {
                return futures::future::ready(None);
            }
            *ended = prepared.is_err();
            futures::future::ready(Some(prepared))
        })
        .map(|prepared| {
            let context = context.clone();
            async move { answer(&context, prepared?).await }
        })
        .buffered(in_flight);
    while let Some(answer) = answers.next().await {
        match answer {
            Ok(Some(response)) => {
                if let Err(e) = sink.send(response.freeze()).await {
                    tracing::debug!(%peer, error = %e, "Kafka connection closed while answering");
                    return;
                }
            }
            Ok(None) => {} // acks=0: no answer
            Err(Closed::Io(e)) => {
                tracing::debug!(%peer, error = %e, "Kafka connection closed");
                return;
            }
            Err(Closed::Malformed(why)) => {
                tracing::warn!(%peer, %why, "closing a Kafka connection after a malformed request");
                return;
            }
            Err(Closed::AcksZeroRefused(why)) => {
                tracing::info!(%peer, %why, "closing an acks=0 producer's connection so it notices a refused batch");
                return;
            }
        }
    }
}

/// A request ready to handle, or an answer already known.
pub enum Prepared {
    Request {
        api: ApiKey,
        version: i16,
        header: Box<kafka_protocol::messages::RequestHeader>,
        request: Box<RequestKind>,
    },
    Answer(BytesMut),
}

/// Decode one request frame (synchronously, in the order frames arrive).
pub fn prepare(frame: Bytes) -> Result<Prepared, Closed> {
    let (key, version, correlation_id) = codec::peek_header(&frame)?;
    let Ok(api) = ApiKey::try_from(key) else {
        return Err(Closed::Malformed(format!("unknown API key {key}")));
    };
    if !apis::supports(api, version) {
        if api == ApiKey::ApiVersions {
            // KIP-511: answer in version 0, which every client reads, with our versions.
            let response = apis::unsupported_version();
            return Ok(Prepared::Answer(codec::encode(
                api,
                0,
                correlation_id,
                &ResponseKind::ApiVersions(response),
            )?));
        }
        return Err(Closed::Malformed(format!(
            "{api:?} version {version} is not supported (see ApiVersions)"
        )));
    }
    let (header, request) = codec::decode(api, version, frame)?;
    Ok(Prepared::Request {
        api,
        version,
        header: Box::new(header),
        request: Box::new(request),
    })
}

/// Handle a decoded request and encode its answer (None: no answer is due).
pub async fn answer(context: &Context, prepared: Prepared) -> Result<Option<BytesMut>, Closed> {
    let (api, version, header, request) = match prepared {
        Prepared::Answer(answer) => return Ok(Some(answer)),
        Prepared::Request {
            api,
            version,
            header,
            request,
        } => (api, version, header, *request),
    };
    let response = match request {
        RequestKind::ApiVersions(_) => Some(ResponseKind::ApiVersions(apis::versions())),
        RequestKind::Metadata(request) => Some(ResponseKind::Metadata(
            metadata::handle(context, request, version).await,
        )),
        RequestKind::Produce(request) => match produce::handle(context, request, version).await {
            produce::Produced::Answer(response) => Some(ResponseKind::Produce(response)),
            produce::Produced::Nothing => None,
            produce::Produced::Refused(why) => return Err(Closed::AcksZeroRefused(why)),
        },
        RequestKind::Fetch(request) => Some(ResponseKind::Fetch(
            fetch::handle(context, request, version).await,
        )),
        RequestKind::ListOffsets(request) => Some(ResponseKind::ListOffsets(
            offsets::handle(context, request, version).await,
        )),
        RequestKind::InitProducerId(request) => Some(ResponseKind::InitProducerId(
            topics::init_producer_id(context, request).await,
        )),
        RequestKind::CreateTopics(request) => Some(ResponseKind::CreateTopics(
            topics::create(context, request, version).await,
        )),
        RequestKind::DeleteTopics(request) => Some(ResponseKind::DeleteTopics(
            topics::delete(context, request, version).await,
        )),
        RequestKind::FindCoordinator(request) => Some(ResponseKind::FindCoordinator(
            groups::find_coordinator(context, request, version).await,
        )),
        RequestKind::JoinGroup(request) => {
            let client_id = header
                .client_id
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_default();
            Some(ResponseKind::JoinGroup(
                groups::join_group(context, request, version, client_id).await,
            ))
        }
        RequestKind::SyncGroup(request) => Some(ResponseKind::SyncGroup(
            groups::sync_group(context, request).await,
        )),
        RequestKind::Heartbeat(request) => Some(ResponseKind::Heartbeat(
            groups::heartbeat(context, request).await,
        )),
        RequestKind::LeaveGroup(request) => Some(ResponseKind::LeaveGroup(
            groups::leave_group(context, request, version).await,
        )),
        RequestKind::OffsetCommit(request) => Some(ResponseKind::OffsetCommit(
            groups::offset_commit(context, request).await,
        )),
        RequestKind::OffsetFetch(request) => Some(ResponseKind::OffsetFetch(
            groups::offset_fetch(context, request, version).await,
        )),
        RequestKind::ListGroups(request) => Some(ResponseKind::ListGroups(
            groups::list_groups(context, request, version).await,
        )),
        RequestKind::DescribeGroups(request) => Some(ResponseKind::DescribeGroups(
            groups::describe_groups(context, request).await,
        )),
        RequestKind::DescribeConfigs(request) => Some(ResponseKind::DescribeConfigs(
            topics::describe_configs(context, request),
        )),
        RequestKind::DescribeCluster(_) => Some(ResponseKind::DescribeCluster(
            topics::describe_cluster(context),
        )),
        other => {
            return Err(Closed::Malformed(format!(
                "{:?} is not served",
                std::mem::discriminant(&other)
            )))
        }
    };
    let Some(response) = response else {
        return Ok(None);
    };
    Ok(Some(codec::encode(
        api,
        version,
        header.correlation_id,
        &response,
    )?))
}

/// `host:port` split, the port a valid one.
pub fn split_host_port(address: &str) -> Option<(String, i32)> {
    let (host, port) = address.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    (!host.is_empty()).then(|| (host.trim_matches(['[', ']']).to_owned(), i32::from(port)))
}
