//! Stream jobs on a real 3-broker cluster: their output equals an offline recomputation of
//! the input log exactly, through kill -9 and a pause of the broker running them; bad specs
//! get 4xx.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use pubg1_tests::cluster::TestCluster;
use pubg1_tests::streams::{
    colocated_names, compare, ensure_status_shape, job_status, read_results, recompute,
};
use pubg1_tests::{create_topic, wait_until, BrokerProcess, Client};
use serde_json::{json, Value};

const INPUT_PARTITIONS: u32 = 3;
const OUTPUT_PARTITIONS: u32 = 2;
const EVENTS: usize = 100_000;
const KEYS: usize = 40;

/// Event `i`: a sensor key, an event time rising 2 ms per event with ±300 ms of skew, and one
/// in fifty 3 s late (beyond the 500 ms grace for most windows), a reading with two decimals.
fn event(i: usize) -> Value {
    let skew = ((i * 7919) % 601) as i64 - 300;
    let late = if i % 50 == 7 { 3000 } else { 0 };
    let ts = 1_000_000 + (i as i64) * 2 + skew - late;
    json!({
        "key": format!("s{}", i % KEYS),
        "value": {"ts": ts, "sensor": format!("s{}", i % KEYS), "reading": format!("{}.{:02}", i % 97, i % 100).parse::<f64>().ok()}
    })
}

fn produce(http: &Client, brokers: &[BrokerProcess], records: &[Value]) -> Result<()> {
    let body = json!({ "records": records });
    wait_until(Duration::from_secs(30), "a produce acknowledged", || {
        brokers.iter().filter(|b| b.is_running()).find_map(|b| {
            let reply = http.post_json(&b.url("/topics/events"), &body).ok()?;
            (reply.status == 200).then_some(())
        })
    })
}

fn specs(names: &[String]) -> Vec<Value> {
    let common = json!({"input": "events", "time_field": "/ts", "grace_ms": 500});
    let mut specs = vec![
        json!({"name": names[0], "output": "out-tumbling", "window": {"kind": "tumbling", "size_ms": 1000}, "aggregation": "count"}),
        json!({"name": names[1], "output": "out-hopping", "window": {"kind": "hopping", "size_ms": 5000, "advance_ms": 1000}, "aggregation": "sum", "value_field": "/reading"}),
        json!({"name": names[2], "output": "out-sliding", "window": {"kind": "sliding", "difference_ms": 2000}, "aggregation": "count"}),
    ];
    for spec in &mut specs {
        for (k, v) in common.as_object().into_iter().flatten() {
            spec[k] = v.clone();
        }
    }
    specs
}

fn runner(http: &Client, brokers: &[BrokerProcess], job: &str) -> Option<(u64, Value)> {
    let status = job_status(http, brokers, job)?;
    let on = status["runs_on"].as_u64()?;
    (status["phase"] == "running" && on != 0).then_some((on, status))
}

