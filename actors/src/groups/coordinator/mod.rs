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
mod classic;
mod consuming;
mod instances;

pub use api::*;
pub use classic::{
    ClassicDescription, CommitOffsets, DescribeClassic, Heartbeat, JoinGroup, LeaveGroup, SyncGroup,
};

use super::assignor::Assignor;
use super::classic::ClassicGroup;
use super::error::GroupError;
use super::membership::Membership;
use super::offsets_machine::{Committed, GroupCommand, TopicPartition};
use super::offsets_replica::{OffsetsReplica, ProposeGroup};
use crate::metrics::Metrics;
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
    /// The poll under way, if any: its partitions are fixed until it ends.
    poll: Option<ActivePoll>,
    /// Deleted while a poll was under way: it leaves the group when that poll ends.
    leaving: bool,
}

/// A poll under way. Its id tells its end from a late end of an earlier poll; its deadline
/// ends it should the end never arrive (the HTTP request was dropped between the coordinator
/// answering and the handler hearing the answer).
#[derive(Debug, Clone, Copy)]
struct ActivePoll {
    id: u64,
    deadline: Instant,
    /// Confirmed ([`ConfirmPoll`]): its records are on their way to the client, so only its
    /// own end may end it.
    confirmed: bool,
}

/// Removed instances remembered so their clients get "no longer a member", not "unknown".
const GONE_KEPT: usize = 1024;
/// How often sessions, idle instances and subscribed topics are checked.
const HOUSEKEEPING: Duration = Duration::from_millis(100);
/// Lag series are refreshed every this many housekeeping rounds (once a second).
const LAG_REPORT_ROUNDS: u64 = 10;
/// A poll not ended this long after its deadline is ended by the coordinator.
const POLL_GRACE: Duration = Duration::from_secs(5);
/// A coordinator without instances for this long stops (the group stays stored).
const IDLE_STOP: Duration = Duration::from_secs(60);

pub struct GroupCoordinator {
    group: String,
    /// The coordinator epoch this coordinator commits under (its takeover's `Generation`).
    epoch: u32,
    taken_over: bool,
    /// After a takeover no partition is handed out for this long: a deposed leader's
    /// coordinator may still be serving polls until it notices (check-quorum).
    takeover_hold: Duration,
    /// The group's committed offsets as this coordinator knows them, each with the sequence
    /// number of the commit that set it (commits resolve in log order, but one answered
    /// late must not undo a newer one taken as committed at proposal).
    committed: BTreeMap<TopicPartition, (u64, Committed)>,
    commit_seq: u64,
    /// Partition counts of subscribed topics, and the registry version they were read at.
    topics_cache: Option<(u64, BTreeMap<String, u32>)>,
    idle_since: Option<Instant>,
    next_poll: u64,
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
    /// When housekeeping or a poll last ran (see [`GroupCoordinator::stood_still`]).
    last_awake: Instant,
    /// Commits proposed and not yet resolved, per partition.
    commits_in_flight: BTreeMap<TopicPartition, usize>,
    /// The classic protocol's members, once one joined; and the replies it deferred.
    classic: Option<ClassicGroup>,
    pending: classic::Pending,
}

