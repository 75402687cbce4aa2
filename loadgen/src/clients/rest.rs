//! The producers and tailing consumers over the HTTP API. Request bodies are written straight
//! into a reused buffer and replies read into typed, borrowing structs: building and parsing
//! `serde_json::Value` trees per record took most of loadgen's CPU.

use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    next_kafka_sequence, unix_micros, write_key, write_value, AckRun, ConsumerReport, Live, Plan,
    ProducerReport, FAILURE_BACKOFF, REQUEST_TIMEOUT,
};
use crate::http::Http;
use crate::scenario::ProducerSpec;
use crate::verify::Outcome;

const JSON_V2: &str = "application/vnd.kafka.json.v2+json";

/// A produce reply: where each record landed.
#[derive(Deserialize)]
struct Produced {
    offsets: Vec<ProducedAt>,
}

#[derive(Deserialize)]
struct ProducedAt {
    partition: Option<u32>,
    offset: Option<u64>,
}

/// A fetch reply, values left as JSON text.
#[derive(Deserialize)]
struct Fetched<'a> {
    #[serde(borrow)]
    records: Vec<FetchedRecord<'a>>,
    next_offset: Option<u64>,
}

#[derive(Deserialize)]
struct FetchedRecord<'a> {
    #[serde(borrow, default)]
    value: Option<&'a RawValue>,
}

pub(super) fn produce(
    mut plan: Plan,
    spec: &ProducerSpec,
    bases: &[String],
    topic: &str,
    partitions: u32,
    live: &Live,
    start: Instant,
) -> ProducerReport {
    let producer = plan.producer;
    let http = Http::new(REQUEST_TIMEOUT);
    let urls: Vec<String> = bases
        .iter()
        .map(|u| format!("{u}/topics/{topic}"))
        .collect();
    let mut report = ProducerReport::new();
    // An idempotent producer resends a failed request, same records and sequence, until it is
    // answered: the broker stores it once whatever happened to the first try.
    let idempotent = spec
        .idempotent
        .then(|| producer_id(&http, bases, live))
        .flatten();
    if spec.idempotent && idempotent.is_none() && !live.stop.load(Ordering::Acquire) {
        eprintln!(
            "loadgen: producer {producer} got no producer id (POST /producers); it publishes without idempotence"
        );
    }
    let mut sequences = vec![0i32; partitions as usize];
    let mut target = producer as usize;
    let mut leaders = Leaders::new(&http, bases, topic, partitions);
    let mut body = Vec::with_capacity(spec.batch * (spec.record_bytes + 24) + 128);
    while !live.stop.load(Ordering::Acquire) {
        if let Some(wait) = plan.until_due() {
            std::thread::sleep(wait);
        }
        let request = plan.next();
        let partition = request.partition;
        body.clear();
        body.extend_from_slice(b"{\"records\":[");
        for i in 0..plan.batch {
            if i > 0 {
                body.push(b',');
            }
            body.push(b'{');
            if let Some(key) = plan.key(partition) {
                body.extend_from_slice(b"\"key\":");
                write_key(&mut body, key);
                body.push(b',');
            }
            body.extend_from_slice(b"\"value\":");
            let sequence = request.first + i as u64;
            write_value(
                &mut body,
                producer,
                sequence,
                request.sent_unix_micros,
                plan.record_bytes,
            );
            body.push(b'}');
        }
        body.push(b']');
        if let Some(id) = idempotent {
            let sequence = sequences[partition as usize];
            let _ = std::io::Write::write_fmt(
                &mut body,
                format_args!(",\"producer_id\":{id},\"producer_epoch\":0,\"sequence\":{sequence}"),
            );
        }
        body.push(b'}');
        let sent = Instant::now();
        loop {
            let to = leaders.of(partition).unwrap_or(target % urls.len());
            let url = format!("{}/partitions/{partition}", &urls[to]);
            let reply = http.post_raw(&url, JSON_V2, &body);
            let acked = reply
                .as_ref()
                .ok()
                .filter(|(status, _)| *status == 200)
                .and_then(|(_, text)| ack_of(text, producer, request.first, plan.batch));
            let at_ms = start.elapsed().as_millis() as u64;
            let outcome = |ok| Outcome {
                at_ms,
                ok,
                partition: Some(partition),
            };
            if let Some(run) = acked {
                live.acked
                    .fetch_add(u64::from(run.count), Ordering::Relaxed);
                report.acks.push(run);
                report.outcomes.push(outcome(true));
                report
                    .latencies
                    .push((at_ms, sent.elapsed().as_micros() as u64, run.count));
                let next = &mut sequences[partition as usize];
                *next = next_kafka_sequence(*next, plan.batch);
                break;
            }
            live.failed.fetch_add(1, Ordering::Relaxed);
            report.failed += 1;
            report.outcomes.push(outcome(false));
            target += 1;
            leaders.forget(partition);
            std::thread::sleep(FAILURE_BACKOFF);
            // Without a producer id its sequences are abandoned, never resent: a sequence
            // stored twice is then a real duplicate. With one, a request whose outcome may be
            // unknown is resent until answered (or the run ends with it unanswered); one
            // refused for good (a 4xx but 421/429) stored nothing, so its sequence is the next
            // request's.
            let resend = match &reply {
                // 200 without every offset: what was stored is not known.
                Ok((status, _)) => *status >= 500 || matches!(status, 200 | 307 | 421 | 429),
                Err(_) => true,
            };
            if idempotent.is_none() || !resend || live.stop.load(Ordering::Acquire) {
                break;
            }
        }
    }
    report
}

