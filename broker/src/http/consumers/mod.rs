//! The consumer API, shaped like Confluent REST Proxy v2: `/consumers/{group}` creates an
//! instance, `…/instances/{instance}/…` subscribes it, polls records, commits and seeks.
//!
//! Instances live on their group's coordinator broker (the leader of the group's offsets
//! partition). Any broker accepts these calls: one that does not coordinate the group answers
//! 307 to the broker that does (same method, same body), so clients that follow redirects —
//! curl -L, requests, Java's HTTP clients — need no routing of their own; `base_uri` already
//! names the coordinator.
//!
//! `instances` (create, delete, subscription, assignments), `poll` (records), `offsets`
//! (commit, committed, positions); `groups` describes groups.

mod groups;
mod offsets;
mod poll;

use actix::Addr;
use actix_web::http::header;
use actix_web::{delete, get, post, web, HttpRequest, HttpResponse};
use pubg1_actors::groups::coordinator::{
    Assign, CreateInstance, DeleteInstance, GetAssignment, GetSubscription, GroupCoordinator,
    InstanceConfig, OffsetReset, Subscribe, Subscription, Unsubscribe,
};
use pubg1_actors::groups::error::GroupError;
use pubg1_actors::groups::offsets_machine::TopicPartition;
use pubg1_actors::groups::offsets_replica::{group_partition, Coordinate, Coordinated};
use pubg1_actors::topic::validate_name;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use groups::{describe_group, list_groups};
pub use offsets::{commit, get_committed, seek, seek_beginning, seek_end};
pub use poll::records;

use super::error::{ApiError, ErrorBody};
use super::{parse_json, read_body, State};
use crate::config::{SESSION_TIMEOUT_MAX_MS, SESSION_TIMEOUT_MIN_MS};

/// The content type REST Proxy v2 replies with for everything but records.
pub const V2_JSON: &str = "application/vnd.kafka.v2+json";
/// Largest body a consumer-API request may have (they are small JSON documents).
const BODY_MAX: usize = 1024 * 1024;
/// Partitions one request may name.
pub const PARTITIONS_PER_REQUEST_MAX: usize = 10_000;

pub(crate) fn v2(status: actix_web::http::StatusCode) -> actix_web::HttpResponseBuilder {
    let mut builder = HttpResponse::build(status);
    builder.insert_header((header::CONTENT_TYPE, V2_JSON));
    builder
}

/// A group or instance name: the rules of topic names.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    validate_name(name).map_err(|e| {
        ApiError::Unprocessable(format!(
            "{what} '{name}' is not valid: {}",
            e.to_string()
                .split_once(": ")
                .map_or(e.to_string(), |(_, r)| r.to_owned())
        ))
    })
}

/// Where `group` stands on its coordinator, if this broker is it (`start`: start a
/// coordinator if none runs); otherwise a 307 to the broker that is (or 503 while none is
/// known).
pub(crate) async fn coordinator(
    state: &State,
    req: &HttpRequest,
    group: &str,
    start: bool,
) -> Result<Coordinated, ApiError> {
    check_name("group", group)?;
    let partitions = state.broker.registry.offsets();
    if partitions.is_empty() {
        return Err(ApiError::Unavailable(
            "the offsets topic is not hosted yet".into(),
        ));
    }
    let shared = &partitions[group_partition(group, partitions.len() as u32) as usize];
    let result = match shared.addr() {
        Some(addr) if shared.hosted => addr
            .send(Coordinate {
                group: group.to_owned(),
                create: start,
            })
            .await
            .unwrap_or_else(|_| Err(GroupError::Stopping(group.to_owned()))),
        _ => Err(GroupError::NotCoordinator {
            group: group.to_owned(),
            me: state.broker.cluster.self_id,
            leader: shared.leader(),
            replicas: shared.replicas.clone(),
        }),
    };
    result.map_err(|e| redirect(state, req, e))
}

