//! The load's clients: producer threads that publish numbered records and keep every
//! acknowledgement, and consumer threads that tail the partitions and time each record end to
//! end. `run` starts them, applies the faults and judges what they saw.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::http::Http;
use crate::scenario::Scenario;
use crate::verify::{Ack, Outcome};

/// How long a produce request may take before the producer gives up on it and moves on.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after a failed request before the next (the producer also moves to another broker).
const FAILURE_BACKOFF: Duration = Duration::from_millis(20);
const JSON_V2: &str = "application/vnd.kafka.json.v2+json";

/// What each producer thread hands back.
pub(crate) struct ProducerReport {
    pub(crate) acks: Vec<Ack>,
    pub(crate) outcomes: Vec<Outcome>,
    /// (ms since start, latency µs) per successful request.
    pub(crate) latencies: Vec<(u64, u64)>,
    pub(crate) failed: u64,
}

/// Shared between the producers and the progress display.
#[derive(Default)]
pub(crate) struct Live {
    pub(crate) stop: AtomicBool,
    pub(crate) acked: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) consumed: AtomicU64,
}

/// What a consumer thread hands back: end-to-end latency (µs), overall and per second.
pub(crate) struct ConsumerReport {
    pub(crate) overall: Histogram<u64>,
    pub(crate) per_second: Vec<Histogram<u64>>,
}

/// Value of a produced record: producer, sequence and send time, padded to the record size.
pub(crate) fn record_value(
    producer: u32,
    sequence: u64,
    sent_unix_micros: u128,
    bytes: usize,
) -> String {
    let mut value = format!("p{producer}:s{sequence}:t{sent_unix_micros}:");
    // Stored as a JSON string: the quotes count towards the record's bytes.
    let target = bytes.saturating_sub(2);
    while value.len() < target {
        value.push('x');
    }
    value
}

/// Producer id and sequence from a stored value written by [`record_value`].
pub(crate) fn parse_value(value: &str) -> Option<(u32, u64)> {
    let mut parts = value.split(':');
    let producer = parts.next()?.strip_prefix('p')?.parse().ok()?;
    let sequence = parts.next()?.strip_prefix('s')?.parse().ok()?;
    Some((producer, sequence))
}

