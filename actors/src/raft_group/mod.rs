//! `RaftGroup`: one raft-rs `RawNode` and the bookkeeping around its Ready loop, without any I/O.
//!
//! The actors that own a Raft group (the metadata actor for group 0, a `PartitionReplica` per
//! partition) call into this struct; it never touches a socket, a clock or RocksDB. What must be
//! made durable comes back as typed [`Persist`] intents (`persist` turns them into RocksDB
//! writes), what must be sent comes back as messages, so a test can step several groups
//! synchronously by shuttling messages between them and check what each would write.
//!
//! Ready order (raft-rs's documented order, as in its `five_mem_node` example):
//! 1. [`RaftGroup::ready`]: send the leader's `messages` now; persist `entries` + hard state
//!    (the returned ops, written by the caller with sync); apply `committed_entries`.
//! 2. After the ops are durable, [`RaftGroup::persisted`]: send `persisted_messages` and tell the
//!    node (`on_persist_ready`). raft-rs's async-ready API (`advance_append_async`) is used so that
//!    proposals arriving while a Ready is being fsync'd are accepted, not a protocol violation.
//! 3. After applying, [`RaftGroup::applied`] (`advance_apply_to`) and compaction of the in-memory log.
//!
//! [`ReplicaStore`] is the `raft::Storage` the node reads: raft-rs's `MemStorage`, which mirrors
//! what is durable in the `raft_log`/`raft_state` column families and is rebuilt from them by
//! [`RaftGroup::restore`], plus snapshots. A snapshot is small: the owner's state at a durable
//! applied index, as opaque bytes ([`RaftGroup::set_snapshot_point`]). A follower that receives one
//! gets it back as [`ReadyWork::snapshot`] and must make its state match (a partition fetches the
//! records it lacks from another replica) before the Ready counts as persisted.

use bytes::Bytes;
use raft::prelude::{ConfState, Entry, Message, MessageType, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, RawNode, SnapshotStatus, StateRole, Storage};

use crate::storage::keys::{PersistedRaft, WriteOp};
use crate::topic::LogId;

/// A follower further behind the leader's log than this is reported out of sync.
pub const IN_SYNC_LAG_ENTRIES_MAX: u64 = 1_000;
/// Largest append message raft-rs builds (bytes of entries per message).
const MESSAGE_BYTES_MAX: u64 = 1024 * 1024;
/// Appends in flight to one follower before the leader waits for acknowledgements.
const INFLIGHT_MESSAGES_MAX: usize = 256;
/// Bytes of entries a leader holds appended but not yet committed before it refuses proposals
/// (raft-rs `max_uncommitted_size`): with a quorum stalled (a slow disk, a paused follower
/// pair) producers get back-pressure instead of the leader buffering without bound.
pub const UNCOMMITTED_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Default [`RaftSettings::log_keep_bytes_max`].
pub const LOG_KEEP_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Bytes of committed entries one Ready hands out to apply (raft-rs
/// `max_committed_size_per_ready`), so a replica catching up applies in bounded steps.
const COMMITTED_BYTES_PER_READY_MAX: u64 = 16 * 1024 * 1024;

/// Raft timing (in ticks of the owning actor's timer) and how much log a group keeps.
#[derive(Debug, Clone, Copy)]
pub struct RaftSettings {
    /// Milliseconds per tick.
    pub tick_ms: u64,
    /// Followers start an election after a random timeout in [election_tick, 2 * election_tick).
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    /// Entries kept in memory (and in `raft_log`) behind the applied index, so a follower that is
    /// a little behind catches up from the log rather than by snapshot.
    pub log_keep_entries: u64,
    /// Most entries a leader keeps for a slow or dead follower; one further behind is brought up
    /// to date by snapshot. Bounds the memory a dead follower can cost (entries are batches).
    pub log_keep_entries_max: u64,
    /// Most bytes of entries a leader keeps for a slow or dead follower, whatever
    /// `log_keep_entries_max` says (50,000 entries of 16 MiB batches would be 800 GB); a
    /// follower further behind gets a snapshot. Entries not yet durably applied are kept anyway
    /// (the replay rule): at most about `records_flush_bytes` more.
    pub log_keep_bytes_max: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        // 30 ms ticks: heartbeats every 60 ms, elections after 300–600 ms of silence.
        Self {
            tick_ms: 30,
            election_tick: 10,
            heartbeat_tick: 2,
            log_keep_entries: 200,
            log_keep_entries_max: 50_000,
            log_keep_bytes_max: LOG_KEEP_BYTES_MAX,
        }
    }
}

