//! `/streams`: create, list, describe and delete stream jobs, and query a job's open windows.
//!
//! A job lives on the offsets partition its name hashes to and runs on that partition's
//! leader; requests about one job are answered there (`307` from any other broker, as for
//! consumer groups). The list is every job of the offsets partitions this broker replicates.

use actix_web::{delete, get, post, web, HttpRequest, HttpResponse};
use pubg1_actors::groups::error::GroupError;
use pubg1_actors::groups::offsets_machine::GroupCommand;
use pubg1_actors::groups::offsets_replica::{OffsetsReplica, ProposeGroup};
use pubg1_actors::streams::machine::JobCommand;
use pubg1_actors::streams::spec::{JobSpec, SpecRefusal};
use pubg1_actors::streams::{job_partition, DescribeJobs, JobView, JobWindows, PartitionWindows};
use pubg1_streaming::{Aggregation, EmitMode, WindowKind};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::consumers::{check_name, redirect};
use super::error::{ApiError, ErrorBody};
use super::{body_format, parse_json, read_body, State};

/// The replica of `job`'s offsets partition that runs it, or a redirect to the broker that
/// does.
fn home(
    state: &State,
    req: &HttpRequest,
    job: &str,
) -> Result<actix::Addr<OffsetsReplica>, ApiError> {
    let partitions = state.broker.registry.offsets();
    if partitions.is_empty() {
        return Err(ApiError::Unavailable(
            "the offsets topic is not hosted yet".into(),
        ));
    }
    let shared = &partitions[job_partition(job, partitions.len() as u32) as usize];
    let me = state.broker.cluster.self_id;
    match shared.addr() {
        Some(addr) if shared.hosted && shared.leader() == me => Ok(addr),
        _ => Err(redirect(
            state,
            req,
            GroupError::NotCoordinator {
                group: format!("stream job {job}"),
                me,
                leader: shared.leader(),
                replicas: shared.replicas.clone(),
            },
        )),
    }
}

fn restarting() -> ApiError {
    ApiError::Unavailable("the job's offsets partition is restarting".into())
}

/// Propose a job command on the job's home replica (a redirect if it no longer leads).
async fn propose(
    state: &State,
    req: &HttpRequest,
    addr: &actix::Addr<OffsetsReplica>,
    command: GroupCommand,
) -> Result<(), ApiError> {
    addr.send(ProposeGroup(command))
        .await
        .map_err(|_| restarting())?
        .map(|_| ())
        .map_err(|e| redirect(state, req, e))
}

async fn describe_one(addr: &actix::Addr<OffsetsReplica>, job: &str) -> Result<JobView, ApiError> {
    addr.send(DescribeJobs(Some(job.to_owned())))
        .await
        .map_err(|_| restarting())?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::JobNotFound(format!("stream job '{job}' not found")))
}

/// `POST /streams` body. Numbers are taken as JSON Schema reads them (`1000.0` is 1000).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpecBody {
    /// 1–249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
    #[schema(pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")]
    pub name: String,
    /// The topic aggregated (must exist).
    #[schema(pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")]
    pub input: String,
    /// The topic results go to (must exist, and not be the input).
    #[schema(pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")]
    pub output: String,
    pub window: WindowBody,
    pub aggregation: AggregationBody,
    /// JSON pointer to the event time (integer ms) in the value; absent: the record timestamp.
    #[serde(default)]
    #[schema(pattern = r"^(/.*)?$")]
    pub time_field: Option<String>,
    /// JSON pointer to the group key in the value; absent: the record key.
    #[serde(default)]
    #[schema(pattern = r"^(/.*)?$")]
    pub key_field: Option<String>,
    /// JSON pointer to the number aggregated: required for sum, min, max, avg; not for count.
    #[serde(default)]
    #[schema(pattern = r"^(/.*)?$")]
    pub value_field: Option<String>,
    /// How long after its end a window still takes records (default 0).
    #[serde(default, deserialize_with = "super::lenient::opt::i64")]
    #[schema(minimum = 0, maximum = 31_622_400_000_i64)]
    pub grace_ms: Option<i64>,
    /// How far the watermark runs behind the largest event time seen (default 0).
    #[serde(default, deserialize_with = "super::lenient::opt::i64")]
    #[schema(minimum = 0, maximum = 31_622_400_000_i64)]
    pub lateness_ms: Option<i64>,
    /// `final` (default): one result per window when it closes; `update`: also on every change.
    #[serde(default)]
    pub emit: Option<EmitBody>,
}

