//! The one place HTTP errors become status codes and JSON bodies.
//!
//! Every error a client sees is `{"error_code": <status*100+n>, "message": "..."}`, the shape of
//! Confluent REST Proxy errors, with the HTTP status the code starts with. Retriable conditions
//! (503, 429) also carry `Retry-After`.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use pubg1_actors::error::{PartitionError, StorageError, TopicError};
use pubg1_actors::groups::error::GroupError;
use pubg1_actors::groups::offsets_machine::GroupRefusal;
use pubg1_actors::streams::machine::JobRefusal;
use serde::Serialize;
use utoipa::ToSchema;

/// Seconds a client should wait before retrying a retriable error.
const RETRY_AFTER_SECONDS: &str = "1";

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The HTTP status times 100 plus a detail number, e.g. 40401 = topic not found.
    pub error_code: u32,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no route for {method} {path}")]
    NoRoute { method: String, path: String },
    /// 405: the path exists, the method does not; `allow` lists the ones that do.
    #[error("{method} is not allowed on {path}; allowed: {allow}")]
    MethodNotAllowed {
        method: String,
        path: String,
        allow: String,
    },
    #[error("topic '{0}' not found")]
    TopicNotFound(String),
    #[error("partition {partition} of topic '{topic}' not found")]
    PartitionNotFound { topic: String, partition: String },
    #[error("{0}")]
    NotAcceptable(String),
    #[error("topic '{0}' already exists")]
    TopicExists(String),
    #[error("request body is larger than the {limit} byte limit")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    OffsetOutOfRange(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unprocessable(String),
    /// 421: this broker cannot serve the partition; the message names the brokers that can.
    #[error("{0}")]
    Misdirected(String),
    #[error("{0}")]
    TooManyRecords(String),
    #[error("{0}")]
    Throttled(String),
    #[error("{0}")]
    Internal(String),
    /// 503, nothing was written: retrying cannot store a record twice.
    #[error("{0}")]
    Unavailable(String),
    /// 507: this broker's disk is full; nothing was written. Another broker may take it.
    #[error("{0}")]
    InsufficientStorage(String),
    /// 503, the request may or may not have been written: a retry may store it twice.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// 307 to the broker that serves the request (a group's coordinator), same method and body.
    #[error("{message}")]
    Redirect { location: String, message: String },
    #[error("{0}")]
    InstanceNotFound(String),
    #[error("{0}")]
    GroupNotFound(String),
    /// 409: the request conflicts with the instance's or group's state; nothing changed.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InstanceExists(String),
    /// 409: the consumer instance is no longer a member of its group (session expired, or the
    /// coordinator moved); a new instance must be created.
    #[error("{0}")]
    Fenced(String),
    /// 409: a commit or seek for a partition the instance does not own.
    #[error("{0}")]
    NotAssigned(String),
    /// 409: a commit of a coordinator epoch the group has moved past.
    #[error("{0}")]
    StaleGeneration(String),
    #[error("{0}")]
    InvalidOffset(String),
    #[error("{0}")]
    JobNotFound(String),
    #[error("{0}")]
    JobExists(String),
    /// 409: an idempotent producer's sequence does not follow its last batch; nothing written.
    #[error("{0}")]
    OutOfOrderSequence(String),
    /// 409: the producer id has a newer epoch; this producer is fenced.
    #[error("{0}")]
    ProducerFenced(String),
}

impl ApiError {
    pub fn error_code(&self) -> u32 {
        match self {
            ApiError::BadRequest(_) => 40001,
            ApiError::NoRoute { .. } => 40400,
            ApiError::MethodNotAllowed { .. } => 40501,
            ApiError::TopicNotFound(_) => 40401,
            ApiError::PartitionNotFound { .. } => 40402,
            ApiError::NotAcceptable(_) => 40601,
            ApiError::TopicExists(_) => 40901,
            ApiError::PayloadTooLarge { .. } => 41301,
            ApiError::UnsupportedMediaType(_) => 41501,
            ApiError::OffsetOutOfRange(_) => 41601,
            ApiError::Misdirected(_) => 42101,
            ApiError::Unprocessable(_) => 42201,
            ApiError::TooManyRecords(_) => 42202,
            ApiError::Throttled(_) => 42901,
            ApiError::Internal(_) => 50001,
            ApiError::InsufficientStorage(_) => 50701,
            ApiError::Unavailable(_) => 50301,
            ApiError::OutcomeUnknown(_) => 50302,
            ApiError::Redirect { .. } => 30701,
            ApiError::InstanceNotFound(_) => 40403,
            ApiError::GroupNotFound(_) => 40404,
            ApiError::Conflict(_) => 40902,
            ApiError::InstanceExists(_) => 40903,
            ApiError::Fenced(_) => 40904,
            ApiError::NotAssigned(_) => 40905,
            ApiError::StaleGeneration(_) => 40906,
            ApiError::InvalidOffset(_) => 42203,
            ApiError::JobNotFound(_) => 40405,
            ApiError::JobExists(_) => 40907,
            ApiError::OutOfOrderSequence(_) => 40908,
            ApiError::ProducerFenced(_) => 40909,
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error_code: self.error_code(),
            message: self.to_string(),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16((self.error_code() / 100) as u16)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if matches!(
            self,
            ApiError::Unavailable(_) | ApiError::OutcomeUnknown(_) | ApiError::Throttled(_)
        ) {
            response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECONDS));
        }
        if let ApiError::Redirect { location, .. } = self {
            response.insert_header((header::LOCATION, location.as_str()));
        }
        if let ApiError::MethodNotAllowed { allow, .. } = self {
            response.insert_header((header::ALLOW, allow.as_str()));
        }
        response.json(self.body())
    }
}

