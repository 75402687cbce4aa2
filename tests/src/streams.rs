//! Stream-job helpers: place jobs, read their output, and recompute their results offline from
//! the input log with the same window engine, per input partition as the job runs it.

use anyhow::{anyhow, ensure, Result};
use loadgen::stream_verify::{self, Results};
use serde_json::Value;

use crate::workload::fetch_partition;
use crate::{BrokerProcess, Client};

/// The offsets partition a job named `name` lives on (as `streams::job_partition` computes it).
pub fn job_partition(name: &str, partitions: u32) -> u32 {
    let hash = murmur2::murmur2(format!("stream-job:{name}").as_bytes(), 0x9747_b28c) as i32;
    ((hash & 0x7fff_ffff) as u32) % partitions
}

/// `count` job names starting with `prefix` that share one offsets partition (of 8), so one
/// broker runs them all.
pub fn colocated_names(prefix: &str, count: usize) -> Vec<String> {
    let target = job_partition(&format!("{prefix}-0"), 8);
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|n| job_partition(n, 8) == target)
        .take(count)
        .collect()
}

/// What job `job` wrote to `output` (from `broker`), with every duplicate listed.
pub fn read_results(
    http: &Client,
    broker: &BrokerProcess,
    output: &str,
    partitions: u32,
    job: &str,
) -> Result<(Results, Vec<String>)> {
    let mut records = Vec::new();
    for p in 0..partitions {
        for record in fetch_partition(http, broker, output, p)? {
            records.push((record.key, record.value));
        }
    }
    stream_verify::written(&records, job)
}

/// Final results of `spec` over the input log as `broker` holds it: one engine per input
/// partition, fed in offset order.
pub fn recompute(
    http: &Client,
    broker: &BrokerProcess,
    spec: &Value,
    partitions: u32,
) -> Result<Results> {
    let input = spec["input"].as_str().ok_or_else(|| anyhow!("no input"))?;
    let mut logs = Vec::new();
    for p in 0..partitions {
        let records = fetch_partition(http, broker, input, p)?;
        logs.push(records.into_iter().map(|r| (r.key, r.value)).collect());
    }
    stream_verify::recompute(spec, &logs).map(|r| r.results)
}

/// Missing, duplicated and wrong results of a job against the recomputation, as lines.
pub fn compare(expected: &Results, got: &Results, duplicates: &[String]) -> Vec<String> {
    let c = stream_verify::compare(expected, got, duplicates);
    if c.is_clean() {
        Vec::new()
    } else {
        let mut lines = vec![format!(
            "{} missing, {} duplicated, {} wrong, {} unexpected",
            c.missing, c.duplicated, c.wrong, c.unexpected
        )];
        lines.extend(c.examples);
        lines
    }
}

/// A job's status from the broker running it (following its redirect).
pub fn job_status(http: &Client, brokers: &[BrokerProcess], job: &str) -> Option<Value> {
    for broker in brokers.iter().filter(|b| b.is_running()) {
        let reply = http.get(&broker.url(&format!("/streams/{job}"))).ok()?;
        if reply.status == 200 {
            return Some(reply.body);
        }
    }
    None
}

/// Check every figure of a status is there.
pub fn ensure_status_shape(status: &Value) -> Result<()> {
    for field in [
        "runs_on",
        "phase",
        "lag",
        "records_in",
        "late_records",
        "dropped_records",
        "skipped_records",
        "results_out",
        "pending_results",
        "input",
    ] {
        ensure!(
            status.get(field).is_some(),
            "status lacks {field}: {status}"
        );
    }
    Ok(())
}
