//! The producers and tailing consumers over the HTTP API. Request bodies are written straight
//! into a reused buffer and replies read into typed, borrowing structs: building and parsing
//! `serde_json::Value` trees per record took most of loadgen's CPU.

use std::cell::{Cell, RefCell};

use futures::channel::mpsc;
use futures::StreamExt as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    next_kafka_sequence, unix_micros, write_key, write_value, AckRun, ConsumerReport, Live, Plan,
    Planned, ProducerReport, FAILURE_BACKOFF, REQUEST_TIMEOUT,
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
                // No cap on connections (awc's default is 100): the lanes, one request each,
                // bound them, and a lane must not time out waiting for a connection.
                client: awc::Client::builder()
                    .connector(awc::Connector::new().limit(0))
                    .timeout(REQUEST_TIMEOUT)
                    .disable_redirects()
                    .finish(),
                bases,
                topic,
                live,
                ids: &ids,
                leaders: RefCell::new(vec![None; partitions as usize]),
                avoid: RefCell::new(vec![None; partitions as usize]),
                ask: Cell::new(plan.producer as usize),
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

/// One producer's connections and what it knows of the cluster.
struct Producer<'a> {
    client: awc::Client,
    bases: &'a [String],
    topic: &'a str,
    live: &'a Live,
    /// Broker id → index in `bases`.
    ids: &'a [(u32, usize)],
    /// Per partition, its leader's index in `bases`: requests go to the leader, as a Kafka
    /// client's do, since a follower forwards a produce to its leader and waits for it.
    leaders: RefCell<Vec<Option<usize>>>,
    /// Per partition, a broker its last request failed on: its word on who leads is not
    /// taken, and requests go through another broker (which forwards them) until one succeeds.
    avoid: RefCell<Vec<Option<usize>>>,
    /// Which broker to ask (or send to) next when no leader is known.
    ask: Cell<usize>,
}

/// What a producer's lanes share: its plan and its report.
struct Shared {
    plan: RefCell<Plan>,
    report: RefCell<ProducerReport>,
    idempotent: Option<i64>,
}