pub(crate) fn start_producers(
    scenario: &Scenario,
    urls: &[String],
    topic: &str,
    partitions: u32,
    live: &Arc<Live>,
    start: Instant,
) -> Result<Vec<std::thread::JoinHandle<ProducerReport>>> {
    let spec = scenario.producers.clone();
    scenario.key_space(0)?;
    let per_producer_rate = spec.rate as f64 / f64::from(spec.count);
    let interval =
        (spec.rate > 0).then(|| Duration::from_secs_f64(spec.batch as f64 / per_producer_rate));
    let mut threads = Vec::new();
    for producer in 0..spec.count {
        let keys = scenario
            .key_space(producer)?
            .map(|n| keys_by_partition(n, partitions));
        let bases = urls.to_vec();
        let urls: Vec<String> = urls.iter().map(|u| format!("{u}/topics/{topic}")).collect();
        let (live, spec) = (live.clone(), spec.clone());
        threads.push(std::thread::spawn(move || {
            let http = Http::new(REQUEST_TIMEOUT);
            let mut report = ProducerReport {
                acks: Vec::new(),
                outcomes: Vec::new(),
                latencies: Vec::new(),
                failed: 0,
            };
            // An idempotent producer resends a failed request, same records and sequence, until
            // it is answered: the broker stores it once whatever happened to the first try.
            let idempotent = spec
                .idempotent
                .then(|| producer_id(&http, &bases, &live))
                .flatten();
            if spec.idempotent && idempotent.is_none() && !live.stop.load(Ordering::Acquire) {
                eprintln!(
                    "loadgen: producer {producer} got no producer id (POST /producers); it publishes without idempotence"
                );
            }
            let mut sequences = vec![0i64; partitions as usize];
            let mut next_sequence = 0u64;
            let mut requests = 0u32;
            let mut target = producer as usize;
            let mut next_send = Instant::now();
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(producer) << 32;
            while !live.stop.load(Ordering::Acquire) {
                if let Some(interval) = interval {
                    let now = Instant::now();
                    if next_send > now {
                        std::thread::sleep(next_send - now);
                    }
                    next_send = next_send.max(now - interval) + interval;
                }
                let first = next_sequence;
                next_sequence += spec.batch as u64;
                let sent_unix = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_micros())
                    .unwrap_or_default();
                // Each request names one partition, in turn, so its outcome concerns one
                // partition and its sequence is that partition's; keyed records take keys
                // Kafka's partitioner sends there.
                let mut partition = (producer + requests) % partitions;
                requests = requests.wrapping_add(1);
                if let Some(keys) = &keys {
                    while keys[partition as usize].is_empty() {
                        partition = (partition + 1) % partitions;
                    }
                }
                let records: Vec<Value> = (first..next_sequence)
                    .map(|sequence| {
                        let value = record_value(producer, sequence, sent_unix, spec.record_bytes);
                        match &keys {
                            Some(keys) => {
                                rng ^= rng << 13;
                                rng ^= rng >> 7;
                                rng ^= rng << 17;
                                let own = &keys[partition as usize];
                                let key = own[(rng % own.len() as u64) as usize];
                                json!({"key": format!("k{key}"), "value": value})
                            }
                            None => json!({"value": value}),
                        }
                    })
                    .collect();
                let mut body = json!({ "records": records });
                if let Some(id) = idempotent {
                    body["producer_id"] = json!(id);
                    body["producer_epoch"] = json!(0);
                    body["sequence"] = json!(sequences[partition as usize]);
                }
                let body = body.to_string();
                let sent = Instant::now();
                loop {
                    let url = format!("{}/partitions/{partition}", &urls[target % urls.len()]);
                    let reply = http.post(&url, JSON_V2, &body);
                    let acked = reply
                        .as_ref()
                        .ok()
                        .filter(|r| r.status == 200)
                        .and_then(|r| acks_of(&r.body, producer, first));
                    let at_ms = start.elapsed().as_millis() as u64;
                    let partition = Some(partition);
                    if let Some(acks) = acked {
                        live.acked.fetch_add(acks.len() as u64, Ordering::Relaxed);
                        report.acks.extend(acks);
                        report.outcomes.push(Outcome {
                            at_ms,
                            ok: true,
                            partition,
                        });
                        report
                            .latencies
                            .push((at_ms, sent.elapsed().as_micros() as u64));
                        if let Some(p) = partition {
                            // Kafka's sequences wrap after i32::MAX; a request never spans it.
                            let next = sequences[p as usize] + spec.batch as i64;
                            sequences[p as usize] =
                                if next + spec.batch as i64 > i64::from(i32::MAX) + 1 {
                                    0
                                } else {
                                    next
                                };
                        }
                        break;
                    }
                    live.failed.fetch_add(1, Ordering::Relaxed);
                    report.failed += 1;
                    report.outcomes.push(Outcome {
                        at_ms,
                        ok: false,
                        partition,
                    });
                    target += 1;
                    std::thread::sleep(FAILURE_BACKOFF);
                    // Without a producer id its sequences are abandoned, never resent: a
                    // sequence stored twice is then a real duplicate. With one, a request
                    // whose outcome may be unknown is resent until answered (or the run ends
                    // with it unanswered); one refused for good (a 4xx but 421/429) stored
                    // nothing, so its sequence is the next request's.
                    let resend = match &reply {
                        // 200 without every offset: what was stored is not known.
                        Ok(r) => r.status >= 500 || matches!(r.status, 200 | 307 | 421 | 429),
                        Err(_) => true,
                    };
                    if idempotent.is_none() || !resend || live.stop.load(Ordering::Acquire) {
                        break;
                    }
                }
            }
            report
        }));
    }
    Ok(threads)
}

/// A producer id from the cluster (`POST /producers`), asked of each broker in turn until one
/// answers; None if the run stops first or the brokers have no such endpoint.
fn producer_id(http: &Http, bases: &[String], live: &Live) -> Option<i64> {
    for attempt in 0usize.. {
        if live.stop.load(Ordering::Acquire) {
            return None;
        }
        let url = format!("{}/producers", bases[attempt % bases.len()]);
        match http.post(&url, JSON_V2, "{}") {
            Ok(reply) if reply.status == 200 => return reply.body["producer_id"].as_i64(),
            Ok(reply) if reply.status == 404 || reply.status == 405 => return None,
            _ => std::thread::sleep(FAILURE_BACKOFF),
        }
    }
    None
}

/// Key numbers `0..n` by the partition Kafka's default partitioner sends the stored key
/// `"k{number}"` (JSON text) to.
pub fn keys_by_partition(n: u64, partitions: u32) -> Vec<Vec<u64>> {
    let mut by = vec![Vec::new(); partitions as usize];
    for key in 0..n {
        // The JSON format stores a key as the JSON text sent, quotes included: that is what
        // the broker (and any Kafka client reading it) hashes.
        let hash = murmur2::murmur2(format!("\"k{key}\"").as_bytes(), KAFKA_MURMUR2_SEED) as i32;
        by[((hash & 0x7fff_ffff) as u32 % partitions) as usize].push(key);
    }
    by
}

