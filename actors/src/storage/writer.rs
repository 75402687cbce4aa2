//! The group-commit writer thread: drains the queue, writes each group's logged part with one
//! fsync and its replayable part without the WAL, wakes every waiter, and asks for flushes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rocksdb::{WriteBatch, WriteOptions, DB};

use super::flusher::FlushRequest;
use super::wal_pages::WalPages;
use super::{
    failed, put, raise, Command, StorageSettings, Waiter, WriteOp, GROUP_COMMIT_BYTES_MAX,
};
use crate::error::StorageError;
use crate::metrics::Metrics;
use crate::topic::LogId;

/// The writer thread: drain the queue; per group one `WriteBatch` with one fsync for the logged
/// writes, then one WAL-less `WriteBatch` for the replayable ones; wake every waiter.
pub(super) struct GroupCommitWriter {
    pub(super) db: Arc<DB>,
    pub(super) receiver: Receiver<Command>,
    /// [`Inner::queued`]: decremented as commands are taken.
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) healthy: Arc<AtomicBool>,
    pub(super) failure: Arc<Mutex<Option<String>>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) settings: StorageSettings,
    pub(super) flush_requests: SyncSender<FlushRequest>,
    /// Applied indexes written replayably since the last flush request.
    pub(super) unflushed: HashMap<LogId, u64>,
    pub(super) unflushed_bytes: usize,
    pub(super) unflushed_since: Option<Instant>,
    pub(super) wal_pages: WalPages,
}

/// One group commit being assembled.
#[derive(Default)]
pub(super) struct Group {
    pub(super) logged: WriteBatch,
    pub(super) replayable: WriteBatch,
    pub(super) waiters: Vec<Waiter>,
    /// [`Command::Flush`]es, answered once the flush after this group completes.
    pub(super) flush_waiters: Vec<Waiter>,
    pub(super) applied: Vec<(LogId, u64)>,
    pub(super) logged_bytes: usize,
    pub(super) replayable_bytes: usize,
    /// Some write in the group needs its logged part fsync'd.
    pub(super) sync: bool,
    /// Some write in the group has a replayable part (from its `BatchSizes`).
    pub(super) replays: bool,
}

impl Group {
    pub(super) fn with_capacity(size: &BatchSizes) -> Self {
        Self {
            logged: WriteBatch::with_capacity_bytes(size.logged),
            replayable: WriteBatch::with_capacity_bytes(size.replayable),
            replays: size.replays,
            ..Self::default()
        }
    }
}

/// The commands of a group being taken from the queue: their `WriteBatch` bytes and what they
/// write.
#[derive(Default)]
pub(super) struct BatchSizes {
    pub(super) logged: usize,
    pub(super) replayable: usize,
    pub(super) logs_records: bool,
    pub(super) replays: bool,
}

impl BatchSizes {
    /// A `WriteBatch`'s header, and the most an op adds besides its key and value (type, column
    /// family and lengths as varints).
    pub(super) const HEADER: usize = 12;
    pub(super) const OP_OVERHEAD: usize = 16;

    pub(super) fn add(&mut self, command: &Command) {
        self.logs_records |= command.logs_records();
        self.replays |= command.replays();
        let Command::Write {
            logged, replayable, ..
        } = command
        else {
            return;
        };
        let sum = |ops: &[WriteOp]| -> usize {
            ops.iter().map(|op| op.bytes() + Self::OP_OVERHEAD).sum()
        };
        self.logged = self.logged.max(Self::HEADER) + sum(logged);
        if let Some(replayable) = replayable {
            self.replayable = self.replayable.max(Self::HEADER) + sum(&replayable.ops);
        }
    }

    pub(super) fn bytes(&self) -> usize {
        self.logged + self.replayable
    }

    /// Whether `command` may join without reordering it against what is already in the group.
    pub(super) fn admits(&self, command: &Command) -> bool {
        !(self.replays && command.logs_records() || self.logs_records && command.replays())
    }
}

