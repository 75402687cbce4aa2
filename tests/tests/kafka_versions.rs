//! Every API the listener advertises, at every version it advertises, answered on one
//! connection with a real request (a topic, a group, records): each answer decodes as the
//! version asked for, and the connection stays open. A field a version lacks is refused by the
//! codec when set, and the listener closes the connection then: this finds such fields on
//! every path these requests take.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

use pubg1_tests::cluster::TestCluster;

fn name(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_owned())
}

fn batch(value: &str) -> Bytes {
    let record = Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: 0,
        sequence: -1,
        timestamp: 1_796_000_000_000,
        key: None,
        value: Some(Bytes::from(value.to_owned())),
        headers: Default::default(),
    };
    let mut buf = BytesMut::new();
    let options = RecordEncodeOptions {
        version: 2,
        compression: Compression::None,
    };
    RecordBatchEncoder::encode(&mut buf, [record].iter(), &options).expect("encode a batch");
    buf.freeze()
}

/// A real request of `api` for the topic "v" and the group "g".
fn request(api: ApiKey, version: i16) -> Option<RequestKind> {
    let topic = TopicName(name("v"));
    Some(match api {
        ApiKey::ApiVersions => RequestKind::ApiVersions(
            ApiVersionsRequest::default()
                .with_client_software_name(name("pubg1-test"))
                .with_client_software_version(name("1")),
        ),
        ApiKey::Metadata => {
            RequestKind::Metadata(MetadataRequest::default().with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(topic)),
            ])))
        }
        ApiKey::Produce => RequestKind::Produce(
            ProduceRequest::default()
                .with_acks(-1)
                .with_timeout_ms(5000)
                .with_topic_data(vec![TopicProduceData::default()
                    .with_name(topic)
                    .with_partition_data(vec![
                        PartitionProduceData::default()
                            .with_index(0)
                            .with_records(Some(batch(&format!("v{version}")))),
                        // A partition that does not exist: the error path.
                        PartitionProduceData::default()
                            .with_index(7)
                            .with_records(Some(batch("x"))),
                    ])]),
        ),
        ApiKey::Fetch => RequestKind::Fetch(
            FetchRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_max_wait_ms(0)
                .with_max_bytes(1 << 20)
                .with_topics(vec![FetchTopic::default()
                    .with_topic(topic)
                    .with_partitions(vec![
                        FetchPartition::default()
                            .with_partition(0)
                            .with_fetch_offset(0)
                            .with_partition_max_bytes(1 << 20),
                        FetchPartition::default()
                            .with_partition(0)
                            .with_fetch_offset(1 << 40)
                            .with_partition_max_bytes(1 << 20),
                    ])]),
        ),
        ApiKey::ListOffsets => RequestKind::ListOffsets(
            ListOffsetsRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_topics(vec![ListOffsetsTopic::default()
                    .with_name(topic)
                    .with_partitions(
                        [-1, -2, 0, if version >= 7 { -3 } else { -1 }]
                            .into_iter()
                            .map(|ts| {
                                ListOffsetsPartition::default()
                                    .with_partition_index(0)
                                    .with_timestamp(ts)
                            })
                            .collect(),
                    )]),
        ),
        ApiKey::CreateTopics => RequestKind::CreateTopics(
            CreateTopicsRequest::default()
                .with_timeout_ms(5000)
                .with_topics(vec![
                    CreatableTopic::default()
                        .with_name(TopicName(name(&format!("made-{version}"))))
                        .with_num_partitions(1)
                        .with_replication_factor(1),
                    // Exists already: the error path.
                    CreatableTopic::default()
                        .with_name(topic)
                        .with_num_partitions(1)
                        .with_replication_factor(1),
                ]),
        ),
        ApiKey::DeleteTopics => {
            let gone = TopicName(name("never-there"));
            let request = DeleteTopicsRequest::default().with_timeout_ms(5000);
            RequestKind::DeleteTopics(if version >= 6 {
                request.with_topics(vec![
                    delete_topics_request::DeleteTopicState::default().with_name(Some(gone))
                ])
            } else {
                request.with_topic_names(vec![gone])
            })
        }
        ApiKey::InitProducerId => RequestKind::InitProducerId(
            InitProducerIdRequest::default().with_transaction_timeout_ms(60_000),
        ),
        ApiKey::FindCoordinator => {
            let request = FindCoordinatorRequest::default();
            RequestKind::FindCoordinator(if version >= 4 {
                request.with_coordinator_keys(vec![name("g")])
            } else {
                request.with_key(name("g"))
            })
        }
        ApiKey::JoinGroup => RequestKind::JoinGroup(
            JoinGroupRequest::default()
                .with_group_id(GroupId(name("g")))
                // Each version's join is a new member; short timeouts keep the rebalances
                // that wait for the earlier ones short.
                .with_session_timeout_ms(1_000)
                .with_rebalance_timeout_ms(1_000)
                .with_protocol_type(name("consumer"))
                .with_protocols(vec![JoinGroupRequestProtocol::default()
                    .with_name(name("range"))
                    .with_metadata(Bytes::from_static(b"m"))]),
        ),
        ApiKey::SyncGroup => RequestKind::SyncGroup(
            SyncGroupRequest::default()
                .with_group_id(GroupId(name("g")))
                .with_member_id(name("nobody"))
                .with_generation_id(1),
        ),
        ApiKey::Heartbeat => RequestKind::Heartbeat(
            HeartbeatRequest::default()
                .with_group_id(GroupId(name("g")))
                .with_member_id(name("nobody"))
                .with_generation_id(1),
        ),
        ApiKey::LeaveGroup => {
            let request = LeaveGroupRequest::default().with_group_id(GroupId(name("g")));
            RequestKind::LeaveGroup(if version >= 3 {
                request
                    .with_members(vec![leave_group_request::MemberIdentity::default()
                        .with_member_id(name("nobody"))])
            } else {
                request.with_member_id(name("nobody"))
            })
        }
        ApiKey::OffsetCommit => RequestKind::OffsetCommit(
            OffsetCommitRequest::default()
                .with_group_id(GroupId(name("g")))
                .with_generation_id_or_member_epoch(-1)
                .with_topics(vec![OffsetCommitRequestTopic::default()
                    .with_name(topic)
                    .with_partitions(vec![OffsetCommitRequestPartition::default()
                        .with_partition_index(0)
                        .with_committed_offset(1)])]),
        ),
        ApiKey::OffsetFetch => RequestKind::OffsetFetch(
            OffsetFetchRequest::default()
                .with_group_id(GroupId(name("g")))
                .with_topics(Some(vec![OffsetFetchRequestTopic::default()
                    .with_name(topic)
                    .with_partition_indexes(vec![0, 1])])),
        ),
        ApiKey::ListGroups => RequestKind::ListGroups(ListGroupsRequest::default()),
        ApiKey::DescribeGroups => RequestKind::DescribeGroups(
            DescribeGroupsRequest::default().with_groups(vec![GroupId(name("g"))]),
        ),
        ApiKey::DescribeConfigs => {
            RequestKind::DescribeConfigs(DescribeConfigsRequest::default().with_resources(vec![
                DescribeConfigsResource::default()
                    .with_resource_type(2)
                    .with_resource_name(name("v")),
            ]))
        }
        ApiKey::DescribeCluster => RequestKind::DescribeCluster(DescribeClusterRequest::default()),
        _ => return None,
    })
}

