//! Publish from many concurrent clients, read everything back, and check every acknowledged record.
//!
//! Records use the binary embedded format with keys and values that are not valid UTF-8 or JSON,
//! so "byte-identical" is checked literally. Each record's bytes derive from (run tag, client,
//! sequence), so a record found in the log can be traced to exactly one publish.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::{json, Value};

use crate::{BrokerProcess, Client};

pub const BINARY: &str = "application/vnd.kafka.binary.v2+json";

/// A record the broker acknowledged, and where it said the record is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    pub partition: u32,
    pub offset: u64,
    /// Raft term of the leader that appended it, as the produce reply said.
    pub leader_epoch: u64,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// A record as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub offset: u64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// Key of record `sequence` from `client` in run `tag`: text, then a byte that is never UTF-8.
pub fn record_key(tag: &str, client: usize, sequence: usize) -> Vec<u8> {
    let mut key = format!("{tag}/{client}/{sequence}").into_bytes();
    key.push(0xff);
    key
}

/// Value of that record: 16–143 bytes of every byte value, derived from the key.
pub fn record_value(key: &[u8]) -> Vec<u8> {
    let mut state = key.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    let len = 16 + (state % 128) as usize;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// How a publishing run behaves.
#[derive(Debug, Clone)]
pub struct Publish {
    pub topic: String,
    /// Distinguishes this run's records from any other's in the same topic.
    pub tag: String,
    pub clients: usize,
    /// Records each client publishes.
    pub records_per_client: usize,
    pub batch: usize,
}

/// Publish `spec.records_per_client` from each of `spec.clients` threads; every request must succeed.
pub fn publish_all(broker: &BrokerProcess, spec: &Publish) -> Result<Vec<Acked>> {
    let url = broker.url(&format!("/topics/{}", spec.topic));
    let threads: Vec<_> = (0..spec.clients)
        .map(|client| {
            let (url, spec) = (url.clone(), spec.clone());
            std::thread::spawn(move || -> Result<Vec<Acked>> {
                let http = Client::new();
                let mut acked = Vec::with_capacity(spec.records_per_client);
                for start in (0..spec.records_per_client).step_by(spec.batch) {
                    let end = (start + spec.batch).min(spec.records_per_client);
                    acked.extend(publish_batch(&http, &url, &spec.tag, client, start..end)?);
                }
                Ok(acked)
            })
        })
        .collect();
    let mut all = Vec::new();
    for thread in threads {
        all.extend(
            thread
                .join()
                .map_err(|_| anyhow!("publisher thread panicked"))??,
        );
    }
    Ok(all)
}

/// Publish from `clients` threads until `stop` is set or a request fails (the broker died);
/// returns only what was acknowledged. `acked_count` lets the caller watch progress.
pub fn publish_until_failure(
    url: String,
    tag: String,
    clients: usize,
    batch: usize,
    stop: Arc<AtomicBool>,
    acked_count: Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<std::thread::JoinHandle<Vec<Acked>>> {
    (0..clients)
        .map(|client| {
            let (url, tag, stop, acked_count) =
                (url.clone(), tag.clone(), stop.clone(), acked_count.clone());
            std::thread::spawn(move || {
                let http = Client::new();
                let mut acked = Vec::new();
                let mut next = 0;
                while !stop.load(Ordering::Acquire) {
                    match publish_batch(&http, &url, &tag, client, next..next + batch) {
                        Ok(records) => {
                            acked_count.fetch_add(records.len(), Ordering::AcqRel);
                            acked.extend(records);
                        }
                        // The broker was killed: an unacknowledged batch may or may not be stored.
                        Err(_) => break,
                    }
                    next += batch;
                }
                acked
            })
        })
        .collect()
}

/// Background publishers that keep going through failures, for fault tests.
///
/// A failed request (broker down, election, timeout) is not retried with the same records: the
/// client moves to the next broker and goes on with new sequences, so every stored record is
/// unique and only acknowledged ones count.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<Vec<Acked>>>,
}

impl Load {
    /// Start `clients` publishers of `batch` records each request, rotating over `urls`.
    pub fn start(urls: crate::cluster::Urls, tag: &str, clients: usize, batch: usize) -> Self {
        let (stop, acked, failed) = (Arc::default(), Arc::default(), Arc::default());
        let threads = (0..clients)
            .map(|client| {
                let (urls, tag) = (urls.clone(), tag.to_owned());
                let (stop, acked_count, failed_count): (
                    Arc<AtomicBool>,
                    Arc<AtomicUsize>,
                    Arc<AtomicUsize>,
                ) = (Arc::clone(&stop), Arc::clone(&acked), Arc::clone(&failed));
                std::thread::spawn(move || {
                    let http = Client::new();
                    let mut acked = Vec::new();
                    let (mut next, mut broker) = (0, client);
                    while !stop.load(Ordering::Acquire) {
                        let Ok(url) = crate::cluster::pick(&urls, broker) else {
                            break;
                        };
                        match publish_batch(&http, &url, &tag, client, next..next + batch) {
                            Ok(records) => {
                                acked_count.fetch_add(records.len(), Ordering::AcqRel);
                                acked.extend(records);
                            }
                            Err(_) => {
                                failed_count.fetch_add(1, Ordering::AcqRel);
                                broker += 1;
                            }
                        }
                        next += batch;
                    }
                    acked
                })
            })
            .collect();
        Self {
            stop,
            acked,
            failed,
            threads,
        }
    }

    /// Records acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::Acquire)
    }

    /// Requests that failed so far.
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::Acquire)
    }

    /// Wait (with a deadline) until `more` records beyond now are acknowledged.
    pub fn wait_for_more(&self, more: usize, what: &str) -> Result<()> {
        let target = self.acked() + more;
        crate::wait_until(std::time::Duration::from_secs(30), what, || {
            (self.acked() >= target).then_some(())
        })
    }

    /// Stop the publishers and return everything they got acknowledged.
    pub fn finish(self) -> Result<Vec<Acked>> {
        self.stop.store(true, Ordering::Release);
        let mut all = Vec::new();
        for thread in self.threads {
            all.extend(
                thread
                    .join()
                    .map_err(|_| anyhow!("publisher thread panicked"))?,
            );
        }
        Ok(all)
    }
}

