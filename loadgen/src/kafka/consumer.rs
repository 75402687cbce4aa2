//! A tailing consumer over the Kafka protocol: a Fetch (long poll) to each leader for the
//! partitions it leads, whole stored batches decoded, each record timed from the send time in
//! its value.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use bytes::{Buf, Bytes};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse,
};
use kafka_protocol::records::RecordBatchDecoder;

use super::{topic_name, Client};
use crate::clients::{unix_micros, ConsumerReport, Live, FAILURE_BACKOFF};

/// How long a fetch waits for records at the broker.
const FETCH_WAIT_MS: i32 = 100;
const PARTITION_BYTES_MAX: i32 = 1024 * 1024;
const FETCH_BYTES_MAX: i32 = 16 * 1024 * 1024;
const OFFSET_OUT_OF_RANGE: i16 = 1;
/// ListOffsets' timestamp for "the log start".
const EARLIEST: i64 = -2;

pub(crate) fn consume(
    mine: &[u32],
    bootstrap: &[String],
    topic: &str,
    live: &Live,
    start: Instant,
) -> ConsumerReport {
    let partitions = mine.iter().max().map_or(0, |p| p + 1);
    let mut client = Client::new(bootstrap, topic, partitions);
    let mut report = ConsumerReport::new();
    // Next offset per partition; from 0, moved to the log start if 0 is outside the log.
    let mut offsets: BTreeMap<u32, i64> = mine.iter().map(|&p| (p, 0)).collect();
    while !live.stop.load(Ordering::Acquire) {
        let mut by_leader: BTreeMap<i32, Vec<u32>> = BTreeMap::new();
        let mut unled = false;
        for &partition in mine {
            match client.leader(partition) {
                Some(node) => by_leader.entry(node).or_default().push(partition),
                None => unled = true,
            }
        }
        if unled && client.refresh().is_err() {
            std::thread::sleep(FAILURE_BACKOFF);
        }
        for (node, partitions) in by_leader {
            if let Err(_e) = fetch(
                &mut client,
                node,
                &partitions,
                &mut offsets,
                &mut report,
                live,
                start,
            ) {
                client.drop_conn(node);
                partitions.iter().for_each(|&p| client.forget(p));
                std::thread::sleep(FAILURE_BACKOFF);
            }
        }
    }
    report
}

fn fetch(
    client: &mut Client,
    node: i32,
    partitions: &[u32],
    offsets: &mut BTreeMap<u32, i64>,
    report: &mut ConsumerReport,
    live: &Live,
    start: Instant,
) -> Result<()> {
    let topic = client.topic().to_owned();
    let from: Vec<(u32, i64)> = partitions.iter().map(|&p| (p, offsets[&p])).collect();
    let request = fetch_request(&topic, &from, FETCH_WAIT_MS, PARTITION_BYTES_MAX);
    let answer: FetchResponse = client.conn(node)?.call(ApiKey::Fetch, &request)?;
    let now = unix_micros();
    let second = start.elapsed().as_secs() as usize;
    for data in answer.responses.iter().flat_map(|t| &t.partitions) {
        let Ok(partition) = u32::try_from(data.partition_index) else {
            continue;
        };
        let Some(offset) = offsets.get_mut(&partition) else {
            continue;
        };
        match data.error_code {
            0 => {
                let Some(records) = &data.records else {
                    continue;
                };
                let (read, next) = read_batches(records, *offset, |_, value| {
                    report.record(value, now, second)
                });
                live.consumed.fetch_add(read, Ordering::Relaxed);
                *offset = next.max(*offset);
            }
            OFFSET_OUT_OF_RANGE => *offset = earliest(client, node, &topic, partition)?,
            _ => client.forget(partition),
        }
    }
    Ok(())
}

/// A sessionless Fetch of `topic`'s partitions from the given offsets, waiting up to `wait_ms`
/// for a first byte.
fn fetch_request(
    topic: &str,
    from: &[(u32, i64)],
    wait_ms: i32,
    partition_bytes: i32,
) -> FetchRequest {
    FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(wait_ms)
        .with_min_bytes(i32::from(wait_ms > 0))
        .with_max_bytes(FETCH_BYTES_MAX)
        .with_session_id(0)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(topic_name(topic))
            .with_partitions(
                from.iter()
                    .map(|&(partition, offset)| {
                        FetchPartition::default()
                            .with_partition(partition as i32)
                            .with_current_leader_epoch(-1)
                            .with_fetch_offset(offset)
                            .with_last_fetched_epoch(-1)
                            .with_log_start_offset(-1)
                            .with_partition_max_bytes(partition_bytes)
                    })
                    .collect(),
            )])
}

