//! Typed errors at the edge of the actors crate, one enum per concern.
//!
//! Callers (the HTTP layer) map these to status codes; each variant says whether retrying can help
//! through [`PartitionError::is_retriable`] so clients get 503/429 versus 4xx right.

use thiserror::Error;

/// A record batch that cannot be encoded, or stored bytes that are not a valid v2 batch.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BatchError {
    #[error("a batch needs at least one record")]
    Empty,
    #[error("base offset {base_offset} does not fit a Kafka offset (i64)")]
    OffsetOverflow { base_offset: u64 },
    #[error("batch is truncated or has an impossible length ({len} bytes available)")]
    Truncated { len: usize },
    #[error("batch has magic {magic}, only v2 record batches are stored")]
    Magic { magic: i8 },
    #[error("batch at offset {base_offset} fails its CRC (stored {stored:#010x}, computed {computed:#010x})")]
    Crc {
        base_offset: i64,
        stored: u32,
        computed: u32,
    },
    #[error("batch at offset {base_offset} has last offset delta {last_offset_delta} but {record_count} records")]
    Sparse {
        base_offset: i64,
        last_offset_delta: i32,
        record_count: u32,
    },
    #[error("encoding batch: {0}")]
    Encode(String),
    #[error("decoding batch: {0}")]
    Decode(String),
}

/// Failures of the RocksDB storage layer.
#[derive(Debug, Error, Clone)]
pub enum StorageError {
    #[error("opening RocksDB at {path}: {message}")]
    Open { path: String, message: String },
    #[error("RocksDB {operation} failed: {message}")]
    Rocks {
        operation: &'static str,
        message: String,
    },
    /// A durable write failed earlier; the storage fails closed until the broker restarts, because
    /// a log with a hole after an fsync error cannot promise gap-free offsets.
    #[error("storage is failed after an earlier write error ({reason}); restart the broker")]
    Failed { reason: String },
    #[error("the storage write queue is full ({capacity} writes waiting)")]
    QueueFull { capacity: usize },
    #[error("storage is shut down")]
    ShutDown,
    #[error("corrupt data in {what}: {message}")]
    Corrupt { what: String, message: String },
}

impl StorageError {
    /// Whether the disk is full (ENOSPC), so freeing space (and a restart) fixes it.
    pub fn is_disk_full(&self) -> bool {
        let message = match self {
            Self::Failed { reason } => reason,
            Self::Rocks { message, .. } | Self::Open { message, .. } => message,
            _ => return false,
        };
        message.contains("No space left on device")
    }

    pub(crate) fn rocks(operation: &'static str, error: rocksdb::Error) -> Self {
        Self::Rocks {
            operation,
            message: error.into_string(),
        }
    }
}

/// Why a broker did not start. Nothing has been written when the peer port is refused: it is
/// claimed before storage opens.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("binding the peer (Raft) listener to {address}: {source}")]
    PeerListener {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a produce or fetch on one partition did not happen.
#[derive(Debug, Error, Clone)]
pub enum PartitionError {
    #[error("offset {offset} is out of range: the log holds offsets {log_start_offset}..{high_watermark}")]
    OffsetOutOfRange {
        offset: u64,
        log_start_offset: u64,
        high_watermark: u64,
    },
    #[error("partition {partition} of topic '{topic}' is restarting; retry")]
    Restarting { topic: String, partition: u32 },
    #[error("partition {partition} of topic '{topic}' was deleted")]
    Deleted { topic: String, partition: u32 },
    /// This broker holds no replica of the partition; the replicas are on `replicas`.
    #[error("partition {partition} of topic '{topic}' is not replicated on this broker; its replicas are on brokers {replicas:?}")]
    NotReplica {
        topic: String,
        partition: u32,
        replicas: Vec<u64>,
    },
    /// No leader is known (an election is in progress): nothing was written.
    #[error("partition {partition} of topic '{topic}' has no leader right now; nothing was written; retry")]
    NoLeader { topic: String, partition: u32 },
    /// Back-pressure: the broker or the partition's leader has too much in flight; nothing was
    /// written.
    #[error("partition {partition} of topic '{topic}' is overloaded ({reason}); nothing was written; retry shortly")]
    Overloaded {
        topic: String,
        partition: u32,
        reason: String,
    },
    /// Leadership moved and the log position the append had was committed with another entry:
    /// it is certainly not in the log.
    #[error("partition {partition} of topic '{topic}' changed leader before the append committed; it was not written; retry")]
    NotWritten { topic: String, partition: u32 },
    /// Leadership moved (or the replica restarted) while the append was in flight: it may or
    /// may not be in the log.
    #[error("partition {partition} of topic '{topic}' changed leader while the append was in flight; it may or may not have been written")]
    OutcomeUnknown { topic: String, partition: u32 },
    #[error("partition {partition} of topic '{topic}' did not commit the append within {waited_ms} ms; it may still be committed")]
    Timeout {
        topic: String,
        partition: u32,
        waited_ms: u64,
    },
    /// An idempotent producer's batch does not follow its last one (a gap, or a batch older
    /// than the ones remembered): nothing was written.
    #[error("producer {producer_id} sent sequence {got} to partition {partition} of topic '{topic}', which expects {expected}; nothing was written")]
    OutOfOrderSequence {
        topic: String,
        partition: u32,
        producer_id: i64,
        expected: i32,
        got: i32,
    },
    /// The producer id has moved on to a newer epoch (another instance took it over).
    #[error("producer {producer_id} epoch {got} is fenced on partition {partition} of topic '{topic}': its epoch is now {current}; nothing was written")]
    InvalidProducerEpoch {
        topic: String,
        partition: u32,
        producer_id: i64,
        current: i16,
        got: i16,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Batch(#[from] BatchError),
}

impl PartitionError {
    /// Whether the same request may succeed if the client retries it later.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Restarting { .. }
            | Self::NoLeader { .. }
            | Self::Overloaded { .. }
            | Self::NotWritten { .. }
            | Self::OutcomeUnknown { .. }
            | Self::Timeout { .. } => true,
            Self::Storage(StorageError::QueueFull { .. }) => true,
            Self::Storage(_)
            | Self::Batch(_)
            | Self::OffsetOutOfRange { .. }
            | Self::Deleted { .. }
            | Self::OutOfOrderSequence { .. }
            | Self::InvalidProducerEpoch { .. }
            | Self::NotReplica { .. } => false,
        }
    }
}

/// Why a topic admin request was refused.
#[derive(Debug, Error, Clone)]
pub enum TopicError {
    #[error("invalid topic name '{name}': {reason}")]
    InvalidName { name: String, reason: String },
    #[error("topic '{0}' already exists")]
    AlreadyExists(String),
    #[error("topic '{0}' does not exist")]
    NotFound(String),
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("the broker already holds {limit} topics, the configured maximum")]
    TooManyTopics { limit: usize },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("broker is shutting down")]
    ShuttingDown,
    /// The metadata group has no leader (an election, or too few brokers up): retry.
    #[error("the cluster's metadata group has no leader right now; nothing was changed; retry")]
    NoLeader,
    /// The metadata group's leadership moved (or this broker's metadata actor restarted) while
    /// the request was in flight: it may or may not have been applied.
    #[error("the cluster's metadata group changed leader while the request was in flight; it may or may not have been applied; check and retry")]
    OutcomeUnknown,
}
