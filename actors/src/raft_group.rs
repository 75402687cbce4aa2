//! `RaftGroup`: one raft-rs `RawNode` and the bookkeeping around its Ready loop, without any I/O.
//!
//! The actors that own a Raft group (the metadata actor for group 0, a `PartitionReplica` per
//! partition) call into this struct; it never touches a socket, a clock or RocksDB. What must be
//! made durable comes back as [`WriteOp`]s, what must be sent comes back as messages, so a test can
//! step several groups synchronously by shuttling messages between them.
//!
//! Ready order (raft-rs's documented order, as in its `five_mem_node` example):
//! 1. [`RaftGroup::ready`]: send the leader's `messages` now; persist `entries` + hard state
//!    (the returned ops, written by the caller with sync); apply `committed_entries`.
//! 2. After the ops are durable, [`RaftGroup::persisted`]: send `persisted_messages` and tell the
//!    node (`on_persist_ready`). raft-rs's async-ready API (`advance_append_async`) is used so that
//!    proposals arriving while a Ready is being fsync'd are accepted, not a protocol violation.
//! 3. After applying, [`RaftGroup::applied`] (`advance_apply_to`) and compaction of the in-memory log.
//!
//! raft-rs's `MemStorage` is the `raft::Storage` the node reads; it mirrors what is durable in the
//! `raft_log`/`raft_state` column families and is rebuilt from them by [`RaftGroup::restore`].

use bytes::Bytes;
use raft::prelude::{ConfState, Entry, HardState, Message, Snapshot};
use raft::storage::MemStorage;
use raft::{RawNode, StateRole, Storage as _};

use crate::error::StorageError;
use crate::storage::{log_key, Cf, WriteOp};
use crate::topic::LogId;

/// Entries kept in memory (and in `raft_log`) behind the applied index, so a follower that is a
/// little behind catches up from the log. A follower further behind needs a snapshot.
pub const RAFT_LOG_KEEP_ENTRIES: u64 = 5_000;
/// Most entries a leader keeps for a slow or dead follower; one further behind needs a snapshot.
/// Bounds the memory a dead follower can cost (entries are record batches).
pub const RAFT_LOG_KEEP_ENTRIES_MAX: u64 = 50_000;
/// A follower further behind the leader's log than this is reported out of sync.
pub const IN_SYNC_LAG_ENTRIES_MAX: u64 = 1_000;
/// Largest append message raft-rs builds (bytes of entries per message).
const MESSAGE_BYTES_MAX: u64 = 1024 * 1024;
/// Appends in flight to one follower before the leader waits for acknowledgements.
const INFLIGHT_MESSAGES_MAX: usize = 256;

/// Raft timing, in ticks of the owning actor's timer.
#[derive(Debug, Clone, Copy)]
pub struct RaftTiming {
    /// Milliseconds per tick.
    pub tick_ms: u64,
    /// Followers start an election after a random timeout in [election_tick, 2 * election_tick).
    pub election_tick: usize,
    pub heartbeat_tick: usize,
}

impl Default for RaftTiming {
    fn default() -> Self {
        // 30 ms ticks: heartbeats every 60 ms, elections after 300–600 ms of silence.
        Self {
            tick_ms: 30,
            election_tick: 10,
            heartbeat_tick: 2,
        }
    }
}

/// What RocksDB holds for one group, read at start-up.
#[derive(Debug, Clone, Default)]
pub struct PersistedRaft {
    pub hard_state: HardState,
    /// Index and term of the last entry removed by compaction (0, 0 if none).
    pub compacted: (u64, u64),
    pub entries: Vec<Entry>,
}

/// Work one Ready produced, for the owner to carry out in order.
pub struct ReadyWork {
    /// Send these right away (leader appends and heartbeats may go out before persisting).
    pub messages: Vec<Message>,
    /// Write these durably (sync) before calling [`RaftGroup::persisted`].
    pub persist: Vec<WriteOp>,
    /// Apply these (they are committed) in order.
    pub committed: Vec<Entry>,
    /// Role or leader changed.
    pub role_changed: bool,
    /// The leader sent a snapshot, which this replica cannot apply (snapshots of record data are
    /// not implemented): the owner must stop rather than persist or apply anything of this Ready.
    pub snapshot_received: bool,
    /// Sent only once this Ready's writes are durable (votes, append acknowledgements).
    persisted_messages: Vec<Message>,
    number: u64,
}

/// After a Ready's writes are durable: messages that had to wait for it. What the writes
/// committed comes out of the next Ready.
pub struct Persisted {
    pub messages: Vec<Message>,
}

