//! Real runs of the `loadgen` binary: it starts real `pubg1-broker` processes on 127.0.0.1,
//! kills, restarts and pauses them, and verifies what survived. (Build the broker first:
//! `cargo build --release --workspace --bins`, as `scripts/test` does.)

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// This package's directory. Read when the test runs (cargo sets it), not baked in at compile
/// time: a target directory shared by checkouts at different paths would point at another one.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}

/// What fails a group's run (see loadgen's `group_verify`).
const GROUP_ANOMALIES: [&str; 5] = [
    "undelivered",
    "committed_redelivered",
    "two_owners",
    "delivered_twice_to_one_member",
    "committed_backwards",
];

/// Run loadgen with `args` into a temp dir: exit code, stdout, result.json, report.html.
/// What a stream job's run must have none of.
const STREAM_ANOMALIES: [&str; 5] = [
    "events_lost",
    "missing",
    "duplicated",
    "wrong",
    "unexpected",
];

fn loadgen(args: &[&str]) -> (i32, String, Value, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let output = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .arg("--out")
        .arg(&out)
        .arg("--quiet")
        .output()
        .expect("running loadgen");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    let result = std::fs::read_to_string(out.join("result.json"))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(Value::Null);
    let report = std::fs::read_to_string(out.join("report.html")).unwrap_or_default();
    (
        output.status.code().unwrap_or(-1),
        stdout,
        result,
        report,
        dir,
    )
}

/// What every demo run must show: plenty acknowledged, nothing lost, duplicated, moved or
/// reordered, at most `unacknowledged_max` records stored unacknowledged, the six faults (leader
/// kill, restart, follower kill, restart, pause, resume) each recovered from, consumers reading.
fn assert_demo_held(result: &Value, stdout: &str, unacknowledged_max: u64) {
    let verdict = &result["verdict"];
    assert!(
        verdict["acknowledged"].as_u64().unwrap_or(0) > 10_000,
        "{verdict}"
    );
    for anomaly in ["lost", "duplicated", "moved", "reordered"] {
        assert_eq!(verdict[anomaly], 0, "{anomaly}: {verdict}");
    }
    assert!(
        verdict["unacknowledged_stored"]
            .as_u64()
            .unwrap_or(u64::MAX)
            <= unacknowledged_max,
        "{verdict}"
    );
    let faults = result["faults"].as_array().expect("faults");
    assert_eq!(faults.len(), 6, "{faults:?}");
    for fault in faults {
        assert!(fault["unavailable_ms"].is_u64(), "never recovered: {fault}");
    }
    assert!(stdout.contains("PASS"), "{stdout}");
    assert!(
        result["end_to_end_latency_ms"]["count"]
            .as_u64()
            .unwrap_or(0)
            > 10_000
    );
}

#[test]
fn a_short_demo_kills_restarts_and_pauses_brokers_and_loses_nothing() {
    let (code, stdout, result, report, _dir) = loadgen(&["demo", "--duration", "12"]);
    assert_eq!(code, 0, "{stdout}");
    // Idempotent producers resend a failed request until it is answered, and the broker
    // answers a resend of a stored batch with its offsets: only a request still unanswered
    // when the run stopped (one per producer: 8 × 20 records) can be stored unacknowledged.
    assert_demo_held(&result, &stdout, 8 * 20);
    // The report is one page with both plots inline, fault markers and the verifier's table.
    assert_eq!(report.matches("<svg").count(), 2, "two plots");
    assert!(report.contains("<polyline") || report.contains("<path"));
    assert!(report.contains("kill -9 broker"), "fault markers");
    assert!(report.contains("PASS") && report.contains("<th>lost</th><td>0</td>"));
}

#[test]
fn the_demo_over_the_kafka_protocol_resends_exactly_through_kills_and_pauses() {
    let (code, stdout, result, _report, _dir) =
        loadgen(&["demo", "--duration", "12", "--protocol", "kafka"]);
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(result["protocol"], "kafka");
    // Every failed batch is resent unchanged until answered, and at the end the requests in
    // flight are answered: only batches still waiting for their resend when the run stopped
    // (at most 5 per producer, 8 × 5 × 20 records) can be stored unacknowledged. The tailing
    // consumers fetch over Kafka too.
    assert_demo_held(&result, &stdout, 8 * 5 * 20);
    // The kills and the pause failed requests over the Kafka protocol too.
    assert!(
        result["requests_failed"].as_u64().unwrap_or(0) > 0,
        "{result}"
    );
    // Every broker's copy holds every acknowledged record once, the copies identical.
    for replica in result["replicas"].as_array().expect("replicas") {
        assert_eq!(replica["identical_to_first"], true, "{replica}");
        assert_eq!(replica["lost"], 0, "{replica}");
        assert_eq!(replica["duplicated"], 0, "{replica}");
    }
}

