//! `GroupCoordinator`: one consumer group on its coordinator broker — its consumer instances,
//! their membership and positions ([`Membership`] decides who owns what), and its committed
//! offsets, which it changes only through its offsets partition's Raft group.
//!
//! Started by the [`OffsetsReplica`] that leads the group's offsets partition, from its applied
//! state. Before serving, it moves the group's coordinator epoch on (a committed
//! `Generation` entry): a coordinator deposed meanwhile, whose late commits could still reach
//! the log through a forwarded proposal, then has them refused at apply on every replica.
//!
//! Instances (REST Proxy's consumer instances) live here, in memory: a coordinator that stops
//! (leadership moved, broker gone) takes them with it, and their clients create new ones, as
//! REST Proxy clients do when a proxy restarts. Committed offsets are what survives.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::watch;

use super::assignor::Assignor;
use super::error::GroupError;
use super::membership::{Membership, MembershipError};
use super::offsets_machine::{Committed, GroupCommand, GroupState, TopicPartition};
use super::offsets_replica::{OffsetsReplica, ProposeGroup};
use crate::partition_replica::now_ms;
use crate::registry::Registry;

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

#[derive(Debug)]
enum Mode {
    Idle,
    Subscribed {
        subscription: Subscription,
        pattern: Option<regex::Regex>,
    },
    Manual(BTreeSet<TopicPartition>),
}

#[derive(Debug)]
struct Instance {
    config: InstanceConfig,
    mode: Mode,
    last_seen: Instant,
    /// Next offset to fetch per partition it owns or was assigned.
    positions: BTreeMap<TopicPartition, u64>,
    /// Positions as last committed by auto-commit (to skip commits that change nothing).
    auto_committed: BTreeMap<TopicPartition, u64>,
    /// A manual-assignment instance's poll under way (members' polls are in [`Membership`]).
    polling: bool,
}

/// The partitions a poll reads, from which offsets.
#[derive(Debug, Clone)]
pub struct PollPlan {
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

#[derive(Debug, Message)]
#[rtype(result = "Result<PollPlan, GroupError>")]
pub struct BeginPoll(pub String);

/// A poll ended; `advanced` is the next offset per partition it returned records of.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct EndPoll {
    pub instance: String,
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

/// Removed instances remembered so their clients get "no longer a member", not "unknown".
const GONE_KEPT: usize = 1024;
/// How often sessions, idle instances and subscribed topics are checked.
const HOUSEKEEPING: Duration = Duration::from_millis(100);

pub struct GroupCoordinator {
    group: String,
    /// The coordinator epoch this coordinator commits under (its takeover's `Generation`).
    epoch: u32,
    taken_over: bool,
    committed: BTreeMap<TopicPartition, Committed>,
    membership: Membership,
    instances: BTreeMap<String, Instance>,
    gone: VecDeque<(String, String)>,
    offsets: Addr<OffsetsReplica>,
    registry: Registry,
    settings: CoordinatorSettings,
    assignment_changed: watch::Sender<u64>,
    stopping: Option<&'static str>,
    next_instance: u64,
}

impl GroupCoordinator {
    pub fn new(
        group: String,
        state: GroupState,
        offsets: Addr<OffsetsReplica>,
        registry: Registry,
        settings: CoordinatorSettings,
    ) -> Self {
        Self {
            group,
            epoch: state.generation + 1,
            taken_over: false,
            committed: state.offsets,
            membership: Membership::new(Assignor::default(), 0),
            instances: BTreeMap::new(),
            gone: VecDeque::new(),
            offsets,
            registry,
            settings,
            assignment_changed: watch::Sender::new(0),
            stopping: None,
            next_instance: 0,
        }
    }

    fn check_serving(&self) -> Result<(), GroupError> {
        if self.stopping.is_some() || !self.taken_over {
            return Err(GroupError::Stopping(self.group.clone()));
        }
        Ok(())
    }

