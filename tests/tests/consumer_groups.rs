//! Consumer groups over the REST Proxy v2 API on real broker processes: balanced assignment,
//! rebalances that never give one partition to two members, session expiry, a coordinator
//! killed with -9, and bad input refused with nothing changed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pubg1_tests::cluster::{urls, TestCluster};
use pubg1_tests::groups::{
    assert_never_two_owners, coordinator, create_instance, subscribe, wait_stable, Consumer, Poll,
};
use pubg1_tests::workload::{publish_all, Acked, Load, Publish};
use pubg1_tests::{create_topic, wait_until, BrokerProcess, Client};
use serde_json::json;

fn publish(broker: &BrokerProcess, tag: &str, records: usize) -> anyhow::Result<Vec<Acked>> {
    publish_all(
        broker,
        &Publish {
            topic: "t".into(),
            tag: tag.into(),
            clients: 3,
            records_per_client: records / 3,
            batch: 20,
        },
    )
}

/// Every record of `log`, counted by (partition, offset).
fn delivered(log: &[Poll]) -> BTreeMap<(u32, u64), usize> {
    let mut seen = BTreeMap::new();
    for poll in log {
        for record in &poll.records {
            *seen.entry(*record).or_default() += 1;
        }
    }
    seen
}

fn wait_delivered(log: &Arc<Mutex<Vec<Poll>>>, acked: &[Acked]) -> anyhow::Result<()> {
    wait_until(
        Duration::from_secs(30),
        "every acked record delivered",
        || {
            let log = log.lock().ok()?;
            let seen = delivered(&log);
            acked
                .iter()
                .all(|a| seen.contains_key(&(a.partition, a.offset)))
                .then_some(())
        },
    )
}

fn member(name: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut config = json!({"name": name, "format": "binary", "auto.offset.reset": "earliest",
        "auto.commit.enable": "false"});
    if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        config.extend(extra.clone());
    }
    config
}

#[test]
fn a_group_splits_six_partitions_evenly_and_rebalances_without_sharing_or_redelivering(
) -> anyhow::Result<()> {
    let cluster = TestCluster::start(3)?;
    cluster.create_replicated("t", 6)?;
    let mut acked = publish(cluster.broker(1), "a", 600)?;
    let home = coordinator(&cluster.brokers, "g")?;
    let broker = &cluster.brokers[home];
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut consumers = Vec::new();
    for name in ["c1", "c2", "c3"] {
        let base = create_instance(broker, "g", member(name, json!({})))?;
        subscribe(&base, &["t"])?;
        consumers.push(Consumer::start(name, base, log.clone()));
    }
    let owned = wait_stable(broker, "g", 3)?;
    assert_eq!(
        owned.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![2, 2, 2],
        "each of three members owns two partitions"
    );
    wait_delivered(&log, &acked)?;

    // Producers keep going through both rebalances, so records arrive while partitions move.
    let load = Load::start(urls(cluster.topic_urls("t")), "live", 3, 5);
    load.wait_for_more(300, "records under load")?;
    for round in 0..3 {
        // A fourth joins: it gets partitions only after their owners released them.
        let name = format!("c{}", round + 4);
        let base = create_instance(broker, "g", member(&name, json!({})))?;
        subscribe(&base, &["t"])?;
        consumers.push(Consumer::start(&name, base, log.clone()));
        let mut loads: Vec<usize> = wait_stable(broker, "g", 4)?.iter().map(Vec::len).collect();
        loads.sort_unstable();
        assert_eq!(loads, vec![1, 1, 2, 2]);
        load.wait_for_more(200, "records under load")?;

        // The oldest leaves (stops, then deletes its instance): its partitions go to the others.
        let mut leaving = consumers.remove(0);
        leaving.stop()?;
        let reply = Client::new().delete(&leaving.base)?;
        assert_eq!(reply.status, 204, "{}", reply.text);
        assert_eq!(
            wait_stable(broker, "g", 3)?
                .iter()
                .map(Vec::len)
                .collect::<Vec<_>>(),
            vec![2, 2, 2]
        );
        load.wait_for_more(200, "records under load")?;
    }
    acked.extend(load.finish()?);
    wait_delivered(&log, &acked)?;
    for consumer in &mut consumers {
        consumer.stop()?;
    }

    let log = log.lock().map_err(|_| anyhow::anyhow!("log poisoned"))?;
    assert_never_two_owners(&log);
    let seen = delivered(&log);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "records delivered twice: {twice:?}");
    let acked_at: BTreeSet<(u32, u64)> = acked.iter().map(|a| (a.partition, a.offset)).collect();
    let extra: Vec<_> = seen.keys().filter(|k| !acked_at.contains(k)).collect();
    assert!(extra.is_empty(), "records never acked: {extra:?}");
    assert_eq!(seen.len(), acked.len());
    // Committed offsets equal each partition's end.
    let reply = Client::new().get(&broker.url("/consumer-groups/g"))?;
    for partition in reply.body["partitions"].as_array().into_iter().flatten() {
        assert_eq!(partition["lag"], 0, "{partition}");
    }
    Ok(())
}

