//! Keys land where Kafka's default partitioner puts them; keyless records spread.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use pubg1_tests::workload::BINARY;
use pubg1_tests::{create_topic, BrokerProcess, Client};
use serde_json::json;

/// murmur2 of the key bytes as Kafka computes it (`Utils.murmur2`), from Kafka's own UtilsTest.
const KAFKA_VECTORS: [(&str, i32); 6] = [
    ("21", -973_932_308),
    ("foobar", -790_332_482),
    ("a-little-bit-long-string", -985_981_536),
    ("a-little-bit-longer-string", -1_486_304_829),
    (
        "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
        -58_897_971,
    ),
    ("abc", 479_470_107),
];

/// Kafka's `Utils.toPositive(murmur2(key)) % numPartitions`.
fn kafka_partition(hash: i32, partitions: u32) -> u64 {
    u64::from((hash as u32) & 0x7fff_ffff) % u64::from(partitions)
}

#[test]
fn keyed_records_land_on_kafkas_murmur2_partition() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = BrokerProcess::start(&dir.path().join("broker"), &[])?;
    let http = Client::new();
    for partitions in [7u32, 12, 100] {
        let topic = format!("keys-{partitions}");
        create_topic(&http, &broker, &topic, partitions)?;
        let records: Vec<_> = KAFKA_VECTORS
            .iter()
            .map(|(key, _)| json!({"key": BASE64.encode(key), "value": BASE64.encode("v")}))
            .collect();
        let reply = http.post(
            &broker.url(&format!("/topics/{topic}")),
            Some(BINARY),
            json!({"records": records}).to_string().as_bytes(),
        )?;
        assert_eq!(reply.status, 200, "{}", reply.text);
        for ((key, hash), at) in KAFKA_VECTORS
            .iter()
            .zip(reply.body["offsets"].as_array().expect("offsets"))
        {
            assert_eq!(
                at["partition"].as_u64(),
                Some(kafka_partition(*hash, partitions)),
                "key {key:?} with {partitions} partitions"
            );
            // And it is really stored there.
            let url = broker.url(&format!(
                "/topics/{topic}/partitions/{}/records?format=binary&offset={}",
                at["partition"], at["offset"]
            ));
            let fetched = http.get(&url)?;
            assert_eq!(
                fetched.body["records"][0]["key"],
                BASE64.encode(key),
                "{}",
                fetched.text
            );
        }
    }
    Ok(())
}

#[test]
fn same_key_same_partition_and_keyless_requests_spread() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = BrokerProcess::start(&dir.path().join("broker"), &[])?;
    let http = Client::new();
    create_topic(&http, &broker, "spread", 4)?;
    let url = broker.url("/topics/spread");
    let mut keyed = std::collections::BTreeSet::new();
    let mut keyless = std::collections::BTreeSet::new();
    for n in 0..12 {
        let reply = http.post_json(
            &url,
            &json!({"records":[{"key":"customer-42","value":{"n":n}},{"value":{"n":n}}]}),
        )?;
        assert_eq!(reply.status, 200, "{}", reply.text);
        keyed.insert(
            reply.body["offsets"][0]["partition"]
                .as_u64()
                .expect("partition"),
        );
        keyless.insert(
            reply.body["offsets"][1]["partition"]
                .as_u64()
                .expect("partition"),
        );
    }
    assert_eq!(keyed.len(), 1, "one key, one partition: {keyed:?}");
    assert_eq!(
        keyless.len(),
        4,
        "keyless requests rotate over all partitions: {keyless:?}"
    );
    Ok(())
}

/// loadgen names the partition of each keyed request itself (idempotent producers write to one
/// partition per request); the keys it picks for a partition are ones the broker would send
/// there too, in the JSON format it uses.
#[test]
fn loadgen_s_keys_go_where_the_broker_sends_them() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = BrokerProcess::start(&dir.path().join("broker"), &[])?;
    let http = Client::new();
    create_topic(&http, &broker, "keyed", 6)?;
    let by_partition = loadgen::keys_by_partition(60, 6);
    for (partition, keys) in by_partition.iter().enumerate() {
        for key in keys {
            let reply = http.post(
                &broker.url("/topics/keyed"),
                Some("application/vnd.kafka.json.v2+json"),
                json!({"records": [{"key": format!("k{key}"), "value": 1}]})
                    .to_string()
                    .as_bytes(),
            )?;
            assert_eq!(reply.status, 200, "{}", reply.text);
            assert_eq!(
                reply.body["offsets"][0]["partition"].as_u64(),
                Some(partition as u64),
                "key k{key}"
            );
        }
    }
    Ok(())
}