    /// The instance, touched (every request is a heartbeat), or why there is none.
    fn instance(&mut self, id: &str, now: Instant) -> Result<&mut Instance, GroupError> {
        self.check_serving()?;
        if !self.instances.contains_key(id) {
            return Err(match self.gone.iter().find(|(gone, _)| gone == id) {
                Some((_, reason)) => GroupError::Fenced {
                    group: self.group.clone(),
                    instance: id.to_owned(),
                    reason: reason.clone(),
                },
                None => GroupError::UnknownInstance {
                    group: self.group.clone(),
                    instance: id.to_owned(),
                },
            });
        }
        let instance = self
            .instances
            .get_mut(id)
            .ok_or_else(|| GroupError::UnknownInstance {
                group: self.group.clone(),
                instance: id.to_owned(),
            })?;
        instance.last_seen = now;
        Ok(instance)
    }

    fn forget(&mut self, id: &str, reason: String) {
        self.instances.remove(id);
        self.gone.push_back((id.to_owned(), reason));
        while self.gone.len() > GONE_KEPT {
            self.gone.pop_front();
        }
    }

    /// Partition counts of the topics the members subscribe to (patterns matched against every
    /// topic of the catalog).
    fn topics(&self) -> BTreeMap<String, u32> {
        let mut topics = BTreeMap::new();
        let listed = self.registry.list();
        for instance in self.instances.values() {
            let Mode::Subscribed {
                subscription,
                pattern,
            } = &instance.mode
            else {
                continue;
            };
            match (subscription, pattern) {
                (Subscription::Topics(names), _) => {
                    for name in names {
                        if let Some(handle) = self.registry.get(name) {
                            topics.insert(name.clone(), handle.meta.partitions);
                        }
                    }
                }
                (Subscription::Pattern(_), Some(pattern)) => {
                    for handle in &listed {
                        if pattern.is_match(&handle.meta.name) {
                            topics.insert(handle.meta.name.clone(), handle.meta.partitions);
                        }
                    }
                }
                (Subscription::Pattern(_), None) => {}
            }
        }
        topics
    }

    /// The topics a member's subscription names now.
    fn subscribed_topics(&self, id: &str, topics: &BTreeMap<String, u32>) -> BTreeSet<String> {
        match self.instances.get(id).map(|i| &i.mode) {
            Some(Mode::Subscribed {
                subscription: Subscription::Topics(names),
                ..
            }) => names.clone(),
            Some(Mode::Subscribed {
                pattern: Some(pattern),
                ..
            }) => topics
                .keys()
                .filter(|t| pattern.is_match(t))
                .cloned()
                .collect(),
            _ => BTreeSet::new(),
        }
    }

    fn notify(&self) {
        self.assignment_changed.send_modify(|n| *n += 1);
    }

    /// Join (or re-join with a new subscription) and recompute the target.
    fn join(&mut self, id: &str, now: Instant, ctx: &mut Context<Self>) {
        let topics = self.topics();
        let subscribed = self.subscribed_topics(id, &topics);
        let session = self
            .instances
            .get(id)
            .map_or(Duration::from_secs(30), |i| i.config.session_timeout);
        if self.membership.members().is_empty() && !self.settings.initial_rebalance_delay.is_zero()
        {
            let until = now + self.settings.initial_rebalance_delay;
            self.membership.hold_until(until);
            ctx.run_later(self.settings.initial_rebalance_delay, |act, _| act.notify());
        }
        self.membership.join(id, subscribed, session, topics, now);
        self.notify();
    }

    fn leave(&mut self, id: &str, now: Instant) {
        let topics = self.topics();
        if self.membership.leave(id, topics, now) {
            self.notify();
        }
    }