/// A `NotCoordinator` naming a leader whose HTTP address is known becomes a 307 there.
pub(crate) fn redirect(state: &State, req: &HttpRequest, error: GroupError) -> ApiError {
    if let GroupError::NotCoordinator { leader, .. } = &error {
        let me = state.broker.cluster.self_id;
        if *leader != 0 && *leader != me {
            if let Some(http) = state.broker.cluster.http_of(*leader) {
                let path = req
                    .uri()
                    .path_and_query()
                    .map_or(req.path(), |p| p.as_str());
                return ApiError::Redirect {
                    location: format!("http://{http}{path}"),
                    message: error.to_string(),
                };
            }
        }
    }
    error.into()
}

/// `POST /consumers/{group}` body. REST Proxy's keys; booleans may be JSON booleans or the
/// strings "true"/"false", as REST Proxy clients send them.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateConsumerRequest {
    /// The instance's name (the rules of topic names); generated when absent.
    pub name: Option<String>,
    /// How records' keys and values are embedded: `json` (default) or `binary` (base64).
    pub format: Option<String>,
    /// `latest` (default) or `earliest`: where to start a partition the group has no
    /// committed offset for.
    #[serde(rename = "auto.offset.reset")]
    pub auto_offset_reset: Option<String>,
    /// Commit what each poll returned when the next poll starts, and on revocation and
    /// delete (default true, as in Kafka).
    #[serde(rename = "auto.commit.enable")]
    #[schema(value_type = Option<bool>)]
    pub auto_commit_enable: Option<serde_json::Value>,
    /// Milliseconds without a request after which the instance leaves its group.
    #[serde(rename = "session.timeout.ms")]
    #[schema(minimum = 500, maximum = 300000)]
    #[serde(default, deserialize_with = "crate::http::lenient::opt::u64")]
    pub session_timeout_ms: Option<u64>,
    /// How long a poll without `timeout` waits for records (default 1000).
    #[serde(rename = "consumer.request.timeout.ms")]
    #[schema(maximum = 30000)]
    #[serde(default, deserialize_with = "crate::http::lenient::opt::u64")]
    pub consumer_request_timeout_ms: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreateConsumerResponse {
    pub instance_id: String,
    /// Where the instance's calls go: on the group's coordinator broker.
    pub base_uri: String,
}

fn flag(name: &str, value: Option<&serde_json::Value>, default: bool) -> Result<bool, ApiError> {
    match value {
        None => Ok(default),
        Some(serde_json::Value::Bool(b)) => Ok(*b),
        Some(serde_json::Value::String(s)) if s == "true" => Ok(true),
        Some(serde_json::Value::String(s)) if s == "false" => Ok(false),
        Some(other) => Err(ApiError::Unprocessable(format!(
            "{name} must be true or false (got {other})"
        ))),
    }
}

