//! `/topics/{topic}/partitions`: where each partition's log stands.

use std::sync::Arc;

use actix_web::{get, post, web, HttpResponse};
use pubg1_actors::partition_replica::PartitionShared;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::{parse_json, State};

/// One replica of a partition.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicaInfo {
    pub broker: u32,
    pub leader: bool,
    /// Whether the leader counts this replica in sync (recently heard from, at most 1,000
    /// entries behind), as of the leader's last report (every 10 Raft ticks; the leader itself
    /// answers first-hand). Null until a report has arrived.
    pub in_sync: Option<bool>,
}

/// A partition: its leader, replicas and log offsets.
#[derive(Debug, Serialize, ToSchema)]
pub struct PartitionInfo {
    pub partition: u32,
    /// Leader's broker id as this broker sees it; 0 while no leader is known.
    pub leader: u32,
    /// The Raft term (Kafka's leader epoch) `leader` leads in: this broker's replica's term,
    /// or on a broker without a replica the term of the leader's last report (null before one).
    pub leader_epoch: Option<u64>,
    pub replicas: Vec<ReplicaInfo>,
    /// First offset still retained (on this broker's replica, else as the leader last reported).
    pub log_start_offset: u64,
    /// Offset after the last committed record: consumers read below it.
    pub high_watermark: u64,
    pub log_size_bytes: u64,
}

pub fn describe_partition(partition: &PartitionShared, _broker_id: u32) -> PartitionInfo {
    let (term, leader) = partition.leadership();
    let in_sync = partition.in_sync();
    PartitionInfo {
        partition: partition.partition,
        leader: leader as u32,
        leader_epoch: (partition.hosted || term > 0).then_some(term),
        replicas: partition
            .replicas
            .iter()
            .map(|id| ReplicaInfo {
                broker: *id as u32,
                leader: *id == leader,
                in_sync: in_sync.as_ref().map(|ids| ids.contains(id)),
            })
            .collect(),
        log_start_offset: partition.log_start_offset(),
        high_watermark: partition.high_watermark(),
        log_size_bytes: partition.log_size_bytes(),
    }
}

/// 421 for a partition this broker holds no replica of, naming the brokers that do and where
/// their HTTP APIs are (as learned from peer handshakes).
pub fn not_replica(state: &State, partition: &PartitionShared) -> ApiError {
    let cluster = &state.broker.cluster;
    let replicas: Vec<String> = partition
        .replicas
        .iter()
        .map(|id| match cluster.http_of(*id) {
            Some(http) => format!("broker {id} at http://{http}"),
            None => format!("broker {id}"),
        })
        .collect();
    ApiError::Misdirected(format!(
        "partition {} of topic '{}' is not replicated on broker {}; send the request to one of its replicas: {}",
        partition.partition,
        partition.topic,
        cluster.self_id,
        replicas.join(", ")
    ))
}

/// Look up a partition or answer 404 naming what is missing.
pub fn find(state: &State, topic: &str, partition: u32) -> Result<Arc<PartitionShared>, ApiError> {
    let handle = state
        .broker
        .registry
        .get(topic)
        .ok_or_else(|| ApiError::TopicNotFound(topic.to_owned()))?;
    let shared =
        handle
            .partition(partition)
            .cloned()
            .ok_or_else(|| ApiError::PartitionNotFound {
                topic: topic.to_owned(),
                partition: partition.to_string(),
            })?;
    Ok(shared)
}

/// All partitions of a topic.
#[utoipa::path(
    tag = "topics",
    params(("topic" = String, Path, description = "Topic name", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    responses((status = 200, body = Vec<PartitionInfo>), (status = 404, body = ErrorBody))
)]
#[get("/topics/{topic}/partitions")]
pub async fn list(state: State, topic: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let handle = state
        .broker
        .registry
        .get(&topic)
        .ok_or_else(|| ApiError::TopicNotFound(topic.into_inner()))?;
    let partitions: Vec<PartitionInfo> = handle
        .partitions
        .iter()
        .map(|p| describe_partition(p, state.config.id))
        .collect();
    Ok(HttpResponse::Ok().json(partitions))
}

/// One partition.
#[utoipa::path(
    tag = "topics",
    params(("topic" = String, Path, description = "Topic name", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), ("partition" = u32, Path, description = "Partition number")),
    responses((status = 200, body = PartitionInfo), (status = 404, body = ErrorBody))
)]
#[get("/topics/{topic}/partitions/{partition}")]
pub async fn describe(
    state: State,
    path: web::Path<(String, u32)>,
) -> Result<HttpResponse, ApiError> {
    let (topic, partition) = path.into_inner();
    let partition = find(&state, &topic, partition)?;
    Ok(HttpResponse::Ok().json(describe_partition(&partition, state.config.id)))
}

/// Where a partition's log ends, as its leader answers after a barrier.
#[derive(Debug, Serialize, ToSchema)]
pub struct BarrierAnswer {
    /// Every record committed before the barrier is below this offset, and readable.
    pub log_end_offset: u64,
    /// The leader epoch (Raft term) the barrier was committed in.
    pub leader_epoch: u64,
}

/// An optional barrier body: fence this idempotent producer at this epoch.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FenceRequest {
    #[serde(deserialize_with = "super::lenient::i64")]
    #[schema(minimum = 0)]
    pub producer_id: i64,
    #[serde(deserialize_with = "super::lenient::i16")]
    #[schema(minimum = 0, maximum = 32767)]
    pub producer_epoch: i16,
}

/// A read barrier through the partition's leader: commits an entry that appends nothing and
/// answers once it is applied. Unlike the high watermark right after a failover, the answer
/// covers every record an earlier leader got committed (stream jobs use it before they look
/// for their own results in an output topic). With a body it also *fences* the producer: from
/// then on, its batches of an older epoch are refused (409, 40909), so nothing of a deposed
/// writer can land after the barrier; a fence of an epoch older than the producer's is itself
/// refused (409, 40909).
#[utoipa::path(
    tag = "topics",
    params(("topic" = String, Path, description = "Topic name", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), ("partition" = u32, Path, description = "Partition number")),
    request_body(content = Option<FenceRequest>, content_type = "application/json"),
    responses((status = 200, body = BarrierAnswer), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 421, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody))
)]
#[post("/topics/{topic}/partitions/{partition}/barrier")]
pub async fn barrier(
    state: State,
    path: web::Path<(String, u32)>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let (topic, partition) = path.into_inner();
    // No body, or null: a plain barrier.
    let fence: Option<FenceRequest> = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        serde_json::from_slice::<Option<serde_json::Value>>(&body)
            .map_err(|e| ApiError::BadRequest(format!("request body is not valid: {e}")))?
            .map(|_| parse_json(&body))
            .transpose()?
    };
    if let Some(f) = &fence {
        if f.producer_id < 0 || f.producer_epoch < 0 {
            return Err(ApiError::Unprocessable(format!(
                "producer_id ({}) and producer_epoch ({}) must not be negative",
                f.producer_id, f.producer_epoch
            )));
        }
    }
    let partition = find(&state, &topic, partition)?;
    if !partition.hosted {
        return Err(not_replica(&state, &partition));
    }
    let appended = match fence {
        Some(f) => partition.fence(f.producer_id, f.producer_epoch).await?,
        None => partition.barrier().await?,
    };
    Ok(HttpResponse::Ok().json(BarrierAnswer {
        log_end_offset: appended.base_offset,
        leader_epoch: appended.leader_epoch,
    }))
}
