//! Real Kafka client libraries against the Kafka listener: an idempotent confluent-kafka
//! (librdkafka) producer with acks=all keeps sending while its partition leader is killed -9;
//! every record it was told was delivered is in the log exactly once, at the offset reported,
//! and no record is in the log twice.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use pubg1_tests::cluster::{TestCluster, CONVERGE_DEADLINE};
use pubg1_tests::{high_watermarks, wait_until, Client};

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// A client script's process, killed when dropped (a failing test leaves nothing running).
struct Script {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Script {
    fn start(name: &str, args: &[&str]) -> Result<Self> {
        let mut child = Command::new("python3")
            .arg(script(name))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("running {name} (scripts/ensure-deps installs its client)"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let (Ok(value), Ok(mut lines)) = (serde_json::from_str(&line), sink.lock()) {
                    lines.push(value);
                }
            }
        });
        Ok(Self {
            child,
            lines,
            reader: Some(reader),
        })
    }

    fn count(&self) -> usize {
        self.lines.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Wait for the script to exit successfully; everything it printed.
    fn finish(mut self, deadline: Duration) -> Result<Vec<Value>> {
        let status = wait_until(deadline, "the client script to finish", || {
            self.child.try_wait().ok().flatten()
        })?;
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        if !status.success() {
            bail!("client script failed: {status}");
        }
        let lines = self.lines.lock().map_err(|_| anyhow!("poisoned"))?.clone();
        Ok(lines)
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_idempotent_confluent_kafka_producer_loses_and_duplicates_nothing_through_a_leader_kill(
) -> Result<()> {
    let mut cluster = TestCluster::start_with_kafka(3)?;
    cluster.create_replicated("idem", 2)?;
    let leader = cluster.leader_of("idem", 0)?;
    let count = 100_000;
    let producer = Script::start(
        "idempotent_produce.py",
        &[&cluster.bootstrap(), "idem", &count.to_string()],
    )?;
    wait_until(Duration::from_secs(60), "a third of the deliveries", || {
        (producer.count() > count / 3).then_some(())
    })?;
    cluster.broker_mut(leader).kill9();
    wait_until(
        Duration::from_secs(60),
        "two thirds of the deliveries",
        || (producer.count() > 2 * count / 3).then_some(()),
    )?;
    cluster.broker_mut(leader).restart()?;
    let reports = producer.finish(Duration::from_secs(180))?;
    let done = reports.last().cloned().unwrap_or_default();
    assert_eq!(done["undelivered"], 0, "{done}");
    let mut delivered = BTreeMap::new();
    for report in reports.iter().filter(|r| r.get("value").is_some()) {
        let value = report["value"].as_str().unwrap_or_default().to_owned();
        assert!(report.get("error").is_none(), "{report}");
        let at = (
            report["partition"].as_u64().unwrap_or(99),
            report["offset"].as_u64().unwrap_or(u64::MAX),
        );
        assert!(
            delivered.insert(value, at).is_none(),
            "{report} reported twice"
        );
    }
    assert_eq!(delivered.len(), count);

    cluster.wait_converged("idem", CONVERGE_DEADLINE)?;
    let http = Client::new();
    for broker in cluster.brokers.iter() {
        let ends = high_watermarks(&http, broker, "idem")?;
        let mut stored: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (partition, end) in ends.iter().enumerate() {
            let mut offset = 0;
            while offset < *end {
                let reply = http.get(&broker.url(&format!(
                    "/topics/idem/partitions/{partition}/records?offset={offset}&max_records=10000&format=binary"
                )))?;
                let records = reply.body["records"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if records.is_empty() {
                    bail!("{}: no records at {partition}/{offset}", reply.text);
                }
                for record in &records {
                    use base64::Engine;
                    let value = base64::engine::general_purpose::STANDARD
                        .decode(record["value"].as_str().unwrap_or_default())?;
                    let value = String::from_utf8(value)?;
                    let at = (partition as u64, record["offset"].as_u64().unwrap_or(0));
                    if let Some(first) = stored.insert(value.clone(), at) {
                        bail!("{value} stored twice: at {first:?} and {at:?}");
                    }
                    offset = at.1 + 1;
                }
            }
        }
        assert_eq!(
            stored, delivered,
            "every delivered record, once, where reported"
        );
    }
    Ok(())
}

/// The group's committed offsets as the HTTP API shows them (partition → offset).
fn committed_over_http(cluster: &TestCluster, group: &str) -> Result<BTreeMap<u64, u64>> {
    let http = Client::new();
    for broker in cluster.brokers.iter().filter(|b| b.is_running()) {
        let reply = http.get(&broker.url(&format!("/consumer-groups/{group}")))?;
        if reply.status != 200 {
            continue;
        }
        let mut committed = BTreeMap::new();
        for p in reply.body["partitions"].as_array().into_iter().flatten() {
            if let (Some(partition), Some(offset)) =
                (p["partition"].as_u64(), p["committed_offset"].as_u64())
            {
                committed.insert(partition, offset);
            }
        }
        return Ok(committed);
    }
    bail!("no broker described group {group}")
}

#[test]
fn confluent_kafka_consumers_split_a_group_a_third_rebalances_and_http_sees_the_commits(
) -> Result<()> {
    let cluster = TestCluster::start_with_kafka(3)?;
    cluster.create_replicated("g", 6)?;
    let count = 6_000;
    let run = Script::start(
        "group_consume.py",
        &[&cluster.bootstrap(), "g", "split", &count.to_string()],
    )?;
    let out = run.finish(Duration::from_secs(300))?;
    let result = out.last().cloned().unwrap_or_default();
    for (phase, members) in [("two", 2), ("three", 3)] {
        let parts = result["assignments"][phase]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(parts.len(), members, "{phase}: {parts:?}");
        let mut all: Vec<u64> = parts
            .iter()
            .flat_map(|p| p.as_array().cloned().unwrap_or_default())
            .filter_map(|p| p.as_u64())
            .collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..6).collect::<Vec<_>>(),
            "{phase}: each partition once"
        );
    }
    let received = result["received"].as_object().cloned().unwrap_or_default();
    assert_eq!(received.len(), count, "every record received");
    // Everything was committed: the committed offsets are the partitions' ends, and the HTTP
    // consumer API sees the same group.
    let http = Client::new();
    let ends = high_watermarks(&http, cluster.broker(1), "g")?;
    let over_kafka: BTreeMap<u64, u64> = result["committed"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(p, o)| Some((p.parse().ok()?, o.as_u64()?)))
        .collect();
    let expected: BTreeMap<u64, u64> = ends
        .iter()
        .enumerate()
        .map(|(p, end)| (p as u64, *end))
        .collect();
    assert_eq!(over_kafka, expected);
    assert_eq!(committed_over_http(&cluster, "split")?, expected);
    Ok(())
}

#[test]
fn kafka_python_produces_idempotently_and_reads_back_in_a_group() -> Result<()> {
    let cluster = TestCluster::start_with_kafka(3)?;
    cluster.create_replicated("kp", 3)?;
    let count = 2_000;
    let run = Script::start(
        "kafka_python_group.py",
        &[&cluster.bootstrap(), "kp", "kpg", &count.to_string()],
    )?;
    let out = run.finish(Duration::from_secs(300))?;
    let result = out.last().cloned().unwrap_or_default();
    assert_eq!(
        result["idempotent"], true,
        "kafka-python 3 is idempotent by default"
    );
    let read = result["read"].as_array().cloned().unwrap_or_default();
    let mut values: Vec<String> = read
        .iter()
        .filter_map(|r| r[2].as_str().map(str::to_owned))
        .collect();
    values.sort();
    let mut expected: Vec<String> = (0..count).map(|i| format!("p{i}")).collect();
    expected.sort();
    assert_eq!(values, expected, "each record once");
    let ends = high_watermarks(&Client::new(), cluster.broker(1), "kp")?;
    for (p, end) in ends.iter().enumerate() {
        assert_eq!(
            result["committed"][p.to_string()].as_u64(),
            Some(*end),
            "{result}"
        );
    }
    Ok(())
}