impl GroupCommitWriter {
    pub(super) fn run(mut self) {
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        let unsynced = WriteOptions::default();
        let mut no_wal = WriteOptions::default();
        no_wal.disable_wal(true);
        let mut carried: Option<Command> = None;
        loop {
            let first = match carried.take() {
                Some(command) => command,
                None => match self.next_command() {
                    Some(command) => command,
                    None => return,
                },
            };
            // Take the group's commands first, so its two WriteBatches are allocated at their
            // final size (grown by doubling, their copying was a third of this thread's).
            let mut size = BatchSizes::default();
            size.add(&first);
            let mut commands = vec![first];
            while size.bytes() < GROUP_COMMIT_BYTES_MAX
                && !matches!(
                    commands.last(),
                    Some(Command::Shutdown | Command::Flush { .. })
                )
            {
                match self.take() {
                    Some(command) if size.admits(&command) => {
                        size.add(&command);
                        commands.push(command);
                    }
                    Some(command) => {
                        carried = Some(command);
                        break;
                    }
                    None => break,
                }
            }
            let mut group = Group::with_capacity(&size);
            let mut shutdown = false;
            for command in commands {
                shutdown |= self.add(command, &mut group);
            }
            let logged = if group.sync { &sync } else { &unsynced };
            let flush_waiters = std::mem::take(&mut group.flush_waiters);
            self.commit(group, logged, &no_wal);
            if flush_waiters.is_empty() {
                self.maybe_request_flush();
            } else {
                self.request_flush_now(flush_waiters);
            }
            if shutdown {
                return;
            }
        }
    }

