//! The broker's one RocksDB, and the only code that writes to it.
//!
//! Why a thread and not an actor: group commit must take *everything* queued, write it as one
//! `WriteBatch` with one fsync, then wake every waiter. An actix mailbox hands a handler one
//! message at a time, so the writer is a dedicated OS thread draining a bounded channel
//! ([`WRITE_QUEUE_CAPACITY`]); each write's submitter gets a oneshot that resolves after the fsync.
//! Writes are applied in submission order, which partition actors rely on (offsets are assigned
//! before the write and become visible in that order).
//!
//! Two kinds of write. *Logged* writes go to the WAL and are fsync'd before they resolve (Raft
//! log, hard state, catalog, snapshots). *Replayable* writes — a partition applying committed
//! Raft entries to `records` — skip the WAL: the entries they apply are already fsync'd in
//! `raft_log`, so after a crash the partition's applied state is whatever the last flush of
//! `records` held, and Raft applies the rest again (offsets are a function of the log, so the
//! replay writes the same bytes). That halves what a record costs in WAL bytes, copies and
//! checksums. The price is a rule: a group's Raft log may only be compacted up to its
//! [`Storage::durable_applied`] index, which moves when a flush of `records` completes. The writer
//! asks a flusher thread for one every [`StorageSettings::flush_bytes`] of replayable writes (or
//! [`StorageSettings::flush_interval`]); the flush covers everything written before it was asked
//! for.
//!
//! Reads do not queue behind writes: RocksDB is thread-safe, so readers use the shared handle from
//! a blocking pool (never the actor or HTTP arbiters).
//!
//! Column families, keys big-endian so iteration is log order:
//! - `records`: (topic_id u32, partition u32, base_offset u64) → Kafka v2 record batch, and
//!   (topic_id, partition) → [`LogState`], written in the same batch as each append. The two share
//!   a column family so that a flush (the only thing that makes replayable writes durable) always
//!   holds a log's records and its state as of one moment. Idempotent producers' state is in
//!   `records` too, under [`producers_prefix`], for the same reason (see there).
//! - `log_state`: where [`LogState`] lived before; emptied into `records` at open.
//! - `metadata`: `topic/{name}` → [`TopicMeta`] (msgpack), `next_topic_id` → u32,
//!   `next_producer_id` → i64
//! - `raft_log`, `raft_state`: Raft entries and hard states (see [`keys`]); `group_offsets`,
//!   `checkpoints`: consumer groups' offsets, stream jobs' checkpoints; `producer_state`: created,
//!   unused (producer state lives with the records).
//!
//! Modules: [`keys`] (column families, keys, the values stored: no I/O), `writer` (the
//! group-commit thread), `flusher` (flushes of `records`), `wal_pages` (WAL page-cache
//! eviction), `reads` (recovery and reads, off the write path).

mod flusher;
pub mod keys;
mod reads;
#[cfg(test)]
mod tests;
mod wal_pages;
mod writer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use tokio::sync::oneshot;

use crate::error::StorageError;
use crate::metrics::Metrics;
use crate::topic::LogId;

pub use keys::*;
pub use reads::{count_keys, leftover_delete, Recovered};

use flusher::Flusher;
use wal_pages::WalPages;
use writer::GroupCommitWriter;

/// Writes waiting for the writer thread before submitters get [`StorageError::QueueFull`]:
/// enough for thousands of concurrent produce requests, small enough to bound memory.
pub const WRITE_QUEUE_CAPACITY: usize = 8192;

