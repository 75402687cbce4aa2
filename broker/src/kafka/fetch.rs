//! Fetch: whole stored batches, as the producers sent them (compressed ones stay compressed),
//! from the one holding the fetch offset. A long poll waits until `min_bytes` are there or
//! `max_wait_ms` passed, woken by any of the partitions' high watermarks moving, never by a
//! timer. Fetch sessions (KIP-227) are not kept: every answer is a full one (session id 0),
//! which clients accept.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::select_all;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{BrokerId, FetchRequest, FetchResponse, TopicName};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use pubg1_actors::log_reader::fetch_batches;
use pubg1_actors::partition_replica::PartitionShared;

use super::errors::partition_error;
use super::Context;

/// One requested partition, resolved.
struct Wanted {
    topic: String,
    index: i32,
    partition: Option<Arc<PartitionShared>>,
    offset: i64,
    max_bytes: usize,
}

pub async fn handle(context: &Context, request: FetchRequest, version: i16) -> FetchResponse {
    let registry = &context.broker.registry;
    let mut wanted = Vec::new();
    for topic in &request.topics {
        let name = topic.topic.0.to_string();
        let handle = registry.get(&name);
        for p in &topic.partitions {
            let partition = handle
                .as_ref()
                .and_then(|h| u32::try_from(p.partition).ok().and_then(|i| h.partition(i)))
                .filter(|shared| shared.hosted)
                .cloned();
            wanted.push(Wanted {
                topic: name.clone(),
                index: p.partition,
                partition,
                offset: p.fetch_offset,
                max_bytes: usize::try_from(p.partition_max_bytes).unwrap_or(0),
            });
        }
    }
    let max_wait = Duration::from_millis(
        u64::try_from(request.max_wait_ms)
            .unwrap_or(0)
            .min(context.config.fetch_wait_ms_max),
    );
    let min_bytes = usize::try_from(request.min_bytes).unwrap_or(0);
    // Bounded by the broker's own limits too: an answer must fit a frame.
    let max_bytes = usize::try_from(request.max_bytes)
        .unwrap_or(usize::MAX)
        .min(context.config.fetch_bytes_max)
        .min(context.config.kafka_frame_bytes_max / 2);
    let deadline = Instant::now() + max_wait;
    loop {
        // Subscribed before reading, so a write between the read and the wait still wakes us.
        let mut watches: Vec<_> = wanted
            .iter()
            .filter_map(|w| w.partition.as_ref())
            .map(|p| p.subscribe_high_watermark())
            .collect();
        let (answer, bytes) = read(context, &wanted, max_bytes, version).await;
        let now = Instant::now();
        if bytes >= min_bytes || now >= deadline || watches.is_empty() {
            return answer.with_session_id(0);
        }
        let changes = watches.iter_mut().map(|w| Box::pin(w.changed()));
        let _ = tokio::time::timeout(deadline - now, select_all(changes)).await;
    }
}

/// One pass over the partitions: their batches and how many bytes in all.
async fn read(
    context: &Context,
    wanted: &[Wanted],
    max_bytes: usize,
    version: i16,
) -> (FetchResponse, usize) {
    let storage = &context.broker.storage;
    let metrics = &context.broker.metrics;
    let mut total = 0usize;
    let mut topics: Vec<FetchableTopicResponse> = Vec::new();
    for w in wanted {
        let mut data = PartitionData::default()
            .with_partition_index(w.index)
            .with_high_watermark(-1)
            .with_last_stable_offset(-1)
            .with_log_start_offset(-1)
            .with_preferred_read_replica(BrokerId(-1))
            // Empty, not null: clients read a null as an error in some versions.
            .with_records(Some(Bytes::new()));
        match (&w.partition, u64::try_from(w.offset)) {
            (None, _) => {
                // A partition that exists elsewhere: the client asks its leader.
                let exists =
                    context.broker.registry.get(&w.topic).is_some_and(|t| {
                        u32::try_from(w.index).is_ok_and(|p| p < t.meta.partitions)
                    });
                let code = if exists {
                    ResponseError::NotLeaderOrFollower
                } else {
                    ResponseError::UnknownTopicOrPartition
                };
                data = data.with_error_code(code.code());
            }
            (Some(_), Err(_)) => {
                data = data.with_error_code(ResponseError::OffsetOutOfRange.code());
            }
            (Some(partition), Ok(offset)) => {
                // Each partition gets at most its own limit and what is left of the
                // response's; once that is spent the rest answer empty. The first batch of the
                // first partition with data goes whatever its size (KIP-74), so a client is
                // never stuck behind a batch larger than it asked for.
                let budget = if total == 0 {
                    w.max_bytes.min(max_bytes).max(1)
                } else {
                    w.max_bytes.min(max_bytes.saturating_sub(total))
                };
                let fetched = if budget == 0 {
                    None
                } else {
                    Some(fetch_batches(storage, partition, metrics, offset, budget).await)
                };
                match fetched {
                    None => {
                        data = data
                            .with_high_watermark(partition.high_watermark() as i64)
                            .with_last_stable_offset(partition.high_watermark() as i64)
                            .with_log_start_offset(partition.log_start_offset() as i64);
                    }
                    // Past the first partition with data, a batch larger than what is left
                    // waits for a fetch where it comes first.
                    Some(Ok(found))
                        if total > 0
                            && found.batches.iter().map(Bytes::len).sum::<usize>() > budget =>
                    {
                        data = data
                            .with_high_watermark(found.high_watermark as i64)
                            .with_last_stable_offset(found.high_watermark as i64)
                            .with_log_start_offset(found.log_start_offset as i64);
                    }
                    Some(Ok(found)) => {
                        let mut records = BytesMut::new();
                        for batch in &found.batches {
                            records.extend_from_slice(batch);
                        }
                        total += records.len();
                        data = data
                            .with_high_watermark(found.high_watermark as i64)
                            .with_last_stable_offset(found.high_watermark as i64)
                            .with_log_start_offset(found.log_start_offset as i64)
                            .with_records(Some(records.freeze()));
                    }
                    Some(Err(e)) => {
                        data = data
                            .with_error_code(partition_error(&e).code())
                            .with_high_watermark(partition.high_watermark() as i64)
                            .with_log_start_offset(partition.log_start_offset() as i64);
                    }
                }
            }
        }
        // The log start offset came with v5.
        if version < 5 {
            data.log_start_offset = -1;
        }
        match topics.last_mut() {
            Some(last) if last.topic.0.as_str() == w.topic => last.partitions.push(data),
            _ => topics.push(
                FetchableTopicResponse::default()
                    .with_topic(TopicName(StrBytes::from_string(w.topic.clone())))
                    .with_partitions(vec![data]),
            ),
        }
    }
    (FetchResponse::default().with_responses(topics), total)
}
