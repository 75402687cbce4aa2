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
//!
//! `api`: the messages and what they carry; `instances`: create, delete, subscribe, assign;
//! `consuming`: polls, commits, seeks, describe.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::watch;

mod api;
mod consuming;
mod instances;

pub use api::*;

use super::assignor::Assignor;
use super::error::GroupError;
use super::membership::{Membership, MembershipError};
use super::offsets_machine::{Committed, GroupCommand, GroupState, TopicPartition};
use super::offsets_replica::{OffsetsReplica, ProposeGroup};
use crate::metrics::Metrics;
use crate::partition_replica::now_ms;
use crate::registry::Registry;

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

/// Removed instances remembered so their clients get "no longer a member", not "unknown".
const GONE_KEPT: usize = 1024;
/// How often sessions, idle instances and subscribed topics are checked.
const HOUSEKEEPING: Duration = Duration::from_millis(100);
/// Lag series are refreshed every this many housekeeping rounds (once a second).
const LAG_REPORT_ROUNDS: u64 = 10;

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
    metrics: Arc<Metrics>,
    settings: CoordinatorSettings,
    /// Generation and rebalance start as last reported to metrics.
    reported_generation: u32,
    rebalance_started: Option<Instant>,
    /// Partitions whose lag series this coordinator exports.
    reported_partitions: BTreeSet<TopicPartition>,
    housekeeping_rounds: u64,
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
        metrics: Arc<Metrics>,
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
            metrics,
            settings,
            reported_generation: 0,
            rebalance_started: None,
            reported_partitions: BTreeSet::new(),
            housekeeping_rounds: 0,
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

    /// Wake polls waiting on an assignment change, and report what changed to metrics.
    fn notify(&mut self) {
        self.assignment_changed.send_modify(|n| *n += 1);
        let group = [self.group.as_str()];
        let generation = self.membership.generation;
        if generation != self.reported_generation {
            self.reported_generation = generation;
            self.metrics
                .group_rebalances_total
                .with_label_values(&group)
                .inc();
            self.metrics
                .group_generation
                .with_label_values(&group)
                .set(i64::from(generation));
        }
        self.metrics
            .group_members
            .with_label_values(&group)
            .set(self.membership.members().len() as i64);
        match (self.membership.rebalancing_since, self.rebalance_started) {
            (Some(since), None) => self.rebalance_started = Some(since),
            (None, Some(since)) => {
                self.rebalance_started = None;
                self.metrics
                    .group_rebalance_duration_seconds
                    .with_label_values(&group)
                    .observe(since.elapsed().as_secs_f64());
            }
            _ => {}
        }
    }

    /// Committed offset and lag of every partition the group committed or owns.
    fn report_lag(&mut self) {
        let mut partitions: BTreeSet<TopicPartition> = self.committed.keys().cloned().collect();
        for member in self.membership.members().values() {
            partitions.extend(member.owned.iter().cloned());
        }
        for tp in &partitions {
            let Some(shared) = self
                .registry
                .get(&tp.topic)
                .and_then(|h| h.partition(tp.partition).cloned())
            else {
                continue;
            };
            let labels = [
                self.group.as_str(),
                tp.topic.as_str(),
                &tp.partition.to_string(),
            ];
            let end = shared.known_log_end();
            let committed = self
                .committed
                .get(tp)
                .map_or(shared.log_start_offset(), |c| c.offset);
            if let Some(c) = self.committed.get(tp) {
                self.metrics
                    .group_committed_offset
                    .with_label_values(&labels)
                    .set(c.offset as i64);
            }
            self.metrics
                .group_lag_records
                .with_label_values(&labels)
                .set(end.saturating_sub(committed) as i64);
        }
        self.reported_partitions = partitions;
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
        self.housekeeping_rounds += 1;
        if self.housekeeping_rounds.is_multiple_of(LAG_REPORT_ROUNDS) {
            self.report_lag();
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
        self.assignment_changed.send_modify(|n| *n += 1);
        let partitions: Vec<(String, u32)> = self
            .reported_partitions
            .iter()
            .map(|tp| (tp.topic.clone(), tp.partition))
            .collect();
        self.metrics.forget_group(&self.group, &partitions);
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
