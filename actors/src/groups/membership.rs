//! A group's membership under server-side incremental assignment (KIP-848's model), as pure
//! code: members join and leave, heartbeat (every poll and commit is one) and expire; the
//! coordinator computes a target assignment ([`super::assignor`]) whenever membership,
//! subscriptions or partition counts change; and each member converges on its target one
//! heartbeat at a time.
//!
//! The rule that keeps a partition from being delivered twice in a rebalance that loses no
//! member: a partition moves in two steps. Its old owner gives it up at its next heartbeat
//! after the revocation (so the poll that may have returned its records is over), and only a
//! heartbeat after that hands it to the new owner. A member that leaves gives up everything at
//! once; one whose session expires is removed, and its partitions become free — the one case
//! where records it fetched but did not commit are delivered again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::assignor::{assign, Assignment, Assignor, Subscriptions};
use super::offsets_machine::TopicPartition;

/// One member, as the coordinator tracks it.
#[derive(Debug, Clone)]
pub struct Member {
    pub subscription: BTreeSet<String>,
    pub session_timeout: Duration,
    pub last_seen: Instant,
    /// Partitions this member owns: it may fetch them and commit their offsets.
    pub owned: BTreeSet<TopicPartition>,
    /// Set while one of its polls is under way: revocations wait for it to end.
    pub polling: bool,
}

/// What a heartbeat changed for its member.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    pub revoked: Vec<TopicPartition>,
    pub assigned: Vec<TopicPartition>,
}

/// Why a member's request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipError {
    UnknownMember,
    /// A poll of this member is already under way.
    PollInProgress,
}

/// The membership of one group.
#[derive(Debug, Clone)]
pub struct Membership {
    pub assignor: Assignor,
    /// Bumped by every change of the target assignment (Kafka's group epoch, our generation).
    pub generation: u32,
    members: BTreeMap<String, Member>,
    /// Partition → its one owner. The single source of truth for ownership: a member's
    /// `owned` mirrors its entries here.
    owners: BTreeMap<TopicPartition, String>,
    target: Assignment,
    /// Partition counts of the subscribed topics the target was computed for.
    topics: BTreeMap<String, u32>,
    /// When the group went from stable to rebalancing (None while stable).
    pub rebalancing_since: Option<Instant>,
    /// No partition is handed out before this instant: an empty group waits this long for
    /// more members after its first one joins (Kafka's `group.initial.rebalance.delay.ms`).
    held_until: Option<Instant>,
}

impl Membership {
    pub fn new(assignor: Assignor, generation: u32) -> Self {
        Self {
            assignor,
            generation,
            members: BTreeMap::new(),
            owners: BTreeMap::new(),
            target: Assignment::new(),
            topics: BTreeMap::new(),
            rebalancing_since: None,
            held_until: None,
        }
    }

    pub fn members(&self) -> &BTreeMap<String, Member> {
        &self.members
    }

    pub fn member(&self, id: &str) -> Option<&Member> {
        self.members.get(id)
    }

    pub fn target_of(&self, id: &str) -> Option<&BTreeSet<TopicPartition>> {
        self.target.get(id)
    }

    pub fn owner_of(&self, tp: &TopicPartition) -> Option<&String> {
        self.owners.get(tp)
    }

    /// Every subscribed topic of every member.
    pub fn subscribed_topics(&self) -> BTreeSet<String> {
        self.members
            .values()
            .flat_map(|m| m.subscription.iter().cloned())
            .collect()
    }

    /// Whether every member owns exactly its target.
    pub fn is_stable(&self) -> bool {
        self.members
            .iter()
            .all(|(id, m)| self.target.get(id).is_some_and(|t| *t == m.owned))
    }

    /// Hand out no partition before `until` (see [`Membership::held_until`]).
    pub fn hold_until(&mut self, until: Instant) {
        self.held_until = Some(self.held_until.map_or(until, |held| held.max(until)));
    }

    /// `id` was heard from: its session goes on, and nothing is revoked or handed out (only
    /// a poll does that, so a client's commit or read of its state never moves partitions
    /// under it).
    pub fn touch(&mut self, id: &str, now: Instant) {
        if let Some(member) = self.members.get_mut(id) {
            member.last_seen = now;
        }
    }

    pub fn held_until(&self) -> Option<Instant> {
        self.held_until
    }

