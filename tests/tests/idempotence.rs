//! Idempotent producers over HTTP: a retry of a batch already stored is answered with its
//! original offsets and stores nothing, through the fault sequences that rebuild a replica's
//! producer state in different ways: every broker killed -9 inside the flush interval (the
//! state is replayed from the Raft log with the records), and a replica brought back by a
//! snapshot (the state comes with it) that then leads.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use pubg1_tests::cluster::{TestCluster, ELECTION_DEADLINE};
use pubg1_tests::{metric, wait_until, Client, Reply};

/// Produce `count` records from sequence `sequence` through whichever broker leads partition 0,
/// retrying while no leader answers (an election). The first definite answer is returned.
fn produce(
    cluster: &TestCluster,
    http: &Client,
    producer: i64,
    epoch: i64,
    sequence: i64,
    count: usize,
) -> Result<Reply> {
    let records: Vec<Value> = (0..count)
        .map(|i| json!({"value": format!("p{producer}e{epoch}s{}", sequence + i as i64)}))
        .collect();
    let body = json!({"records": records, "producer_id": producer,
                      "producer_epoch": epoch, "sequence": sequence});
    wait_until(ELECTION_DEADLINE, "a leader to answer the produce", || {
        let leader = cluster.leader_of("idem", 0).ok()?;
        let broker = cluster.broker(leader);
        let reply = http
            .post_v2(&broker.url("/topics/idem/partitions/0"), &body)
            .ok()?;
        (reply.status != 503 && reply.status != 421 && reply.status != 429).then_some(reply)
    })
}

fn offsets(reply: &Reply) -> Result<(Vec<u64>, bool)> {
    if reply.status != 200 {
        bail!("produce answered {}: {}", reply.status, reply.text);
    }
    let list = reply.body["offsets"]
        .as_array()
        .ok_or_else(|| anyhow!("no offsets: {}", reply.text))?;
    let offsets = list
        .iter()
        .map(|o| o["offset"].as_u64().ok_or_else(|| anyhow!("{o}")))
        .collect::<Result<Vec<u64>>>()?;
    let duplicate = list.iter().all(|o| o["duplicate"] == true);
    Ok((offsets, duplicate))
}

fn new_producer(cluster: &TestCluster, http: &Client) -> Result<i64> {
    let reply = http.post_v2(&cluster.broker(1).url("/producers"), &json!({}))?;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.body["producer_epoch"], 0);
    reply.body["producer_id"]
        .as_i64()
        .ok_or_else(|| anyhow!("{}", reply.text))
}

fn high_watermark(cluster: &TestCluster, http: &Client, broker: u64) -> Result<u64> {
    let reply = http.get(&cluster.broker(broker).url("/topics/idem/partitions/0"))?;
    reply.body["high_watermark"]
        .as_u64()
        .ok_or_else(|| anyhow!("{}", reply.text))
}

