//! Three real brokers replicating with Raft: byte-identical replicas, and no acknowledged record
//! lost or moved when leaders are killed with -9 under load.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pubg1_tests::cluster::{urls, TestCluster};
use pubg1_tests::workload::{fetch_topic, publish_all, publish_through_failures, verify, Publish};
use pubg1_tests::{wait_until, Client};
use serde_json::json;

const CONVERGE_DEADLINE: Duration = Duration::from_secs(30);

fn create_replicated(cluster: &TestCluster, topic: &str, partitions: u32) -> anyhow::Result<()> {
    let http = Client::new();
    let body = json!({"name": topic, "partitions": partitions, "replication_factor": 3});
    let reply = http.post_json(&cluster.broker(1).url("/topics"), &body)?;
    assert_eq!(reply.status, 201, "{}", reply.text);
    // Every partition has a leader every broker agrees on before load starts.
    for partition in 0..partitions {
        cluster.leader_of(topic, partition)?;
    }
    Ok(())
}

/// Every running broker holds the same records at the same offsets, byte for byte.
fn assert_replicas_identical(
    cluster: &TestCluster,
    topic: &str,
    partitions: u32,
) -> anyhow::Result<usize> {
    cluster.wait_converged(topic, CONVERGE_DEADLINE)?;
    let http = Client::new();
    let mut logs = Vec::new();
    for broker in cluster.brokers.iter().filter(|b| b.is_running()) {
        logs.push(fetch_topic(&http, broker, topic, partitions)?);
    }
    for (i, log) in logs.iter().enumerate().skip(1) {
        assert!(
            log == &logs[0],
            "broker {}'s replicas differ from broker 1's",
            i + 1
        );
    }
    Ok(logs[0].values().map(Vec::len).sum())
}

#[test]
fn twenty_thousand_records_are_replicated_byte_identical_on_three_brokers() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3)?;
    create_replicated(&cluster, "orders", 6)?;
    // Through broker 2: partitions it does not lead are forwarded to their leaders by Raft.
    let spec = Publish {
        topic: "orders".into(),
        tag: "r".into(),
        clients: 8,
        records_per_client: 2500,
        batch: 50,
    };
    let acked = publish_all(cluster.broker(2), &spec)?;
    assert_eq!(acked.len(), 20_000);
    let stored = assert_replicas_identical(&cluster, "orders", 6)?;
    assert_eq!(stored, 20_000);
    let log = fetch_topic(&Client::new(), cluster.broker(3), "orders", 6)?;
    verify(&acked, &log)?;
    Ok(())
}

#[test]
fn killing_the_leader_five_times_under_load_loses_no_acknowledged_record() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3)?;
    create_replicated(&cluster, "events", 3)?;
    let targets = urls(cluster.topic_urls("events"));
    let stop = Arc::new(AtomicBool::new(false));
    let (acked_count, failed_count) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let publishers = publish_through_failures(
        targets.clone(),
        "kill".into(),
        6,
        20,
        stop.clone(),
        acked_count.clone(),
        failed_count.clone(),
    );

    let mut windows = Vec::new();
    for round in 0..5 {
        let leader = cluster.leader_of("events", 0)?;
        let before = acked_count.load(Ordering::Acquire);
        wait_until(Duration::from_secs(30), "progress before the kill", || {
            (acked_count.load(Ordering::Acquire) >= before + 500).then_some(())
        })?;
        cluster.broker_mut(leader).kill9();
        *targets.write().map_err(|_| anyhow::anyhow!("poisoned"))? = cluster.topic_urls("events");
        let killed_at = Instant::now();
        // Partition 0 gets a new leader among the two survivors, and publishing goes on.
        let new_leader = cluster.leader_of("events", 0)?;
        assert_ne!(new_leader, leader, "round {round}");
        let resumed = acked_count.load(Ordering::Acquire);
        wait_until(Duration::from_secs(30), "publishing to resume", || {
            (acked_count.load(Ordering::Acquire) >= resumed + 200).then_some(())
        })?;
        windows.push(killed_at.elapsed());
        eprintln!(
            "round {round}: killed leader {leader}, new leader {new_leader}, resumed after {:?}",
            killed_at.elapsed()
        );
        cluster.broker_mut(leader).restart()?;
        *targets.write().map_err(|_| anyhow::anyhow!("poisoned"))? = cluster.topic_urls("events");
    }
    stop.store(true, Ordering::Release);
    let mut acked = Vec::new();
    for publisher in publishers {
        acked.extend(
            publisher
                .join()
                .map_err(|_| anyhow::anyhow!("publisher panicked"))?,
        );
    }
    eprintln!(
        "leader kills: {} records acknowledged, {} failed requests; kill-to-resumed (upper bound of unavailability) per round: {windows:?}",
        acked.len(),
        failed_count.load(Ordering::Acquire)
    );
    let stored = assert_replicas_identical(&cluster, "events", 3)?;
    let log = fetch_topic(&Client::new(), cluster.broker(1), "events", 3)?;
    verify(&acked, &log)?;
    assert!(stored >= acked.len());
    Ok(())
}