/// A window: tumbling (`size_ms`), hopping (`size_ms`, `advance_ms` ≤ `size_ms`), sliding
/// (`difference_ms`) or session (`gap_ms`); every length 1 ms to a year. Other fields are
/// ignored (as the document allows them); a misspelt length is a missing one.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WindowBody {
    Tumbling {
        #[serde(deserialize_with = "super::lenient::i64")]
        #[schema(minimum = 1, maximum = 31_622_400_000_i64)]
        size_ms: i64,
    },
    Hopping {
        #[serde(deserialize_with = "super::lenient::i64")]
        #[schema(minimum = 1, maximum = 31_622_400_000_i64)]
        size_ms: i64,
        #[serde(deserialize_with = "super::lenient::i64")]
        #[schema(minimum = 1, maximum = 31_622_400_000_i64)]
        advance_ms: i64,
    },
    Sliding {
        #[serde(deserialize_with = "super::lenient::i64")]
        #[schema(minimum = 1, maximum = 31_622_400_000_i64)]
        difference_ms: i64,
    },
    Session {
        #[serde(deserialize_with = "super::lenient::i64")]
        #[schema(minimum = 1, maximum = 31_622_400_000_i64)]
        gap_ms: i64,
    },
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AggregationBody {
    Count,
    Sum,
    Min,
    Max,
    Avg,
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EmitBody {
    Final,
    Update,
}

impl JobSpecBody {
    fn into_spec(self) -> JobSpec {
        JobSpec {
            name: self.name,
            input: self.input,
            output: self.output,
            window: match self.window {
                WindowBody::Tumbling { size_ms } => WindowKind::Tumbling { size_ms },
                WindowBody::Hopping {
                    size_ms,
                    advance_ms,
                } => WindowKind::Hopping {
                    size_ms,
                    advance_ms,
                },
                WindowBody::Sliding { difference_ms } => WindowKind::Sliding { difference_ms },
                WindowBody::Session { gap_ms } => WindowKind::Session { gap_ms },
            },
            aggregation: match self.aggregation {
                AggregationBody::Count => Aggregation::Count,
                AggregationBody::Sum => Aggregation::Sum,
                AggregationBody::Min => Aggregation::Min,
                AggregationBody::Max => Aggregation::Max,
                AggregationBody::Avg => Aggregation::Avg,
            },
            time_field: self.time_field,
            key_field: self.key_field,
            value_field: self.value_field,
            grace_ms: self.grace_ms.unwrap_or(0),
            lateness_ms: self.lateness_ms.unwrap_or(0),
            emit: match self.emit {
                Some(EmitBody::Update) => EmitMode::Update,
                Some(EmitBody::Final) | None => EmitMode::Final,
            },
        }
    }
}

/// Create a stream job. It runs on the leader of its offsets partition, reads its input
/// from the beginning and writes each window result to the output topic exactly once.
#[utoipa::path(
    tag = "streams",
    request_body(content = JobSpecBody, content_type = "application/json"),
    responses(
        (status = 201, body = Object, description = "The job's status"),
        (status = 307, body = ErrorBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)
    )
)]
#[post("/streams")]
pub async fn create(
    state: State,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    body_format(&req, false)?;
    let body = read_body(&req, payload, state.config.request_body_bytes_max).await?;
    let spec = parse_json::<JobSpecBody>(&body)?.into_spec();
    spec.check(&state.broker.registry).map_err(|e| match e {
        SpecRefusal::UnknownTopic(topic) => ApiError::TopicNotFound(topic),
        other => ApiError::Unprocessable(other.to_string()),
    })?;
    let addr = home(&state, &req, &spec.name)?;
    let name = spec.name.clone();
    let command = GroupCommand::Job(JobCommand::Create {
        spec,
        created_at_ms: now_ms(),
    });
    propose(&state, &req, &addr, command).await?;
    let view = describe_one(&addr, &name).await?;
    Ok(HttpResponse::Created().json(view))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    #[schema(value_type = Vec<Object>)]
    pub streams: Vec<JobView>,
}

