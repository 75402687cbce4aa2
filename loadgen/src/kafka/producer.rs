//! A producer over the Kafka protocol: idempotent (a producer id from InitProducerId, a sequence
//! per partition), acks=all, each request one batch for one partition sent to its leader, up to
//! `in_flight` requests pipelined. A request whose outcome is unknown or refused for a reason
//! that passes (a leader moved, a timeout, a connection lost) is resent with its batch
//! unchanged, in the order the requests were made, so the broker stores each batch once.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{anyhow, Result};
use bytes::{Bytes, BytesMut};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, InitProducerIdRequest, InitProducerIdResponse, ProduceRequest, ProduceResponse,
    ProducerId,
};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

use super::{topic_name, Client};
use crate::clients::{
    next_kafka_sequence, write_key, write_value, AckRun, Live, Plan, ProducerReport,
    FAILURE_BACKOFF, REQUEST_TIMEOUT,
};
use crate::scenario::ProducerSpec;
use crate::verify::Outcome;

/// One produce request: a batch for one partition, kept until it is answered.
struct Request {
    /// Order of creation: resends go in this order, which is each partition's sequence order.
    number: u64,
    partition: u32,
    first: u64,
    count: u32,
    batch: Bytes,
    /// The broker it was last sent to.
    node: i32,
    /// When it was first sent (publish latency counts its resends).
    sent: Instant,
}

/// How an answer ends a request.
enum Answer {
    Stored(u64),
    /// Not stored, or not known to be: resend it (idempotent) or give it up.
    Retry,
    /// Refused for good: give it up.
    Refused(i16),
}

struct Producer<'a> {
    plan: Plan,
    client: Client,
    topic: &'a str,
    live: &'a Live,
    start: Instant,
    report: ProducerReport,
    /// (producer id, epoch) when idempotent.
    id: Option<(i64, i16)>,
    sequences: Vec<i32>,
    in_flight: VecDeque<Request>,
    /// Failed requests to resend, by creation order.
    resend: BTreeMap<u64, Request>,
    made: u64,
    scratch: Vec<u8>,
    records: Vec<Record>,
    encoded: BytesMut,
}

pub(crate) fn produce(
    plan: Plan,
    spec: &ProducerSpec,
    bootstrap: &[String],
    topic: &str,
    partitions: u32,
    live: &Live,
    start: Instant,
) -> ProducerReport {
    let mut producer = Producer {
        plan,
        client: Client::new(bootstrap, topic, partitions),
        topic,
        live,
        start,
        report: ProducerReport::new(),
        id: None,
        sequences: vec![0; partitions as usize],
        in_flight: VecDeque::new(),
        resend: BTreeMap::new(),
        made: 0,
        scratch: Vec::new(),
        records: Vec::new(),
        encoded: BytesMut::new(),
    };
    if spec.idempotent {
        producer.id = producer.init_producer_id();
        if producer.id.is_none() && !live.stop.load(Ordering::Acquire) {
            eprintln!(
                "loadgen: producer {} got no producer id (InitProducerId); it publishes without idempotence",
                producer.plan.producer
            );
        }
    }
    producer.run(spec.in_flight);
    producer.report
}