/// Why a proposal was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProposeError {
    /// No known leader to take it (an election is going on): retry shortly.
    NoLeader,
}

pub struct RaftGroup {
    pub group: LogId,
    pub id: u64,
    node: RawNode<MemStorage>,
}

impl std::fmt::Debug for RaftGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftGroup")
            .field("group", &self.group)
            .field("id", &self.id)
            .finish()
    }
}

/// Key prefix of a group's entries in `raft_log`, and its key in `raft_state`.
pub fn raft_entry_key(group: LogId, index: u64) -> Vec<u8> {
    let mut key = log_key(group);
    key.extend_from_slice(&index.to_be_bytes());
    key
}
pub fn hard_state_key(group: LogId) -> Vec<u8> {
    let mut key = log_key(group);
    key.extend_from_slice(b"hs");
    key
}
pub fn compacted_key(group: LogId) -> Vec<u8> {
    let mut key = log_key(group);
    key.extend_from_slice(b"compacted");
    key
}

impl RaftGroup {
    /// Rebuild a group's node from what RocksDB holds. `voters` must be the same on every replica
    /// of a fresh group; `applied` is the state machine's durable applied index.
    pub fn restore(
        group: LogId,
        id: u64,
        voters: &[u64],
        persisted: PersistedRaft,
        applied: u64,
        timing: RaftTiming,
    ) -> Result<Self, raft::Error> {
        let storage = MemStorage::new_with_conf_state(ConfState::from((voters.to_vec(), vec![])));
        {
            let mut core = storage.wl();
            let (index, term) = persisted.compacted;
            if index > 0 {
                let mut snapshot = Snapshot::default();
                snapshot.mut_metadata().index = index;
                snapshot.mut_metadata().term = term;
                snapshot
                    .mut_metadata()
                    .set_conf_state(ConfState::from((voters.to_vec(), vec![])));
                core.apply_snapshot(snapshot)?;
            }
            core.append(&persisted.entries)?;
            let mut hard_state = persisted.hard_state;
            // The commit index is persisted with every apply, so it is never below `applied`.
            hard_state.commit = hard_state.commit.max(applied);
            core.set_hardstate(hard_state);
        }
        let config = raft::Config {
            id,
            election_tick: timing.election_tick,
            heartbeat_tick: timing.heartbeat_tick,
            applied,
            max_size_per_msg: MESSAGE_BYTES_MAX,
            max_inflight_msgs: INFLIGHT_MESSAGES_MAX,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        config.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let node = RawNode::new(&config, storage, &logger)?;
        let mut group = Self { group, id, node };
        group.refuse_snapshots();
        Ok(group)
    }

    /// True if this replica has never voted or seen a term: the group is brand new.
    pub fn is_fresh(&self) -> bool {
        self.node.raft.term == 0
    }

    pub fn campaign(&mut self) {
        if let Err(e) = self.node.campaign() {
            tracing::debug!(group = ?self.group, error = %e, "campaign refused");
        }
    }

    pub fn tick(&mut self) {
        self.refuse_snapshots();
        self.node.tick();
    }

    /// Snapshots of record data are not implemented: make raft-rs's `MemStorage` answer
    /// "temporarily unavailable" (its flag is one-shot, so it is re-armed on every tick and Ready).
    /// A follower behind the compacted log then waits instead of receiving an empty snapshot,
    /// which would leave its records and offsets wrong.
    fn refuse_snapshots(&mut self) {
        self.node.mut_store().wl().trigger_snap_unavailable();
    }

    pub fn step(&mut self, message: Message) {
        if let Err(e) = self.node.step(message) {
            tracing::debug!(group = ?self.group, error = %e, "raft message dropped");
        }
    }

    /// Propose `data`; `context` comes back with the committed entry.
    pub fn propose(&mut self, context: Vec<u8>, data: Vec<u8>) -> Result<(), ProposeError> {
        if self.leader_id() == 0 {
            return Err(ProposeError::NoLeader);
        }
        self.node
            .propose(context, data)
            .map_err(|_| ProposeError::NoLeader)
    }

    /// True while this replica campaigns (pre-vote or vote).
    pub fn is_campaigning(&self) -> bool {
        matches!(
            self.node.raft.state,
            StateRole::Candidate | StateRole::PreCandidate
        )
    }

    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// The leader's broker id, 0 when unknown.
    pub fn leader_id(&self) -> u64 {
        self.node.raft.leader_id
    }

    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    pub fn commit_index(&self) -> u64 {
        self.node.raft.raft_log.committed
    }

    pub fn applied_index(&self) -> u64 {
        self.node.raft.raft_log.applied
    }

    /// On the leader, how many entries the slowest follower is behind the leader's log; else 0.
    pub fn follower_lag(&self) -> u64 {
        if !self.is_leader() {
            return 0;
        }
        let last = self.node.raft.raft_log.last_index();
        self.node
            .raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != self.id)
            .map(|(_, progress)| last.saturating_sub(progress.matched))
            .max()
            .unwrap_or(0)
    }