impl GroupCoordinator {
    /// A coordinator that will take `group` over at the epoch after `epoch` (its last known).
    pub fn new(
        group: String,
        epoch: u32,
        offsets: Addr<OffsetsReplica>,
        registry: Registry,
        metrics: Arc<Metrics>,
        settings: CoordinatorSettings,
        takeover_hold: Duration,
    ) -> Self {
        Self {
            group,
            epoch: epoch + 1,
            taken_over: false,
            takeover_hold,
            committed: BTreeMap::new(),
            commit_seq: 0,
            topics_cache: None,
            idle_since: None,
            next_poll: 0,
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
            last_awake: Instant::now(),
            commits_in_flight: BTreeMap::new(),
            classic: None,
            pending: classic::Pending::default(),
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
        // A deleted instance whose last poll is still under way is gone to its client.
        if self.instances.get(id).is_none_or(|i| i.leaving) {
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
        // Any request of a member keeps its session alive; only polls reconcile.
        self.membership.touch(id, now);
        self.instances
            .get_mut(id)
            .ok_or_else(|| GroupError::UnknownInstance {
                group: self.group.clone(),
                instance: id.to_owned(),
            })
    }

    /// The committed offset of `tp`, as this coordinator knows it.
    fn committed_offset(&self, tp: &TopicPartition) -> Option<&Committed> {
        self.committed.get(tp).map(|(_, c)| c)
    }

    /// Take `committed` as `tp`'s committed offset unless a newer commit already is.
    fn record_commit(&mut self, seq: u64, tp: TopicPartition, committed: Committed) {
        if self.committed.get(&tp).is_none_or(|(at, _)| *at <= seq) {
            self.committed.insert(tp, (seq, committed));
        }
    }

    fn forget(&mut self, id: &str, reason: String) {
        self.instances.remove(id);
        self.gone.push_back((id.to_owned(), reason));
        while self.gone.len() > GONE_KEPT {
            self.gone.pop_front();
        }
    }

    /// Partition counts of the topics the members subscribe to, recomputed only when the
    /// catalog or a subscription changed.
    fn topics(&mut self) -> BTreeMap<String, u32> {
        let version = self.registry.version();
        if let Some((at, topics)) = &self.topics_cache {
            if *at == version {
                return topics.clone();
            }
        }
        let topics = self.read_topics();
        self.topics_cache = Some((version, topics.clone()));
        topics
    }

    /// A subscription changed: the next [`GroupCoordinator::topics`] reads the catalog.
    fn subscriptions_changed(&mut self) {
        self.topics_cache = None;
    }

    /// Partition counts of the topics the members subscribe to (patterns matched against every
    /// topic of the catalog).
    fn read_topics(&self) -> BTreeMap<String, u32> {
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
        let committed: BTreeMap<&TopicPartition, u64> = self
            .committed
            .iter()
            .map(|(tp, (_, c))| (tp, c.offset))
            .collect();
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
            if let Some(offset) = committed.get(tp) {
                self.metrics
                    .group_committed_offset
                    .with_label_values(&labels)
                    .set(*offset as i64);
            }
            let committed = committed
                .get(tp)
                .copied()
                .unwrap_or_else(|| shared.log_start_offset());
            self.metrics
                .group_lag_records
                .with_label_values(&labels)
                .set(end.saturating_sub(committed) as i64);
        }
        self.reported_partitions = partitions;
    }

    /// Join (or re-join with a new subscription) and recompute the target.
    fn join(&mut self, id: &str, now: Instant, ctx: &mut Context<Self>) {
        self.subscriptions_changed();
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
        self.subscriptions_changed();
        let topics = self.topics();
        if self.membership.leave(id, topics, now) {
            self.notify();
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
            // The next owner starts where this one stopped once the commit lands (a crash
            // before it does means redelivery, never loss).
            self.commit_in_background(handed, ctx);
        }
    }

    fn commit_in_background(
        &mut self,
        offsets: Vec<(TopicPartition, u64)>,
        ctx: &mut Context<Self>,
    ) {
        // Counted as committed only once it is (reads never show an offset that may vanish
        // with this coordinator); the next owner of a partition waits for it meanwhile.
        let offsets = offsets
            .into_iter()
            .map(|(tp, offset)| (tp, offset, String::new()))
            .collect();
        let commit = self.propose_commit(offsets, ctx).map(|result, _act, _ctx| {
            if let Err(e) = result {
                tracing::warn!(error = %e, "auto-commit failed");
            }
        });
        ctx.spawn(commit);
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
        match self.committed_offset(tp) {
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

    /// Whether this coordinator's thread stood still longer than an election timeout (its
    /// broker was paused, or starved): its offsets partition may have a new leader whose
    /// coordinator serves the group, and nothing here has heard of it yet. It then stops, so
    /// the next coordinator on this broker must commit its takeover through a quorum first.
    pub(super) fn stood_still(&mut self, now: Instant, ctx: &mut Context<Self>) -> bool {
        let gap = now.duration_since(self.last_awake);
        self.last_awake = now;
        if gap <= self.pause_bound() || self.stopping.is_some() {
            return false;
        }
        tracing::warn!(group = %self.group, gap_ms = gap.as_millis() as u64, "coordinator stood still; stopping");
        self.stopping = Some("it stood still longer than an election timeout");
        ctx.stop();
        true
    }

    /// One election timeout at most (half the takeover hold).
    pub(super) fn pause_bound(&self) -> Duration {
        self.takeover_hold / 2
    }

    fn housekeeping(&mut self, ctx: &mut Context<Self>) {
        if !self.taken_over || self.stopping.is_some() {
            return;
        }
        let now = Instant::now();
        if self.stood_still(now, ctx) {
            return;
        }
        // Polls whose end never arrived end here, having delivered nothing.
        let stuck: Vec<(String, u64)> = self
            .instances
            .iter()
            .filter_map(|(id, i)| {
                i.poll
                    .filter(|p| !p.confirmed && now > p.deadline + POLL_GRACE)
                    .map(|p| (id.clone(), p.id))
            })
            .collect();
        for (id, poll) in stuck {
            tracing::warn!(group = %self.group, instance = %id, "a poll's end never arrived; ending it");
            self.end_poll(&id, poll, Vec::new(), now, ctx);
        }
        self.classic_tick(now);
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
                    && i.poll.is_none()
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
        // A coordinator nobody uses goes; the next instance created starts another.
        if self.instances.is_empty() && !self.classic_active() {
            let since = *self.idle_since.get_or_insert(now);
            if now.duration_since(since) > IDLE_STOP {
                tracing::info!(group = %self.group, "no consumer instances; coordinator stopping");
                ctx.stop();
            }
        } else {
            self.idle_since = None;
        }
    }

    /// End poll `poll` of `id`: positions move past what it delivered (`advanced`), and a
    /// delete that waited for it completes.
    fn end_poll(
        &mut self,
        id: &str,
        poll: u64,
        advanced: Vec<(TopicPartition, u64)>,
        now: Instant,
        ctx: &mut Context<Self>,
    ) {
        let readable = self.readable(id);
        let Some(instance) = self.instances.get_mut(id) else {
            return;
        };
        if instance.poll.is_none_or(|p| p.id != poll) {
            return;
        }
        instance.poll = None;
        instance.last_seen = now;
        for (tp, next) in advanced {
            // Still its own: nothing is revoked from an instance while it polls.
            if readable.contains(&tp) {
                let position = instance.positions.entry(tp).or_insert(next);
                *position = (*position).max(next);
            }
        }
        let leaving = instance.leaving;
        self.membership.end_poll(id, now);
        if leaving {
            self.remove_instance(id, now, ctx);
        }
    }

    /// The instance leaves: its partitions are released (auto-committed if it commits
    /// automatically) and the group rebalances without it.
    fn remove_instance(&mut self, id: &str, now: Instant, ctx: &mut Context<Self>) {
        let owned: Vec<TopicPartition> = self.readable(id).into_iter().collect();
        self.released(id, &owned, ctx);
        self.instances.remove(id);
        self.subscriptions_changed();
        let topics = self.topics();
        if self.membership.leave(id, topics, now) {
            self.notify();
        }
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
                    Ok(Ok(state)) => {
                        let now = Instant::now();
                        act.taken_over = true;
                        // Waiting for the takeover to commit is not standing still.
                        act.last_awake = now;
                        act.committed = state
                            .map(|s| s.offsets)
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(tp, c)| (tp, (0, c)))
                            .collect();
                        // A group that had a coordinator before may still have it serving.
                        if act.epoch > 1 {
                            act.membership.hold_until(now + act.takeover_hold);
                            ctx.run_later(act.takeover_hold, |act, _| act.notify());
                        }
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
