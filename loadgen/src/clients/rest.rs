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

/// Run `plans` as HTTP producers on one thread: each is a task on a single-threaded actix
/// runtime with its own connection, so a request costs no thread switch (with a blocking
/// thread per producer, scheduling took a fifth of loadgen's CPU and loadgen a third of the
/// machine at 300,000 records/s).
pub(super) fn produce_all(
    plans: Vec<Plan>,
    spec: &ProducerSpec,
    bases: &[String],
    topic: &str,
    partitions: u32,
    live: &Live,
    start: Instant,
) -> Vec<ProducerReport> {
    let ids = broker_ids(bases);
    let system = actix_rt::System::new();
    system.block_on(async {
        let producers = plans.into_iter().map(|plan| {
            let producer = Producer {
                client: awc::Client::builder()
                    .timeout(REQUEST_TIMEOUT)
                    .disable_redirects()
                    .finish(),
                bases,
                topic,
                live,
                ids: &ids,
                leaders: vec![None; partitions as usize],
                ask: plan.producer as usize,
            };
            producer.run(plan, spec, partitions, start)
        });
        // Every producer runs concurrently on this thread.
        futures::future::join_all(producers).await
    })
}

/// Each broker's id (from its `/health`) with its index in `bases`.
fn broker_ids(bases: &[String]) -> Vec<(u32, usize)> {
    let http = Http::new(REQUEST_TIMEOUT);
    bases
        .iter()
        .enumerate()
        .filter_map(|(i, base)| {
            let (status, text) = http.get_raw(&format!("{base}/health")).ok()?;
            let health: serde_json::Value = serde_json::from_str(&text).ok()?;
            let id = u32::try_from(health["broker_id"].as_u64()?).ok()?;
            (status == 200).then_some((id, i))
        })
        .collect()
}

/// One producer's connection and what it knows of the cluster.
struct Producer<'a> {
    client: awc::Client,
    bases: &'a [String],
    topic: &'a str,
    live: &'a Live,
    /// Broker id → index in `bases`.
    ids: &'a [(u32, usize)],
    /// Per partition, its leader's index in `bases`: requests go to the leader, as a Kafka
    /// client's do, since a follower forwards a produce to its leader and waits for it.
    leaders: Vec<Option<usize>>,
    /// Which broker to ask (or send to) next when no leader is known.
    ask: usize,
}

impl Producer<'_> {
    async fn run(
        mut self,
        mut plan: Plan,
        spec: &ProducerSpec,
        partitions: u32,
        start: Instant,
    ) -> ProducerReport {
        let producer = plan.producer;
        let mut report = ProducerReport::new();
        // An idempotent producer resends a failed request, same records and sequence, until it
        // is answered: the broker stores it once whatever happened to the first try.
        let idempotent = if spec.idempotent {
            self.producer_id().await
        } else {
            None
        };
        if spec.idempotent && idempotent.is_none() && !self.live.stop.load(Ordering::Acquire) {
            eprintln!(
                "loadgen: producer {producer} got no producer id (POST /producers); it publishes without idempotence"
            );
        }
        let mut sequences = vec![0i32; partitions as usize];
        let mut body = Vec::with_capacity(spec.batch * (spec.record_bytes + 24) + 128);
        while !self.live.stop.load(Ordering::Acquire) {
            if let Some(wait) = plan.until_due() {
                actix_rt::time::sleep(wait).await;
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
                    format_args!(
                        ",\"producer_id\":{id},\"producer_epoch\":0,\"sequence\":{sequence}"
                    ),
                );
            }
            body.push(b'}');
            let body = bytes::Bytes::copy_from_slice(&body);
            let sent = Instant::now();
            loop {
                let to = match self.leader(partition).await {
                    Some(leader) => leader,
                    None => self.ask % self.bases.len(),
                };
                let url = format!(
                    "{}/topics/{}/partitions/{partition}",
                    self.bases[to], self.topic
                );
                let reply = self.post(&url, body.clone()).await;
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
                    self.live
                        .acked
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
                self.live.failed.fetch_add(1, Ordering::Relaxed);
                report.failed += 1;
                report.outcomes.push(outcome(false));
                self.ask += 1;
                self.leaders[partition as usize] = None;
                actix_rt::time::sleep(FAILURE_BACKOFF).await;
                // Without a producer id its sequences are abandoned, never resent: a sequence
                // stored twice is then a real duplicate. With one, a request whose outcome may
                // be unknown is resent until answered (or the run ends with it unanswered); one
                // refused for good (a 4xx but 421/429) stored nothing, so its sequence is the
                // next request's.
                let resend = match &reply {
                    // 200 without every offset: what was stored is not known.
                    Ok((status, _)) => *status >= 500 || matches!(status, 200 | 307 | 421 | 429),
                    Err(()) => true,
                };
                if idempotent.is_none() || !resend || self.live.stop.load(Ordering::Acquire) {
                    break;
                }
            }
        }
        report
    }

    /// (status, body) of a POST; Err on a transport error or timeout.
    async fn post(&self, url: &str, body: bytes::Bytes) -> Result<(u16, String), ()> {
        let mut response = self
            .client
            .post(url)
            .insert_header(("Content-Type", JSON_V2))
            .send_body(body)
            .await
            .map_err(|_| ())?;
        let status = response.status().as_u16();
        let body = response
            .body()
            .limit(REPLY_BYTES_MAX)
            .await
            .map_err(|_| ())?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    async fn get(&self, url: &str) -> Result<(u16, String), ()> {
        let mut response = self.client.get(url).send().await.map_err(|_| ())?;
        let status = response.status().as_u16();
        let body = response
            .body()
            .limit(REPLY_BYTES_MAX)
            .await
            .map_err(|_| ())?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// The partition's leader, asked of a broker when not known (None: the answer named none).
    async fn leader(&mut self, partition: u32) -> Option<usize> {
        if let Some(known) = self.leaders[partition as usize] {
            return Some(known);
        }
        let base = &self.bases[self.ask % self.bases.len()];
        let url = format!("{base}/topics/{}/partitions/{partition}", self.topic);
        let (status, text) = self.get(&url).await.ok()?;
        let described: serde_json::Value = serde_json::from_str(&text).ok()?;
        let leader = u32::try_from(described["leader"].as_u64()?).ok()?;
        let index = self
            .ids
            .iter()
            .find(|(id, _)| *id == leader)
            .map(|(_, i)| *i);
        let index = index.filter(|_| status == 200)?;
        self.leaders[partition as usize] = Some(index);
        Some(index)
    }

    /// A producer id from the cluster (`POST /producers`), asked of each broker in turn until
    /// one answers; None if the run stops first or the brokers have no such endpoint.
    async fn producer_id(&self) -> Option<i64> {
        for attempt in 0usize.. {
            if self.live.stop.load(Ordering::Acquire) {
                return None;
            }
            let url = format!("{}/producers", self.bases[attempt % self.bases.len()]);
            match self.post(&url, bytes::Bytes::from_static(b"{}")).await {
                Ok((200, text)) => {
                    let reply: serde_json::Value = serde_json::from_str(&text).ok()?;
                    return reply["producer_id"].as_i64();
                }
                Ok((404 | 405, _)) => return None,
                _ => actix_rt::time::sleep(FAILURE_BACKOFF).await,
            }
        }
        None
    }
}

/// Largest reply a producer reads (a produce reply has one entry per record).
const REPLY_BYTES_MAX: usize = 64 * 1024 * 1024;

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