/// Hand each record at `from` and after in `records` to `each` (its offset and value): whole
/// batches; a trailing partial one, as Kafka may send, is left for the next fetch. Returns
/// (records read, next offset).
fn read_batches(records: &Bytes, from: i64, mut each: impl FnMut(i64, &[u8])) -> (u64, i64) {
    let mut rest = records.clone();
    let (mut read, mut next) = (0, from);
    while rest.len() >= 27 {
        let base = (&rest[0..8]).get_i64();
        let length = (&rest[8..12]).get_i32();
        let Some(whole) = usize::try_from(length).ok().map(|l| l + 12) else {
            break;
        };
        if whole < 27 || rest.len() < whole {
            break;
        }
        let last_delta = (&rest[23..27]).get_i32();
        let mut batch = rest.split_to(whole);
        // Control batches (transaction markers) hold no records of the load.
        let control = (&batch[21..23]).get_i16() & 0x20 != 0;
        if !control {
            let Ok(set) = RecordBatchDecoder::decode(&mut batch) else {
                break;
            };
            for record in set.records.iter().filter(|r| r.offset >= from) {
                read += 1;
                each(record.offset, record.value.as_deref().unwrap_or_default());
            }
        }
        next = next.max(base + i64::from(last_delta) + 1);
    }
    (read, next)
}

/// One fetch of `partition` from `from` at its leader `node`: each record to `each`; returns
/// (next offset, high watermark).
pub(super) fn fetch_once(
    client: &mut Client,
    node: i32,
    topic: &str,
    partition: u32,
    from: i64,
    each: impl FnMut(i64, &[u8]),
) -> Result<(i64, i64)> {
    // No wait: the read-back wants what is there, and stops at the high watermark.
    let request = fetch_request(topic, &[(partition, from)], 0, FETCH_BYTES_MAX);
    let answer: FetchResponse = client.conn(node)?.call(ApiKey::Fetch, &request)?;
    let data = answer
        .responses
        .iter()
        .flat_map(|t| &t.partitions)
        .find(|p| p.partition_index == partition as i32)
        .ok_or_else(|| anyhow!("a fetch answer without partition {partition}"))?;
    if data.error_code != 0 {
        bail!("fetching {topic}/{partition}: error {}", data.error_code);
    }
    let (_, next) = match &data.records {
        Some(records) => read_batches(records, from, each),
        None => (0, from),
    };
    Ok((next, data.high_watermark))
}

/// The log start of `partition`, asked of its leader.
pub(super) fn earliest(client: &mut Client, node: i32, topic: &str, partition: u32) -> Result<i64> {
    let request = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![ListOffsetsTopic::default()
            .with_name(topic_name(topic))
            .with_partitions(vec![ListOffsetsPartition::default()
                .with_partition_index(partition as i32)
                .with_current_leader_epoch(-1)
                .with_timestamp(EARLIEST)])]);
    let answer: ListOffsetsResponse = client.conn(node)?.call(ApiKey::ListOffsets, &request)?;
    answer
        .topics
        .iter()
        .flat_map(|t| &t.partitions)
        .find(|p| p.partition_index == partition as i32 && p.error_code == 0)
        .map(|p| p.offset)
        .ok_or_else(|| anyhow!("no log start for partition {partition}"))
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };

    use super::*;
    use crate::clients::write_value;

    fn batch(offsets: std::ops::Range<i64>, out: &mut BytesMut) {
        let records: Vec<Record> = offsets
            .map(|offset| {
                let mut value = Vec::new();
                write_value(&mut value, 1, offset as u64, unix_micros(), 60);
                Record {
                    transactional: false,
                    control: false,
                    delete_horizon: false,
                    partition_leader_epoch: 0,
                    producer_id: -1,
                    producer_epoch: -1,
                    timestamp_type: TimestampType::Creation,
                    offset,
                    sequence: offset as i32 - 1,
                    timestamp: 0,
                    key: None,
                    value: Some(Bytes::from(value)),
                    headers: Default::default(),
                }
            })
            .collect();
        let options = RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        };
        RecordBatchEncoder::encode(out, records.iter(), &options).expect("encodes");
    }

    #[test]
    fn a_fetch_inside_a_batch_skips_its_earlier_records_and_leaves_a_partial_batch() {
        let mut out = BytesMut::new();
        batch(0..3, &mut out);
        batch(3..5, &mut out);
        let whole = out.len();
        batch(5..8, &mut out);
        // Kafka may cut the last batch short at the fetch's byte limit.
        let records = out.freeze().slice(..whole + 30);
        let mut seen = Vec::new();
        let (read, next) = read_batches(&records, 1, |offset, value| {
            seen.push((offset, crate::clients::parse_value(value)));
        });
        assert_eq!((read, next), (4, 5));
        let expected: Vec<_> = (1..5).map(|o| (o, Some((1, o as u64)))).collect();
        assert_eq!(seen, expected, "each record from offset 1, with its value");
        // Nothing whole: nothing read, the offset stays.
        assert_eq!(read_batches(&records.slice(..20), 7, |_, _| {}), (0, 7));
    }
}
