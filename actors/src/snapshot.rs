//! Partition snapshots: how a follower behind the leader's compacted Raft log catches up.
//!
//! The Raft snapshot itself is small: [`SnapshotData`], the leader's log state at a durable
//! applied index (end offset, start offset) and which broker made it. The records are not in it.
//! The follower fetches the ones it lacks, `[its next offset, snapshot's next offset)`, from a
//! replica in chunks over the peer links ([`SnapshotFetch`] → [`SnapshotChunk`]), checking each
//! batch's CRC and that offsets run on without gap. Only when it has all of them does it write them,
//! with its new log state and the snapshot's Raft state, as one atomic durable batch, and only
//! then acknowledge the snapshot to the leader (Raft's persisted messages). A crash mid-fetch
//! leaves the follower as it was; it is sent the snapshot again.
//!
//! Records below the snapshot's end offset are committed, so every replica that applied that far
//! holds the same bytes: any of them may serve a fetch, which is how a fetch survives the leader
//! that made the snapshot dying. [`Install`] is the follower's side, pure so it is unit-tested.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::batch;
use crate::error::StorageError;
use crate::producers::{ProducerEntry, ProducerStates};
use crate::storage::{
    log_state_op, producer_key, producers_delete, record_key, Cf, LogState, WriteOp,
};
use crate::topic::LogId;

/// Bytes of batches one chunk carries at most (the first batch always goes, whatever its size).
pub const CHUNK_BYTES_MAX: usize = 1024 * 1024;

/// A partition snapshot's payload: the log as the leader had applied it at the snapshot index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotData {
    pub log_start_offset: u64,
    pub next_offset: u64,
    /// The broker that made the snapshot: the first one asked for the records.
    pub source: u64,
    /// Every idempotent producer's state at the snapshot index (id, [`ProducerEntry::encode`]):
    /// it is a function of the whole log, which the follower does not replay, so it comes whole.
    #[serde(default)]
    pub producers: Vec<(i64, serde_bytes::ByteBuf)>,
}

impl SnapshotData {
    pub fn encode(&self) -> Bytes {
        Bytes::from(rmp_serde::to_vec(self).unwrap_or_default())
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StorageError> {
        rmp_serde::from_slice(bytes).map_err(|e| StorageError::Corrupt {
            what: "partition snapshot".into(),
            message: e.to_string(),
        })
    }
}

/// Ask a replica for stored batches of `group` holding offsets in `[offset, below)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFetch {
    pub group: LogId,
    /// The asking broker, where the chunk goes.
    pub from: u64,
    /// Echoed in the answer, so a late answer to an old request is recognised.
    pub request: u64,
    pub offset: u64,
    pub below: u64,
}

/// The answer to a [`SnapshotFetch`]: whole stored batches, in offset order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChunk {
    pub group: LogId,
    pub request: u64,
    pub batches: Vec<Bytes>,
    /// Why the replica could not serve the range (then `batches` is empty).
    pub error: Option<String>,
    /// Set when the range starts below the replica's log start: retention deleted it there,
    /// and its log now starts here.
    #[serde(default)]
    pub deleted_below: Option<u64>,
}

/// Where an install stands after a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Ask for batches from this offset on.
    Need(u64),
    /// Every record is here: call [`Install::finish`].
    Complete,
}

/// A follower's install of one snapshot: checks the missing batches as they come (each chunk
/// is written as it arrives, past the log's recorded end, so memory holds one chunk, not the
/// whole gap), then yields the final write that makes them part of the log.
#[derive(Debug)]
pub struct Install {
    log: LogId,
    /// The snapshot's Raft index: the applied index once installed.
    index: u64,
    target: SnapshotData,
    /// The log state being built: `next_offset` is the next offset wanted.
    state: LogState,
    /// The log restarts here (retention elsewhere deleted what this replica lacks): the final
    /// write deletes everything this replica holds below it.
    drop_below: Option<u64>,
    /// Bytes of batches fetched so far.
    fetched_bytes: u64,
}

/// A checked chunk: its writes, and where the log ends with it.
#[derive(Debug)]
pub struct Chunk {
    pub ops: Vec<WriteOp>,
    next_offset: u64,
    size_bytes: u64,
}

