//! A stream job's output against an offline recomputation: the same window engine, one per
//! input partition, fed that partition's log in offset order (as the job runs it). Pure: the
//! records come in, the differences per window go out.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;

use anyhow::{anyhow, Result};
use pubg1_streaming::extract::{Extraction, Field};
use pubg1_streaming::{Aggregation, Decimal, EmitMode, Engine, Output, Spec, WindowKind};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// (input partition, key, window start, window end).
pub type WindowId = (u32, String, i64, i64);
/// A window's result: (value, count, late).
pub type WindowValue = (Option<Decimal>, u64, u64);
pub type Results = BTreeMap<WindowId, WindowValue>;

/// One stored record: (key, value) bytes.
pub type Record = (Option<Vec<u8>>, Option<Vec<u8>>);

/// The engine spec and extraction of a `POST /streams` body (final results only).
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

/// What the recomputation gives: the final results, and the job's late and dropped counts.
#[derive(Debug, Default)]
pub struct Recomputed {
    pub results: Results,
    /// Records taken after the watermark (within grace), as the job counts them.
    pub late: u64,
    /// Records dropped as later than grace, counted per window they missed.
    pub dropped: u64,
}

/// The final results of `spec` over `partitions` (each partition's records in offset order).
pub fn recompute(spec: &Value, partitions: &[Vec<Record>]) -> Result<Recomputed> {
    let (engine_spec, extraction) = engine_of(spec)?;
    let mut out = Recomputed::default();
    let results = &mut out.results;
    for (p, records) in partitions.iter().enumerate() {
        let mut engine = Engine::new(engine_spec).map_err(|e| anyhow!("{e}"))?;
        for (key, value) in records {
            let Ok(event) = extraction.event(key.as_deref(), value.as_deref(), 0) else {
                continue;
            };
            let late = engine.watermark().is_some_and(|w| event.time < w);
            let dropped = engine.dropped_total();
            let outputs = engine.process(event);
            if late && engine.dropped_total() == dropped {
                out.late += 1;
            }
            for output in outputs {
                let Output::Final(r) = output else { continue };
                let id = (p as u32, r.key, r.window.start, r.window.end);
                let value = r.value.map(|v| v.normalize());
                if results
                    .insert(id.clone(), (value, r.aggregate.count, r.late))
                    .is_some()
                {
                    return Err(anyhow!("the engine emitted {id:?} twice"));
                }
            }
        }
        out.dropped += engine.dropped_total();
    }
    Ok(out)
}

/// A result as the job wrote it (the value kept as its exact text).
#[derive(Debug, Deserialize)]
struct Written<'a> {
    job: String,
    uid: u64,
    seq: u64,
    input_partition: u32,
    key: String,
    window: WrittenWindow,
    emit: String,
    #[serde(borrow)]
    value: &'a RawValue,
    count: u64,
    late: u64,
}

#[derive(Debug, Deserialize)]
struct WrittenWindow {
    start: i64,
    end: i64,
}

/// The results job `job` wrote in its output topic's `records`, and every problem with them:
/// a window twice, a sequence number twice, a record that is not a final result of a job
/// (no value, not a result, an update), or one whose key is not its group key as JSON.
pub fn written(records: &[Record], job: &str) -> Result<(Results, Vec<String>)> {
    let mut results = Results::new();
    let mut duplicates = Vec::new();
    let mut seqs = HashSet::new();
    for (key, value) in records {
        let Some(w) = value
            .as_deref()
            .and_then(|v| serde_json::from_slice::<Written>(v).ok())
        else {
            duplicates.push(format!(
                "malformed: {}",
                String::from_utf8_lossy(value.as_deref().unwrap_or(b"(no value)"))
            ));
            continue;
        };
        if w.job != job {
            continue;
        }
        if w.emit != "final"
            || key.as_deref() != Some(serde_json::to_vec(&w.key).unwrap_or_default().as_slice())
        {
            duplicates.push(format!(
                "malformed: seq {} (emit {}, key {:?})",
                w.seq,
                w.emit,
                key.as_deref().map(String::from_utf8_lossy)
            ));
            continue;
        }
        if !seqs.insert((w.uid, w.seq)) {
            duplicates.push(format!("seq {} twice", w.seq));
        }
        let value = match w.value.get() {
            "null" => None,
            text => Some(
                Decimal::from_str(text)
                    .map_err(|e| anyhow!("{text}: {e}"))?
                    .normalize(),
            ),
        };
        let id = (w.input_partition, w.key, w.window.start, w.window.end);
        if let Some(earlier) = results.insert(id.clone(), (value, w.count, w.late)) {
            duplicates.push(format!("{id:?} twice (first {earlier:?})"));
        }
    }
    Ok((results, duplicates))
}

