//! Produce: `POST /topics/{topic}` and `POST /topics/{topic}/partitions/{partition}`.
//!
//! The whole request is parsed and validated before anything is written, so bad input never
//! causes a partial write. Records are then grouped by partition and each group is appended as
//! one batch: all-or-nothing per partition. Replies come after the batches are durable.

use std::collections::BTreeMap;

use actix_web::{post, web, HttpRequest, HttpResponse};
use base64::Engine;
use bytes::Bytes;
use pubg1_actors::batch::{NewRecord, ProducerSequence};
use pubg1_actors::partitioner::partition_for_key;
use pubg1_actors::registry::TopicHandle;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::partitions::not_replica;
use super::{body_format, parse_json, read_body, EmbeddedFormat, State};

/// A produce request body.
///
/// With `producer_id`, `producer_epoch` and `sequence` (all three, on the one-partition path)
/// the request is idempotent, with Kafka's rules: its records take sequence numbers `sequence`,
/// `sequence + 1`, …; a retry of one of the producer's last five requests is answered with the
/// original offsets and stores nothing; a gap in the sequence is 409 (40908); an epoch older
/// than the producer's is 409 (40909). Get an id from `POST /producers`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProduceRequest {
    #[serde(deserialize_with = "super::lenient::objects")]
    pub records: Vec<ProduceRecord>,
    #[serde(default, deserialize_with = "super::lenient::opt::i64")]
    #[schema(minimum = 0)]
    pub producer_id: Option<i64>,
    #[serde(default, deserialize_with = "super::lenient::opt::i16")]
    #[schema(minimum = 0, maximum = 32767)]
    pub producer_epoch: Option<i16>,
    /// Sequence number of the first record.
    #[serde(default, deserialize_with = "super::lenient::opt::i32")]
    #[schema(minimum = 0, maximum = 2147483647)]
    pub sequence: Option<i32>,
}

/// One record to produce. With the JSON formats `key` and `value` are any JSON, stored as the
/// exact text sent (numbers keep every digit, objects their key order); with the binary format
/// they are base64 strings. A missing or null key means keyless.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProduceRecord {
    #[serde(default)]
    #[schema(value_type = Value)]
    pub key: Option<Box<RawValue>>,
    #[serde(default)]
    #[schema(value_type = Value)]
    pub value: Option<Box<RawValue>>,
    /// Send this record to this partition instead of choosing by key.
    #[serde(default, deserialize_with = "super::lenient::opt::u32")]
    pub partition: Option<u32>,
}

/// Where each record landed, in request order.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProduceResponse {
    pub offsets: Vec<RecordOffset>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RecordOffset {
    pub partition: u32,
    /// Null when this record's partition failed (see `error_code`).
    pub offset: Option<u64>,
    /// Raft term of the leader that appended the record (Kafka's leader epoch); absent on error
    /// and on a duplicate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader_epoch: Option<u64>,
    /// True when an idempotent producer's retry found its records already stored: the offsets
    /// are the original ones and nothing was stored again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Produce records to a topic; keys pick partitions as Kafka's default partitioner does.
#[utoipa::path(
    tag = "records",
    params(("topic" = String, Path, description = "Topic name", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    request_body(content(
        (ProduceRequest = "application/json"),
        (ProduceRequest = "application/vnd.kafka.json.v2+json"),
        (ProduceRequest = "application/vnd.kafka.binary.v2+json")
    )),
    responses(
        (status = 200, body = ProduceResponse),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody)
    )
)]
#[post("/topics/{topic}")]
pub async fn to_topic(
    state: State,
    topic: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    produce(state, topic.into_inner(), None, req, payload).await
}

