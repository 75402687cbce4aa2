//! kill -9 under load: everything acknowledged survives, byte-identical, and offsets continue
//! without gaps or reuse. SIGTERM: a clean stop that loses nothing either.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pubg1_tests::workload::{fetch_topic, publish_all, publish_until_failure, verify, Publish};
use pubg1_tests::{create_topic, high_watermarks, wait_until, BrokerProcess, Client};

#[test]
fn acknowledged_records_survive_kill_9_during_publishing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = BrokerProcess::start(&dir.path().join("broker"), &[])?;
    let http = Client::new();
    create_topic(&http, &broker, "orders", 3)?;

    let stop = Arc::new(AtomicBool::new(false));
    let acked_count = Arc::new(AtomicUsize::new(0));
    let publishers = publish_until_failure(
        broker.url("/topics/orders"),
        "before".into(),
        8,
        20,
        stop.clone(),
        acked_count.clone(),
    );
    // Kill while all eight are mid-stream, once plenty has been acknowledged.
    wait_until(
        Duration::from_secs(60),
        "5,000 acknowledged records",
        || (acked_count.load(Ordering::Acquire) >= 5_000).then_some(()),
    )?;
    broker.kill9();
    stop.store(true, Ordering::Release);
    let mut acked = Vec::new();
    for publisher in publishers {
        acked.extend(
            publisher
                .join()
                .map_err(|_| anyhow::anyhow!("publisher panicked"))?,
        );
    }
    assert!(acked.len() >= 5_000);

    broker.restart()?;
    // Entries that were durable in the Raft log but not yet applied at the kill (their produce was
    // never acknowledged) are applied once each partition has a leader again. An acknowledged
    // marker per partition proves everything before it is applied, so the log is complete.
    for partition in 0..3 {
        let url = broker.url(&format!("/topics/orders/partitions/{partition}"));
        let marker = http.post_json(&url, &serde_json::json!({"records":[{"value":"marker"}]}))?;
        assert_eq!(marker.status, 200, "{}", marker.text);
    }
    let log = fetch_topic(&http, &broker, "orders", 3)?;
    verify(&acked, &log)?;
    for (partition, records) in &log {
        assert_eq!(
            records.first().map(|r| r.offset),
            Some(0),
            "partition {partition} starts at 0"
        );
    }
    // Records whose reply was lost in the kill may be stored too (at-least-once), but only ours
    // (and the three markers).
    let stored: usize = log.values().map(Vec::len).sum();
    assert!(
        stored >= acked.len() + 3 && stored <= acked.len() + 3 + 8 * 20,
        "{stored} stored for {} acked",
        acked.len()
    );

    eprintln!(
        "kill -9: {} records acknowledged before the kill, {stored} stored after restart",
        acked.len()
    );
    // Offsets continue exactly where the durable log ends: no gap, no reuse.
    let before = high_watermarks(&http, &broker, "orders")?;
    let spec = Publish {
        topic: "orders".into(),
        tag: "after".into(),
        clients: 8,
        records_per_client: 1250,
        batch: 50,
    };
    let after = publish_all(&broker, &spec)?;
    let log = fetch_topic(&http, &broker, "orders", 3)?;
    verify(&acked, &log)?;
    verify(&after, &log)?;
    for record in &after {
        assert!(
            record.offset >= before[record.partition as usize],
            "offset {} reused in partition {}",
            record.offset,
            record.partition
        );
    }
    let stored_after: usize = log.values().map(Vec::len).sum();
    assert_eq!(stored_after, stored + 10_000);
    Ok(())
}

#[test]
fn sigterm_stops_cleanly_and_loses_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = BrokerProcess::start(&dir.path().join("broker"), &[])?;
    let http = Client::new();
    create_topic(&http, &broker, "events", 2)?;
    let spec = Publish {
        topic: "events".into(),
        tag: "t".into(),
        clients: 4,
        records_per_client: 250,
        batch: 25,
    };
    let acked = publish_all(&broker, &spec)?;

    let status = broker.terminate()?;
    assert!(status.success(), "SIGTERM exit status {status}");
    broker.restart()?;
    let log = fetch_topic(&http, &broker, "events", 2)?;
    verify(&acked, &log)?;
    assert_eq!(log.values().map(Vec::len).sum::<usize>(), 1_000);
    Ok(())
}