/// Differences per window between the recomputation and what was written.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Comparison {
    pub missing: u64,
    pub duplicated: u64,
    pub wrong: u64,
    pub unexpected: u64,
    /// The first few, as lines.
    pub examples: Vec<String>,
}

const EXAMPLES: usize = 20;

pub fn compare(expected: &Results, got: &Results, duplicates: &[String]) -> Comparison {
    let mut c = Comparison {
        duplicated: duplicates.len() as u64,
        ..Comparison::default()
    };
    let mut note = |line: String| {
        if c.examples.len() < EXAMPLES {
            c.examples.push(line);
        }
    };
    for d in duplicates {
        note(format!("duplicated: {d}"));
    }
    for (id, want) in expected {
        match got.get(id) {
            None => {
                c.missing += 1;
                note(format!("missing: {id:?} = {want:?}"));
            }
            Some(have) if have != want => {
                c.wrong += 1;
                note(format!("wrong: {id:?} is {have:?}, recomputed {want:?}"));
            }
            Some(_) => {}
        }
    }
    for id in got.keys().filter(|id| !expected.contains_key(*id)) {
        c.unexpected += 1;
        note(format!("unexpected: {id:?}"));
    }
    c
}

impl Comparison {
    pub fn is_clean(&self) -> bool {
        self.missing == 0 && self.duplicated == 0 && self.wrong == 0 && self.unexpected == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> Value {
        json!({"name": "j", "window": {"kind": "tumbling", "size_ms": 10}, "aggregation": "sum",
               "time_field": "/ts", "value_field": "/v", "grace_ms": 0})
    }

    fn event(ts: i64, v: &str) -> Record {
        (
            Some(br#""k""#.to_vec()),
            Some(format!(r#"{{"ts":{ts},"v":{v}}}"#).into_bytes()),
        )
    }

    fn result(seq: u64, start: i64, value: &str, count: u64) -> Record {
        let value = format!(
            r#"{{"job":"j","uid":1,"seq":{seq},"input_partition":0,"key":"k","window":{{"start":{start},"end":{}}},"emit":"final","value":{value},"count":{count},"late":0}}"#,
            start + 10
        );
        (Some(br#""k""#.to_vec()), Some(value.into_bytes()))
    }

    #[test]
    fn each_window_is_found_missing_duplicated_or_wrong() {
        let log = vec![vec![
            event(1, "1.5"),
            event(2, "2.50"),
            event(12, "1"),
            event(25, "0"),
        ]];
        let expected = recompute(&spec(), &log).expect("recompute").results;
        assert_eq!(expected.len(), 2, "{expected:?}");
        let exact = [result(0, 0, "4", 2), result(1, 10, "1", 1)];
        let (got, dups) = written(&exact, "j").expect("written");
        assert!(compare(&expected, &got, &dups).is_clean());
        let bad = [
            result(0, 0, "4.1", 2),
            result(0, 0, "4", 2),
            (None, Some(b"{\"other\":1}".to_vec())),
        ];
        let (got, dups) = written(&bad, "j").expect("written");
        let c = compare(&expected, &got, &dups);
        assert_eq!((c.missing, c.duplicated, c.wrong), (1, 3, 0), "{c:?}");
        let mut wrong_key = result(1, 10, "1", 1);
        wrong_key.0 = Some(b"k".to_vec());
        let (_, dups) = written(&[wrong_key], "j").expect("written");
        assert_eq!(
            dups.len(),
            1,
            "a key that is not the group key as JSON: {dups:?}"
        );
        let (got, dups) = written(&[result(0, 0, "4.1", 2)], "j").expect("written");
        assert_eq!(compare(&expected, &got, &dups).wrong, 1);
    }
}
