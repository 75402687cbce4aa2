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
    wait_until(Duration::from_secs(60), "two thirds of the deliveries", || {
        (producer.count() > 2 * count / 3).then_some(())
    })?;
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
        assert!(delivered.insert(value, at).is_none(), "{report} reported twice");
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
                let records = reply.body["records"].as_array().cloned().unwrap_or_default();
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
        assert_eq!(stored, delivered, "every delivered record, once, where reported");
    }
    Ok(())
}
