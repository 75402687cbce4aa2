//! Three real brokers replicating with Raft: byte-identical replicas, and no acknowledged record
//! lost or moved when leaders are killed with -9 under load.

use std::time::{Duration, Instant};

use pubg1_tests::cluster::{set, urls, TestCluster};
use pubg1_tests::workload::{
    assert_epochs_never_decrease, fetch_topic, publish_all, verify, Load, Publish,
};
use pubg1_tests::{metric, wait_until, Client};
use serde_json::json;

#[test]
fn twenty_thousand_records_are_replicated_byte_identical_on_three_brokers() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3)?;
    cluster.create_replicated("orders", 6)?;
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
    let stored = cluster.assert_replicas_identical("orders", 6)?;
    assert_eq!(stored, 20_000);
    let log = fetch_topic(&Client::new(), cluster.broker(3), "orders", 6)?;
    verify(&acked, &log)?;
    // The leader reports all three replicas in sync, and so do followers, from its reports.
    let leader = cluster.leader_of("orders", 0)?;
    let http = Client::new();
    wait_until(
        Duration::from_secs(10),
        "all replicas reported in sync",
        || {
            let reply = http
                .get(&cluster.broker(leader).url("/topics/orders/partitions/0"))
                .ok()?;
            let replicas = reply.body["replicas"].as_array()?.clone();
            (replicas.len() == 3 && replicas.iter().all(|r| r["in_sync"] == json!(true)))
                .then_some(())
        },
    )?;
    let follower = (1..=3).find(|id| *id != leader).unwrap_or(1);
    // The cluster's Raft metrics are there and promtool-shaped (names checked in observability.rs).
    let metrics = http.get(&cluster.broker(leader).url("/metrics"))?.text;
    for name in [
        "pubg1_raft_elections_total",
        "pubg1_raft_leader_changes_total",
        "pubg1_raft_follower_lag_entries",
        "pubg1_peer_connects_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    let reply = wait_until(Duration::from_secs(10), "the follower's view", || {
        let reply = http
            .get(&cluster.broker(follower).url("/topics/orders/partitions/0"))
            .ok()?;
        let replicas = reply.body["replicas"].as_array()?.clone();
        replicas
            .iter()
            .all(|r| r["in_sync"] == json!(true))
            .then_some(reply)
    })?;
    assert_eq!(reply.body["leader"].as_u64(), Some(leader));
    let at_leader = http.get(&cluster.broker(leader).url("/topics/orders/partitions/0"))?;
    assert_eq!(
        reply.body["high_watermark"],
        at_leader.body["high_watermark"]
    );
    assert_eq!(reply.body["leader_epoch"], at_leader.body["leader_epoch"]);
    Ok(())
}

#[test]
fn killing_the_leader_five_times_under_load_loses_no_acknowledged_record() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3)?;
    cluster.create_replicated("events", 3)?;
    let targets = urls(cluster.topic_urls("events"));
    let load = Load::start(targets.clone(), "kill", 6, 20);
    let mut windows = Vec::new();
    for round in 0..5 {
        let leader = cluster.leader_of("events", 0)?;
        load.wait_for_more(500, "progress before the kill")?;
        cluster.broker_mut(leader).kill9();
        set(&targets, cluster.topic_urls("events"))?;
        let killed_at = Instant::now();
        // Partition 0 gets a new leader among the two survivors, and publishing goes on.
        let new_leader = cluster.leader_of("events", 0)?;
        assert_ne!(new_leader, leader, "round {round}");
        load.wait_for_more(200, "publishing to resume")?;
        windows.push(killed_at.elapsed());
        eprintln!(
            "round {round}: killed leader {leader}, new leader {new_leader}, resumed after {:?}",
            killed_at.elapsed()
        );
        cluster.broker_mut(leader).restart()?;
        set(&targets, cluster.topic_urls("events"))?;
    }
    let failed = load.failed();
    let acked = load.finish()?;
    eprintln!(
        "leader kills: {} records acknowledged, {failed} failed requests; kill-to-resumed (upper bound of unavailability) per round: {windows:?}",
        acked.len()
    );
    let stored = cluster.assert_replicas_identical("events", 3)?;
    verify(
        &acked,
        &fetch_topic(&Client::new(), cluster.broker(1), "events", 3)?,
    )?;
    assert!(stored >= acked.len());
    assert_epochs_never_decrease(&acked)?;
    Ok(())
}

