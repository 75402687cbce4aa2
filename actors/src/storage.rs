//! The broker's one RocksDB, and the only code that writes to it.
//!
//! Why a thread and not an actor: group commit must take *everything* queued, write it as one
//! `WriteBatch` with one fsync, then wake every waiter. An actix mailbox hands a handler one
//! message at a time, so the writer is a dedicated OS thread draining a bounded channel
//! ([`WRITE_QUEUE_CAPACITY`]); each write's submitter gets a oneshot that resolves after the fsync.
//! Writes are applied in submission order, which partition actors rely on (offsets are assigned
//! before the write and become visible in that order).
//!
//! Reads do not queue behind writes: RocksDB is thread-safe, so readers use the shared handle from
//! a blocking pool (never the actor or HTTP arbiters).
//!
//! Column families, keys big-endian so iteration is log order:
//! - `records`: (topic_id u32, partition u32, base_offset u64) → Kafka v2 record batch
//! - `log_state`: (topic_id, partition) → [`LogState`], written in the same batch as each append
//! - `metadata`: `topic/{name}` → [`TopicMeta`] (msgpack), `next_topic_id` → u32
//! - `raft_log`, `raft_state`, `group_offsets`, `checkpoints`, `producer_state`: reserved for
//!   replication, consumer groups, stream jobs and idempotent producers.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

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

/// Key of `log` in `log_state`; also the prefix of all its keys in `records`.
pub fn log_key(log: LogId) -> Vec<u8> {
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&log.topic_id.to_be_bytes());
    key.extend_from_slice(&log.partition.to_be_bytes());
    key
}