    /// On the leader: voters at most [`IN_SYNC_LAG_ENTRIES_MAX`] entries behind its log for which
    /// `alive` holds (the leader included). Empty elsewhere: only the leader knows.
    pub fn in_sync_voters(&self, alive: impl Fn(u64) -> bool) -> Vec<u64> {
        if !self.is_leader() {
            return Vec::new();
        }
        let last = self.node.raft.raft_log.last_index();
        self.node
            .raft
            .prs()
            .iter()
            .filter(|(id, progress)| {
                **id == self.id
                    || (alive(**id) && progress.matched + IN_SYNC_LAG_ENTRIES_MAX >= last)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn has_ready(&self) -> bool {
        self.node.has_ready()
    }

    /// Step 1 of the Ready loop; None when there is nothing to do.
    pub fn ready(&mut self) -> Option<ReadyWork> {
        self.refuse_snapshots();
        if !self.node.has_ready() {
            return None;
        }
        let mut ready = self.node.ready();
        let role_changed = ready.ss().is_some();
        let snapshot_received = !ready.snapshot().is_empty();
        if snapshot_received {
            // Never produced by our leaders (see `refuse_snapshots`); only a foreign leader
            // could send one.
            tracing::error!(group = ?self.group, "received a snapshot, which is not supported yet");
        }
        let messages = ready.take_messages();
        let committed = ready.take_committed_entries();
        let mut persist = Vec::new();
        if !ready.entries().is_empty() {
            let entries = ready.take_entries();
            let first = entries[0].index;
            let last_stored = self.node.store().last_index().unwrap_or(0);
            // Entries from `first` on replace whatever a previous leader left there. Only then:
            // a range tombstone per append would pile up and make every later read crawl.
            if first <= last_stored {
                persist.push(WriteOp::DeleteRange {
                    cf: Cf::RaftLog,
                    from: raft_entry_key(self.group, first),
                    to: raft_entry_key(self.group, last_stored + 1),
                });
            }
            for entry in &entries {
                persist.push(WriteOp::Put {
                    cf: Cf::RaftLog,
                    key: raft_entry_key(self.group, entry.index),
                    value: encode(entry),
                });
            }
            if let Err(e) = self.node.mut_store().wl().append(&entries) {
                tracing::error!(group = ?self.group, error = %e, "in-memory raft log append failed");
            }
        }
        if let Some(hard_state) = ready.hs() {
            self.node.mut_store().wl().set_hardstate(hard_state.clone());
        }
        if ready.hs().is_some() || !persist.is_empty() {
            persist.push(self.hard_state_op());
        }
        let persisted_messages = ready.take_persisted_messages();
        let number = ready.number();
        // Async persistence: the node may take new proposals while this Ready is written; it
        // counts the entries as persisted only at `on_persist_ready`.
        self.node.advance_append_async(ready);
        Some(ReadyWork {
            messages,
            persist,
            committed,
            role_changed,
            snapshot_received,
            persisted_messages,
            number,
        })
    }

    /// Step 2: the work's writes are durable. What that commits comes out of the next Ready.
    pub fn persisted(&mut self, work: ReadyWork) -> Persisted {
        self.node.on_persist_ready(work.number);
        Persisted {
            messages: work.persisted_messages,
        }
    }

    /// The hard state as it should be stored now (written with every apply too, so the stored
    /// commit index is never below the stored applied index).
    pub fn hard_state_op(&self) -> WriteOp {
        let hard_state = self.node.store().rl().hard_state().clone();
        WriteOp::Put {
            cf: Cf::RaftState,
            key: hard_state_key(self.group),
            value: encode(&hard_state),
        }
    }

    /// Step 3: entries up to `index` are applied durably. Returns the compaction writes, if the
    /// in-memory log grew past its bound.
    pub fn applied(&mut self, index: u64) -> Vec<WriteOp> {
        self.node.advance_apply_to(index);
        let first = self.node.store().first_index().unwrap_or(1);
        let mut compact_to = index.saturating_sub(RAFT_LOG_KEEP_ENTRIES);
        if self.is_leader() {
            // A leader keeps what its slowest follower still needs (a restarted follower
            // catches up from the log), up to RAFT_LOG_KEEP_ENTRIES_MAX behind.
            let slowest = self
                .node
                .raft
                .prs()
                .iter()
                .filter(|(id, _)| **id != self.id)
                .map(|(_, progress)| progress.matched)
                .min()
                .unwrap_or(index);
            compact_to = compact_to
                .min(slowest)
                .max(index.saturating_sub(RAFT_LOG_KEEP_ENTRIES_MAX));
        }
        // Compact in steps of at least RAFT_LOG_KEEP_ENTRIES, not on every apply.
        if compact_to < first + RAFT_LOG_KEEP_ENTRIES {
            return Vec::new();
        }
        let term = self.node.store().term(compact_to).unwrap_or(0);
        if let Err(e) = self.node.mut_store().wl().compact(compact_to + 1) {
            tracing::warn!(group = ?self.group, error = %e, "raft log compaction failed");
            return Vec::new();
        }
        let mut marker = compact_to.to_be_bytes().to_vec();
        marker.extend_from_slice(&term.to_be_bytes());
        vec![
            WriteOp::DeleteRange {
                cf: Cf::RaftLog,
                from: raft_entry_key(self.group, 0),
                to: raft_entry_key(self.group, compact_to + 1),
            },
            WriteOp::Put {
                cf: Cf::RaftState,
                key: compacted_key(self.group),
                value: Bytes::from(marker),
            },
        ]
    }
}

fn encode(message: &impl protobuf::Message) -> Bytes {
    Bytes::from(message.write_to_bytes().unwrap_or_default())
}

/// Decode an entry or hard state stored by this module.
pub fn decode<M: protobuf::Message>(bytes: &[u8], what: &str) -> Result<M, StorageError> {
    M::parse_from_bytes(bytes).map_err(|e| StorageError::Corrupt {
        what: what.to_owned(),
        message: e.to_string(),
    })
}

/// Parse the compaction marker written by [`RaftGroup::applied`].
pub fn decode_compacted(bytes: &[u8]) -> Result<(u64, u64), StorageError> {
    if bytes.len() != 16 {
        return Err(StorageError::Corrupt {
            what: "raft compaction marker".into(),
            message: format!("{} bytes", bytes.len()),
        });
    }
    let word = |i: usize| u64::from_be_bytes(bytes[i..i + 8].try_into().unwrap_or_default());
    Ok((word(0), word(8)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(id: u64) -> RaftGroup {
        let timing = RaftTiming {
            tick_ms: 1,
            election_tick: 10,
            heartbeat_tick: 2,
        };
        let log = LogId {
            topic_id: 1,
            partition: 0,
        };
        RaftGroup::restore(log, id, &[1, 2, 3], PersistedRaft::default(), 0, timing).expect("raft")
    }

    /// Run every group's Ready loop and deliver messages until nothing moves; returns the
    /// committed entries' data each group applied.
    fn settle(groups: &mut [RaftGroup], applied: &mut [Vec<Vec<u8>>]) {
        for _round in 0..100 {
            let mut outbox = Vec::new();
            for (i, g) in groups.iter_mut().enumerate() {
                while let Some(mut work) = g.ready() {
                    outbox.append(&mut work.messages);
                    let committed = std::mem::take(&mut work.committed);
                    let mut after = g.persisted(work);
                    outbox.append(&mut after.messages);
                    for entry in committed {
                        if !entry.data.is_empty() {
                            applied[i].push(entry.data.to_vec());
                        }
                        g.applied(entry.index);
                    }
                }
            }
            if outbox.is_empty() {
                return;
            }
            for message in outbox {
                let to = message.to as usize - 1;
                groups[to].step(message);
            }
        }
    }

    #[test]
    fn three_groups_elect_a_leader_and_replicate_in_order() {
        let mut groups = vec![group(1), group(2), group(3)];
        let mut applied = vec![Vec::new(); 3];
        groups[0].campaign();
        settle(&mut groups, &mut applied);
        assert!(groups[0].is_leader());
        assert_eq!(groups[1].leader_id(), 1);
        assert_eq!(groups[0].propose(vec![], b"a".to_vec()), Ok(()));
        // A follower forwards proposals to the leader.
        assert_eq!(groups[2].propose(vec![], b"b".to_vec()), Ok(()));
        settle(&mut groups, &mut applied);
        for log in &applied {
            assert_eq!(log, &vec![b"a".to_vec(), b"b".to_vec()]);
        }
    }

    #[test]
    fn a_partitioned_leader_is_replaced_and_cannot_commit() {
        let mut groups = vec![group(1), group(2), group(3)];
        let mut applied = vec![Vec::new(); 3];
        groups[0].campaign();
        settle(&mut groups, &mut applied);
        // Leader 1 is cut off: its proposal is never committed.
        assert_eq!(groups[0].propose(vec![], b"lost".to_vec()), Ok(()));
        let mut isolated = groups.remove(0);
        while let Some(work) = isolated.ready() {
            isolated.persisted(work);
        }
        // The other two time out and elect a new leader among themselves.
        for _ in 0..40 {
            for g in groups.iter_mut() {
                g.tick();
            }
            let mut outbox = Vec::new();
            for g in groups.iter_mut() {
                while let Some(mut work) = g.ready() {
                    outbox.append(&mut work.messages);
                    let mut after = g.persisted(work);
                    outbox.append(&mut after.messages);
                }
            }
            for m in outbox.into_iter().filter(|m| m.to != 1) {
                let to = m.to as usize - 2;
                groups[to].step(m);
            }
        }
        let leader = groups
            .iter()
            .position(RaftGroup::is_leader)
            .expect("a new leader");
        assert_eq!(groups[leader].propose(vec![], b"kept".to_vec()), Ok(()));
        let mut all = vec![isolated];
        all.append(&mut groups);
        let mut applied_all = vec![Vec::new(); 3];
        // Heal: heartbeats reach node 1 again.
        for _ in 0..10 {
            for g in all.iter_mut() {
                g.tick();
            }
            settle(&mut all, &mut applied_all);
        }
        // After healing, everyone applies "kept" and nobody applies "lost".
        for log in &applied_all {
            assert!(log.contains(&b"kept".to_vec()), "{log:?}");
            assert!(!log.contains(&b"lost".to_vec()), "{log:?}");
        }
        assert!(!all[0].is_leader(), "the old leader stepped down");
    }

    #[test]
    fn a_follower_behind_the_compacted_log_is_never_sent_a_snapshot() {
        let mut groups = vec![group(1), group(2), group(3)];
        let mut applied = vec![Vec::new(); 3];
        groups[0].campaign();
        settle(&mut groups, &mut applied);
        // Node 3 is cut off while the other two commit. The leader keeps its log for node 3 up
        // to RAFT_LOG_KEEP_ENTRIES_MAX entries, then compacts past it anyway.
        let mut behind = groups.pop().expect("node 3");
        let commit_without_node_3 = |groups: &mut Vec<RaftGroup>, entries: u64, start: u64| {
            for round in 0..entries / 500 {
                for i in 0..500u64 {
                    let data = (start + round * 500 + i).to_be_bytes().to_vec();
                    assert_eq!(groups[0].propose(vec![], data), Ok(()));
                }
                let mut outbox = Vec::new();
                for _ in 0..20 {
                    for g in groups.iter_mut() {
                        while let Some(mut work) = g.ready() {
                            outbox.append(&mut work.messages);
                            let committed = std::mem::take(&mut work.committed);
                            let mut after = g.persisted(work);
                            outbox.append(&mut after.messages);
                            if let Some(last) = committed.last() {
                                g.applied(last.index);
                            }
                        }
                    }
                    for m in outbox.drain(..).filter(|m| m.to != 3) {
                        let to = m.to as usize - 1;
                        groups[to].step(m);
                    }
                }
            }
        };
        commit_without_node_3(&mut groups, 12_500, 0);
        let kept = groups[0].node.store().first_index().expect("first index");
        assert_eq!(kept, 1, "the leader keeps what its slow follower needs");
        commit_without_node_3(&mut groups, RAFT_LOG_KEEP_ENTRIES_MAX, 12_500);
        let leader_first = groups[0].node.store().first_index().expect("first index");
        assert!(
            leader_first > 2,
            "past the bound the leader compacts (first index {leader_first})"
        );
        // Heal: the leader cannot send entries node 3 lacks, and must not send a snapshot.
        groups.push(behind);
        for _ in 0..20 {
            for g in groups.iter_mut() {
                g.tick();
            }
            let mut outbox = Vec::new();
            for g in groups.iter_mut() {
                while let Some(mut work) = g.ready() {
                    assert!(!work.snapshot_received, "node {} was sent a snapshot", g.id);
                    outbox.append(&mut work.messages);
                    let mut after = g.persisted(work);
                    outbox.append(&mut after.messages);
                }
            }
            for m in outbox {
                let to = m.to as usize - 1;
                groups[to].step(m);
            }
        }
        behind = groups.pop().expect("node 3");
        assert!(
            behind.commit_index() < leader_first,
            "node 3 stays behind rather than skipping data"
        );
    }
}