    /// A heartbeat of a member outside a poll: releases what was revoked from it (after
    /// auto-committing it) and takes what is free of its target.
    fn heartbeat(&mut self, id: &str, now: Instant, ctx: &mut Context<Self>) {
        match self.membership.heartbeat(id, now) {
            Ok(reconciled) => {
                if !reconciled.revoked.is_empty() {
                    self.released(id, &reconciled.revoked, ctx);
                }
                if !reconciled.revoked.is_empty() || !reconciled.assigned.is_empty() {
                    self.notify();
                }
            }
            Err(MembershipError::UnknownMember | MembershipError::PollInProgress) => {}
        }
    }

    /// `id` gave up `revoked`: with auto-commit its positions are committed, and in any case
    /// the next owner starts from the committed offset.
    fn released(&mut self, id: &str, revoked: &[TopicPartition], ctx: &mut Context<Self>) {
        let Some(instance) = self.instances.get_mut(id) else {
            return;
        };
        let mut handed: Vec<(TopicPartition, u64)> = Vec::new();
        for tp in revoked {
            if let Some(position) = instance.positions.remove(tp) {
                if instance.config.auto_commit {
                    handed.push((tp.clone(), position));
                }
            }
            instance.auto_committed.remove(tp);
        }
        if !handed.is_empty() {
            // Taken as committed now, so the next owner starts where this one stopped; the
            // commit itself is in flight (a crash before it lands means redelivery, never loss).
            self.commit_in_background(handed, ctx);
        }
    }

    fn commit_in_background(
        &mut self,
        offsets: Vec<(TopicPartition, u64)>,
        ctx: &mut Context<Self>,
    ) {
        let at = now_ms();
        let entries: Vec<(TopicPartition, Committed)> = offsets
            .into_iter()
            .map(|(tp, offset)| {
                (
                    tp,
                    Committed {
                        offset,
                        metadata: String::new(),
                        committed_at_ms: at,
                    },
                )
            })
            .collect();
        for (tp, committed) in &entries {
            self.committed.insert(tp.clone(), committed.clone());
        }
        let command = GroupCommand::Commit {
            group: self.group.clone(),
            generation: Some(self.epoch),
            offsets: entries,
        };
        let group = self.group.clone();
        ctx.spawn(
            self.offsets
                .send(ProposeGroup(command))
                .into_actor(self)
                .map(move |result, _act, _ctx| {
                    if let Ok(Err(e)) | Err(e) = result.map_err(|_| GroupError::Stopping(group)) {
                        tracing::warn!(error = %e, "auto-commit failed");
                    }
                }),
        );
    }

    /// Where a partition an instance starts reading should start: the committed offset (if
    /// still in the log), else the instance's reset policy.
    fn start_position(&self, tp: &TopicPartition, reset: OffsetReset) -> u64 {
        let shared = self
            .registry
            .get(&tp.topic)
            .and_then(|h| h.partition(tp.partition).cloned());
        let (start, end) = shared
            .as_ref()
            .map_or((0, 0), |p| (p.log_start_offset(), p.known_log_end()));
        match self.committed.get(tp) {
            Some(c) if c.offset >= start => c.offset,
            _ => match reset {
                OffsetReset::Earliest => start,
                OffsetReset::Latest => end,
            },
        }
    }

    /// The partitions instance `id` may read and commit.
    fn readable(&self, id: &str) -> BTreeSet<TopicPartition> {
        match self.instances.get(id).map(|i| &i.mode) {
            Some(Mode::Manual(partitions)) => partitions.clone(),
            Some(Mode::Subscribed { .. }) => self
                .membership
                .member(id)
                .map(|m| m.owned.clone())
                .unwrap_or_default(),
            _ => BTreeSet::new(),
        }
    }

