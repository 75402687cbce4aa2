//! ListOffsets: earliest (-2), latest (-1), the record with the largest timestamp (-3, v7) and
//! the first record at or after a timestamp, answered by the partition's leader (a follower's
//! end may lag).

use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::{ListOffsetsRequest, ListOffsetsResponse};
use kafka_protocol::ResponseError;
use pubg1_actors::log_reader::{offset_for_timestamp, offset_of_max_timestamp};

use super::errors::partition_error;
use super::Context;

const LATEST: i64 = -1;
const EARLIEST: i64 = -2;
const MAX_TIMESTAMP: i64 = -3;

pub async fn handle(
    context: &Context,
    request: ListOffsetsRequest,
    version: i16,
) -> ListOffsetsResponse {
    let storage = &context.broker.storage;
    let mut topics = Vec::new();
    for topic in request.topics {
        let handle = context.broker.registry.get(topic.name.0.as_str());
        let mut partitions = Vec::new();
        for asked in topic.partitions {
            let answer = ListOffsetsPartitionResponse::default()
                .with_partition_index(asked.partition_index)
                .with_timestamp(-1)
                .with_offset(-1);
            let shared = handle.as_ref().and_then(|h| {
                u32::try_from(asked.partition_index)
                    .ok()
                    .and_then(|p| h.partition(p))
            });
            let Some(shared) = shared else {
                partitions
                    .push(answer.with_error_code(ResponseError::UnknownTopicOrPartition.code()));
                continue;
            };
            // A leader just elected may not have applied what an earlier one committed: its
            // end would be stale. Clients retry NOT_LEADER_OR_FOLLOWER after a metadata refresh.
            if !shared.is_led_here_caught_up() {
                partitions.push(answer.with_error_code(ResponseError::NotLeaderOrFollower.code()));
                continue;
            }
            // Leader epochs came with v4.
            let epoch = if version >= 4 {
                i32::try_from(shared.leadership().0).unwrap_or(i32::MAX)
            } else {
                -1
            };
            let found = match asked.timestamp {
                LATEST => Ok(Some((shared.high_watermark(), -1))),
                EARLIEST => Ok(Some((shared.log_start_offset(), -1))),
                MAX_TIMESTAMP => offset_of_max_timestamp(storage, shared).await,
                ts if ts >= 0 => offset_for_timestamp(storage, shared, ts).await,
                _ => {
                    partitions.push(answer.with_error_code(ResponseError::InvalidRequest.code()));
                    continue;
                }
            };
            partitions.push(match found {
                Ok(Some((offset, timestamp))) => answer
                    .with_offset(offset as i64)
                    .with_timestamp(timestamp)
                    .with_leader_epoch(epoch),
                // No record that late: Kafka answers offset -1.
                Ok(None) => answer.with_leader_epoch(epoch),
                Err(e) => answer.with_error_code(partition_error(&e).code()),
            });
        }
        topics.push(
            ListOffsetsTopicResponse::default()
                .with_name(topic.name)
                .with_partitions(partitions),
        );
    }
    ListOffsetsResponse::default().with_topics(topics)
}