impl From<PartitionError> for ApiError {
    fn from(error: PartitionError) -> Self {
        match &error {
            PartitionError::OffsetOutOfRange { .. } => {
                ApiError::OffsetOutOfRange(error.to_string())
            }
            PartitionError::Restarting { .. }
            | PartitionError::NoLeader { .. }
            | PartitionError::NotWritten { .. } => ApiError::Unavailable(error.to_string()),
            PartitionError::OutcomeUnknown { .. } | PartitionError::Timeout { .. } => {
                ApiError::OutcomeUnknown(error.to_string())
            }
            PartitionError::Overloaded { .. } => ApiError::Throttled(error.to_string()),
            PartitionError::Deleted { topic, .. } => ApiError::TopicNotFound(topic.clone()),
            PartitionError::NotReplica { .. } => ApiError::Misdirected(error.to_string()),
            PartitionError::Storage(storage) => storage_error(storage),
            PartitionError::Batch(_) => ApiError::Internal(error.to_string()),
            PartitionError::OutOfOrderSequence { .. } => {
                ApiError::OutOfOrderSequence(error.to_string())
            }
            PartitionError::InvalidProducerEpoch { .. } => {
                ApiError::ProducerFenced(error.to_string())
            }
        }
    }
}

impl From<TopicError> for ApiError {
    fn from(error: TopicError) -> Self {
        match error {
            TopicError::InvalidName { .. }
            | TopicError::InvalidArgument { .. }
            | TopicError::TooManyTopics { .. } => ApiError::Unprocessable(error.to_string()),
            TopicError::AlreadyExists(name) => ApiError::TopicExists(name),
            TopicError::NotFound(name) => ApiError::TopicNotFound(name),
            TopicError::Storage(storage) => storage_error(&storage),
            TopicError::ShuttingDown | TopicError::NoLeader => {
                ApiError::Unavailable(error.to_string())
            }
            TopicError::OutcomeUnknown => ApiError::OutcomeUnknown(error.to_string()),
        }
    }
}

impl From<GroupError> for ApiError {
    /// A `NotCoordinator` with a known leader is turned into a redirect by the caller, which
    /// knows the request's path; here it is a 503.
    fn from(error: GroupError) -> Self {
        let message = error.to_string();
        match error {
            GroupError::NotCoordinator { .. }
            | GroupError::Loading(_)
            | GroupError::Stopping(_)
            | GroupError::NotWritten(_) => ApiError::Unavailable(message),
            GroupError::OutcomeUnknown(_) => ApiError::OutcomeUnknown(message),
            GroupError::Refused(GroupRefusal::IllegalGeneration { .. }) => {
                ApiError::StaleGeneration(message)
            }
            GroupError::Refused(GroupRefusal::NoSuchGroup(_)) => ApiError::GroupNotFound(message),
            GroupError::Refused(GroupRefusal::GenerationBackwards { .. }) => {
                ApiError::Internal(message)
            }
            GroupError::Refused(GroupRefusal::Job(JobRefusal::Exists(_))) => {
                ApiError::JobExists(message)
            }
            GroupError::Refused(GroupRefusal::Job(JobRefusal::NoSuchJob(_))) => {
                ApiError::JobNotFound(message)
            }
            GroupError::Refused(GroupRefusal::Job(JobRefusal::Fenced { .. })) => {
                ApiError::Conflict(message)
            }
            GroupError::Storage(storage) => storage_error(&storage),
            GroupError::UnknownInstance { .. } => ApiError::InstanceNotFound(message),
            GroupError::UnknownGroup(_) => ApiError::GroupNotFound(message),
            GroupError::InstanceExists { .. } => ApiError::InstanceExists(message),
            GroupError::Fenced { .. } => ApiError::Fenced(message),
            GroupError::NotAssigned { .. } => ApiError::NotAssigned(message),
            GroupError::InvalidOffset(_) => ApiError::InvalidOffset(message),
            GroupError::UnknownTopic(topic) => ApiError::TopicNotFound(topic),
            GroupError::UnknownPartition { topic, partition } => ApiError::PartitionNotFound {
                topic,
                partition: partition.to_string(),
            },
            GroupError::Invalid(_) => ApiError::Unprocessable(message),
            GroupError::Conflict(_) | GroupError::Classic(_) => ApiError::Conflict(message),
        }
    }
}

pub fn storage_error(error: &StorageError) -> ApiError {
    match error {
        StorageError::QueueFull { .. } => ApiError::Throttled(error.to_string()),
        _ if error.is_disk_full() => ApiError::InsufficientStorage(error.to_string()),
        // This broker cannot write until it is restarted; the partition's other replicas can.
        StorageError::ShutDown | StorageError::Failed { .. } => {
            ApiError::Unavailable(error.to_string())
        }
        _ => ApiError::Internal(error.to_string()),
    }
}
