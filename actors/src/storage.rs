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
//!   holds a log's records and its state as of one moment.
//! - `log_state`: where [`LogState`] lived before; emptied into `records` at open.
//! - `metadata`: `topic/{name}` → [`TopicMeta`] (msgpack), `next_topic_id` → u32
//! - `raft_log`, `raft_state`, `group_offsets`, `checkpoints`, `producer_state`: reserved for
//!   replication, consumer groups, stream jobs and idempotent producers.

use std::collections::HashMap;
use std::ffi::OsString;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use tokio::sync::oneshot;

use crate::batch::{self, BatchHeader};
use crate::error::StorageError;
use crate::metrics::Metrics;
use crate::raft_group::{self, compacted_key, hard_state_key, raft_entry_key, PersistedRaft};
use crate::topic::{LogId, TopicMeta};

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
/// Bytes of a key in `records` that holds a batch; a log's state key is its 8-byte prefix.
const RECORD_KEY_BYTES: usize = 16;

/// The column families of a broker's RocksDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cf {
    Records,
    LogState,
    Metadata,
    RaftLog,
    RaftState,
    GroupOffsets,
    Checkpoints,
    ProducerState,
}

impl Cf {
    pub const ALL: [Cf; 8] = [
        Cf::Records,
        Cf::LogState,
        Cf::Metadata,
        Cf::RaftLog,
        Cf::RaftState,
        Cf::GroupOffsets,
        Cf::Checkpoints,
        Cf::ProducerState,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Records => "records",
            Cf::LogState => "log_state",
            Cf::Metadata => "metadata",
            Cf::RaftLog => "raft_log",
            Cf::RaftState => "raft_state",
            Cf::GroupOffsets => "group_offsets",
            Cf::Checkpoints => "checkpoints",
            Cf::ProducerState => "producer_state",
        }
    }
}

/// One mutation inside an atomic, durable write.
#[derive(Debug, Clone)]
pub enum WriteOp {
    Put {
        cf: Cf,
        key: Vec<u8>,
        value: Bytes,
    },
    Delete {
        cf: Cf,
        key: Vec<u8>,
    },
    /// Deletes keys in `[from, to)`.
    DeleteRange {
        cf: Cf,
        from: Vec<u8>,
        to: Vec<u8>,
    },
}

impl WriteOp {
    fn bytes(&self) -> usize {
        match self {
            WriteOp::Put { key, value, .. } => key.len() + value.len(),
            WriteOp::Delete { key, .. } => key.len(),
            WriteOp::DeleteRange { from, to, .. } => from.len() + to.len(),
        }
    }

    pub fn cf(&self) -> Cf {
        match self {
            WriteOp::Put { cf, .. }
            | WriteOp::Delete { cf, .. }
            | WriteOp::DeleteRange { cf, .. } => *cf,
        }
    }
}

/// Writes to one log's `records` that Raft can replay: they make the log's state the one at
/// `applied_index` and are durable once a flush of `records` covers them (see the module docs).
#[derive(Debug, Clone)]
pub struct Replayable {
    pub log: LogId,
    /// The Raft index of the last entry these writes apply (or had applied, for retention).
    pub applied_index: u64,
    /// Only `Cf::Records` operations.
    pub ops: Vec<WriteOp>,
}

/// What a partition's log looks like durably; written atomically with every change to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogState {
    /// First offset still in the log (retention moves it forward).
    pub log_start_offset: u64,
    /// Offset the next appended record gets; never decreases, so offsets are never reused.
    pub next_offset: u64,
    /// Bytes of record batches between `log_start_offset` and `next_offset`.
    pub size_bytes: u64,
    /// Index of the last Raft entry applied to this log; replay after a restart starts above it,
    /// so no entry is applied twice.
    pub applied_index: u64,
}

impl LogState {
    const ENCODED_BYTES: usize = 32;

    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(Self::ENCODED_BYTES);
        out.extend_from_slice(&self.log_start_offset.to_be_bytes());
        out.extend_from_slice(&self.next_offset.to_be_bytes());
        out.extend_from_slice(&self.size_bytes.to_be_bytes());
        out.extend_from_slice(&self.applied_index.to_be_bytes());
        Bytes::from(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StorageError> {
        if bytes.len() != Self::ENCODED_BYTES {
            return Err(StorageError::Corrupt {
                what: "log_state".into(),
                message: format!("{} bytes", bytes.len()),
            });
        }
        let word =
            |i: usize| u64::from_be_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        Ok(Self {
            log_start_offset: word(0),
            next_offset: word(1),
            size_bytes: word(2),
            applied_index: word(3),
        })
    }
}

/// Key of the batch starting at `offset` in `log`.
pub fn record_key(log: LogId, offset: u64) -> Vec<u8> {
    let mut key = log_key(log);
    key.extend_from_slice(&offset.to_be_bytes());
    key
}

/// The write that stores `state` as `log`'s, next to its batches in `records`.
pub fn log_state_op(log: LogId, state: &LogState) -> WriteOp {
    WriteOp::Put {
        cf: Cf::Records,
        key: log_key(log),
        value: state.encode(),
    }
}

/// Key of `log`'s [`LogState`] in `records`; also the prefix of all its batches' keys there (so
/// it sorts before them).
pub fn log_key(log: LogId) -> Vec<u8> {
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&log.topic_id.to_be_bytes());
    key.extend_from_slice(&log.partition.to_be_bytes());
    key
}