/// Rules and errors on a healthy cluster, then every broker killed -9 at once right after the
/// writes (well inside the 5 s flush interval, so the applies are lost with the memtable and
/// replayed): retries are still answered with the original offsets.
#[test]
fn retries_get_the_original_offsets_and_gaps_and_fenced_epochs_are_refused_across_a_full_crash(
) -> Result<()> {
    let mut cluster = TestCluster::start(3)?;
    cluster.create_replicated("idem", 1)?;
    let http = Client::new();
    let (a, b) = (
        new_producer(&cluster, &http)?,
        new_producer(&cluster, &http)?,
    );
    assert_ne!(a, b, "producer ids are unique");

    let (first, dup) = offsets(&produce(&cluster, &http, a, 0, 0, 3)?)?;
    assert!(!dup);
    let (second, _) = offsets(&produce(&cluster, &http, a, 0, 3, 2)?)?;
    assert_eq!(second[0], first[2] + 1);
    let retried = produce(&cluster, &http, a, 0, 0, 3)?;
    assert_eq!(
        offsets(&retried)?,
        (first.clone(), true),
        "{}",
        retried.text
    );
    let counted = metric(
        cluster.broker(cluster.leader_of("idem", 0)?),
        r#"pubg1_produce_duplicate_batches_total{topic="idem"}"#,
    )?;
    // At least this resend (a 503'd attempt that was stored and retried would add one).
    assert!(
        counted >= 1.0,
        "the resend is counted where it was answered"
    );
    produce(&cluster, &http, a, 0, 9, 1)?.assert_error(409, 40908, "a gap in the sequence");
    produce(&cluster, &http, a, 0, 1, 2)?.assert_error(409, 40908, "not one of the batches");
    // Producer b moves to epoch 1 (from sequence 0); its epoch 0 is then fenced.
    offsets(&produce(&cluster, &http, b, 0, 0, 1)?)?;
    produce(&cluster, &http, b, 1, 4, 1)?.assert_error(409, 40908, "a new epoch starts at 0");
    let (b1, _) = offsets(&produce(&cluster, &http, b, 1, 0, 1)?)?;
    produce(&cluster, &http, b, 0, 1, 1)?.assert_error(409, 40909, "an older epoch");
    let stored = high_watermark(&cluster, &http, cluster.leader_of("idem", 0)?)?;
    assert_eq!(
        stored, 7,
        "3 + 2 records of a, 1 + 1 of b: nothing else stored"
    );

    // A fencing barrier (what a stream job's new runner sends): b at epoch 2. From then on
    // b's epoch 1 is refused, and so is a fence at an older epoch; the log is unchanged.
    let barrier = |body: Value| -> Result<Reply> {
        let leader = cluster.leader_of("idem", 0)?;
        http.post_json(
            &cluster
                .broker(leader)
                .url("/topics/idem/partitions/0/barrier"),
            &body,
        )
    };
    let fenced = barrier(json!({"producer_id": b, "producer_epoch": 2}))?;
    assert_eq!(fenced.status, 200, "{}", fenced.text);
    assert_eq!(fenced.body["log_end_offset"], 7);
    produce(&cluster, &http, b, 1, 1, 1)?.assert_error(409, 40909, "fenced by the barrier");
    barrier(json!({"producer_id": b, "producer_epoch": 1}))?.assert_error(
        409,
        40909,
        "a fence older than the producer's epoch",
    );
    barrier(json!({"producer_id": b}))?.assert_error(400, 40001, "half a fence");
    let (b2, _) = offsets(&produce(&cluster, &http, b, 2, 0, 1)?)?;
    assert_eq!(b2, vec![7]);
    assert_eq!(b1.len(), 1);

    // Bad requests are refused before anything is written.
    let leader = cluster.leader_of("idem", 0)?;
    let url = cluster.broker(leader).url("/topics/idem/partitions/0");
    let topic_url = cluster.broker(leader).url("/topics/idem");
    for (body, at, why) in [
        (
            json!({"records": [{"value": 1}], "producer_id": a}),
            &url,
            "only one field",
        ),
        (
            json!({"records": [{"value": 1}], "producer_id": a, "producer_epoch": 0, "sequence": 5}),
            &topic_url,
            "on the topic path",
        ),
        (
            json!({"records": [{"value": 1}], "producer_id": -3, "producer_epoch": 0, "sequence": 0}),
            &url,
            "a negative id",
        ),
        (
            json!({"records": [{"value": 1}, {"value": 2}], "producer_id": a, "producer_epoch": 0, "sequence": 2147483647}),
            &url,
            "sequences wrapping inside a request",
        ),
    ] {
        http.post_v2(at, &body)?.assert_error(422, 42201, why);
    }

    // Every broker killed -9 at once, before a flush of `records` holds the applies.
    for id in 1..=3 {
        cluster.broker_mut(id).kill9();
    }
    // Ready needs a quorum: start all, then wait for each.
    for id in 1..=3 {
        cluster.broker_mut(id).spawn()?;
    }
    for id in 1..=3 {
        cluster.broker_mut(id).wait_ready()?;
    }
    let retried = produce(&cluster, &http, a, 0, 3, 2)?;
    assert_eq!(offsets(&retried)?, (second, true), "{}", retried.text);
    let retried = produce(&cluster, &http, b, 2, 0, 1)?;
    assert_eq!(offsets(&retried)?, (b2, true), "{}", retried.text);
    produce(&cluster, &http, b, 1, 1, 1)?.assert_error(409, 40909, "still fenced");
    let (next, dup) = offsets(&produce(&cluster, &http, a, 0, 5, 1)?)?;
    assert_eq!(
        (next, dup),
        (vec![8], false),
        "the sequence goes on where it was"
    );
    let new = new_producer(&cluster, &http)?;
    assert!(
        new != a && new != b,
        "no id handed out twice across restarts"
    );
    Ok(())
}

