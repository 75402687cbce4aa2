//! What the broker's RocksDB holds and under which keys: column families, key layouts, the log
//! state, the write operations, and how Raft's entries and hard states are stored. No I/O, so
//! both the storage threads and the sans-IO Raft code use it (and neither imports the other).

use bytes::Bytes;
use raft::prelude::{Entry, HardState};

use crate::error::StorageError;
use crate::topic::{LogId, TopicMeta};

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
    pub(crate) fn bytes(&self) -> usize {
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

/// Set in the partition half of a log's key to make the key prefix of its producers' state:
/// inside the topic's key range (deleted with the topic), never a log's own prefix (so batch
/// scans, retention and install ranges never meet it).
const PRODUCERS_BIT: u32 = 1 << 31;

/// Prefix of `log`'s idempotent producers' state in `records`. It lives next to the batches it
/// describes, in the same column family, because a flush of `records` is the only thing that
/// makes an apply durable: a flush then holds the records and the producer state as of one
/// moment, and Raft's replay after a crash rebuilds both from there. (State made durable apart
/// from its records, say through the WAL, would outlive them after a crash, and the replay would
/// take the lost batches for duplicates.)
pub fn producers_prefix(log: LogId) -> Vec<u8> {
    assert!(log.partition < PRODUCERS_BIT, "partition number too large");
    log_key(LogId {
        topic_id: log.topic_id,
        partition: log.partition | PRODUCERS_BIT,
    })
}

/// Key of producer `id`'s state on `log`.
pub fn producer_key(log: LogId, id: i64) -> Vec<u8> {
    let mut key = producers_prefix(log);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The write that removes every producer's state on `log` (a snapshot install replaces them).
pub fn producers_delete(log: LogId) -> WriteOp {
    let prefix = producers_prefix(log);
    let mut to = prefix.clone();
    to.extend_from_slice(&[0xff; 9]);
    WriteOp::DeleteRange {
        cf: Cf::Records,
        from: prefix,
        to,
    }
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

pub fn topic_meta_key(name: &str) -> Vec<u8> {
    format!("topic/{name}").into_bytes()
}
pub const NEXT_TOPIC_ID_KEY: &[u8] = b"next_topic_id";
/// The first producer id not yet handed out (ids are never reused).
pub const NEXT_PRODUCER_ID_KEY: &[u8] = b"next_producer_id";
/// Index of the last metadata-group entry applied to the catalog.
pub const METADATA_APPLIED_KEY: &[u8] = b"applied_index";

/// The applied topic catalog, as read at start-up.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub topics: Vec<TopicMeta>,
    pub next_topic_id: u32,
    pub next_producer_id: i64,
    pub applied_index: u64,
}
pub const TOPIC_META_PREFIX: &[u8] = b"topic/";

/// Whether `key` in `records` holds one of the batches of the log with key `prefix` (and not the
/// log's state, or another log's batch).
pub(crate) fn is_batch_key(key: &[u8], prefix: &[u8]) -> bool {
    key.len() == RECORD_KEY_BYTES && key.starts_with(prefix)
}

/// What RocksDB holds for one group, read at start-up.
#[derive(Debug, Clone, Default)]
pub struct PersistedRaft {
    pub hard_state: HardState,
    /// Index and term of the last entry removed by compaction (0, 0 if none).
    pub compacted: (u64, u64),
    pub entries: Vec<Entry>,
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

/// Decode an entry or hard state stored under the keys above.
pub fn decode<M: protobuf::Message>(bytes: &[u8], what: &str) -> Result<M, StorageError> {
    M::parse_from_bytes(bytes).map_err(|e| StorageError::Corrupt {
        what: what.to_owned(),
        message: e.to_string(),
    })
}

/// Parse the compaction marker (index and term of the last entry compacted away).
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