/// Most bytes one group commit carries; bounds the latency a huge batch adds to small ones.
pub const GROUP_COMMIT_BYTES_MAX: usize = 32 * 1024 * 1024;
/// Default [`StorageSettings::flush_bytes`].
pub const FLUSH_BYTES: usize = 16 * 1024 * 1024;
/// Default [`StorageSettings::flush_interval`].
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// When replayable writes are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageSettings {
    /// Replayable bytes written before the writer asks for a flush of `records`. Raft logs keep
    /// about this much beyond what is flushed, in memory and in `raft_log`'s memtable.
    pub flush_bytes: usize,
    /// Longest a replayable write waits for a flush when little is written (so quiet
    /// partitions' Raft logs get compacted too).
    pub flush_interval: Duration,
    /// Writes the queue holds before submitters get [`StorageError::QueueFull`]. Produce
    /// requests are refused (429) once it is half full, before they are proposed: the other
    /// half is kept for Raft work already in flight (Readies retry on a full queue rather than
    /// fail, but each retry is latency).
    pub write_queue_capacity: usize,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            flush_bytes: FLUSH_BYTES,
            flush_interval: FLUSH_INTERVAL,
            write_queue_capacity: WRITE_QUEUE_CAPACITY,
        }
    }
}
/// `raft_log`'s memtable: large enough that entries are compacted away (deleted) before it is
/// flushed, so the Raft log's bytes hardly ever reach an SST.
const RAFT_LOG_WRITE_BUFFER_BYTES: usize = 128 << 20;
/// WAL kept before RocksDB flushes the column families that hold its oldest file. The WAL
/// carries only logged writes (Raft entries and state; applied records skip it), and
/// `raft_log` flushes every `RAFT_LOG_WRITE_BUFFER_BYTES`; without this bound the little
/// column families (hard states, catalog) never fill their memtables, pin every WAL file, and
/// the WAL grows to RocksDB's default of four times all write buffers (2 GB per broker under
/// load, all of it replayed after a crash).
const WAL_BYTES_MAX: u64 = 2 * RAFT_LOG_WRITE_BUFFER_BYTES as u64;
/// Batches at least this big are stored in `records`' blob files rather than in its SSTs.
const BLOB_BYTES_MIN: u64 = 1024;
type Waiter = oneshot::Sender<Result<(), StorageError>>;

/// Resolves once a submitted write is durable (or has failed); for a write with a
/// [`Replayable`] part, once that part is in the memtable (readable) and its logged part durable.
pub type Durable = oneshot::Receiver<Result<(), StorageError>>;

/// One atomic write as submitted: `logged` to the WAL (fsync'd if `sync`), then `replayable`.
#[derive(Debug, Default)]
pub struct WriteRequest {
    pub logged: Vec<WriteOp>,
    /// Whether `logged` must be fsync'd before the write resolves (else it is in the WAL, made
    /// durable by the next synced write).
    pub sync: bool,
    pub replayable: Option<Replayable>,
}

impl WriteRequest {
    /// Whether the write changes nothing (a Ready with nothing to persist or apply).
    pub fn is_empty(&self) -> bool {
        self.logged.is_empty() && self.replayable.as_ref().is_none_or(|r| r.ops.is_empty())
    }
}

/// A write the queue did not take, handed back so the submitter can try again later.
#[derive(Debug)]
pub struct Refused {
    pub error: StorageError,
    /// The write, when the queue was only full ([`StorageError::QueueFull`]). Boxed: a
    /// refusal is the rare path, and it keeps the `Result` small on the common one.
    pub request: Option<Box<WriteRequest>>,
}

enum Command {
    Write {
        logged: Vec<WriteOp>,
        /// Whether `logged` must be fsync'd before the write resolves (else it is in the WAL,
        /// made durable by the next synced write).
        sync: bool,
        replayable: Option<Replayable>,
        done: Waiter,
    },
    /// Flush `records` after everything queued before; resolves once the flush is complete.
    Flush {
        done: Waiter,
    },
    Shutdown,
}

impl Command {
    /// A logged write to `records` (a snapshot install, a topic deletion) must not share a group
    /// with replayable writes: the group writes its logged part first, which would reorder them.
    fn logs_records(&self) -> bool {
        matches!(self, Command::Write { logged, .. } if logged.iter().any(|op| op.cf() == Cf::Records))
    }

    fn replays(&self) -> bool {
        matches!(self, Command::Write { replayable: Some(r), .. } if !r.ops.is_empty())
    }
}

/// Cheap-to-clone handle on the broker's RocksDB and its writer thread.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("path", &self.inner.db.path())
            .finish()
    }
}

/// Per log, the highest applied index a completed flush of `records` holds (or that a logged
/// write or recovery made durable). Raft logs are compacted only up to it.
type DurableApplied = Arc<Mutex<HashMap<LogId, u64>>>;

struct Inner {
    db: Arc<DB>,
    queue: SyncSender<Command>,
    /// False once a durable write failed; stays false until restart (fail-stop).
    healthy: Arc<AtomicBool>,
    /// The first failed write's error, for every later refusal to name.
    failure: Arc<Mutex<Option<String>>>,
    durable_applied: DurableApplied,
    /// Commands queued and not yet taken by the writer (std's channel does not say).
    queued: Arc<AtomicUsize>,
    /// [`StorageSettings::write_queue_capacity`].
    capacity: usize,
    /// The writer and flusher threads, taken by [`Storage::shutdown`]. A std Mutex: touched once,
    /// at shutdown.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Inner {
    /// Stop the writer and flusher after everything queued; false if they were already.
    fn stop_threads(&self) -> bool {
        let threads = self
            .threads
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        if threads.is_empty() {
            return false;
        }
        // A blocking send: shutdown waits behind queued writes rather than dropping them. The
        // writer's exit closes the flusher's channel, so both threads end.
        let _ = self.queue.send(Command::Shutdown);
        for thread in threads {
            let _ = thread.join();
        }
        true
    }
}