    fn housekeeping(&mut self, ctx: &mut Context<Self>) {
        if !self.taken_over || self.stopping.is_some() {
            return;
        }
        let now = Instant::now();
        let topics = self.topics();
        for id in self.membership.expire(topics.clone(), now) {
            tracing::info!(group = %self.group, instance = %id, "consumer session expired; its partitions move");
            self.forget(&id, "its session timed out".to_owned());
            self.notify();
        }
        let idle: Vec<String> = self
            .instances
            .iter()
            .filter(|(_, i)| {
                !matches!(i.mode, Mode::Subscribed { .. })
                    && !i.polling
                    && now.duration_since(i.last_seen) > self.settings.instance_idle_timeout
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in idle {
            self.forget(
                &id,
                "it was idle longer than the instance timeout".to_owned(),
            );
        }
        // Pattern subscriptions pick up new topics; grown or deleted topics are re-spread.
        let ids: Vec<String> = self.membership.members().keys().cloned().collect();
        let mut changed = false;
        for id in ids {
            let subscribed = self.subscribed_topics(&id, &topics);
            if self
                .membership
                .member(&id)
                .is_some_and(|m| m.subscription != subscribed)
            {
                let session = self.membership.member(&id).map(|m| m.session_timeout);
                if let Some(session) = session {
                    self.membership
                        .join(&id, subscribed, session, topics.clone(), now);
                    changed = true;
                }
            }
        }
        let generation = self.membership.generation;
        self.membership.observe_topics(topics, now);
        if changed || generation != self.membership.generation {
            self.notify();
        }
        let _ = ctx;
    }
}

impl Actor for GroupCoordinator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let takeover = GroupCommand::Generation {
            group: self.group.clone(),
            generation: self.epoch,
        };
        // Requests wait in the mailbox until the takeover is committed.
        ctx.wait(
            self.offsets
                .send(ProposeGroup(takeover))
                .into_actor(self)
                .map(|result, act, ctx| match result {
                    Ok(Ok(())) => {
                        act.taken_over = true;
                        tracing::info!(group = %act.group, epoch = act.epoch, "coordinating group");
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(group = %act.group, error = %e, "group takeover failed");
                        ctx.stop();
                    }
                    Err(_) => ctx.stop(),
                }),
        );
        ctx.run_interval(HOUSEKEEPING, Self::housekeeping);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.notify();
    }
}

impl Handler<StopCoordinator> for GroupCoordinator {
    type Result = ();

    fn handle(&mut self, msg: StopCoordinator, ctx: &mut Self::Context) {
        tracing::info!(group = %self.group, reason = msg.reason, "coordinator stopping");
        self.stopping = Some(msg.reason);
        ctx.stop();
    }
}

impl Handler<CreateInstance> for GroupCoordinator {
    type Result = Result<String, GroupError>;

    fn handle(&mut self, msg: CreateInstance, _ctx: &mut Self::Context) -> Self::Result {
        self.check_serving()?;
        if self.instances.len() >= self.settings.instances_max {
            return Err(GroupError::Conflict(format!(
                "group '{}' has {} consumer instances, the most one group may have",
                self.group, self.settings.instances_max
            )));
        }
        let id = match &msg.0.name {
            Some(name) => {
                if self.instances.contains_key(name) {
                    return Err(GroupError::InstanceExists {
                        group: self.group.clone(),
                        instance: name.clone(),
                    });
                }
                name.clone()
            }
            None => loop {
                self.next_instance += 1;
                let id = format!("rest-consumer-{}-{}", self.epoch, self.next_instance);
                if !self.instances.contains_key(&id) {
                    break id;
                }
            },
        };
        // A name reused after its instance went is a new instance.
        self.gone.retain(|(gone, _)| *gone != id);
        self.instances.insert(
            id.clone(),
            Instance {
                config: msg.0,
                mode: Mode::Idle,
                last_seen: Instant::now(),
                positions: BTreeMap::new(),
                auto_committed: BTreeMap::new(),
                polling: false,
            },
        );
        Ok(id)
    }
}

impl Handler<DeleteInstance> for GroupCoordinator {
    type Result = ResponseActFuture<Self, Result<(), GroupError>>;

