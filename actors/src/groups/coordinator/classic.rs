//! The classic protocol on a coordinator: JoinGroup, SyncGroup, Heartbeat, LeaveGroup and
//! OffsetCommit of members that assign partitions themselves (a leader member computes the
//! assignment), as the Kafka listener exposes them. The protocol itself is
//! [`ClassicGroup`]; this keeps the senders of the replies it defers and proposes the commits
//! it allows through the offsets partition's Raft group, like every other commit.
//!
//! A group is managed one way at a time: while REST Proxy instances are members, a classic
//! join is refused (INCONSISTENT_GROUP_PROTOCOL), and while classic members are, instances
//! cannot subscribe. Committed offsets are shared, so either kind of member resumes where the
//! other committed.

use std::time::Instant;

use actix::prelude::*;
use bytes::Bytes;
use tokio::sync::oneshot;

use super::super::classic::{
    ClassicError, ClassicGroup, JoinRequest, JoinResponse, Limits, MemberView, Reply,
};
use super::super::error::GroupError;
use super::super::offsets_machine::TopicPartition;
use super::{GroupCoordinator, Mode};

#[derive(Debug, Message)]
#[rtype(result = "Result<JoinResponse, GroupError>")]
pub struct JoinGroup(pub JoinRequest);

#[derive(Debug, Message)]
#[rtype(result = "Result<Bytes, GroupError>")]
pub struct SyncGroup {
    pub member_id: String,
    pub generation: i32,
    /// The leader's assignment, per member; empty from followers.
    pub assignments: Vec<(String, Bytes)>,
}

#[derive(Debug, Message)]
#[rtype(result = "Result<(), GroupError>")]
pub struct Heartbeat {
    pub member_id: String,
    pub generation: i32,
}

/// Per member, whether it was one.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<Result<(), ClassicError>>, GroupError>")]
pub struct LeaveGroup {
    pub member_ids: Vec<String>,
}

/// An OffsetCommit of a classic member (or, with generation -1 and no member id, of a client
/// that assigns itself partitions while the group has no members).
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<(TopicPartition, u64)>, GroupError>")]
pub struct CommitOffsets {
    pub member_id: String,
    pub generation: i32,
    pub offsets: Vec<(TopicPartition, u64, String)>,
}

/// The classic side of a group, for DescribeGroups.
#[derive(Debug, Clone)]
pub struct ClassicDescription {
    pub state: &'static str,
    pub generation: i32,
    pub protocol_type: String,
    pub protocol: String,
    pub leader: String,
    pub members: Vec<MemberView>,
}

#[derive(Debug, Message)]
#[rtype(result = "Option<ClassicDescription>")]
pub struct DescribeClassic;

/// The replies a classic group deferred, by member.
#[derive(Debug, Default)]
pub(super) struct Pending {
    joins: std::collections::HashMap<String, oneshot::Sender<Result<JoinResponse, GroupError>>>,
    syncs: std::collections::HashMap<String, oneshot::Sender<Result<Bytes, GroupError>>>,
}

impl GroupCoordinator {
    fn classic_limits(&self) -> Limits {
        Limits {
            session_timeout_min: std::time::Duration::from_millis(500),
            session_timeout_max: std::time::Duration::from_secs(300),
            members_max: self.settings.instances_max,
            initial_rebalance_delay: self.settings.initial_rebalance_delay,
        }
    }

    /// Serving, and not standing still (after a pause another coordinator may hold the group).
    fn classic_serving(&mut self, ctx: &mut Context<Self>) -> Result<(), GroupError> {
        if self.taken_over {
            self.stood_still(Instant::now(), ctx);
        }
        self.check_serving()
    }

    /// Whether classic members hold the group (REST instances may then not subscribe).
    pub(super) fn classic_active(&self) -> bool {
        self.classic.as_ref().is_some_and(|c| !c.is_empty())
    }

    /// Hand the replies the group now owes to the requests waiting for them.
    pub(super) fn deliver(&mut self, replies: Vec<Reply>) {
        for reply in replies {
            match reply {
                Reply::Join(member, result) => {
                    if let Some(sender) = self.pending.joins.remove(&member) {
                        let _ = sender.send(result.map_err(GroupError::from));
                    }
                }
                Reply::Sync(member, result) => {
                    if let Some(sender) = self.pending.syncs.remove(&member) {
                        let _ = sender.send(result.map_err(GroupError::from));
                    }
                }
            }
        }
    }

    /// Expired sessions and rebalance deadlines (from housekeeping).
    pub(super) fn classic_tick(&mut self, now: Instant) {
        let replies = match self.classic.as_mut() {
            Some(classic) => classic.tick(now),
            None => return,
        };
        self.deliver(replies);
    }

    fn classic_group(&mut self) -> &mut ClassicGroup {
        let limits = self.classic_limits();
        let group = self.group.clone();
        self.classic
            .get_or_insert_with(|| ClassicGroup::new(&group, limits))
    }
}