#[test]
fn a_member_that_stops_polling_loses_its_partitions_after_its_session_and_cannot_commit(
) -> anyhow::Result<()> {
    let cluster = TestCluster::start(3)?;
    cluster.create_replicated("t", 4)?;
    let acked = publish(cluster.broker(1), "s", 300)?;
    let home = coordinator(&cluster.brokers, "g")?;
    let broker = &cluster.brokers[home];
    let log = Arc::new(Mutex::new(Vec::new()));
    let session = json!({"session.timeout.ms": 1500});
    let stays = create_instance(broker, "g", member("stays", session.clone()))?;
    let stalls = create_instance(broker, "g", member("stalls", session))?;
    subscribe(&stays, &["t"])?;
    subscribe(&stalls, &["t"])?;
    let mut a = Consumer::start("stays", stays, log.clone());
    let mut b = Consumer::start("stalls", stalls.clone(), log.clone());
    assert_eq!(
        wait_stable(broker, "g", 2)?
            .iter()
            .map(Vec::len)
            .collect::<Vec<_>>(),
        vec![2, 2]
    );
    // The stalling member's client dies between polls.
    b.stop()?;
    let owned = wait_stable(broker, "g", 1)?;
    assert_eq!(
        owned,
        vec![vec![0, 1, 2, 3]],
        "the survivor owns everything"
    );
    wait_delivered(&log, &acked)?;
    a.stop()?;
    let reply = Client::new().post_v2(
        &format!("{stalls}/offsets"),
        &json!({"offsets": [{"topic": "t", "partition": 0, "offset": 1}]}),
    )?;
    reply.assert_error(409, 40904, "a commit by a member whose session expired");
    let reply = Client::new().get(&format!("{stalls}/records?timeout=0"))?;
    reply.assert_error(409, 40904, "a poll by a member whose session expired");
    assert_never_two_owners(&log.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    Ok(())
}

#[test]
fn killing_the_coordinator_keeps_every_acknowledged_commit_and_members_continue(
) -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3)?;
    cluster.create_replicated("t", 3)?;
    let first = publish(cluster.broker(1), "k", 300)?;
    let home = coordinator(&cluster.brokers, "g")?;
    let log = Arc::new(Mutex::new(Vec::new()));
    let base = create_instance(&cluster.brokers[home], "g", member("before", json!({})))?;
    subscribe(&base, &["t"])?;
    let mut consumer = Consumer::start("before", base, log.clone());
    wait_delivered(&log, &first)?;
    consumer.stop()?;
    let before = Client::new().get(&cluster.brokers[home].url("/consumer-groups/g"))?;
    let committed: BTreeMap<u64, u64> = before.body["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["partition"].as_u64()?, p["committed_offset"].as_u64()?)))
        .collect();
    assert_eq!(
        committed.values().sum::<u64>(),
        300,
        "every consumed record committed"
    );

    cluster.brokers[home].kill9();
    let next = coordinator(&cluster.brokers, "g")?;
    assert_ne!(next, home);
    let broker = &cluster.brokers[next];
    let after = Client::new().get(&broker.url("/consumer-groups/g"))?;
    for partition in after.body["partitions"].as_array().into_iter().flatten() {
        let p = partition["partition"].as_u64().unwrap_or(u64::MAX);
        assert_eq!(
            partition["committed_offset"].as_u64(),
            committed.get(&p).copied(),
            "committed offset of partition {p} after the coordinator died"
        );
    }
    assert_eq!(
        after.body["state"], "Empty",
        "no member survived its coordinator"
    );
    // A member joining the new coordinator resumes from the committed offsets.
    for partition in 0..3 {
        cluster.leader_of("t", partition)?;
    }
    let second = publish(broker, "l", 150)?;
    let log = Arc::new(Mutex::new(Vec::new()));
    let base = create_instance(broker, "g", member("after", json!({})))?;
    subscribe(&base, &["t"])?;
    let running = Client::new().get(&broker.url("/consumer-groups/g"))?;
    assert!(
        running.body["coordinator_epoch"].as_u64() > before.body["coordinator_epoch"].as_u64(),
        "the new coordinator took the group over under a new epoch: {}",
        running.text
    );
    let mut consumer = Consumer::start("after", base, log.clone());
    wait_delivered(&log, &second)?;
    consumer.stop()?;
    let seen = delivered(&log.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let redelivered: Vec<_> = first
        .iter()
        .filter(|a| seen.contains_key(&(a.partition, a.offset)))
        .collect();
    assert!(
        redelivered.is_empty(),
        "committed records delivered again: {}",
        redelivered.len()
    );
    Ok(())
}

#[test]
fn bad_consumer_requests_get_clear_errors_and_change_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = BrokerProcess::start(&dir.path().join("broker"), &[])?;
    let http = Client::new();
    create_topic(&http, &broker, "t", 2)?;
    let produced = http.post_json(
        &broker.url("/topics/t/partitions/0"),
        &json!({"records": [{"value": 1}, {"value": 2}, {"value": 3}]}),
    )?;
    assert_eq!(produced.status, 200, "{}", produced.text);
    let base = create_instance(
        &broker,
        "g",
        json!({"name": "c", "auto.offset.reset": "earliest"}),
    )?;
    subscribe(&base, &["t"])?;
    // Poll until the instance owns both partitions and has read the three records.
    wait_until(Duration::from_secs(10), "records", || {
        let reply = http.get(&format!("{base}/records?timeout=500")).ok()?;
        (reply.body.as_array()?.len() == 3).then_some(())
    })?;
    let commit = |offsets: serde_json::Value| {
        http.post_v2(&format!("{base}/offsets"), &json!({"offsets": offsets}))
    };
    let reply = commit(json!([{"topic": "t", "partition": 0, "offset": 2}]))?;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let committed = || -> anyhow::Result<serde_json::Value> {
        let reply = http.get_json(
            &format!("{base}/offsets"),
            &json!({"partitions": [{"topic": "t", "partition": 0}]}),
        )?;
        assert_eq!(reply.status, 200, "{}", reply.text);
        Ok(reply.body["offsets"][0]["offset"].clone())
    };
    assert_eq!(committed()?, json!(2));

    commit(json!([{"topic": "t", "partition": 0, "offset": -1}]))?.assert_error(
        422,
        42203,
        "a negative offset",
    );
    commit(json!([{"topic": "t", "partition": 0, "offset": 4}]))?.assert_error(
        422,
        42203,
        "an offset beyond the high watermark",
    );
    commit(json!([{"topic": "t", "partition": 7, "offset": 0}]))?.assert_error(
        409,
        40905,
        "a partition the instance does not own",
    );
    commit(json!([{"topic": "other", "partition": 0, "offset": 0}]))?.assert_error(
        409,
        40905,
        "a topic the instance does not read",
    );
    http.post_v2(
        &broker.url("/consumers/g/instances/nobody/offsets"),
        &json!({"offsets": [{"topic": "t", "partition": 0, "offset": 1}]}),
    )?
    .assert_error(404, 40403, "an unknown instance");
    http.get(&broker.url("/consumers/g/instances/nobody/records"))?
        .assert_error(404, 40403, "a poll of an unknown instance");
    http.post_v2(
        &format!("{base}/subscription"),
        &json!({"topics": ["missing"]}),
    )?
    .assert_error(404, 40401, "a subscription to a missing topic");
    http.post_v2(
        &format!("{base}/subscription"),
        &json!({"topics": ["t"], "topic_pattern": "t.*"}),
    )?
    .assert_error(422, 42201, "both topics and a pattern");
    http.post_v2(
        &format!("{base}/subscription"),
        &json!({"topic_pattern": "("}),
    )?
    .assert_error(422, 42201, "a pattern that is not a regular expression");
    http.post_v2(&broker.url("/consumers/g"), &json!({"name": "c"}))?
        .assert_error(409, 40903, "an instance name already taken");
    http.post_v2(&broker.url("/consumers/g"), &json!({"format": "avro"}))?
        .assert_error(422, 42201, "an unknown format");
    http.post_v2(&broker.url("/consumers/bad%20name"), &json!({}))?
        .assert_error(422, 42201, "a group name with a space");
    http.post_v2(
        &broker.url("/consumers/g"),
        &json!({"session.timeout.ms": 10}),
    )?
    .assert_error(422, 42201, "a session timeout below the minimum");
    http.post_v2(
        &format!("{base}/subscription"),
        &json!({"topic_pattern": "a)|(.*"}),
    )?
    .assert_error(422, 42201, "a pattern that would escape its anchors");
    // Naming a group that does not exist creates nothing.
    http.get(&broker.url("/consumer-groups/nope"))?
        .assert_error(404, 40404, "describing an unknown group");
    http.get(&broker.url("/consumers/nope/instances/c/records"))?
        .assert_error(404, 40403, "polling an instance of an unknown group");
    let listed = http.get(&broker.url("/consumer-groups"))?;
    let names: Vec<&str> = listed.body["consumer_groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g["group"].as_str())
        .collect();
    assert_eq!(names, vec!["g"], "{}", listed.text);
    // Nothing changed: the committed offset, the subscription and the members.
    assert_eq!(committed()?, json!(2));
    let reply = http.get(&format!("{base}/subscription"))?;
    assert_eq!(reply.body["topics"], json!(["t"]), "{}", reply.text);
    let group = http.get(&broker.url("/consumer-groups/g"))?;
    assert_eq!(group.body["members"].as_array().map(Vec::len), Some(1));
    Ok(())
}

/// A fault sequence: an offsets-partition follower is down while the group commits far past
/// what its leader keeps in its log, comes back, and must catch up by snapshot; then the
/// other follower dies, so every further commit needs the one that caught up.
#[test]
fn an_offsets_follower_behind_the_compacted_log_catches_up_by_snapshot_and_keeps_the_quorum(
) -> anyhow::Result<()> {
    // A short log for slow followers, so a few hundred commits put one behind it.
    let env = [
        ("PUBG1_RAFT_LOG_KEEP_ENTRIES", "20"),
        ("PUBG1_RAFT_LOG_KEEP_ENTRIES_MAX", "50"),
    ];
    let mut cluster = TestCluster::start_with_env(3, &env)?;
    cluster.create_replicated("t", 1)?;
    publish(cluster.broker(1), "f", 450)?;
    let home = coordinator(&cluster.brokers, "g")?;
    let base = create_instance(&cluster.brokers[home], "g", member("m", json!({})))?;
    let http = Client::new();
    let reply = http.post_v2(
        &format!("{base}/assignments"),
        &json!({"partitions": [{"topic": "t", "partition": 0}]}),
    )?;
    assert_eq!(reply.status, 204, "{}", reply.text);
    let commit = |offset: u64| {
        http.post_v2(
            &format!("{base}/offsets"),
            &json!({"offsets": [{"topic": "t", "partition": 0, "offset": offset}]}),
        )
    };
    let (behind, other) = ((home + 1) % 3, (home + 2) % 3);
    cluster.brokers[behind].kill9();
    for offset in 1..=300 {
        let reply = commit(offset)?;
        assert_eq!(reply.status, 200, "commit {offset}: {}", reply.text);
    }
    cluster.brokers[behind].restart()?;
    let installed = r#"pubg1_raft_snapshots_installed_total{partition="#;
    wait_until(Duration::from_secs(30), "a snapshot installed", || {
        let text = http
            .get(&cluster.brokers[behind].url("/metrics"))
            .ok()?
            .text;
        text.lines()
            .any(|l| {
                l.starts_with(installed) && l.contains("__consumer_offsets") && !l.ends_with(" 0")
            })
            .then_some(())
    })?;
    cluster.brokers[other].kill9();
    // Only the leader and the follower that caught up are left: a commit needs both.
    wait_until(
        Duration::from_secs(30),
        "a commit with the caught-up follower",
        || (commit(301).ok()?.status == 200).then_some(()),
    )?;
    // And the follower holds every commit: with the leader gone, it serves them.
    cluster.brokers[home].kill9();
    cluster.brokers[other].restart()?;
    let next = coordinator(&cluster.brokers, "g")?;
    let reply = http.get(&cluster.brokers[next].url("/consumer-groups/g"))?;
    assert_eq!(
        reply.body["partitions"][0]["committed_offset"], 301,
        "{}",
        reply.text
    );
    Ok(())
}

/// Partitions the coordinator's broker holds no replica of (replication factor 1 on three
/// brokers) are read from their leaders: every acknowledged record reaches the member.
#[test]
fn a_member_reads_partitions_its_coordinator_holds_no_replica_of() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3)?;
    let http = Client::new();
    let created = http.post_json(
        &cluster.broker(1).url("/topics"),
        &json!({"name": "t", "partitions": 3, "replication_factor": 1}),
    )?;
    assert_eq!(created.status, 201, "{}", created.text);
    // Each partition's records go to its one replica.
    let mut acked: Vec<(u32, u64)> = Vec::new();
    let mut replica_of = BTreeMap::new();
    for partition in 0..3u32 {
        let replica = wait_until(Duration::from_secs(20), "a leader", || {
            let reply = http
                .get(
                    &cluster
                        .broker(1)
                        .url(&format!("/topics/t/partitions/{partition}")),
                )
                .ok()?;
            reply.body["leader"].as_u64().filter(|l| *l != 0)
        })?;
        replica_of.insert(partition, replica);
        let records: Vec<serde_json::Value> = (0..100)
            .map(|i| json!({"value": {"p": partition, "i": i}}))
            .collect();
        let reply = http.post_json(
            &cluster
                .broker(replica)
                .url(&format!("/topics/t/partitions/{partition}")),
            &json!({ "records": records }),
        )?;
        assert_eq!(reply.status, 200, "{}", reply.text);
        for at in reply.body["offsets"].as_array().into_iter().flatten() {
            acked.push((partition, at["offset"].as_u64().unwrap_or(u64::MAX)));
        }
    }
    let home = coordinator(&cluster.brokers, "g")?;
    let broker = &cluster.brokers[home];
    let me = home as u64 + 1;
    assert!(
        replica_of.values().any(|r| *r != me),
        "the test needs a partition off the coordinator's broker: {replica_of:?}"
    );
    let log = Arc::new(Mutex::new(Vec::new()));
    let base = create_instance(broker, "g", member("c1", json!({"format": "json"})))?;
    subscribe(&base, &["t"])?;
    let mut consumer = Consumer::start("c1", base, log.clone());
    wait_until(
        Duration::from_secs(30),
        "every acked record delivered",
        || {
            let seen = delivered(&log.lock().ok()?);
            acked.iter().all(|a| seen.contains_key(a)).then_some(())
        },
    )?;
    consumer.stop()?;
    let seen = delivered(&log.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    assert_eq!(seen.len(), acked.len(), "each acknowledged record once");
    assert!(seen.values().all(|n| *n == 1));
    Ok(())
}

