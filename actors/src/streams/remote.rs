//! A job's reads and writes of partitions this broker does not lead (or hold no replica of),
//! through their leader's HTTP API as any client would. Blocking: run on the blocking pool.

use std::sync::OnceLock;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;

use crate::batch::{ProducerSequence, StoredRecord};

/// Longer than a broker waits for an append to commit (5 s), so a write that is not answered
/// in time was given up by the broker too, not just by this side.
const TIMEOUT: Duration = Duration::from_secs(8);
const BINARY: &str = "application/vnd.kafka.binary.v2+json";

/// How an error from a fenced (deposed) writer starts: the runner stops instead of retrying.
pub const FENCED: &str = "fenced";

fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(TIMEOUT))
            .build()
            .into()
    })
}

fn body(response: &mut ureq::http::Response<ureq::Body>) -> Result<String, String> {
    response
        .body_mut()
        .with_config()
        .limit(256 * 1024 * 1024)
        .read_to_string()
        .map_err(|e| e.to_string())
}

fn decode(field: Option<String>) -> Result<Option<Bytes>, String> {
    field
        .map(|text| BASE64.decode(text).map(Bytes::from))
        .transpose()
        .map_err(|e| e.to_string())
}

/// Why a read from another broker gave no records.
#[derive(Debug)]
pub enum Failure {
    /// 416: the offset is outside the leader's log (below its start, after retention).
    OutOfRange,
    Other(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::OutOfRange => f.write_str("offset out of range"),
            Failure::Other(e) => f.write_str(e),
        }
    }
}

/// Committed records of `topic`/`partition` from `offset`, read from `leader` (an HTTP
/// address), at most about `bytes_max`.
pub fn fetch(
    leader: &str,
    topic: &str,
    partition: u32,
    offset: u64,
    bytes_max: usize,
) -> Result<Vec<StoredRecord>, Failure> {
    fetch_any(leader, topic, partition, offset, bytes_max).map_err(|(status, e)| {
        if status == Some(416) {
            Failure::OutOfRange
        } else {
            Failure::Other(e)
        }
    })
}

fn fetch_any(
    leader: &str,
    topic: &str,
    partition: u32,
    offset: u64,
    bytes_max: usize,
) -> Result<Vec<StoredRecord>, (Option<u16>, String)> {
    #[derive(Deserialize)]
    struct Record {
        offset: u64,
        timestamp: i64,
        key: Option<String>,
        value: Option<String>,
    }
    #[derive(Deserialize)]
    struct Fetched {
        records: Vec<Record>,
    }
    let url = format!(
        "http://{leader}/topics/{topic}/partitions/{partition}/records?offset={offset}&max_bytes={bytes_max}&timeout_ms=0&format=binary"
    );
    let other = |e: String| (None, e);
    let mut response = agent().get(&url).call().map_err(|e| other(e.to_string()))?;
    let text = body(&mut response).map_err(other)?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err((Some(status), format!("{url}: {status} {text}")));
    }
    let fetched: Fetched = serde_json::from_str(&text).map_err(|e| other(e.to_string()))?;
    let mut records = Vec::with_capacity(fetched.records.len());
    for (i, r) in fetched.records.into_iter().enumerate() {
        if r.offset != offset + i as u64 {
            return Err(other(format!("{url}: record {i} is offset {}", r.offset)));
        }
        records.push(StoredRecord {
            offset: r.offset,
            timestamp_ms: r.timestamp,
            key: decode(r.key).map_err(other)?,
            value: decode(r.value).map_err(other)?,
        });
    }
    Ok(records)
}

/// Append `records` (key, value) to `topic`/`partition` on `leader` as one request; the
/// offset of the first, once acknowledged.
pub fn publish(
    leader: &str,
    topic: &str,
    partition: u32,
    records: &[(Bytes, Bytes)],
    producer: ProducerSequence,
) -> Result<u64, String> {
    let body_records: Vec<serde_json::Value> = records
        .iter()
        .map(|(k, v)| serde_json::json!({"key": BASE64.encode(k), "value": BASE64.encode(v)}))
        .collect();
    let request = serde_json::json!({
        "records": body_records,
        "producer_id": producer.id,
        "producer_epoch": producer.epoch,
        "sequence": producer.base_sequence,
    })
    .to_string();
    let url = format!("http://{leader}/topics/{topic}/partitions/{partition}");
    let mut response = agent()
        .post(&url)
        .header("content-type", BINARY)
        .send(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let text = body(&mut response)?;
    // Deposed (40909), or out of step with the partition (40908): a new runner starts over.
    if response.status() == 409 && (text.contains("40909") || text.contains("40908")) {
        return Err(format!("{FENCED}: {url}: {text}"));
    }
    if response.status() != 200 {
        return Err(format!("{url}: {} {text}", response.status()));
    }
    #[derive(Deserialize)]
    struct Offset {
        offset: Option<u64>,
    }
    #[derive(Deserialize)]
    struct Produced {
        offsets: Vec<Offset>,
    }
    let produced: Produced = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    match produced.offsets.first().and_then(|o| o.offset) {
        Some(first) if produced.offsets.iter().all(|o| o.offset.is_some()) => Ok(first),
        _ => Err(format!("{url}: not every record was written: {text}")),
    }
}

/// A read barrier through `leader` (see `PartitionShared::barrier`): the log's end once
/// everything committed before it is readable.
///
/// With `fence` (producer id, epoch), the barrier also fences that producer (see
/// `PartitionShared::fence`).
pub fn barrier(
    leader: &str,
    topic: &str,
    partition: u32,
    fence: Option<(i64, i16)>,
) -> Result<u64, String> {
    let url = format!("http://{leader}/topics/{topic}/partitions/{partition}/barrier");
    let request = agent().post(&url);
    let sent = match fence {
        Some((id, epoch)) => request.header("content-type", "application/json").send(
            serde_json::json!({"producer_id": id, "producer_epoch": epoch})
                .to_string()
                .as_bytes(),
        ),
        None => request.send_empty(),
    };
    let mut response = sent.map_err(|e| e.to_string())?;
    let text = body(&mut response)?;
    if response.status() == 409 && text.contains("40909") {
        return Err(format!("{FENCED}: {url}: {text}"));
    }
    if response.status() != 200 {
        return Err(format!("{url}: {} {text}", response.status()));
    }
    #[derive(Deserialize)]
    struct Barrier {
        log_end_offset: u64,
    }
    serde_json::from_str::<Barrier>(&text)
        .map(|b| b.log_end_offset)
        .map_err(|e| e.to_string())
}