    /// Add `id` or change its subscription; recomputes the target.
    pub fn join(
        &mut self,
        id: &str,
        subscription: BTreeSet<String>,
        session_timeout: Duration,
        topics: BTreeMap<String, u32>,
        now: Instant,
    ) {
        let member = self.members.entry(id.to_owned()).or_insert_with(|| Member {
            subscription: BTreeSet::new(),
            session_timeout,
            last_seen: now,
            owned: BTreeSet::new(),
            polling: false,
        });
        member.subscription = subscription;
        member.session_timeout = session_timeout;
        member.last_seen = now;
        self.retarget(topics, now);
    }

    /// `id` leaves: it gives up its partitions at once (it will not fetch again).
    pub fn leave(&mut self, id: &str, topics: BTreeMap<String, u32>, now: Instant) -> bool {
        let Some(member) = self.members.remove(id) else {
            return false;
        };
        for tp in member.owned {
            self.owners.remove(&tp);
        }
        self.retarget(topics, now);
        true
    }

    /// Remove members whose session expired; returns their ids.
    pub fn expire(&mut self, topics: BTreeMap<String, u32>, now: Instant) -> Vec<String> {
        let expired: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| !m.polling && now.duration_since(m.last_seen) > m.session_timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            if let Some(member) = self.members.remove(id) {
                for tp in member.owned {
                    self.owners.remove(&tp);
                }
            }
        }
        if !expired.is_empty() {
            self.retarget(topics, now);
        }
        expired
    }

    /// Recompute the target if partition counts of subscribed topics changed (topics created,
    /// deleted or grown).
    pub fn observe_topics(&mut self, topics: BTreeMap<String, u32>, now: Instant) {
        if topics != self.topics {
            self.retarget(topics, now);
        }
    }

    fn retarget(&mut self, topics: BTreeMap<String, u32>, now: Instant) {
        let subscriptions: Subscriptions = self
            .members
            .iter()
            .map(|(id, m)| (id.clone(), m.subscription.clone()))
            .collect();
        let target = assign(self.assignor, &subscriptions, &topics, &self.target);
        self.topics = topics;
        // A partition of a topic that no longer exists (or no one subscribes to) is owned by
        // no one from now on: its owner's next heartbeat revokes it like any other.
        if target != self.target {
            self.target = target;
            self.generation += 1;
        }
        if self.is_stable() {
            self.rebalancing_since = None;
        } else if self.rebalancing_since.is_none() {
            self.rebalancing_since = Some(now);
        }
    }

    /// A heartbeat of `id` outside a poll: revoke what it owns beyond its target, then give it
    /// what of its target is free. Returns what changed.
    pub fn heartbeat(&mut self, id: &str, now: Instant) -> Result<Reconciled, MembershipError> {
        let member = self
            .members
            .get_mut(id)
            .ok_or(MembershipError::UnknownMember)?;
        member.last_seen = now;
        if member.polling {
            return Ok(Reconciled::default());
        }
        let empty = BTreeSet::new();
        let target = self.target.get(id).unwrap_or(&empty);
        let revoked: Vec<TopicPartition> = member.owned.difference(target).cloned().collect();
        for tp in &revoked {
            member.owned.remove(tp);
            self.owners.remove(tp);
        }
        let mut assigned = Vec::new();
        let held = self.held_until.is_some_and(|until| now < until);
        for tp in target.iter().filter(|_| !held) {
            if !self.owners.contains_key(tp) {
                self.owners.insert(tp.clone(), id.to_owned());
                member.owned.insert(tp.clone());
                assigned.push(tp.clone());
            }
        }
        if self.rebalancing_since.is_some() && self.is_stable() {
            self.rebalancing_since = None;
        }
        Ok(Reconciled { revoked, assigned })
    }

    /// Start a poll of `id`: a heartbeat, then its owned partitions are fixed until
    /// [`Membership::end_poll`].
    pub fn begin_poll(&mut self, id: &str, now: Instant) -> Result<Reconciled, MembershipError> {
        if self.members.get(id).is_some_and(|m| m.polling) {
            return Err(MembershipError::PollInProgress);
        }
        let reconciled = self.heartbeat(id, now)?;
        if let Some(member) = self.members.get_mut(id) {
            member.polling = true;
        }
        Ok(reconciled)
    }

    pub fn end_poll(&mut self, id: &str, now: Instant) {
        if let Some(member) = self.members.get_mut(id) {
            member.polling = false;
            member.last_seen = now;
        }
    }
}

#[cfg(test)]
mod tests;