/// A fault sequence: the coordinator's broker is paused (SIGSTOP) long enough for another
/// broker to take the group over and hand its partitions to a new member; when the paused
/// broker resumes, its member's next poll must deliver nothing (it answers 503, or the
/// instance is gone), so no partition is read by two members at once.
#[test]
fn a_coordinator_paused_past_a_takeover_hands_out_nothing_when_it_resumes() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3)?;
    cluster.create_replicated("t", 3)?;
    let first = publish(cluster.broker(1), "p", 150)?;
    let home = coordinator(&cluster.brokers, "g")?;
    let log = Arc::new(Mutex::new(Vec::new()));
    let old_base = create_instance(&cluster.brokers[home], "g", member("old", json!({})))?;
    subscribe(&old_base, &["t"])?;
    let mut old = Consumer::start("old", old_base.clone(), log.clone());
    wait_delivered(&log, &first)?;
    old.stop()?;
    // Records the old member has not read yet, on every replica (the paused broker's too): a
    // poll of the old member on resume would find them at once.
    let second = publish(cluster.broker(1), "q", 150)?;
    let http = Client::new();
    for partition in 0..3u32 {
        let end = second
            .iter()
            .filter(|a| a.partition == partition)
            .map(|a| a.offset + 1)
            .max()
            .unwrap_or(0);
        let url = cluster.brokers[home].url(&format!("/topics/t/partitions/{partition}"));
        wait_until(
            Duration::from_secs(20),
            "the records on the coordinator's broker",
            || {
                let reply = http.get(&url).ok()?;
                (reply.body["high_watermark"].as_u64()? >= end).then_some(())
            },
        )?;
    }

    cluster.brokers[home].pause()?;
    let next = coordinator(&cluster.brokers, "g")?;
    assert_ne!(
        next, home,
        "another broker coordinates the group while this one is paused"
    );
    let new_base = create_instance(&cluster.brokers[next], "g", member("new", json!({})))?;
    subscribe(&new_base, &["t"])?;
    let mut new = Consumer::start("new", new_base, log.clone());
    wait_delivered(&log, &second)?;

    // The old member's poll is written to the paused broker's socket before it resumes, as a
    // client's would be whose request was sent during the pause; then it polls on.
    let response = {
        use std::io::{Read, Write};
        let rest = old_base
            .strip_prefix("http://")
            .ok_or_else(|| anyhow::anyhow!("base_uri {old_base}"))?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut socket = std::net::TcpStream::connect(host)?;
        socket.set_read_timeout(Some(Duration::from_secs(30)))?;
        // HTTP/1.0: the broker closes the connection after its answer, so reading to the end
        // reads exactly one response.
        write!(
            socket,
            "GET /{path}/records?timeout=200 HTTP/1.0\r\nHost: {host}\r\n\r\n"
        )?;
        socket.flush()?;
        cluster.brokers[home].resume()?;
        let mut response = String::new();
        socket.read_to_string(&mut response)?;
        response
    };
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let records = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|b| b.as_array().map(Vec::len))
        .unwrap_or(0);
    assert!(
        response.starts_with("HTTP/1."),
        "no answer to the poll sent during the pause: {response}"
    );
    assert_eq!(
        records, 0,
        "the resumed coordinator delivered records of a group another broker coordinates: {response}"
    );
    for _ in 0..5 {
        let reply = http.get(&format!("{old_base}/records?timeout=200"))?;
        let records = reply.body.as_array().map_or(0, Vec::len);
        assert_eq!(
            records, 0,
            "the resumed coordinator delivered records of a group another broker coordinates: {} {}",
            reply.status, reply.text
        );
        if reply.status != 200 {
            break;
        }
    }
    new.stop()?;
    let log = log.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    assert_never_two_owners(&log);
    Ok(())
}