/// The `raft::Storage` of a group: raft-rs's `MemStorage` for the log and hard state, and the
/// owner's latest snapshot point for followers behind the compacted log.
#[derive(Clone, Default)]
pub struct ReplicaStore {
    mem: MemStorage,
    /// A durable applied index and the owner's state there; `None`: no snapshot can be offered
    /// (raft-rs then waits and asks again).
    snapshot_point: Option<(u64, Bytes)>,
}

impl Storage for ReplicaStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    /// The snapshot at the owner's latest durable applied index. raft-rs treats any error but
    /// "temporarily unavailable" as fatal, so every miss is reported as that.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let unavailable = || raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable);
        let (index, data) = self.snapshot_point.clone().ok_or_else(unavailable)?;
        if index == 0 || index < request_index {
            return Err(unavailable());
        }
        let term = self.mem.term(index).map_err(|_| unavailable())?;
        let mut snapshot = Snapshot::default();
        let metadata = snapshot.mut_metadata();
        metadata.index = index;
        metadata.term = term;
        let conf_state = self
            .mem
            .initial_state()
            .map_err(|_| unavailable())?
            .conf_state;
        metadata.set_conf_state(conf_state);
        snapshot.data = data;
        Ok(snapshot)
    }
}

/// A snapshot this follower must install: the leader's state at `index` (opaque `data`).
#[derive(Debug, Clone)]
pub struct SnapshotInstall {
    pub index: u64,
    pub term: u64,
    pub data: Bytes,
}

/// Work one Ready produced, for the owner to carry out in order.
pub struct ReadyWork {
    /// Send these right away (leader appends and heartbeats may go out before persisting).
    pub messages: Vec<Message>,
    /// Make these durable before calling [`RaftGroup::persisted`]; fsync'd if `must_sync`.
    pub persist: Vec<Persist>,
    /// raft-rs's `Ready::must_sync`: new entries, a new term or vote, or a snapshot. A Ready that
    /// only moves the commit index needs no fsync (the commit index can be learnt again).
    pub must_sync: bool,
    /// Apply these (they are committed) in order.
    pub committed: Vec<Entry>,
    /// Role or leader changed.
    pub role_changed: bool,
    /// A snapshot from the leader: the owner brings its state to the snapshot's before the
    /// Ready's writes (which then include the state it installed) and before [`RaftGroup::persisted`].
    pub snapshot: Option<SnapshotInstall>,
    /// Sent only once this Ready's writes are durable (votes, append acknowledgements).
    persisted_messages: Vec<Message>,
    number: u64,
}

/// After a Ready's writes are durable: messages that had to wait for it. What the writes
/// committed comes out of the next Ready.
pub struct Persisted {
    pub messages: Vec<Message>,
}

/// Why a proposal was not accepted; either way nothing was appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProposeError {
    /// No known leader to take it (an election is going on): retry shortly.
    NoLeader,
    /// The leader refused it: its uncommitted log is at [`UNCOMMITTED_BYTES_MAX`], or a
    /// leadership transfer is under way. Back-pressure: retry shortly.
    Dropped,
}

pub struct RaftGroup {
    pub group: LogId,
    pub id: u64,
    node: RawNode<ReplicaStore>,
    settings: RaftSettings,
    /// (index, bytes) of every entry in the in-memory log, oldest first, and their sum: what a
    /// leader keeping log for a slow follower costs, so it can bound it in bytes.
    sizes: std::collections::VecDeque<(u64, u64)>,
    sizes_total: u64,
}

