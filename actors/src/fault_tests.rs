//! In-process fault tests on a real RocksDB in a temp dir: an actor restarted inside one process,
//! a storage queue driven full. (Crashes of the whole process are tested with real processes
//! and kill -9 in `tests/`.)

use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::batch::NewRecord;
use crate::broker_supervisor::InjectPanicInto;
use crate::error::PartitionError;
use crate::log_reader::{fetch, FetchRequest};

fn settings(dir: &std::path::Path) -> BrokerSettings {
    BrokerSettings {
        data_dir: dir.to_path_buf(),
        retention_check_interval: Duration::from_secs(5),
        limits: CatalogLimits {
            topics_max: 10,
            partitions_per_topic_max: 16,
        },
        partition_threads: 2,
        broker_id: 1,
        raft_settings: crate::raft_group::RaftSettings::default(),
        storage_settings: crate::storage::StorageSettings {
            // No scheduled flush while a test runs: what is durable is what the test flushes.
            flush_interval: Duration::from_secs(3600),
            ..crate::storage::StorageSettings::default()
        },
        peer_listen: None,
        seeds: Vec::new(),
        http_advertised: "127.0.0.1:0".into(),
        kafka_advertised: None,
        offsets_partitions: 2,
        coordinator: crate::groups::coordinator::CoordinatorSettings {
            initial_rebalance_delay: Duration::ZERO,
            instance_idle_timeout: Duration::from_secs(60),
            instances_max: 100,
            checkpoint_interval: Duration::from_millis(200),
        },
    }
}

/// A topic of `partitions` with no configs (the component tests' helper).
async fn create(broker: &Broker, name: &str, partitions: u32) {
    crate::component_tests::create(broker, name, partitions, &[]).await;
}

async fn append(
    broker: &Broker,
    topic: &str,
    partition: u32,
    value: &str,
) -> Result<u64, PartitionError> {
    let Some(handle) = broker.registry.get(topic) else {
        return Err(PartitionError::Deleted {
            topic: topic.into(),
            partition,
        });
    };
    let record = NewRecord {
        key: None,
        value: Some(Bytes::from(value.to_owned())),
    };
    handle
        .partition(partition)
        .expect("partition")
        .append(vec![record])
        .await
        .map(|a| a.base_offset)
}

fn restarts(broker: &Broker, actor: &str) -> u64 {
    broker
        .metrics
        .actor_restarts_total
        .with_label_values(&[actor])
        .get()
}

