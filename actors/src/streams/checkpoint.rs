//! What a job checkpoints, and its results as output records.
//!
//! A checkpoint is the job's whole state at a point in its input: per input partition the next
//! offset and the window engine; the results decided since the last checkpoint (`pending`), each
//! with its sequence number and output partition; and per output partition the offset after the
//! job's last result known to be there. Results are written to the output only after the
//! checkpoint that decided them is committed, so a runner that takes over publishes exactly the
//! pending results the output does not hold yet (found by sequence number after `positions`),
//! and never a second, different version of one.

use std::collections::BTreeMap;

use bytes::Bytes;
use pubg1_streaming::extract::Skip;
use pubg1_streaming::{Engine, Output, WindowResult};
use serde::{Deserialize, Serialize};

/// One input partition's progress: Kafka Streams' task (stream time is per partition, so
/// what a partition's records produce depends on that partition's log alone).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Task {
    pub partition: u32,
    /// Next input offset to read.
    pub offset: u64,
    pub engine: Engine,
}

/// One result, decided, to be written to the output topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRecord {
    pub seq: u64,
    pub partition: u32,
    pub key: Bytes,
    pub value: Bytes,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub records_in: u64,
    pub skipped: BTreeMap<Skip, u64>,
    pub late: u64,
    pub results_out: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The ids of the input and output topics when the job first ran: a topic deleted and
    /// created again under its name is another log, which the offsets and positions here do
    /// not describe.
    #[serde(default)]
    pub topic_ids: Option<(u32, u32)>,
    pub tasks: Vec<Task>,
    pub next_seq: u64,
    pub pending: Vec<OutputRecord>,
    pub positions: BTreeMap<u32, u64>,
    pub counters: Counters,
}

/// Largest checkpoint a job may take (it is one Raft entry, replicated and fsync'd).
pub const CHECKPOINT_BYTES_MAX: usize = 16 * 1024 * 1024;

impl Checkpoint {
    pub fn encode(&self) -> Result<Bytes, String> {
        // Named fields: a later version can add one (with a default) and still read this.
        let bytes = rmp_serde::to_vec_named(self).map_err(|e| e.to_string())?;
        if bytes.len() > CHECKPOINT_BYTES_MAX {
            return Err(format!(
                "the job's state is {} bytes, more than a checkpoint may hold ({CHECKPOINT_BYTES_MAX}); \
                 use fewer keys, shorter windows or less grace",
                bytes.len()
            ));
        }
        Ok(Bytes::from(bytes))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
    }

    /// Bytes of the results waiting for a checkpoint.
    pub fn pending_bytes(&self) -> usize {
        self.pending
            .iter()
            .map(|r| r.key.len() + r.value.len() + 16)
            .sum()
    }

    /// Records dropped as too late, over all tasks.
    pub fn dropped(&self) -> u64 {
        self.tasks.iter().map(|t| t.engine.dropped_total()).sum()
    }
}

/// The output record of one result: key = the group key; value = a JSON object naming the job
/// (name and uid: a job created again under its name is another job) and the result's sequence
/// number (how a new runner recognizes what is already written),
/// the input partition, the window, the aggregate and how many late records it took. Numbers
/// are written as the exact decimals they are.
pub fn result_value(job: &str, uid: u64, seq: u64, input_partition: u32, output: &Output) -> Bytes {
    let (kind, result): (&str, &WindowResult) = match output {
        Output::Final(r) => ("final", r),
        Output::Update(r) => ("update", r),
    };
    let text = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let value = result
        .value
        .map_or_else(|| "null".to_owned(), |v| v.normalize().to_string());
    Bytes::from(format!(
        r#"{{"job":{},"uid":{uid},"seq":{seq},"input_partition":{input_partition},"key":{},"window":{{"start":{},"end":{}}},"emit":"{kind}","value":{value},"count":{},"late":{}}}"#,
        text(job),
        text(&result.key),
        result.window.start,
        result.window.end,
        result.aggregate.count,
        result.late,
    ))
}

/// The (job, uid, seq) an output record names, if it is a job's result.
pub fn result_tag(value: &[u8]) -> Option<(String, u64, u64)> {
    #[derive(Deserialize)]
    struct Tag {
        job: String,
        uid: u64,
        seq: u64,
    }
    serde_json::from_slice::<Tag>(value)
        .ok()
        .map(|t| (t.job, t.uid, t.seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pubg1_streaming::{Aggregate, Decimal, Window};

    #[test]
    fn a_result_is_json_with_exact_numbers_and_its_tag() {
        let result = WindowResult {
            key: "s\"1".into(),
            window: Window {
                start: 0,
                end: 1000,
            },
            aggregate: Aggregate {
                count: 2,
                sum: Decimal::new(1050, 2),
                min: None,
                max: None,
            },
            value: Some(Decimal::new(1050, 2)),
            late: 1,
        };
        let value = result_value("j", 11, 7, 3, &Output::Final(result));
        let json: serde_json::Value = serde_json::from_slice(&value).expect("json");
        assert_eq!(json["value"].to_string(), "10.5");
        assert_eq!(json["key"], "s\"1");
        assert_eq!(json["window"]["end"], 1000);
        assert_eq!(json["emit"], "final");
        assert_eq!(result_tag(&value), Some(("j".into(), 11, 7)));
        assert_eq!(result_tag(b"{\"job\":\"j\",\"seq\":7}"), None);
    }
}
