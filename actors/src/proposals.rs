//! `Proposals`: the clients waiting for their Raft proposals, shared by every Raft-owning actor.
//!
//! A proposal's entry carries a context (this incarnation's nonce + a proposal id), so the apply
//! of a committed entry can tell which waiting client it answers. What makes this subtle is
//! leadership change, where a client must learn one of three things, promptly:
//! - *committed*: the entry was applied; answer with its result (also after a leader change:
//!   a new leader commits what the old one replicated);
//! - *not written*: certain, because the log index the entry was appended at was committed with
//!   another entry (raft-rs never proposes an entry again), or raft-rs refused it outright;
//! - *outcome unknown*: a proposal this replica forwarded to a leader that lost leadership may
//!   have been appended and may still commit; after the new leader has committed an entry of its
//!   own term the client is told so (it retries; idempotence is the producer's job).
//!
//! The nonce is random, so no two incarnations of one replica (in this or another process, after
//! any clock step) can mistake each other's proposals.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Bytes of an entry context: nonce then proposal id, both big-endian u64.
pub const CONTEXT_BYTES: usize = 16;

/// Where a waiting proposal stands in the Raft log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Appended by this replica as leader at this log index.
    Appended { index: u64 },
    /// Forwarded to the leader while this replica saw leadership in `term`.
    Forwarded { term: u64 },
}

/// A client waiting for its proposal.
#[derive(Debug)]
pub struct Pending<T> {
    pub waiter: T,
    pub proposed_at: Instant,
    placement: Placement,
}

/// How a proposal that will never be answered with a result ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// Certainly not in the log: retrying cannot duplicate it.
    NotWritten,
    /// Maybe in the log: a retry may store it twice.
    Unknown,
}

/// The waiting proposals of one Raft group's replica, by proposal id.
#[derive(Debug)]
pub struct Proposals<T> {
    nonce: u64,
    next_id: u64,
    pending: HashMap<u64, Pending<T>>,
}

impl<T> Default for Proposals<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Proposals<T> {
    pub fn new() -> Self {
        let mut nonce = [0u8; 8];
        // The OS's randomness; should it ever fail, fall back to a clock-seeded hash (still
        // distinct per incarnation in practice, which is all a fallback can promise).
        if getrandom::getrandom(&mut nonce).is_err() {
            use std::hash::{BuildHasher, Hasher};
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            nonce = hasher.finish().to_be_bytes();
        }
        Self {
            nonce: u64::from_be_bytes(nonce),
            next_id: 0,
            pending: HashMap::new(),
        }
    }

    /// The context for the next proposal, and its id.
    pub fn next_context(&self) -> (u64, Vec<u8>) {
        let id = self.next_id;
        let mut context = Vec::with_capacity(CONTEXT_BYTES);
        context.extend_from_slice(&self.nonce.to_be_bytes());
        context.extend_from_slice(&id.to_be_bytes());
        (id, context)
    }

    /// The proposal `id` (from [`Proposals::next_context`]) was accepted by raft-rs: as leader
    /// at log index `appended_at`, or forwarded while leadership was in `term`.
    pub fn insert(&mut self, id: u64, waiter: T, appended_at: Option<u64>, term: u64) {
        debug_assert_eq!(id, self.next_id, "ids are taken in order");
        self.next_id = id + 1;
        let placement = match appended_at {
            Some(index) => Placement::Appended { index },
            None => Placement::Forwarded { term },
        };
        self.pending.insert(
            id,
            Pending {
                waiter,
                proposed_at: Instant::now(),
                placement,
            },
        );
    }

    /// The proposal id in `context`, if this incarnation proposed it.
    pub fn own(&self, context: &[u8]) -> Option<u64> {
        let (nonce, id) = context.split_at_checked(8)?;
        let id: [u8; 8] = id.try_into().ok()?;
        (nonce == self.nonce.to_be_bytes()).then(|| u64::from_be_bytes(id))
    }

    /// The entry of proposal `id` was applied: take its waiter.
    pub fn take(&mut self, id: u64) -> Option<Pending<T>> {
        self.pending.remove(&id)
    }