/// The last handle gone without a [`Storage::shutdown`] (a test, an aborted start): the
/// threads still stop before the database closes. Left running, they could still be closing
/// RocksDB while the process exits and runs its destructors (a heap corruption seen once at
/// the end of a test binary).
impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

impl Storage {
    /// [`Storage::open_with`] the default settings.
    pub fn open(dir: &Path, metrics: Arc<Metrics>) -> Result<Self, StorageError> {
        Self::open_with(dir, metrics, StorageSettings::default())
    }

    /// Open (or create) the RocksDB under `dir` with every column family, and start the writer.
    pub fn open_with(
        dir: &Path,
        metrics: Arc<Metrics>,
        settings: StorageSettings,
    ) -> Result<Self, StorageError> {
        let open_error = |message: String| StorageError::Open {
            path: dir.display().to_string(),
            message,
        };
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_max_background_jobs(2);
        options.set_bytes_per_sync(1 << 20);
        options.set_max_total_wal_size(WAL_BYTES_MAX);
        let families = Cf::ALL.iter().map(|cf| {
            let mut cf_options = Options::default();
            match cf {
                Cf::Records => {
                    cf_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
                    // Flushes are asked for at `flush_bytes`; this is only the backstop.
                    cf_options.set_write_buffer_size(64 << 20);
                    // Batches go to blob files when flushed, and compactions move only keys and
                    // blob references. Every partition appends to its own key range, so each
                    // flushed file overlaps every partition's range below it and leveled
                    // compaction would otherwise rewrite the batches again and again.
                    cf_options.set_enable_blob_files(true);
                    cf_options.set_min_blob_size(BLOB_BYTES_MIN);
                    cf_options.set_blob_compression_type(rocksdb::DBCompressionType::Lz4);
                }
                Cf::RaftLog => cf_options.set_write_buffer_size(RAFT_LOG_WRITE_BUFFER_BYTES),
                _ => {}
            }
            ColumnFamilyDescriptor::new(cf.name(), cf_options)
        });
        let db = DB::open_cf_descriptors(&options, dir, families)
            .map_err(|e| open_error(e.into_string()))?;
        let db = Arc::new(db);
        migrate_log_states(&db)?;
        let capacity = settings.write_queue_capacity.max(1);
        let (queue, receiver) = mpsc::sync_channel(capacity);
        let (flush_requests, flush_receiver) = mpsc::sync_channel(1);
        let healthy = Arc::new(AtomicBool::new(true));
        let failure = Arc::new(Mutex::new(None));
        let durable_applied = DurableApplied::default();
        let queued = Arc::new(AtomicUsize::new(0));
        let flusher = Flusher {
            db: db.clone(),
            requests: flush_receiver,
            durable_applied: durable_applied.clone(),
            metrics: metrics.clone(),
        };
        let writer = GroupCommitWriter {
            db: db.clone(),
            receiver,
            queued: queued.clone(),
            healthy: healthy.clone(),
            failure: failure.clone(),
            metrics,
            settings,
            flush_requests,
            unflushed: HashMap::new(),
            unflushed_bytes: 0,
            unflushed_since: None,
            wal_pages: WalPages::new(dir.to_path_buf()),
        };
        let spawn = |name: &str, run: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(run)
                .map_err(|e| open_error(e.to_string()))
        };
        let threads = vec![
            spawn("pubg1-storage-writer", Box::new(move || writer.run()))?,
            spawn("pubg1-storage-flusher", Box::new(move || flusher.run()))?,
        ];
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                queue,
                healthy,
                failure,
                durable_applied,
                queued,
                capacity,
                threads: Mutex::new(threads),
            }),
        })
    }

    /// Queue an atomic write; the receiver resolves once it is fsync'd (or failed).
    ///
    /// Never blocks: a full queue is [`StorageError::QueueFull`], so callers can shed load.
    pub fn submit(&self, ops: Vec<WriteOp>) -> Result<Durable, StorageError> {
        self.send(ops, true, None)
    }

    /// Queue an atomic write to the WAL that need not be durable yet (a Raft log compaction):
    /// the next synced write makes it durable, and a crash before that loses only a suffix of
    /// such writes.
    pub fn submit_unsynced(&self, ops: Vec<WriteOp>) -> Result<Durable, StorageError> {
        self.send(ops, false, None)
    }

    /// Queue `logged` (to the WAL, fsync'd if `sync`) and then `replayable` (no WAL; see the
    /// module docs) as one unit, in this order. Resolves once both are written.
    pub fn submit_replayable(
        &self,
        logged: Vec<WriteOp>,
        sync: bool,
        replayable: Replayable,
    ) -> Result<Durable, StorageError> {
        debug_assert!(replayable.ops.iter().all(|op| op.cf() == Cf::Records));
        self.send(logged, sync, Some(replayable))
    }

    fn send(
        &self,
        logged: Vec<WriteOp>,
        sync: bool,
        replayable: Option<Replayable>,
    ) -> Result<Durable, StorageError> {
        let request = WriteRequest {
            logged,
            sync,
            replayable,
        };
        self.try_submit(request).map_err(|refused| refused.error)
    }

    /// Queue `request`; a full queue hands it back (with [`StorageError::QueueFull`]) so the
    /// caller can retry it later instead of rebuilding it.
    pub fn try_submit(&self, request: WriteRequest) -> Result<Durable, Refused> {
        if !self.is_healthy() {
            return Err(Refused {
                error: self.failed(),
                request: None,
            });
        }
        debug_assert!(request
            .replayable
            .as_ref()
            .is_none_or(|r| r.ops.iter().all(|op| op.cf() == Cf::Records)));
        let (done, receiver) = oneshot::channel();
        let command = Command::Write {
            logged: request.logged,
            sync: request.sync,
            replayable: request.replayable,
            done,
        };
        // Counted before the send so the writer's decrement can never run first.
        self.inner.queued.fetch_add(1, Ordering::AcqRel);
        let refused = |error, request| {
            self.inner.queued.fetch_sub(1, Ordering::AcqRel);
            Err(Refused { error, request })
        };
        match self.inner.queue.try_send(command) {
            Ok(()) => Ok(receiver),
            Err(TrySendError::Full(Command::Write {
                logged,
                sync,
                replayable,
                ..
            })) => refused(
                StorageError::QueueFull {
                    capacity: self.inner.capacity,
                },
                Some(Box::new(WriteRequest {
                    logged,
                    sync,
                    replayable,
                })),
            ),
            Err(TrySendError::Full(_)) => refused(
                StorageError::QueueFull {
                    capacity: self.inner.capacity,
                },
                None,
            ),
            Err(TrySendError::Disconnected(_)) => refused(StorageError::ShutDown, None),
        }
    }

    /// Writes queued and not yet taken by the writer thread.
    pub fn queue_depth(&self) -> usize {
        self.inner.queued.load(Ordering::Acquire)
    }

    /// Whether the write queue is so full that new produce requests should be refused (HTTP
    /// 429) rather than queued: the rest of the queue is kept for the Raft work already in
    /// flight, so overload slows producers down instead of failing partitions.
    pub fn is_congested(&self) -> bool {
        self.queue_depth() >= self.inner.capacity / 2
    }

    /// Flush `records` after every write queued before this call, and raise the durable
    /// applied index of every log those writes applied. Resolves once the flush is complete:
    /// from then on what those writes applied survives a crash.
    pub async fn flush_records(&self) -> Result<(), StorageError> {
        if !self.is_healthy() {
            return Err(self.failed());
        }
        let (done, receiver) = oneshot::channel();
        self.inner.queued.fetch_add(1, Ordering::AcqRel);
        // A blocking send: a flush is rare (snapshot installs) and must not be refused.
        let queue = self.inner.queue.clone();
        let sent = tokio::task::spawn_blocking(move || queue.send(Command::Flush { done }))
            .await
            .map_err(|_| StorageError::ShutDown)?;
        if sent.is_err() {
            self.inner.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(StorageError::ShutDown);
        }
        receiver.await.map_err(|_| StorageError::ShutDown)?
    }

    /// Write `ops` atomically and durably.
    pub async fn write(&self, ops: Vec<WriteOp>) -> Result<(), StorageError> {
        self.submit(ops)?
            .await
            .map_err(|_| StorageError::ShutDown)?
    }

    /// Resolves once every write submitted before it is written (or failed).
    pub async fn barrier(&self) -> Result<(), StorageError> {
        self.write(Vec::new()).await
    }

    /// [`Storage::barrier`], waiting for room while the queue is full (recovery and retirement
    /// must not fail, or stop for good, because the broker is busy).
    pub async fn barrier_patiently(&self) -> Result<(), StorageError> {
        loop {
            match self.barrier().await {
                Err(StorageError::QueueFull { .. }) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                result => return result,
            }
        }
    }

    /// The highest applied index of `log` that survives a crash: Raft may compact its log up to
    /// here and no further (entries above it may have to be applied again).
    pub fn durable_applied(&self, log: LogId) -> u64 {
        self.inner
            .durable_applied
            .lock()
            .map(|map| map.get(&log).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// `log` is known durable up to `applied_index` (written logged, e.g. a snapshot install).
    pub fn note_durable_applied(&self, log: LogId, applied_index: u64) {
        if let Ok(mut map) = self.inner.durable_applied.lock() {
            raise(&mut map, log, applied_index);
        }
    }

    /// A replica recovered `log` at `applied_index`. Only the first recovery since RocksDB
    /// opened reads what is on disk: a later one (an actor restarted in this process) reads
    /// through the memtable, which holds applies no flush holds yet, so it must not raise the
    /// compaction cap (a kill -9 would then leave the log compacted past what survived).
    pub fn note_recovered(&self, log: LogId, applied_index: u64) {
        if let Ok(mut map) = self.inner.durable_applied.lock() {
            map.entry(log).or_insert(applied_index);
        }
    }

    /// False after a failed durable write: the broker must be restarted (readiness reports it).
    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Acquire)
    }

    /// The error every write gets once storage has failed, naming the first failure.
    pub fn failed(&self) -> StorageError {
        failed(&self.inner.failure)
    }

    /// Finish queued writes, stop the writer and flush memtables. Idempotent.
    pub fn shutdown(&self) {
        if !self.inner.stop_threads() {
            return;
        }
        // Replayable writes live only in memtables until flushed: this makes them durable.
        // Every column family, not only the default one; the logged ones are in the WAL anyway,
        // but a flushed shutdown leaves no WAL to replay at the next start.
        for cf in Cf::ALL {
            let flushed = self.cf(cf).and_then(|handle| {
                self.inner
                    .db
                    .flush_cf(handle)
                    .map_err(|e| StorageError::rocks("flush", e))
            });
            if let Err(e) = flushed {
                tracing::error!(column_family = cf.name(), error = %e, "flushing at shutdown failed");
            }
        }
        // Stop compactions and flushes before the process exits: RocksDB's background
        // threads outliving its static state at exit crash the process (seen as SIGSEGV).
        self.inner.db.cancel_all_background_work(true);
    }

    fn cf(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily, StorageError> {
        cf_handle(&self.inner.db, cf)
    }
}