/// A future answered by a deferred reply (or at once by `early`).
fn deferred<T: Send + 'static>(
    early: Option<Result<T, GroupError>>,
    receiver: Option<oneshot::Receiver<Result<T, GroupError>>>,
    group: String,
) -> ResponseFuture<Result<T, GroupError>> {
    Box::pin(async move {
        match (early, receiver) {
            (Some(result), _) => result,
            (None, Some(receiver)) => receiver.await.unwrap_or(Err(GroupError::Stopping(group))),
            (None, None) => Err(GroupError::Stopping(group)),
        }
    })
}

impl Handler<JoinGroup> for GroupCoordinator {
    type Result = ResponseFuture<Result<JoinResponse, GroupError>>;

    fn handle(&mut self, msg: JoinGroup, ctx: &mut Self::Context) -> Self::Result {
        let group = self.group.clone();
        if let Err(e) = self.classic_serving(ctx) {
            return deferred(Some(Err(e)), None, group);
        }
        if self
            .instances
            .values()
            .any(|i| matches!(i.mode, Mode::Subscribed { .. }))
        {
            return deferred(
                Some(Err(ClassicError::InconsistentGroupProtocol.into())),
                None,
                group,
            );
        }
        let now = Instant::now();
        let (sender, receiver) = oneshot::channel();
        // A join's reply may come at once (in `replies`) or later; its sender waits here
        // either way, under the member's id (a new member's is made by the join).
        let result = self.classic_group().join(msg.0, now);
        match result {
            Err(e) => deferred(Some(Err(e.into())), None, group),
            Ok((id, replies)) => {
                if let Some(old) = self.pending.joins.insert(id, sender) {
                    let _ = old.send(Err(ClassicError::RebalanceInProgress.into()));
                }
                self.deliver(replies);
                self.notify();
                deferred(None, Some(receiver), group)
            }
        }
    }
}

impl Handler<SyncGroup> for GroupCoordinator {
    type Result = ResponseFuture<Result<Bytes, GroupError>>;

    fn handle(&mut self, msg: SyncGroup, ctx: &mut Self::Context) -> Self::Result {
        let group = self.group.clone();
        if let Err(e) = self.classic_serving(ctx) {
            return deferred(Some(Err(e)), None, group);
        }
        let now = Instant::now();
        let (sender, receiver) = oneshot::channel();
        let result =
            self.classic_group()
                .sync(&msg.member_id, msg.generation, msg.assignments, now);
        match result {
            Err(e) => deferred(Some(Err(e.into())), None, group),
            Ok(replies) => {
                if let Some(old) = self.pending.syncs.insert(msg.member_id, sender) {
                    let _ = old.send(Err(ClassicError::RebalanceInProgress.into()));
                }
                self.deliver(replies);
                self.notify();
                deferred(None, Some(receiver), group)
            }
        }
    }
}

impl Handler<Heartbeat> for GroupCoordinator {
    type Result = Result<(), GroupError>;

    fn handle(&mut self, msg: Heartbeat, ctx: &mut Self::Context) -> Self::Result {
        self.classic_serving(ctx)?;
        let now = Instant::now();
        Ok(self
            .classic_group()
            .heartbeat(&msg.member_id, msg.generation, now)?)
    }
}

impl Handler<LeaveGroup> for GroupCoordinator {
    type Result = Result<Vec<Result<(), ClassicError>>, GroupError>;

    fn handle(&mut self, msg: LeaveGroup, _ctx: &mut Self::Context) -> Self::Result {
        self.check_serving()?;
        let now = Instant::now();
        let (outcomes, replies) = self.classic_group().leave(&msg.member_ids, now);
        self.deliver(replies);
        self.notify();
        Ok(outcomes)
    }
}

impl Handler<CommitOffsets> for GroupCoordinator {
    type Result = ResponseActFuture<Self, Result<Vec<(TopicPartition, u64)>, GroupError>>;

    fn handle(&mut self, msg: CommitOffsets, ctx: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        let checked = self.check_serving().and_then(|()| {
            if self.membership.members().is_empty() {
                Ok(self
                    .classic_group()
                    .check_commit(&msg.member_id, msg.generation, now)?)
            } else {
                // Subscribed REST instances consume this group: only they commit to it.
                Err(ClassicError::UnknownMemberId.into())
            }
        });
        if let Err(e) = checked {
            return Box::pin(actix::fut::ready(Err(e)));
        }
        self.propose_commit(msg.offsets, ctx)
    }
}

impl Handler<DescribeClassic> for GroupCoordinator {
    type Result = Option<ClassicDescription>;

    fn handle(&mut self, _msg: DescribeClassic, _ctx: &mut Self::Context) -> Self::Result {
        let classic = self.classic.as_ref()?;
        Some(ClassicDescription {
            state: classic.state().name(),
            generation: classic.generation(),
            protocol_type: classic.protocol_type().unwrap_or_default().to_owned(),
            protocol: classic.protocol().unwrap_or_default().to_owned(),
            leader: classic.leader().unwrap_or_default().to_owned(),
            members: classic.members(),
        })
    }
}