impl Producer<'_> {
    fn run(&mut self, depth: usize) {
        loop {
            let stopping = self.live.stop.load(Ordering::Acquire);
            if stopping && self.in_flight.is_empty() {
                // Requests still to resend stay unanswered: the verifier counts any of them
                // found stored as stored-unacknowledged.
                break;
            }
            if !stopping && self.in_flight.is_empty() {
                if let Some((_, request)) = self.resend.pop_first() {
                    // One resend at a time, so a partition's batches arrive in sequence order.
                    self.dispatch(request);
                    continue;
                }
            }
            if !stopping && self.resend.is_empty() && self.in_flight.len() < depth {
                match self.plan.until_due() {
                    None => {
                        let request = self.make();
                        self.dispatch(request);
                        continue;
                    }
                    Some(wait) if self.in_flight.is_empty() => {
                        std::thread::sleep(wait);
                        continue;
                    }
                    Some(_) => {}
                }
            }
            if let Some(request) = self.in_flight.pop_front() {
                self.settle(request);
            }
        }
    }

    fn init_producer_id(&mut self) -> Option<(i64, i16)> {
        let request = InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(60_000)
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1);
        while !self.live.stop.load(Ordering::Acquire) {
            let answer = self.client.any_conn().and_then(|conn| {
                conn.call::<_, InitProducerIdResponse>(ApiKey::InitProducerId, &request)
            });
            match answer {
                Ok(a) if a.error_code == 0 => return Some((a.producer_id.0, a.producer_epoch)),
                Ok(_) => {}
                Err(_) => self.client.drop_all(),
            }
            std::thread::sleep(FAILURE_BACKOFF);
        }
        None
    }

    /// The next request's batch, encoded once: resends send these same bytes.
    fn make(&mut self) -> Request {
        let planned = self.plan.next();
        let partition = planned.partition;
        let batch = self.plan.batch;
        let (producer_id, epoch, base) = match self.id {
            Some((id, epoch)) => (id, epoch, self.sequences[partition as usize]),
            // Without a producer id the batch's base sequence is -1, as Kafka's is.
            None => (-1, -1, -1),
        };
        if self.id.is_some() {
            let next = &mut self.sequences[partition as usize];
            *next = next_kafka_sequence(*next, batch);
        }
        // Every key and value of the batch in one buffer; records hold slices of it.
        self.scratch.clear();
        let mut spans = Vec::with_capacity(batch);
        for i in 0..batch {
            let key_start = self.scratch.len();
            if let Some(key) = self.plan.key(partition) {
                write_key(&mut self.scratch, key);
            }
            let value_start = self.scratch.len();
            write_value(
                &mut self.scratch,
                self.plan.producer,
                planned.first + i as u64,
                planned.sent_unix_micros,
                self.plan.record_bytes,
            );
            spans.push((key_start, value_start, self.scratch.len()));
        }
        let bytes = Bytes::copy_from_slice(&self.scratch);
        let timestamp = (planned.sent_unix_micros / 1000) as i64;
        self.records.clear();
        self.records.extend(
            spans
                .iter()
                .enumerate()
                .map(|(i, &(key, value, end))| Record {
                    transactional: false,
                    control: false,
                    delete_horizon: false,
                    partition_leader_epoch: -1,
                    producer_id,
                    producer_epoch: epoch,
                    timestamp_type: TimestampType::Creation,
                    offset: i as i64,
                    // The encoder writes the first record's sequence as the base and starts a new
                    // batch wherever offset - sequence changes.
                    sequence: base.wrapping_add(i as i32),
                    timestamp,
                    key: (value > key).then(|| bytes.slice(key..value)),
                    value: Some(bytes.slice(value..end)),
                    headers: Default::default(),
                }),
        );
        let options = RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        };
        RecordBatchEncoder::encode(&mut self.encoded, self.records.iter(), &options)
            .expect("an uncompressed batch of in-memory records encodes");
        self.made += 1;
        Request {
            number: self.made,
            partition,
            first: planned.first,
            count: batch as u32,
            batch: self.encoded.split().freeze(),
            node: -1,
            sent: Instant::now(),
        }
    }

    /// Send `request` to its partition's leader; a request that cannot be sent counts as failed.
    fn dispatch(&mut self, mut request: Request) {
        let produce = ProduceRequest::default()
            .with_transactional_id(None)
            .with_acks(-1)
            .with_timeout_ms(REQUEST_TIMEOUT.as_millis() as i32)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(topic_name(self.topic))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(request.partition as i32)
                    .with_records(Some(request.batch.clone()))])]);
        let sent = self.leader(request.partition).and_then(|node| {
            request.node = node;
            self.client.conn(node)?.send(ApiKey::Produce, &produce)
        });
        match sent {
            Ok(()) => self.in_flight.push_back(request),
            Err(_) => {
                self.lose_conn(request.node);
                self.client.forget(request.partition);
                self.failed(request, Answer::Retry);
            }
        }
    }

    fn leader(&mut self, partition: u32) -> Result<i32> {
        if self.client.leader(partition).is_none() {
            self.client.refresh()?;
        }
        self.client
            .leader(partition)
            .ok_or_else(|| anyhow!("partition {partition} has no leader"))
    }

    /// Read the answer to `request`, the oldest in flight.
    fn settle(&mut self, request: Request) {
        let answer = self
            .client
            .conn(request.node)
            .and_then(|conn| conn.receive::<ProduceResponse>());
        let answer = match answer {
            Ok(answer) => match answer_for(&answer, self.topic, request.partition) {
                // A batch behind one of its partition's that failed is out of order until that
                // one is resent: resent after it, as Kafka's clients do.
                Answer::Refused(OUT_OF_ORDER_SEQUENCE_NUMBER)
                    if self.resend.values().any(|earlier| {
                        earlier.partition == request.partition && earlier.number < request.number
                    }) =>
                {
                    Answer::Retry
                }
                answer => answer,
            },
            Err(_) => {
                self.lose_conn(request.node);
                self.client.forget(request.partition);
                Answer::Retry
            }
        };
        match answer {
            Answer::Stored(offset) => {
                let at_ms = self.start.elapsed().as_millis() as u64;
                self.live
                    .acked
                    .fetch_add(u64::from(request.count), Ordering::Relaxed);
                self.report.acks.push(AckRun {
                    producer: self.plan.producer,
                    partition: request.partition,
                    first_sequence: request.first,
                    offset,
                    count: request.count,
                });
                self.report.outcomes.push(Outcome {
                    at_ms,
                    ok: true,
                    partition: Some(request.partition),
                });
                self.report.latencies.push((
                    at_ms,
                    request.sent.elapsed().as_micros() as u64,
                    request.count,
                ));
            }
            failure => {
                if matches!(failure, Answer::Retry) {
                    self.client.forget(request.partition);
                }
                self.failed(request, failure);
            }
        }
    }

    /// The connection to `node` failed, and with it every answer still owed on it: those
    /// requests failed too (their outcome is unknown). A new connection to `node` must not be
    /// read for their answers.
    fn lose_conn(&mut self, node: i32) {
        self.client.drop_conn(node);
        let (lost, kept): (VecDeque<Request>, VecDeque<Request>) =
            self.in_flight.drain(..).partition(|r| r.node == node);
        self.in_flight = kept;
        for request in lost {
            self.failed(request, Answer::Retry);
        }
    }

    fn failed(&mut self, request: Request, answer: Answer) {
        self.live.failed.fetch_add(1, Ordering::Relaxed);
        self.report.failed += 1;
        self.report.outcomes.push(Outcome {
            at_ms: self.start.elapsed().as_millis() as u64,
            ok: false,
            partition: Some(request.partition),
        });
        match answer {
            Answer::Retry if self.id.is_some() => {
                self.resend.insert(request.number, request);
            }
            Answer::Refused(code) if self.id.is_some() => {
                // The broker refused a batch for good, so the partition's later sequences can
                // never be stored: start over as a new producer, as Kafka's clients do.
                eprintln!(
                    "loadgen: producer {} partition {}: batch refused with error {code}; taking a new producer id",
                    self.plan.producer, request.partition
                );
                self.restart_idempotence();
            }
            _ => {}
        }
        std::thread::sleep(FAILURE_BACKOFF);
    }

    /// A new producer id and sequences from 0; whatever was still to resend is given up (the
    /// verifier counts any of it found stored as stored-unacknowledged).
    fn restart_idempotence(&mut self) {
        // Answers still owed concern the old id; wait them out first (they are not counted: a
        // batch stored among them is found as stored-unacknowledged).
        while let Some(request) = self.in_flight.pop_front() {
            let answer = self
                .client
                .conn(request.node)
                .and_then(|conn| conn.receive::<ProduceResponse>());
            if answer.is_err() {
                self.client.drop_conn(request.node);
                self.in_flight.retain(|r| r.node != request.node);
            }
        }
        self.resend.clear();
        self.sequences.iter_mut().for_each(|s| *s = 0);
        self.id = self.init_producer_id();
    }
}

