//! Committed consumer offsets as a [`StateMachine`]: the commands a partition of the offsets
//! topic applies (a group's generation moving on, a commit, a group deleted), checked at apply so
//! every replica accepts and refuses the same commits, each change fsync'd with its Ready into
//! `group_offsets` under the partition's key prefix, and the partition's whole state as its
//! snapshot.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::StorageError;
use crate::state_machine::{Durability, StateMachine};
use crate::storage::keys::{log_key, Cf, WriteOp};
use crate::storage::Storage;
use crate::streams::machine::{JobCommand, JobRecord, JobRefusal, Jobs};
use crate::topic::LogId;

/// One committed offset: the next offset the group will consume, as in Kafka.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    pub offset: u64,
    /// Client metadata stored with the commit (Kafka's `committed_metadata`).
    pub metadata: String,
    /// Proposer's clock when committed (informational; never compared across replicas).
    pub committed_at_ms: i64,
}

/// A partition of a topic, as a group commits offsets for it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: u32,
}

/// A group's commands, the offsets partition's log entries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GroupCommand {
    /// The group's coordinator moved it to `generation` (a rebalance completed): commits of older
    /// generations are refused from now on.
    Generation { group: String, generation: u32 },
    /// Offsets committed by a member of `generation`, or with `generation` None by a client
    /// outside group management (manual assignment), which Kafka also accepts.
    Commit {
        group: String,
        generation: Option<u32>,
        offsets: Vec<(TopicPartition, Committed)>,
    },
    /// The group and all its offsets go.
    DeleteGroup { group: String },
    /// A stream job's command (its spec and checkpoints live here too, in `checkpoints`).
    Job(JobCommand),
}

/// Why a command was refused at apply; the proposer's client gets it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupRefusal {
    /// Kafka's ILLEGAL_GENERATION: the member's generation is not the group's.
    #[error("group '{group}' is at generation {current}; a commit of generation {sent} is refused (rejoin the group)")]
    IllegalGeneration {
        group: String,
        sent: u32,
        current: u32,
    },
    /// A takeover must move the epoch on: an equal one is a second coordinator's.
    #[error("group '{group}' is at coordinator epoch {current}; a takeover at {sent} is not newer (another broker took the group over)")]
    GenerationBackwards {
        group: String,
        sent: u32,
        current: u32,
    },
    #[error("group '{0}' does not exist")]
    NoSuchGroup(String),
    #[error(transparent)]
    Job(#[from] JobRefusal),
}

/// What applying a command did: a takeover (`Generation`) returns the group's state as of
/// its apply, which is what the new coordinator must start from (a commit applied between
/// reading the state and the takeover would be missing from an earlier read).
pub type GroupApplied = Result<Option<GroupState>, GroupRefusal>;

/// One group's applied state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    pub generation: u32,
    pub offsets: BTreeMap<TopicPartition, Committed>,
}

/// Every group of one offsets partition, as applied (writes in flight included).
#[derive(Debug, Clone)]
pub struct OffsetsMachine {
    log: LogId,
    groups: BTreeMap<String, GroupState>,
    jobs: Jobs,
    applied_index: u64,
}

/// A partition's whole state, its snapshot.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    groups: BTreeMap<String, GroupState>,
    jobs: Jobs,
}

/// Key tags under a partition's prefix in `group_offsets`.
const APPLIED_TAG: u8 = 0;
const GROUP_TAG: u8 = 1;
/// Under the partition's prefix in `checkpoints`: a job's record, by name.
const JOB_TAG: u8 = 1;

impl OffsetsMachine {
    /// An empty machine for offsets partition `log`.
    pub fn new(log: LogId) -> Self {
        Self {
            log,
            groups: BTreeMap::new(),
            jobs: Jobs::default(),
            applied_index: 0,
        }
    }