/// Where each partition is led, as an index into the brokers' URLs: requests go to the leader,
/// as a Kafka client's do, since a follower forwards a produce to its leader and waits for it.
struct Leaders<'a> {
    http: &'a Http,
    bases: &'a [String],
    topic: &'a str,
    /// Broker id → index in `bases`, learnt from each broker's `/health`.
    ids: Vec<(u32, usize)>,
    known: Vec<Option<usize>>,
    /// Which broker to ask next.
    ask: usize,
}

impl<'a> Leaders<'a> {
    fn new(http: &'a Http, bases: &'a [String], topic: &'a str, partitions: u32) -> Self {
        let ids = bases
            .iter()
            .enumerate()
            .filter_map(|(i, base)| {
                let (status, text) = http.get_raw(&format!("{base}/health")).ok()?;
                let health: serde_json::Value = serde_json::from_str(&text).ok()?;
                let id = health["broker_id"].as_u64()?;
                (status == 200).then_some((u32::try_from(id).ok()?, i))
            })
            .collect();
        Self {
            http,
            bases,
            topic,
            ids,
            known: vec![None; partitions as usize],
            ask: 0,
        }
    }

    /// The leader's index, asked of a broker when not known (None: ask failed, no leader).
    fn of(&mut self, partition: u32) -> Option<usize> {
        if let Some(known) = self.known[partition as usize] {
            return Some(known);
        }
        if self.ids.is_empty() {
            return None;
        }
        let base = &self.bases[self.ask % self.bases.len()];
        self.ask += 1;
        let described = crate::http::describe(self.http, base, self.topic, partition)?;
        let leader = u32::try_from(described["leader"].as_u64()?).ok()?;
        let index = self
            .ids
            .iter()
            .find(|(id, _)| *id == leader)
            .map(|(_, i)| *i)?;
        self.known[partition as usize] = Some(index);
        Some(index)
    }

    fn forget(&mut self, partition: u32) {
        self.known[partition as usize] = None;
    }
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

/// The acknowledgement in a 200 produce reply; None unless every record has an offset, in one
/// partition, consecutive (one request is one batch).
fn ack_of(text: &str, producer: u32, first: u64, batch: usize) -> Option<AckRun> {
    let reply: Produced = serde_json::from_str(text).ok()?;
    let head = reply.offsets.first()?;
    let (partition, offset) = (head.partition?, head.offset?);
    let consecutive =
        reply.offsets.len() == batch
            && reply.offsets.iter().enumerate().all(|(i, at)| {
                at.partition == Some(partition) && at.offset == Some(offset + i as u64)
            });
    consecutive.then_some(AckRun {
        producer,
        partition,
        first_sequence: first,
        offset,
        count: batch as u32,
    })
}

/// Tail `mine` with long polls from each log start.
pub(super) fn consume(
    consumer: u32,
    mine: &[u32],
    bases: &[String],
    topic: &str,
    live: &Live,
    start: Instant,
) -> ConsumerReport {
    let http = Http::new(REQUEST_TIMEOUT);
    let urls: Vec<String> = bases
        .iter()
        .map(|u| format!("{u}/topics/{topic}/partitions"))
        .collect();
    let mut report = ConsumerReport::new();
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
            let text = match http.get_raw(&url) {
                Ok((200, text)) => text,
                Ok((416, _)) => {
                    offsets[i] = None;
                    continue;
                }
                _ => {
                    target += 1;
                    std::thread::sleep(FAILURE_BACKOFF);
                    continue;
                }
            };
            let Ok(reply) = serde_json::from_str::<Fetched>(&text) else {
                target += 1;
                continue;
            };
            let now = unix_micros();
            let second = start.elapsed().as_secs() as usize;
            for record in &reply.records {
                if let Some(value) = record.value {
                    report.record(value.get().as_bytes(), now, second);
                }
            }
            live.consumed
                .fetch_add(reply.records.len() as u64, Ordering::Relaxed);
            if let Some(next) = reply.next_offset {
                offsets[i] = Some(next);
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_acknowledges_only_every_record_at_consecutive_offsets() {
        let reply = r#"{"offsets":[{"partition":2,"offset":7},{"partition":2,"offset":8}]}"#;
        let run = ack_of(reply, 1, 40, 2).expect("acknowledged");
        assert_eq!((run.partition, run.offset, run.count), (2, 7, 2));
        assert_eq!(run.first_sequence, 40);
        // One record short, a gap, another partition, an error entry: not known.
        assert!(ack_of(reply, 1, 40, 3).is_none());
        let gap = r#"{"offsets":[{"partition":2,"offset":7},{"partition":2,"offset":9}]}"#;
        assert!(ack_of(gap, 1, 40, 2).is_none());
        let moved = r#"{"offsets":[{"partition":2,"offset":7},{"partition":1,"offset":8}]}"#;
        assert!(ack_of(moved, 1, 40, 2).is_none());
        let failed = r#"{"offsets":[{"partition":2,"offset":7},{"error_code":50003}]}"#;
        assert!(ack_of(failed, 1, 40, 2).is_none());
    }
}
