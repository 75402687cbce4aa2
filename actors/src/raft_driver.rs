//! The Ready loop glue every Raft-owning actor shares: one Ready in flight at a time, its writes
//! (Raft persistence + the apply of committed entries) as one storage write — the apply's
//! records replayable (no WAL) for partitions, everything fsync'd otherwise — then the messages
//! that must wait for durability, compaction, and another pass if more work arrived meanwhile.
//!
//! [`RaftGroup`] is the sans-IO half (what raft-rs wants done); this module is the I/O half for
//! actix actors. An actor implements [`RaftDriven`] (what applying means for it, what to do when
//! an apply is durable, how to fail) and calls [`drive`] whenever its node may have work: after
//! a proposal, an inbound message, a tick.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use actix::prelude::*;
use raft::prelude::Entry;

use crate::error::StorageError;
use crate::raft_group::{persist_writes, RaftGroup, ReadyWork, SnapshotInstall};
use crate::state_machine::Durability;
use crate::storage::{Cf, Replayable, Storage, WriteOp, WriteRequest};

/// How long a Ready whose write found the storage queue full waits before it is offered again.
/// Overload is back-pressure: the group keeps its Ready (and takes no new one) until the queue
/// has room, while new produce requests are refused with 429 at the door.
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(5);
use crate::topic::LogId;
use crate::transport::Transport;

/// Whether a Ready is being written, and whether another pass was asked for meanwhile.
#[derive(Debug, Default, Clone, Copy)]
pub struct Driver {
    busy: bool,
    again: bool,
}

impl Driver {
    /// Whether a Ready is being handled (a snapshot fetched, its write queued or retried):
    /// the applied state in memory is then ahead of what is written.
    pub fn is_busy(&self) -> bool {
        self.busy
    }
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
    /// How the apply's writes become durable: [`Durability::Replayable`] writes to `records`
    /// go without the WAL and the Raft log is compacted only up to
    /// [`Storage::durable_applied`]; [`Durability::Synced`] applies are fsync'd with their Ready.
    fn durability(&self) -> Durability {
        Durability::Synced
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
    /// The storage queue was full: the Ready's write will be offered again shortly.
    fn on_queue_full(&mut self) {}
    /// Code run for this actor panicked: stop it so its supervisor starts a fresh incarnation
    /// from durable state (its in-memory state may be half-changed).
    fn on_panic(&mut self, ctx: &mut Context<Self>, panic: Box<dyn std::any::Any + Send>);
}

/// Run `f` on the actor, containing a panic: the actor is stopped through
/// [`RaftDriven::on_panic`] rather than the panic unwinding into actix, which would drop the
/// actor without `stopped` (so without its supervisor ever hearing of it). None if it panicked.
pub(crate) fn guarded<A: RaftDriven, R>(
    act: &mut A,
    ctx: &mut Context<A>,
    f: impl FnOnce(&mut A, &mut Context<A>) -> R,
) -> Option<R> {
    match catch_unwind(AssertUnwindSafe(|| f(act, ctx))) {
        Ok(result) => Some(result),
        Err(panic) => {
            act.on_panic(ctx, panic);
            None
        }
    }
}

/// A panic's message, for the log.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned())
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
    // The role change is announced in `persisted`, after this Ready's committed entries are
    // applied and answered: a proposal committed in the Ready that also changed the leader is
    // answered with its offset, not failed.
    act.driver().busy = true;
    match work.snapshot.clone() {
        None => write(act, ctx, work, Vec::new()),
        // The snapshot's state must be in hand before anything of this Ready is persisted:
        // raft-rs sends the snapshot's acknowledgement only after `persisted`.
        Some(snapshot) => {
            let install = act.install_snapshot(snapshot);
            ctx.spawn(install.map(move |result, act, ctx| {
                guarded(act, ctx, |act, ctx| match result {
                    Ok(ops) => write(act, ctx, work, ops),
                    Err(e) => act.on_failure(ctx, e),
                });
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
    let mut ops = persist_writes(act.group(), std::mem::take(&mut work.persist));
    ops.extend(snapshot_ops);
    let request = if act.durability() == Durability::Replayable {
        // Logged first (Raft entries, hard state, a snapshot), then the applied records.
        let (records, logged): (Vec<_>, Vec<_>) =
            apply_ops.into_iter().partition(|op| op.cf() == Cf::Records);
        ops.extend(logged);
        WriteRequest {
            logged: ops,
            sync: work.must_sync,
            replayable: Some(Replayable {
                log: act.group(),
                applied_index: act.applied_index(),
                ops: records,
            }),
        }
    } else {
        ops.extend(apply_ops);
        WriteRequest {
            logged: ops,
            sync: true,
            replayable: None,
        }
    };
    if request.is_empty() {
        // Nothing to persist or apply (a heartbeat, a message that changed nothing): the
        // previous Ready is durable already, so this one's messages may go at once. Idle groups
        // then cost the writer thread nothing.
        return persisted(act, work, applied, ctx);
    }
    submit(act, ctx, request, work, applied);
}

/// Queue the Ready's write; on a full queue keep it and offer it again shortly.
fn submit<A: RaftDriven>(
    act: &mut A,
    ctx: &mut Context<A>,
    request: WriteRequest,
    work: ReadyWork,
    applied: A::Applied,
) {
    let durable = match act.storage().try_submit(request) {
        Ok(durable) => durable,
        Err(refused) => {
            return match refused.request {
                Some(request) => {
                    act.on_queue_full();
                    ctx.run_later(QUEUE_FULL_RETRY, move |act, ctx| {
                        guarded(act, ctx, |act, ctx| {
                            submit(act, ctx, *request, work, applied)
                        });
                    });
                }
                None => act.on_failure(ctx, refused.error),
            };
        }
    };
    ctx.spawn(durable.into_actor(act).map(move |result, act, ctx| {
        guarded(act, ctx, |act, ctx| {
            match result.unwrap_or(Err(StorageError::ShutDown)) {
                Ok(()) => persisted(act, work, applied, ctx),
                Err(e) => act.on_failure(ctx, e),
            }
        });
    }));
}

fn persisted<A: RaftDriven>(
    act: &mut A,
    work: ReadyWork,
    applied: A::Applied,
    ctx: &mut Context<A>,
) {
    act.on_durable(applied);
    if work.role_changed {
        act.on_role_change();
    }
    let (group, index) = (act.group(), act.applied_index());
    if let Some(snapshot) = &work.snapshot {
        // Written logged: the snapshot's state survives a crash from now on.
        act.storage().note_durable_applied(group, snapshot.index);
    }
    let durable = if act.durability() == Durability::Replayable {
        act.storage().durable_applied(group)
    } else {
        index
    };
    let Some(raft) = act.raft_mut() else { return };
    let messages = raft.persisted(work).messages;
    let compaction = raft.applied(index, durable);
    act.transport().send(group, messages);
    if let Some(compaction) = compaction {
        // Best effort and unsynced: a compaction failed or lost in a crash only leaves more log
        // behind.
        let _ = act
            .storage()
            .submit_unsynced(persist_writes(group, vec![compaction]));
    }
    let driver = act.driver();
    driver.busy = false;
    let again = std::mem::take(&mut driver.again);
    if again || act.raft_mut().is_some_and(|raft| raft.has_ready()) {
        drive(act, ctx);
    }
}