/// Produce records to one partition.
#[utoipa::path(
    tag = "records",
    params(("topic" = String, Path, description = "Topic name", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), ("partition" = u32, Path, description = "Partition number")),
    request_body(content(
        (ProduceRequest = "application/json"),
        (ProduceRequest = "application/vnd.kafka.json.v2+json"),
        (ProduceRequest = "application/vnd.kafka.binary.v2+json")
    )),
    responses(
        (status = 200, body = ProduceResponse),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody)
    )
)]
#[post("/topics/{topic}/partitions/{partition}")]
pub async fn to_partition(
    state: State,
    path: web::Path<(String, u32)>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (topic, partition) = path.into_inner();
    produce(state, topic, Some(partition), req, payload).await
}

async fn produce(
    state: State,
    topic: String,
    partition: Option<u32>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    // A broker whose storage failed (a full disk, an I/O error) says why, before anything else:
    // the client can go to another replica's broker.
    if !state.broker.storage.is_healthy() {
        return Err(super::error::storage_error(&state.broker.storage.failed()));
    }
    let format = body_format(&req, true)?;
    let body = read_body(&req, payload, state.config.request_body_bytes_max).await?;
    let request: ProduceRequest = parse_json(&body)?;
    let handle = state
        .broker
        .registry
        .get(&topic)
        .ok_or_else(|| ApiError::TopicNotFound(topic.clone()))?;
    let limit = state.config.produce_records_max;
    if request.records.is_empty() {
        return Err(ApiError::Unprocessable(
            "records must contain at least one record".into(),
        ));
    }
    if request.records.len() > limit {
        return Err(ApiError::TooManyRecords(format!(
            "{} records in one request; the limit is {limit}",
            request.records.len()
        )));
    }
    let producer = producer_of(&request, partition)?;
    let groups = route(&handle, partition, format, request.records)?;
    // All-or-nothing across the request when a partition lives elsewhere: refuse before writing.
    if let Some(elsewhere) = groups
        .keys()
        .map(|p| &handle.partitions[*p as usize])
        .find(|p| !p.hosted)
    {
        return Err(not_replica(&state, elsewhere));
    }
    let mut offsets: Vec<Option<RecordOffset>> = vec![None; groups.values().map(Vec::len).sum()];
    let appends = groups.into_iter().map(|(p, records)| {
        let shared = handle.partitions[p as usize].clone();
        async move {
            let (indexes, records): (Vec<usize>, Vec<NewRecord>) = records.into_iter().unzip();
            (p, indexes, shared.append_as(records, producer).await)
        }
    });
    let mut first_error = None;
    for (p, indexes, result) in futures::future::join_all(appends).await {
        for (position, index) in indexes.into_iter().enumerate() {
            offsets[index] = Some(match &result {
                Ok(appended) => RecordOffset {
                    partition: p,
                    offset: Some(appended.base_offset + position as u64),
                    // A duplicate's original term is not kept; the resend's would mislead.
                    leader_epoch: (!appended.duplicate).then_some(appended.leader_epoch),
                    duplicate: appended.duplicate,
                    error_code: None,
                    error: None,
                },
                Err(e) => {
                    let api = ApiError::from(e.clone());
                    RecordOffset {
                        partition: p,
                        offset: None,
                        leader_epoch: None,
                        duplicate: false,
                        error_code: Some(api.error_code()),
                        error: Some(api.to_string()),
                    }
                }
            });
        }
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    let offsets: Vec<RecordOffset> = offsets.into_iter().flatten().collect();
    match first_error {
        // Nothing was written: the status says why.
        Some(e) if offsets.iter().all(|o| o.offset.is_none()) => Err(e.into()),
        // Some partitions took their records: REST Proxy reports per record, with 200.
        _ => Ok(HttpResponse::Ok().json(ProduceResponse { offsets })),
    }
}

/// The idempotent producer a request names, if any: all three fields or none, and only where
/// the path names the partition (sequences are per partition).
fn producer_of(
    request: &ProduceRequest,
    partition: Option<u32>,
) -> Result<Option<ProducerSequence>, ApiError> {
    let fields = (
        request.producer_id,
        request.producer_epoch,
        request.sequence,
    );
    let (id, epoch, base_sequence) = match fields {
        (None, None, None) => return Ok(None),
        (Some(id), Some(epoch), Some(sequence)) => (id, epoch, sequence),
        _ => {
            return Err(ApiError::Unprocessable(
                "producer_id, producer_epoch and sequence go together: give all three or none"
                    .into(),
            ))
        }
    };
    if partition.is_none() {
        return Err(ApiError::Unprocessable(
            "an idempotent produce names its partition (sequences are per partition): POST /topics/{topic}/partitions/{partition}".into(),
        ));
    }
    if id < 0 || epoch < 0 || base_sequence < 0 {
        return Err(ApiError::Unprocessable(format!(
            "producer_id ({id}), producer_epoch ({epoch}) and sequence ({base_sequence}) must not be negative"
        )));
    }
    let last = i64::from(base_sequence) + request.records.len() as i64 - 1;
    if last > i64::from(i32::MAX) {
        return Err(ApiError::Unprocessable(format!(
            "sequence {base_sequence} + {} records passes {}; start again from 0 after it",
            request.records.len(),
            i32::MAX
        )));
    }
    Ok(Some(ProducerSequence {
        id,
        epoch,
        base_sequence,
    }))
}

type Routed = BTreeMap<u32, Vec<(usize, NewRecord)>>;

/// Decode every record and choose its partition; any error rejects the whole request.
fn route(
    handle: &TopicHandle,
    fixed: Option<u32>,
    format: EmbeddedFormat,
    records: Vec<ProduceRecord>,
) -> Result<Routed, ApiError> {
    let partitions = handle.meta.partitions;
    let not_found = |p: u32| ApiError::PartitionNotFound {
        topic: handle.meta.name.clone(),
        partition: p.to_string(),
    };
    if let Some(p) = fixed.filter(|p| *p >= partitions) {
        return Err(not_found(p));
    }
    // Keyless records of one request stick to one partition (Kafka's sticky partitioner):
    // bigger batches, and successive requests still spread round-robin.
    let mut sticky = None;
    let mut routed = Routed::new();
    for (index, record) in records.into_iter().enumerate() {
        let key = embed(format, record.key, index, "key")?;
        let value = embed(format, record.value, index, "value")?;
        let partition = match (fixed, record.partition, &key) {
            (Some(fixed), Some(asked), _) => {
                return Err(ApiError::Unprocessable(format!(
                    "records[{index}].partition ({asked}) is not allowed here: the request is for partition {fixed}, named in its path"
                )))
            }
            (Some(fixed), _, _) => fixed,
            (None, Some(asked), _) if asked >= partitions => return Err(not_found(asked)),
            (None, Some(asked), _) => asked,
            (None, None, Some(key)) => partition_for_key(key, partitions),
            (None, None, None) => *sticky.get_or_insert_with(|| handle.next_round_robin()),
        };
        routed
            .entry(partition)
            .or_default()
            .push((index, NewRecord { key, value }));
    }
    Ok(routed)
}

/// The bytes a key or value is stored as: in the JSON formats the exact text the producer sent
/// (a log stores what it was given; re-serializing would round numbers through f64 and reorder
/// object keys), in the binary format the base64-decoded bytes.
fn embed(
    format: EmbeddedFormat,
    field: Option<Box<RawValue>>,
    index: usize,
    name: &str,
) -> Result<Option<Bytes>, ApiError> {
    let Some(raw) = field.filter(|raw| raw.get() != "null") else {
        return Ok(None);
    };
    match format {
        EmbeddedFormat::Json => Ok(Some(Bytes::copy_from_slice(raw.get().as_bytes()))),
        EmbeddedFormat::Binary => {
            let text: String = serde_json::from_str(raw.get()).map_err(|_| {
                ApiError::Unprocessable(format!(
                    "records[{index}].{name} must be a base64 string in the binary format, not {}",
                    raw.get()
                ))
            })?;
            base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map(|v| Some(Bytes::from(v)))
                .map_err(|e| {
                    ApiError::Unprocessable(format!(
                        "records[{index}].{name} is not valid base64: {e}"
                    ))
                })
        }
    }
}