/// The `[from, to)` key range holding every log of a topic (batches and states) in `records`.
pub fn topic_key_range(topic_id: u32) -> (Vec<u8>, Vec<u8>) {
    (
        topic_id.to_be_bytes().to_vec(),
        (u64::from(topic_id) + 1).to_be_bytes()[4..].to_vec(),
    )
}

/// The writes that remove every key of topic `topic_id` (batches, log states, Raft logs and
/// states) from every column family that holds them.
pub fn topic_delete_ops(topic_id: u32) -> Vec<WriteOp> {
    let (from, to) = topic_key_range(topic_id);
    [Cf::Records, Cf::LogState, Cf::RaftLog, Cf::RaftState]
        .into_iter()
        .map(|cf| WriteOp::DeleteRange {
            cf,
            from: from.clone(),
            to: to.clone(),
        })
        .collect()
}

/// Keys of `cf` in `[from, to)` (tests and diagnostics). Blocking.
pub fn count_keys(
    storage: &Storage,
    cf: Cf,
    from: &[u8],
    to: &[u8],
) -> Result<usize, StorageError> {
    let handle = storage.cf(cf)?;
    let mut count = 0;
    for item in storage
        .inner
        .db
        .iterator_cf(handle, IteratorMode::From(from, Direction::Forward))
    {
        let (key, _) = item.map_err(|e| StorageError::rocks("iterate", e))?;
        if key.as_ref() >= to {
            break;
        }
        count += 1;
    }
    Ok(count)
}

pub fn topic_meta_key(name: &str) -> Vec<u8> {
    format!("topic/{name}").into_bytes()
}
pub const NEXT_TOPIC_ID_KEY: &[u8] = b"next_topic_id";
/// Index of the last metadata-group entry applied to the catalog.
pub const METADATA_APPLIED_KEY: &[u8] = b"applied_index";

