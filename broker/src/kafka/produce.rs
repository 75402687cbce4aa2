//! Produce: each partition's batches go to its replica as the client encoded them (compressed
//! or not, idempotent or not); the partition sets the base offset and leader epoch at apply,
//! outside the CRC, and checks an idempotent producer's sequence there.
//!
//! acks: `-1` (all) and `1` are answered once the batch is committed by a quorum and applied,
//! the only guarantee PubG1 gives, so acks=1 is never weaker than acks=all here; `0` is not
//! answered at all (Kafka's rule), the batch still goes through the same path.

use std::collections::BTreeMap;

use futures::future::join_all;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use pubg1_actors::batch::{check_client_batch, ClientBatchError};

use super::errors::partition_error;
use super::Context;

/// What a produce request gets back.
pub enum Produced {
    Answer(ProduceResponse),
    /// acks=0: no answer is due.
    Nothing,
    /// acks=0 and a partition refused its batch: Kafka closes the connection then, the only
    /// way such a producer learns of it (it refreshes metadata and reconnects).
    Refused(String),
}

pub async fn handle(context: &Context, request: ProduceRequest, version: i16) -> Produced {
    let acks = request.acks;
    let refuse_all = if !matches!(acks, -1..=1) {
        Some((
            ResponseError::InvalidRequiredAcks,
            "acks must be -1, 0 or 1",
        ))
    } else if request.transactional_id.is_some() {
        Some((
            ResponseError::TransactionalIdAuthorizationFailed,
            "transactions are not supported; idempotent producers are",
        ))
    } else {
        None
    };
    let mut work = Vec::new();
    for topic in request.topic_data {
        let name = topic.name.0.to_string();
        let handle = context.broker.registry.get(&name);
        for data in topic.partition_data {
            let handle = handle.clone();
            let name = name.clone();
            work.push(async move {
                let index = data.index;
                let answer = PartitionProduceResponse::default().with_index(index);
                let fail = |error: ResponseError, message: Option<String>| {
                    let failed = answer
                        .clone()
                        .with_error_code(error.code())
                        .with_base_offset(-1);
                    // Error messages came with v8.
                    if version >= 8 {
                        failed.with_error_message(message.map(StrBytes::from_string))
                    } else {
                        failed
                    }
                };
                if let Some((error, why)) = refuse_all {
                    return (name, fail(error, Some(why.to_owned())));
                }
                let Some(shared) = handle
                    .as_ref()
                    .and_then(|h| u32::try_from(index).ok().and_then(|p| h.partition(p)))
                    .cloned()
                else {
                    return (name, fail(ResponseError::UnknownTopicOrPartition, None));
                };
                // Kafka clients send to the leader they were told; another replica would only
                // forward, and could not tell them where the leader is.
                if !shared.hosted || !shared.is_led_here() {
                    return (name, fail(ResponseError::NotLeaderOrFollower, None));
                }
                let Some(records) = data.records else {
                    return (
                        name,
                        fail(ResponseError::CorruptMessage, Some("no records".into())),
                    );
                };
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                let batch = match check_client_batch(&records, now) {
                    Ok(batch) => batch,
                    Err(ClientBatchError::Corrupt(why)) => {
                        return (name, fail(ResponseError::CorruptMessage, Some(why)))
                    }
                    Err(ClientBatchError::Invalid(why)) => {
                        return (name, fail(ResponseError::InvalidRecord, Some(why)))
                    }
                    Err(ClientBatchError::Timestamp(why)) => {
                        return (name, fail(ResponseError::InvalidTimestamp, Some(why)))
                    }
                    Err(ClientBatchError::Transactional) => {
                        return (
                            name,
                            fail(
                                ResponseError::TransactionalIdAuthorizationFailed,
                                Some("transactional batches are not supported".into()),
                            ),
                        )
                    }
                };
                let base_offset = match shared.append_encoded(batch).await {
                    Ok(appended) => Some(appended.base_offset as i64),
                    Err(e) => return (name, fail(partition_error(&e), Some(e.to_string()))),
                };
                let mut answer = answer
                    .with_base_offset(base_offset.unwrap_or(-1))
                    .with_log_append_time_ms(-1);
                if version >= 5 {
                    answer.log_start_offset = shared.log_start_offset() as i64;
                }
                (name, answer)
            });
        }
    }
    let answers = join_all(work).await;
    if acks == 0 {
        return match answers.iter().find(|(_, a)| a.error_code != 0) {
            Some((topic, a)) => {
                Produced::Refused(format!("{topic}/{}: error {}", a.index, a.error_code))
            }
            None => Produced::Nothing,
        };
    }
    let mut by_topic: BTreeMap<String, Vec<PartitionProduceResponse>> = BTreeMap::new();
    for (topic, answer) in answers {
        by_topic.entry(topic).or_default().push(answer);
    }
    let responses = by_topic
        .into_iter()
        .map(|(name, partitions)| {
            TopicProduceResponse::default()
                .with_name(kafka_protocol::messages::TopicName(StrBytes::from_string(
                    name,
                )))
                .with_partition_responses(partitions)
        })
        .collect();
    Produced::Answer(ProduceResponse::default().with_responses(responses))
}
