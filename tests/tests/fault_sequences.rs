//! Faults in sequence, where replicated logs lose data: a crash during recovery, a second crash
//! inside a flush interval, a replica that lags behind what the leader acknowledged. Every setting
//! keeps its default unless a test says why (a small kept Raft log makes snapshots happen within
//! seconds instead of minutes; nothing here shortens the flush interval).

use std::time::Duration;

use pubg1_tests::cluster::{set, urls, TestCluster};
use pubg1_tests::workload::{fetch_topic, publish_all, verify, Load, Publish};
use pubg1_tests::{metric, wait_until, Client};

/// A follower that restarts replays its committed Raft tail into `records`' memtable (applies
/// skip the WAL), then gets a snapshot because the leader compacted past it. A second kill -9
/// before the next flush of `records` must not leave a hole where the replayed records were.
#[test]
fn a_snapshot_installed_over_replayed_applies_survives_a_kill_before_the_next_flush(
) -> anyhow::Result<()> {
    let mut cluster =
        TestCluster::start_with_env(3, &[("PUBG1_RAFT_LOG_KEEP_ENTRIES_MAX", "200")])?;
    cluster.create_replicated("twice", 1)?;
    let leader = cluster.leader_of("twice", 0)?;
    let follower = (1..=3).find(|id| *id != leader).unwrap_or(1);
    let targets = urls(cluster.topic_urls("twice"));
    let load = Load::start(targets.clone(), "t", 4, 10);
    load.wait_for_more(3_000, "load with every broker up")?;
    // 10-record batches: 6,000 records are 600 entries, three times what the leader keeps for
    // a dead follower.
    cluster.put_behind_compacted_log("twice", follower, &load, 6_000)?;
    set(&targets, cluster.topic_urls("twice"))?;
    // At once: the scheduled flush of `records` is up to 5 s (or 16 MiB of applies) away.
    cluster.broker_mut(follower).kill9();
    load.wait_for_more(1_000, "load with the follower down again")?;
    cluster.broker_mut(follower).restart()?;
    set(&targets, cluster.topic_urls("twice"))?;
    load.wait_for_more(1_000, "load after the second restart")?;
    let acked = load.finish()?;
    cluster.wait_converged("twice", pubg1_tests::cluster::CONVERGE_DEADLINE)?;
    let http = Client::new();
    for (i, broker) in cluster.brokers.iter().enumerate() {
        verify(&acked, &fetch_topic(&http, broker, "twice", 1)?)
            .map_err(|e| e.context(format!("broker {}'s replica", i + 1)))?;
    }
    cluster.assert_replicas_identical("twice", 1)?;
    Ok(())
}

/// A replica that was paused while records were acknowledged, asked at once for an offset past
/// its own high watermark but inside the leader's, answers as a long poll (Kafka clients reset
/// their position on "out of range"); an offset past the leader's log is still out of range.
#[test]
fn a_lagging_replica_answers_a_fetch_inside_the_leaders_log_as_a_long_poll() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3)?;
    cluster.create_replicated("lag", 1)?;
    let leader = cluster.leader_of("lag", 0)?;
    let follower = (1..=3).find(|id| *id != leader).unwrap_or(1);
    cluster.broker_mut(follower).pause()?;
    let spec = Publish {
        topic: "lag".into(),
        tag: "l".into(),
        clients: 3,
        records_per_client: 1_000,
        batch: 50,
    };
    let acked = publish_all(cluster.broker(leader), &spec)?;
    assert_eq!(acked.len(), 3_000);
    cluster.broker_mut(follower).resume()?;
    let http = Client::new();
    let lagging = cluster.broker(follower);
    let reply = http.get(
        &lagging.url("/topics/lag/partitions/0/records?offset=2999&timeout_ms=2000&format=binary"),
    )?;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let records = reply.body["records"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        records.first().and_then(|r| r["offset"].as_u64()),
        Some(2999),
        "the long poll returns the record once the replica has it: {}",
        reply.text
    );
    // Past the end of the log as the leader knows it: out of range, at once on the leader, and
    // on the replica once a report from the leader newer than the request says so (reports go
    // out every 10 ticks, 300 ms).
    let reply = http.get(
        &cluster
            .broker(leader)
            .url("/topics/lag/partitions/0/records?offset=1000000"),
    )?;
    reply.assert_error(416, 41601, "an offset past the leader's log, on the leader");
    let reply =
        http.get(&lagging.url("/topics/lag/partitions/0/records?offset=1000000&timeout_ms=1000"))?;
    reply.assert_error(416, 41601, "an offset past the leader's log, on a replica");
    verify(&acked, &fetch_topic(&http, lagging, "lag", 1)?)?;
    Ok(())
}

