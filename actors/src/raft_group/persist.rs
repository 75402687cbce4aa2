//! What a Raft group asks to have made durable, as typed intents rather than RocksDB writes, so
//! the rules of *what* is written *when* (a divergent tail replaced, compaction bounded by what a
//! crash cannot undo, a snapshot replacing the stored log) can be checked without RocksDB.
//! [`writes`] turns intents into the writes of the `raft_log` and `raft_state` column families.

use bytes::Bytes;
use raft::prelude::{Entry, HardState};

use crate::storage::keys::{compacted_key, hard_state_key, raft_entry_key, Cf, WriteOp};
use crate::topic::LogId;

/// One thing to make durable, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Persist {
    /// Stored entries `from..=through` go: a new leader's entries replace what a previous
    /// leader left there.
    Truncate { from: u64, through: u64 },
    /// An entry of the log.
    Entry(Entry),
    /// Term, vote and commit index.
    HardState(HardState),
    /// Entries through `index` go, and the log starts after (`index`, `term`): compaction.
    Compact { index: u64, term: u64 },
    /// Every stored entry goes and the log starts after (`index`, `term`): a snapshot from the
    /// leader replaces it.
    ReplaceBySnapshot { index: u64, term: u64 },
}

/// The RocksDB writes that make `intents` of `group` durable, in order.
pub fn writes(group: LogId, intents: Vec<Persist>) -> Vec<WriteOp> {
    let mut ops = Vec::with_capacity(intents.len());
    for intent in intents {
        match intent {
            Persist::Truncate { from, through } => ops.push(WriteOp::DeleteRange {
                cf: Cf::RaftLog,
                from: raft_entry_key(group, from),
                to: raft_entry_key(group, through + 1),
            }),
            Persist::Entry(entry) => ops.push(WriteOp::Put {
                cf: Cf::RaftLog,
                key: raft_entry_key(group, entry.index),
                value: encode(&entry),
            }),
            Persist::HardState(hard_state) => ops.push(WriteOp::Put {
                cf: Cf::RaftState,
                key: hard_state_key(group),
                value: encode(&hard_state),
            }),
            Persist::Compact { index, term } => {
                ops.push(WriteOp::DeleteRange {
                    cf: Cf::RaftLog,
                    from: raft_entry_key(group, 0),
                    to: raft_entry_key(group, index + 1),
                });
                ops.push(compacted_op(group, index, term));
            }
            Persist::ReplaceBySnapshot { index, term } => {
                ops.push(WriteOp::DeleteRange {
                    cf: Cf::RaftLog,
                    from: raft_entry_key(group, 0),
                    to: raft_entry_key(group, u64::MAX),
                });
                ops.push(compacted_op(group, index, term));
            }
        }
    }
    ops
}

/// The durable marker of the last entry compacted away (or covered by a snapshot).
fn compacted_op(group: LogId, index: u64, term: u64) -> WriteOp {
    let mut marker = index.to_be_bytes().to_vec();
    marker.extend_from_slice(&term.to_be_bytes());
    WriteOp::Put {
        cf: Cf::RaftState,
        key: compacted_key(group),
        value: Bytes::from(marker),
    }
}

/// Protobuf encoding of an entry or hard state. It fails only for messages missing required
/// fields, which raft-rs's types have none of; persisting an empty value instead would corrupt
/// the log, so a failure is a bug.
fn encode(message: &impl protobuf::Message) -> Bytes {
    match message.write_to_bytes() {
        Ok(bytes) => Bytes::from(bytes),
        Err(e) => panic!("encoding a raft message failed: {e}"),
    }
}