    /// The machine as `storage` holds it durably: every key under the partition's prefix in
    /// `group_offsets` (at start, and after a crash).
    pub fn from_durable(log: LogId, storage: &Storage) -> Result<Self, StorageError> {
        let mut machine = Self::new(log);
        let prefix = log_key(log);
        let corrupt = |key: &[u8], message: String| StorageError::Corrupt {
            what: format!("group_offsets key {key:?} of {log:?}"),
            message,
        };
        for (key, value) in storage.load_prefix(Cf::GroupOffsets, &prefix)? {
            match key.get(prefix.len()) {
                Some(&APPLIED_TAG) => {
                    let bytes: [u8; 8] = value
                        .as_slice()
                        .try_into()
                        .map_err(|_| corrupt(&key, format!("{} bytes", value.len())))?;
                    machine.applied_index = u64::from_be_bytes(bytes);
                }
                Some(&GROUP_TAG) => {
                    let group = String::from_utf8(key[prefix.len() + 1..].to_vec())
                        .map_err(|e| corrupt(&key, e.to_string()))?;
                    let state: GroupState =
                        rmp_serde::from_slice(&value).map_err(|e| corrupt(&key, e.to_string()))?;
                    machine.groups.insert(group, state);
                }
                _ => return Err(corrupt(&key, "unknown tag".into())),
            }
        }
        for (key, value) in storage.load_prefix(Cf::Checkpoints, &prefix)? {
            if key.get(prefix.len()) != Some(&JOB_TAG) {
                return Err(corrupt(&key, "unknown checkpoints tag".into()));
            }
            let job = String::from_utf8(key[prefix.len() + 1..].to_vec())
                .map_err(|e| corrupt(&key, e.to_string()))?;
            let record: JobRecord =
                rmp_serde::from_slice(&value).map_err(|e| corrupt(&key, e.to_string()))?;
            machine.jobs.insert(job, record);
        }
        Ok(machine)
    }

    /// Every group with applied state, by name.
    pub fn groups(&self) -> impl Iterator<Item = (&String, &GroupState)> {
        self.groups.iter()
    }

    /// A group's applied state, if it has one.
    pub fn group(&self, group: &str) -> Option<&GroupState> {
        self.groups.get(group)
    }

    /// Every stream job of this partition, as applied.
    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    fn job_key(&self, job: &str) -> Vec<u8> {
        let mut key = log_key(self.log);
        key.push(JOB_TAG);
        key.extend_from_slice(job.as_bytes());
        key
    }

    fn put_job(&self, job: &str, record: Option<&JobRecord>, ops: &mut Vec<WriteOp>) {
        let key = self.job_key(job);
        ops.push(match record {
            Some(record) => WriteOp::Put {
                cf: Cf::Checkpoints,
                key,
                value: encode(record),
            },
            None => WriteOp::Delete {
                cf: Cf::Checkpoints,
                key,
            },
        });
    }

    /// Key of `group`'s state: the partition's prefix, a tag, then the group name (the rest of
    /// the key, so names need no escaping).
    fn group_key(&self, group: &str) -> Vec<u8> {
        let mut key = log_key(self.log);
        key.push(GROUP_TAG);
        key.extend_from_slice(group.as_bytes());
        key
    }

    fn applied_key(&self) -> Vec<u8> {
        let mut key = log_key(self.log);
        key.push(APPLIED_TAG);
        key
    }

    fn put_group(&self, group: &str, ops: &mut Vec<WriteOp>) {
        let state = self.groups.get(group).cloned().unwrap_or_default();
        ops.push(WriteOp::Put {
            cf: Cf::GroupOffsets,
            key: self.group_key(group),
            value: encode(&state),
        });
    }