#[test]
fn an_isolated_leader_steps_down_the_majority_keeps_accepting_and_all_converges() {
    let scenario = manifest_dir().join("scenarios/partition.toml");
    let scenario = scenario.to_string_lossy().into_owned();
    let (code, stdout, result, _report, _dir) = loadgen(&["run", "--scenario", &scenario]);
    assert_eq!(code, 0, "{stdout}");
    let checks: Vec<&str> = result["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(checks.len(), 1, "{checks:?}");
    assert!(checks[0].starts_with("ok: isolated broker"), "{checks:?}");
    // Publishing went on while the leader was cut off: acknowledgements in every second.
    let per_second = result["throughput_per_second"]
        .as_array()
        .expect("throughput");
    let during: Vec<u64> = per_second[5..9].iter().filter_map(Value::as_u64).collect();
    assert!(during.iter().all(|n| *n > 0), "seconds 5–8: {during:?}");
    for anomaly in ["lost", "duplicated", "moved"] {
        assert_eq!(result["verdict"][anomaly], 0, "{anomaly}");
    }
}

#[test]
fn deleting_the_topic_mid_run_is_reported_as_loss_with_a_failing_exit() {
    let scenario = manifest_dir().join("scenarios/delete-topic.toml");
    let scenario = scenario.to_string_lossy().into_owned();
    let (code, stdout, result, _report, _dir) = loadgen(&["run", "--scenario", &scenario]);
    assert_eq!(code, 1, "{stdout}");
    let lost = result["verdict"]["lost"].as_u64().unwrap_or(0);
    assert!(lost > 0, "{result}");
    assert!(stdout.contains("FAIL"), "{stdout}");
}

/// CI's short seed of the nemesis (the note of each session reports long runs of several seeds).
#[test]
fn a_short_nemesis_run_leaves_every_replica_complete_and_identical() {
    let (code, stdout, result, _report, _dir) =
        loadgen(&["chaos", "--seed", "20261201", "--faults", "12"]);
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(result["seed"], 20261201, "the seed is in result.json");
    let faults = result["faults"].as_array().expect("faults");
    assert_eq!(faults.len(), 12, "{faults:?}");
    let replicas = result["replicas"].as_array().expect("replicas");
    assert_eq!(
        replicas.len(),
        3,
        "every broker's copy was read: {replicas:?}"
    );
    for replica in replicas {
        for anomaly in ["lost", "duplicated", "moved"] {
            assert_eq!(replica[anomaly], 0, "{anomaly}: {replica}");
        }
        assert_eq!(replica["identical_to_first"], true, "{replica}");
        assert!(replica["stored"].as_u64().unwrap_or(0) > 1_000, "{replica}");
    }
    // The consumer group read through the same faults.
    let group = &result["group"]["verdict"];
    for anomaly in GROUP_ANOMALIES {
        assert_eq!(group[anomaly], 0, "{anomaly}: {group}");
    }
    // So did a stream job: its output equals the recomputation of its input.
    let stream = &result["stream"];
    for field in STREAM_ANOMALIES {
        assert_eq!(stream[field], 0, "{field}: {stream}");
    }
    assert!(
        stream["windows_recomputed"].as_u64().unwrap_or(0) > 100,
        "{stream}"
    );
    assert!(stdout.contains("nemesis seed        20261201"), "{stdout}");
}

/// A consumer group through joins, a leave, a member killed without leaving and a leader
/// killed -9: the group verifier finds every acknowledged record delivered, no committed record
/// delivered again, no partition read by two members at once, and commits never going back.
#[test]
fn a_group_reads_everything_once_through_joins_leaves_and_kills() {
    let dir = tempfile::tempdir().expect("tempdir");
    let scenario = dir.path().join("groups-short.toml");
    std::fs::write(
        &scenario,
        r#"
duration_s = 14
[[topics]]
name = "orders"
partitions = 6
replication_factor = 3
[producers]
count = 3
rate = 3000
batch = 10
[group]
members = 3
session_timeout_ms = 2000
[[faults]]
at_s = 3
action = "join"
[[faults]]
at_s = 5
action = "leave"
target = "member:0"
[[faults]]
at_s = 7
action = "kill"
target = "leader:orders/0"
[[faults]]
at_s = 9
action = "restart"
target = "killed"
[[faults]]
at_s = 10
action = "kill-member"
target = "member:1"
"#,
    )
    .expect("scenario");
    let scenario = scenario.to_string_lossy().into_owned();
    let (code, stdout, result, _report, _dir) = loadgen(&["run", "--scenario", &scenario]);
    assert_eq!(code, 0, "{stdout}");
    let group = &result["group"];
    let verdict = &group["verdict"];
    for anomaly in GROUP_ANOMALIES {
        assert_eq!(verdict[anomaly], 0, "{anomaly}: {verdict}");
    }
    let acknowledged = result["verdict"]["acknowledged"].as_u64().unwrap_or(0);
    assert!(acknowledged > 10_000, "{}", result["verdict"]);
    assert!(verdict["delivered"].as_u64().unwrap_or(0) >= acknowledged);
    assert!(
        group["drained_after_ms"].is_u64(),
        "every record was read: {group}"
    );
    assert!(group["commits_ok"].as_u64().unwrap_or(0) > 100, "{group}");
    // The join, the leave and the kill each moved partitions, and each was read again.
    let rebalances = group["rebalances"].as_array().expect("rebalances");
    assert_eq!(rebalances.len(), 3, "{rebalances:?}");
    for rebalance in rebalances {
        assert!(
            rebalance["partitions_moved"].as_u64().unwrap_or(0) >= 1,
            "{rebalance}"
        );
        assert!(rebalance["resumed_after_ms"].is_u64(), "{rebalance}");
    }
    assert!(stdout.contains("PASS: the group received"), "{stdout}");
}

/// A stream job whose broker is killed -9 twice: its output equals, window by window, the
/// recomputation of its input log, and every acknowledged event is in that log.
#[test]
fn a_stream_job_s_output_equals_its_recomputation_through_kills_of_its_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let scenario = dir.path().join("streams-short.toml");
    std::fs::write(
        &scenario,
        r#"
duration_s = 14
[[topics]]
name = "orders"
partitions = 2
replication_factor = 3
[[topics]]
name = "events"
partitions = 3
replication_factor = 3
[[topics]]
name = "counts"
partitions = 2
replication_factor = 3
[producers]
count = 1
rate = 100
[stream]
job = "counts"
input = "events"
output = "counts"
window = { kind = "sliding", difference_ms = 1000 }
aggregation = "count"
grace_ms = 500
events_per_s = 4000
keys = 40
skew_ms = 300
late_every = 50
late_ms = 3000
[[faults]]
at_s = 4
action = "kill"
target = "stream:counts"
[[faults]]
at_s = 6
action = "restart"
target = "killed"
[[faults]]
at_s = 9
action = "kill"
target = "stream:counts"
[[faults]]
at_s = 11
action = "restart"
target = "killed"
"#,
    )
    .expect("scenario");
    let scenario = scenario.to_string_lossy().into_owned();
    let (code, stdout, result, _report, _dir) = loadgen(&["run", "--scenario", &scenario]);
    assert_eq!(code, 0, "{stdout}");
    let stream = &result["stream"];
    for field in STREAM_ANOMALIES {
        assert_eq!(stream[field], 0, "{field}: {stream}");
    }
    assert!(
        stream["windows_recomputed"].as_u64().unwrap_or(0) > 300,
        "{stream}"
    );
    assert!(
        stream["events_acknowledged"].as_u64().unwrap_or(0) > 20_000,
        "{stream}"
    );
    assert!(
        stream["dropped_records"].as_u64().unwrap_or(0) > 0,
        "{stream}"
    );
    let takeovers = stream["takeovers"].as_array().expect("takeovers");
    assert_eq!(takeovers.len(), 2, "{stream}");
    assert!(takeovers.iter().all(|t| t[2].is_u64()), "{stream}");
    assert!(stdout.contains("PASS: the job's output equals"), "{stdout}");
}
