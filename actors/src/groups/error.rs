//! What can go wrong with a group request, in terms both front doors map to their own codes.

use crate::error::StorageError;

use super::classic::ClassicError;
use super::offsets_machine::GroupRefusal;

#[derive(Debug, Clone, thiserror::Error)]
pub enum GroupError {
    /// This broker does not coordinate the group; `leader` is the broker that does (0: none
    /// known yet), `replicas` the brokers that may.
    #[error("broker {me} is not the coordinator of group '{group}'{}", coordinator_hint(*.leader))]
    NotCoordinator {
        group: String,
        me: u64,
        leader: u64,
        replicas: Vec<u64>,
    },
    /// This broker just became the coordinator and is still taking the group over.
    #[error("the coordinator of group '{0}' is loading it; retry shortly")]
    Loading(String),
    #[error("{0}")]
    Refused(#[from] GroupRefusal),
    #[error("the commit of group '{0}' may or may not have been stored (leadership changed); read the committed offsets and retry")]
    OutcomeUnknown(String),
    #[error("group '{0}' was not written: no leader for its offsets partition; retry")]
    NotWritten(String),
    #[error(transparent)]
    Storage(StorageError),
    /// No coordinator runs for the group and it has no stored state.
    #[error("consumer group '{0}' not found")]
    UnknownGroup(String),
    #[error("consumer instance '{instance}' not found in group '{group}'")]
    UnknownInstance { group: String, instance: String },
    #[error("consumer instance '{instance}' already exists in group '{group}'")]
    InstanceExists { group: String, instance: String },
    /// The instance was a member and was removed (session expired, or the coordinator moved):
    /// Kafka's UNKNOWN_MEMBER_ID / FENCED_MEMBER_EPOCH.
    #[error("consumer instance '{instance}' of group '{group}' is no longer a member ({reason}); create a new instance")]
    Fenced {
        group: String,
        instance: String,
        reason: String,
    },
    /// A commit or seek for a partition the instance does not own (Kafka: the partition is
    /// not assigned to this member).
    #[error("partition {partition} of topic '{topic}' is not assigned to consumer instance '{instance}'")]
    NotAssigned {
        instance: String,
        topic: String,
        partition: u32,
    },
    #[error("{0}")]
    InvalidOffset(String),
    #[error("topic '{0}' not found")]
    UnknownTopic(String),
    #[error("partition {partition} of topic '{topic}' not found")]
    UnknownPartition { topic: String, partition: u32 },
    #[error("{0}")]
    Invalid(String),
    /// The request conflicts with the instance's state (a second poll under way, a subscribed
    /// instance given a manual assignment, …).
    #[error("{0}")]
    Conflict(String),
    #[error("group '{0}' is being shut down on this broker; retry")]
    Stopping(String),
    /// A classic-protocol refusal (Kafka's error code is [`ClassicError::kafka_code`]).
    #[error("{0}")]
    Classic(#[from] ClassicError),
}

fn coordinator_hint(leader: u64) -> String {
    if leader == 0 {
        "; no coordinator is known yet, retry shortly".to_owned()
    } else {
        format!("; broker {leader} is")
    }
}