    fn handle(&mut self, msg: DeleteInstance, ctx: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        if let Err(e) = self.instance(&msg.0, now) {
            return Box::pin(actix::fut::ready(Err(e)));
        }
        let owned = self.readable(&msg.0);
        self.released(&msg.0, &owned.into_iter().collect::<Vec<_>>(), ctx);
        self.leave(&msg.0, now);
        self.instances.remove(&msg.0);
        Box::pin(actix::fut::ready(Ok(())))
    }
}

impl Handler<Subscribe> for GroupCoordinator {
    type Result = Result<(), GroupError>;

    fn handle(&mut self, msg: Subscribe, ctx: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        let instance = self.instance(&msg.instance, now)?;
        if matches!(instance.mode, Mode::Manual(_)) {
            return Err(GroupError::Conflict(format!(
                "consumer instance '{}' has a manual assignment; delete it (or the assignment) before subscribing",
                msg.instance
            )));
        }
        let pattern = match &msg.subscription {
            Subscription::Pattern(p) => {
                Some(regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                    GroupError::Invalid(format!(
                        "topic_pattern is not a valid regular expression: {e}"
                    ))
                })?)
            }
            Subscription::Topics(topics) => {
                if let Some(missing) = topics.iter().find(|t| self.registry.get(t).is_none()) {
                    return Err(GroupError::UnknownTopic(missing.clone()));
                }
                None
            }
        };
        let instance = self.instance(&msg.instance, now)?;
        instance.mode = Mode::Subscribed {
            subscription: msg.subscription,
            pattern,
        };
        self.join(&msg.instance, now, ctx);
        Ok(())
    }
}

impl Handler<Unsubscribe> for GroupCoordinator {
    type Result = Result<(), GroupError>;

    fn handle(&mut self, msg: Unsubscribe, ctx: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        self.instance(&msg.0, now)?;
        let owned: Vec<TopicPartition> = self.readable(&msg.0).into_iter().collect();
        self.released(&msg.0, &owned, ctx);
        self.leave(&msg.0, now);
        if let Some(instance) = self.instances.get_mut(&msg.0) {
            instance.mode = Mode::Idle;
            instance.positions.clear();
        }
        Ok(())
    }
}

impl Handler<GetSubscription> for GroupCoordinator {
    type Result = Result<Option<Subscription>, GroupError>;

    fn handle(&mut self, msg: GetSubscription, _ctx: &mut Self::Context) -> Self::Result {
        let instance = self.instance(&msg.0, Instant::now())?;
        Ok(match &instance.mode {
            Mode::Subscribed { subscription, .. } => Some(subscription.clone()),
            _ => None,
        })
    }
}

impl Handler<Assign> for GroupCoordinator {
    type Result = Result<(), GroupError>;

    fn handle(&mut self, msg: Assign, _ctx: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        for tp in &msg.partitions {
            let handle = self
                .registry
                .get(&tp.topic)
                .ok_or_else(|| GroupError::UnknownTopic(tp.topic.clone()))?;
            if tp.partition >= handle.meta.partitions {
                return Err(GroupError::UnknownPartition {
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                });
            }
        }
        let instance = self.instance(&msg.instance, now)?;
        if matches!(instance.mode, Mode::Subscribed { .. }) {
            return Err(GroupError::Conflict(format!(
                "consumer instance '{}' is subscribed; unsubscribe before assigning partitions by hand",
                msg.instance
            )));
        }
        let assigned: BTreeSet<TopicPartition> = msg.partitions.into_iter().collect();
        instance.positions.retain(|tp, _| assigned.contains(tp));
        instance.mode = Mode::Manual(assigned);
        Ok(())
    }
}

impl Handler<GetAssignment> for GroupCoordinator {
    type Result = Result<Vec<TopicPartition>, GroupError>;

    fn handle(&mut self, msg: GetAssignment, ctx: &mut Self::Context) -> Self::Result {
        self.instance(&msg.0, Instant::now())?;
        self.heartbeat(&msg.0, Instant::now(), ctx);
        Ok(self.readable(&msg.0).into_iter().collect())
    }
}