#[test]
fn three_jobs_write_every_window_exactly_once_through_three_kills_of_their_broker() -> Result<()> {
    let mut cluster = TestCluster::start(3)?;
    let http = Client::new();
    cluster.create_replicated("events", INPUT_PARTITIONS)?;
    for output in ["out-tumbling", "out-hopping", "out-sliding"] {
        cluster.create_replicated(output, OUTPUT_PARTITIONS)?;
    }
    let names = colocated_names("exact", 3);
    let specs = specs(&names);
    for spec in &specs {
        // 503 until the job's offsets partition has a leader.
        wait_until(Duration::from_secs(30), "the job created", || {
            let reply = http
                .post_json(&cluster.broker(1).url("/streams"), spec)
                .ok()?;
            let reply = match reply.location {
                Some(location) if reply.status == 307 => http.post_json(&location, spec).ok()?,
                _ => reply,
            };
            assert_ne!(reply.status / 100, 4, "creating a job: {}", reply.text);
            (reply.status == 201).then_some(())
        })?;
    }
    let batch = 1000;
    let mut kills = Vec::new();
    let mut pauses = Vec::new();
    for (round, chunk) in (0..EVENTS)
        .collect::<Vec<_>>()
        .chunks(EVENTS / 5)
        .enumerate()
    {
        // Last round: kill an output partition's leader on a broker the jobs do not run on,
        // so their writes fail part-way and are retried (some results written, some not).
        let output_victim = if round == 4 {
            let (on, _) = wait_until(Duration::from_secs(60), "the jobs running", || {
                runner(&http, &cluster.brokers, &names[0])
            })?;
            let mut victim = None;
            for output in ["out-sliding", "out-hopping", "out-tumbling"] {
                for p in 0..OUTPUT_PARTITIONS {
                    let leader = cluster.leader_of(output, p)?;
                    if leader != on && victim.is_none() {
                        victim = Some(leader);
                    }
                }
            }
            if let Some(v) = victim {
                cluster.broker_mut(v).kill9();
            }
            victim
        } else {
            None
        };
        for part in chunk.chunks(batch) {
            let records: Vec<Value> = part.iter().map(|i| event(*i)).collect();
            produce(&http, &cluster.brokers, &records)?;
        }
        if round == 4 {
            if let Some(v) = output_victim {
                // The jobs went on reading meanwhile; their writes to that partition waited.
                wait_until(Duration::from_secs(60), "the jobs reading on", || {
                    let (_, status) = runner(&http, &cluster.brokers, &names[2])?;
                    (status["records_in"].as_u64()? >= (4 * EVENTS / 5) as u64).then_some(())
                })?;
                cluster.broker_mut(v).restart()?;
                kills.push((v, 0, Duration::ZERO));
            }
            break;
        }
        // Kill the broker running the jobs once it has read into this round's events.
        let floor = (round * EVENTS / 5) as u64;
        let (victim, _) = wait_until(Duration::from_secs(60), "the jobs running", || {
            let (on, status) = runner(&http, &cluster.brokers, &names[0])?;
            (status["records_in"].as_u64()? > floor).then_some((on, status))
        })?;
        if round == 3 {
            // Round 3 pauses it instead, mid-work, until the jobs run elsewhere, and resumes
            // it: its runners wake with writes on their way to a successor's output, which the
            // successor's fences must refuse (a kill -9 leaves nothing in flight).
            cluster.broker_mut(victim).pause()?;
            let paused_at = Instant::now();
            let (successor, _) = wait_until(Duration::from_secs(60), "a job taken over", || {
                runner(&http, &cluster.brokers, &names[0]).filter(|(on, _)| *on != victim)
            })?;
            pauses.push((victim, successor, paused_at.elapsed()));
            cluster.broker_mut(victim).resume()?;
            continue;
        }
        cluster.broker_mut(victim).kill9();
        let killed_at = Instant::now();
        let (successor, _) = wait_until(Duration::from_secs(60), "a job taken over", || {
            runner(&http, &cluster.brokers, &names[0]).filter(|(on, _)| *on != victim)
        })?;
        kills.push((victim, successor, killed_at.elapsed()));
        cluster.broker_mut(victim).restart()?;
    }
    // Every partition's stream time moves far on, so every window with data closes.
    for p in 0..INPUT_PARTITIONS {
        let flush = json!({"records": [{"key": "flush", "value": {"ts": 9_000_000, "sensor": "flush", "reading": 0}}]});
        wait_until(Duration::from_secs(30), "a flush record written", || {
            let url = cluster
                .broker(1)
                .url(&format!("/topics/events/partitions/{p}"));
            (http.post_json(&url, &flush).ok()?.status == 200).then_some(())
        })?;
    }
    for name in &names {
        wait_until(Duration::from_secs(120), "the job caught up", || {
            let (_, status) = runner(&http, &cluster.brokers, name)?;
            let done = status["lag"] == 0
                && status["pending_results"] == 0
                && status["input"]
                    .as_array()?
                    .iter()
                    .all(|p| p["offset"].as_u64() > Some(0));
            done.then_some(())
        })?;
    }
    cluster.wait_converged("events", Duration::from_secs(30))?;
    let reader = cluster.broker(1);
    for (spec, name) in specs.iter().zip(&names) {
        let status = job_status(&http, &cluster.brokers, name).expect("status");
        ensure_status_shape(&status)?;
        let output = spec["output"].as_str().expect("output");
        cluster.wait_converged(output, Duration::from_secs(30))?;
        let expected = recompute(&http, reader, spec, INPUT_PARTITIONS)?;
        let (got, duplicates) = read_results(&http, reader, output, OUTPUT_PARTITIONS, name)?;
        let problems = compare(&expected, &got, &duplicates);
        eprintln!(
            "{name} ({}): {} results recomputed, {} written, late {}, dropped {}; kills (victim, successor, kill to running; successor 0: an output leader killed): {kills:?}; pauses (victim, successor, pause to running): {pauses:?}",
            spec["window"]["kind"],
            expected.len(),
            got.len(),
            status["late_records"],
            status["dropped_records"]
        );
        ensure!(
            expected.len() > 1000,
            "too few windows to mean anything: {}",
            expected.len()
        );
        ensure!(
            status["dropped_records"].as_u64() > Some(0)
                && status["late_records"].as_u64() > Some(0),
            "the input was meant to have late and too-late records: {status}"
        );
        ensure!(
            problems.is_empty(),
            "{name}: {} problems, first: {:#?}",
            problems.len(),
            &problems[..problems.len().min(10)]
        );
    }
    ensure!(
        kills.len() >= 3,
        "three kills of the jobs' broker: {kills:?}"
    );
    ensure!(pauses.len() == 1, "a pause of the jobs' broker: {pauses:?}");
    Ok(())
}

