//! PubG1's errors as Kafka error codes, chosen so a Kafka client does the right thing: retry
//! after refreshing metadata where nothing was written, retry (idempotently) where the outcome
//! is unknown, give up where retrying cannot help.

use kafka_protocol::ResponseError;
use pubg1_actors::error::{PartitionError, StorageError, TopicError};

pub fn partition_error(error: &PartitionError) -> ResponseError {
    match error {
        PartitionError::OffsetOutOfRange { .. } => ResponseError::OffsetOutOfRange,
        // Nothing was written, and leadership is moving or unknown: refresh metadata, retry.
        PartitionError::Restarting { .. }
        | PartitionError::NoLeader { .. }
        | PartitionError::NotWritten { .. }
        | PartitionError::NotReplica { .. } => ResponseError::NotLeaderOrFollower,
        // May or may not be in the log: a retry is safe for an idempotent producer, which is
        // what REQUEST_TIMED_OUT makes a Kafka client do.
        PartitionError::OutcomeUnknown { .. } | PartitionError::Timeout { .. } => {
            ResponseError::RequestTimedOut
        }
        // Back-pressure; nothing was written.
        PartitionError::Overloaded { .. } => ResponseError::RequestTimedOut,
        PartitionError::Deleted { .. } => ResponseError::UnknownTopicOrPartition,
        PartitionError::OutOfOrderSequence { .. } => ResponseError::OutOfOrderSequenceNumber,
        PartitionError::InvalidProducerEpoch { .. } => ResponseError::InvalidProducerEpoch,
        PartitionError::Storage(storage) => storage_error(storage),
        PartitionError::Batch(_) => ResponseError::CorruptMessage,
    }
}

pub fn storage_error(error: &StorageError) -> ResponseError {
    match error {
        StorageError::QueueFull { .. } => ResponseError::RequestTimedOut,
        _ => ResponseError::KafkaStorageError,
    }
}

pub fn topic_error(error: &TopicError) -> ResponseError {
    match error {
        TopicError::InvalidName { .. } => ResponseError::InvalidTopicException,
        TopicError::AlreadyExists(_) => ResponseError::TopicAlreadyExists,
        TopicError::NotFound(_) => ResponseError::UnknownTopicOrPartition,
        TopicError::InvalidArgument { field, .. } if field == "partitions" => {
            ResponseError::InvalidPartitions
        }
        TopicError::InvalidArgument { field, .. } if field == "replication_factor" => {
            ResponseError::InvalidReplicationFactor
        }
        TopicError::InvalidArgument { .. } => ResponseError::InvalidConfig,
        TopicError::TooManyTopics { .. } => ResponseError::PolicyViolation,
        TopicError::Storage(storage) => storage_error(storage),
        TopicError::ShuttingDown | TopicError::NoLeader | TopicError::OutcomeUnknown => {
            ResponseError::RequestTimedOut
        }
    }
}
