//! The state-machine seam: what applying a committed Raft entry does to a group's state, apart
//! from the actor that drives the group.
//!
//! A [`StateMachine`] is deterministic, sans-IO code: given the same entries in the same order it
//! reaches the same state and returns the same writes on every replica. It says how its writes
//! become durable ([`Durability`]) and which column families they touch, snapshots its whole
//! state for a replica behind the leader's compacted log, and restores from such a snapshot.
//! The actor that owns the Raft group ([`crate::raft_driver::RaftDriven`]) feeds it committed
//! entries through [`apply_committed`], writes what it returns with the Ready's Raft writes, and
//! acts on its effects (answers, hosting) once they are durable.
//!
//! The metadata catalog is one ([`crate::metadata`]); a partition's record log is the other kind
//! of state: too large to snapshot whole, it streams its snapshot in chunks and is replayable
//! (see `storage`), so it keeps its own apply in `partition_replica`.

use bytes::Bytes;
use raft::prelude::Entry;

use crate::error::StorageError;
use crate::storage::{Cf, WriteOp};

/// How an apply's writes become durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Written through the WAL and fsync'd with the Ready that applies them: small state that
    /// must survive a crash without replay (the catalog, committed offsets).
    Synced,
    /// Written to `records` without the WAL; durable once a flush of `records` covers them, and
    /// replayed from the Raft log after a crash, which is therefore compacted only up to
    /// [`crate::storage::Storage::durable_applied`].
    Replayable,
}

/// Deterministic state built from a Raft group's committed entries.
pub trait StateMachine {
    /// What one applied entry leaves for the owning actor to do once it is durable (answer a
    /// client, host a topic).
    type Effect;

    /// How this machine's writes become durable.
    const DURABILITY: Durability;

    /// The column families this machine's writes touch.
    fn column_families(&self) -> &'static [Cf];

    /// Index of the last entry applied (writes in flight included).
    fn applied_index(&self) -> u64;

    /// Apply the committed entry `data` at Raft index `index` (never empty: raft-rs's empty
    /// entries are skipped by [`apply_committed`]). Appends the writes that make the change
    /// durable to `ops`.
    fn apply(&mut self, index: u64, data: &[u8], ops: &mut Vec<WriteOp>) -> Self::Effect;

    /// The write that records `index` as applied, in the same batch as the apply's writes, so
    /// a replica restarted from durable state applies no entry twice.
    fn applied_op(&mut self, index: u64) -> WriteOp;

    /// The whole state, as the snapshot a leader offers at [`StateMachine::applied_index`].
    fn snapshot(&self) -> Bytes;

    /// Replace the state with a leader's snapshot taken at `index`; returns the writes that make
    /// it durable (one atomic batch with the Raft writes) and the effects it implies.
    fn restore(
        &mut self,
        index: u64,
        data: &[u8],
    ) -> Result<(Vec<WriteOp>, Vec<Self::Effect>), StorageError>;
}

/// What [`apply_committed`] did with one Ready's committed entries.
#[derive(Debug)]
pub struct AppliedEntries<E> {
    /// Writes that make the applies durable, the applied index included.
    pub ops: Vec<WriteOp>,
    /// Per applied entry: the id of this replica's proposal it was (see
    /// [`crate::proposals::Proposals::own`]), and its effect.
    pub effects: Vec<(Option<u64>, E)>,
    /// Index and term of the last entry, if there was any.
    pub last: Option<(u64, u64)>,
}

/// Apply committed entries in order; `own` tells this replica's proposals by an entry's
/// context.
pub fn apply_committed<M: StateMachine>(
    machine: &mut M,
    entries: Vec<Entry>,
    mut own: impl FnMut(&[u8]) -> Option<u64>,
) -> AppliedEntries<M::Effect> {
    let mut ops = Vec::new();
    let mut effects = Vec::new();
    let last = entries.last().map(|e| (e.index, e.term));
    for entry in &entries {
        // raft-rs appends an empty entry when a leader is elected: nothing to apply.
        if entry.data.is_empty() {
            continue;
        }
        let effect = machine.apply(entry.index, &entry.data, &mut ops);
        effects.push((own(&entry.context), effect));
    }
    // A write outside the declared column families is a bug in the machine: whatever relies
    // on the declaration (deleting, flushing, replaying its state) would miss it.
    if let Some(op) = ops
        .iter()
        .find(|op| !machine.column_families().contains(&op.cf()))
    {
        panic!("a state machine wrote outside its column families: {op:?}");
    }
    if let Some((index, _)) = last {
        ops.push(machine.applied_op(index));
    }
    AppliedEntries { ops, effects, last }
}
