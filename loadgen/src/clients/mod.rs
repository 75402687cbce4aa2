//! The load's clients: producer threads that publish numbered records and keep every
//! acknowledgement, and consumer threads that tail the partitions and time each record end to
//! end, over HTTP ([`rest`]) or the Kafka protocol ([`crate::kafka`]). `run` starts them,
//! applies the faults and judges what they saw.
//!
//! Both protocols send the same bytes: a value is the JSON text of a string
//! `"p{producer}:s{sequence}:t{sent µs}:xxx…"` and a key the JSON text `"k{n}"`, so a record
//! reads back the same over either API and keys hash to the same partitions.

pub(crate) mod rest;

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use hdrhistogram::Histogram;

use crate::scenario::Scenario;
use crate::verify::{Ack, Outcome};

/// How long a request may take before the client gives up on it and moves on.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after a failed request before the next (the producer also moves to another broker).
pub(crate) const FAILURE_BACKOFF: Duration = Duration::from_millis(20);

/// Acknowledged records `first_sequence..first_sequence + count` of one producer, stored at
/// consecutive offsets from `offset`: one entry per request instead of one per record, so the
/// producers' hot path only appends a few words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckRun {
    pub(crate) producer: u32,
    pub(crate) partition: u32,
    pub(crate) first_sequence: u64,
    pub(crate) offset: u64,
    pub(crate) count: u32,
}

impl AckRun {
    pub(crate) fn acks(&self) -> impl Iterator<Item = Ack> + '_ {
        (0..u64::from(self.count)).map(move |i| Ack {
            producer: self.producer,
            sequence: self.first_sequence + i,
            partition: self.partition,
            offset: self.offset + i,
        })
    }
}

/// What each producer thread hands back.
pub(crate) struct ProducerReport {
    pub(crate) acks: Vec<AckRun>,
    pub(crate) outcomes: Vec<Outcome>,
    /// (ms since start, latency µs, records) per successful request.
    pub(crate) latencies: Vec<(u64, u64, u32)>,
    pub(crate) failed: u64,
}

impl ProducerReport {
    pub(crate) fn new() -> Self {
        Self {
            acks: Vec::new(),
            outcomes: Vec::new(),
            latencies: Vec::new(),
            failed: 0,
        }
    }
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

impl ConsumerReport {
    pub(crate) fn new() -> Self {
        Self {
            overall: new_histogram(),
            per_second: Vec::new(),
        }
    }

    /// Record the end-to-end latency of a record read now whose value is `value` (JSON text).
    pub(crate) fn record(&mut self, value: &[u8], now_unix_micros: u128, second: usize) {
        let Some(sent) = sent_time(value) else { return };
        if self.per_second.len() <= second {
            self.per_second.resize_with(second + 1, new_histogram);
        }
        let micros = now_unix_micros.saturating_sub(sent).max(1) as u64;
        let _ = self.overall.record(micros);
        let _ = self.per_second[second].record(micros);
    }
}

pub(crate) fn unix_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or_default()
}

/// Append the JSON text of a record's value, `bytes` long with its quotes: producer, sequence
/// and send time, padded with `x`.
pub(crate) fn write_value(
    out: &mut Vec<u8>,
    producer: u32,
    sequence: u64,
    sent_unix_micros: u128,
    bytes: usize,
) {
    let start = out.len();
    // Writing into a Vec cannot fail.
    let _ = write!(out, "\"p{producer}:s{sequence}:t{sent_unix_micros}:");
    let padded = start + bytes.saturating_sub(1);
    if out.len() < padded {
        out.resize(padded, b'x');
    }
    out.push(b'"');
}

/// Append the JSON text of key number `key`.
pub(crate) fn write_key(out: &mut Vec<u8>, key: u64) {
    let _ = write!(out, "\"k{key}\"");
}