impl std::fmt::Debug for RaftGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftGroup")
            .field("group", &self.group)
            .field("id", &self.id)
            .finish()
    }
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
        settings: RaftSettings,
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
            // Entries up to `applied` were committed. The stored commit index may be older (a
            // Ready that only moves it is not fsync'd), never the truth.
            hard_state.commit = hard_state.commit.max(applied);
            core.set_hardstate(hard_state);
        }
        let config = raft::Config {
            id,
            election_tick: settings.election_tick,
            heartbeat_tick: settings.heartbeat_tick,
            applied,
            max_size_per_msg: MESSAGE_BYTES_MAX,
            max_inflight_msgs: INFLIGHT_MESSAGES_MAX,
            check_quorum: true,
            pre_vote: true,
            // Appends proposed while a Ready is being written go to each follower as one
            // message rather than one per proposal, and a commit-index broadcast rides on it:
            // fewer messages to encode, send, step and answer (each answered one by one).
            batch_append: true,
            max_uncommitted_size: UNCOMMITTED_BYTES_MAX,
            max_committed_size_per_ready: COMMITTED_BYTES_PER_READY_MAX,
            ..Default::default()
        };
        config.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let store = ReplicaStore {
            mem: storage,
            snapshot_point: None,
        };
        let node = RawNode::new(&config, store, &logger)?;
        let mut raft = Self {
            group,
            id,
            node,
            settings,
            sizes: Default::default(),
            sizes_total: 0,
        };
        raft.track_appended(&persisted.entries);
        Ok(raft)
    }

    /// Entries were appended to the in-memory log (replacing any from their first index on).
    fn track_appended(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first().map(|e| e.index) else {
            return;
        };
        while self.sizes.back().is_some_and(|(index, _)| *index >= first) {
            if let Some((_, bytes)) = self.sizes.pop_back() {
                self.sizes_total -= bytes;
            }
        }
        for entry in entries {
            let bytes = (entry.data.len() + entry.context.len()) as u64;
            self.sizes.push_back((entry.index, bytes));
            self.sizes_total += bytes;
        }
    }

    /// The in-memory log now starts after `index` (compacted, or replaced by a snapshot).
    fn track_compacted(&mut self, index: u64) {
        while self.sizes.front().is_some_and(|(i, _)| *i <= index) {
            if let Some((_, bytes)) = self.sizes.pop_front() {
                self.sizes_total -= bytes;
            }
        }
    }

    /// The lowest index up to which the log must be compacted to hold at most `bytes_max`.
    fn compact_for_bytes(&self, bytes_max: u64) -> u64 {
        let mut total = self.sizes_total;
        let mut to = 0;
        for (index, bytes) in &self.sizes {
            if total <= bytes_max {
                break;
            }
            total -= bytes;
            to = *index;
        }
        to
    }

    /// Bytes of entries in the in-memory log.
    pub fn log_bytes(&self) -> u64 {
        self.sizes_total
    }

    /// The owner's state at applied index `index` is durable and described by `data`: offer it
    /// as the snapshot for followers behind the compacted log. A group whose owner never sets one
    /// (the metadata group) has followers wait for the log instead.
    pub fn set_snapshot_point(&mut self, index: u64, data: Bytes) {
        self.node.mut_store().snapshot_point = Some((index, data));
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
        self.node.tick();
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
        self.node.propose(context, data).map_err(|e| {
            tracing::debug!(group = ?self.group, error = %e, "proposal dropped");
            ProposeError::Dropped
        })
    }

    /// Index of the last entry in this replica's log (stable or not).
    pub fn last_index(&self) -> u64 {
        self.node.raft.raft_log.last_index()
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

    /// On the leader: whether the group has nothing in flight — every entry committed, applied
    /// and on every voter, no Ready pending — so it may stop ticking until something happens.
    pub fn is_quiescent(&self) -> bool {
        let log = &self.node.raft.raft_log;
        let last = log.last_index();
        self.is_leader()
            && log.committed == last
            && log.applied == last
            && !self.node.has_ready()
            && self.node.raft.lead_transferee.is_none()
            && self
                .node
                .raft
                .prs()
                .iter()
                .all(|(_, progress)| progress.matched == last)
    }

    /// On a follower: whether the leader's notice that the group is idle at (`term`, `index`)
    /// matches what this replica holds, so it may stop ticking too.
    pub fn may_quiesce_at(&self, term: u64, index: u64, leader: u64) -> bool {
        let log = &self.node.raft.raft_log;
        !self.is_leader()
            && self.term() == term
            && self.leader_id() == leader
            && log.last_index() == index
            && log.committed == index
            && log.applied == index
            && !self.node.has_ready()
    }

    /// On a follower: take the leader's notice that the group is idle at (`term`, `index`) as
    /// that leader's last heartbeat, committing through `index`. A leader quiesces right after
    /// its last commit, so a follower's commit index often lags the notice by one heartbeat
    /// that never comes; without this the follower kept ticking, timed out and unseated an
    /// idle, healthy leader. Safe as a heartbeat is: it is only taken when this replica's entry
    /// at `index` is from `term` (so its log equals the leader's through `index`, and a leader's
    /// log ends with an entry of its own term) and nothing follows it.
    pub fn adopt_quiesce_notice(&mut self, term: u64, index: u64, leader: u64) {
        let log = &self.node.raft.raft_log;
        let adoptable = !self.is_leader()
            && self.term() == term
            && self.leader_id() == leader
            && log.last_index() == index
            && log.committed < index
            && log.term(index).ok() == Some(term);
        if adoptable {
            let mut heartbeat = Message::default();
            heartbeat.set_msg_type(MessageType::MsgHeartbeat);
            heartbeat.from = leader;
            heartbeat.to = self.id;
            heartbeat.term = term;
            heartbeat.commit = index;
            self.step(heartbeat);
        }
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
        if !self.node.has_ready() {
            return None;
        }
        let mut ready = self.node.ready();
        let role_changed = ready.ss().is_some();
        let messages = ready.take_messages();
        let committed = ready.take_committed_entries();
        let mut persist = Vec::new();
        let snapshot = (!ready.snapshot().is_empty()).then(|| {
            let snapshot = ready.snapshot().clone();
            self.install_snapshot(snapshot, &mut persist)
        });
        if !ready.entries().is_empty() {
            let entries = ready.take_entries();
            let first = entries[0].index;
            let last_stored = self.node.store().last_index().unwrap_or(0);
            // Entries from `first` on replace whatever a previous leader left there. Only then:
            // a range tombstone per append would pile up and make every later read crawl.
            if first <= last_stored {
                persist.push(Persist::Truncate {
                    from: first,
                    through: last_stored,
                });
            }
            persist.extend(entries.iter().cloned().map(Persist::Entry));
            // raft-rs hands out entries that follow on the stored log; an append it refuses
            // would leave the in-memory log short of what is about to be durable. A bug: stop.
            if let Err(e) = self.node.mut_store().mem.wl().append(&entries) {
                panic!(
                    "in-memory raft log append of group {:?} failed: {e}",
                    self.group
                );
            }
            self.track_appended(&entries);
        }
        if let Some(hard_state) = ready.hs() {
            self.node
                .mut_store()
                .mem
                .wl()
                .set_hardstate(hard_state.clone());
        }
        if ready.hs().is_some() || !persist.is_empty() {
            persist.push(self.hard_state());
        }
        let persisted_messages = ready.take_persisted_messages();
        let number = ready.number();
        let must_sync = ready.must_sync();
        // Async persistence: the node may take new proposals while this Ready is written; it
        // counts the entries as persisted only at `on_persist_ready`.
        self.node.advance_append_async(ready);
        // A snapshot message is tiny (the follower fetches the data itself), so it counts as
        // delivered once queued: the follower's progress goes back to probing, and a snapshot or
        // answer lost on the wire is retried instead of pausing that follower for good.
        for message in &messages {
            if message.get_msg_type() == MessageType::MsgSnapshot {
                self.node
                    .report_snapshot(message.to, SnapshotStatus::Finish);
            }
        }
        Some(ReadyWork {
            messages,
            persist,
            must_sync,
            committed,
            role_changed,
            snapshot,
            persisted_messages,
            number,
        })
    }

    /// A snapshot arrived: the log before it is replaced by the snapshot's (index, term) in
    /// memory now and durably with this Ready (everything stored in `raft_log` goes).
    fn install_snapshot(
        &mut self,
        snapshot: Snapshot,
        persist: &mut Vec<Persist>,
    ) -> SnapshotInstall {
        let (index, term) = (snapshot.get_metadata().index, snapshot.get_metadata().term);
        let data = snapshot.data.clone();
        persist.push(Persist::ReplaceBySnapshot { index, term });
        // raft-rs only hands out snapshots newer than the log's commit index; one it refuses
        // would leave memory and disk disagreeing. A bug: stop.
        if let Err(e) = self.node.mut_store().mem.wl().apply_snapshot(snapshot) {
            panic!(
                "in-memory snapshot apply of group {:?} failed: {e}",
                self.group
            );
        }
        self.track_compacted(u64::MAX);
        tracing::info!(group = ?self.group, index, term, "installing a snapshot from the leader");
        SnapshotInstall { index, term, data }
    }

    /// Step 2: the work's writes are durable. What that commits comes out of the next Ready.
    pub fn persisted(&mut self, work: ReadyWork) -> Persisted {
        self.node.on_persist_ready(work.number);
        Persisted {
            messages: work.persisted_messages,
        }
    }

    /// The hard state as it should be stored now.
    fn hard_state(&self) -> Persist {
        Persist::HardState(self.node.store().mem.rl().hard_state().clone())
    }

    /// The write of the hard state as it should be stored now (written with every apply too,
    /// so the stored commit index is never below the stored applied index).
    pub fn hard_state_op(&self) -> WriteOp {
        persist::writes(self.group, vec![self.hard_state()]).remove(0)
    }

    /// Step 3: entries up to `index` are applied, and up to `durable` (≤ `index`) a crash
    /// cannot undo the apply. Returns the compaction, if the in-memory log grew past its
    /// bound; entries above `durable` are kept, as a restart may have to apply them again.
    pub fn applied(&mut self, index: u64, durable: u64) -> Option<Persist> {
        self.node.advance_apply_to(index);
        let first = self.node.store().first_index().unwrap_or(1);
        let (keep, keep_max) = (
            self.settings.log_keep_entries,
            self.settings.log_keep_entries_max,
        );
        let mut compact_to = index.saturating_sub(keep);
        if self.is_leader() {
            // A leader keeps what its slowest follower still needs (a restarted follower
            // catches up from the log), up to `log_keep_entries_max` behind.
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
                .max(index.saturating_sub(keep_max))
                .max(
                    self.compact_for_bytes(self.settings.log_keep_bytes_max)
                        .min(index),
                );
        }
        let compact_to = compact_to.min(durable);
        // Compact in steps of at least `log_keep_entries`, not on every apply.
        if compact_to < first + keep {
            return None;
        }
        let term = self.node.store().term(compact_to).unwrap_or(0);
        if let Err(e) = self.node.mut_store().mem.wl().compact(compact_to + 1) {
            tracing::warn!(group = ?self.group, error = %e, "raft log compaction failed");
            return None;
        }
        self.track_compacted(compact_to);
        Some(Persist::Compact {
            index: compact_to,
            term,
        })
    }
}

mod persist;

pub use persist::{writes as persist_writes, Persist};

#[cfg(test)]
mod tests;
