//! Committing and reading offsets, and moving an instance's positions (seek).

use actix_web::http::StatusCode;
use actix_web::{get, post, web, HttpRequest, HttpResponse};
use pubg1_actors::groups::coordinator::{Commit, GetAssignment, GetCommitted, Seek, SeekTo};
use pubg1_actors::groups::offsets_machine::TopicPartition;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::super::error::{ApiError, ErrorBody};
use super::super::{body_format, parse_json, read_body, State};
use super::{
    check_partition, instance, partitions_body, stopped, v2, BODY_MAX, PARTITIONS_PER_REQUEST_MAX,
};

/// One partition's offset in a commit or seek.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OffsetRef {
    pub topic: String,
    #[serde(deserialize_with = "crate::http::lenient::u32")]
    pub partition: u32,
    /// The next offset to consume (as in Kafka: one past the last record processed).
    #[schema(minimum = 0)]
    #[serde(deserialize_with = "crate::http::lenient::i64")]
    pub offset: i64,
    /// Client metadata kept with the commit.
    #[serde(default)]
    #[schema(max_length = 4096)]
    pub metadata: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OffsetsBody {
    #[schema(max_items = 10000)]
    #[serde(deserialize_with = "crate::http::lenient::objects")]
    pub offsets: Vec<OffsetRef>,
}

/// A committed offset as read back.
#[derive(Debug, Serialize, ToSchema)]
pub struct CommittedOffset {
    pub topic: String,
    pub partition: u32,
    /// -1 when the group has committed nothing for the partition.
    pub offset: i64,
    pub metadata: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CommittedOffsets {
    pub offsets: Vec<CommittedOffset>,
}

const METADATA_MAX: usize = 4096;

fn offsets_body(
    state: &State,
    body: &[u8],
) -> Result<Vec<(TopicPartition, u64, String)>, ApiError> {
    let parsed: OffsetsBody = parse_json(body)?;
    if parsed.offsets.len() > PARTITIONS_PER_REQUEST_MAX {
        return Err(ApiError::Unprocessable(format!(
            "at most {PARTITIONS_PER_REQUEST_MAX} offsets per request"
        )));
    }
    parsed
        .offsets
        .into_iter()
        .map(|o| {
            check_partition(state, o.partition)?;
            if o.offset < 0 {
                return Err(ApiError::InvalidOffset(format!(
                    "offset {} of partition {} of topic '{}' is negative",
                    o.offset, o.partition, o.topic
                )));
            }
            let metadata = o.metadata.unwrap_or_default();
            if metadata.len() > METADATA_MAX {
                return Err(ApiError::Unprocessable(format!(
                    "metadata is longer than {METADATA_MAX} bytes"
                )));
            }
            Ok((
                TopicPartition {
                    topic: o.topic,
                    partition: o.partition,
                },
                o.offset as u64,
                metadata,
            ))
        })
        .collect()
}

/// Commit offsets: those given, or (empty body) everything the instance's polls returned.
/// Answered once the commit is committed by its offsets partition's quorum.
#[utoipa::path(
    tag = "consumers",
    params(("group" = String, Path, description = "Consumer group", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), ("instance" = String, Path, description = "Consumer instance", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    request_body(content((OffsetsBody = "application/vnd.kafka.v2+json"), (OffsetsBody = "application/json"))),
    responses((status = 200, body = CommittedOffsets, content_type = "application/vnd.kafka.v2+json"), (status = 307, body = ErrorBody), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody), (status = 413, body = ErrorBody))
)]
#[post("/consumers/{group}/instances/{instance}/offsets")]
pub async fn commit(
    state: State,
    path: web::Path<(String, String)>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, payload, BODY_MAX).await?;
    let offsets = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        body_format(&req, false)?;
        Some(offsets_body(&state, &body)?)
    };
    let coordinator = instance(&state, &req, &path).await?;
    let committed = coordinator
        .send(Commit {
            instance: path.1.clone(),
            offsets,
        })
        .await
        .map_err(|_| stopped())??;
    Ok(v2(StatusCode::OK).json(CommittedOffsets {
        offsets: committed
            .into_iter()
            .map(|(tp, offset)| CommittedOffset {
                topic: tp.topic,
                partition: tp.partition,
                offset: offset as i64,
                metadata: String::new(),
            })
            .collect(),
    }))
}