/// Create a consumer instance in a group.
#[utoipa::path(
    tag = "consumers",
    params(("group" = String, Path, description = "Consumer group", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    request_body(content(
        (CreateConsumerRequest = "application/vnd.kafka.v2+json"),
        (CreateConsumerRequest = "application/json")
    )),
    responses(
        (status = 200, body = CreateConsumerResponse, content_type = "application/vnd.kafka.v2+json"),
        (status = 307, description = "Another broker coordinates the group", body = ErrorBody),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)
    , (status = 413, body = ErrorBody))
)]
#[post("/consumers/{group}")]
pub async fn create(
    state: State,
    group: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, payload, BODY_MAX).await?;
    // No body: every default (REST Proxy clients send `{}`, curl users often nothing).
    let request: CreateConsumerRequest = if body.iter().all(u8::is_ascii_whitespace) {
        parse_json(b"{}")?
    } else {
        super::body_format(&req, false)?;
        parse_json(&body)?
    };
    if let Some(name) = &request.name {
        check_name("consumer instance name", name)?;
    }
    let format = match request.format.as_deref() {
        None | Some("json") => "json",
        Some("binary") => "binary",
        Some(other) => {
            return Err(ApiError::Unprocessable(format!(
                "format must be json or binary (got '{other}')"
            )))
        }
    };
    let offset_reset = match request.auto_offset_reset.as_deref() {
        None | Some("latest") => OffsetReset::Latest,
        Some("earliest" | "smallest") => OffsetReset::Earliest,
        Some(other) => {
            return Err(ApiError::Unprocessable(format!(
                "auto.offset.reset must be earliest or latest (got '{other}')"
            )))
        }
    };
    let auto_commit = flag(
        "auto.commit.enable",
        request.auto_commit_enable.as_ref(),
        true,
    )?;
    let session_ms = request
        .session_timeout_ms
        .unwrap_or(state.config.consumer_session_timeout_ms);
    if !(SESSION_TIMEOUT_MIN_MS..=SESSION_TIMEOUT_MAX_MS).contains(&session_ms) {
        return Err(ApiError::Unprocessable(format!(
            "session.timeout.ms must be between {SESSION_TIMEOUT_MIN_MS} and {SESSION_TIMEOUT_MAX_MS} (got {session_ms})"
        )));
    }
    let poll_wait_ms = request
        .consumer_request_timeout_ms
        .unwrap_or(poll::WAIT_DEFAULT_MS);
    if poll_wait_ms > state.config.fetch_wait_ms_max {
        return Err(ApiError::Unprocessable(format!(
            "consumer.request.timeout.ms must be at most {} (got {poll_wait_ms})",
            state.config.fetch_wait_ms_max
        )));
    }
    let Coordinated::Running(coordinator) = coordinator(&state, &req, &group, true).await? else {
        return Err(ApiError::Unavailable(
            "the group's coordinator is starting; retry".into(),
        ));
    };
    let instance = coordinator
        .send(CreateInstance(InstanceConfig {
            poll_wait: std::time::Duration::from_millis(poll_wait_ms),
            name: request.name,
            format: format.to_owned(),
            offset_reset,
            auto_commit,
            session_timeout: std::time::Duration::from_millis(session_ms),
        }))
        .await
        .map_err(|_| ApiError::Unavailable("the group's coordinator stopped; retry".into()))??;
    let http = state
        .broker
        .cluster
        .http_of(state.broker.cluster.self_id)
        .unwrap_or_else(|| state.config.http.to_string());
    Ok(
        v2(actix_web::http::StatusCode::OK).json(CreateConsumerResponse {
            base_uri: format!("http://{http}/consumers/{group}/instances/{instance}"),
            instance_id: instance,
        }),
    )
}

/// The instance's coordinator and name, from the path.
pub(crate) async fn instance(
    state: &State,
    req: &HttpRequest,
    path: &(String, String),
) -> Result<Addr<GroupCoordinator>, ApiError> {
    check_name("consumer instance", &path.1)?;
    match coordinator(state, req, &path.0, false).await {
        Ok(Coordinated::Running(addr)) => Ok(addr),
        // No coordinator runs, so no instance exists.
        Ok(Coordinated::Stored(_)) | Err(ApiError::GroupNotFound(_)) => {
            Err(ApiError::InstanceNotFound(format!(
                "consumer instance '{}' not found in group '{}'",
                path.1, path.0
            )))
        }
        Err(e) => Err(e),
    }
}

fn stopped() -> ApiError {
    ApiError::Unavailable("the group's coordinator stopped; retry".into())
}

/// Delete a consumer instance: it leaves its group (committing first if auto-commit is on).
#[utoipa::path(
    tag = "consumers",
    params(("group" = String, Path, description = "Consumer group", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), ("instance" = String, Path, description = "Consumer instance", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    responses((status = 204), (status = 307, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody), (status = 422, body = ErrorBody))
)]
#[delete("/consumers/{group}/instances/{instance}")]
pub async fn delete_instance(
    state: State,
    path: web::Path<(String, String)>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let coordinator = instance(&state, &req, &path).await?;
    coordinator
        .send(DeleteInstance(path.1.clone()))
        .await
        .map_err(|_| stopped())??;
    Ok(HttpResponse::NoContent().finish())
}

/// `POST …/subscription` body: a topic list or a pattern, not both.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionRequest {
    #[schema(max_items = 10000, min_items = 1)]
    #[serde(default, deserialize_with = "crate::http::lenient::present")]
    pub topics: Option<Vec<String>>,
    /// A regular expression every topic name it matches whole is subscribed to (also topics
    /// created later).
    #[serde(default, deserialize_with = "crate::http::lenient::present")]
    pub topic_pattern: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionResponse {
    pub topics: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic_pattern: Option<String>,
}