    /// Entries up to `applied_index` are applied, the last of them (if any is known) in
    /// `applied_term`. Call after the applied proposals were taken. Returns the proposals that
    /// can now never be answered with a result, and how each ended:
    /// - appended at an index now applied with another entry: not written;
    /// - forwarded under an older leadership, once an entry of a newer term is applied (the new
    ///   leader committed its own entry, so whatever it inherited is decided): unknown, since a
    ///   proposal can reach a leader late and be appended after that entry.
    pub fn settle(
        &mut self,
        applied_index: u64,
        applied_term: Option<u64>,
    ) -> Vec<(Pending<T>, Unanswered)> {
        let settled: Vec<(u64, Unanswered)> = self
            .pending
            .iter()
            .filter_map(|(id, pending)| match pending.placement {
                Placement::Appended { index } if index <= applied_index => {
                    Some((*id, Unanswered::NotWritten))
                }
                Placement::Forwarded { term } if applied_term.is_some_and(|t| t > term) => {
                    Some((*id, Unanswered::Unknown))
                }
                _ => None,
            })
            .collect();
        settled
            .into_iter()
            .filter_map(|(id, how)| self.pending.remove(&id).map(|p| (p, how)))
            .collect()
    }

    /// The log jumped to `index` without applying the entries before it (a snapshot was
    /// installed): every proposal that may be among them is undecidable here, so unknown.
    pub fn skip_to(&mut self, index: u64) -> Vec<Pending<T>> {
        let skipped: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| match p.placement {
                Placement::Appended { index: at } => at <= index,
                Placement::Forwarded { .. } => true,
            })
            .map(|(id, _)| *id)
            .collect();
        skipped
            .into_iter()
            .filter_map(|id| self.pending.remove(&id))
            .collect()
    }

    /// Proposals waiting longer than `wait`: their outcome is unknown.
    pub fn expire(&mut self, wait: Duration) -> Vec<Pending<T>> {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.proposed_at.elapsed() > wait)
            .map(|(id, _)| *id)
            .collect();
        expired
            .into_iter()
            .filter_map(|id| self.pending.remove(&id))
            .collect()
    }

    /// Every waiting proposal (the replica is stopping or failed).
    pub fn drain(&mut self) -> impl Iterator<Item = Pending<T>> + '_ {
        self.pending.drain().map(|(_, p)| p)
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_round_trip_and_another_incarnations_are_not_ours() {
        let mut ours = Proposals::<u8>::new();
        let theirs = Proposals::<u8>::new();
        assert_ne!(ours.nonce, theirs.nonce, "random nonces");
        let (id, context) = ours.next_context();
        ours.insert(id, 7, Some(5), 1);
        assert_eq!(context.len(), CONTEXT_BYTES);
        assert_eq!(ours.own(&context), Some(id));
        assert_eq!(theirs.own(&context), None);
        assert_eq!(ours.own(b"short"), None);
        assert_eq!(ours.take(id).map(|p| p.waiter), Some(7));
    }

    #[test]
    fn an_appended_proposal_whose_index_commits_with_another_entry_was_not_written() {
        let mut proposals = Proposals::<&str>::new();
        let (a, _) = proposals.next_context();
        proposals.insert(a, "at 10", Some(10), 2);
        let (b, _) = proposals.next_context();
        proposals.insert(b, "at 11", Some(11), 2);
        assert!(proposals.settle(9, Some(3)).is_empty());
        let settled = proposals.settle(10, Some(3));
        assert_eq!(settled.len(), 1);
        assert_eq!(settled[0].0.waiter, "at 10");
        assert_eq!(settled[0].1, Unanswered::NotWritten);
        assert_eq!(proposals.len(), 1);
    }

    #[test]
    fn a_forwarded_proposal_is_unknown_once_a_newer_term_commits() {
        let mut proposals = Proposals::<&str>::new();
        let (a, _) = proposals.next_context();
        proposals.insert(a, "forwarded", None, 4);
        // Entries of its own term may still carry it.
        assert!(proposals.settle(100, Some(4)).is_empty());
        let settled = proposals.settle(101, Some(5));
        assert_eq!(settled.len(), 1);
        assert_eq!(settled[0].1, Unanswered::Unknown);
        assert!(proposals.is_empty());
    }

    #[test]
    fn old_proposals_expire() {
        let mut proposals = Proposals::<u8>::new();
        let (a, _) = proposals.next_context();
        proposals.insert(a, 1, None, 1);
        assert!(proposals.expire(Duration::from_secs(60)).is_empty());
        assert_eq!(proposals.expire(Duration::ZERO).len(), 1);
    }
}