/// Producer id and sequence from a value written by [`write_value`], as JSON text or as the
/// string it holds.
pub(crate) fn parse_value(value: &[u8]) -> Option<(u32, u64)> {
    let mut parts = strip_quote(value).split(|&b| b == b':');
    let producer = number(parts.next()?.strip_prefix(b"p")?)?;
    let sequence = number(parts.next()?.strip_prefix(b"s")?)?;
    Some((u32::try_from(producer).ok()?, sequence as u64))
}

/// The send time (µs since the epoch) in a value written by [`write_value`].
fn sent_time(value: &[u8]) -> Option<u128> {
    number(
        strip_quote(value)
            .split(|&b| b == b':')
            .nth(2)?
            .strip_prefix(b"t")?,
    )
}

fn strip_quote(value: &[u8]) -> &[u8] {
    value.strip_prefix(b"\"").unwrap_or(value)
}

fn number(digits: &[u8]) -> Option<u128> {
    if digits.is_empty() || digits.len() > 38 {
        return None;
    }
    digits.iter().try_fold(0u128, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u128::from(d - b'0'))
    })
}

/// What one producer sends next: which partition, which of its sequence numbers, when.
pub(crate) struct Plan {
    pub(crate) producer: u32,
    pub(crate) batch: usize,
    pub(crate) record_bytes: usize,
    partitions: u32,
    /// Per partition, the key numbers Kafka's partitioner sends there (None: keyless).
    keys: Option<Vec<Vec<u64>>>,
    rng: u64,
    next_sequence: u64,
    requests: u32,
    /// The partition whose turn is next when lanes take turns ([`Plan::turn`]).
    cursor: u32,
    interval: Option<Duration>,
    next_send: Instant,
}

/// One request's worth of records.
pub(crate) struct Planned {
    pub(crate) partition: u32,
    pub(crate) first: u64,
    pub(crate) sent_unix_micros: u128,
}

impl Plan {
    pub(crate) fn new(scenario: &Scenario, producer: u32, partitions: u32) -> Result<Self> {
        let spec = &scenario.producers;
        let per_producer_rate = spec.rate as f64 / f64::from(spec.count);
        Ok(Self {
            producer,
            batch: spec.batch,
            record_bytes: spec.record_bytes,
            partitions,
            keys: scenario
                .key_space(producer)?
                .map(|n| keys_by_partition(n, partitions)),
            rng: 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(producer) << 32,
            next_sequence: 0,
            requests: 0,
            cursor: producer % partitions,
            interval: (spec.rate > 0)
                .then(|| Duration::from_secs_f64(spec.batch as f64 / per_producer_rate)),
            next_send: Instant::now(),
        })
    }

    /// How long until the next request is due at the scenario's rate (None: now).
    pub(crate) fn until_due(&self) -> Option<Duration> {
        self.interval?;
        let now = Instant::now();
        (self.next_send > now).then(|| self.next_send - now)
    }

    /// The next request: each names one partition, in turn, so its outcome concerns one
    /// partition and its sequence is that partition's; keyed producers skip partitions none of
    /// their keys hash to.
    pub(crate) fn next(&mut self) -> Planned {
        let mut partition = (self.producer + self.requests) % self.partitions;
        self.requests = self.requests.wrapping_add(1);
        while !self.writes_to(partition) {
            partition = (partition + 1) % self.partitions;
        }
        self.next_for(partition)
    }

    /// The next request for `partition` (the producer's sequence numbers and rate are shared
    /// by all its partitions).
    pub(crate) fn next_for(&mut self, partition: u32) -> Planned {
        if let Some(interval) = self.interval {
            let now = Instant::now();
            self.next_send = self.next_send.max(now - interval) + interval;
        }
        let first = self.next_sequence;
        self.next_sequence += self.batch as u64;
        self.cursor = (partition + 1) % self.partitions;
        Planned {
            partition,
            first,
            sent_unix_micros: unix_micros(),
        }
    }

