//! `loadgen run --bootstrap` against a cluster it did not start, then `loadgen verify` of that
//! run: clean while the data is there, failing once the topic is deleted behind its back.

use std::process::Command;

use pubg1_tests::cluster::TestCluster;
use pubg1_tests::{workspace_binary, Client};

const SCENARIO: &str = r#"
duration_s = 3
[[topics]]
name = "external"
partitions = 2
replication_factor = 3
[producers]
count = 2
rate = 2000
batch = 10
"#;

fn loadgen(args: &[String]) -> anyhow::Result<(i32, String)> {
    let output = Command::new(workspace_binary("loadgen")?)
        .args(args)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{text}");
    Ok((output.status.code().unwrap_or(-1), text))
}

#[test]
fn a_run_on_a_running_cluster_verifies_later_and_catches_a_deleted_topic() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3)?;
    let dir = tempfile::tempdir()?;
    let scenario = dir.path().join("external.toml");
    std::fs::write(&scenario, SCENARIO)?;
    let out = dir.path().join("run");
    let bootstrap = cluster
        .brokers
        .iter()
        .map(|b| format!("http://{}", b.http))
        .collect::<Vec<_>>()
        .join(",");
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let (code, text) = loadgen(&[
        "run".into(),
        "--scenario".into(),
        path(&scenario),
        "--bootstrap".into(),
        bootstrap.clone(),
        "--out".into(),
        path(&out),
        "--quiet".into(),
    ])?;
    assert_eq!(code, 0, "{text}");
    assert!(out.join("acks.csv").exists());
    let verify = [
        "verify".to_owned(),
        "--run".into(),
        path(&out),
        "--scenario".into(),
        path(&scenario),
        "--bootstrap".into(),
        bootstrap,
    ];
    let (code, text) = loadgen(&verify)?;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("0 lost") && text.contains("PASS"), "{text}");
    // Faults are refused on brokers loadgen did not start.
    let faulty = dir.path().join("faulty.toml");
    std::fs::write(
        &faulty,
        format!("{SCENARIO}[[faults]]\nat_s = 1\naction = \"kill\"\ntarget = \"broker:1\"\n"),
    )?;
    let (code, text) = loadgen(&[
        "run".into(),
        "--scenario".into(),
        path(&faulty),
        "--bootstrap".into(),
        format!("http://{}", cluster.broker(1).http),
        "--out".into(),
        path(&dir.path().join("faulty")),
    ])?;
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("faults act only on brokers loadgen started"),
        "{text}"
    );
    // The topic goes (and comes back empty): every acknowledged record is now lost.
    let http = Client::new();
    let deleted = http.delete(&cluster.broker(1).url("/topics/external"))?;
    assert!(deleted.status < 300, "{}", deleted.text);
    let body = serde_json::json!({"name": "external", "partitions": 2, "replication_factor": 3});
    let created = http.post_json(&cluster.broker(1).url("/topics"), &body)?;
    assert_eq!(created.status, 201, "{}", created.text);
    for partition in 0..2 {
        cluster.leader_of("external", partition)?;
    }
    let (code, text) = loadgen(&verify)?;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("FAIL"), "{text}");
    Ok(())
}

#[test]
fn a_run_over_kafka_alone_creates_loads_and_reads_back_through_the_listeners() -> anyhow::Result<()>
{
    let cluster = TestCluster::start_with_kafka(3)?;
    let dir = tempfile::tempdir()?;
    let scenario = dir.path().join("external.toml");
    std::fs::write(&scenario, SCENARIO.replace("external", "over-kafka"))?;
    let out = dir.path().join("run");
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    // No HTTP address at all: loadgen knows the cluster only as a Kafka bootstrap list.
    let (code, text) = loadgen(&[
        "run".into(),
        "--scenario".into(),
        path(&scenario),
        "--kafka-bootstrap".into(),
        cluster.bootstrap(),
        "--protocol".into(),
        "kafka".into(),
        "--out".into(),
        path(&out),
        "--quiet".into(),
    ])?;
    assert_eq!(code, 0, "{text}");
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("result.json"))?)?;
    assert_eq!(result["protocol"], "kafka");
    let verdict = &result["verdict"];
    assert!(
        verdict["acknowledged"].as_u64().unwrap_or(0) >= 4_000,
        "{verdict}"
    );
    for anomaly in [
        "lost",
        "duplicated",
        "moved",
        "reordered",
        "unacknowledged_stored",
    ] {
        assert_eq!(verdict[anomaly], 0, "{anomaly}: {verdict}");
    }
    // The acknowledgements hold when checked independently over HTTP, too.
    let http = cluster
        .brokers
        .iter()
        .map(|b| format!("http://{}", b.http))
        .collect::<Vec<_>>()
        .join(",");
    let (code, text) = loadgen(&[
        "verify".into(),
        "--run".into(),
        path(&out),
        "--scenario".into(),
        path(&scenario),
        "--bootstrap".into(),
        http,
    ])?;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("0 lost") && text.contains("PASS"), "{text}");
    Ok(())
}