/// The metadata group compacts its log like any other; a broker that was down while more
/// catalog changes committed than the leader keeps must catch up by snapshot (it used to stay
/// behind for good: the metadata group offered none).
#[test]
fn a_broker_behind_the_compacted_metadata_log_catches_up_by_snapshot() -> anyhow::Result<()> {
    // Compaction in steps of 20 entries (default 200), and at most 200 entries kept for a dead
    // follower (default 50,000): 258 catalog changes then put broker 3 behind the kept log.
    let mut cluster = TestCluster::start_with_env(
        3,
        &[
            ("PUBG1_RAFT_LOG_KEEP_ENTRIES", "20"),
            ("PUBG1_RAFT_LOG_KEEP_ENTRIES_MAX", "200"),
        ],
    )?;
    cluster.broker_mut(3).kill9();
    let http = Client::new();
    // As an admin client does: a 503 is retried (broker 3 may have led the metadata group, and
    // a request forwarded to it has an unknown outcome); after one, "already done" is success.
    let admin =
        |what: &str, request: &dyn Fn() -> anyhow::Result<pubg1_tests::Reply>, done: u16| {
            let mut retried = false;
            wait_until(Duration::from_secs(30), what, || match request() {
                Ok(reply) if reply.status == 201 || reply.status == 200 || reply.status == 204 => {
                    Some(Ok(()))
                }
                Ok(reply) if reply.status == 503 => {
                    retried = true;
                    None
                }
                Ok(reply) if retried && reply.status == done => Some(Ok(())),
                Ok(reply) => Some(Err(anyhow::anyhow!(
                    "{what}: {} {}",
                    reply.status,
                    reply.text
                ))),
                Err(_) => None,
            })?
        };
    // 130 creates and 128 deletes: 258 entries, more than the 200 kept for a dead follower.
    for n in 0..130 {
        let body =
            serde_json::json!({"name": format!("t{n}"), "partitions": 1, "replication_factor": 1});
        let url = cluster.broker(1).url("/topics");
        admin("a create", &|| http.post_json(&url, &body), 409)?;
        if n >= 2 {
            let url = cluster.broker(1).url(&format!("/topics/t{}", n - 2));
            admin("a delete", &|| http.delete(&url), 404)?;
        }
    }
    cluster.broker_mut(3).restart()?;
    let topics = |broker: &pubg1_tests::BrokerProcess| -> Option<Vec<String>> {
        let reply = http.get(&broker.url("/topics")).ok()?;
        let mut names: Vec<String> = serde_json::from_value(reply.body).ok()?;
        names.sort();
        Some(names)
    };
    let expected = vec!["t128".to_owned(), "t129".to_owned()];
    assert_eq!(topics(cluster.broker(1)), Some(expected.clone()));
    wait_until(
        Duration::from_secs(30),
        "the restarted broker to hold the same catalog",
        || (topics(cluster.broker(3)) == Some(expected.clone())).then_some(()),
    )?;
    // And it keeps following the log after the snapshot.
    let reply = http.post_json(
        &cluster.broker(2).url("/topics"),
        &serde_json::json!({"name": "after", "partitions": 1, "replication_factor": 3}),
    )?;
    assert_eq!(reply.status, 201, "{}", reply.text);
    cluster.leader_of("after", 0)?;
    let reply = http.post_json(
        &cluster.broker(3).url("/topics/after"),
        &serde_json::json!({"records": [{"value": "x"}]}),
    )?;
    assert_eq!(reply.status, 200, "{}", reply.text);
    Ok(())
}

/// Idle groups quiesce (no ticks, no heartbeats); a quiesced leader killed with -9 is still
/// replaced (its followers' brokers notice the silence and wake them), nothing acknowledged is
/// lost, and a quiesced group wakes for the next write.
#[test]
fn idle_partitions_quiesce_and_a_killed_quiesced_leader_is_still_replaced() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3)?;
    cluster.create_replicated("idle", 6)?;
    let spec = Publish {
        topic: "idle".into(),
        tag: "i".into(),
        clients: 2,
        records_per_client: 300,
        batch: 30,
    };
    let acked = publish_all(cluster.broker(1), &spec)?;
    let quiesced = "pubg1_raft_quiesced_groups";
    for id in 1..=3 {
        wait_until(
            Duration::from_secs(30),
            "every replica of the idle topic to quiesce",
            || {
                metric(cluster.broker(id), quiesced)
                    .ok()
                    .filter(|n| *n >= 6.0)
            },
        )?;
    }
    let leader = cluster.leader_of("idle", 0)?;
    cluster.broker_mut(leader).kill9();
    let http = Client::new();
    let survivor = (1..=3).find(|id| *id != leader).unwrap_or(1);
    let url = cluster.broker(survivor).url("/topics/idle/partitions/0");
    let body = serde_json::json!({"records": [{"key": "after-kill", "value": "x"}]});
    let reply = wait_until(
        Duration::from_secs(20),
        "a write to the killed leader's partition to succeed",
        || http.post_json(&url, &body).ok().filter(|r| r.status == 200),
    )?;
    let new_leader = cluster.leader_of("idle", 0)?;
    assert_ne!(new_leader, leader);
    assert!(reply.body["offsets"][0]["offset"].as_u64().is_some());
    cluster.broker_mut(leader).restart()?;
    // Everything acknowledged before the kill is on every replica, which agree.
    cluster.assert_replicas_identical("idle", 6)?;
    for broker in &cluster.brokers {
        verify(&acked, &fetch_topic(&http, broker, "idle", 6)?)?;
    }
    Ok(())
}