    /// The partition whose turn it is: the next in turn from the last one written to that is
    /// not `busy` (None: all are).
    pub(crate) fn turn(&self, busy: &[bool]) -> Option<u32> {
        (0..self.partitions)
            .map(|i| (self.cursor + i) % self.partitions)
            .find(|&p| self.writes_to(p) && !busy.get(p as usize).copied().unwrap_or(true))
    }

    /// Whether this producer writes to `partition` (a keyed one only where its keys go).
    pub(crate) fn writes_to(&self, partition: u32) -> bool {
        self.keys
            .as_ref()
            .is_none_or(|keys| keys.get(partition as usize).is_some_and(|k| !k.is_empty()))
    }

    /// A key for a record of `partition`: one Kafka's partitioner sends there (None: keyless).
    pub(crate) fn key(&mut self, partition: u32) -> Option<u64> {
        let keys = self.keys.as_ref()?;
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let own = &keys[partition as usize];
        Some(own[(self.rng % own.len() as u64) as usize])
    }
}

/// The sequence after a request of `batch` records from `sequence`: Kafka's sequences wrap
/// after i32::MAX to 0, within a batch too (as the broker counts them).
pub(crate) fn next_kafka_sequence(sequence: i32, batch: usize) -> i32 {
    ((i64::from(sequence) + batch as i64) % (i64::from(i32::MAX) + 1)) as i32
}