/// A follower kept down while an idempotent producer writes past what the leader's Raft log
/// keeps comes back by snapshot; then it is made the leader (its peers killed in turn), and
/// retries of batches from before and after the snapshot point are recognised there.
#[test]
fn a_replica_restored_by_snapshot_knows_the_producers_when_it_leads() -> Result<()> {
    // A small kept Raft log makes the snapshot happen within seconds instead of minutes.
    let mut cluster =
        TestCluster::start_with_env(3, &[("PUBG1_RAFT_LOG_KEEP_ENTRIES_MAX", "200")])?;
    cluster.create_replicated("idem", 1)?;
    let http = Client::new();
    let producer = new_producer(&cluster, &http)?;
    let (early, _) = offsets(&produce(&cluster, &http, producer, 0, 0, 2)?)?;
    // More producers than a snapshot point carries on every write (64): the leader refreshes
    // its point at most every 250 ms then, and the install must still bring every one.
    let mut many = Vec::new();
    for _ in 0..70 {
        let id = new_producer(&cluster, &http)?;
        many.push((id, offsets(&produce(&cluster, &http, id, 0, 0, 1)?)?.0));
    }
    let leader = cluster.leader_of("idem", 0)?;
    let follower = (1..=3).find(|id| *id != leader).unwrap_or(1);
    let flushes = "pubg1_storage_flush_seconds_count";
    let flushed_before = metric(cluster.broker(leader), flushes)?;
    cluster.broker_mut(follower).kill9();
    // Writes go on until the leader has flushed twice (it compacts its Raft log only as far
    // as a flush holds) and written three times what it keeps for a dead follower.
    let (mut sequence, mut last) = (2, Vec::new());
    wait_until(
        Duration::from_secs(60),
        "600 batches and two flushes on the leader while the follower is down",
        || {
            last = offsets(&produce(&cluster, &http, producer, 0, sequence, 1).ok()?)
                .ok()?
                .0;
            sequence += 1;
            let flushed = metric(cluster.broker(leader), flushes).ok()?;
            (sequence > 600 && flushed >= flushed_before + 2.0).then_some(())
        },
    )?;
    cluster.broker_mut(follower).restart()?;
    let installed = r#"pubg1_raft_snapshots_installed_total{partition="0",topic="idem"}"#;
    wait_until(
        Duration::from_secs(30),
        "the follower to install a snapshot",
        || {
            metric(cluster.broker(follower), installed)
                .ok()
                .filter(|n| *n >= 1.0)
        },
    )?;
    // Make the restored follower the leader: kill whoever else leads, bring back the broker
    // killed before, until the follower wins an election.
    let mut down: Option<u64> = None;
    wait_until(
        Duration::from_secs(90),
        "the restored replica to lead",
        || {
            let now = cluster.leader_of("idem", 0).ok()?;
            if now == follower {
                return Some(());
            }
            cluster.broker_mut(now).kill9();
            if let Some(id) = down.replace(now) {
                cluster.broker_mut(id).restart().ok()?;
            }
            None
        },
    )?;
    if let Some(id) = down {
        cluster.broker_mut(id).restart()?;
    }
    // The last batch is retained (one of the last five); the early one fell out of the window
    // and is, as in Kafka, out of order.
    let retried = produce(&cluster, &http, producer, 0, sequence - 1, 1)?;
    assert_eq!(offsets(&retried)?, (last.clone(), true), "{}", retried.text);
    produce(&cluster, &http, producer, 0, 0, 2)?.assert_error(409, 40908, "long gone batch");
    for (id, original) in &many {
        let retried = produce(&cluster, &http, *id, 0, 0, 1)?;
        assert_eq!(
            offsets(&retried)?,
            (original.clone(), true),
            "producer {id}"
        );
    }
    assert!(early[0] < last[0]);
    let (next, dup) = offsets(&produce(&cluster, &http, producer, 0, sequence, 1)?)?;
    assert_eq!((next[0], dup), (last[0] + 1, false));
    Ok(())
}
