//! What a [`super::GroupCoordinator`] is asked and answers: its messages and the types they carry.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::watch;

use super::super::error::GroupError;
use super::super::offsets_machine::{Committed, TopicPartition};

/// Group behaviour every coordinator of a broker shares (from the broker's config).
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    /// How long an empty group waits for more members after its first one joins before it
    /// hands out partitions.
    pub initial_rebalance_delay: Duration,
    /// An instance outside group management (no subscription) not heard from for this long is
    /// removed.
    pub instance_idle_timeout: Duration,
    /// Instances per group, at most.
    pub instances_max: usize,
    /// How often a stream job (which runs where coordinators do) checkpoints while it has
    /// new input; its results reach the output topic after the checkpoint that decides them.
    pub checkpoint_interval: Duration,
}

/// Where a consumer instance starts when its group has no committed offset for a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OffsetReset {
    #[default]
    Latest,
    Earliest,
}

/// A consumer instance's configuration, as created.
#[derive(Debug, Clone)]
pub struct InstanceConfig {
    /// Client-chosen name; one is generated when None.
    pub name: Option<String>,
    /// Opaque to the coordinator (the HTTP layer's embedded format).
    pub format: String,
    pub offset_reset: OffsetReset,
    pub auto_commit: bool,
    pub session_timeout: Duration,
    /// How long a poll that does not say waits for records.
    pub poll_wait: Duration,
}

/// What an instance consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscription {
    Topics(BTreeSet<String>),
    Pattern(String),
}

/// The partitions a poll reads, from which offsets.
#[derive(Debug, Clone)]
pub struct PollPlan {
    /// Names this poll in its [`EndPoll`].
    pub poll: u64,
    pub format: String,
    pub poll_wait: Duration,
    pub partitions: Vec<(TopicPartition, u64)>,
    /// Changes when the instance's assignment may have: a poll with nothing to read waits on
    /// it as well as on the partitions' watermarks.
    pub assignment_changed: watch::Receiver<u64>,
}

/// The group as its coordinator sees it.
#[derive(Debug, Clone)]
pub struct GroupDescription {
    pub group: String,
    /// Empty, Rebalancing or Stable.
    pub state: &'static str,
    pub generation: u32,
    pub coordinator_epoch: u32,
    pub assignor: &'static str,
    pub members: Vec<MemberDescription>,
    pub committed: BTreeMap<TopicPartition, Committed>,
}

#[derive(Debug, Clone)]
pub struct MemberDescription {
    pub instance: String,
    /// "subscribed", "manual" or "idle".
    pub mode: &'static str,
    pub subscription: Option<Subscription>,
    pub owned: Vec<TopicPartition>,
    /// What the assignor wants it to own (equal to `owned` once the group is stable).
    pub target: Vec<TopicPartition>,
}

/// Requests to a coordinator; each names its instance.
#[derive(Debug, Message)]
#[rtype(result = "Result<String, GroupError>")]
pub struct CreateInstance(pub InstanceConfig);

#[derive(Debug, Message)]
#[rtype(result = "Result<(), GroupError>")]
pub struct DeleteInstance(pub String);

#[derive(Debug, Message)]
#[rtype(result = "Result<(), GroupError>")]
pub struct Subscribe {
    pub instance: String,
    pub subscription: Subscription,
}

#[derive(Debug, Message)]
#[rtype(result = "Result<(), GroupError>")]
pub struct Unsubscribe(pub String);

#[derive(Debug, Message)]
#[rtype(result = "Result<Option<Subscription>, GroupError>")]
pub struct GetSubscription(pub String);

#[derive(Debug, Message)]
#[rtype(result = "Result<(), GroupError>")]
pub struct Assign {
    pub instance: String,
    pub partitions: Vec<TopicPartition>,
}

/// The partitions an instance owns (subscribed) or was assigned (manual).
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<TopicPartition>, GroupError>")]
pub struct GetAssignment(pub String);

/// Start a poll: fixes the instance's partitions and positions until [`EndPoll`]. `wait` is
/// how long it may wait for records (None: the instance's default).
#[derive(Debug, Message)]
#[rtype(result = "Result<PollPlan, GroupError>")]
pub struct BeginPoll {
    pub instance: String,
    pub wait: Option<Duration>,
}

/// Before a poll hands its records over: is it still this coordinator's, and has the
/// coordinator not stood still meanwhile (a paused broker, whose partitions may have moved)?
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct ConfirmPoll {
    pub instance: String,
    pub poll: u64,
}

/// Poll `poll` ended; `advanced` is the next offset per partition whose records it delivered
/// (empty when the response never reached the client).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct EndPoll {
    pub instance: String,
    pub poll: u64,
    pub advanced: Vec<(TopicPartition, u64)>,
}

/// Commit `offsets`, or with None every position the instance has consumed to.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<(TopicPartition, u64)>, GroupError>")]
pub struct Commit {
    pub instance: String,
    pub offsets: Option<Vec<(TopicPartition, u64, String)>>,
}

#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<(TopicPartition, Option<Committed>)>, GroupError>")]
pub struct GetCommitted {
    pub instance: String,
    pub partitions: Vec<TopicPartition>,
}

/// Where an instance's next poll reads.
#[derive(Debug, Clone)]
pub enum SeekTo {
    Offsets(Vec<(TopicPartition, u64)>),
    Beginning(Vec<TopicPartition>),
    End(Vec<TopicPartition>),
}

#[derive(Debug, Message)]
#[rtype(result = "Result<(), GroupError>")]
pub struct Seek {
    pub instance: String,
    pub to: SeekTo,
}

#[derive(Debug, Message)]
#[rtype(result = "GroupDescription")]
pub struct Describe;

/// Stop: every instance goes with the coordinator.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopCoordinator {
    pub reason: &'static str,
}