/// Applies skip the WAL; after a restart inside one process the replica reads its state through
/// the memtable. If that raised the compaction cap, the Raft log could be compacted past what a
/// flush holds, and a kill -9 then leaves applied < first index - 1: raft-rs refuses to start
/// the group, on every start.
#[actix_rt::test]
async fn a_replica_restarted_in_process_claims_durable_only_what_a_flush_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(settings(dir.path())).await.expect("start");
    create(&broker, "memtable", 1).await;
    for n in 0..20 {
        append(&broker, "memtable", 0, &format!("r{n}"))
            .await
            .expect("append");
    }
    let partition = broker.registry.get("memtable").expect("topic").partitions[0].clone();
    let log = partition.log;
    assert_eq!(
        broker.storage.durable_applied(log),
        0,
        "nothing flushed yet"
    );
    assert!(broker
        .supervisor
        .send(InjectPanicInto {
            topic: "memtable".into(),
            partition: 0
        })
        .await
        .expect("mailbox"));
    let mut offset = None;
    for _ in 0..2_000 {
        if let Ok(o) = append(&broker, "memtable", 0, "after").await {
            offset = Some(o);
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(offset, Some(20), "the replica came back and continued");
    assert_eq!(restarts(&broker, "partition_replica"), 1);
    assert_eq!(
        broker.storage.durable_applied(log),
        0,
        "a restart in process must not count memtable applies as durable"
    );
    broker.storage.flush_records().await.expect("flush");
    let state = broker.storage.read_log_state(log).expect("state");
    assert_eq!(state.next_offset, 21);
    assert_eq!(broker.storage.durable_applied(log), state.applied_index);
    broker.shutdown().await;
}

/// A storage queue driven full is back-pressure: producers are refused with a retriable
/// "overloaded" (HTTP 429), Readies wait for room, and no partition or the metadata group
/// fails. Everything acknowledged is readable at its offset.
#[actix_rt::test]
async fn a_full_storage_queue_slows_producers_down_and_stops_no_partition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = settings(dir.path());
    // A queue of 8 writes: 8 partitions and 64 producers keep it full.
    settings.storage_settings.write_queue_capacity = 8;
    let broker = Broker::start(settings).await.expect("start");
    create(&broker, "busy", 8).await;
    let mut producers = Vec::new();
    for producer in 0..64u32 {
        let broker = broker.clone();
        producers.push(actix_rt::spawn(async move {
            let mut outcomes = Vec::new();
            for n in 0..30 {
                let value = format!("p{producer}:{n}");
                let partition = producer % 8;
                outcomes.push((
                    partition,
                    value.clone(),
                    append(&broker, "busy", partition, &value).await,
                ));
            }
            outcomes
        }));
    }
    let mut acked: Vec<Vec<(u64, String)>> = vec![Vec::new(); 8];
    let mut overloaded = 0;
    for producer in producers {
        for (partition, value, outcome) in producer.await.expect("producer") {
            match outcome {
                Ok(offset) => acked[partition as usize].push((offset, value)),
                Err(PartitionError::Overloaded { .. }) => overloaded += 1,
                Err(e) => panic!("only back-pressure may refuse an append, got: {e}"),
            }
        }
    }
    assert!(
        overloaded > 0,
        "the queue never filled: the test proves nothing"
    );
    assert_eq!(
        restarts(&broker, "partition_replica"),
        0,
        "no partition failed"
    );
    let handle = broker.registry.get("busy").expect("topic");
    for (p, acked) in acked.iter_mut().enumerate() {
        acked.sort();
        let request = FetchRequest {
            offset: 0,
            records_max: 10_000,
            bytes_max: 1 << 20,
            wait: Duration::ZERO,
        };
        let fetched = fetch(
            &broker.storage,
            &handle.partitions[p],
            &broker.metrics,
            request,
        )
        .await
        .expect("fetch");
        let stored: Vec<(u64, String)> = fetched
            .records
            .iter()
            .map(|r| {
                let value = r.value.as_deref().unwrap_or_default();
                (r.offset, String::from_utf8_lossy(value).into_owned())
            })
            .collect();
        assert_eq!(
            &stored, acked,
            "partition {p}: stored is exactly what was acknowledged"
        );
    }
    // The metadata group is not stuck either.
    create(&broker, "after", 1).await;
    assert_eq!(append(&broker, "after", 0, "x").await.expect("append"), 0);
    broker.shutdown().await;
}

/// Deleting a topic while its partitions are busy leaves none of its keys behind: the
/// replicas' last writes (Readies in flight when the delete applied) are cleaned up too.
#[actix_rt::test]
async fn a_topic_deleted_under_load_leaves_no_key_behind() {
    use crate::metadata::DeleteTopic;
    use crate::storage::{count_keys, topic_key_range, Cf};
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(settings(dir.path())).await.expect("start");
    create(&broker, "gone", 4).await;
    let topic_id = broker.registry.get("gone").expect("topic").meta.topic_id;
    let mut producers = Vec::new();
    for producer in 0..8u32 {
        let broker = broker.clone();
        producers.push(actix_rt::spawn(async move {
            for n in 0..200 {
                if append(&broker, "gone", producer % 4, &format!("{producer}:{n}"))
                    .await
                    .is_err()
                {
                    break; // deleted under it
                }
            }
        }));
    }
    // Delete while the load runs: once every partition has taken some appends.
    let handle = broker.registry.get("gone").expect("topic");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while handle.partitions.iter().any(|p| p.high_watermark() < 20) {
        assert!(
            std::time::Instant::now() < deadline,
            "the load never started"
        );
        actix_rt::time::sleep(Duration::from_millis(2)).await;
    }
    broker
        .metadata
        .send(DeleteTopic {
            name: "gone".into(),
        })
        .await
        .expect("mailbox")
        .expect("delete");
    for producer in producers {
        producer.await.expect("producer");
    }
    let (from, to) = topic_key_range(topic_id);
    for cf in [Cf::Records, Cf::RaftLog, Cf::RaftState] {
        let left = count_keys(&broker.storage, cf, &from, &to).expect("count");
        assert_eq!(
            left,
            0,
            "{} keeps {left} keys of the deleted topic",
            cf.name()
        );
    }
    broker.shutdown().await;
}
