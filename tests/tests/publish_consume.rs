//! The basic promise: many concurrent publishers, every acknowledged record readable exactly once
//! at the partition and offset it was acknowledged with.

use pubg1_tests::workload::{fetch_topic, publish_all, verify, Publish};
use pubg1_tests::{create_topic, high_watermarks, BrokerProcess, Client};

#[test]
fn ten_thousand_records_from_eight_clients_are_all_read_back_exactly_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = BrokerProcess::start(&dir.path().join("broker"), &[])?;
    let http = Client::new();
    create_topic(&http, &broker, "orders", 3)?;

    let spec = Publish {
        topic: "orders".into(),
        tag: "run1".into(),
        clients: 8,
        records_per_client: 1250,
        batch: 50,
    };
    let acked = publish_all(&broker, &spec)?;
    assert_eq!(acked.len(), 10_000);

    let log = fetch_topic(&http, &broker, "orders", 3)?;
    verify(&acked, &log)?;
    let stored: usize = log.values().map(Vec::len).sum();
    assert_eq!(
        stored, 10_000,
        "nothing but the acknowledged records is in the log"
    );
    let watermarks = high_watermarks(&http, &broker, "orders")?;
    assert_eq!(watermarks.iter().sum::<u64>(), 10_000);
    assert!(
        watermarks.iter().all(|hw| *hw > 0),
        "keys spread over all partitions: {watermarks:?}"
    );
    Ok(())
}
