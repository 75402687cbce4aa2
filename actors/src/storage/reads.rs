//! Reads: recovery of a log's state (with its density proof), batch and header scans, a
//! group's persisted Raft state, the catalog. RocksDB is thread-safe, so these run on the
//! blocking pool through the shared handle and never queue behind writes.

use rocksdb::{Direction, IteratorMode};

use super::keys::{
    compacted_key, decode, decode_compacted, hard_state_key, is_batch_key, log_key,
    producers_prefix, raft_entry_key, record_key, PersistedRaft, METADATA_APPLIED_KEY,
    NEXT_PRODUCER_ID_KEY, NEXT_TOPIC_ID_KEY, TOPIC_META_PREFIX,
};
use super::{corrupt, Catalog, Cf, LogState, Storage, WriteOp};
use crate::batch::{self, BatchHeader};
use crate::error::StorageError;
use crate::producers::{ProducerEntry, ProducerStates};
use crate::topic::{LogId, TopicMeta};
use bytes::Bytes;

/// A log as recovery found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    pub state: LogState,
    /// Batches past the log's end are left from an interrupted snapshot install.
    pub leftovers: bool,
}

/// The write that deletes what an interrupted install left past `state`'s end.
pub fn leftover_delete(log: LogId, state: &LogState) -> WriteOp {
    WriteOp::DeleteRange {
        cf: Cf::Records,
        from: record_key(log, state.next_offset),
        to: record_key(log, u64::MAX),
    }
}

/// A key and its value, as read.
pub type KeyValue = (Vec<u8>, Vec<u8>);

impl Storage {
    /// The state of `log` (the default for a log never written), proven against its batches:
    /// they must run from the log start to the state's next offset without a gap or an overlap
    /// (a replica must never serve, or lead with, a log with a hole). Reads every batch header:
    /// blocking, call from a blocking context or at start-up.
    ///
    /// Batches at or past the state's next offset are what an interrupted snapshot install
    /// wrote ahead of its final write: not part of the log. `Recovered::leftovers` says so, and
    /// the caller deletes them (with [`leftover_delete`]) before the log grows again.
    pub fn recover_log(&self, log: LogId) -> Result<Recovered, StorageError> {
        let mut state = self.stored_log_state(log)?;
        let corrupt = |message: String| StorageError::Corrupt {
            what: format!("log {}/{}", log.topic_id, log.partition),
            message,
        };
        let mut expected = state.log_start_offset;
        let mut size = 0u64;
        let mut hole = None;
        let mut leftovers = false;
        self.scan_headers(log, state.log_start_offset, |header| {
            if header.base_offset >= state.next_offset && expected == state.next_offset {
                leftovers = true;
                return false;
            }
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
        Ok(Recovered { state, leftovers })
    }

    /// The idempotent producers' state of `log`, as stored next to its records. Blocking.
    pub fn load_producers(&self, log: LogId) -> Result<ProducerStates, StorageError> {
        let mut states = ProducerStates::default();
        for (key, value) in self.load_prefix(Cf::Records, &producers_prefix(log))? {
            let id = key
                .get(8..16)
                .and_then(|b| b.try_into().ok())
                .map(i64::from_be_bytes)
                .ok_or_else(|| StorageError::Corrupt {
                    what: format!("producer state of {}/{}", log.topic_id, log.partition),
                    message: format!("key of {} bytes", key.len()),
                })?;
            states.insert(id, ProducerEntry::decode(&value)?);
        }
        Ok(states)
    }

    /// `log`'s stored state as it is, unchecked. Blocking.
    fn stored_log_state(&self, log: LogId) -> Result<LogState, StorageError> {
        match self
            .inner
            .db
            .get_cf(self.cf(Cf::Records)?, log_key(log))
            .map_err(|e| StorageError::rocks("get", e))?
        {
            Some(bytes) => LogState::decode(&bytes),
            None => Ok(LogState::default()),
        }
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

    /// Stored batches of `log` that hold offsets in `[from, below)`, in order, as many as fit in
    /// `bytes_max` (the first batch is always included so a large batch cannot stall a
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
            // Within `bytes_max`, but never nothing: the first batch goes whatever its size.
            if !out.is_empty() && total + value.len() > bytes_max {
                break;
            }
            total += value.len();
            out.push(Bytes::from(value.into_vec()));
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
            persisted.hard_state = decode(&bytes, "raft hard state")?;
        }
        if let Some(bytes) = get(compacted_key(group))? {
            persisted.compacted = decode_compacted(&bytes)?;
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
            persisted.entries.push(decode(&value, "raft entry")?);
        }
        Ok(persisted)
    }

    /// The applied catalog: every topic, the next free topic id, the applied index. Blocking;
    /// used at start-up.
    /// Every key and value of `cf` that starts with `prefix`, in key order: the durable state
    /// of a state machine that keeps its keys under one prefix (committed offsets).
    pub fn load_prefix(&self, cf: Cf, prefix: &[u8]) -> Result<Vec<KeyValue>, StorageError> {
        let handle = self.cf(cf)?;
        let mut found = Vec::new();
        for item in self
            .inner
            .db
            .iterator_cf(handle, IteratorMode::From(prefix, Direction::Forward))
        {
            let (key, value) = item.map_err(|e| StorageError::rocks("iterate", e))?;
            if !key.starts_with(prefix) {
                break;
            }
            found.push((key.into_vec(), value.into_vec()));
        }
        Ok(found)
    }

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
        let next_producer_id = match word(NEXT_PRODUCER_ID_KEY)? {
            Some(b) => i64::from_be_bytes(
                b.as_slice()
                    .try_into()
                    .map_err(|_| corrupt("next_producer_id", b.len()))?,
            ),
            None => 0,
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
            next_producer_id,
            applied_index,
        })
    }
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