impl Handler<BeginPoll> for GroupCoordinator {
    type Result = Result<PollPlan, GroupError>;

    fn handle(&mut self, msg: BeginPoll, ctx: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        let id = msg.0;
        let instance = self.instance(&id, now)?;
        let busy = GroupError::Conflict(format!(
            "a poll of consumer instance '{id}' is already under way; wait for it to return"
        ));
        match instance.mode {
            Mode::Idle => {
                return Err(GroupError::Conflict(format!(
                    "consumer instance '{id}' is neither subscribed nor assigned partitions"
                )))
            }
            Mode::Manual(_) => {
                if instance.polling {
                    return Err(busy);
                }
                instance.polling = true;
            }
            Mode::Subscribed { .. } => {
                // Auto-commit: what the previous poll returned counts as processed once the
                // client asks for more.
                let due: Vec<(TopicPartition, u64)> = if instance.config.auto_commit {
                    let due: Vec<(TopicPartition, u64)> = instance
                        .positions
                        .iter()
                        .filter(|(tp, p)| instance.auto_committed.get(*tp) != Some(*p))
                        .map(|(tp, p)| (tp.clone(), *p))
                        .collect();
                    for (tp, p) in &due {
                        instance.auto_committed.insert(tp.clone(), *p);
                    }
                    due
                } else {
                    Vec::new()
                };
                if !due.is_empty() {
                    self.commit_in_background(due, ctx);
                }
                match self.membership.begin_poll(&id, now) {
                    Ok(reconciled) => {
                        if !reconciled.revoked.is_empty() {
                            self.released(&id, &reconciled.revoked, ctx);
                        }
                        if !reconciled.revoked.is_empty() || !reconciled.assigned.is_empty() {
                            self.notify();
                        }
                    }
                    Err(MembershipError::PollInProgress) => return Err(busy),
                    Err(MembershipError::UnknownMember) => {
                        return Err(GroupError::Fenced {
                            group: self.group.clone(),
                            instance: id,
                            reason: "it is not a member of the group".into(),
                        })
                    }
                }
            }
        }
        let readable = self.readable(&id);
        let reset = self
            .instances
            .get(&id)
            .map_or(OffsetReset::Latest, |i| i.config.offset_reset);
        let starts: Vec<(TopicPartition, u64)> = readable
            .iter()
            .filter(|tp| {
                self.instances
                    .get(&id)
                    .is_some_and(|i| !i.positions.contains_key(*tp))
            })
            .map(|tp| (tp.clone(), self.start_position(tp, reset)))
            .collect();
        // A position retention has passed is reset by the instance's policy, as Kafka's
        // consumer does on OFFSET_OUT_OF_RANGE.
        let bounds: BTreeMap<TopicPartition, (u64, u64)> = readable
            .iter()
            .filter_map(|tp| {
                let shared = self
                    .registry
                    .get(&tp.topic)?
                    .partition(tp.partition)?
                    .clone();
                Some((
                    tp.clone(),
                    (shared.log_start_offset(), shared.known_log_end()),
                ))
            })
            .collect();
        let instance = self.instance(&id, now)?;
        for (tp, start) in starts {
            instance.auto_committed.insert(tp.clone(), start);
            instance.positions.insert(tp, start);
        }
        for (tp, position) in instance.positions.iter_mut() {
            if let Some((start, end)) = bounds.get(tp) {
                if *position < *start {
                    *position = match reset {
                        OffsetReset::Earliest => *start,
                        OffsetReset::Latest => *end,
                    };
                }
            }
        }
        Ok(PollPlan {
            format: instance.config.format.clone(),
            poll_wait: instance.config.poll_wait,
            partitions: readable
                .iter()
                .filter_map(|tp| instance.positions.get(tp).map(|p| (tp.clone(), *p)))
                .collect(),
            assignment_changed: self.assignment_changed.subscribe(),
        })
    }
}