#[test]
fn a_follower_killed_under_load_catches_up_byte_identical() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3)?;
    cluster.create_replicated("logs", 3)?;
    let leader = cluster.leader_of("logs", 0)?;
    let follower = (1..=3).find(|id| *id != leader).unwrap_or(1);
    // Publishers go to every broker, so they keep going through the kill (URLs rotate on failure).
    let load = Load::start(urls(cluster.topic_urls("logs")), "f", 4, 20);
    load.wait_for_more(1_000, "1,000 records with all three")?;
    cluster.broker_mut(follower).kill9();
    // The follower stays down for 10 s while the two others take real load.
    let killed_at = Instant::now();
    let before = load.acked();
    wait_until(
        Duration::from_secs(60),
        "10 s and 10,000 records without the follower",
        || {
            (killed_at.elapsed() >= Duration::from_secs(10) && load.acked() >= before + 10_000)
                .then_some(())
        },
    )?;
    eprintln!(
        "follower down 10 s: {} records acknowledged meanwhile",
        load.acked() - before
    );
    cluster.broker_mut(follower).restart()?;
    let acked = load.finish()?;
    cluster.assert_replicas_identical("logs", 3)?;
    verify(
        &acked,
        &fetch_topic(&Client::new(), cluster.broker(follower), "logs", 3)?,
    )?;
    Ok(())
}

#[test]
fn a_follower_behind_the_leaders_compacted_log_catches_up_by_snapshot() -> anyhow::Result<()> {
    // Leaders keep at most 200 Raft entries for a dead follower (the default is 50,000). The
    // flush of applied records keeps its default (5 s or 16 MiB): a log is compacted only as
    // far as a flush holds its applies, so the leader compacts past the follower within 5 s.
    let mut cluster = TestCluster::start_with_env(
        3,
        &[
            ("PUBG1_RAFT_LOG_KEEP_ENTRIES", "20"),
            ("PUBG1_RAFT_LOG_KEEP_ENTRIES_MAX", "200"),
        ],
    )?;
    cluster.create_replicated("behind", 1)?;
    let leader = cluster.leader_of("behind", 0)?;
    let follower = (1..=3).find(|id| *id != leader).unwrap_or(1);
    let targets = urls(cluster.topic_urls("behind"));
    let load = Load::start(targets.clone(), "s", 4, 10);
    load.wait_for_more(2_000, "load with every broker up")?;
    // 10-record batches: 8,000 records are 800 entries, four times what the leader keeps. The
    // follower installs a snapshot while publishing goes on, then follows the log.
    cluster.put_behind_compacted_log("behind", follower, &load, 8_000)?;
    set(&targets, cluster.topic_urls("behind"))?;
    let fetched = r#"pubg1_raft_snapshot_fetched_bytes_total{partition="0",topic="behind"}"#;
    let fetched = metric(cluster.broker(follower), fetched)?;
    assert!(
        fetched > 100_000.0,
        "fetched only {fetched} bytes of records"
    );
    load.wait_for_more(1_000, "load after the install")?;
    let acked = load.finish()?;
    cluster.assert_replicas_identical("behind", 1)?;
    let http = Client::new();
    verify(
        &acked,
        &fetch_topic(&http, cluster.broker(follower), "behind", 1)?,
    )?;
    // What the install wrote is durable: after another kill -9 the follower comes back intact.
    cluster.broker_mut(follower).kill9();
    cluster.broker_mut(follower).restart()?;
    cluster.assert_replicas_identical("behind", 1)?;
    verify(
        &acked,
        &fetch_topic(&http, cluster.broker(follower), "behind", 1)?,
    )?;
    Ok(())
}

#[test]
fn kill_9_of_every_broker_loses_nothing_acknowledged() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3)?;
    cluster.create_replicated("all", 3)?;
    let spec = Publish {
        topic: "all".into(),
        tag: "a".into(),
        clients: 4,
        records_per_client: 500,
        batch: 25,
    };
    let acked = publish_all(cluster.broker(1), &spec)?;
    // Applied records reach RocksDB without its WAL and become durable at a flush (16 MiB or
    // 5 s): none has happened, so what comes back after kill -9 comes from the Raft logs.
    for broker in &cluster.brokers {
        let flushes = metric(broker, "pubg1_storage_flush_seconds_count")?;
        assert_eq!(flushes, 0.0, "broker at {} flushed already", broker.http);
    }
    for broker in &mut cluster.brokers {
        broker.kill9();
    }
    for broker in &mut cluster.brokers {
        broker.spawn()?;
    }
    for broker in &mut cluster.brokers {
        broker.wait_ready()?;
    }
    for partition in 0..3 {
        cluster.leader_of("all", partition)?;
    }
    // An acknowledged marker per partition: everything committed before it is applied.
    let http = Client::new();
    for partition in 0..3 {
        let url = cluster
            .broker(1)
            .url(&format!("/topics/all/partitions/{partition}"));
        let reply = wait_until(Duration::from_secs(20), "a write after the restart", || {
            http.post_json(&url, &json!({"records":[{"value":"marker"}]}))
                .ok()
                .filter(|r| r.status == 200)
        })?;
        assert_eq!(reply.status, 200);
    }
    cluster.assert_replicas_identical("all", 3)?;
    verify(&acked, &fetch_topic(&http, cluster.broker(2), "all", 3)?)?;
    Ok(())
}

