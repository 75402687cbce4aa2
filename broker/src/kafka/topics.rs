//! Admin over the Kafka protocol: CreateTopics and DeleteTopics through the metadata group
//! (the same commands as `POST /topics` and `DELETE /topics/{topic}`), and InitProducerId,
//! which hands an idempotent producer a new id at epoch 0 (as Kafka does for producers without
//! a transactional id, whatever id they had).

use std::collections::BTreeMap;

use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::{
    CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
    InitProducerIdRequest, InitProducerIdResponse, ProducerId, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use pubg1_actors::error::TopicError;
use pubg1_actors::metadata::{CreateTopic, DeleteTopic, InitProducerId};
use pubg1_actors::topic::validate_name;

use super::errors::topic_error;
use super::Context;

pub async fn init_producer_id(
    context: &Context,
    request: InitProducerIdRequest,
) -> InitProducerIdResponse {
    let response = InitProducerIdResponse::default()
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    if request.transactional_id.is_some() {
        return response.with_error_code(ResponseError::TransactionalIdAuthorizationFailed.code());
    }
    match context.broker.metadata.send(InitProducerId).await {
        Ok(Ok(id)) => response
            .with_producer_id(ProducerId(id))
            .with_producer_epoch(0),
        Ok(Err(e)) => response.with_error_code(topic_error(&e).code()),
        Err(_) => response.with_error_code(ResponseError::CoordinatorNotAvailable.code()),
    }
}

pub async fn create(
    context: &Context,
    request: CreateTopicsRequest,
    version: i16,
) -> CreateTopicsResponse {
    let brokers = u16::try_from(context.broker.cluster.brokers.len().max(1)).unwrap_or(u16::MAX);
    let mut results = Vec::new();
    for topic in request.topics {
        let name = topic.name.0.to_string();
        let result = CreatableTopicResult::default().with_name(topic.name.clone());
        let fail = |error: ResponseError, message: String| {
            result
                .clone()
                .with_error_code(error.code())
                .with_error_message(Some(StrBytes::from_string(message)))
        };
        if !topic.assignments.is_empty() {
            results.push(fail(
                ResponseError::InvalidReplicaAssignment,
                "replica assignments are chosen by the cluster".into(),
            ));
            continue;
        }
        let partitions = match topic.num_partitions {
            -1 => context.config.default_partitions,
            n => match u32::try_from(n) {
                Ok(n) if n > 0 => n,
                _ => {
                    results.push(fail(
                        ResponseError::InvalidPartitions,
                        format!("{n} partitions"),
                    ));
                    continue;
                }
            },
        };
        let replication_factor = match topic.replication_factor {
            -1 => context.config.default_replication_factor.min(brokers),
            n => match u16::try_from(n) {
                Ok(n) if n > 0 => n,
                _ => {
                    results.push(fail(
                        ResponseError::InvalidReplicationFactor,
                        format!("replication factor {n}"),
                    ));
                    continue;
                }
            },
        };
        let configs: BTreeMap<String, String> = topic
            .configs
            .iter()
            .filter_map(|c| Some((c.name.to_string(), c.value.as_ref()?.to_string())))
            .collect();
        if request.validate_only {
            let checked = validate_name(&name)
                .and_then(|()| pubg1_actors::topic::TopicConfigs::from_kafka(&configs).map(|_| ()));
            results.push(match checked {
                // Sizes came with v5.
                Ok(()) if version >= 5 => result
                    .with_num_partitions(partitions as i32)
                    .with_replication_factor(replication_factor as i16),
                Ok(()) => result,
                Err(e) => fail(topic_error(&e), e.to_string()),
            });
            continue;
        }
        let create = CreateTopic {
            name,
            partitions,
            replication_factor,
            configs,
        };
        results.push(match context.broker.metadata.send(create).await {
            // Sizes came with v5, topic ids with v7 (beyond what is served).
            Ok(Ok(meta)) if version >= 5 => result
                .with_num_partitions(meta.partitions as i32)
                .with_replication_factor(meta.replication_factor as i16),
            Ok(Ok(_)) => result,
            Ok(Err(e)) => fail(topic_error(&e), e.to_string()),
            Err(_) => fail(
                ResponseError::RequestTimedOut,
                "the metadata actor is restarting; retry".into(),
            ),
        });
    }
    CreateTopicsResponse::default().with_topics(results)
}

pub async fn delete(
    context: &Context,
    request: DeleteTopicsRequest,
    version: i16,
) -> DeleteTopicsResponse {
    // v0–5 name topics in `topic_names`, v6 in `topics`.
    let names: Vec<TopicName> = request
        .topic_names
        .into_iter()
        .chain(request.topics.into_iter().filter_map(|t| t.name))
        .collect();
    let mut results = Vec::new();
    for name in names {
        let result = DeletableTopicResult::default().with_name(Some(name.clone()));
        let deleted = context
            .broker
            .metadata
            .send(DeleteTopic {
                name: name.0.to_string(),
            })
            .await;
        results.push(match deleted {
            Ok(Ok(())) => result,
            // Error messages came with v5.
            Ok(Err(e)) if version >= 5 => result
                .with_error_code(topic_error(&e).code())
                .with_error_message(Some(StrBytes::from_string(e.to_string()))),
            Ok(Err(e)) => result.with_error_code(topic_error(&e).code()),
            Err(_) => result.with_error_code(topic_error(&TopicError::ShuttingDown).code()),
        });
    }
    DeleteTopicsResponse::default().with_responses(results)
}

/// Kafka's resource type of a topic in DescribeConfigs.
const TOPIC_RESOURCE: i8 = 2;
/// Config source: a topic's own setting, or the broker's default (Kafka's DescribeConfigs).
const TOPIC_CONFIG: i8 = 1;

/// A topic's configs (`retention.ms`, `retention.bytes`, as `POST /topics` takes them); other
/// resource types (brokers, groups) are not described.
pub fn describe_configs(
    context: &Context,
    request: kafka_protocol::messages::DescribeConfigsRequest,
) -> kafka_protocol::messages::DescribeConfigsResponse {
    use kafka_protocol::messages::describe_configs_response::{
        DescribeConfigsResourceResult, DescribeConfigsResult,
    };
    let results = request
        .resources
        .into_iter()
        .map(|resource| {
            let result = DescribeConfigsResult::default()
                .with_resource_type(resource.resource_type)
                .with_resource_name(resource.resource_name.clone());
            if resource.resource_type != TOPIC_RESOURCE {
                return result
                    .with_error_code(ResponseError::InvalidRequest.code())
                    .with_error_message(Some(StrBytes::from_static_str(
                        "only topic configs are described",
                    )));
            }
            let Some(handle) = context.broker.registry.get(resource.resource_name.as_str()) else {
                return result.with_error_code(ResponseError::UnknownTopicOrPartition.code());
            };
            let wanted: Option<Vec<String>> = resource
                .configuration_keys
                .map(|keys| keys.iter().map(|k| k.to_string()).collect());
            let configs = handle
                .meta
                .configs
                .to_kafka()
                .into_iter()
                .filter(|(name, _)| wanted.as_ref().is_none_or(|w| w.contains(name)))
                .map(|(name, value)| {
                    DescribeConfigsResourceResult::default()
                        .with_name(StrBytes::from_string(name))
                        .with_value(Some(StrBytes::from_string(value)))
                        .with_read_only(true)
                        .with_config_source(TOPIC_CONFIG)
                })
                .collect();
            result.with_configs(configs)
        })
        .collect();
    kafka_protocol::messages::DescribeConfigsResponse::default().with_results(results)
}

/// The cluster: its id, the metadata group's leader as controller, every broker's Kafka
/// address.
/// (The endpoint type, v1, stays at its default: brokers.)
pub fn describe_cluster(context: &Context) -> kafka_protocol::messages::DescribeClusterResponse {
    use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
    let brokers = super::metadata::brokers(context)
        .into_iter()
        .map(|b| {
            DescribeClusterBroker::default()
                .with_broker_id(b.node_id)
                .with_host(b.host)
                .with_port(b.port)
        })
        .collect();
    kafka_protocol::messages::DescribeClusterResponse::default()
        .with_cluster_id(StrBytes::from_static_str(super::metadata::CLUSTER_ID))
        .with_controller_id(kafka_protocol::messages::BrokerId(
            i32::try_from(context.broker.cluster.metadata_leader()).unwrap_or(-1),
        ))
        .with_brokers(brokers)
}
