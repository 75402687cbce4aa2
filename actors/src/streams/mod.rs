//! Stream jobs: windowed aggregations (the `pubg1-streaming` crate's engine) run inside the
//! cluster, each by a [`job::WindowJob`] actor on the leader of the offsets partition its
//! name hashes to, with its spec and checkpoints replicated in that partition
//! ([`machine`]) and its results written to an output topic exactly once ([`checkpoint`]).

pub mod checkpoint;
pub mod job;
pub mod machine;
mod remote;
pub mod spec;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use pubg1_streaming::{Window, WindowResult};
use serde::Serialize;

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::storage::Storage;
use crate::transport::Cluster;
use machine::JobRecord;
use spec::JobSpec;

/// What a runner works with.
#[derive(Debug, Clone)]
pub struct JobSettings {
    pub storage: Storage,
    pub registry: Registry,
    pub cluster: Cluster,
    pub metrics: Arc<Metrics>,
    /// How long a new runner waits before it looks at the output (a deposed one stops first).
    pub takeover_hold: Duration,
    pub checkpoint_interval: Duration,
}

/// The offsets partition (and so the runner) of job `name`: its own hash space, apart from
/// groups', so a job and a group of the same name need not share a partition.
pub fn job_partition(name: &str, partitions: u32) -> u32 {
    crate::partitioner::partition_for_key(format!("stream-job:{name}").as_bytes(), partitions)
}

/// A job's applied record (on its offsets partition's replicas).
#[derive(Debug, Message)]
#[rtype(result = "Option<JobRecord>")]
pub struct GetJob(pub String);

/// Every job of an offsets partition (or the one named), as it stands.
#[derive(Debug, Message)]
#[rtype(result = "Vec<JobView>")]
pub struct DescribeJobs(pub Option<String>);

/// The open windows of `key` in job `job`, per input partition; only where the job runs.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<PartitionWindows>, String>")]
pub struct JobWindows {
    pub job: String,
    pub key: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionWindows {
    pub input_partition: u32,
    pub stream_time: Option<i64>,
    pub watermark: Option<i64>,
    pub open: Vec<WindowResult>,
    /// Records dropped as too late for a window of this key, per window (recent ones).
    pub dropped: Vec<(Window, u64)>,
}

/// One input partition's progress.
#[derive(Debug, Clone, Serialize)]
pub struct InputProgress {
    pub partition: u32,
    /// Next offset the job reads.
    pub offset: u64,
    pub high_watermark: u64,
    pub lag: u64,
}

/// A job's status, from its runner's live state where it runs, else from its checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub spec: JobSpec,
    pub uid: u64,
    pub epoch: u32,
    pub offsets_partition: u32,
    /// Broker the job runs on (its offsets partition's leader), 0 while none is known.
    pub runs_on: u64,
    /// `running`, `taking over`, `writing pending results`, `stopped: …`, or `runs on
    /// another broker` (the figures are then the last checkpoint's).
    pub phase: String,
    pub created_at_ms: i64,
    pub last_checkpoint_at_ms: Option<i64>,
    pub input: Vec<InputProgress>,
    pub lag: u64,
    pub records_in: u64,
    pub late_records: u64,
    pub dropped_records: u64,
    pub skipped_records: BTreeMap<String, u64>,
    pub results_out: u64,
    /// Results decided by the last checkpoint and not yet known to be in the output.
    pub pending_results: usize,
}
