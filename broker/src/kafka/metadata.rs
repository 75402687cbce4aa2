//! Metadata: every broker with its advertised Kafka address, and each topic's partitions with
//! their current Raft leader and term (the leader epoch). A topic a client asks about that does
//! not exist is created when `auto_create_topics` is on and the client allows it (Kafka's
//! `auto.create.topics.enable`), and reported as LEADER_NOT_AVAILABLE until its first leaders
//! are elected, as Kafka does.

use std::collections::BTreeMap;

use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{BrokerId, MetadataRequest, MetadataResponse, TopicName};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use pubg1_actors::metadata::CreateTopic;
use pubg1_actors::registry::TopicHandle;

use super::{split_host_port, Context};

/// The cluster id clients see (PubG1 has one cluster per seed list; the name is what matters
/// to tools that print it).
pub const CLUSTER_ID: &str = "pubg1";

pub async fn handle(context: &Context, request: MetadataRequest, version: i16) -> MetadataResponse {
    let registry = &context.broker.registry;
    // v0: an empty list means every topic; v1+: null means every topic.
    let wanted: Option<Vec<String>> = match request.topics {
        None => None,
        Some(topics) if topics.is_empty() && version == 0 => None,
        Some(topics) => Some(
            topics
                .into_iter()
                .filter_map(|t| t.name.map(|n| n.0.to_string()))
                .collect(),
        ),
    };
    let allow_create = version < 4 || request.allow_auto_topic_creation;
    let mut topics = Vec::new();
    match wanted {
        None => {
            for handle in registry.list() {
                topics.push(describe(&handle, version));
            }
        }
        Some(names) => {
            for name in names {
                match registry.get(&name) {
                    Some(handle) => topics.push(describe(&handle, version)),
                    None => topics.push(missing(context, &name, allow_create).await),
                }
            }
        }
    }
    // Fields a version lacks stay at their defaults (the codec refuses to encode them).
    let mut response = MetadataResponse::default()
        .with_brokers(brokers(context))
        .with_topics(topics);
    if version >= 1 {
        response.controller_id =
            BrokerId(i32::try_from(context.broker.cluster.metadata_leader()).unwrap_or(-1));
    }
    if version >= 2 {
        response.cluster_id = Some(StrBytes::from_static_str(CLUSTER_ID));
    }
    response
}

/// Every broker whose Kafka address is known (learned from peer handshakes).
pub fn brokers(context: &Context) -> Vec<MetadataResponseBroker> {
    let cluster = &context.broker.cluster;
    let mut found = BTreeMap::new();
    for id in cluster.brokers.iter() {
        let Some((host, port)) = cluster.kafka_of(*id).and_then(|a| split_host_port(&a)) else {
            continue;
        };
        found.insert(*id, (host, port));
    }
    found
        .into_iter()
        .map(|(id, (host, port))| {
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(i32::try_from(id).unwrap_or(-1)))
                .with_host(StrBytes::from_string(host))
                .with_port(port)
        })
        .collect()
}

fn describe(handle: &TopicHandle, version: i16) -> MetadataResponseTopic {
    let partitions = handle
        .partitions
        .iter()
        .map(|shared| {
            let (term, leader) = shared.leadership();
            let replicas: Vec<BrokerId> = shared
                .replicas
                .iter()
                .map(|id| BrokerId(*id as i32))
                .collect();
            let in_sync = shared
                .in_sync()
                .map(|ids| ids.iter().map(|id| BrokerId(*id as i32)).collect())
                .unwrap_or_else(|| replicas.clone());
            let error = if leader == 0 {
                ResponseError::LeaderNotAvailable.code()
            } else {
                0
            };
            let answer = MetadataResponsePartition::default()
                .with_error_code(error)
                .with_partition_index(shared.partition as i32)
                .with_leader_id(BrokerId(if leader == 0 { -1 } else { leader as i32 }))
                .with_replica_nodes(replicas)
                .with_isr_nodes(in_sync);
            if version >= 7 {
                answer.with_leader_epoch(i32::try_from(term).unwrap_or(i32::MAX))
            } else {
                answer
            }
        })
        .collect();
    let topic = MetadataResponseTopic::default()
        .with_name(Some(TopicName(StrBytes::from_string(
            handle.meta.name.clone(),
        ))))
        .with_partitions(partitions);
    if version >= 10 {
        topic.with_topic_id(topic_uuid(handle.meta.topic_id))
    } else {
        topic
    }
}

/// A topic id as the UUID Kafka clients expect: the catalog's id, never reused, in the low
/// bits (never the all-zero UUID, which means "none": topic ids start at 1).
pub fn topic_uuid(topic_id: u32) -> uuid::Uuid {
    uuid::Uuid::from_u64_pair(0x7075_6267_3100_0000, u64::from(topic_id))
}

async fn missing(context: &Context, name: &str, allow_create: bool) -> MetadataResponseTopic {
    let topic = MetadataResponseTopic::default()
        .with_name(Some(TopicName(StrBytes::from_string(name.to_owned()))));
    if !(allow_create && context.config.auto_create_topics) {
        return topic.with_error_code(ResponseError::UnknownTopicOrPartition.code());
    }
    let brokers = context.broker.cluster.brokers.len().max(1);
    let create = CreateTopic {
        name: name.to_owned(),
        partitions: context.config.default_partitions,
        replication_factor: context
            .config
            .default_replication_factor
            .min(u16::try_from(brokers).unwrap_or(u16::MAX)),
        configs: BTreeMap::new(),
    };
    let created = context.broker.metadata.send(create).await;
    let code = match created {
        // Created (or created by someone else meanwhile): its leaders are being elected.
        Ok(Ok(_)) | Ok(Err(pubg1_actors::error::TopicError::AlreadyExists(_))) => {
            ResponseError::LeaderNotAvailable.code()
        }
        Ok(Err(pubg1_actors::error::TopicError::InvalidName { .. })) => {
            ResponseError::InvalidTopicException.code()
        }
        Ok(Err(e)) => super::errors::topic_error(&e).code(),
        Err(_) => ResponseError::LeaderNotAvailable.code(),
    };
    topic.with_error_code(code)
}
