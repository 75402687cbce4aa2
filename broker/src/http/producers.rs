//! `POST /producers`: a new idempotent producer id (Kafka's InitProducerId), for the HTTP
//! produce API's `producer_id` / `producer_epoch` / `sequence` fields.

use actix_web::{post, HttpResponse};
use pubg1_actors::metadata::InitProducerId;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::State;

/// A producer id of its own: send its records with `producer_epoch` 0 and sequences from 0.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProducerIdResponse {
    pub producer_id: i64,
    pub producer_epoch: i16,
}

/// Allocate a producer id, unique in the cluster and never reused.
#[utoipa::path(
    tag = "records",
    responses((status = 200, body = ProducerIdResponse), (status = 503, body = ErrorBody))
)]
#[post("/producers")]
pub async fn init(state: State) -> Result<HttpResponse, ApiError> {
    let id = state
        .broker
        .metadata
        .send(InitProducerId)
        .await
        .map_err(|_| {
            ApiError::Unavailable("the broker's metadata actor is restarting; retry".into())
        })??;
    Ok(HttpResponse::Ok().json(ProducerIdResponse {
        producer_id: id,
        producer_epoch: 0,
    }))
}
