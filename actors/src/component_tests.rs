//! Component tests: a whole broker's actors in-process on a real RocksDB in a temp dir.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::batch::NewRecord;
use crate::broker_supervisor::InjectPanicInto;
use crate::error::PartitionError;
use crate::log_reader::{fetch, FetchRequest};
use crate::metadata::{CreateTopic, DeleteTopic};

pub(crate) fn settings(dir: &std::path::Path) -> BrokerSettings {
    BrokerSettings {
        data_dir: dir.to_path_buf(),
        retention_check_interval: Duration::from_millis(20),
        limits: CatalogLimits {
            topics_max: 10,
            partitions_per_topic_max: 8,
        },
        partition_threads: 2,
        broker_id: 1,
        raft_settings: crate::raft_group::RaftSettings::default(),
        storage_settings: crate::storage::StorageSettings::default(),
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

pub(crate) async fn create(broker: &Broker, name: &str, partitions: u32, configs: &[(&str, &str)]) {
    let configs: BTreeMap<String, String> = configs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    broker
        .metadata
        .send(CreateTopic {
            name: name.into(),
            partitions,
            replication_factor: 1,
            configs,
        })
        .await
        .expect("mailbox")
        .expect("create");
}

async fn append(
    broker: &Broker,
    topic: &str,
    partition: u32,
    values: &[&str],
) -> Result<u64, PartitionError> {
    let handle = broker.registry.get(topic).expect("topic");
    let records = values
        .iter()
        .map(|v| NewRecord {
            key: None,
            value: Some(Bytes::from(v.to_string())),
        })
        .collect();
    handle
        .partition(partition)
        .expect("partition")
        .append(records)
        .await
        .map(|a| a.base_offset)
}

/// Poll `check` until it holds or the deadline passes; returns whether it held.
pub(crate) async fn eventually<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        if check().await {
            return true;
        }
        tokio::task::yield_now().await;
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

#[actix_rt::test]
async fn a_crashed_partition_restarts_from_storage_while_the_others_keep_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(settings(dir.path())).await.expect("start");
    create(&broker, "crashy", 3, &[]).await;
    for p in 0..3 {
        assert_eq!(
            append(&broker, "crashy", p, &["a", "b"])
                .await
                .expect("append"),
            0
        );
    }
    assert!(broker
        .supervisor
        .send(InjectPanicInto {
            topic: "crashy".into(),
            partition: 1
        })
        .await
        .expect("mailbox"));

    // The other partitions serve throughout.
    for p in [0, 2] {
        assert_eq!(
            append(&broker, "crashy", p, &["c"]).await.expect("append"),
            2
        );
    }
    // Partition 1 comes back and continues its offsets: no gap, no reuse.
    let recovered = eventually(Duration::from_secs(10), || async {
        matches!(append(&broker, "crashy", 1, &["c"]).await, Ok(2))
    })
    .await;
    assert!(recovered, "partition 1 did not come back with offset 2");
    assert_eq!(
        broker
            .metrics
            .actor_restarts_total
            .with_label_values(&["partition_replica"])
            .get(),
        1
    );
    let partition = broker.registry.get("crashy").expect("topic").partitions[1].clone();
    let fetched = fetch(&broker.storage, &partition, &broker.metrics, request(0))
        .await
        .expect("fetch");
    let values: Vec<&[u8]> = fetched
        .records
        .iter()
        .filter_map(|r| r.value.as_deref())
        .collect();
    assert_eq!(values, vec![&b"a"[..], b"b", b"c"]);
    broker.shutdown().await;
}

fn request(offset: u64) -> FetchRequest {
    FetchRequest {
        offset,
        records_max: 1000,
        bytes_max: 1 << 20,
        wait: Duration::ZERO,
    }
}

#[actix_rt::test]
async fn size_retention_deletes_old_batches_for_real() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(settings(dir.path())).await.expect("start");
    // One batch of one 1 KiB value is ~1.1 KiB; keep at least 3 KiB.
    create(
        &broker,
        "short",
        1,
        &[("retention.bytes", "3000"), ("retention.ms", "-1")],
    )
    .await;
    let value = "x".repeat(1024);
    for i in 0..10u64 {
        assert_eq!(
            append(&broker, "short", 0, &[&value])
                .await
                .expect("append"),
            i
        );
    }
    let partition = broker.registry.get("short").expect("topic").partitions[0].clone();
    assert!(
        eventually(Duration::from_secs(10), || async {
            partition.log_start_offset() >= 7
        })
        .await,
        "retention did not advance the log start (at {})",
        partition.log_start_offset()
    );
    assert!(
        partition.log_size_bytes() >= 3000 && partition.log_size_bytes() < 4500,
        "size {}",
        partition.log_size_bytes()
    );
    let err = fetch(&broker.storage, &partition, &broker.metrics, request(0))
        .await
        .expect_err("deleted");
    assert!(
        matches!(
            err,
            PartitionError::OffsetOutOfRange {
                log_start_offset: 7,
                ..
            }
        ),
        "{err}"
    );
    // Gone from RocksDB too, not just hidden. Readers stop at the new log start before the delete
    // is durable, so wait for the queued delete first.
    broker.storage.barrier().await.expect("barrier");
    let start = partition.log_start_offset();
    let stored = broker
        .storage
        .read_batches(partition.log, 0, start, usize::MAX)
        .expect("read");
    assert!(
        stored.is_empty(),
        "{} deleted batches still stored",
        stored.len()
    );
    let kept = fetch(&broker.storage, &partition, &broker.metrics, request(start))
        .await
        .expect("fetch");
    assert_eq!(kept.records.first().map(|r| r.offset), Some(start));
    assert_eq!(kept.high_watermark, 10);
    broker.shutdown().await;
}

#[actix_rt::test]
async fn time_retention_can_empty_a_log_and_offsets_still_continue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(settings(dir.path())).await.expect("start");
    create(&broker, "fleeting", 1, &[("retention.ms", "1")]).await;
    for i in 0..3u64 {
        assert_eq!(
            append(&broker, "fleeting", 0, &["v"])
                .await
                .expect("append"),
            i
        );
    }
    let partition = broker.registry.get("fleeting").expect("topic").partitions[0].clone();
    assert!(
        eventually(Duration::from_secs(10), || async {
            partition.log_start_offset() == 3
        })
        .await
    );
    assert_eq!(partition.log_size_bytes(), 0);
    assert_eq!(
        append(&broker, "fleeting", 0, &["w"])
            .await
            .expect("append"),
        3
    );
    broker.shutdown().await;
}

#[actix_rt::test]
async fn a_deleted_topic_created_again_starts_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(settings(dir.path())).await.expect("start");
    create(&broker, "again", 2, &[]).await;
    append(&broker, "again", 1, &["old", "old"])
        .await
        .expect("append");
    let old = broker.registry.get("again").expect("topic").partitions[1].clone();
    broker
        .metadata
        .send(DeleteTopic {
            name: "again".into(),
        })
        .await
        .expect("mailbox")
        .expect("delete");
    assert!(broker.registry.get("again").is_none());
    assert!(matches!(
        old.append(vec![]).await,
        Err(PartitionError::Deleted { .. })
    ));
    create(&broker, "again", 2, &[]).await;
    assert_eq!(
        append(&broker, "again", 1, &["new"]).await.expect("append"),
        0
    );
    assert!(broker
        .storage
        .read_batches(old.log, 0, u64::MAX, usize::MAX)
        .expect("read")
        .is_empty());
    broker.shutdown().await;
}