    /// The next command, waking up meanwhile to ask for a flush when one is due; None once every
    /// `Storage` handle is gone.
    pub(super) fn next_command(&mut self) -> Option<Command> {
        loop {
            let Some(since) = self.unflushed_since else {
                let command = self.receiver.recv().ok();
                self.queued
                    .fetch_sub(usize::from(command.is_some()), Ordering::AcqRel);
                return command;
            };
            // At least a little: a flush still running makes a due request wait for it.
            let wait = self
                .settings
                .flush_interval
                .saturating_sub(since.elapsed())
                .max(Duration::from_millis(10));
            match self.receiver.recv_timeout(wait) {
                Ok(command) => {
                    self.queued.fetch_sub(1, Ordering::AcqRel);
                    return Some(command);
                }
                Err(RecvTimeoutError::Timeout) => self.maybe_request_flush(),
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// The next queued command, if any, without waiting.
    pub(super) fn take(&self) -> Option<Command> {
        let command = self.receiver.try_recv().ok();
        self.queued
            .fetch_sub(usize::from(command.is_some()), Ordering::AcqRel);
        command
    }

    /// Add one command to the group; true if it asks the writer to stop after this group.
    pub(super) fn add(&self, command: Command, group: &mut Group) -> bool {
        match command {
            Command::Shutdown => true,
            Command::Flush { done } => {
                group.flush_waiters.push(done);
                false
            }
            Command::Write {
                logged,
                sync,
                replayable,
                done,
            } => {
                group.sync |= sync;
                for op in &logged {
                    group.logged_bytes += op.bytes();
                    self.put(&mut group.logged, op);
                }
                if let Some(replayable) = replayable {
                    for op in &replayable.ops {
                        group.replayable_bytes += op.bytes();
                        self.put(&mut group.replayable, op);
                    }
                    group
                        .applied
                        .push((replayable.log, replayable.applied_index));
                }
                group.waiters.push(done);
                false
            }
        }
    }

    pub(super) fn put(&self, batch: &mut WriteBatch, op: &WriteOp) {
        // A missing column family is impossible after open; an op on one would be dropped, so
        // fail the whole group instead.
        if put(&self.db, batch, op).is_err() {
            self.healthy.store(false, Ordering::Release);
        }
    }

    pub(super) fn commit(&mut self, group: Group, logged: &WriteOptions, no_wal: &WriteOptions) {
        if group.waiters.is_empty() {
            return;
        }
        let synced = group.sync;
        let result = self
            .write(
                group.logged,
                group.logged_bytes,
                group.waiters.len(),
                logged,
                synced,
            )
            .and_then(|()| {
                // After the logged part. The entries these applies come from were fsync'd by an
                // earlier Ready (raft-rs hands out only persisted entries to apply); a commit
                // index written unsynced here may be lost, and restore raises it to `applied`.
                if group.replayable.is_empty() || !self.healthy.load(Ordering::Acquire) {
                    return Ok(());
                }
                self.db
                    .write_opt(group.replayable, no_wal)
                    .map_err(|e| self.fail(e))
            });
        if result.is_ok() && group.replays {
            self.unflushed_bytes += group.replayable_bytes;
            self.unflushed_since.get_or_insert_with(Instant::now);
            for (log, index) in group.applied {
                raise(&mut self.unflushed, log, index);
            }
        }
        for waiter in group.waiters {
            let _ = waiter.send(result.clone());
        }
    }

    pub(super) fn write(
        &mut self,
        batch: WriteBatch,
        bytes: usize,
        writes: usize,
        options: &WriteOptions,
        synced: bool,
    ) -> Result<(), StorageError> {
        if !self.healthy.load(Ordering::Acquire) {
            return Err(failed(&self.failure));
        }
        if batch.is_empty() {
            return Ok(()); // barriers only: everything before them is already written
        }
        let started = Instant::now();
        let written = self.db.write_opt(batch, options);
        if synced {
            self.metrics
                .storage_fsync_seconds
                .observe(started.elapsed().as_secs_f64());
            self.metrics
                .storage_group_commit_writes
                .observe(writes as f64);
            self.metrics
                .storage_group_commit_bytes
                .observe(bytes as f64);
            if written.is_ok() {
                let evicted = self.wal_pages.written(bytes);
                self.metrics.storage_wal_evicted_bytes_total.inc_by(evicted);
            }
        }
        written.map_err(|e| self.fail(e))
    }

    pub(super) fn fail(&self, e: rocksdb::Error) -> StorageError {
        tracing::error!(error = %e, "write failed; storage now fails closed");
        if let Ok(mut failure) = self.failure.lock() {
            failure.get_or_insert_with(|| e.to_string());
        }
        self.healthy.store(false, Ordering::Release);
        self.metrics.storage_write_errors_total.inc();
        StorageError::rocks("write", e)
    }

    /// Ask the flusher to flush `records` once enough replayable bytes (or time) have gathered.
    /// A flush still running means this one waits for the next call.
    pub(super) fn maybe_request_flush(&mut self) {
        let due = self.unflushed_bytes >= self.settings.flush_bytes
            || self
                .unflushed_since
                .is_some_and(|since| since.elapsed() >= self.settings.flush_interval);
        if !due {
            return;
        }
        let request = FlushRequest {
            applied: std::mem::take(&mut self.unflushed),
            waiters: Vec::new(),
        };
        match self.flush_requests.try_send(request) {
            Ok(()) => {
                self.unflushed_bytes = 0;
                self.unflushed_since = None;
            }
            Err(TrySendError::Full(back) | TrySendError::Disconnected(back)) => {
                self.unflushed = back.applied;
            }
        }
    }

    /// A flush was asked for ([`Storage::flush_records`]): hand it to the flusher now, waiting
    /// for a flush still running (the asker waits for it anyway).
    pub(super) fn request_flush_now(&mut self, waiters: Vec<Waiter>) {
        let request = FlushRequest {
            applied: std::mem::take(&mut self.unflushed),
            waiters,
        };
        self.unflushed_bytes = 0;
        self.unflushed_since = None;
        if let Err(mpsc::SendError(request)) = self.flush_requests.send(request) {
            for waiter in request.waiters {
                let _ = waiter.send(Err(StorageError::ShutDown));
            }
        }
    }
}