/// The group's committed offsets for the given partitions (a body on GET, as in REST Proxy v2).
#[utoipa::path(
    tag = "consumers",
    params(("group" = String, Path, description = "Consumer group", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), ("instance" = String, Path, description = "Consumer instance", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    request_body(content((super::PartitionsBody = "application/vnd.kafka.v2+json"), (super::PartitionsBody = "application/json"))),
    responses((status = 200, body = CommittedOffsets, content_type = "application/vnd.kafka.v2+json"), (status = 307, body = ErrorBody), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody), (status = 413, body = ErrorBody))
)]
#[get("/consumers/{group}/instances/{instance}/offsets")]
pub async fn get_committed(
    state: State,
    path: web::Path<(String, String)>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, payload, BODY_MAX).await?;
    let coordinator = instance(&state, &req, &path).await?;
    // No body: the partitions the instance reads now.
    let partitions = if body.iter().all(u8::is_ascii_whitespace) {
        coordinator
            .send(GetAssignment(path.1.clone()))
            .await
            .map_err(|_| stopped())??
    } else {
        body_format(&req, false)?;
        partitions_body(&state, &body)?
    };
    let committed = coordinator
        .send(GetCommitted {
            instance: path.1.clone(),
            partitions,
        })
        .await
        .map_err(|_| stopped())??;
    Ok(v2(StatusCode::OK).json(CommittedOffsets {
        offsets: committed
            .into_iter()
            .map(|(tp, c)| CommittedOffset {
                topic: tp.topic,
                partition: tp.partition,
                offset: c.as_ref().map_or(-1, |c| c.offset as i64),
                metadata: c.map(|c| c.metadata).unwrap_or_default(),
            })
            .collect(),
    }))
}

async fn seek_to(
    state: State,
    path: web::Path<(String, String)>,
    req: HttpRequest,
    to: SeekTo,
) -> Result<HttpResponse, ApiError> {
    let coordinator = instance(&state, &req, &path).await?;
    coordinator
        .send(Seek {
            instance: path.1.clone(),
            to,
        })
        .await
        .map_err(|_| stopped())??;
    Ok(HttpResponse::NoContent().finish())
}

/// Set where the instance's next poll reads, per partition it owns.
#[utoipa::path(
    tag = "consumers",
    params(("group" = String, Path, description = "Consumer group", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), ("instance" = String, Path, description = "Consumer instance", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    request_body(content((OffsetsBody = "application/vnd.kafka.v2+json"), (OffsetsBody = "application/json"))),
    responses((status = 204), (status = 307, body = ErrorBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody), (status = 413, body = ErrorBody))
)]
#[post("/consumers/{group}/instances/{instance}/positions")]
pub async fn seek(
    state: State,
    path: web::Path<(String, String)>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    body_format(&req, false)?;
    let body = read_body(&req, payload, BODY_MAX).await?;
    let offsets = offsets_body(&state, &body)?
        .into_iter()
        .map(|(tp, offset, _)| (tp, offset))
        .collect();
    seek_to(state, path, req, SeekTo::Offsets(offsets)).await
}

/// Seek to the first retained offset of each partition given.
#[utoipa::path(
    tag = "consumers",
    params(("group" = String, Path, description = "Consumer group", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), ("instance" = String, Path, description = "Consumer instance", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    request_body(content((super::PartitionsBody = "application/vnd.kafka.v2+json"), (super::PartitionsBody = "application/json"))),
    responses((status = 204), (status = 307, body = ErrorBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody), (status = 413, body = ErrorBody))
)]
#[post("/consumers/{group}/instances/{instance}/positions/beginning")]
pub async fn seek_beginning(
    state: State,
    path: web::Path<(String, String)>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    body_format(&req, false)?;
    let body = read_body(&req, payload, BODY_MAX).await?;
    let partitions = partitions_body(&state, &body)?;
    seek_to(state, path, req, SeekTo::Beginning(partitions)).await
}

/// Seek to the end (the high watermark) of each partition given.
#[utoipa::path(
    tag = "consumers",
    params(("group" = String, Path, description = "Consumer group", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), ("instance" = String, Path, description = "Consumer instance", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    request_body(content((super::PartitionsBody = "application/vnd.kafka.v2+json"), (super::PartitionsBody = "application/json"))),
    responses((status = 204), (status = 307, body = ErrorBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody), (status = 413, body = ErrorBody))
)]
#[post("/consumers/{group}/instances/{instance}/positions/end")]
pub async fn seek_end(
    state: State,
    path: web::Path<(String, String)>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    body_format(&req, false)?;
    let body = read_body(&req, payload, BODY_MAX).await?;
    let partitions = partitions_body(&state, &body)?;
    seek_to(state, path, req, SeekTo::End(partitions)).await
}
