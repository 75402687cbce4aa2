//! `/topics`: create, list, describe, delete.

use std::collections::BTreeMap;

use actix_web::{delete, get, post, web, HttpRequest, HttpResponse};
use pubg1_actors::metadata::{CreateTopic, DeleteTopic};
use pubg1_actors::registry::TopicHandle;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::partitions::{describe_partition, PartitionInfo};
use super::{body_format, parse_json, read_body, State};

/// `POST /topics` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTopicRequest {
    /// 1–249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
    pub name: String,
    /// Defaults to 1.
    #[serde(default = "one", deserialize_with = "super::lenient::u32")]
    pub partitions: u32,
    /// Defaults to 1; at most the number of brokers.
    #[serde(default = "one_u16", deserialize_with = "super::lenient::u16")]
    pub replication_factor: u16,
    /// Kafka topic configs: `retention.ms`, `retention.bytes` (numbers or strings; -1 = unbounded).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub configs: BTreeMap<String, serde_json::Value>,
}

fn one() -> u32 {
    1
}
fn one_u16() -> u16 {
    1
}

/// A topic and its partitions.
#[derive(Debug, Serialize, ToSchema)]
pub struct TopicInfo {
    pub name: String,
    pub replication_factor: u16,
    pub configs: BTreeMap<String, String>,
    pub partitions: Vec<PartitionInfo>,
}

pub fn describe_topic(topic: &TopicHandle, broker_id: u32) -> TopicInfo {
    TopicInfo {
        name: topic.meta.name.clone(),
        replication_factor: topic.meta.replication_factor,
        configs: topic.meta.configs.to_kafka(),
        partitions: topic
            .partitions
            .iter()
            .map(|p| describe_partition(p, broker_id))
            .collect(),
    }
}

/// Names of all topics.
#[utoipa::path(tag = "topics", responses((status = 200, body = Vec<String>)))]
#[get("/topics")]
pub async fn list(state: State) -> HttpResponse {
    let names: Vec<String> = state
        .broker
        .registry
        .list()
        .iter()
        .map(|t| t.meta.name.clone())
        .collect();
    HttpResponse::Ok().json(names)
}

/// Create a topic.
#[utoipa::path(
    tag = "topics",
    request_body(content = CreateTopicRequest, content_type = "application/json"),
    responses(
        (status = 201, body = TopicInfo),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 409, description = "Topic exists", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody),
        (status = 422, description = "Invalid name, partition count, replication factor or config", body = ErrorBody)
    )
)]
#[post("/topics")]
pub async fn create(
    state: State,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    body_format(&req, false)?;
    let body = read_body(&req, payload, state.config.request_body_bytes_max).await?;
    let request: CreateTopicRequest = parse_json(&body)?;
    let configs = request
        .configs
        .into_iter()
        .map(|(key, value)| match value {
            serde_json::Value::String(s) => Ok((key, s)),
            // 1e3 and 1000.0 are the integer 1000, as JSON Schema reads them.
            serde_json::Value::Number(n) => Ok((
                key,
                match n.as_f64() {
                    Some(f) if n.as_i64().is_none() && f.fract() == 0.0 && f.abs() < 9.2e18 => {
                        (f as i64).to_string()
                    }
                    _ => n.to_string(),
                },
            )),
            other => Err(ApiError::Unprocessable(format!(
                "invalid configs.{key}: {other} is not a number or string"
            ))),
        })
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    let create = CreateTopic {
        name: request.name,
        partitions: request.partitions,
        replication_factor: request.replication_factor,
        configs,
    };
    let meta = state
        .broker
        .metadata
        .send(create)
        .await
        .map_err(|_| ApiError::Unavailable("broker is shutting down".into()))??;
    let handle = state
        .broker
        .registry
        .get(&meta.name)
        .ok_or_else(|| ApiError::Internal("created topic is not hosted".into()))?;
    Ok(HttpResponse::Created().json(describe_topic(&handle, state.config.id)))
}

/// Describe a topic: configs and partitions with their offsets.
#[utoipa::path(
    tag = "topics",
    params(("topic" = String, Path, description = "Topic name", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    responses((status = 200, body = TopicInfo), (status = 404, body = ErrorBody))
)]
#[get("/topics/{topic}")]
pub async fn describe(state: State, topic: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let handle = state
        .broker
        .registry
        .get(&topic)
        .ok_or_else(|| ApiError::TopicNotFound(topic.into_inner()))?;
    Ok(HttpResponse::Ok().json(describe_topic(&handle, state.config.id)))
}

/// Delete a topic and all of its records.
#[utoipa::path(
    tag = "topics",
    params(("topic" = String, Path, description = "Topic name", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody))
)]
#[delete("/topics/{topic}")]
pub async fn delete(state: State, topic: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let name = topic.into_inner();
    state
        .broker
        .metadata
        .send(DeleteTopic { name })
        .await
        .map_err(|_| ApiError::Unavailable("broker is shutting down".into()))??;
    Ok(HttpResponse::NoContent().finish())
}