impl Handler<EndPoll> for GroupCoordinator {
    type Result = ();

    fn handle(&mut self, msg: EndPoll, _ctx: &mut Self::Context) {
        let now = Instant::now();
        let readable = self.readable(&msg.instance);
        let Some(instance) = self.instances.get_mut(&msg.instance) else {
            return;
        };
        instance.polling = false;
        instance.last_seen = now;
        for (tp, next) in msg.advanced {
            // Only partitions still its own: a revocation waits for this poll to end, so this
            // holds every partition the poll read.
            if readable.contains(&tp) {
                let position = instance.positions.entry(tp).or_insert(next);
                *position = (*position).max(next);
            }
        }
        self.membership.end_poll(&msg.instance, now);
    }
}

impl Handler<Commit> for GroupCoordinator {
    type Result = ResponseActFuture<Self, Result<Vec<(TopicPartition, u64)>, GroupError>>;

    fn handle(&mut self, msg: Commit, ctx: &mut Self::Context) -> Self::Result {
        let ready = |r| Box::pin(actix::fut::ready(r)) as Self::Result;
        let now = Instant::now();
        if let Err(e) = self.instance(&msg.instance, now) {
            return ready(Err(e));
        }
        let readable = self.readable(&msg.instance);
        let offsets: Vec<(TopicPartition, u64, String)> = match msg.offsets {
            Some(offsets) => offsets,
            None => self
                .instances
                .get(&msg.instance)
                .map(|i| {
                    i.positions
                        .iter()
                        .filter(|(tp, _)| readable.contains(*tp))
                        .map(|(tp, p)| (tp.clone(), *p, String::new()))
                        .collect()
                })
                .unwrap_or_default(),
        };
        for (tp, offset, _) in &offsets {
            if !readable.contains(tp) {
                return ready(Err(GroupError::NotAssigned {
                    instance: msg.instance,
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                }));
            }
            let end = self
                .registry
                .get(&tp.topic)
                .and_then(|h| h.partition(tp.partition).map(|p| p.known_log_end()))
                .unwrap_or(0);
            if *offset > end {
                return ready(Err(GroupError::InvalidOffset(format!(
                    "offset {offset} of partition {} of topic '{}' is beyond its high watermark {end}",
                    tp.partition, tp.topic
                ))));
            }
        }
        if offsets.is_empty() {
            self.heartbeat(&msg.instance, now, ctx);
            return ready(Ok(Vec::new()));
        }
        let at = now_ms();
        let entries: Vec<(TopicPartition, Committed)> = offsets
            .iter()
            .map(|(tp, offset, metadata)| {
                (
                    tp.clone(),
                    Committed {
                        offset: *offset,
                        metadata: metadata.clone(),
                        committed_at_ms: at,
                    },
                )
            })
            .collect();
        let command = GroupCommand::Commit {
            group: self.group.clone(),
            generation: Some(self.epoch),
            offsets: entries.clone(),
        };
        let instance = msg.instance;
        Box::pin(
            self.offsets
                .send(ProposeGroup(command))
                .into_actor(self)
                .map(move |result, act, ctx| {
                    let result =
                        result.unwrap_or_else(|_| Err(GroupError::Stopping(act.group.clone())));
                    result?;
                    for (tp, committed) in entries {
                        // A commit answered after a newer one (two in flight) must not win.
                        if act
                            .committed
                            .get(&tp)
                            .is_none_or(|c| c.committed_at_ms <= committed.committed_at_ms)
                        {
                            act.committed.insert(tp, committed);
                        }
                    }
                    // A commit is a heartbeat: a revoked partition is released after it.
                    act.heartbeat(&instance, Instant::now(), ctx);
                    Ok(offsets.into_iter().map(|(tp, o, _)| (tp, o)).collect())
                }),
        )
    }
}

