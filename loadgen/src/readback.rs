//! Reading a topic back at the end of a run, from every broker, and checking each copy.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::clients::parse_value;
use crate::http::{describe, Http, SETTLE_DEADLINE};
use crate::scenario::TopicSpec;
use crate::verify::{self, Ack, Stored, Verdict};

/// One broker's copy of the topic at the end of the run.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ReplicaCheck {
    pub broker: String,
    pub stored: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub moved: u64,
    /// Every partition holds the same records at the same offsets, byte for byte, as the first
    /// broker's copy.
    pub identical_to_first: bool,
}

impl ReplicaCheck {
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.moved == 0 && self.identical_to_first
    }
}

pub fn read_topic(
    http: &Http,
    urls: &[String],
    topic: &str,
    topics: &[TopicSpec],
) -> Result<Vec<Stored>> {
    let partitions = partitions_of(topic, topics)?;
    let source = wait_converged(http, urls, topic, partitions)?;
    Ok(read_replica(http, &source, topic, partitions)?.records)
}

fn partitions_of(topic: &str, topics: &[TopicSpec]) -> Result<u32> {
    topics
        .iter()
        .find(|t| t.name == topic)
        .map(|t| t.partitions)
        .ok_or_else(|| anyhow!("unknown topic {topic}"))
}

/// Wait until every broker that answers reports the same high watermarks for every partition
/// of `topic`; returns one of them.
pub(crate) fn wait_converged(
    http: &Http,
    urls: &[String],
    topic: &str,
    partitions: u32,
) -> Result<String> {
    let deadline = Instant::now() + SETTLE_DEADLINE;
    loop {
        let views: Vec<(String, Vec<u64>)> = urls
            .iter()
            .filter_map(|url| {
                let hws: Option<Vec<u64>> = (0..partitions)
                    .map(|p| {
                        describe(http, url, topic, p).and_then(|d| d["high_watermark"].as_u64())
                    })
                    .collect();
                hws.map(|h| (url.clone(), h))
            })
            .collect();
        if !views.is_empty() && views.iter().all(|(_, h)| *h == views[0].1) {
            return Ok(views[0].0.clone());
        }
        if Instant::now() > deadline {
            bail!("replicas of {topic} did not converge: {views:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn json_text(value: Option<&RawValue>) -> &str {
    value.map_or("null", RawValue::get)
}

/// A page of records as the HTTP API returns it, keys and values left as JSON text.
#[derive(serde::Deserialize)]
struct Page<'a> {
    #[serde(borrow)]
    records: Vec<PageRecord<'a>>,
    next_offset: Option<u64>,
    high_watermark: Option<u64>,
}

#[derive(serde::Deserialize)]
struct PageRecord<'a> {
    offset: u64,
    #[serde(borrow, default)]
    key: Option<&'a RawValue>,
    #[serde(borrow, default)]
    value: Option<&'a RawValue>,
}

/// One broker's copy of a topic: its records, and per partition a digest of every record's
/// offset, key and value, so copies can be compared byte for byte.
pub struct Replica {
    pub records: Vec<Stored>,
    pub digests: Vec<u64>,
}

/// Read every partition of `topic` from the broker at `source`, from each log start.
pub fn read_replica(http: &Http, source: &str, topic: &str, partitions: u32) -> Result<Replica> {
    use std::hash::{Hash, Hasher};
    let mut log = Vec::new();
    let mut digests = Vec::new();
    for partition in 0..partitions {
        // One hasher per partition; SipHash with fixed keys, so equal copies give equal digests.
        #[allow(deprecated)]
        let mut digest = std::hash::SipHasher::new();
        // No offset: the broker starts at the log start.
        let mut offset: Option<u64> = None;
        loop {
            let from = offset.map(|o| format!("&offset={o}")).unwrap_or_default();
            let url = format!(
                "{source}/topics/{topic}/partitions/{partition}/records?max_records=10000{from}"
            );
            let (status, text) = http.get_raw(&url)?;
            if status != 200 {
                bail!("reading {topic}/{partition} from {source}: {status} {text}");
            }
            let page: Page = serde_json::from_str(&text)
                .map_err(|e| anyhow!("reading {topic}/{partition} from {source}: {e}"))?;
            for record in &page.records {
                // Keys and values hashed as the JSON text the broker wrote.
                (
                    record.offset,
                    json_text(record.key),
                    json_text(record.value),
                )
                    .hash(&mut digest);
                let value = record.value.map(RawValue::get).unwrap_or_default();
                if let Some((producer, sequence)) = parse_value(value.as_bytes()) {
                    log.push(Stored {
                        partition,
                        offset: record.offset,
                        producer,
                        sequence,
                    });
                }
            }
            let Some(next) = page.next_offset else {
                bail!("no next_offset reading {topic}/{partition}: {text}");
            };
            let end = page.high_watermark.unwrap_or(next);
            if next >= end || Some(next) == offset {
                break;
            }
            offset = Some(next);
        }
        digests.push(digest.finish());
    }
    Ok(Replica {
        records: log,
        digests,
    })
}

/// Verify every broker's copy of the topic against the acknowledgements, and that the copies
/// are identical. The verifier used to read one copy, where a hole on a follower went unseen
/// until that follower led.
pub fn verify_replicas(
    http: &Http,
    urls: &[String],
    topic: &str,
    topics: &[TopicSpec],
    acks: &[Ack],
) -> Result<(Verdict, Vec<ReplicaCheck>)> {
    let partitions = partitions_of(topic, topics)?;
    wait_converged(http, urls, topic, partitions)?;
    let mut first: Option<(Verdict, Vec<u64>)> = None;
    let mut checks = Vec::new();
    for url in urls {
        let replica = read_replica(http, url, topic, partitions)?;
        let verdict = verify::verify(acks, &replica.records);
        let identical = first.as_ref().is_none_or(|(_, d)| *d == replica.digests);
        checks.push(ReplicaCheck {
            broker: url.clone(),
            stored: verdict.stored,
            lost: verdict.lost,
            duplicated: verdict.duplicated,
            moved: verdict.moved,
            identical_to_first: identical,
        });
        if first.is_none() {
            first = Some((verdict, replica.digests));
        }
    }
    let verdict = first.map(|(v, _)| v).unwrap_or_default();
    Ok((verdict, checks))
}
