//! Stream jobs as replicated state: each job's spec and last checkpoint live in the offsets
//! partition its name hashes to, applied by that partition's [`OffsetsMachine`] like a group's
//! offsets (a job is to its checkpoint what a group is to its committed offsets), and written to
//! the `checkpoints` column family in the same batch as the partition's applied index.
//!
//! A job's runner moves its epoch on when it takes the job over; a checkpoint is checked
//! against the epoch *at apply*, so a deposed runner's late checkpoint is refused on every
//! replica.
//!
//! [`OffsetsMachine`]: crate::groups::offsets_machine::OffsetsMachine

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::spec::JobSpec;

/// One job as applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The Raft index that created it: a job deleted and created again under the same name
    /// is another job, and never resumes the old one's checkpoint.
    pub uid: u64,
    pub spec: JobSpec,
    /// Moves on with every takeover by a runner.
    pub epoch: u32,
    pub created_at_ms: i64,
    /// The last checkpoint (see `streams::checkpoint`), and when its runner took it.
    pub checkpoint: Option<Bytes>,
    pub checkpointed_at_ms: Option<i64>,
}

/// A job's commands, entries of its offsets partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JobCommand {
    Create {
        spec: JobSpec,
        created_at_ms: i64,
    },
    /// A runner takes the job over at `epoch` (the current one + 1).
    Takeover {
        job: String,
        uid: u64,
        epoch: u32,
    },
    Checkpoint {
        job: String,
        uid: u64,
        epoch: u32,
        data: Bytes,
        at_ms: i64,
    },
    Delete {
        job: String,
    },
}

impl JobCommand {
    pub fn job(&self) -> &str {
        match self {
            JobCommand::Create { spec, .. } => &spec.name,
            JobCommand::Takeover { job, .. }
            | JobCommand::Checkpoint { job, .. }
            | JobCommand::Delete { job } => job,
        }
    }
}

/// Why a job command was refused at apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobRefusal {
    #[error("stream job '{0}' already exists")]
    Exists(String),
    #[error("stream job '{0}' does not exist")]
    NoSuchJob(String),
    /// Another runner took the job over (or it was deleted and created again).
    #[error("stream job '{job}' was taken over (epoch {current}, this runner's {sent})")]
    Fenced {
        job: String,
        sent: u32,
        current: u32,
    },
}

/// Every job of one offsets partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jobs {
    jobs: BTreeMap<String, JobRecord>,
}

impl Jobs {
    pub fn get(&self, job: &str) -> Option<&JobRecord> {
        self.jobs.get(job)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &JobRecord)> {
        self.jobs.iter()
    }

    pub fn insert(&mut self, job: String, record: JobRecord) {
        self.jobs.insert(job, record);
    }

    /// Apply `command` at Raft `index`; returns the job as it now stands (None once deleted)
    /// for the caller to persist, or why it was refused.
    pub fn apply(
        &mut self,
        index: u64,
        command: JobCommand,
    ) -> Result<(String, Option<JobRecord>), JobRefusal> {
        match command {
            JobCommand::Create {
                spec,
                created_at_ms,
            } => {
                if self.jobs.contains_key(&spec.name) {
                    return Err(JobRefusal::Exists(spec.name));
                }
                let name = spec.name.clone();
                let record = JobRecord {
                    uid: index,
                    spec,
                    epoch: 0,
                    created_at_ms,
                    checkpoint: None,
                    checkpointed_at_ms: None,
                };
                self.jobs.insert(name.clone(), record.clone());
                Ok((name, Some(record)))
            }
            JobCommand::Takeover { job, uid, epoch } => {
                let record = self.current(&job, uid)?;
                if epoch <= record.epoch {
                    return Err(JobRefusal::Fenced {
                        job,
                        sent: epoch,
                        current: record.epoch,
                    });
                }
                record.epoch = epoch;
                let record = record.clone();
                Ok((job, Some(record)))
            }
            JobCommand::Checkpoint {
                job,
                uid,
                epoch,
                data,
                at_ms,
            } => {
                let record = self.current(&job, uid)?;
                if epoch != record.epoch {
                    return Err(JobRefusal::Fenced {
                        job,
                        sent: epoch,
                        current: record.epoch,
                    });
                }
                record.checkpoint = Some(data);
                record.checkpointed_at_ms = Some(at_ms);
                let record = record.clone();
                Ok((job, Some(record)))
            }
            JobCommand::Delete { job } => match self.jobs.remove(&job) {
                Some(_) => Ok((job, None)),
                None => Err(JobRefusal::NoSuchJob(job)),
            },
        }
    }

    /// The job `job` if it is the incarnation `uid`.
    fn current(&mut self, job: &str, uid: u64) -> Result<&mut JobRecord, JobRefusal> {
        match self.jobs.get_mut(job) {
            Some(record) if record.uid == uid => Ok(record),
            Some(record) => Err(JobRefusal::Fenced {
                job: job.to_owned(),
                sent: 0,
                current: record.epoch,
            }),
            None => Err(JobRefusal::NoSuchJob(job.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> JobSpec {
        serde_json::from_str(&format!(
            r#"{{"name":"{name}","input":"in","output":"out","window":{{"kind":"tumbling","size_ms":1000}},"aggregation":"count"}}"#
        ))
        .expect("spec")
    }

    fn checkpoint(job: &str, uid: u64, epoch: u32) -> JobCommand {
        JobCommand::Checkpoint {
            job: job.into(),
            uid,
            epoch,
            data: Bytes::from_static(b"state"),
            at_ms: 1,
        }
    }

    #[test]
    fn a_deposed_runner_s_checkpoint_is_refused_at_apply() {
        let mut jobs = Jobs::default();
        let create = JobCommand::Create {
            spec: spec("j"),
            created_at_ms: 0,
        };
        jobs.apply(7, create).expect("created");
        let takeover = |epoch| JobCommand::Takeover {
            job: "j".into(),
            uid: 7,
            epoch,
        };
        jobs.apply(8, takeover(1)).expect("first runner");
        jobs.apply(9, checkpoint("j", 7, 1))
            .expect("its checkpoint");
        jobs.apply(10, takeover(2)).expect("second runner");
        assert!(matches!(
            jobs.apply(11, checkpoint("j", 7, 1)),
            Err(JobRefusal::Fenced {
                sent: 1,
                current: 2,
                ..
            })
        ));
        assert!(matches!(
            jobs.apply(12, takeover(2)),
            Err(JobRefusal::Fenced { .. })
        ));
        assert_eq!(jobs.get("j").map(|j| j.epoch), Some(2));
    }

    #[test]
    fn a_job_created_again_under_its_name_never_takes_the_old_one_s_checkpoint() {
        let mut jobs = Jobs::default();
        let create = || JobCommand::Create {
            spec: spec("j"),
            created_at_ms: 0,
        };
        jobs.apply(1, create()).expect("created");
        assert_eq!(
            jobs.apply(2, create()).map(|_| ()),
            Err(JobRefusal::Exists("j".into()))
        );
        jobs.apply(3, JobCommand::Delete { job: "j".into() })
            .expect("deleted");
        jobs.apply(4, create()).expect("created again");
        assert!(matches!(
            jobs.apply(5, checkpoint("j", 1, 0)),
            Err(JobRefusal::Fenced { .. })
        ));
        assert_eq!(jobs.get("j").and_then(|j| j.checkpoint.clone()), None);
    }
}