/// The `[from, to)` key range holding every log of a topic, in `records` and `log_state`.
pub fn topic_key_range(topic_id: u32) -> (Vec<u8>, Vec<u8>) {
    (
        topic_id.to_be_bytes().to_vec(),
        (u64::from(topic_id) + 1).to_be_bytes()[4..].to_vec(),
    )
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
const TOPIC_META_PREFIX: &[u8] = b"topic/";

type Waiter = oneshot::Sender<Result<(), StorageError>>;

/// Resolves once a submitted write is durable (or has failed).
pub type Durable = oneshot::Receiver<Result<(), StorageError>>;

enum Command {
    Write { ops: Vec<WriteOp>, done: Waiter },
    Shutdown,
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

struct Inner {
    db: Arc<DB>,
    queue: SyncSender<Command>,
    /// False once a durable write failed; stays false until restart (fail-stop).
    healthy: Arc<AtomicBool>,
    /// The writer thread, taken by [`Storage::shutdown`]. A std Mutex: touched once, at shutdown.
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Storage {
    /// Open (or create) the RocksDB under `dir` with every column family, and start the writer.
    pub fn open(dir: &Path, metrics: Arc<Metrics>) -> Result<Self, StorageError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_max_background_jobs(2);
        options.set_bytes_per_sync(1 << 20);
        let families = Cf::ALL.iter().map(|cf| {
            let mut cf_options = Options::default();
            if *cf == Cf::Records {
                cf_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
                cf_options.set_write_buffer_size(64 << 20);
            }
            ColumnFamilyDescriptor::new(cf.name(), cf_options)
        });
        let db =
            DB::open_cf_descriptors(&options, dir, families).map_err(|e| StorageError::Open {
                path: dir.display().to_string(),
                message: e.into_string(),
            })?;
        let db = Arc::new(db);
        let (queue, receiver) = mpsc::sync_channel(WRITE_QUEUE_CAPACITY);
        let healthy = Arc::new(AtomicBool::new(true));
        let writer = GroupCommitWriter {
            db: db.clone(),
            receiver,
            healthy: healthy.clone(),
            metrics,
        };
        let handle = std::thread::Builder::new()
            .name("pubg1-storage-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| StorageError::Open {
                path: dir.display().to_string(),
                message: e.to_string(),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                queue,
                healthy,
                writer: Mutex::new(Some(handle)),
            }),
        })
    }

    /// Queue an atomic write; the receiver resolves once it is fsync'd (or failed).
    ///
    /// Never blocks: a full queue is [`StorageError::QueueFull`], so callers can shed load.
    pub fn submit(&self, ops: Vec<WriteOp>) -> Result<Durable, StorageError> {
        if !self.is_healthy() {
            return Err(StorageError::Failed);
        }
        let (done, receiver) = oneshot::channel();
        match self.inner.queue.try_send(Command::Write { ops, done }) {
            Ok(()) => Ok(receiver),
            Err(TrySendError::Full(_)) => Err(StorageError::QueueFull {
                capacity: WRITE_QUEUE_CAPACITY,
            }),
            Err(TrySendError::Disconnected(_)) => Err(StorageError::ShutDown),
        }
    }

    /// Write `ops` atomically and durably.
    pub async fn write(&self, ops: Vec<WriteOp>) -> Result<(), StorageError> {
        self.submit(ops)?
            .await
            .map_err(|_| StorageError::ShutDown)?
    }

    /// Resolves once every write submitted before it is durable (or failed).
    pub async fn barrier(&self) -> Result<(), StorageError> {
        self.write(Vec::new()).await
    }

    /// False after a failed durable write: the broker must be restarted (readiness reports it).
    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Acquire)
    }

    /// Finish queued writes, stop the writer and flush memtables. Idempotent.
    pub fn shutdown(&self) {
        let handle = self
            .inner
            .writer
            .lock()
            .map(|mut w| w.take())
            .unwrap_or(None);
        if let Some(handle) = handle {
            // A blocking send: shutdown waits behind queued writes rather than dropping them.
            let _ = self.inner.queue.send(Command::Shutdown);
            let _ = handle.join();
            if let Err(e) = self.inner.db.flush() {
                tracing::warn!(error = %e, "flushing RocksDB at shutdown");
            }
            // Stop compactions and flushes before the process exits: RocksDB's background
            // threads outliving its static state at exit crash the process (seen as SIGSEGV).
            self.inner.db.cancel_all_background_work(true);
        }
    }

    fn cf(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily, StorageError> {
        cf_handle(&self.inner.db, cf)
    }

    /// The durable state of `log` (None for a log never written), cross-checked against its last
    /// batch. Blocking: call from a blocking context or at start-up.
    pub fn recover_log(&self, log: LogId) -> Result<LogState, StorageError> {
        let state = match self
            .inner
            .db
            .get_cf(self.cf(Cf::LogState)?, log_key(log))
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
            Some(Ok((key, value))) if key.starts_with(&log_key(log)) => Ok(Some(
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
                Some(Ok((key, _))) if key.starts_with(&prefix) => key.to_vec(),
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

fn cf_handle(db: &DB, cf: Cf) -> Result<&rocksdb::ColumnFamily, StorageError> {
    db.cf_handle(cf.name())
        .ok_or_else(|| StorageError::Corrupt {
            what: cf.name().into(),
            message: "missing column family".into(),
        })
}

fn corrupt(log: LogId, error: crate::error::BatchError) -> StorageError {
    StorageError::Corrupt {
        what: format!("log {}/{}", log.topic_id, log.partition),
        message: error.to_string(),
    }
}

/// The writer thread: drain the queue, one `WriteBatch`, one fsync, wake every waiter.
struct GroupCommitWriter {
    db: Arc<DB>,
    receiver: Receiver<Command>,
    healthy: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl GroupCommitWriter {
    fn run(self) {
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        while let Ok(first) = self.receiver.recv() {
            let mut waiters: Vec<Waiter> = Vec::new();
            let mut batch = WriteBatch::default();
            let mut bytes = 0usize;
            let mut shutdown = self.add(first, &mut batch, &mut waiters, &mut bytes);
            while !shutdown && bytes < GROUP_COMMIT_BYTES_MAX {
                match self.receiver.try_recv() {
                    Ok(command) => {
                        shutdown = self.add(command, &mut batch, &mut waiters, &mut bytes)
                    }
                    Err(_) => break,
                }
            }
            self.commit(batch, waiters, bytes, &sync);
            if shutdown {
                return;
            }
        }
    }

    /// Add one command to the group; true if it asks the writer to stop after this group.
    fn add(
        &self,
        command: Command,
        batch: &mut WriteBatch,
        waiters: &mut Vec<Waiter>,
        bytes: &mut usize,
    ) -> bool {
        match command {
            Command::Shutdown => true,
            Command::Write { ops, done } => {
                for op in &ops {
                    *bytes += op.bytes();
                    // A missing column family is impossible after open; an op on one would be
                    // dropped, so fail the whole group instead.
                    let Ok(handle) = cf_handle(&self.db, op_cf(op)) else {
                        self.healthy.store(false, Ordering::Release);
                        continue;
                    };
                    match op {
                        WriteOp::Put { key, value, .. } => batch.put_cf(handle, key, value),
                        WriteOp::Delete { key, .. } => batch.delete_cf(handle, key),
                        WriteOp::DeleteRange { from, to, .. } => {
                            batch.delete_range_cf(handle, from, to)
                        }
                    }
                }
                waiters.push(done);
                false
            }
        }
    }

    fn commit(&self, batch: WriteBatch, waiters: Vec<Waiter>, bytes: usize, sync: &WriteOptions) {
        if waiters.is_empty() {
            return;
        }
        let result = if !self.healthy.load(Ordering::Acquire) {
            Err(StorageError::Failed)
        } else if batch.is_empty() {
            Ok(()) // barriers only: everything before them is already durable
        } else {
            let started = Instant::now();
            let written = self.db.write_opt(batch, sync);
            self.metrics
                .storage_fsync_seconds
                .observe(started.elapsed().as_secs_f64());
            self.metrics
                .storage_group_commit_writes
                .observe(waiters.len() as f64);
            self.metrics
                .storage_group_commit_bytes
                .observe(bytes as f64);
            written.map_err(|e| {
                tracing::error!(error = %e, "durable write failed; storage now fails closed");
                self.healthy.store(false, Ordering::Release);
                self.metrics.storage_write_errors_total.inc();
                StorageError::rocks("write", e)
            })
        };
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }
}

fn op_cf(op: &WriteOp) -> Cf {
    match op {
        WriteOp::Put { cf, .. } | WriteOp::Delete { cf, .. } | WriteOp::DeleteRange { cf, .. } => {
            *cf
        }
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
            ops.push(WriteOp::Put {
                cf: Cf::LogState,
                key: log_key(log),
                value: state.encode(),
            });
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
                WriteOp::Put {
                    cf: Cf::LogState,
                    key: log_key(log),
                    value: wrong.encode(),
                },
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
}