impl Handler<GetCommitted> for GroupCoordinator {
    type Result = Result<Vec<(TopicPartition, Option<Committed>)>, GroupError>;

    fn handle(&mut self, msg: GetCommitted, _ctx: &mut Self::Context) -> Self::Result {
        self.instance(&msg.instance, Instant::now())?;
        Ok(msg
            .partitions
            .into_iter()
            .map(|tp| {
                let committed = self.committed.get(&tp).cloned();
                (tp, committed)
            })
            .collect())
    }
}

impl Handler<Seek> for GroupCoordinator {
    type Result = Result<(), GroupError>;

    fn handle(&mut self, msg: Seek, _ctx: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        self.instance(&msg.instance, now)?;
        let readable = self.readable(&msg.instance);
        let partitions: Vec<&TopicPartition> = match &msg.to {
            SeekTo::Offsets(offsets) => offsets.iter().map(|(tp, _)| tp).collect(),
            SeekTo::Beginning(tps) | SeekTo::End(tps) => tps.iter().collect(),
        };
        let mut bounds = BTreeMap::new();
        for tp in partitions {
            if !readable.contains(tp) {
                return Err(GroupError::NotAssigned {
                    instance: msg.instance.clone(),
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                });
            }
            let shared = self
                .registry
                .get(&tp.topic)
                .and_then(|h| h.partition(tp.partition).cloned())
                .ok_or_else(|| GroupError::UnknownTopic(tp.topic.clone()))?;
            bounds.insert(
                tp.clone(),
                (shared.log_start_offset(), shared.known_log_end()),
            );
        }
        let targets: Vec<(TopicPartition, u64)> = match msg.to {
            SeekTo::Offsets(offsets) => {
                for (tp, offset) in &offsets {
                    let (start, end) = bounds[tp];
                    if *offset < start || *offset > end {
                        return Err(GroupError::InvalidOffset(format!(
                            "offset {offset} of partition {} of topic '{}' is outside its log [{start}, {end}]",
                            tp.partition, tp.topic
                        )));
                    }
                }
                offsets
            }
            SeekTo::Beginning(tps) => tps
                .into_iter()
                .map(|tp| {
                    let s = bounds[&tp].0;
                    (tp, s)
                })
                .collect(),
            SeekTo::End(tps) => tps
                .into_iter()
                .map(|tp| {
                    let e = bounds[&tp].1;
                    (tp, e)
                })
                .collect(),
        };
        let instance = self.instance(&msg.instance, now)?;
        for (tp, offset) in targets {
            instance.positions.insert(tp, offset);
        }
        Ok(())
    }
}

impl Handler<Describe> for GroupCoordinator {
    type Result = MessageResult<Describe>;

    fn handle(&mut self, _msg: Describe, _ctx: &mut Self::Context) -> Self::Result {
        let members = self
            .instances
            .iter()
            .map(|(id, instance)| {
                let (mode, subscription) = match &instance.mode {
                    Mode::Idle => ("idle", None),
                    Mode::Manual(_) => ("manual", None),
                    Mode::Subscribed { subscription, .. } => {
                        ("subscribed", Some(subscription.clone()))
                    }
                };
                MemberDescription {
                    instance: id.clone(),
                    mode,
                    subscription,
                    owned: self.readable(id).into_iter().collect(),
                    target: self
                        .membership
                        .target_of(id)
                        .map(|t| t.iter().cloned().collect())
                        .unwrap_or_default(),
                }
            })
            .collect();
        let state = if self.membership.members().is_empty() {
            "Empty"
        } else if self.membership.is_stable() {
            "Stable"
        } else {
            "Rebalancing"
        };
        MessageResult(GroupDescription {
            group: self.group.clone(),
            state,
            generation: self.membership.generation,
            coordinator_epoch: self.epoch,
            assignor: self.membership.assignor.name(),
            members,
            committed: self.committed.clone(),
        })
    }
}