    fn apply_command(
        &mut self,
        index: u64,
        command: GroupCommand,
        ops: &mut Vec<WriteOp>,
    ) -> GroupApplied {
        match command {
            GroupCommand::Job(command) => {
                let (job, record) = self.jobs.apply(index, command)?;
                self.put_job(&job, record.as_ref(), ops);
                Ok(None)
            }
            GroupCommand::Generation { group, generation } => {
                let state = self.groups.entry(group.clone()).or_default();
                if generation <= state.generation {
                    return Err(GroupRefusal::GenerationBackwards {
                        group,
                        sent: generation,
                        current: state.generation,
                    });
                }
                state.generation = generation;
                let state = state.clone();
                self.put_group(&group, ops);
                Ok(Some(state))
            }
            GroupCommand::Commit {
                group,
                generation,
                offsets,
            } => {
                let state = self.groups.entry(group.clone()).or_default();
                if let Some(sent) = generation.filter(|sent| *sent != state.generation) {
                    return Err(GroupRefusal::IllegalGeneration {
                        group,
                        sent,
                        current: state.generation,
                    });
                }
                state.offsets.extend(offsets);
                self.put_group(&group, ops);
                Ok(None)
            }
            GroupCommand::DeleteGroup { group } => {
                if self.groups.remove(&group).is_none() {
                    return Err(GroupRefusal::NoSuchGroup(group));
                }
                ops.push(WriteOp::Delete {
                    cf: Cf::GroupOffsets,
                    key: self.group_key(&group),
                });
                Ok(None)
            }
        }
    }
}

impl StateMachine for OffsetsMachine {
    type Effect = GroupApplied;

    const DURABILITY: Durability = Durability::Synced;

    fn column_families(&self) -> &'static [Cf] {
        &[Cf::GroupOffsets, Cf::Checkpoints]
    }

    fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// A command that does not decode was not proposed by a broker (every proposer encodes its
    /// own): applying around it would fork the replicas, so the actor stops and restarts.
    fn apply(&mut self, index: u64, data: &[u8], ops: &mut Vec<WriteOp>) -> GroupApplied {
        match rmp_serde::from_slice(data) {
            Ok(command) => self.apply_command(index, command, ops),
            Err(e) => panic!(
                "offsets entry {index} of {:?} does not decode: {e}",
                self.log
            ),
        }
    }

    fn applied_op(&mut self, index: u64) -> WriteOp {
        self.applied_index = index;
        WriteOp::Put {
            cf: Cf::GroupOffsets,
            key: self.applied_key(),
            value: Bytes::copy_from_slice(&index.to_be_bytes()),
        }
    }

    fn snapshot(&self) -> Bytes {
        encode(&Snapshot {
            groups: self.groups.clone(),
            jobs: self.jobs.clone(),
        })
    }

    fn restore(
        &mut self,
        index: u64,
        data: &[u8],
    ) -> Result<(Vec<WriteOp>, Vec<GroupApplied>), StorageError> {
        let snapshot: Snapshot =
            rmp_serde::from_slice(data).map_err(|e| StorageError::Corrupt {
                what: format!("offsets snapshot of {:?}", self.log),
                message: e.to_string(),
            })?;
        let prefix = log_key(self.log);
        let mut end = prefix.clone();
        end.push(u8::MAX);
        let mut ops: Vec<WriteOp> = [Cf::GroupOffsets, Cf::Checkpoints]
            .into_iter()
            .map(|cf| WriteOp::DeleteRange {
                cf,
                from: prefix.clone(),
                to: end.clone(),
            })
            .collect();
        self.groups = snapshot.groups;
        self.jobs = snapshot.jobs;
        for group in self.groups.keys() {
            self.put_group(group, &mut ops);
        }
        for (job, record) in self.jobs.iter() {
            self.put_job(job, Some(record), &mut ops);
        }
        ops.push(self.applied_op(index));
        Ok((ops, Vec::new()))
    }
}

/// MessagePack of plain data; it cannot fail, and persisting something else would fork the
/// replicas, so a failure is a bug.
fn encode(value: &impl Serialize) -> Bytes {
    match rmp_serde::to_vec_named(value) {
        Ok(encoded) => Bytes::from(encoded),
        Err(e) => panic!("encoding group state failed: {e}"),
    }
}

#[cfg(test)]
mod tests;
