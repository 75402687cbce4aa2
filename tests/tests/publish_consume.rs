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

/// A log stores what the producer sent: JSON keys and values come back as the exact text, not
/// re-serialized (which rounded numbers through f64, sorted object keys and refused 1e400).
#[test]
fn json_keys_and_values_come_back_as_the_exact_text_sent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = BrokerProcess::start(&dir.path().join("broker"), &[])?;
    let http = Client::new();
    create_topic(&http, &broker, "exact", 1)?;
    let values = [
        "1796147614.4431705",
        "12345678901234567890123",
        "2.50",
        "1e400",
        "-0.0",
        r#"{"zebra":1,"apple":{"nested":[1,2.0,{"deep":null}]},"mango":true}"#,
        r#""\u00e9t\u00e9 \ud83d\ude00 \"quoted\" \\ back""#,
        r#"[[],{},"",0]"#,
    ];
    let records: Vec<String> = values
        .iter()
        .map(|v| format!(r#"{{"key":{{"id":7.10,"b":1,"a":2}},"value":{v}}}"#))
        .collect();
    let body = format!(r#"{{"records":[{}]}}"#, records.join(","));
    let reply = http.post(
        &broker.url("/topics/exact/partitions/0"),
        Some("application/vnd.kafka.json.v2+json"),
        body.as_bytes(),
    )?;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let fetched = http.get(&broker.url(&format!(
        "/topics/exact/partitions/0/records?offset=0&max_records={}",
        values.len()
    )))?;
    assert_eq!(fetched.status, 200, "{}", fetched.text);
    for value in values {
        let expected = format!(r#""key":{{"id":7.10,"b":1,"a":2}},"value":{value}}}"#);
        assert!(
            fetched.text.contains(&expected),
            "{value} did not come back as sent: {}",
            fetched.text
        );
    }
    Ok(())
}