/// Stream jobs of the offsets partitions this broker replicates (every job on a cluster of
/// three brokers or fewer).
#[utoipa::path(tag = "streams", responses((status = 200, body = JobList)))]
#[get("/streams")]
pub async fn list(state: State) -> HttpResponse {
    let mut streams = Vec::new();
    for partition in state.broker.registry.offsets() {
        let Some(addr) = partition.addr().filter(|_| partition.hosted) else {
            continue;
        };
        if let Ok(views) = addr.send(DescribeJobs(None)).await {
            streams.extend(views);
        }
    }
    streams.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    HttpResponse::Ok().json(JobList { streams })
}

/// One job: spec, where it runs, input progress and lag, last checkpoint, counts of records
/// in, late, dropped (later than grace) and skipped (by reason), results written.
#[utoipa::path(
    tag = "streams",
    params(("job" = String, Path, description = "Job name", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    responses((status = 200, body = Object), (status = 307, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 503, body = ErrorBody))
)]
#[get("/streams/{job}")]
pub async fn describe(
    state: State,
    job: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    check_name("stream job", &job)?;
    let addr = home(&state, &req, &job)?;
    Ok(HttpResponse::Ok().json(describe_one(&addr, &job).await?))
}

/// Delete a job: it stops, and its checkpoint goes. Its output topic stays.
#[utoipa::path(
    tag = "streams",
    params(("job" = String, Path, description = "Job name", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    responses((status = 204), (status = 307, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 503, body = ErrorBody))
)]
#[delete("/streams/{job}")]
pub async fn delete_job(
    state: State,
    job: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    check_name("stream job", &job)?;
    let addr = home(&state, &req, &job)?;
    let command = GroupCommand::Job(JobCommand::Delete {
        job: job.into_inner(),
    });
    propose(&state, &req, &addr, command).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct WindowsQuery {
    /// The group key whose windows to show.
    pub key: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WindowsAnswer {
    pub job: String,
    pub key: String,
    /// Per input partition: stream time, watermark, the key's open windows with their
    /// aggregate so far, and records dropped as too late per window.
    #[schema(value_type = Vec<Object>)]
    pub partitions: Vec<PartitionWindows>,
}

/// The current (not yet final) windows of one key.
#[utoipa::path(
    tag = "streams",
    params(("job" = String, Path, description = "Job name", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), WindowsQuery),
    responses((status = 200, body = WindowsAnswer), (status = 307, body = ErrorBody), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody))
)]
#[get("/streams/{job}/windows")]
pub async fn windows(
    state: State,
    job: web::Path<String>,
    query: web::Query<WindowsQuery>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    check_name("stream job", &job)?;
    let addr = home(&state, &req, &job)?;
    describe_one(&addr, &job).await?;
    let partitions = addr
        .send(JobWindows {
            job: job.clone(),
            key: query.key.clone(),
        })
        .await
        .map_err(|_| restarting())?
        .map_err(ApiError::Unavailable)?;
    Ok(HttpResponse::Ok().json(WindowsAnswer {
        job: job.into_inner(),
        key: query.into_inner().key,
        partitions,
    }))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