#[test]
fn without_a_majority_nothing_is_acknowledged_and_service_returns_with_it() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3)?;
    cluster.create_replicated("quorum", 1)?;
    let http = Client::new();
    let url = cluster.broker(1).url("/topics/quorum/partitions/0");
    let before = http.post_json(&url, &json!({"records":[{"value":1}]}))?;
    assert_eq!(before.status, 200, "{}", before.text);
    cluster.broker_mut(2).kill9();
    cluster.broker_mut(3).kill9();
    // Broker 1 alone: every attempt fails with a retriable error and nothing is acknowledged.
    // An append it took while it still led may be in some log (50302, outcome unknown, once it
    // has waited its 5 s); once it has stepped down (check-quorum) it refuses at once: nothing
    // was written (50301).
    let mut refusals = 0;
    let started = Instant::now();
    while refusals < 3 && started.elapsed() < Duration::from_secs(30) {
        let reply = http.post_json(&url, &json!({"records":[{"value":"no quorum"}]}))?;
        assert_ne!(
            reply.status, 200,
            "acknowledged without a majority: {}",
            reply.text
        );
        let code = if reply.error_code() == Some(50302) && refusals == 0 {
            50302
        } else {
            50301
        };
        reply.assert_error(503, code, "write without a majority");
        assert!(reply.retry_after.is_some(), "503 carries Retry-After");
        refusals += 1;
    }
    assert_eq!(refusals, 3);
    // One broker back: a majority again, and writes succeed.
    cluster.broker_mut(2).spawn()?;
    let reply = wait_until(
        Duration::from_secs(30),
        "writes to resume with a majority",
        || {
            http.post_json(&url, &json!({"records":[{"value":"back"}]}))
                .ok()
                .filter(|r| r.status == 200)
        },
    )?;
    assert!(reply.body["offsets"][0]["offset"].as_u64().is_some());
    Ok(())
}

#[test]
fn a_paused_leader_is_replaced_and_acknowledges_nothing_only_it_holds() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3)?;
    cluster.create_replicated("paused", 1)?;
    let leader = cluster.leader_of("paused", 0)?;
    let observer = LeadershipObserver::start(
        cluster
            .brokers
            .iter()
            .map(|b| b.url("/topics/paused/partitions/0"))
            .collect(),
    );
    let targets = urls(cluster.topic_urls("paused"));
    let load = Load::start(targets.clone(), "p", 4, 10);
    load.wait_for_more(500, "load before the pause")?;

    cluster.broker_mut(leader).pause()?;
    set(&targets, cluster.topic_urls("paused"))?;
    let paused_at = Instant::now();
    // The two others elect a new leader and keep acknowledging while the old one is frozen 5 s.
    let new_leader = cluster.leader_of("paused", 0)?;
    assert_ne!(new_leader, leader);
    let during = load.acked();
    wait_until(
        Duration::from_secs(30),
        "5 s of pause with progress",
        || {
            (paused_at.elapsed() >= Duration::from_secs(5) && load.acked() >= during + 500)
                .then_some(())
        },
    )?;
    cluster.broker_mut(leader).resume()?;
    set(&targets, cluster.topic_urls("paused"))?;
    // Publishing goes on with the old leader back as a follower.
    load.wait_for_more(500, "progress after the resume")?;
    let acked = load.finish()?;
    // Every acknowledged record is on the brokers that were never paused, and the resumed broker's
    // replica converges to the same bytes: nothing acknowledged lives only on the paused one.
    cluster.assert_replicas_identical("paused", 1)?;
    let http = Client::new();
    verify(
        &acked,
        &fetch_topic(&http, cluster.broker(new_leader), "paused", 1)?,
    )?;
    verify(
        &acked,
        &fetch_topic(&http, cluster.broker(leader), "paused", 1)?,
    )?;
    // No two leaders in one term, as every broker reported it throughout; and acknowledged
    // records' epochs never go down along the log (nothing the old leader acknowledged in its
    // term sits after what the new one acknowledged).
    let terms = observer.finish()?;
    let old_term = terms
        .iter()
        .filter(|(_, leaders)| leaders.contains(&leader))
        .map(|(term, _)| *term)
        .max();
    let new_term = terms
        .iter()
        .filter(|(_, leaders)| leaders.contains(&new_leader))
        .map(|(term, _)| *term)
        .max();
    assert!(old_term < new_term, "terms seen: {terms:?}");
    assert_epochs_never_decrease(&acked)?;
    assert!(
        acked.iter().any(|a| Some(a.leader_epoch) == new_term),
        "the new leader acknowledged records in its term"
    );
    Ok(())
}