fn failed(failure: &Mutex<Option<String>>) -> StorageError {
    let reason = failure
        .lock()
        .ok()
        .and_then(|f| f.clone())
        .unwrap_or_else(|| "a write failed".into());
    StorageError::Failed { reason }
}

fn cf_handle(db: &DB, cf: Cf) -> Result<&rocksdb::ColumnFamily, StorageError> {
    db.cf_handle(cf.name())
        .ok_or_else(|| StorageError::Corrupt {
            what: cf.name().into(),
            message: "missing column family".into(),
        })
}

/// Add `op` to `batch`.
fn put(db: &DB, batch: &mut WriteBatch, op: &WriteOp) -> Result<(), StorageError> {
    let handle = cf_handle(db, op.cf())?;
    match op {
        WriteOp::Put { key, value, .. } => batch.put_cf(handle, key, value),
        WriteOp::Delete { key, .. } => batch.delete_cf(handle, key),
        WriteOp::DeleteRange { from, to, .. } => batch.delete_range_cf(handle, from, to),
    }
    Ok(())
}

fn corrupt(log: LogId, error: crate::error::BatchError) -> StorageError {
    StorageError::Corrupt {
        what: format!("log {}/{}", log.topic_id, log.partition),
        message: error.to_string(),
    }
}

fn raise(map: &mut HashMap<LogId, u64>, log: LogId, index: u64) {
    let entry = map.entry(log).or_insert(index);
    *entry = (*entry).max(index);
}

/// Move log states from the `log_state` column family (where versions before replayable writes
/// kept them) to `records`, in one synced write. A no-op on a data dir already migrated.
fn migrate_log_states(db: &DB) -> Result<(), StorageError> {
    let (old, records) = (cf_handle(db, Cf::LogState)?, cf_handle(db, Cf::Records)?);
    let mut batch = WriteBatch::default();
    for item in db.iterator_cf(old, IteratorMode::Start) {
        let (key, value) = item.map_err(|e| StorageError::rocks("iterate", e))?;
        batch.put_cf(records, &key, &value);
        batch.delete_cf(old, &key);
    }
    if batch.is_empty() {
        return Ok(());
    }
    tracing::info!(logs = batch.len() / 2, "moving log states into records");
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    db.write_opt(batch, &sync)
        .map_err(|e| StorageError::rocks("write", e))
}
