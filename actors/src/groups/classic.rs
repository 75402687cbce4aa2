//! The classic group protocol — Kafka's JoinGroup / SyncGroup / Heartbeat / LeaveGroup — as
//! pure code: a group's members, its generations, and the replies each request earns, with no
//! actor, clock or socket. The [`super::coordinator::GroupCoordinator`] holds one per group
//! whose members use it, keeps the deferred replies' senders, and feeds it the time.
//!
//! The client-side assignment of the classic protocol: every member joins with the protocols
//! (assignors) it supports and their metadata; when every known member has joined again (or
//! the rebalance timeout passed) the generation moves on, one protocol all members support is
//! chosen, and the leader member gets every member's metadata; the leader computes the
//! assignment and sends it with its SyncGroup, and each member's SyncGroup is answered with
//! its share. A member of an older generation is refused (ILLEGAL_GENERATION) on heartbeat,
//! sync and commit, so it can neither commit nor learn an assignment it no longer has.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Kafka's group states (as DescribeGroups names them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::PreparingRebalance => "PreparingRebalance",
            State::CompletingRebalance => "CompletingRebalance",
            State::Stable => "Stable",
        }
    }
}

/// Why a classic request is refused; `kafka_code` is the protocol's error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassicError {
    #[error("unknown member id")]
    UnknownMemberId,
    #[error("illegal generation: the group is at generation {current}")]
    IllegalGeneration { current: i32 },
    #[error("the group is rebalancing; join again")]
    RebalanceInProgress,
    #[error("no protocol in common with the group's members (or another protocol type)")]
    InconsistentGroupProtocol,
    /// KIP-394: a new member gets its id in this refusal and joins again with it.
    #[error("join again with member id {0}")]
    MemberIdRequired(String),
    #[error("session timeout {0:?} is outside the broker's bounds")]
    InvalidSessionTimeout(Duration),
    #[error("the group has its maximum number of members")]
    GroupMaxSizeReached,
}

impl ClassicError {
    pub fn kafka_code(&self) -> i16 {
        match self {
            ClassicError::IllegalGeneration { .. } => 22,
            ClassicError::InconsistentGroupProtocol => 23,
            ClassicError::UnknownMemberId => 25,
            ClassicError::InvalidSessionTimeout(_) => 26,
            ClassicError::RebalanceInProgress => 27,
            ClassicError::MemberIdRequired(_) => 79,
            ClassicError::GroupMaxSizeReached => 81,
        }
    }
}

/// One protocol (assignor) a member supports, with its metadata (opaque to the broker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protocol {
    pub name: String,
    pub metadata: Bytes,
}

#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// Empty for a member joining for the first time.
    pub member_id: String,
    pub client_id: String,
    pub protocol_type: String,
    /// In the member's order of preference.
    pub protocols: Vec<Protocol>,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    /// KIP-394 (JoinGroup v4+): a new member is first given its id and joins again with it.
    pub require_known_member_id: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinResponse {
    pub generation: i32,
    pub protocol_type: String,
    pub protocol_name: String,
    pub leader: String,
    pub member_id: String,
    /// Every member's metadata for the chosen protocol; only the leader's response has them.
    pub members: Vec<(String, Bytes)>,
}

/// A reply the group owes a request it deferred (JoinGroup until the rebalance completes,
/// SyncGroup until the leader sends the assignment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Join(String, Result<JoinResponse, ClassicError>),
    Sync(String, Result<Bytes, ClassicError>),
}

#[derive(Debug, Clone)]
struct Member {
    client_id: String,
    protocols: Vec<Protocol>,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    last_heard: Instant,
    /// Joined in the rebalance under way (its JoinGroup reply is owed).
    awaiting_join: bool,
    /// Its SyncGroup reply is owed.
    awaiting_sync: bool,
    assignment: Bytes,
}

/// A member as DescribeGroups shows it.
#[derive(Debug, Clone)]
pub struct MemberView {
    pub member_id: String,
    pub client_id: String,
    pub metadata: Bytes,
    pub assignment: Bytes,
}

/// Limits the broker puts on classic members.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub session_timeout_min: Duration,
    pub session_timeout_max: Duration,
    pub members_max: usize,
    /// How long the first rebalance of an empty group waits for more members (Kafka's
    /// `group.initial.rebalance.delay.ms`), extended by each joiner up to the rebalance timeout.
    pub initial_rebalance_delay: Duration,
}

