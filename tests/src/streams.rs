//! Stream-job helpers: place jobs, read their output, and recompute their results offline from
//! the input log with the same window engine, per input partition as the job runs it.

use std::collections::BTreeMap;
use std::str::FromStr;

use anyhow::{anyhow, bail, ensure, Result};
use pubg1_streaming::extract::{Extraction, Field};
use pubg1_streaming::{Aggregation, Decimal, EmitMode, Engine, Output, Spec, WindowKind};
use serde::Deserialize;
use serde_json::value::RawValue;
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

/// A result as the job wrote it (numbers kept as their exact text).
#[derive(Debug, Deserialize)]
struct Written<'a> {
    job: String,
    seq: u64,
    input_partition: u32,
    key: String,
    window: Window,
    #[serde(borrow)]
    value: &'a RawValue,
    count: u64,
    late: u64,
}

#[derive(Debug, Deserialize)]
struct Window {
    start: i64,
    end: i64,
}

/// (input partition, key, window start, window end) → (value, count, late).
pub type Results = BTreeMap<(u32, String, i64, i64), (Option<Decimal>, u64, u64)>;

fn decimal(text: &str) -> Result<Option<Decimal>> {
    if text == "null" {
        return Ok(None);
    }
    Decimal::from_str(text)
        .map(|d| Some(d.normalize()))
        .map_err(|e| anyhow!("{text}: {e}"))
}

/// What a job wrote to `output`, with every duplicate (same window twice, or one sequence
/// number twice) listed.
pub fn read_results(
    http: &Client,
    broker: &BrokerProcess,
    output: &str,
    partitions: u32,
    job: &str,
) -> Result<(Results, Vec<String>)> {
    let mut results = Results::new();
    let mut duplicates = Vec::new();
    let mut seqs = std::collections::HashSet::new();
    for p in 0..partitions {
        for record in fetch_partition(http, broker, output, p)? {
            let bytes = record
                .value
                .ok_or_else(|| anyhow!("an output record has no value"))?;
            let written: Written =
                serde_json::from_slice(&bytes).map_err(|e| anyhow!("output record: {e}"))?;
            if written.job != job {
                continue;
            }
            if !seqs.insert(written.seq) {
                duplicates.push(format!("seq {} twice", written.seq));
            }
            let id = (
                written.input_partition,
                written.key,
                written.window.start,
                written.window.end,
            );
            let result = (decimal(written.value.get())?, written.count, written.late);
            if let Some(earlier) = results.insert(id.clone(), result) {
                duplicates.push(format!("{id:?} twice (first {earlier:?})"));
            }
        }
    }
    Ok((results, duplicates))
}

/// The engine spec and extraction of a `POST /streams` body.
pub fn engine_of(spec: &Value) -> Result<(Spec, Extraction)> {
    let window: WindowKind = serde_json::from_value(spec["window"].clone())?;
    let aggregation: Aggregation = serde_json::from_value(spec["aggregation"].clone())?;
    let field = |name: &str| {
        spec[name]
            .as_str()
            .map_or(Field::Record, |p| Field::Pointer(p.to_owned()))
    };
    let engine = Spec {
        window,
        aggregation,
        grace_ms: spec["grace_ms"].as_i64().unwrap_or(0),
        lateness_ms: spec["lateness_ms"].as_i64().unwrap_or(0),
        emit: EmitMode::Final,
    };
    let extraction = Extraction {
        time: field("time_field"),
        key: field("key_field"),
        value: spec["value_field"].as_str().map(str::to_owned),
    };
    Ok((engine, extraction))
}

/// Final results of `spec` over the input log as `broker` holds it: one engine per input
/// partition, fed in offset order.
pub fn recompute(
    http: &Client,
    broker: &BrokerProcess,
    spec: &Value,
    partitions: u32,
) -> Result<Results> {
    let (engine_spec, extraction) = engine_of(spec)?;
    let input = spec["input"].as_str().ok_or_else(|| anyhow!("no input"))?;
    let mut results = Results::new();
    for p in 0..partitions {
        let mut engine = Engine::new(engine_spec).map_err(|e| anyhow!("{e}"))?;
        for record in fetch_partition(http, broker, input, p)? {
            let Ok(event) = extraction.event(record.key.as_deref(), record.value.as_deref(), 0)
            else {
                continue;
            };
            for output in engine.process(event) {
                let Output::Final(r) = output else { continue };
                let id = (p, r.key, r.window.start, r.window.end);
                let value = r.value.map(|v| v.normalize());
                if results
                    .insert(id.clone(), (value, r.aggregate.count, r.late))
                    .is_some()
                {
                    bail!("the engine emitted {id:?} twice");
                }
            }
        }
    }
    Ok(results)
}

/// Missing, duplicated and wrong results of a job against the recomputation, as lines.
pub fn compare(expected: &Results, got: &Results, duplicates: &[String]) -> Vec<String> {
    let mut problems: Vec<String> = duplicates
        .iter()
        .map(|d| format!("duplicated: {d}"))
        .collect();
    for (id, want) in expected {
        match got.get(id) {
            None => problems.push(format!("missing: {id:?} = {want:?}")),
            Some(have) if have != want => {
                problems.push(format!("wrong: {id:?} is {have:?}, recomputed {want:?}"))
            }
            Some(_) => {}
        }
    }
    for id in got.keys().filter(|id| !expected.contains_key(*id)) {
        problems.push(format!("unexpected: {id:?}"));
    }
    problems
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