impl Install {
    /// Start installing `target` (at Raft index `index`) over the follower's log `own`.
    pub fn new(
        log: LogId,
        own: LogState,
        index: u64,
        target: SnapshotData,
    ) -> Result<Self, StorageError> {
        let corrupt = |message: String| StorageError::Corrupt {
            what: format!("snapshot of {}/{}", log.topic_id, log.partition),
            message,
        };
        if index <= own.applied_index {
            return Err(corrupt(format!(
                "snapshot index {index} is not past the applied index {}",
                own.applied_index
            )));
        }
        // Offsets are a function of the applied log, so a later index never has fewer records.
        if target.next_offset < own.next_offset || target.log_start_offset > target.next_offset {
            return Err(corrupt(format!(
                "{target:?} is behind this replica's log {own:?}"
            )));
        }
        let start = target.log_start_offset;
        let mut install = Self {
            log,
            index,
            target,
            state: own,
            drop_below: None,
            fetched_bytes: 0,
        };
        if start > own.next_offset {
            // The leader's retention already deleted records this replica lacks: there is no
            // way to fill the gap, so this replica's log restarts where the leader's starts.
            install.restart_log(start);
        }
        Ok(install)
    }

    /// The log restarts at `start`: what this replica holds below it goes with the final write.
    fn restart_log(&mut self, start: u64) {
        self.drop_below = Some(start);
        self.state.log_start_offset = start;
        self.state.next_offset = start;
        self.state.size_bytes = 0;
    }

    pub fn target(&self) -> &SnapshotData {
        &self.target
    }

    pub fn fetched_bytes(&self) -> u64 {
        self.fetched_bytes
    }

    /// What is still needed.
    pub fn progress(&self) -> Progress {
        if self.state.next_offset >= self.target.next_offset {
            Progress::Complete
        } else {
            Progress::Need(self.state.next_offset)
        }
    }

    /// The fetch for what is still needed (None when complete).
    pub fn request(&self, from: u64, request: u64) -> Option<SnapshotFetch> {
        match self.progress() {
            Progress::Complete => None,
            Progress::Need(offset) => Some(SnapshotFetch {
                group: self.log,
                from,
                request,
                offset,
                below: self.target.next_offset,
            }),
        }
    }

    /// A replica's retention deleted the records this install needs below `start` (after the
    /// snapshot was made): like a snapshot whose log starts past this replica's end, the log
    /// restarts at `start`, dropping what it held and what was fetched. None if `start` is not
    /// past what is still needed or beyond the snapshot's end (then ask another replica).
    pub fn restart_at(&mut self, start: u64) -> Option<Progress> {
        if start <= self.state.next_offset || start > self.target.next_offset {
            return None;
        }
        self.restart_log(start);
        Some(self.progress())
    }

    /// Check a chunk's batches: each must pass its CRC check and start exactly where the log
    /// ends. Returns the writes that store them (at their offsets, past the log's recorded end,
    /// so nothing reads them before the install's final write) and the progress once they are
    /// taken with [`Install::accept`]; on any error nothing changes (ask another replica).
    pub fn check(&self, batches: &[Bytes]) -> Result<Chunk, String> {
        if batches.is_empty() {
            return Err("no batches".into());
        }
        let mut next = self.state.next_offset;
        let mut size = 0;
        let mut ops = Vec::with_capacity(batches.len());
        for bytes in batches {
            let header = batch::parse_header(bytes).map_err(|e| e.to_string())?;
            if header.base_offset != next {
                return Err(format!(
                    "batch at offset {} where {next} was expected",
                    header.base_offset
                ));
            }
            if header.next_offset() > self.target.next_offset {
                return Err(format!(
                    "batch ends at {}, past the snapshot's end {}",
                    header.next_offset(),
                    self.target.next_offset
                ));
            }
            if bytes.len() as u64 != header.size_bytes {
                return Err(format!(
                    "batch of {} bytes says it has {}",
                    bytes.len(),
                    header.size_bytes
                ));
            }
            ops.push(WriteOp::Put {
                cf: Cf::Records,
                key: record_key(self.log, next),
                value: bytes.clone(),
            });
            next = header.next_offset();
            size += header.size_bytes;
        }
        Ok(Chunk {
            ops,
            next_offset: next,
            size_bytes: size,
        })
    }

    /// The chunk's writes are queued: the install goes on after it.
    pub fn accept(&mut self, chunk: Chunk) -> Progress {
        debug_assert!(chunk.next_offset >= self.state.next_offset);
        self.state.next_offset = chunk.next_offset;
        self.state.size_bytes += chunk.size_bytes;
        self.fetched_bytes += chunk.size_bytes;
        self.progress()
    }

    /// [`Install::check`] and [`Install::accept`] in one, returning the chunk's writes.
    pub fn offer(&mut self, batches: &[Bytes]) -> Result<(Vec<WriteOp>, Progress), String> {
        let mut chunk = self.check(batches)?;
        let ops = std::mem::take(&mut chunk.ops);
        Ok((ops, self.accept(chunk)))
    }