#[derive(Debug)]
pub struct ClassicGroup {
    group: String,
    limits: Limits,
    state: State,
    generation: i32,
    protocol_type: Option<String>,
    protocol: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// Ids handed out in MEMBER_ID_REQUIRED, valid for one session timeout.
    pending_ids: BTreeMap<String, Instant>,
    rebalance_deadline: Option<Instant>,
    /// The sync phase ends by then: members that did not sync (the leader among them) go.
    sync_deadline: Option<Instant>,
    /// The first rebalance of an empty group completes no earlier than this.
    delay_until: Option<Instant>,
    next_member: u64,
}

impl ClassicGroup {
    pub fn new(group: &str, limits: Limits) -> Self {
        Self {
            group: group.to_owned(),
            limits,
            state: State::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            pending_ids: BTreeMap::new(),
            rebalance_deadline: None,
            sync_deadline: None,
            delay_until: None,
            next_member: 0,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn generation(&self) -> i32 {
        self.generation
    }

    pub fn protocol_type(&self) -> Option<&str> {
        self.protocol_type.as_deref()
    }

    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    pub fn leader(&self) -> Option<&str> {
        self.leader.as_deref()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.pending_ids.is_empty()
    }

    pub fn members(&self) -> Vec<MemberView> {
        self.members
            .iter()
            .map(|(id, m)| MemberView {
                member_id: id.clone(),
                client_id: m.client_id.clone(),
                metadata: self.metadata_of(m),
                assignment: m.assignment.clone(),
            })
            .collect()
    }

    fn metadata_of(&self, member: &Member) -> Bytes {
        member
            .protocols
            .iter()
            .find(|p| Some(&p.name) == self.protocol.as_ref())
            .map(|p| p.metadata.clone())
            .unwrap_or_default()
    }

    fn new_member_id(&mut self, client_id: &str) -> String {
        self.next_member += 1;
        // Unique within this coordinator's life; a coordinator taking over starts with no
        // members, so ids of an earlier coordinator are unknown to it (UNKNOWN_MEMBER_ID).
        use std::hash::{BuildHasher, Hasher};
        let nonce = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        format!("{client_id}-{}-{nonce:016x}", self.next_member)
    }

    /// Protocols every member (and the joiner) supports.
    fn common_protocols(&self, joiner: Option<(&str, &[Protocol])>) -> BTreeSet<String> {
        let mut sets = self
            .members
            .iter()
            .filter(|(id, _)| joiner.is_none_or(|(j, _)| j != id.as_str()))
            .map(|(_, m)| {
                m.protocols
                    .iter()
                    .map(|p| p.name.clone())
                    .collect::<BTreeSet<_>>()
            });
        let joiner_set: Option<BTreeSet<String>> =
            joiner.map(|(_, ps)| ps.iter().map(|p| p.name.clone()).collect());
        let first = match joiner_set.clone() {
            Some(set) => set,
            None => match sets.next() {
                Some(set) => set,
                None => return BTreeSet::new(),
            },
        };
        sets.fold(first, |acc, set| acc.intersection(&set).cloned().collect())
    }

    /// A JoinGroup. `Err` is answered at once; `Ok` holds the member's id (a new member's is
    /// made here) and the replies now due, which include this member's once the rebalance it
    /// joined completes (possibly later, from [`tick`]).
    ///
    /// [`tick`]: ClassicGroup::tick
    pub fn join(
        &mut self,
        request: JoinRequest,
        now: Instant,
    ) -> Result<(String, Vec<Reply>), ClassicError> {
        let limits = self.limits;
        if request.session_timeout < limits.session_timeout_min
            || request.session_timeout > limits.session_timeout_max
        {
            return Err(ClassicError::InvalidSessionTimeout(request.session_timeout));
        }
        if request.protocols.is_empty()
            || request.protocol_type.is_empty()
            || self
                .protocol_type
                .as_ref()
                .is_some_and(|t| !self.members.is_empty() && *t != request.protocol_type)
        {
            return Err(ClassicError::InconsistentGroupProtocol);
        }
        let known = self.members.contains_key(&request.member_id);
        if !self.members.is_empty() || known {
            let common =
                self.common_protocols(Some((request.member_id.as_str(), &request.protocols)));
            if common.is_empty() {
                return Err(ClassicError::InconsistentGroupProtocol);
            }
        }
        let member_id = if request.member_id.is_empty() {
            if self.members.len() + self.pending_ids.len() >= limits.members_max {
                return Err(ClassicError::GroupMaxSizeReached);
            }
            let id = self.new_member_id(&request.client_id);
            if request.require_known_member_id {
                self.pending_ids
                    .insert(id.clone(), now + request.session_timeout);
                return Err(ClassicError::MemberIdRequired(id));
            }
            id
        } else if known || self.pending_ids.remove(&request.member_id).is_some() {
            request.member_id.clone()
        } else {
            return Err(ClassicError::UnknownMemberId);
        };
        self.protocol_type = Some(request.protocol_type.clone());
        let mut replies = Vec::new();
        match self.members.get_mut(&member_id) {
            Some(member) => {
                let unchanged = member.protocols == request.protocols;
                member.last_heard = now;
                member.session_timeout = request.session_timeout;
                member.rebalance_timeout = request.rebalance_timeout;
                member.client_id = request.client_id;
                member.protocols = request.protocols;
                let is_leader = self.leader.as_deref() == Some(member_id.as_str());
                match self.state {
                    // Nothing changed: the current generation again (its JoinGroup reply may
                    // have been lost), the leader's with the members; only a leader rejoining
                    // a stable group asks for a new assignment.
                    State::CompletingRebalance if unchanged => {
                        let response = self.response_for(&member_id, is_leader);
                        let reply = Reply::Join(member_id.clone(), Ok(response));
                        return Ok((member_id, vec![reply]));
                    }
                    State::Stable if unchanged && !is_leader => {
                        let response = self.response_for(&member_id, false);
                        let reply = Reply::Join(member_id.clone(), Ok(response));
                        return Ok((member_id, vec![reply]));
                    }
                    State::PreparingRebalance => {
                        member.awaiting_join = true;
                    }
                    _ => {
                        member.awaiting_join = true;
                        replies.extend(self.prepare_rebalance(now));
                        if let Some(m) = self.members.get_mut(&member_id) {
                            m.awaiting_join = true;
                        }
                    }
                }
            }
            None => {
                self.members.insert(
                    member_id.clone(),
                    Member {
                        client_id: request.client_id,
                        protocols: request.protocols,
                        session_timeout: request.session_timeout,
                        rebalance_timeout: request.rebalance_timeout,
                        last_heard: now,
                        awaiting_join: true,
                        awaiting_sync: false,
                        assignment: Bytes::new(),
                    },
                );
                if self.state == State::PreparingRebalance {
                    // A joiner of the first rebalance gives others a little longer to join.
                    if let (Some(until), Some(deadline)) =
                        (self.delay_until, self.rebalance_deadline)
                    {
                        self.delay_until =
                            Some((until.max(now + limits.initial_rebalance_delay)).min(deadline));
                    }
                } else {
                    replies.extend(self.prepare_rebalance(now));
                    if let Some(m) = self.members.get_mut(&member_id) {
                        m.awaiting_join = true;
                    }
                }
            }
        }
        replies.extend(self.try_complete_join(now));
        Ok((member_id, replies))
    }

    /// Start a rebalance: every member must join again within the longest rebalance timeout.
    fn prepare_rebalance(&mut self, now: Instant) -> Vec<Reply> {
        let mut replies = Vec::new();
        if self.state == State::CompletingRebalance {
            for (id, member) in &mut self.members {
                if member.awaiting_sync {
                    member.awaiting_sync = false;
                    replies.push(Reply::Sync(
                        id.clone(),
                        Err(ClassicError::RebalanceInProgress),
                    ));
                }
            }
        }
        let was_empty = self.state == State::Empty;
        for member in self.members.values_mut() {
            member.awaiting_join = false;
            member.assignment = Bytes::new();
        }
        let timeout = self
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or_default();
        let deadline = now + timeout;
        self.rebalance_deadline = Some(deadline);
        self.delay_until =
            was_empty.then(|| (now + self.limits.initial_rebalance_delay).min(deadline));
        self.state = State::PreparingRebalance;
        replies
    }

    /// Complete the join phase if every member has joined (and the initial delay passed) or
    /// the rebalance timeout expired: members that did not join are removed, the generation
    /// moves on and every joined member gets its JoinGroup reply.
    fn try_complete_join(&mut self, now: Instant) -> Vec<Reply> {
        if self.state != State::PreparingRebalance {
            return Vec::new();
        }
        let all_joined = self.members.values().all(|m| m.awaiting_join);
        let delayed = self.delay_until.is_some_and(|until| now < until);
        let expired = self.rebalance_deadline.is_some_and(|d| now >= d);
        if !(expired || (all_joined && !delayed)) {
            return Vec::new();
        }
        self.members.retain(|_, m| m.awaiting_join);
        self.rebalance_deadline = None;
        self.delay_until = None;
        self.generation += 1;
        if self.members.is_empty() {
            self.state = State::Empty;
            self.protocol = None;
            self.leader = None;
            return Vec::new();
        }
        self.protocol = self.choose_protocol();
        if self
            .leader
            .as_ref()
            .is_none_or(|l| !self.members.contains_key(l))
        {
            self.leader = self.members.keys().next().cloned();
        }
        self.state = State::CompletingRebalance;
        let timeout = self.members.values().map(|m| m.rebalance_timeout).max();
        self.sync_deadline = timeout.map(|t| now + t);
        let ids: Vec<String> = self.members.keys().cloned().collect();
        ids.into_iter()
            .map(|id| {
                if let Some(m) = self.members.get_mut(&id) {
                    m.awaiting_join = false;
                    m.last_heard = now;
                }
                let is_leader = self.leader.as_deref() == Some(id.as_str());
                let response = self.response_for(&id, is_leader);
                Reply::Join(id, Ok(response))
            })
            .collect()
    }

    /// Each member votes for the first protocol of its list that every member supports.
    fn choose_protocol(&self) -> Option<String> {
        let common = self.common_protocols(None);
        let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
        for member in self.members.values() {
            if let Some(p) = member.protocols.iter().find(|p| common.contains(&p.name)) {
                *votes.entry(p.name.as_str()).or_default() += 1;
            }
        }
        votes
            .into_iter()
            .max_by_key(|(name, n)| (*n, std::cmp::Reverse(*name)))
            .map(|(name, _)| name.to_owned())
    }

    fn response_for(&self, member_id: &str, with_members: bool) -> JoinResponse {
        JoinResponse {
            generation: self.generation,
            protocol_type: self.protocol_type.clone().unwrap_or_default(),
            protocol_name: self.protocol.clone().unwrap_or_default(),
            leader: self.leader.clone().unwrap_or_default(),
            member_id: member_id.to_owned(),
            members: if with_members {
                self.members
                    .iter()
                    .map(|(id, m)| (id.clone(), self.metadata_of(m)))
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    fn check_member(&self, member_id: &str, generation: i32) -> Result<(), ClassicError> {
        if !self.members.contains_key(member_id) {
            return Err(ClassicError::UnknownMemberId);
        }
        if generation != self.generation {
            return Err(ClassicError::IllegalGeneration {
                current: self.generation,
            });
        }
        Ok(())
    }

    /// A SyncGroup; the leader's carries the assignment. `Ok` holds the replies now due (this
    /// member's too, unless it waits for the leader).
    pub fn sync(
        &mut self,
        member_id: &str,
        generation: i32,
        assignments: Vec<(String, Bytes)>,
        now: Instant,
    ) -> Result<Vec<Reply>, ClassicError> {
        self.check_member(member_id, generation)?;
        if let Some(m) = self.members.get_mut(member_id) {
            m.last_heard = now;
        }
        match self.state {
            State::Empty => Err(ClassicError::UnknownMemberId),
            State::PreparingRebalance => Err(ClassicError::RebalanceInProgress),
            State::Stable => {
                let assignment = self.members.get(member_id).map(|m| m.assignment.clone());
                Ok(vec![Reply::Sync(
                    member_id.to_owned(),
                    Ok(assignment.unwrap_or_default()),
                )])
            }
            State::CompletingRebalance => {
                if let Some(m) = self.members.get_mut(member_id) {
                    m.awaiting_sync = true;
                }
                if self.leader.as_deref() != Some(member_id) {
                    return Ok(Vec::new());
                }
                let mut given: BTreeMap<String, Bytes> = assignments.into_iter().collect();
                self.state = State::Stable;
                self.sync_deadline = None;
                let mut replies = Vec::new();
                for (id, member) in &mut self.members {
                    member.assignment = given.remove(id).unwrap_or_default();
                    if member.awaiting_sync {
                        member.awaiting_sync = false;
                        replies.push(Reply::Sync(id.clone(), Ok(member.assignment.clone())));
                    }
                }
                Ok(replies)
            }
        }
    }

    /// A Heartbeat: keeps the member's session, and tells it when to join again.
    pub fn heartbeat(
        &mut self,
        member_id: &str,
        generation: i32,
        now: Instant,
    ) -> Result<(), ClassicError> {
        if self.state == State::Empty {
            return Err(ClassicError::UnknownMemberId);
        }
        self.check_member(member_id, generation)?;
        if let Some(m) = self.members.get_mut(member_id) {
            m.last_heard = now;
        }
        match self.state {
            State::PreparingRebalance => Err(ClassicError::RebalanceInProgress),
            _ => Ok(()),
        }
    }

    /// A LeaveGroup of `member_ids`: per member, whether it was one; and the replies now due.
    pub fn leave(
        &mut self,
        member_ids: &[String],
        now: Instant,
    ) -> (Vec<Result<(), ClassicError>>, Vec<Reply>) {
        let mut replies = Vec::new();
        let mut outcomes = Vec::new();
        let mut removed = false;
        for id in member_ids {
            match self.members.remove(id) {
                Some(member) => {
                    removed = true;
                    outcomes.push(Ok(()));
                    if member.awaiting_join {
                        replies.push(Reply::Join(id.clone(), Err(ClassicError::UnknownMemberId)));
                    }
                    if member.awaiting_sync {
                        replies.push(Reply::Sync(id.clone(), Err(ClassicError::UnknownMemberId)));
                    }
                }
                None => outcomes.push(Err(ClassicError::UnknownMemberId)),
            }
        }
        if removed {
            replies.extend(self.membership_changed(now));
        }
        (outcomes, replies)
    }

    /// After members went: a rebalance among the rest (or an empty group at the next generation).
    fn membership_changed(&mut self, now: Instant) -> Vec<Reply> {
        let mut replies = Vec::new();
        match self.state {
            State::Stable | State::CompletingRebalance => {
                replies.extend(self.prepare_rebalance(now));
            }
            State::PreparingRebalance | State::Empty => {}
        }
        if self.state == State::PreparingRebalance {
            replies.extend(self.try_complete_join(now));
        }
        replies
    }

    /// Time passes: expired sessions leave, a rebalance whose time is up completes.
    pub fn tick(&mut self, now: Instant) -> Vec<Reply> {
        self.pending_ids.retain(|_, until| *until > now);
        let expired: Vec<String> = self
            .members
            .iter()
            // A member whose join is pending waits for the rebalance, not its session.
            .filter(|(_, m)| {
                !m.awaiting_join && now.duration_since(m.last_heard) > m.session_timeout
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut replies = Vec::new();
        if !expired.is_empty() {
            tracing::info!(group = %self.group, members = ?expired, "classic members' sessions expired");
            replies.extend(self.leave(&expired, now).1);
        }
        // A sync phase past its deadline: whoever did not sync goes, and the rest join again.
        if self.state == State::CompletingRebalance && self.sync_deadline.is_some_and(|d| now >= d)
        {
            self.sync_deadline = None;
            let silent: Vec<String> = self
                .members
                .iter()
                .filter(|(_, m)| !m.awaiting_sync)
                .map(|(id, _)| id.clone())
                .collect();
            if !silent.is_empty() {
                replies.extend(self.leave(&silent, now).1);
            }
        }
        replies.extend(self.try_complete_join(now));
        replies
    }

    /// An OffsetCommit's member and generation: a member of the current generation (also while
    /// the group prepares a rebalance, so members commit before they join again, as Kafka
    /// allows; not while the assignment is being handed out), or (generation -1, no member id)
    /// a client managing its own partitions while the group has no members.
    pub fn check_commit(
        &mut self,
        member_id: &str,
        generation: i32,
        now: Instant,
    ) -> Result<(), ClassicError> {
        if generation < 0 && member_id.is_empty() {
            return if self.members.is_empty() {
                Ok(())
            } else {
                Err(ClassicError::IllegalGeneration {
                    current: self.generation,
                })
            };
        }
        self.check_member(member_id, generation)?;
        if let Some(m) = self.members.get_mut(member_id) {
            m.last_heard = now;
        }
        match self.state {
            State::CompletingRebalance => Err(ClassicError::RebalanceInProgress),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