/// Subscribe an instance to topics: the group's coordinator assigns it partitions.
#[utoipa::path(
    tag = "consumers",
    params(("group" = String, Path, description = "Consumer group", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), ("instance" = String, Path, description = "Consumer instance", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    request_body(content((SubscriptionRequest = "application/vnd.kafka.v2+json"), (SubscriptionRequest = "application/json"))),
    responses((status = 204), (status = 307, body = ErrorBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody), (status = 413, body = ErrorBody))
)]
#[post("/consumers/{group}/instances/{instance}/subscription")]
pub async fn subscribe(
    state: State,
    path: web::Path<(String, String)>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    super::body_format(&req, false)?;
    let body = read_body(&req, payload, BODY_MAX).await?;
    let request: SubscriptionRequest = parse_json(&body)?;
    let subscription = match (request.topics, request.topic_pattern) {
        (Some(_), Some(_)) => {
            return Err(ApiError::Unprocessable(
                "give either topics or topic_pattern, not both".into(),
            ))
        }
        (None, None) => {
            return Err(ApiError::Unprocessable(
                "give topics (a list of topic names) or topic_pattern".into(),
            ))
        }
        (Some(topics), None) => {
            if topics.is_empty() {
                return Err(ApiError::Unprocessable("topics must not be empty".into()));
            }
            if topics.len() > PARTITIONS_PER_REQUEST_MAX {
                return Err(ApiError::Unprocessable(format!(
                    "at most {PARTITIONS_PER_REQUEST_MAX} topics"
                )));
            }
            Subscription::Topics(topics.into_iter().collect())
        }
        (None, Some(pattern)) => Subscription::Pattern(pattern),
    };
    let coordinator = instance(&state, &req, &path).await?;
    coordinator
        .send(Subscribe {
            instance: path.1.clone(),
            subscription,
        })
        .await
        .map_err(|_| stopped())??;
    Ok(HttpResponse::NoContent().finish())
}

/// An instance's subscription.
#[utoipa::path(
    tag = "consumers",
    params(("group" = String, Path, description = "Consumer group", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), ("instance" = String, Path, description = "Consumer instance", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    responses((status = 200, body = SubscriptionResponse, content_type = "application/vnd.kafka.v2+json"), (status = 307, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody), (status = 422, body = ErrorBody))
)]
#[get("/consumers/{group}/instances/{instance}/subscription")]
pub async fn get_subscription(
    state: State,
    path: web::Path<(String, String)>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let coordinator = instance(&state, &req, &path).await?;
    let subscription = coordinator
        .send(GetSubscription(path.1.clone()))
        .await
        .map_err(|_| stopped())??;
    let body = match subscription {
        None => SubscriptionResponse {
            topics: Vec::new(),
            topic_pattern: None,
        },
        Some(Subscription::Topics(topics)) => SubscriptionResponse {
            topics: topics.into_iter().collect(),
            topic_pattern: None,
        },
        Some(Subscription::Pattern(pattern)) => SubscriptionResponse {
            topics: state
                .broker
                .registry
                .list()
                .iter()
                .map(|h| h.meta.name.clone())
                .filter(|name| {
                    regex::Regex::new(&format!("^(?:{pattern})$")).is_ok_and(|r| r.is_match(name))
                })
                .collect(),
            topic_pattern: Some(pattern),
        },
    };
    Ok(v2(actix_web::http::StatusCode::OK).json(body))
}

/// Unsubscribe: the instance leaves the group's assignment (it stays, idle).
#[utoipa::path(
    tag = "consumers",
    params(("group" = String, Path, description = "Consumer group", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), ("instance" = String, Path, description = "Consumer instance", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    responses((status = 204), (status = 307, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody), (status = 422, body = ErrorBody))
)]
#[delete("/consumers/{group}/instances/{instance}/subscription")]
pub async fn unsubscribe(
    state: State,
    path: web::Path<(String, String)>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let coordinator = instance(&state, &req, &path).await?;
    coordinator
        .send(Unsubscribe(path.1.clone()))
        .await
        .map_err(|_| stopped())??;
    Ok(HttpResponse::NoContent().finish())
}