    /// The final write of the install (the log's new state, and the records below a restarted
    /// log's start deleted; the caller adds the Raft state), and the log state it leaves.
    pub fn finish(mut self) -> Result<Installed, StorageError> {
        if self.progress() != Progress::Complete {
            return Err(StorageError::Corrupt {
                what: format!("snapshot of {}/{}", self.log.topic_id, self.log.partition),
                message: format!(
                    "finished at offset {} of {}",
                    self.state.next_offset, self.target.next_offset
                ),
            });
        }
        self.state.applied_index = self.index;
        let mut ops = Vec::new();
        if let Some(start) = self.drop_below {
            ops.push(WriteOp::DeleteRange {
                cf: Cf::Records,
                from: record_key(self.log, 0),
                to: record_key(self.log, start),
            });
        }
        ops.push(log_state_op(self.log, &self.state));
        // The snapshot's producers replace this replica's, in the same write as the records.
        ops.push(producers_delete(self.log));
        let mut producers = ProducerStates::default();
        for (id, encoded) in &self.target.producers {
            producers.insert(*id, ProducerEntry::decode(encoded)?);
            ops.push(WriteOp::Put {
                cf: Cf::Records,
                key: producer_key(self.log, *id),
                value: Bytes::copy_from_slice(encoded),
            });
        }
        Ok(Installed {
            ops,
            state: self.state,
            producers,
        })
    }
}

/// What a finished install writes, and the state it leaves.
#[derive(Debug)]
pub struct Installed {
    pub ops: Vec<WriteOp>,
    pub state: LogState,
    pub producers: ProducerStates,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::NewRecord;
    use crate::storage::{log_key, producers_prefix};

    const LOG: LogId = LogId {
        topic_id: 3,
        partition: 1,
    };

    fn stored(base: u64, count: usize) -> Bytes {
        let records: Vec<NewRecord> = (0..count)
            .map(|i| NewRecord {
                key: None,
                value: Some(Bytes::from(format!("record {}", base + i as u64))),
            })
            .collect();
        batch::encode(base, 1_000, &records).expect("encode")
    }

    fn own(next: u64, applied: u64) -> LogState {
        LogState {
            log_start_offset: 0,
            next_offset: next,
            size_bytes: 0,
            applied_index: applied,
        }
    }

    fn target(start: u64, next: u64) -> SnapshotData {
        SnapshotData {
            log_start_offset: start,
            next_offset: next,
            source: 1,
            producers: Vec::new(),
        }
    }

    #[test]
    fn fetches_what_is_missing_and_ends_at_the_snapshot() {
        let mut install = Install::new(LOG, own(10, 7), 50, target(0, 30)).expect("install");
        assert_eq!(install.progress(), Progress::Need(10));
        let request = install.request(2, 9).expect("a request");
        assert_eq!((request.offset, request.below, request.from), (10, 30, 2));
        let (first, progress) = install.offer(&[stored(10, 5)]).expect("chunk");
        assert_eq!((first.len(), progress), (1, Progress::Need(15)));
        let (second, progress) = install
            .offer(&[stored(15, 10), stored(25, 5)])
            .expect("chunk");
        assert_eq!((second.len(), progress), (2, Progress::Complete));
        // Each chunk's batches are written as they come, at their offsets.
        assert!(matches!(&second[1], WriteOp::Put { key, .. } if *key == record_key(LOG, 25)));
        let Installed { ops, state, .. } = install.finish().expect("finish");
        assert_eq!((state.next_offset, state.applied_index), (30, 50));
        // The final write is the log state, then the (here: no) producers replacing this
        // replica's.
        assert_eq!(ops.len(), 2);
        assert!(
            matches!(&ops[1], WriteOp::DeleteRange { from, .. } if *from == producers_prefix(LOG))
        );
        assert!(matches!(
            &ops[0],
            WriteOp::Put {
                cf: Cf::Records,
                key,
                ..
            } if *key == log_key(LOG)
        ));
    }

    #[test]
    fn gaps_overlaps_overruns_and_corruption_are_refused_without_keeping_anything() {
        let mut install = Install::new(LOG, own(10, 7), 50, target(0, 30)).expect("install");
        assert!(install.offer(&[]).is_err());
        let gap = install.offer(&[stored(11, 5)]).expect_err("gap");
        assert!(gap.contains("expected"), "{gap}");
        assert!(
            install.offer(&[stored(10, 5), stored(16, 5)]).is_err(),
            "gap inside a chunk"
        );
        let overrun = install.offer(&[stored(10, 25)]).expect_err("overrun");
        assert!(overrun.contains("past"), "{overrun}");
        let mut flipped = stored(10, 5).to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(install.offer(&[Bytes::from(flipped)]).is_err(), "CRC");
        assert_eq!(install.progress(), Progress::Need(10), "nothing was kept");
        assert!(
            install.finish().is_err(),
            "an incomplete install cannot finish"
        );
    }