impl Producer<'_> {
    /// One lane per partition the producer writes to, each with one request in flight, so a
    /// partition whose leader hangs (paused, cut off) holds up only its own lane, as a Kafka
    /// producer's per-partition queue does; within a lane requests go in sequence order.
    async fn run(
        self,
        plan: Plan,
        spec: &ProducerSpec,
        partitions: u32,
        start: Instant,
    ) -> ProducerReport {
        let producer = plan.producer;
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
        let shared = Shared {
            plan: RefCell::new(plan),
            report: RefCell::new(ProducerReport::new()),
            idempotent,
        };
        let (freed_tx, freed_rx) = mpsc::unbounded();
        let mut lanes = Vec::new();
        let mut work = vec![None; partitions as usize];
        for partition in (0..partitions).filter(|&p| shared.plan.borrow().writes_to(p)) {
            let (tx, rx) = mpsc::unbounded();
            work[partition as usize] = Some(tx);
            lanes.push(self.lane(partition, rx, freed_tx.clone(), &shared, spec, start));
        }
        drop(freed_tx);
        futures::future::join(
            self.dispatch(&shared, work, freed_rx),
            futures::future::join_all(lanes),
        )
        .await;
        shared.report.into_inner()
    }

    /// Hand the producer's requests to its lanes: at the scenario's rate, in turn (a busy lane
    /// skipped), or flat out to every idle lane. Only this loop waits for the rate, and a lane
    /// wakes only for work, however many partitions there are.
    async fn dispatch(
        &self,
        shared: &Shared,
        mut work: Vec<Option<mpsc::UnboundedSender<Planned>>>,
        mut freed: mpsc::UnboundedReceiver<u32>,
    ) {
        let mut busy: Vec<bool> = work.iter().map(Option::is_none).collect();
        while !self.live.stop.load(Ordering::Acquire) {
            while let Ok(partition) = freed.try_recv() {
                busy[partition as usize] = false;
            }
            let wait = shared.plan.borrow().until_due();
            if let Some(wait) = wait {
                // Short naps, so a stop is seen soon at low rates too.
                actix_rt::time::sleep(wait.min(STOP_CHECK)).await;
                continue;
            }
            let turn = shared.plan.borrow().turn(&busy);
            match turn {
                Some(partition) => {
                    let request = shared.plan.borrow_mut().next_for(partition);
                    busy[partition as usize] = true;
                    if let Some(lane) = &work[partition as usize] {
                        let _ = lane.unbounded_send(request);
                    }
                }
                // Every lane has a request out: wait until one is answered.
                None => {
                    let next = futures::future::select(
                        freed.next(),
                        Box::pin(actix_rt::time::sleep(STOP_CHECK)),
                    )
                    .await;
                    if let futures::future::Either::Left((Some(partition), _)) = next {
                        busy[partition as usize] = false;
                    }
                }
            }
        }
        // Closing the lanes' queues ends them once their requests in hand are done.
        work.iter_mut().for_each(|lane| *lane = None);
    }

    /// One partition's lane: one request at a time, in sequence order, each resent until it is
    /// answered for sure.
    async fn lane(
        &self,
        partition: u32,
        mut work: mpsc::UnboundedReceiver<Planned>,
        freed: mpsc::UnboundedSender<u32>,
        shared: &Shared,
        spec: &ProducerSpec,
        start: Instant,
    ) {
        let producer = shared.plan.borrow().producer;
        let mut sequence = 0i32;
        let mut body = Vec::with_capacity(spec.batch * (spec.record_bytes + 24) + 128);
        while let Some(request) = work.next().await {
            if self.live.stop.load(Ordering::Acquire) {
                break;
            }
            let batch = spec.batch;
            body.clear();
            body.extend_from_slice(b"{\"records\":[");
            for i in 0..batch {
                if i > 0 {
                    body.push(b',');
                }
                body.push(b'{');
                if let Some(key) = shared.plan.borrow_mut().key(partition) {
                    body.extend_from_slice(b"\"key\":");
                    write_key(&mut body, key);
                    body.push(b',');
                }
                body.extend_from_slice(b"\"value\":");
                write_value(
                    &mut body,
                    producer,
                    request.first + i as u64,
                    request.sent_unix_micros,
                    spec.record_bytes,
                );
                body.push(b'}');
            }
            body.push(b']');
            if let Some(id) = shared.idempotent {
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
            // Whether a try of this request may have been stored without an answer saying so.
            let mut uncertain = false;
            loop {
                let to = self.target(partition).await;
                let url = format!(
                    "{}/topics/{}/partitions/{partition}",
                    self.bases[to], self.topic
                );
                let reply = self.post(&url, body.clone()).await;
                let acked = reply
                    .as_ref()
                    .ok()
                    .filter(|(status, _)| *status == 200)
                    .and_then(|(_, text)| ack_of(text, producer, request.first, batch));
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
                    let mut report = shared.report.borrow_mut();
                    report.acks.push(run);
                    report.outcomes.push(outcome(true));
                    report
                        .latencies
                        .push((at_ms, sent.elapsed().as_micros() as u64, run.count));
                    self.avoid.borrow_mut()[partition as usize] = None;
                    sequence = next_kafka_sequence(sequence, batch);
                    break;
                }
                self.live.failed.fetch_add(1, Ordering::Relaxed);
                {
                    let mut report = shared.report.borrow_mut();
                    report.failed += 1;
                    report.outcomes.push(outcome(false));
                }
                self.leaders.borrow_mut()[partition as usize] = None;
                self.avoid.borrow_mut()[partition as usize] = Some(to);
                self.ask.set(to + 1);
                actix_rt::time::sleep(FAILURE_BACKOFF).await;
                // Without a producer id its sequences are abandoned, never resent: a sequence
                // stored twice is then a real duplicate. With one, a request whose outcome may
                // be unknown is resent until answered (or the run ends with it unanswered). One
                // refused for good (a 4xx but 421/429) stored nothing, so its sequence is the
                // next request's, unless an earlier try's outcome was unknown: that try may
                // have stored it, and the next batch under the same sequence would then be
                // taken for its duplicate, so it is resent until an answer is sure.
                uncertain |= outcome_unknown(&reply);
                if shared.idempotent.is_none()
                    || !uncertain
                    || self.live.stop.load(Ordering::Acquire)
                {
                    break;
                }
            }
            let _ = freed.unbounded_send(partition);
        }
    }

    /// Where to send a request of `partition`: its leader if known, else the leader a broker
    /// names (not the one a request just failed on), else the next broker in turn.
    async fn target(&self, partition: u32) -> usize {
        let known = self.leaders.borrow()[partition as usize];
        if let Some(known) = known {
            return known;
        }
        let avoid = self.avoid.borrow()[partition as usize];
        let mut ask = self.ask.get() % self.bases.len();
        if Some(ask) == avoid && self.bases.len() > 1 {
            ask = (ask + 1) % self.bases.len();
        }
        self.ask.set(ask);
        match self.leader_named_by(ask, partition).await {
            Some(leader) if Some(leader) != avoid => {
                self.leaders.borrow_mut()[partition as usize] = Some(leader);
                leader
            }
            _ => ask,
        }
    }

    /// (status, body) of a POST; Err on a transport error or timeout.
    async fn post(&self, url: &str, body: bytes::Bytes) -> Result<(u16, String), ()> {
        let sent = self
            .client
            .post(url)
            .insert_header(("Content-Type", JSON_V2))
            .send_body(body);
        reply(sent).await
    }

    async fn get(&self, url: &str) -> Result<(u16, String), ()> {
        reply(self.client.get(url).send()).await
    }

    /// The leader of `partition` as the broker at `base` describes it (its index in `bases`).
    async fn leader_named_by(&self, base: usize, partition: u32) -> Option<usize> {
        let url = format!(
            "{}/topics/{}/partitions/{partition}",
            self.bases[base], self.topic
        );
        let (status, text) = self.get(&url).await.ok()?;
        if status != 200 {
            return None;
        }
        let described: serde_json::Value = serde_json::from_str(&text).ok()?;
        let leader = u32::try_from(described["leader"].as_u64()?).ok()?;
        self.ids
            .iter()
            .find(|(id, _)| *id == leader)
            .map(|(_, i)| *i)
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

/// Longest a producer's dispatcher sleeps before it looks at the stop flag again.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// (status, body) of a sent request. awc's timeout covers the wait for the headers; the body
/// read gets its own.
async fn reply(sent: awc::SendClientRequest) -> Result<(u16, String), ()> {
    let mut response = sent.await.map_err(|_| ())?.timeout(REQUEST_TIMEOUT);
    let status = response.status().as_u16();
    let body = response
        .body()
        .limit(REPLY_BYTES_MAX)
        .await
        .map_err(|_| ())?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Largest reply a producer reads (a produce reply has one entry per record).
const REPLY_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Whether a failed try may have stored its batch: no answer, a 5xx, a redirect or overload
/// answer, or a 200 without every offset. Any other 4xx refused it whole.
fn outcome_unknown(reply: &Result<(u16, String), ()>) -> bool {
    match reply {
        Ok((status, _)) => *status >= 500 || matches!(status, 200 | 307 | 421 | 429),
        Err(()) => true,
    }
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
                "{}/{partition}/records?max_records=10000&timeout_ms=100{from}",
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
    fn only_a_refusal_says_for_sure_that_nothing_was_stored() {
        for unknown in [Err(()), Ok((503, String::new())), Ok((200, "{}".into()))] {
            assert!(outcome_unknown(&unknown), "{unknown:?}");
        }
        for status in [421, 429, 307] {
            assert!(outcome_unknown(&Ok((status, String::new()))), "{status}");
        }
        for refused in [400, 404, 409, 413] {
            assert!(!outcome_unknown(&Ok((refused, String::new()))), "{refused}");
        }
    }

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