/// The applied topic catalog, as read at start-up.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub topics: Vec<TopicMeta>,
    pub next_topic_id: u32,
    pub applied_index: u64,
}
pub const TOPIC_META_PREFIX: &[u8] = b"topic/";

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
        let threads = self
            .inner
            .threads
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        if threads.is_empty() {
            return;
        }
        // A blocking send: shutdown waits behind queued writes rather than dropping them. The
        // writer's exit closes the flusher's channel, so both threads end.
        let _ = self.inner.queue.send(Command::Shutdown);
        for thread in threads {
            let _ = thread.join();
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

    /// The state of `log` (the default for a log never written), proven against its batches:
    /// they must run from the log start to the state's next offset without a gap or an overlap
    /// (a replica must never serve, or lead with, a log with a hole). Reads every batch header:
    /// blocking, call from a blocking context or at start-up.
    pub fn recover_log(&self, log: LogId) -> Result<LogState, StorageError> {
        let mut state = self.read_log_state(log)?;
        let corrupt = |message: String| StorageError::Corrupt {
            what: format!("log {}/{}", log.topic_id, log.partition),
            message,
        };
        let mut expected = state.log_start_offset;
        let mut size = 0u64;
        let mut hole = None;
        self.scan_headers(log, state.log_start_offset, |header| {
            if header.base_offset != expected {
                hole = Some((expected, header.base_offset));
                return false;
            }
            expected = header.next_offset();
            size += header.size_bytes;
            true
        })?;
        if let Some((wanted, found)) = hole {
            return Err(corrupt(format!(
                "{state:?}: the batch after offset {wanted} starts at {found}"
            )));
        }
        if expected != state.next_offset {
            return Err(corrupt(format!(
                "{state:?}: its batches end at offset {expected}"
            )));
        }
        if size != state.size_bytes {
            // Bookkeeping only (retention's byte count); the offsets are proven. Take the truth.
            tracing::warn!(log = ?log, stored = state.size_bytes, counted = size, "log size corrected at recovery");
            state.size_bytes = size;
        }
        Ok(state)
    }

    /// `log`'s stored state, cross-checked against its last batch only (cheap). Blocking.
    pub fn read_log_state(&self, log: LogId) -> Result<LogState, StorageError> {
        let state = match self
            .inner
            .db
            .get_cf(self.cf(Cf::Records)?, log_key(log))
            .map_err(|e| StorageError::rocks("get", e))?
        {
            Some(bytes) => LogState::decode(&bytes)?,
            None => LogState::default(),
        };
        let last = self.last_batch(log)?;
        let consistent = match last {
            Some(header) => {
                header.next_offset() == state.next_offset
                    && header.base_offset >= state.log_start_offset
            }
            None => state.log_start_offset == state.next_offset && state.size_bytes == 0,
        };
        if !consistent {
            return Err(StorageError::Corrupt {
                what: format!("log {}/{}", log.topic_id, log.partition),
                message: format!("log_state {state:?} disagrees with last batch {last:?}"),
            });
        }
        Ok(state)
    }

    fn last_batch(&self, log: LogId) -> Result<Option<BatchHeader>, StorageError> {
        let upper = record_key(log, u64::MAX);
        let mut iter = self.inner.db.iterator_cf(
            self.cf(Cf::Records)?,
            IteratorMode::From(&upper, Direction::Reverse),
        );
        match iter.next() {
            Some(Ok((key, value))) if is_batch_key(&key, &log_key(log)) => Ok(Some(
                batch::parse_header(&value).map_err(|e| corrupt(log, e))?,
            )),
            Some(Err(e)) => Err(StorageError::rocks("iterate", e)),
            _ => Ok(None),
        }
    }

    /// Stored batches of `log` that hold offsets in `[from, below)`, in order, stopping once
    /// `bytes_max` is reached (the first batch is always included so a large batch cannot stall a
    /// reader). Each batch's header and CRC are checked. Blocking.
    pub fn read_batches(
        &self,
        log: LogId,
        from: u64,
        below: u64,
        bytes_max: usize,
    ) -> Result<Vec<Bytes>, StorageError> {
        let cf = self.cf(Cf::Records)?;
        let prefix = log_key(log);
        let mut out = Vec::new();
        let mut total = 0usize;
        // The batch holding `from` starts at or before it: seek backwards once, then go forward.
        let start = {
            let mut back = self.inner.db.iterator_cf(
                cf,
                IteratorMode::From(&record_key(log, from), Direction::Reverse),
            );
            match back.next() {
                Some(Ok((key, _))) if is_batch_key(&key, &prefix) => key.to_vec(),
                Some(Err(e)) => return Err(StorageError::rocks("iterate", e)),
                _ => record_key(log, from),
            }
        };
        for item in self
            .inner
            .db
            .iterator_cf(cf, IteratorMode::From(&start, Direction::Forward))
        {
            let (key, value) = item.map_err(|e| StorageError::rocks("iterate", e))?;
            if !key.starts_with(&prefix) {
                break;
            }
            let header = batch::parse_header(&value).map_err(|e| corrupt(log, e))?;
            if header.base_offset >= below {
                break;
            }
            if header.next_offset() <= from {
                continue;
            }
            total += value.len();
            out.push(Bytes::from(value.into_vec()));
            if total >= bytes_max {
                break;
            }
        }
        Ok(out)
    }

    /// Headers of `log`'s batches from `from` (inclusive) while `keep_going` says so. Blocking.
    pub fn scan_headers(
        &self,
        log: LogId,
        from: u64,
        mut keep_going: impl FnMut(&BatchHeader) -> bool,
    ) -> Result<(), StorageError> {
        let cf = self.cf(Cf::Records)?;
        let prefix = log_key(log);
        for item in self.inner.db.iterator_cf(
            cf,
            IteratorMode::From(&record_key(log, from), Direction::Forward),
        ) {
            let (key, value) = item.map_err(|e| StorageError::rocks("iterate", e))?;
            if !key.starts_with(&prefix) {
                break;
            }
            let header = batch::parse_header(&value).map_err(|e| corrupt(log, e))?;
            if !keep_going(&header) {
                break;
            }
        }
        Ok(())
    }

    /// Ask RocksDB to reclaim the space of a deleted key range now rather than eventually.
    pub fn compact_records(&self, from: &[u8], to: &[u8]) -> Result<(), StorageError> {
        self.inner
            .db
            .compact_range_cf(self.cf(Cf::Records)?, Some(from), Some(to));
        Ok(())
    }

    /// What `raft_log` and `raft_state` hold for `group`. Blocking; used when a group starts.
    pub fn load_raft(&self, group: LogId) -> Result<PersistedRaft, StorageError> {
        let state_cf = self.cf(Cf::RaftState)?;
        let get = |key: Vec<u8>| {
            self.inner
                .db
                .get_cf(state_cf, key)
                .map_err(|e| StorageError::rocks("get", e))
        };
        let mut persisted = PersistedRaft::default();
        if let Some(bytes) = get(hard_state_key(group))? {
            persisted.hard_state = raft_group::decode(&bytes, "raft hard state")?;
        }
        if let Some(bytes) = get(compacted_key(group))? {
            persisted.compacted = raft_group::decode_compacted(&bytes)?;
        }
        let prefix = log_key(group);
        let start = raft_entry_key(group, 0);
        let log_cf = self.cf(Cf::RaftLog)?;
        for item in self
            .inner
            .db
            .iterator_cf(log_cf, IteratorMode::From(&start, Direction::Forward))
        {
            let (key, value) = item.map_err(|e| StorageError::rocks("iterate", e))?;
            if !key.starts_with(&prefix) {
                break;
            }
            persisted
                .entries
                .push(raft_group::decode(&value, "raft entry")?);
        }
        Ok(persisted)
    }

    /// The applied catalog: every topic, the next free topic id, the applied index. Blocking;
    /// used at start-up.
    pub fn load_catalog(&self) -> Result<Catalog, StorageError> {
        let cf = self.cf(Cf::Metadata)?;
        let mut topics = Vec::new();
        for item in self.inner.db.iterator_cf(
            cf,
            IteratorMode::From(TOPIC_META_PREFIX, Direction::Forward),
        ) {
            let (key, value) = item.map_err(|e| StorageError::rocks("iterate", e))?;
            if !key.starts_with(TOPIC_META_PREFIX) {
                break;
            }
            let meta: TopicMeta =
                rmp_serde::from_slice(&value).map_err(|e| StorageError::Corrupt {
                    what: String::from_utf8_lossy(&key).into_owned(),
                    message: e.to_string(),
                })?;
            topics.push(meta);
        }
        let word = |key: &[u8]| -> Result<Option<Vec<u8>>, StorageError> {
            self.inner
                .db
                .get_cf(cf, key)
                .map_err(|e| StorageError::rocks("get", e))
        };
        let corrupt = |what: &str, len: usize| StorageError::Corrupt {
            what: what.into(),
            message: format!("{len} bytes"),
        };
        let next_topic_id = match word(NEXT_TOPIC_ID_KEY)? {
            Some(b) => u32::from_be_bytes(
                b.as_slice()
                    .try_into()
                    .map_err(|_| corrupt("next_topic_id", b.len()))?,
            ),
            None => 1,
        };
        let applied_index = match word(METADATA_APPLIED_KEY)? {
            Some(b) => u64::from_be_bytes(
                b.as_slice()
                    .try_into()
                    .map_err(|_| corrupt("applied_index", b.len()))?,
            ),
            None => 0,
        };
        Ok(Catalog {
            topics,
            next_topic_id,
            applied_index,
        })
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

/// Whether `key` in `records` holds one of the batches of the log with key `prefix` (and not the
/// log's state, or another log's batch).
fn is_batch_key(key: &[u8], prefix: &[u8]) -> bool {
    key.len() == RECORD_KEY_BYTES && key.starts_with(prefix)
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

/// The writer thread: drain the queue; per group one `WriteBatch` with one fsync for the logged
/// writes, then one WAL-less `WriteBatch` for the replayable ones; wake every waiter.
struct GroupCommitWriter {
    db: Arc<DB>,
    receiver: Receiver<Command>,
    /// [`Inner::queued`]: decremented as commands are taken.
    queued: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
    failure: Arc<Mutex<Option<String>>>,
    metrics: Arc<Metrics>,
    settings: StorageSettings,
    flush_requests: SyncSender<FlushRequest>,
    /// Applied indexes written replayably since the last flush request.
    unflushed: HashMap<LogId, u64>,
    unflushed_bytes: usize,
    unflushed_since: Option<Instant>,
    wal_pages: WalPages,
}

/// One group commit being assembled.
#[derive(Default)]
struct Group {
    logged: WriteBatch,
    replayable: WriteBatch,
    waiters: Vec<Waiter>,
    /// [`Command::Flush`]es, answered once the flush after this group completes.
    flush_waiters: Vec<Waiter>,
    applied: Vec<(LogId, u64)>,
    logged_bytes: usize,
    replayable_bytes: usize,
    /// Some write in the group needs its logged part fsync'd.
    sync: bool,
    /// Some write in the group has a replayable part (from its `BatchSizes`).
    replays: bool,
}

impl Group {
    fn with_capacity(size: &BatchSizes) -> Self {
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
struct BatchSizes {
    logged: usize,
    replayable: usize,
    logs_records: bool,
    replays: bool,
}

impl BatchSizes {
    /// A `WriteBatch`'s header, and the most an op adds besides its key and value (type, column
    /// family and lengths as varints).
    const HEADER: usize = 12;
    const OP_OVERHEAD: usize = 16;

    fn add(&mut self, command: &Command) {
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

    fn bytes(&self) -> usize {
        self.logged + self.replayable
    }

    /// Whether `command` may join without reordering it against what is already in the group.
    fn admits(&self, command: &Command) -> bool {
        !(self.replays && command.logs_records() || self.logs_records && command.replays())
    }
}

impl GroupCommitWriter {
    fn run(mut self) {
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
    fn next_command(&mut self) -> Option<Command> {
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
    fn take(&self) -> Option<Command> {
        let command = self.receiver.try_recv().ok();
        self.queued
            .fetch_sub(usize::from(command.is_some()), Ordering::AcqRel);
        command
    }

    /// Add one command to the group; true if it asks the writer to stop after this group.
    fn add(&self, command: Command, group: &mut Group) -> bool {
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

    fn put(&self, batch: &mut WriteBatch, op: &WriteOp) {
        // A missing column family is impossible after open; an op on one would be dropped, so
        // fail the whole group instead.
        if put(&self.db, batch, op).is_err() {
            self.healthy.store(false, Ordering::Release);
        }
    }

    fn commit(&mut self, group: Group, logged: &WriteOptions, no_wal: &WriteOptions) {
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

    fn write(
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

    fn fail(&self, e: rocksdb::Error) -> StorageError {
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
    fn maybe_request_flush(&mut self) {
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
    fn request_flush_now(&mut self, waiters: Vec<Waiter>) {
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

/// A flush of `records` the writer asks for: the applied indexes written since the last one,
/// and who waits for it.
struct FlushRequest {
    applied: HashMap<LogId, u64>,
    waiters: Vec<Waiter>,
}

/// Flushes `records` when the writer asks, then publishes the applied indexes the flush made
/// durable (everything written before the request is in the flushed memtable).
struct Flusher {
    db: Arc<DB>,
    requests: Receiver<FlushRequest>,
    durable_applied: DurableApplied,
    metrics: Arc<Metrics>,
}

impl Flusher {
    fn run(self) {
        while let Ok(FlushRequest { applied, waiters }) = self.requests.recv() {
            let started = Instant::now();
            let flushed = cf_handle(&self.db, Cf::Records).and_then(|cf| {
                self.db
                    .flush_cf(cf)
                    .map_err(|e| StorageError::rocks("flush", e))
            });
            match flushed {
                Ok(()) => {
                    self.metrics
                        .storage_flush_seconds
                        .observe(started.elapsed().as_secs_f64());
                    if let Ok(mut map) = self.durable_applied.lock() {
                        for (log, index) in applied {
                            raise(&mut map, log, index);
                        }
                    }
                }
                // Nothing becomes durable: Raft logs stay uncompacted, which is safe; RocksDB
                // fails later writes if its background error persists.
                Err(ref e) => tracing::error!(error = %e, "flushing records failed"),
            }
            for waiter in waiters {
                let _ = waiter.send(flushed.clone());
            }
        }
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

/// Evicts the write-ahead log's written pages from the page cache, a few MiB at a time.
///
/// The WAL is read back only when RocksDB opens after a crash, yet every byte of it (the Raft
/// log of every replica here) would otherwise stay cached: the page cache keeps growing, pushes
/// out the records consumers read, and each new page is fresh memory, which in a VM whose host
/// reclaims free guest memory (free page reporting, as in Firecracker) makes the kernel's copy
/// into it several times slower. Measured on such a 2-core VM: that copy fell from 21% to 4% of
/// the CPU of a 3-broker RF=3 run, and throughput rose 8–10%. RocksDB has no option for this
/// (its WAL is always buffered I/O), so the writer thread, which makes every WAL write, advises
/// the kernel with `posix_fadvise(DONTNEED)` after synced writes. Only whole pages below each
/// file's end are advised; the partly written last page stays cached, so the next append does
/// not have to read it back from disk.
struct WalPages {
    dir: PathBuf,
    /// Bytes written (synced) since the last pass.
    since: usize,
    /// Per WAL file, the offset up to which it was advised.
    advised: HashMap<OsString, u64>,
}

impl WalPages {
    /// A pass every this many bytes written: a directory listing and a few syscalls.
    const EVERY_BYTES: usize = 4 << 20;
    const PAGE_BYTES: u64 = 4096;

    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            since: 0,
            advised: HashMap::new(),
        }
    }

    /// `bytes` were just written and synced; returns the bytes advised away by this call.
    fn written(&mut self, bytes: usize) -> u64 {
        self.since += bytes;
        if self.since < Self::EVERY_BYTES {
            return 0;
        }
        self.since = 0;
        self.advise()
    }

    /// Advise every WAL file's whole pages not advised before; forget files that are gone.
    fn advise(&mut self) -> u64 {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut advised = HashMap::new();
        let mut total = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().ends_with(".log") {
                continue;
            }
            let Ok(file) = std::fs::File::open(entry.path()) else {
                continue;
            };
            let Ok(meta) = file.metadata() else {
                continue;
            };
            let end = meta.len() / Self::PAGE_BYTES * Self::PAGE_BYTES;
            let from = self.advised.get(&name).copied().unwrap_or(0).min(end);
            if let Some(length) = NonZeroU64::new(end - from) {
                // Advice only: failing it changes nothing but what stays cached.
                if rustix::fs::fadvise(&file, from, Some(length), rustix::fs::Advice::DontNeed)
                    .is_ok()
                {
                    total += length.get();
                }
            }
            advised.insert(name, end);
        }
        self.advised = advised;
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::NewRecord;

    fn open(dir: &Path) -> Storage {
        Storage::open(dir, Arc::new(Metrics::new())).expect("open")
    }

    #[test]
    fn wal_pages_advises_whole_written_pages_once_and_keeps_the_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = dir.path().join("000012.log");
        let other = dir.path().join("000013.sst");
        let mut bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&wal, &bytes).expect("write wal");
        std::fs::write(&other, [7u8; 9000]).expect("write other");
        let mut pages = WalPages::new(dir.path().to_path_buf());
        assert_eq!(pages.written(WalPages::EVERY_BYTES - 1), 0, "not due yet");
        // Due: the two whole pages of the 10,000-byte WAL, not its tail, not the .sst.
        assert_eq!(pages.written(1), 8192);
        assert_eq!(pages.advise(), 0, "nothing new");
        let more = [9u8; 5000];
        {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&wal)
                .expect("open wal");
            file.write_all(&more).expect("append");
            file.sync_all().expect("sync");
        }
        bytes.extend_from_slice(&more);
        // 15,000 bytes: pages 3 (bytes 8192..12288) is whole now; the tail is not.
        assert_eq!(pages.advise(), 4096);
        assert_eq!(
            std::fs::read(&wal).expect("read back"),
            bytes,
            "advice drops no data"
        );
        std::fs::remove_file(&wal).expect("remove");
        assert_eq!(pages.advise(), 0);
        assert!(pages.advised.is_empty(), "deleted files are forgotten");
    }

    #[actix_rt::test]
    async fn the_writer_evicts_the_wal_it_syncs_and_the_data_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage_metrics = Arc::new(Metrics::new());
        let storage = Storage::open(dir.path(), storage_metrics.clone()).expect("open");
        let value = vec![5u8; 64 * 1024];
        let writes = WalPages::EVERY_BYTES / value.len() + 2;
        for i in 0..writes as u64 {
            storage
                .write(vec![WriteOp::Put {
                    cf: Cf::Metadata,
                    key: i.to_be_bytes().to_vec(),
                    value: Bytes::from(value.clone()),
                }])
                .await
                .expect("write");
        }
        // The writer made the passes: at least the bytes of all but the last pass's tail.
        let evicted = storage_metrics.storage_wal_evicted_bytes_total.get();
        assert!(
            evicted >= (WalPages::EVERY_BYTES - 4096) as u64,
            "evicted {evicted} bytes"
        );
        storage.shutdown();
        drop(storage);
        let storage = open(dir.path());
        let db = &storage.inner.db;
        let cf = cf_handle(db, Cf::Metadata).expect("cf");
        for i in 0..writes as u64 {
            let read = db.get_cf(cf, i.to_be_bytes()).expect("get");
            assert_eq!(read.as_deref(), Some(&value[..]), "key {i}");
        }
    }

    /// A Raft log written and compacted away for well over `WAL_BYTES_MAX`, while a hard state
    /// written once sits in `raft_state`'s memtable: RocksDB flushes what pins the oldest WAL
    /// file, so the WAL stays bounded, and the live entries and the hard state read back.
    #[actix_rt::test]
    async fn the_wal_stays_bounded_while_a_little_column_family_pins_its_oldest_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = open(dir.path());
        let log = LogId {
            topic_id: 3,
            partition: 1,
        };
        let encode = |message: &dyn protobuf::Message| {
            Bytes::from(message.write_to_bytes().expect("encode"))
        };
        let hard_state = raft::prelude::HardState {
            term: 1,
            ..Default::default()
        };
        let write_hard_state = WriteOp::Put {
            cf: Cf::RaftState,
            key: hard_state_key(log),
            value: encode(&hard_state),
        };
        storage.write(vec![write_hard_state]).await.expect("write");
        let data = Bytes::from(vec![9u8; 1 << 20]);
        let entries = 5 * WAL_BYTES_MAX / (1 << 20) / 2;
        for index in 1..=entries {
            let entry = raft::prelude::Entry {
                index,
                term: 1,
                data: data.clone(),
                ..Default::default()
            };
            let mut ops = vec![WriteOp::Put {
                cf: Cf::RaftLog,
                key: raft_entry_key(log, index),
                value: encode(&entry),
            }];
            if index % 16 == 0 {
                // Compaction, as a partition does once entries are applied and flushed.
                ops.push(WriteOp::DeleteRange {
                    cf: Cf::RaftLog,
                    from: raft_entry_key(log, 0),
                    to: raft_entry_key(log, index - 8),
                });
            }
            let durable = storage.submit_unsynced(ops).expect("submit");
            if index % 64 == 0 {
                durable.await.expect("durable").expect("write");
            }
        }
        storage.barrier().await.expect("barrier");
        let wal_bytes: u64 = std::fs::read_dir(dir.path())
            .expect("read dir")
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "log"))
            .filter_map(|entry| entry.metadata().ok())
            .map(|metadata| metadata.len())
            .sum();
        let written = entries << 20;
        assert!(
            wal_bytes < WAL_BYTES_MAX * 3 / 2,
            "WAL holds {wal_bytes} bytes after {written} written (bound {WAL_BYTES_MAX})"
        );
        storage.shutdown();
        drop(storage);
        let storage = open(dir.path());
        let persisted = storage.load_raft(log).expect("load");
        let last_compaction = entries / 16 * 16;
        let first_kept = last_compaction - 8;
        let indexes: Vec<u64> = persisted.entries.iter().map(|e| e.index).collect();
        assert_eq!(indexes, (first_kept..=entries).collect::<Vec<_>>());
        assert!(persisted.entries.iter().all(|e| e.data == data));
        assert_eq!(persisted.hard_state, hard_state);
    }

    #[test]
    fn topic_range_covers_exactly_one_topic() {
        let (from, to) = topic_key_range(7);
        assert!(
            record_key(
                LogId {
                    topic_id: 7,
                    partition: 0
                },
                0
            ) >= from
        );
        assert!(
            record_key(
                LogId {
                    topic_id: 7,
                    partition: u32::MAX
                },
                u64::MAX
            ) < to
        );
        assert!(
            record_key(
                LogId {
                    topic_id: 8,
                    partition: 0
                },
                0
            ) >= to
        );
        let (_, last) = topic_key_range(u32::MAX);
        assert_eq!(
            last,
            vec![0, 0, 0, 0],
            "wraps: callers never allocate u32::MAX"
        );
    }

    #[actix_rt::test]
    async fn writes_survive_reopen_and_reads_check_batches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogId {
            topic_id: 1,
            partition: 0,
        };
        let records = vec![
            NewRecord {
                key: None,
                value: Some(Bytes::from_static(b"v"))
            };
            3
        ];
        {
            let storage = open(dir.path());
            let mut ops = Vec::new();
            let mut state = LogState::default();
            for _ in 0..4 {
                let bytes = batch::encode(state.next_offset, 1, &records).expect("encode");
                ops.push(WriteOp::Put {
                    cf: Cf::Records,
                    key: record_key(log, state.next_offset),
                    value: bytes.clone(),
                });
                state.next_offset += 3;
                state.size_bytes += bytes.len() as u64;
            }
            ops.push(log_state_op(log, &state));
            storage.write(ops).await.expect("write");
            storage.shutdown();
        }
        let storage = open(dir.path());
        let state = storage.recover_log(log).expect("recover");
        assert_eq!(state.next_offset, 12);
        // Offset 4 lives in the batch starting at 3; reading below 9 stops before the batch at 9.
        let batches = storage.read_batches(log, 4, 9, usize::MAX).expect("read");
        let bases: Vec<u64> = batches
            .iter()
            .map(|b| batch::parse_header(b).expect("header").base_offset)
            .collect();
        assert_eq!(bases, vec![3, 6]);
        // A byte budget smaller than one batch still returns that one batch.
        assert_eq!(storage.read_batches(log, 0, 12, 1).expect("read").len(), 1);
        storage.shutdown();
    }

    #[actix_rt::test]
    async fn recovery_refuses_a_log_state_that_disagrees_with_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = open(dir.path());
        let log = LogId {
            topic_id: 2,
            partition: 1,
        };
        let bytes = batch::encode(
            0,
            1,
            &[NewRecord {
                key: None,
                value: None,
            }],
        )
        .expect("encode");
        let wrong = LogState {
            log_start_offset: 0,
            next_offset: 5,
            size_bytes: bytes.len() as u64,
            applied_index: 1,
        };
        storage
            .write(vec![
                WriteOp::Put {
                    cf: Cf::Records,
                    key: record_key(log, 0),
                    value: bytes,
                },
                log_state_op(log, &wrong),
            ])
            .await
            .expect("write");
        assert!(matches!(
            storage.recover_log(log),
            Err(StorageError::Corrupt { .. })
        ));
        storage.shutdown();
    }

    #[actix_rt::test]
    async fn concurrent_writes_share_fsyncs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Arc::new(Metrics::new());
        let storage = Storage::open(dir.path(), metrics.clone()).expect("open");
        let writes: Vec<_> = (0..200u64)
            .map(|i| {
                storage
                    .submit(vec![WriteOp::Put {
                        cf: Cf::Metadata,
                        key: i.to_be_bytes().to_vec(),
                        value: Bytes::from_static(b"x"),
                    }])
                    .expect("submit")
            })
            .collect();
        for w in writes {
            w.await.expect("waiter").expect("durable");
        }
        let fsyncs = metrics.storage_fsync_seconds.get_sample_count();
        assert!(
            fsyncs < 200,
            "200 queued writes took {fsyncs} fsyncs; group commit should merge them"
        );
        storage.shutdown();
        assert!(matches!(
            storage.submit(Vec::new()),
            Err(StorageError::ShutDown)
        ));
    }

    fn replayable_batch(log: LogId, state: &mut LogState, bytes: usize) -> Replayable {
        let value = vec![b'x'; bytes];
        let records = vec![NewRecord {
            key: None,
            value: Some(Bytes::from(value)),
        }];
        let batch = batch::encode(state.next_offset, 1, &records).expect("encode");
        let key = record_key(log, state.next_offset);
        state.next_offset += 1;
        state.size_bytes += batch.len() as u64;
        state.applied_index += 1;
        Replayable {
            log,
            applied_index: state.applied_index,
            ops: vec![
                WriteOp::Put {
                    cf: Cf::Records,
                    key,
                    value: batch,
                },
                log_state_op(log, state),
            ],
        }
    }

    /// The state agrees with the last batch, but a batch in the middle is missing: recovery
    /// must refuse the log (it used to check only the last batch, and a replica then served, or
    /// led with, a log with a silent hole).
    #[actix_rt::test]
    async fn recovery_refuses_a_log_with_a_hole_before_its_last_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = open(dir.path());
        let log = LogId {
            topic_id: 2,
            partition: 3,
        };
        let mut state = LogState::default();
        let first = replayable_batch(log, &mut state, 10);
        let _hole = replayable_batch(log, &mut state, 10);
        let last = replayable_batch(log, &mut state, 10);
        let mut ops = first.ops;
        ops.extend(last.ops);
        storage.write(ops).await.expect("write");
        let stored = storage.read_log_state(log).expect("cheap check passes");
        assert_eq!(stored.next_offset, 3);
        let refused = storage.recover_log(log);
        assert!(
            matches!(&refused, Err(StorageError::Corrupt { message, .. }) if message.contains("after offset 1 starts at 2")),
            "{refused:?}"
        );
        storage.shutdown();
    }

    #[actix_rt::test]
    async fn a_flush_on_demand_makes_every_earlier_apply_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = open(dir.path());
        let logs = [1, 2].map(|partition| LogId {
            topic_id: 6,
            partition,
        });
        let mut states = [LogState::default(); 2];
        for round in 0..3 {
            for (log, state) in logs.iter().zip(states.iter_mut()) {
                let write = replayable_batch(*log, state, 100 + round);
                storage
                    .submit_replayable(Vec::new(), false, write)
                    .expect("submit");
            }
        }
        assert_eq!(storage.durable_applied(logs[0]), 0);
        storage.flush_records().await.expect("flush");
        for (log, state) in logs.iter().zip(&states) {
            assert_eq!(storage.durable_applied(*log), state.applied_index);
        }
        assert_eq!(storage.queue_depth(), 0);
        storage.shutdown();
    }

    #[actix_rt::test]
    async fn replayable_writes_are_readable_at_once_and_durable_after_a_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Arc::new(Metrics::new());
        let storage = Storage::open(dir.path(), metrics.clone()).expect("open");
        let log = LogId {
            topic_id: 4,
            partition: 2,
        };
        let mut state = LogState::default();
        storage
            .submit_replayable(Vec::new(), false, replayable_batch(log, &mut state, 100))
            .expect("submit")
            .await
            .expect("waiter")
            .expect("written");
        assert_eq!(storage.recover_log(log).expect("readable").next_offset, 1);
        assert_eq!(
            storage.durable_applied(log),
            0,
            "nothing is flushed yet, so nothing may be compacted"
        );
        assert_eq!(
            metrics.storage_fsync_seconds.get_sample_count(),
            0,
            "a replayable write is not fsync'd"
        );
        // Past `flush_bytes` the writer asks for a flush; the flusher then publishes the index.
        let writes = FLUSH_BYTES / (1 << 20) + 1;
        for _ in 0..writes {
            storage
                .submit_replayable(
                    Vec::new(),
                    false,
                    replayable_batch(log, &mut state, 1 << 20),
                )
                .expect("submit")
                .await
                .expect("waiter")
                .expect("written");
        }
        // The flush was asked for after the write that crossed 16 MiB, the last but one.
        let deadline = Instant::now() + Duration::from_secs(30);
        while storage.durable_applied(log) < state.applied_index - 1 {
            assert!(
                Instant::now() < deadline,
                "no flush made the applies durable"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(metrics.storage_flush_seconds.get_sample_count() >= 1);
        storage.shutdown();
        drop(storage);
        // Shutdown flushes the rest: the whole log is back after a reopen.
        let storage = open(dir.path());
        let recovered = storage.recover_log(log).expect("recover");
        assert_eq!(recovered, state);
        storage.shutdown();
    }

    #[test]
    fn a_group_never_mixes_logged_record_writes_with_replayable_ones() {
        let log = LogId {
            topic_id: 1,
            partition: 0,
        };
        let write = |logged: Vec<WriteOp>, replayable: Option<Replayable>| Command::Write {
            logged,
            sync: true,
            replayable,
            done: oneshot::channel().0,
        };
        let raft_op = WriteOp::Put {
            cf: Cf::RaftLog,
            key: vec![1],
            value: Bytes::new(),
        };
        let records_op = WriteOp::Put {
            cf: Cf::Records,
            key: vec![2],
            value: Bytes::new(),
        };
        let replay = || {
            Some(Replayable {
                log,
                applied_index: 1,
                ops: vec![records_op.clone()],
            })
        };
        let snapshot_install = write(vec![raft_op.clone(), records_op.clone()], None);
        let apply = write(vec![raft_op.clone()], replay());
        let raft_only = write(vec![raft_op.clone()], None);

        let sized = |commands: &[&Command]| {
            let mut size = BatchSizes::default();
            commands.iter().for_each(|command| size.add(command));
            size
        };
        let with_apply = sized(&[&apply]);
        assert!(with_apply.admits(&apply));
        assert!(with_apply.admits(&raft_only));
        assert!(!with_apply.admits(&snapshot_install));
        let with_install = sized(&[&snapshot_install]);
        assert!(!with_install.admits(&apply));
        assert!(with_install.admits(&raft_only));
        assert!(with_install.admits(&snapshot_install));
    }

    /// The writer allocates each group's `WriteBatch`es at the size `BatchSizes` computes: it
    /// must be at least what RocksDB's encoding takes, or the batch grows (and copies) anyway.
    #[test]
    fn batch_sizes_are_at_least_the_write_batches_they_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = open(dir.path());
        let db = &storage.inner.db;
        let log = LogId {
            topic_id: 1,
            partition: 0,
        };
        let put = |cf, key: Vec<u8>, bytes: usize| WriteOp::Put {
            cf,
            key,
            value: Bytes::from(vec![7; bytes]),
        };
        let logged = vec![
            put(Cf::RaftLog, raft_group::raft_entry_key(log, 7), 300_000),
            put(Cf::RaftLog, raft_group::raft_entry_key(log, 8), 1),
            put(Cf::RaftState, vec![1; 40], 0),
            WriteOp::Delete {
                cf: Cf::RaftLog,
                key: vec![2; 16],
            },
            WriteOp::DeleteRange {
                cf: Cf::RaftLog,
                from: raft_group::raft_entry_key(log, 0),
                to: raft_group::raft_entry_key(log, 6),
            },
        ];
        let replayable = vec![
            put(Cf::Records, record_key(log, 0), 70_000),
            log_state_op(log, &LogState::default()),
        ];
        let mut size = BatchSizes::default();
        let (mut logged_batch, mut replayable_batch) =
            (WriteBatch::default(), WriteBatch::default());
        for _ in 0..3 {
            size.add(&Command::Write {
                logged: logged.clone(),
                sync: true,
                replayable: Some(Replayable {
                    log,
                    applied_index: 1,
                    ops: replayable.clone(),
                }),
                done: oneshot::channel().0,
            });
            for op in &logged {
                super::put(db, &mut logged_batch, op).expect("put");
            }
            for op in &replayable {
                super::put(db, &mut replayable_batch, op).expect("put");
            }
        }
        assert!(logged_batch.size_in_bytes() <= size.logged);
        assert!(replayable_batch.size_in_bytes() <= size.replayable);
        // And not wildly more: the estimate is for allocation, not a bound found by doubling.
        assert!(
            size.bytes()
                < (logged_batch.size_in_bytes() + replayable_batch.size_in_bytes()) * 11 / 10
        );
        storage.shutdown();
    }

    #[test]
    fn log_states_move_from_their_old_column_family_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogId {
            topic_id: 9,
            partition: 0,
        };
        let mut state = LogState::default();
        let replayable = replayable_batch(log, &mut state, 10);
        {
            // The layout before: the batch in `records`, the state in `log_state`.
            let storage = open(dir.path());
            let db = &storage.inner.db;
            let WriteOp::Put { key, value, .. } = &replayable.ops[0] else {
                panic!("a put")
            };
            db.put_cf(cf_handle(db, Cf::Records).expect("cf"), key, value)
                .expect("put");
            db.put_cf(
                cf_handle(db, Cf::LogState).expect("cf"),
                log_key(log),
                state.encode(),
            )
            .expect("put");
            storage.shutdown();
        }
        let storage = open(dir.path());
        assert_eq!(storage.recover_log(log).expect("recover"), state);
        let db = &storage.inner.db;
        let old = cf_handle(db, Cf::LogState).expect("cf");
        assert!(db.iterator_cf(old, IteratorMode::Start).next().is_none());
        storage.shutdown();
    }
}