/// A topic partition in a request or reply.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PartitionRef {
    pub topic: String,
    #[serde(deserialize_with = "crate::http::lenient::u32")]
    pub partition: u32,
}

impl From<PartitionRef> for TopicPartition {
    fn from(p: PartitionRef) -> Self {
        TopicPartition {
            topic: p.topic,
            partition: p.partition,
        }
    }
}

impl From<TopicPartition> for PartitionRef {
    fn from(p: TopicPartition) -> Self {
        PartitionRef {
            topic: p.topic,
            partition: p.partition,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PartitionsBody {
    #[schema(max_items = 10000)]
    #[serde(deserialize_with = "crate::http::lenient::objects")]
    pub partitions: Vec<PartitionRef>,
}

/// A partition number no topic of this broker can have is refused (the document states the
/// bound), not looked up.
pub(crate) fn check_partition(state: &State, partition: u32) -> Result<(), ApiError> {
    let max = state.config.partitions_per_topic_max;
    if partition >= max {
        return Err(ApiError::Unprocessable(format!(
            "partition {partition} cannot exist: topics have at most {max} partitions"
        )));
    }
    Ok(())
}

/// Parse a `{"partitions": […]}` body (at most [`PARTITIONS_PER_REQUEST_MAX`]).
pub(crate) fn partitions_body(state: &State, body: &[u8]) -> Result<Vec<TopicPartition>, ApiError> {
    let parsed: PartitionsBody = parse_json(body)?;
    if parsed.partitions.len() > PARTITIONS_PER_REQUEST_MAX {
        return Err(ApiError::Unprocessable(format!(
            "at most {PARTITIONS_PER_REQUEST_MAX} partitions per request"
        )));
    }
    for p in &parsed.partitions {
        check_partition(state, p.partition)?;
    }
    Ok(parsed.partitions.into_iter().map(Into::into).collect())
}

/// Assign partitions by hand (no group management; commits still go to the group).
#[utoipa::path(
    tag = "consumers",
    params(("group" = String, Path, description = "Consumer group", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), ("instance" = String, Path, description = "Consumer instance", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    request_body(content((PartitionsBody = "application/vnd.kafka.v2+json"), (PartitionsBody = "application/json"))),
    responses((status = 204), (status = 307, body = ErrorBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody), (status = 413, body = ErrorBody))
)]
#[post("/consumers/{group}/instances/{instance}/assignments")]
pub async fn assign(
    state: State,
    path: web::Path<(String, String)>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    super::body_format(&req, false)?;
    let body = read_body(&req, payload, BODY_MAX).await?;
    let partitions = partitions_body(&state, &body)?;
    let coordinator = instance(&state, &req, &path).await?;
    coordinator
        .send(Assign {
            instance: path.1.clone(),
            partitions,
        })
        .await
        .map_err(|_| stopped())??;
    Ok(HttpResponse::NoContent().finish())
}

/// The partitions an instance reads: those the group assigned it, or its manual assignment.
#[utoipa::path(
    tag = "consumers",
    params(("group" = String, Path, description = "Consumer group", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), ("instance" = String, Path, description = "Consumer instance", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    responses((status = 200, body = PartitionsBody, content_type = "application/vnd.kafka.v2+json"), (status = 307, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody), (status = 422, body = ErrorBody))
)]
#[get("/consumers/{group}/instances/{instance}/assignments")]
pub async fn assignments(
    state: State,
    path: web::Path<(String, String)>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let coordinator = instance(&state, &req, &path).await?;
    let partitions = coordinator
        .send(GetAssignment(path.1.clone()))
        .await
        .map_err(|_| stopped())??;
    Ok(v2(actix_web::http::StatusCode::OK).json(PartitionsBody {
        partitions: partitions.into_iter().map(Into::into).collect(),
    }))
}
