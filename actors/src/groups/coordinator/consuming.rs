//! Consuming: polls, commits, committed offsets, seeks, and the group described.

use std::collections::BTreeMap;
use std::time::Instant;

use actix::prelude::*;

use super::super::error::GroupError;
use super::super::membership::MembershipError;
use super::super::offsets_machine::{Committed, GroupCommand, TopicPartition};
use super::super::offsets_replica::ProposeGroup;
use super::instances::poll_under_way;
use super::*;
use crate::partition_replica::now_ms;

impl Handler<BeginPoll> for GroupCoordinator {
    type Result = Result<PollPlan, GroupError>;

    fn handle(&mut self, msg: BeginPoll, ctx: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        // After a pause, a poll may be the first thing this coordinator does: it must not
        // hand out partitions another coordinator may have handed out meanwhile.
        if self.taken_over {
            self.stood_still(now, ctx);
        }
        let id = msg.instance;
        let instance = self.instance(&id, now)?;
        if instance.poll.is_some() {
            return Err(poll_under_way(&id));
        }
        let wait = msg.wait.unwrap_or(instance.config.poll_wait);
        match instance.mode {
            Mode::Idle => {
                return Err(GroupError::Conflict(format!(
                    "consumer instance '{id}' is neither subscribed nor assigned partitions"
                )))
            }
            Mode::Manual(_) => {}
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
                    Err(MembershipError::PollInProgress) => return Err(poll_under_way(&id)),
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
        // A partition new to this member starts at its committed offset, so not while a
        // commit of it is in flight (its previous owner's last): it sits out this poll.
        let starts: Vec<(TopicPartition, u64)> = readable
            .iter()
            .filter(|tp| {
                self.instances
                    .get(&id)
                    .is_some_and(|i| !i.positions.contains_key(*tp))
                    && !self.commits_in_flight.contains_key(*tp)
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
        self.next_poll += 1;
        let poll = self.next_poll;
        let instance = self.instance(&id, now)?;
        instance.poll = Some(ActivePoll {
            id: poll,
            deadline: now + wait,
            confirmed: false,
        });
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
            poll,
            format: instance.config.format.clone(),
            poll_wait: wait,
            partitions: readable
                .iter()
                .filter_map(|tp| instance.positions.get(tp).map(|p| (tp.clone(), *p)))
                .collect(),
            assignment_changed: self.assignment_changed.subscribe(),
        })
    }
}

impl Handler<ConfirmPoll> for GroupCoordinator {
    type Result = bool;

    fn handle(&mut self, msg: ConfirmPoll, ctx: &mut Self::Context) -> bool {
        if self.stopping.is_some() || self.stood_still(Instant::now(), ctx) {
            return false;
        }
        // A deleted instance's records would be released (and auto-committed) unread.
        let Some(instance) = self.instances.get_mut(&msg.instance).filter(|i| !i.leaving) else {
            return false;
        };
        match instance.poll.as_mut() {
            Some(poll) if poll.id == msg.poll => {
                poll.confirmed = true;
                true
            }
            _ => false,
        }
    }
}

impl Handler<EndPoll> for GroupCoordinator {
    type Result = ();

    fn handle(&mut self, msg: EndPoll, ctx: &mut Self::Context) {
        self.end_poll(&msg.instance, msg.poll, msg.advanced, Instant::now(), ctx);
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
        // As in Kafka, a consumer that assigns itself partitions may commit into its group
        // only while the group has no managed members: theirs would be overwritten.
        let manual = self
            .instances
            .get(&msg.instance)
            .is_some_and(|i| matches!(i.mode, Mode::Manual(_)));
        if manual && (!self.membership.members().is_empty() || self.classic_active()) {
            return ready(Err(GroupError::Conflict(format!(
                "group '{}' has members that the coordinator assigns partitions to; an instance with a manual assignment cannot commit into it",
                self.group
            ))));
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
            return ready(Ok(Vec::new()));
        }
        self.propose_commit(offsets, ctx)
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
                let committed = self.committed_offset(&tp).cloned();
                (tp, committed)
            })
            .collect())
    }
}

impl Handler<Seek> for GroupCoordinator {
    type Result = Result<(), GroupError>;

    fn handle(&mut self, msg: Seek, _ctx: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        // A seek while a poll reads would be undone by that poll's end.
        if self.instance(&msg.instance, now)?.poll.is_some() {
            return Err(poll_under_way(&msg.instance));
        }
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
            committed: self
                .committed
                .iter()
                .map(|(tp, (_, c))| (tp.clone(), c.clone()))
                .collect(),
        })
    }
}

impl GroupCoordinator {
    /// Propose `offsets` as the group's commit under this coordinator's epoch; answered once
    /// its offsets partition's quorum committed it (or with why not).
    pub(super) fn propose_commit(
        &mut self,
        offsets: Vec<(TopicPartition, u64, String)>,
        _ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<Vec<(TopicPartition, u64)>, GroupError>> {
        if offsets.is_empty() {
            return Box::pin(actix::fut::ready(Ok(Vec::new())));
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
        let proposed = Instant::now();
        self.commit_seq += 1;
        let seq = self.commit_seq;
        // Until it resolves, none of its partitions reaches a new owner (see `BeginPoll`).
        let partitions: Vec<TopicPartition> = entries.iter().map(|(tp, _)| tp.clone()).collect();
        for tp in &partitions {
            *self.commits_in_flight.entry(tp.clone()).or_default() += 1;
        }
        Box::pin(
            self.offsets
                .send(ProposeGroup(command))
                .into_actor(self)
                .map(move |result, act, ctx| {
                    for tp in &partitions {
                        if let Some(n) = act.commits_in_flight.get_mut(tp) {
                            *n -= 1;
                            if *n == 0 {
                                act.commits_in_flight.remove(tp);
                            }
                        }
                    }
                    // Polls waiting for one of these partitions may read it now.
                    act.notify();
                    // The offsets replica went away with the proposal: it may have committed.
                    let result = result
                        .unwrap_or_else(|_| Err(GroupError::OutcomeUnknown(act.group.clone())));
                    // Anything but a refusal at apply or "not written" leaves it unknown
                    // (a dropped waiter, a storage failure).
                    let unknown = matches!(
                        &result,
                        Err(e) if !matches!(e, GroupError::Refused(_) | GroupError::NotWritten(_))
                    );
                    if unknown {
                        // It may still apply, after a new owner started from the older offset:
                        // this coordinator's view is uncertain, so it goes, and the next one
                        // starts from the applied state, which settles it (its takeover entry
                        // follows the commit in the log).
                        tracing::warn!(group = %act.group, "a commit's outcome is unknown; coordinator stopping");
                        act.stopping = Some("a commit's outcome is unknown");
                        ctx.stop();
                    }
                    result?;
                    act.metrics
                        .group_commit_latency_seconds
                        .observe(proposed.elapsed().as_secs_f64());
                    for (tp, committed) in entries {
                        act.record_commit(seq, tp, committed);
                    }
                    Ok(offsets.into_iter().map(|(tp, o, _)| (tp, o)).collect())
                }),
        )
    }
}