/// One produce request; Ok only for a 200 whose every record has an offset.
pub fn publish_batch(
    http: &Client,
    url: &str,
    tag: &str,
    client: usize,
    sequences: std::ops::Range<usize>,
) -> Result<Vec<Acked>> {
    let records: Vec<(Vec<u8>, Vec<u8>)> = sequences
        .map(|sequence| {
            let key = record_key(tag, client, sequence);
            let value = record_value(&key);
            (key, value)
        })
        .collect();
    let body = json!({
        "records": records.iter().map(|(k, v)| json!({"key": BASE64.encode(k), "value": BASE64.encode(v)})).collect::<Vec<_>>()
    });
    let reply = http.post(url, Some(BINARY), body.to_string().as_bytes())?;
    ensure!(
        reply.status == 200,
        "produce answered {}: {}",
        reply.status,
        reply.text
    );
    let offsets = reply.body["offsets"]
        .as_array()
        .ok_or_else(|| anyhow!("no offsets in {}", reply.text))?;
    ensure!(
        offsets.len() == records.len(),
        "{} offsets for {} records",
        offsets.len(),
        records.len()
    );
    records
        .into_iter()
        .zip(offsets)
        .map(|((key, value), at)| {
            let partition = at["partition"]
                .as_u64()
                .ok_or_else(|| anyhow!("no partition in {at}"))? as u32;
            let offset = at["offset"]
                .as_u64()
                .ok_or_else(|| anyhow!("record not written: {at}"))?;
            let leader_epoch = at["leader_epoch"]
                .as_u64()
                .ok_or_else(|| anyhow!("no leader_epoch in {at}"))?;
            Ok(Acked {
                partition,
                offset,
                leader_epoch,
                key,
                value,
            })
        })
        .collect()
}

/// Read a whole partition from its log start to its high watermark, in binary format.
pub fn fetch_partition(
    http: &Client,
    broker: &BrokerProcess,
    topic: &str,
    partition: u32,
) -> Result<Vec<Fetched>> {
    let mut records = Vec::new();
    let mut offset: Option<u64> = None;
    loop {
        let from = offset.map_or(String::new(), |o| format!("&offset={o}"));
        let url = broker.url(&format!(
            "/topics/{topic}/partitions/{partition}/records?format=binary&max_records=5000{from}"
        ));
        let reply = http.get(&url)?;
        ensure!(
            reply.status == 200,
            "fetch answered {}: {}",
            reply.status,
            reply.text
        );
        let high_watermark = reply.body["high_watermark"]
            .as_u64()
            .ok_or_else(|| anyhow!("no high_watermark"))?;
        let next = reply.body["next_offset"]
            .as_u64()
            .ok_or_else(|| anyhow!("no next_offset"))?;
        for record in reply.body["records"]
            .as_array()
            .ok_or_else(|| anyhow!("no records"))?
        {
            records.push(Fetched {
                offset: record["offset"]
                    .as_u64()
                    .ok_or_else(|| anyhow!("no offset in {record}"))?,
                key: decode(&record["key"])?,
                value: decode(&record["value"])?,
            });
        }
        if next >= high_watermark {
            return Ok(records);
        }
        offset = Some(next);
    }
}

