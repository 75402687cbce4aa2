//! Operational endpoints: liveness, readiness, Prometheus metrics, the OpenAPI document.

use actix_web::{get, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::State;

#[derive(Debug, Serialize, ToSchema)]
pub struct Status {
    pub status: &'static str,
    pub broker_id: u32,
}

/// Liveness: the process answers HTTP.
#[utoipa::path(tag = "system", responses((status = 200, body = Status)))]
#[get("/health")]
pub async fn health(state: State) -> HttpResponse {
    HttpResponse::Ok().json(Status {
        status: "ok",
        broker_id: state.config.id,
    })
}

/// Readiness: storage is healthy and the cluster's metadata group has a leader.
#[utoipa::path(tag = "system", responses((status = 200, body = Status), (status = 503, body = ErrorBody)))]
#[get("/ready")]
pub async fn ready(state: State) -> Result<HttpResponse, ApiError> {
    if !state.broker.storage.is_healthy() {
        return Err(ApiError::Unavailable(
            state.broker.storage.failed().to_string(),
        ));
    }
    if state.broker.cluster.metadata_leader() == 0 {
        return Err(ApiError::Unavailable(
            "the cluster's metadata group has no leader yet (are a majority of brokers up?)".into(),
        ));
    }
    Ok(HttpResponse::Ok().json(Status {
        status: "ready",
        broker_id: state.config.id,
    }))
}

/// Prometheus text exposition of every broker metric.
#[utoipa::path(tag = "system", responses((status = 200, content_type = "text/plain", body = String)))]
#[get("/metrics")]
pub async fn metrics(state: State) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.broker.metrics.render())
}

/// This API's OpenAPI 3 document.
#[utoipa::path(tag = "system", responses((status = 200, content_type = "application/json", body = Object)))]
#[get("/openapi.json")]
pub async fn openapi(state: State) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(state.openapi.get().cloned().unwrap_or_default())
}