const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;

/// What a produce answer says of `partition`'s batch.
fn answer_for(answer: &ProduceResponse, topic: &str, partition: u32) -> Answer {
    let found = answer
        .responses
        .iter()
        .filter(|t| t.name.0.as_str() == topic)
        .flat_map(|t| &t.partition_responses)
        .find(|p| p.index == partition as i32);
    let Some(found) = found else {
        return Answer::Retry;
    };
    match found.error_code {
        0 if found.base_offset >= 0 => Answer::Stored(found.base_offset as u64),
        0 => Answer::Retry,
        code => {
            if ResponseError::try_from_code(code).is_some_and(|e| e.is_retriable()) {
                Answer::Retry
            } else {
                Answer::Refused(code)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use kafka_protocol::messages::produce_response::{
        PartitionProduceResponse, TopicProduceResponse,
    };

    use super::*;

    fn answer(partition: i32, error_code: i16, base_offset: i64) -> ProduceResponse {
        ProduceResponse::default().with_responses(vec![TopicProduceResponse::default()
            .with_name(topic_name("t"))
            .with_partition_responses(vec![PartitionProduceResponse::default()
                .with_index(partition)
                .with_error_code(error_code)
                .with_base_offset(base_offset)])])
    }

    #[test]
    fn answers_store_retry_or_refuse() {
        assert!(matches!(
            answer_for(&answer(2, 0, 40), "t", 2),
            Answer::Stored(40)
        ));
        // Another partition's answer, or another topic's, says nothing of this batch.
        assert!(matches!(
            answer_for(&answer(1, 0, 40), "t", 2),
            Answer::Retry
        ));
        assert!(matches!(
            answer_for(&answer(2, 0, 40), "u", 2),
            Answer::Retry
        ));
        // NOT_LEADER_OR_FOLLOWER and REQUEST_TIMED_OUT pass; MESSAGE_TOO_LARGE does not.
        assert!(matches!(
            answer_for(&answer(2, 6, -1), "t", 2),
            Answer::Retry
        ));
        assert!(matches!(
            answer_for(&answer(2, 7, -1), "t", 2),
            Answer::Retry
        ));
        assert!(matches!(
            answer_for(&answer(2, 10, -1), "t", 2),
            Answer::Refused(10)
        ));
        assert!(matches!(
            answer_for(&answer(2, OUT_OF_ORDER_SEQUENCE_NUMBER, -1), "t", 2),
            Answer::Refused(OUT_OF_ORDER_SEQUENCE_NUMBER)
        ));
    }
}