/// Write `request` as a framed request of `api` at `version`.
fn write(
    stream: &mut TcpStream,
    api: ApiKey,
    version: i16,
    correlation: i32,
    request: &RequestKind,
) -> Result<()> {
    let mut body = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(api as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation)
        .with_client_id(Some(name("versions-test")))
        .encode(&mut body, api.request_header_version(version))?;
    request.encode(&mut body, version)?;
    stream.write_all(&(body.len() as i32).to_be_bytes())?;
    stream.write_all(&body)?;
    Ok(())
}

/// Read one answer frame.
fn read(stream: &mut TcpStream) -> Result<Bytes> {
    let mut length = [0u8; 4];
    stream.read_exact(&mut length)?;
    let mut answer = vec![0u8; i32::from_be_bytes(length) as usize];
    stream.read_exact(&mut answer)?;
    Ok(Bytes::from(answer))
}

/// Send this test's request of `api` at `version` and read the answer.
fn send(stream: &mut TcpStream, api: ApiKey, version: i16, correlation: i32) -> Result<Bytes> {
    let request = request(api, version).ok_or_else(|| anyhow!("no request for {api:?}"))?;
    write(stream, api, version, correlation, &request)?;
    read(stream)
}

#[test]
fn every_advertised_api_and_version_answers_and_decodes() -> Result<()> {
    let cluster = TestCluster::start_with_kafka(1)?;
    cluster.create_replicated_with_factor("v", 1, 1)?;
    let address = cluster
        .broker(1)
        .kafka
        .ok_or_else(|| anyhow!("no Kafka listener"))?;
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    // What the broker advertises.
    let answer = send(&mut stream, ApiKey::ApiVersions, 3, 1)?;
    let mut buf = answer;
    let header = ResponseHeader::decode(&mut buf, ApiKey::ApiVersions.response_header_version(3))?;
    assert_eq!(header.correlation_id, 1);
    let versions = ApiVersionsResponse::decode(&mut buf, 3)?;
    assert_eq!(versions.error_code, 0);
    let advertised: Vec<ApiVersion> = versions.api_keys;
    assert_eq!(advertised.len(), 19, "{advertised:?}");
    let mut correlation = 2;
    let mut answered = 0;
    for api in &advertised {
        let key = ApiKey::try_from(api.api_key).map_err(|()| anyhow!("{}", api.api_key))?;
        for version in api.min_version..=api.max_version {
            correlation += 1;
            let answer = send(&mut stream, key, version, correlation).map_err(|e| {
                anyhow!("{key:?} v{version}: no answer ({e}): the connection closed")
            })?;
            let mut buf = answer;
            let header = ResponseHeader::decode(&mut buf, key.response_header_version(version))?;
            if header.correlation_id != correlation {
                bail!("{key:?} v{version}: answered as {}", header.correlation_id);
            }
            ResponseKind::decode(key, &mut buf, version)
                .map_err(|e| anyhow!("{key:?} v{version}: the answer does not decode: {e}"))?;
            answered += 1;
        }
    }
    assert!(answered > 100, "{answered} requests answered");

    // Asking about a group does not make it exist: a group nobody joined is "Dead", and the
    // HTTP API does not know it afterwards either.
    let describe = RequestKind::DescribeGroups(
        DescribeGroupsRequest::default().with_groups(vec![GroupId(name("ghost"))]),
    );
    write(&mut stream, ApiKey::DescribeGroups, 5, 9_999, &describe)?;
    let mut buf = read(&mut stream)?;
    ResponseHeader::decode(&mut buf, ApiKey::DescribeGroups.response_header_version(5))?;
    let described = DescribeGroupsResponse::decode(&mut buf, 5)?;
    assert_eq!(described.groups[0].group_state.as_str(), "Dead");
    let http = pubg1_tests::Client::new();
    let reply = http.get(&cluster.broker(1).url("/consumer-groups/ghost"))?;
    assert_eq!(reply.status, 404, "{}", reply.text);

    // An acks=0 batch that is refused (no such partition) closes the connection: the only way
    // such a producer learns of it.
    let mut quiet = TcpStream::connect(address)?;
    quiet.set_read_timeout(Some(Duration::from_secs(10)))?;
    let lost = RequestKind::Produce(
        ProduceRequest::default()
            .with_acks(0)
            .with_timeout_ms(5000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(TopicName(name("v")))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(7)
                    .with_records(Some(batch("lost")))])]),
    );
    write(&mut quiet, ApiKey::Produce, 9, 7, &lost)?;
    let mut byte = [0u8; 1];
    let closed = match quiet.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        // A timeout is the connection left open.
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    assert!(closed, "the connection is closed, and nothing was answered");
    Ok(())
}