    #[test]
    fn a_log_the_leader_no_longer_retains_restarts_at_the_leaders_start() {
        let mut install = Install::new(LOG, own(10, 7), 50, target(20, 30)).expect("install");
        assert_eq!(install.progress(), Progress::Need(20));
        assert_eq!(
            install.offer(&[stored(20, 10)]).map(|(_, p)| p),
            Ok(Progress::Complete)
        );
        let Installed { ops, state, .. } = install.finish().expect("finish");
        // What this replica held below the new start goes, and only that.
        assert!(matches!(
            &ops[0],
            WriteOp::DeleteRange { cf: Cf::Records, to, .. } if *to == record_key(LOG, 20)
        ));
        assert_eq!((state.log_start_offset, state.next_offset), (20, 30));
    }

    #[test]
    fn a_snapshot_behind_this_replica_is_refused() {
        assert!(Install::new(LOG, own(10, 7), 7, target(0, 30)).is_err());
        assert!(Install::new(LOG, own(40, 7), 50, target(0, 30)).is_err());
        let already = Install::new(LOG, own(30, 7), 50, target(0, 30)).expect("install");
        assert_eq!(already.progress(), Progress::Complete);
    }

    #[test]
    fn retention_on_the_source_restarts_the_log_where_the_source_now_starts() {
        let mut install = Install::new(LOG, own(10, 7), 50, target(0, 30)).expect("install");
        assert_eq!(
            install.offer(&[stored(10, 5)]).map(|(_, p)| p),
            Ok(Progress::Need(15))
        );
        // Not past what is needed, or past the snapshot's end: not a restart.
        assert_eq!(install.restart_at(12), None);
        assert_eq!(install.restart_at(31), None);
        assert_eq!(install.restart_at(20), Some(Progress::Need(20)));
        assert_eq!(
            install.offer(&[stored(20, 10)]).map(|(_, p)| p),
            Ok(Progress::Complete)
        );
        let Installed { ops, state, .. } = install.finish().expect("finish");
        assert_eq!(
            (
                state.log_start_offset,
                state.next_offset,
                state.applied_index
            ),
            (20, 30, 50)
        );
        // Everything below the new start is dropped (this replica's records and the chunk
        // fetched before the restart), then the state and the producers.
        assert!(matches!(
            &ops[0],
            WriteOp::DeleteRange { cf: Cf::Records, to, .. } if *to == record_key(LOG, 20)
        ));
        assert_eq!(ops.len(), 3);
    }

    #[test]
    fn an_install_replaces_the_producers_with_the_snapshot_s() {
        use crate::producers::{ProducerBatch, ProducerStates};
        let mut leader = ProducerStates::default();
        let batch = ProducerBatch {
            id: 42,
            epoch: 1,
            base_sequence: 0,
            record_count: 3,
        };
        leader.record(&batch, 27, 1_000);
        let mut data = target(0, 30);
        data.producers = leader
            .iter()
            .map(|(id, e)| (id, serde_bytes::ByteBuf::from(e.encode().to_vec())))
            .collect();
        let data = SnapshotData::decode(&data.encode()).expect("decode");
        let install = Install::new(LOG, own(30, 7), 50, data).expect("install");
        let Installed { ops, producers, .. } = install.finish().expect("finish");
        assert_eq!(producers, leader);
        assert!(
            matches!(&ops[1], WriteOp::DeleteRange { from, .. } if *from == producers_prefix(LOG))
        );
        assert!(matches!(&ops[2], WriteOp::Put { key, .. } if *key == producer_key(LOG, 42)));
    }

    #[test]
    fn wire_types_round_trip() {
        let data = target(5, 99);
        assert_eq!(SnapshotData::decode(&data.encode()).expect("decode"), data);
        let chunk = SnapshotChunk {
            group: LOG,
            request: 4,
            batches: vec![stored(0, 2)],
            error: None,
            deleted_below: Some(3),
        };
        let bytes = rmp_serde::to_vec(&chunk).expect("encode");
        let back: SnapshotChunk = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(back, chunk);
        // Batches travel as binary, not as arrays of numbers.
        assert!(bytes.len() < chunk.batches[0].len() + 64);
    }
}