/// Polls every broker's view of a partition's (term, leader) until finished; each term must
/// only ever be seen with one leader.
struct LeadershipObserver {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<std::collections::BTreeMap<u64, Vec<u64>>>,
}

impl LeadershipObserver {
    fn start(describe_urls: Vec<String>) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let http = Client::new();
            let mut terms: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
            let mut polls = 0u64;
            while !stopped.load(std::sync::atomic::Ordering::Acquire) || polls == 0 {
                for url in &describe_urls {
                    // A paused or dead broker does not answer: skip it this round.
                    let Ok(reply) = http.get(url) else { continue };
                    let term = reply.body["leader_epoch"].as_u64().unwrap_or(0);
                    let leader = reply.body["leader"].as_u64().unwrap_or(0);
                    if term > 0 && leader > 0 {
                        let leaders = terms.entry(term).or_default();
                        if !leaders.contains(&leader) {
                            leaders.push(leader);
                        }
                    }
                }
                polls += 1;
            }
            terms
        });
        Self { stop, thread }
    }

    /// Every term seen and its leaders; an error if any term had two.
    fn finish(self) -> anyhow::Result<std::collections::BTreeMap<u64, Vec<u64>>> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let terms = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("observer panicked"))?;
        for (term, leaders) in &terms {
            anyhow::ensure!(leaders.len() == 1, "term {term} had leaders {leaders:?}");
        }
        Ok(terms)
    }
}

#[test]
fn a_broker_without_a_replica_answers_421_naming_the_replica() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3)?;
    let http = Client::new();
    let body = json!({"name": "single", "partitions": 3, "replication_factor": 1});
    let created = http.post_json(&cluster.broker(1).url("/topics"), &body)?;
    assert_eq!(created.status, 201, "{}", created.text);
    let replica = created.body["partitions"][0]["replicas"][0]["broker"]
        .as_u64()
        .expect("replica");
    let other = (1..=3).find(|id| *id != replica).unwrap_or(1);
    let record = json!({"records":[{"value":"here"}]});
    // The replica itself takes it (once elected)...
    let at_replica = cluster.broker(replica).url("/topics/single/partitions/0");
    wait_until(
        Duration::from_secs(20),
        "the replica to accept a write",
        || {
            http.post_json(&at_replica, &record)
                .ok()
                .filter(|r| r.status == 200)
        },
    )?;
    // ...another broker refuses, writes nothing, and says where to go.
    let elsewhere = cluster.broker(other).url("/topics/single/partitions/0");
    let refused = http.post_json(&elsewhere, &record)?;
    refused.assert_error(421, 42101, "produce on a broker without a replica");
    let address = format!("http://{}", cluster.broker(replica).http);
    assert!(
        refused.text.contains(&address),
        "names {address}: {}",
        refused.text
    );
    let fetch = http.get(&format!("{elsewhere}/records"))?;
    fetch.assert_error(421, 42101, "fetch on a broker without a replica");
    let stored = http.get(&format!("{at_replica}/records"))?;
    assert_eq!(
        stored.body["records"].as_array().map(Vec::len),
        Some(1),
        "{}",
        stored.text
    );
    // Yet every broker answers metadata: the broker without a replica learns leader, term,
    // high watermark and in-sync replicas from the leader's reports.
    let described = wait_until(Duration::from_secs(10), "the leader's report", || {
        http.get(&elsewhere)
            .ok()
            .filter(|r| r.body["high_watermark"] == 1)
    })?;
    let at_leader = http.get(&at_replica)?;
    for field in ["leader", "leader_epoch", "high_watermark", "replicas"] {
        assert_eq!(
            described.body[field], at_leader.body[field],
            "{field}: {} vs {}",
            described.text, at_leader.text
        );
    }
    assert_eq!(described.body["leader"], replica);
    assert_eq!(described.body["replicas"][0]["in_sync"], true);
    Ok(())
}
