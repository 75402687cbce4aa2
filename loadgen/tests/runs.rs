//! Real runs of the `loadgen` binary: it starts real `pubg1-broker` processes on 127.0.0.1,
//! kills, restarts and pauses them, and verifies what survived. (Build the broker first:
//! `cargo build --release --workspace --bins`, as `scripts/test` does.)

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn loadgen(args: &[&str]) -> (i32, String, Value, tempfile::TempDir) {
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
    (output.status.code().unwrap_or(-1), stdout, result, dir)
}

#[test]
fn a_short_demo_kills_restarts_and_pauses_brokers_and_loses_nothing() {
    let (code, stdout, result, _dir) = loadgen(&["demo", "--duration", "12"]);
    assert_eq!(code, 0, "{stdout}");
    let verdict = &result["verdict"];
    assert!(
        verdict["acknowledged"].as_u64().unwrap_or(0) > 10_000,
        "{verdict}"
    );
    for anomaly in ["lost", "duplicated", "moved", "reordered"] {
        assert_eq!(verdict[anomaly], 0, "{anomaly}: {verdict}");
    }
    // Six faults happened: leader kill, restart, follower kill, restart, pause, resume; and
    // publishing recovered after each.
    let faults = result["faults"].as_array().expect("faults");
    assert_eq!(faults.len(), 6, "{faults:?}");
    for fault in faults {
        assert!(fault["unavailable_ms"].is_u64(), "never recovered: {fault}");
    }
    assert!(stdout.contains("PASS"), "{stdout}");
}

#[test]
fn deleting_the_topic_mid_run_is_reported_as_loss_with_a_failing_exit() {
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/delete-topic.toml");
    let scenario = scenario.to_string_lossy().into_owned();
    let (code, stdout, result, _dir) = loadgen(&["run", "--scenario", &scenario]);
    assert_eq!(code, 1, "{stdout}");
    let lost = result["verdict"]["lost"].as_u64().unwrap_or(0);
    assert!(lost > 0, "{result}");
    assert!(stdout.contains("FAIL"), "{stdout}");
}
