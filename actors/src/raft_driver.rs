//! The Ready loop glue every Raft-owning actor shares: one Ready in flight at a time, its writes
//! (Raft persistence + the apply of committed entries) as one storage write — the apply's
//! records replayable (no WAL) for partitions, everything fsync'd otherwise — then the messages
//! that must wait for durability, compaction, and another pass if more work arrived meanwhile.
//!
//! [`RaftGroup`] is the sans-IO half (what raft-rs wants done); this module is the I/O half for
//! actix actors. An actor implements [`RaftDriven`] (what applying means for it, what to do when
//! an apply is durable, how to fail) and calls [`drive`] whenever its node may have work: after
//! a proposal, an inbound message, a tick.

use actix::prelude::*;
use raft::prelude::Entry;

use crate::error::StorageError;
use crate::raft_group::{RaftGroup, ReadyWork, SnapshotInstall};
use crate::storage::{Cf, Replayable, Storage, WriteOp};
use crate::topic::LogId;
use crate::transport::Transport;

/// Whether a Ready is being written, and whether another pass was asked for meanwhile.
#[derive(Debug, Default, Clone, Copy)]
pub struct Driver {
    busy: bool,
    again: bool,
}

/// An actor that owns a Raft group and applies its committed entries.
pub(crate) trait RaftDriven: Actor<Context = Context<Self>> {
    /// What an apply hands to [`RaftDriven::on_durable`] once its write is durable.
    type Applied: 'static;

    fn raft_mut(&mut self) -> Option<&mut RaftGroup>;
    fn driver(&mut self) -> &mut Driver;
    fn group(&self) -> LogId;
    fn transport(&self) -> &Transport;
    fn storage(&self) -> &Storage;
    /// Index of the last entry applied (including applies whose write is in flight).
    fn applied_index(&self) -> u64;
    /// Whether the apply's writes to `records` are replayable from the Raft log (written without
    /// the WAL; see `storage`). Then the Raft log is compacted only up to
    /// [`Storage::durable_applied`]. Otherwise every apply is fsync'd with its Ready.
    fn replayable_apply(&self) -> bool {
        false
    }
    /// Apply committed entries to the in-memory state; return the writes that make it durable.
    fn apply(&mut self, entries: Vec<Entry>) -> (Vec<WriteOp>, Self::Applied);
    /// Bring the state to the leader's snapshot; resolves to the writes that make it durable
    /// (written with the Ready's Raft writes, in one atomic batch), the state updated in memory.
    fn install_snapshot(
        &mut self,
        snapshot: SnapshotInstall,
    ) -> ResponseActFuture<Self, Result<Vec<WriteOp>, StorageError>>;
    /// The node's role or leader changed in this Ready.
    fn on_role_change(&mut self);
    /// The apply's writes are durable: answer clients, host topics, move watermarks.
    fn on_durable(&mut self, applied: Self::Applied);
    /// A durable write failed (storage is failed closed) or the Ready cannot be handled.
    fn on_failure(&mut self, ctx: &mut Context<Self>, error: StorageError);
}

/// Handle the node's next Ready, unless one is already being written.
pub(crate) fn drive<A: RaftDriven>(act: &mut A, ctx: &mut Context<A>) {
    let driver = act.driver();
    if driver.busy {
        driver.again = true;
        return;
    }
    let group = act.group();
    let Some(mut work) = act.raft_mut().and_then(RaftGroup::ready) else {
        return;
    };
    act.transport()
        .send(group, std::mem::take(&mut work.messages));
    if work.role_changed {
        act.on_role_change();
    }
    act.driver().busy = true;
    match work.snapshot.clone() {
        None => write(act, ctx, work, Vec::new()),
        // The snapshot's state must be in hand before anything of this Ready is persisted:
        // raft-rs sends the snapshot's acknowledgement only after `persisted`.
        Some(snapshot) => {
            let install = act.install_snapshot(snapshot);
            ctx.spawn(install.map(move |result, act, ctx| match result {
                Ok(ops) => write(act, ctx, work, ops),
                Err(e) => act.on_failure(ctx, e),
            }));
        }
    }
}

/// Apply the Ready's committed entries and write everything it needs as one durable batch.
fn write<A: RaftDriven>(
    act: &mut A,
    ctx: &mut Context<A>,
    mut work: ReadyWork,
    snapshot_ops: Vec<WriteOp>,
) {
    let (apply_ops, applied) = act.apply(std::mem::take(&mut work.committed));
    let mut ops = std::mem::take(&mut work.persist);
    ops.extend(snapshot_ops);
    let submitted = if act.replayable_apply() {
        // Logged first (Raft entries, hard state, a snapshot), then the applied records.
        let (records, logged): (Vec<_>, Vec<_>) =
            apply_ops.into_iter().partition(|op| op.cf() == Cf::Records);
        ops.extend(logged);
        let replayable = Replayable {
            log: act.group(),
            applied_index: act.applied_index(),
            ops: records,
        };
        act.storage()
            .submit_replayable(ops, work.must_sync, replayable)
    } else {
        ops.extend(apply_ops);
        act.storage().submit(ops)
    };
    let durable = match submitted {
        Ok(durable) => durable,
        Err(e) => return act.on_failure(ctx, e),
    };
    ctx.spawn(durable.into_actor(act).map(move |result, act, ctx| {
        match result.unwrap_or(Err(StorageError::ShutDown)) {
            Ok(()) => persisted(act, work, applied, ctx),
            Err(e) => act.on_failure(ctx, e),
        }
    }));
}

fn persisted<A: RaftDriven>(
    act: &mut A,
    work: ReadyWork,
    applied: A::Applied,
    ctx: &mut Context<A>,
) {
    act.on_durable(applied);
    let (group, index) = (act.group(), act.applied_index());
    if let Some(snapshot) = &work.snapshot {
        // Written logged: the snapshot's state survives a crash from now on.
        act.storage().note_durable_applied(group, snapshot.index);
    }
    let durable = if act.replayable_apply() {
        act.storage().durable_applied(group)
    } else {
        index
    };
    let Some(raft) = act.raft_mut() else { return };
    let messages = raft.persisted(work).messages;
    let compaction = raft.applied(index, durable);
    act.transport().send(group, messages);
    if !compaction.is_empty() {
        // Best effort and unsynced: a compaction failed or lost in a crash only leaves more log
        // behind.
        let _ = act.storage().submit_unsynced(compaction);
    }
    let driver = act.driver();
    driver.busy = false;
    let again = std::mem::take(&mut driver.again);
    if again || act.raft_mut().is_some_and(|raft| raft.has_ready()) {
        drive(act, ctx);
    }
}