/// Seed of Kafka's `Utils.murmur2`, which its default partitioner hashes keys with.
const KAFKA_MURMUR2_SEED: u32 = 0x9747_b28c;

/// Consumers share the partitions out and tail them with long polls from the start, timing each
/// record from its send time (in its value) to now.
pub(crate) fn start_consumers(
    count: u32,
    partitions: u32,
    urls: &[String],
    topic: &str,
    live: &Arc<Live>,
    start: Instant,
) -> Vec<std::thread::JoinHandle<ConsumerReport>> {
    (0..count)
        .map(|consumer| {
            let mine: Vec<u32> = (0..partitions).filter(|p| p % count == consumer).collect();
            let urls: Vec<String> = urls
                .iter()
                .map(|u| format!("{u}/topics/{topic}/partitions"))
                .collect();
            let live = live.clone();
            std::thread::spawn(move || {
                let http = Http::new(REQUEST_TIMEOUT);
                let mut report = ConsumerReport {
                    overall: new_histogram(),
                    per_second: Vec::new(),
                };
                // None: start at the log start (also after the topic was re-created).
                let mut offsets: Vec<Option<u64>> = vec![None; mine.len()];
                let mut target = consumer as usize;
                while !live.stop.load(Ordering::Acquire) {
                    for (i, partition) in mine.iter().enumerate() {
                        let from = offsets[i]
                            .map(|o| format!("&offset={o}"))
                            .unwrap_or_default();
                        let url = format!(
                            "{}/{partition}/records?max_records=5000&timeout_ms=100{from}",
                            urls[target % urls.len()]
                        );
                        let reply = match http.get(&url) {
                            Ok(reply) if reply.status == 200 => reply,
                            Ok(reply) if reply.status == 416 => {
                                offsets[i] = None;
                                continue;
                            }
                            _ => {
                                target += 1;
                                std::thread::sleep(FAILURE_BACKOFF);
                                continue;
                            }
                        };
                        let now_unix = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map(|d| d.as_micros())
                            .unwrap_or_default();
                        let second = start.elapsed().as_secs() as usize;
                        if report.per_second.len() <= second {
                            report.per_second.resize_with(second + 1, new_histogram);
                        }
                        let mut read = 0;
                        for record in reply.body["records"].as_array().into_iter().flatten() {
                            read += 1;
                            let Some(sent) = record["value"].as_str().and_then(sent_time) else {
                                continue;
                            };
                            let micros = now_unix.saturating_sub(sent).max(1) as u64;
                            let _ = report.overall.record(micros);
                            let _ = report.per_second[second].record(micros);
                        }
                        live.consumed.fetch_add(read, Ordering::Relaxed);
                        if let Some(next) = reply.body["next_offset"].as_u64() {
                            offsets[i] = Some(next);
                        }
                    }
                }
                report
            })
        })
        .collect()
}

/// The send time (µs since the epoch) in a value written by [`record_value`].
fn sent_time(value: &str) -> Option<u128> {
    value.split(':').nth(2)?.strip_prefix('t')?.parse().ok()
}

/// The acknowledgements in a 200 produce reply; None unless every record has an offset.
fn acks_of(body: &Value, producer: u32, first: u64) -> Option<Vec<Ack>> {
    body["offsets"]
        .as_array()?
        .iter()
        .enumerate()
        .map(|(i, at)| {
            Some(Ack {
                producer,
                sequence: first + i as u64,
                partition: at["partition"].as_u64()? as u32,
                offset: at["offset"].as_u64()?,
            })
        })
        .collect()
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    // 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant, valid histogram bounds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_carry_producer_and_sequence_at_the_record_size() {
        let value = record_value(7, 12_345, 1_764_000_000_000_000, 100);
        assert_eq!(value.len(), 98);
        assert_eq!(parse_value(&value), Some((7, 12_345)));
        assert_eq!(sent_time(&value), Some(1_764_000_000_000_000));
        assert_eq!(parse_value("something else"), None);
    }

    #[test]
    fn keys_go_where_kafkas_partitioner_sends_them() {
        let by = keys_by_partition(1000, 6);
        assert_eq!(by.iter().map(Vec::len).sum::<usize>(), 1000);
        assert!(by.iter().all(|keys| keys.len() > 100), "spread: {by:?}");
        // Kafka's own vector (UtilsTest): murmur2("21") = -973932308.
        assert_eq!(
            murmur2::murmur2(b"21", KAFKA_MURMUR2_SEED) as i32,
            -973_932_308
        );
    }
}