/// Where the producers and consumers connect.
pub(crate) enum Endpoints<'a> {
    Http(&'a [String]),
    /// Kafka bootstrap addresses (host:port).
    Kafka(&'a [String]),
}

/// HTTP producers per runtime thread (each a task with its own connection).
const HTTP_PRODUCERS_PER_THREAD: usize = 32;

/// Start the producers; each thread hands back the reports of the producers it ran.
pub(crate) fn start_producers(
    scenario: &Scenario,
    endpoints: &Endpoints,
    topic: &str,
    partitions: u32,
    live: &Arc<Live>,
    start: Instant,
) -> Result<Vec<std::thread::JoinHandle<Vec<ProducerReport>>>> {
    let plans = (0..scenario.producers.count)
        .map(|producer| Plan::new(scenario, producer, partitions))
        .collect::<Result<Vec<_>>>()?;
    let spec = scenario.producers.clone();
    let threads = match endpoints {
        Endpoints::Http(urls) => {
            let mut plans = plans.into_iter().peekable();
            let mut threads = Vec::new();
            while plans.peek().is_some() {
                let these: Vec<Plan> = plans.by_ref().take(HTTP_PRODUCERS_PER_THREAD).collect();
                let (live, topic, urls, spec) =
                    (live.clone(), topic.to_owned(), urls.to_vec(), spec.clone());
                threads.push(std::thread::spawn(move || {
                    rest::produce_all(these, &spec, &urls, &topic, partitions, &live, start)
                }));
            }
            threads
        }
        Endpoints::Kafka(bootstrap) => plans
            .into_iter()
            .map(|plan| {
                let (live, topic, bootstrap, spec) = (
                    live.clone(),
                    topic.to_owned(),
                    bootstrap.to_vec(),
                    spec.clone(),
                );
                std::thread::spawn(move || {
                    vec![crate::kafka::producer::produce(
                        plan, &spec, &bootstrap, &topic, partitions, &live, start,
                    )]
                })
            })
            .collect(),
    };
    Ok(threads)
}

/// Consumers share the partitions out and tail them from the start, timing each record from
/// its send time (in its value) to now.
pub(crate) fn start_consumers(
    count: u32,
    partitions: u32,
    endpoints: &Endpoints,
    topic: &str,
    live: &Arc<Live>,
    start: Instant,
) -> Vec<std::thread::JoinHandle<ConsumerReport>> {
    (0..count)
        .map(|consumer| {
            let mine: Vec<u32> = (0..partitions).filter(|p| p % count == consumer).collect();
            let (live, topic) = (live.clone(), topic.to_owned());
            match endpoints {
                Endpoints::Http(urls) => {
                    let urls = urls.to_vec();
                    std::thread::spawn(move || {
                        rest::consume(consumer, &mine, &urls, &topic, &live, start)
                    })
                }
                Endpoints::Kafka(bootstrap) => {
                    let bootstrap = bootstrap.to_vec();
                    std::thread::spawn(move || {
                        crate::kafka::consumer::consume(&mine, &bootstrap, &topic, &live, start)
                    })
                }
            }
        })
        .collect()
}

/// Key numbers `0..n` by the partition Kafka's default partitioner sends the stored key
/// `"k{number}"` (JSON text) to.
pub fn keys_by_partition(n: u64, partitions: u32) -> Vec<Vec<u64>> {
    let mut by = vec![Vec::new(); partitions as usize];
    let mut key = Vec::new();
    for number in 0..n {
        // The JSON format stores a key as the JSON text sent, quotes included: that is what
        // the broker (and any Kafka client reading it) hashes.
        key.clear();
        write_key(&mut key, number);
        let hash = murmur2::murmur2(&key, KAFKA_MURMUR2_SEED) as i32;
        by[((hash & 0x7fff_ffff) as u32 % partitions) as usize].push(number);
    }
    by
}

/// Seed of Kafka's `Utils.murmur2`, which its default partitioner hashes keys with.
const KAFKA_MURMUR2_SEED: u32 = 0x9747_b28c;

pub(crate) fn new_histogram() -> Histogram<u64> {
    // 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant, valid histogram bounds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_carry_producer_and_sequence_at_the_record_size() {
        let mut value = Vec::new();
        write_value(&mut value, 7, 12_345, 1_764_000_000_000_000, 100);
        assert_eq!(value.len(), 100);
        let text: String = serde_json::from_slice(&value).expect("a JSON string");
        assert_eq!(parse_value(&value), Some((7, 12_345)));
        assert_eq!(parse_value(text.as_bytes()), Some((7, 12_345)));
        assert_eq!(sent_time(&value), Some(1_764_000_000_000_000));
        assert_eq!(parse_value(b"something else"), None);
        assert_eq!(parse_value(b"\"p1:s:t2\""), None);
    }

    #[test]
    fn acknowledgement_runs_expand_to_one_ack_per_record() {
        let run = AckRun {
            producer: 3,
            partition: 1,
            first_sequence: 10,
            offset: 500,
            count: 3,
        };
        let acks: Vec<(u64, u64)> = run.acks().map(|a| (a.sequence, a.offset)).collect();
        assert_eq!(acks, [(10, 500), (11, 501), (12, 502)]);
    }

    #[test]
    fn at_a_rate_partitions_take_turns_skipping_busy_ones() {
        let scenario = Scenario::parse(
            r#"
duration_s = 1
[[topics]]
name = "t"
partitions = 3
replication_factor = 1
[producers]
count = 1
rate = 100
"#,
        )
        .expect("scenario");
        let mut plan = Plan::new(&scenario, 0, 3).expect("plan");
        assert_eq!(plan.turn(&[false; 3]), Some(0));
        plan.next_for(0);
        assert_eq!(plan.turn(&[false; 3]), Some(1));
        // Partition 1 hangs: its turn passes to 2, then back round to 0.
        assert_eq!(plan.turn(&[false, true, false]), Some(2));
        plan.next_for(2);
        assert_eq!(plan.turn(&[false, true, false]), Some(0));
        assert_eq!(plan.turn(&[true; 3]), None);
    }

    #[test]
    fn kafka_sequences_wrap_after_i32_max_as_the_broker_counts_them() {
        assert_eq!(next_kafka_sequence(0, 100), 100);
        assert_eq!(next_kafka_sequence(i32::MAX - 199, 100), i32::MAX - 99);
        assert_eq!(next_kafka_sequence(i32::MAX - 99, 100), 0);
        // A batch may span the wrap: 50 records up to i32::MAX, 50 from 0.
        assert_eq!(next_kafka_sequence(i32::MAX - 49, 100), 50);
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