#[test]
fn bad_specs_get_clear_errors_and_a_skipped_record_never_stops_a_job() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = BrokerProcess::start(&dir.path().join("broker"), &[])?;
    let http = Client::new();
    create_topic(&http, &broker, "in", 1)?;
    create_topic(&http, &broker, "out", 1)?;
    let base = json!({"name": "j", "input": "in", "output": "out", "window": {"kind": "tumbling", "size_ms": 1000}, "aggregation": "count"});
    let with = |k: &str, v: Value| {
        let mut s = base.clone();
        s[k] = v;
        s
    };
    let cases = [
        (
            with("window", json!({"kind": "tumbling", "size_ms": 0})),
            422,
            42201,
        ),
        (
            with(
                "window",
                json!({"kind": "hopping", "size_ms": 10, "advance_ms": 20}),
            ),
            422,
            42201,
        ),
        (with("input", json!("nope")), 404, 40401),
        (with("time_field", json!("ts")), 422, 42201),
        (with("aggregation", json!("sum")), 422, 42201),
        (with("output", json!("in")), 422, 42201),
        (with("name", json!("a/b")), 422, 42201),
        (with("grace", json!(5)), 400, 40001),
        (json!("not an object"), 400, 40001),
    ];
    for (spec, status, code) in cases {
        let reply = http.post_json(&broker.url("/streams"), &spec)?;
        reply.assert_error(status, code, &format!("POST /streams {spec}"));
    }
    http.get(&broker.url("/streams/nope"))?
        .assert_error(404, 40405, "GET an unknown job");
    http.delete(&broker.url("/streams/nope"))?
        .assert_error(404, 40405, "DELETE an unknown job");
    let spec = with("aggregation", json!("sum"));
    let spec = {
        let mut s = spec;
        s["value_field"] = json!("/v");
        s["time_field"] = json!("/ts");
        s
    };
    let created = http.post_json(&broker.url("/streams"), &spec)?;
    ensure!(created.status == 201, "{}", created.text);
    http.post_json(&broker.url("/streams"), &spec)?
        .assert_error(409, 40907, "a second job of one name");
    // A JSON string (no fields), a missing field, a string where a number goes; good records.
    let records = json!({"records": [
        {"value": "plain text"},
        {"value": {"ts": 5}},
        {"value": {"ts": 6, "v": "seven"}},
        {"value": {"ts": 10, "v": 1.5}},
        {"value": {"ts": 1500, "v": 2.25}},
        {"value": {"ts": 2600, "v": 1}}
    ]});
    let produced = http.post_json(&broker.url("/topics/in"), &records)?;
    ensure!(produced.status == 200, "{}", produced.text);
    // Bytes that are not JSON at all (base64 of `not json{`).
    let raw = br#"{"records":[{"value":"bm90IGpzb257"}]}"#;
    let produced = http.post(
        &broker.url("/topics/in"),
        Some("application/vnd.kafka.binary.v2+json"),
        raw,
    )?;
    ensure!(produced.status == 200, "{}", produced.text);
    let status = wait_until(Duration::from_secs(30), "the job read every record", || {
        let status = http.get(&broker.url("/streams/j")).ok()?.body;
        (status["records_in"] == 7 && status["results_out"] == 2).then_some(status)
    })?;
    assert_eq!(
        status["skipped_records"],
        json!({"missing": 2, "not_a_number": 1, "not_json": 1}),
        "{status}"
    );
    assert_eq!(status["phase"], "running", "{status}");
    let windows = http.get(&broker.url("/streams/j/windows?key="))?;
    ensure!(windows.status == 200, "{}", windows.text);
    let open = &windows.body["partitions"][0]["open"];
    assert_eq!(
        open[0]["window"],
        json!({"start": 2000, "end": 3000}),
        "{}",
        windows.text
    );
    http.get(&broker.url("/streams/j/windows"))?
        .assert_error(400, 40001, "windows without a key");
    let out = pubg1_tests::workload::fetch_partition(&http, &broker, "out", 0)?;
    let values: Vec<Value> = out
        .iter()
        .map(|r| {
            serde_json::from_slice(r.value.as_deref().unwrap_or_default()).unwrap_or(Value::Null)
        })
        .collect();
    assert_eq!(values.len(), 2, "{values:?}");
    assert_eq!(
        (
            values[0]["value"].to_string(),
            values[0]["window"]["end"].as_i64()
        ),
        ("1.5".to_owned(), Some(1000))
    );
    assert_eq!(
        (
            values[1]["value"].to_string(),
            values[1]["window"]["end"].as_i64()
        ),
        ("2.25".to_owned(), Some(2000))
    );
    let deleted = http.delete(&broker.url("/streams/j"))?;
    ensure!(deleted.status == 204, "{}", deleted.text);
    let listed = http.get(&broker.url("/streams"))?;
    assert_eq!(listed.body["streams"], json!([]), "{}", listed.text);
    Ok(())
}
