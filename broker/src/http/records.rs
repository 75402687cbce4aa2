//! Consume: `GET /topics/{topic}/partitions/{partition}/records`, a bounded long poll.

use std::time::Duration;

use actix_web::{get, web, HttpRequest, HttpResponse};
use base64::Engine;
use bytes::Bytes;
use pubg1_actors::batch::StoredRecord;
use pubg1_actors::log_reader::{self, FetchRequest, Fetched};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::partitions::{find, not_replica};
use super::{response_format, EmbeddedFormat, State};

/// `max_records` when the consumer does not say.
const RECORDS_DEFAULT: usize = 500;
/// `max_bytes` when the consumer does not say.
const BYTES_DEFAULT: usize = 1024 * 1024;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FetchParams {
    /// First offset to return; defaults to the log start.
    #[serde(default, deserialize_with = "super::lenient::query::offset")]
    pub offset: Option<u64>,
    /// Most records to return (default 500).
    #[serde(default, deserialize_with = "super::lenient::query::usize")]
    pub max_records: Option<usize>,
    /// Soft cap on key+value bytes returned (default 1 MiB); one record is returned even if larger.
    #[serde(default, deserialize_with = "super::lenient::query::usize")]
    pub max_bytes: Option<usize>,
    /// When caught up, wait this long for new records (default 0).
    #[serde(default, deserialize_with = "super::lenient::query::u64")]
    pub timeout_ms: Option<u64>,
    /// `json` (default) or `binary` (base64); the Accept header `application/vnd.kafka.binary.v2+json` also selects binary.
    pub format: Option<EmbeddedFormat>,
}

/// A consumed record.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConsumerRecord {
    pub partition: u32,
    pub offset: u64,
    /// Broker append time, milliseconds since the epoch.
    pub timestamp: i64,
    /// The key as stored: in the JSON format its exact text as produced.
    #[schema(value_type = Value)]
    pub key: Box<RawValue>,
    #[schema(value_type = Value)]
    pub value: Box<RawValue>,
}

/// Records from one partition and where its log stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct FetchResponse {
    pub topic: String,
    pub partition: u32,
    pub high_watermark: u64,
    pub log_start_offset: u64,
    /// The offset to ask for next.
    pub next_offset: u64,
    pub records: Vec<ConsumerRecord>,
}

/// Read committed records from an offset.
#[utoipa::path(
    tag = "records",
    params(("topic" = String, Path, description = "Topic name", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), ("partition" = u32, Path, description = "Partition number"), FetchParams),
    responses(
        (status = 200, body = FetchResponse),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 406, body = ErrorBody),
        (status = 416, description = "Offset outside the log", body = ErrorBody), (status = 422, body = ErrorBody)
    )
)]
#[get("/topics/{topic}/partitions/{partition}/records")]
pub async fn fetch(
    state: State,
    path: web::Path<(String, u32)>,
    params: web::Query<FetchParams>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let (topic, partition) = path.into_inner();
    let shared = find(&state, &topic, partition)?;
    if !shared.hosted {
        return Err(not_replica(&state, &shared));
    }
    let config = &state.config;
    let records_max = bounded(
        "max_records",
        params.max_records.unwrap_or(RECORDS_DEFAULT),
        1,
        config.fetch_records_max,
    )?;
    let bytes_max = bounded(
        "max_bytes",
        params.max_bytes.unwrap_or(BYTES_DEFAULT),
        1,
        config.fetch_bytes_max,
    )?;
    let wait_ms = bounded(
        "timeout_ms",
        params.timeout_ms.unwrap_or(0) as usize,
        0,
        config.fetch_wait_ms_max as usize,
    )?;
    let format = response_format(&req, params.format);
    let request = FetchRequest {
        offset: params.offset.unwrap_or_else(|| shared.log_start_offset()),
        records_max,
        bytes_max,
        wait: Duration::from_millis(wait_ms as u64),
    };
    let fetched = log_reader::fetch(
        &state.broker.storage,
        &shared,
        &state.broker.metrics,
        request,
    )
    .await?;
    let next_offset = fetched
        .records
        .last()
        .map_or(request.offset, |r| r.offset + 1);
    observe_fetch(&state, &topic, partition, &fetched, next_offset);
    let records = fetched
        .records
        .into_iter()
        .map(|r| render(r, partition, format))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HttpResponse::Ok().json(FetchResponse {
        topic,
        partition,
        high_watermark: fetched.high_watermark,
        log_start_offset: fetched.log_start_offset,
        next_offset,
        records,
    }))
}

pub(super) fn bounded(name: &str, value: usize, min: usize, max: usize) -> Result<usize, ApiError> {
    if value < min || value > max {
        return Err(ApiError::Unprocessable(format!(
            "{name} must be between {min} and {max} (got {value})"
        )));
    }
    Ok(value)
}

pub(super) fn render(
    record: StoredRecord,
    partition: u32,
    format: EmbeddedFormat,
) -> Result<ConsumerRecord, ApiError> {
    let offset = record.offset;
    let not_json = || {
        ApiError::NotAcceptable(format!(
            "record at offset {offset} is not JSON; fetch it with format=binary"
        ))
    };
    // JSON is returned as the exact text stored (checked to be JSON, never re-encoded).
    let field = |bytes: Option<Bytes>| -> Result<Box<RawValue>, ApiError> {
        let raw = match (bytes, format) {
            (None, _) => serde_json::value::to_raw_value(&serde_json::Value::Null),
            (Some(b), EmbeddedFormat::Binary) => serde_json::value::to_raw_value(
                &base64::engine::general_purpose::STANDARD.encode(b),
            ),
            (Some(b), EmbeddedFormat::Json) => {
                let text = String::from_utf8(b.to_vec()).map_err(|_| not_json())?;
                RawValue::from_string(text)
            }
        };
        raw.map_err(|_| not_json())
    };
    Ok(ConsumerRecord {
        partition,
        offset,
        timestamp: record.timestamp_ms,
        key: field(record.key)?,
        value: field(record.value)?,
    })
}

/// Consumer lag and record age for the fetch just served.
fn observe_fetch(state: &State, topic: &str, partition: u32, fetched: &Fetched, next_offset: u64) {
    let metrics = &state.broker.metrics;
    let partition = partition.to_string();
    metrics
        .fetch_lag_records
        .with_label_values(&[topic, partition.as_str()])
        .set(fetched.high_watermark.saturating_sub(next_offset) as i64);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let age = metrics.fetch_record_age_seconds.with_label_values(&[topic]);
    for record in &fetched.records {
        age.observe(now_ms.saturating_sub(record.timestamp_ms).max(0) as f64 / 1000.0);
    }
}