fn decode(field: &Value) -> Result<Option<Vec<u8>>> {
    match field {
        Value::Null => Ok(None),
        Value::String(text) => Ok(Some(BASE64.decode(text)?)),
        other => bail!("binary field is not base64: {other}"),
    }
}

/// Read every partition of `topic`; the result maps partition → records in log order.
pub fn fetch_topic(
    http: &Client,
    broker: &BrokerProcess,
    topic: &str,
    partitions: u32,
) -> Result<BTreeMap<u32, Vec<Fetched>>> {
    (0..partitions)
        .map(|p| Ok((p, fetch_partition(http, broker, topic, p)?)))
        .collect()
}

/// Check the log against what was acknowledged:
/// - each partition's offsets are dense from its first offset (no gaps, no repeats);
/// - every acknowledged record is at its acknowledged partition/offset, byte-identical;
/// - no acknowledged record appears anywhere else (present exactly once).
pub fn verify(acked: &[Acked], log: &BTreeMap<u32, Vec<Fetched>>) -> Result<()> {
    let mut by_key: HashMap<&[u8], (u32, u64)> = HashMap::new();
    for (partition, records) in log {
        for pair in records.windows(2) {
            ensure!(
                pair[1].offset == pair[0].offset + 1,
                "partition {partition}: offset {} follows {}",
                pair[1].offset,
                pair[0].offset
            );
        }
        for record in records {
            if let Some(key) = &record.key {
                if let Some(previous) = by_key.insert(key.as_slice(), (*partition, record.offset)) {
                    bail!(
                        "key {:?} is stored twice: at {previous:?} and at {partition}/{}",
                        String::from_utf8_lossy(key),
                        record.offset
                    );
                }
            }
        }
    }
    let missing: Vec<(u32, u64)> = acked
        .iter()
        .filter(|a| {
            log.get(&a.partition).is_none_or(|records| {
                let first = records.first().map_or(u64::MAX, |r| r.offset);
                a.offset < first || a.offset - first >= records.len() as u64
            })
        })
        .map(|a| (a.partition, a.offset))
        .collect();
    if let Some(example) = missing.first() {
        let starts: Vec<(u32, Option<u64>)> = log
            .iter()
            .map(|(p, records)| (*p, records.first().map(|r| r.offset)))
            .collect();
        bail!(
            "{} of {} acknowledged records are missing (first: {}/{}); the log starts at {starts:?}",
            missing.len(),
            acked.len(),
            example.0,
            example.1
        );
    }
    let mut seen = std::collections::HashSet::new();
    for record in acked {
        ensure!(
            seen.insert((record.partition, record.offset)),
            "two acks for {}/{}",
            record.partition,
            record.offset
        );
        let stored = log
            .get(&record.partition)
            .and_then(|records| {
                let first = records.first()?.offset;
                records.get(usize::try_from(record.offset.checked_sub(first)?).ok()?)
            })
            .ok_or_else(|| {
                anyhow!(
                    "acknowledged record {}/{} is missing",
                    record.partition,
                    record.offset
                )
            })?;
        ensure!(
            stored.offset == record.offset,
            "offset {} stored as {}",
            record.offset,
            stored.offset
        );
        ensure!(
            stored.key.as_deref() == Some(record.key.as_slice()),
            "key at {}/{} differs",
            record.partition,
            record.offset
        );
        ensure!(
            stored.value.as_deref() == Some(record.value.as_slice()),
            "value at {}/{} differs",
            record.partition,
            record.offset
        );
    }
    Ok(())
}

/// Along each partition's log, acknowledged records' leader epochs never go down: no record a
/// deposed leader acknowledged sits after one a newer leader acknowledged.
pub fn assert_epochs_never_decrease(acked: &[Acked]) -> Result<()> {
    let mut by_partition: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
    for a in acked {
        by_partition
            .entry(a.partition)
            .or_default()
            .push((a.offset, a.leader_epoch));
    }
    for (partition, mut epochs) in by_partition {
        epochs.sort_unstable();
        for pair in epochs.windows(2) {
            ensure!(
                pair[0].1 <= pair[1].1,
                "partition {partition}: offset {} has epoch {} but offset {} has epoch {}",
                pair[0].0,
                pair[0].1,
                pair[1].0,
                pair[1].1
            );
        }
    }
    Ok(())
}
