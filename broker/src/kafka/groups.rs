//! Consumer groups over the Kafka protocol: FindCoordinator names the broker leading the
//! group's offsets partition; JoinGroup, SyncGroup, Heartbeat, LeaveGroup and OffsetCommit go to
//! that group's `GroupCoordinator` (its classic protocol, `groups/classic.rs`), the same actor
//! and the same committed offsets the HTTP consumer API uses, so one group can be inspected
//! from both. Static membership (`group.instance.id`) is not implemented: such members join as
//! dynamic ones.

use actix::Addr;
use bytes::Bytes;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponsePartition, OffsetFetchResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, DescribeGroupsRequest, DescribeGroupsResponse, FindCoordinatorRequest,
    FindCoordinatorResponse, GroupId, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest,
    JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse, ListGroupsRequest,
    ListGroupsResponse, OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest,
    OffsetFetchResponse, SyncGroupRequest, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use pubg1_actors::groups::classic::{ClassicError, JoinRequest, Protocol};
use pubg1_actors::groups::coordinator::{
    CommitOffsets, Describe, DescribeClassic, GroupCoordinator, Heartbeat, JoinGroup, LeaveGroup,
    SyncGroup,
};
use pubg1_actors::groups::error::GroupError;
use pubg1_actors::groups::offsets_machine::{Committed, TopicPartition};
use pubg1_actors::groups::offsets_replica::{group_partition, Coordinate, Coordinated, ListGroups};
use std::collections::BTreeMap;
use std::time::Duration;

use super::{split_host_port, Context};

/// Kafka's error code for a group error.
fn group_code(error: &GroupError) -> i16 {
    match error {
        GroupError::NotCoordinator { .. } => ResponseError::NotCoordinator.code(),
        GroupError::Loading(_) => ResponseError::CoordinatorLoadInProgress.code(),
        GroupError::Classic(classic) => classic.kafka_code(),
        GroupError::Refused(_) => ResponseError::IllegalGeneration.code(),
        GroupError::UnknownGroup(_) => ResponseError::GroupIdNotFound.code(),
        GroupError::UnknownTopic(_) | GroupError::UnknownPartition { .. } => {
            ResponseError::UnknownTopicOrPartition.code()
        }
        GroupError::InvalidOffset(_) | GroupError::Invalid(_) => {
            ResponseError::InvalidRequest.code()
        }
        GroupError::Fenced { .. } | GroupError::UnknownInstance { .. } => {
            ResponseError::UnknownMemberId.code()
        }
        GroupError::Conflict(_) => ResponseError::InconsistentGroupProtocol.code(),
        // Maybe stored, maybe not: a client retries the commit (it is idempotent).
        GroupError::OutcomeUnknown(_) => ResponseError::RequestTimedOut.code(),
        _ => ResponseError::CoordinatorNotAvailable.code(),
    }
}

/// Where `group` stands, asked of its offsets partition's replica on this broker (`create`:
/// start a coordinator if none runs); the error code a client acts on if this broker cannot
/// answer (NOT_COORDINATOR: ask FindCoordinator again).
async fn coordinate(
    context: &Context,
    group: &str,
    create: bool,
) -> Result<Result<Coordinated, GroupError>, i16> {
    let partitions = context.broker.registry.offsets();
    if partitions.is_empty() {
        return Err(ResponseError::CoordinatorNotAvailable.code());
    }
    let shared = &partitions[group_partition(group, partitions.len() as u32) as usize];
    let Some(addr) = shared.addr().filter(|_| shared.hosted) else {
        return Err(ResponseError::NotCoordinator.code());
    };
    let coordinate = Coordinate {
        group: group.to_owned(),
        create,
    };
    addr.send(coordinate)
        .await
        .map_err(|_| ResponseError::CoordinatorNotAvailable.code())
}

/// The running coordinator of `group` on this broker, or the error code a client acts on.
/// Only a join or a commit starts one (`create`): asking about a group does not make it exist
/// (a started coordinator is a replicated record). Without one, `missing` is the answer.
async fn coordinator(
    context: &Context,
    group: &str,
    create: bool,
    missing: i16,
) -> Result<Addr<GroupCoordinator>, i16> {
    match coordinate(context, group, create).await? {
        Ok(Coordinated::Running(coordinator)) => Ok(coordinator),
        Ok(Coordinated::Stored(_)) | Err(GroupError::UnknownGroup(_)) => Err(missing),
        Err(e) => Err(group_code(&e)),
    }
}

/// A member request for a group nobody runs: its member is unknown.
const NO_MEMBER: i16 = ResponseError::UnknownMemberId.code();

fn str(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

pub async fn find_coordinator(
    context: &Context,
    request: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let keys: Vec<String> = if version >= 4 {
        request
            .coordinator_keys
            .iter()
            .map(|k| k.to_string())
            .collect()
    } else {
        vec![request.key.to_string()]
    };
    let partitions = context.broker.registry.offsets();
    let cluster = &context.broker.cluster;
    let coordinators: Vec<Coordinator> = keys
        .into_iter()
        .map(|key| {
            let answer = Coordinator::default()
                .with_key(str(key.clone()))
                .with_node_id(BrokerId(-1))
                .with_port(-1);
            if request.key_type != 0 {
                return answer
                    .with_error_code(ResponseError::InvalidRequest.code())
                    .with_error_message(Some(str("transactions are not supported")));
            }
            let leader = match partitions.len() {
                0 => 0,
                n => partitions[group_partition(&key, n as u32) as usize].leader(),
            };
            match cluster.kafka_of(leader).and_then(|a| split_host_port(&a)) {
                Some((host, port)) if leader != 0 => answer
                    .with_node_id(BrokerId(leader as i32))
                    .with_host(str(host))
                    .with_port(port),
                _ => answer.with_error_code(ResponseError::CoordinatorNotAvailable.code()),
            }
        })
        .collect();
    let first = coordinators.first().cloned().unwrap_or_default();
    let response = FindCoordinatorResponse::default();
    if version >= 4 {
        response.with_coordinators(coordinators)
    } else {
        let response = response
            .with_error_code(first.error_code)
            .with_node_id(first.node_id)
            .with_host(first.host)
            .with_port(first.port);
        // Error messages came with v1.
        if version >= 1 {
            response.with_error_message(first.error_message)
        } else {
            response
        }
    }
}

pub async fn join_group(
    context: &Context,
    request: JoinGroupRequest,
    version: i16,
    client_id: String,
) -> JoinGroupResponse {
    let failed = |code: i16| {
        JoinGroupResponse::default()
            .with_error_code(code)
            .with_generation_id(-1)
            .with_member_id(request.member_id.clone())
    };
    let group = request.group_id.0.to_string();
    let coordinator = match coordinator(context, &group, true, NO_MEMBER).await {
        Ok(c) => c,
        Err(code) => return failed(code),
    };
    let session = Duration::from_millis(u64::try_from(request.session_timeout_ms).unwrap_or(0));
    let rebalance = if version >= 1 {
        Duration::from_millis(u64::try_from(request.rebalance_timeout_ms).unwrap_or(0))
    } else {
        session
    };
    let join = JoinRequest {
        member_id: request.member_id.to_string(),
        client_id,
        protocol_type: request.protocol_type.to_string(),
        protocols: request
            .protocols
            .iter()
            .map(|p| Protocol {
                name: p.name.to_string(),
                metadata: p.metadata.clone(),
            })
            .collect(),
        session_timeout: session,
        rebalance_timeout: rebalance,
        require_known_member_id: version >= 4,
    };
    match coordinator.send(JoinGroup(join)).await {
        Ok(Ok(joined)) => JoinGroupResponse::default()
            .with_generation_id(joined.generation)
            .with_protocol_type((version >= 7).then(|| str(joined.protocol_type)))
            .with_protocol_name(Some(str(joined.protocol_name)))
            .with_leader(str(joined.leader))
            .with_member_id(str(joined.member_id))
            .with_members(
                joined
                    .members
                    .into_iter()
                    .map(|(id, metadata)| {
                        JoinGroupResponseMember::default()
                            .with_member_id(str(id))
                            .with_metadata(metadata)
                    })
                    .collect(),
            ),
        Ok(Err(GroupError::Classic(ClassicError::MemberIdRequired(id)))) => {
            failed(ClassicError::MemberIdRequired(String::new()).kafka_code())
                .with_member_id(str(id))
        }
        Ok(Err(e)) => failed(group_code(&e)),
        Err(_) => failed(ResponseError::CoordinatorNotAvailable.code()),
    }
}

pub async fn sync_group(context: &Context, request: SyncGroupRequest) -> SyncGroupResponse {
    let response = SyncGroupResponse::default()
        .with_protocol_type(request.protocol_type.clone())
        .with_protocol_name(request.protocol_name.clone());
    let group = request.group_id.0.to_string();
    let coordinator = match coordinator(context, &group, false, NO_MEMBER).await {
        Ok(c) => c,
        Err(code) => return response.with_error_code(code),
    };
    let sync = SyncGroup {
        member_id: request.member_id.to_string(),
        generation: request.generation_id,
        assignments: request
            .assignments
            .into_iter()
            .map(|a| (a.member_id.to_string(), a.assignment))
            .collect(),
    };
    match coordinator.send(sync).await {
        Ok(Ok(assignment)) => response.with_assignment(assignment),
        Ok(Err(e)) => response.with_error_code(group_code(&e)),
        Err(_) => response.with_error_code(ResponseError::CoordinatorNotAvailable.code()),
    }
}

pub async fn heartbeat(context: &Context, request: HeartbeatRequest) -> HeartbeatResponse {
    let group = request.group_id.0.to_string();
    let code = match coordinator(context, &group, false, NO_MEMBER).await {
        Err(code) => code,
        Ok(coordinator) => {
            let beat = Heartbeat {
                member_id: request.member_id.to_string(),
                generation: request.generation_id,
            };
            match coordinator.send(beat).await {
                Ok(Ok(())) => 0,
                Ok(Err(e)) => group_code(&e),
                Err(_) => ResponseError::CoordinatorNotAvailable.code(),
            }
        }
    };
    HeartbeatResponse::default().with_error_code(code)
}

pub async fn leave_group(
    context: &Context,
    request: LeaveGroupRequest,
    version: i16,
) -> LeaveGroupResponse {
    let members: Vec<String> = if version >= 3 {
        request
            .members
            .iter()
            .map(|m| m.member_id.to_string())
            .collect()
    } else {
        vec![request.member_id.to_string()]
    };
    let group = request.group_id.0.to_string();
    let coordinator = match coordinator(context, &group, false, NO_MEMBER).await {
        Ok(c) => c,
        Err(code) => return LeaveGroupResponse::default().with_error_code(code),
    };
    let left = coordinator
        .send(LeaveGroup {
            member_ids: members.clone(),
        })
        .await;
    match left {
        Ok(Ok(results)) => {
            let answers: Vec<MemberResponse> = members
                .iter()
                .zip(&results)
                .map(|(id, result)| {
                    MemberResponse::default()
                        .with_member_id(str(id.clone()))
                        .with_error_code(result.as_ref().map_or_else(|e| e.kafka_code(), |()| 0))
                })
                .collect();
            let top = if version < 3 {
                answers.first().map_or(0, |a| a.error_code)
            } else {
                0
            };
            let response = LeaveGroupResponse::default().with_error_code(top);
            // Per-member answers came with v3.
            if version >= 3 {
                response.with_members(answers)
            } else {
                response
            }
        }
        Ok(Err(e)) => LeaveGroupResponse::default().with_error_code(group_code(&e)),
        Err(_) => LeaveGroupResponse::default()
            .with_error_code(ResponseError::CoordinatorNotAvailable.code()),
    }
}

pub async fn offset_commit(
    context: &Context,
    request: OffsetCommitRequest,
) -> OffsetCommitResponse {
    let group = request.group_id.0.to_string();
    let mut offsets = Vec::new();
    let mut invalid = Vec::new();
    for topic in &request.topics {
        for p in &topic.partitions {
            match (
                u32::try_from(p.partition_index),
                u64::try_from(p.committed_offset),
            ) {
                (Ok(partition), Ok(offset)) => offsets.push((
                    TopicPartition {
                        topic: topic.name.0.to_string(),
                        partition,
                    },
                    offset,
                    p.committed_metadata
                        .as_ref()
                        .map(|m| m.to_string())
                        .unwrap_or_default(),
                )),
                _ => invalid.push((topic.name.clone(), p.partition_index)),
            }
        }
    }
    let outcome: Result<(), i16> = match coordinator(context, &group, true, NO_MEMBER).await {
        Err(code) => Err(code),
        Ok(coordinator) => {
            let commit = CommitOffsets {
                member_id: request.member_id.to_string(),
                generation: request.generation_id_or_member_epoch,
                offsets,
            };
            match coordinator.send(commit).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(group_code(&e)),
                Err(_) => Err(ResponseError::CoordinatorNotAvailable.code()),
            }
        }
    };
    let topics = request
        .topics
        .iter()
        .map(|topic| {
            let partitions = topic
                .partitions
                .iter()
                .map(|p| {
                    let code = if invalid.contains(&(topic.name.clone(), p.partition_index)) {
                        ResponseError::InvalidCommitOffsetSize.code()
                    } else {
                        outcome.err().unwrap_or(0)
                    };
                    OffsetCommitResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(code)
                })
                .collect();
            OffsetCommitResponseTopic::default()
                .with_name(topic.name.clone())
                .with_partitions(partitions)
        })
        .collect();
    OffsetCommitResponse::default().with_topics(topics)
}

/// The group's committed offsets: from its coordinator if one runs, else as stored.
async fn committed(
    context: &Context,
    group: &str,
) -> Result<BTreeMap<TopicPartition, Committed>, i16> {
    match coordinate(context, group, false).await? {
        Ok(Coordinated::Running(coordinator)) => match coordinator.send(Describe).await {
            Ok(description) => Ok(description.committed),
            Err(_) => Err(ResponseError::CoordinatorNotAvailable.code()),
        },
        Ok(Coordinated::Stored(state)) => Ok(state.offsets),
        // A group nobody committed for: no offsets, no error (Kafka answers -1 for each).
        Err(GroupError::UnknownGroup(_)) => Ok(BTreeMap::new()),
        Err(e) => Err(group_code(&e)),
    }
}

pub async fn offset_fetch(
    context: &Context,
    request: OffsetFetchRequest,
    version: i16,
) -> OffsetFetchResponse {
    let group = request.group_id.0.to_string();
    let committed = match committed(context, &group).await {
        Ok(committed) => committed,
        Err(code) => {
            if version >= 2 {
                return OffsetFetchResponse::default().with_error_code(code);
            }
            let response = OffsetFetchResponse::default();
            // v1 has no top-level error: each asked partition carries it.
            let topics = request
                .topics
                .unwrap_or_default()
                .into_iter()
                .map(|t| {
                    OffsetFetchResponseTopic::default()
                        .with_name(t.name)
                        .with_partitions(
                            t.partition_indexes
                                .into_iter()
                                .map(|p| {
                                    OffsetFetchResponsePartition::default()
                                        .with_partition_index(p)
                                        .with_committed_offset(-1)
                                        .with_error_code(code)
                                })
                                .collect(),
                        )
                })
                .collect();
            return response.with_topics(topics);
        }
    };
    let partition_answer = |topic: &str, partition: i32| {
        let found = u32::try_from(partition).ok().and_then(|p| {
            committed.get(&TopicPartition {
                topic: topic.to_owned(),
                partition: p,
            })
        });
        OffsetFetchResponsePartition::default()
            .with_partition_index(partition)
            .with_committed_offset(found.map_or(-1, |c| c.offset as i64))
            .with_metadata(Some(str(found
                .map(|c| c.metadata.clone())
                .unwrap_or_default())))
    };
    let topics = match request.topics {
        Some(asked) => asked
            .into_iter()
            .map(|t| {
                let name = t.name.0.to_string();
                OffsetFetchResponseTopic::default()
                    .with_name(t.name)
                    .with_partitions(
                        t.partition_indexes
                            .into_iter()
                            .map(|p| partition_answer(&name, p))
                            .collect(),
                    )
            })
            .collect(),
        // Every partition the group committed.
        None => {
            let mut by_topic: BTreeMap<String, Vec<i32>> = BTreeMap::new();
            for tp in committed.keys() {
                by_topic
                    .entry(tp.topic.clone())
                    .or_default()
                    .push(tp.partition as i32);
            }
            by_topic
                .into_iter()
                .map(|(name, partitions)| {
                    OffsetFetchResponseTopic::default()
                        .with_name(TopicName(str(name.clone())))
                        .with_partitions(
                            partitions
                                .into_iter()
                                .map(|p| partition_answer(&name, p))
                                .collect(),
                        )
                })
                .collect()
        }
    };
    OffsetFetchResponse::default().with_topics(topics)
}

/// Groups whose offsets partition this broker leads (Kafka's ListGroups is per coordinator;
/// admin tools ask every broker).
pub async fn list_groups(
    context: &Context,
    request: ListGroupsRequest,
    version: i16,
) -> ListGroupsResponse {
    let me = context.broker.cluster.self_id;
    let wanted: Vec<String> = request
        .states_filter
        .iter()
        .map(|s| s.to_ascii_lowercase())
        .collect();
    let mut groups = Vec::new();
    for partition in context.broker.registry.offsets() {
        if partition.leader() != me {
            continue;
        }
        let Some(addr) = partition.addr().filter(|_| partition.hosted) else {
            continue;
        };
        let Ok(listed) = addr.send(ListGroups).await else {
            continue;
        };
        for (group, _) in listed {
            // Its state as its coordinator has it; a group nobody runs is Empty (it has
            // committed offsets, or it would not be listed).
            let coordinate = Coordinate {
                group: group.clone(),
                create: false,
            };
            let state = match addr.send(coordinate).await {
                Ok(Ok(Coordinated::Running(coordinator))) => {
                    match coordinator.send(DescribeClassic).await {
                        Ok(Some(classic)) => classic.state,
                        _ => match coordinator.send(Describe).await {
                            Ok(description) => description.state,
                            Err(_) => "Empty",
                        },
                    }
                }
                _ => "Empty",
            };
            if !wanted.is_empty() && !wanted.contains(&state.to_ascii_lowercase()) {
                continue;
            }
            let listed = ListedGroup::default()
                .with_group_id(GroupId(str(group)))
                .with_protocol_type(str("consumer"));
            // States came with v4 (types with v5, beyond what is served).
            groups.push(if version >= 4 {
                listed.with_group_state(str(state))
            } else {
                listed
            });
        }
    }
    ListGroupsResponse::default().with_groups(groups)
}

pub async fn describe_groups(
    context: &Context,
    request: DescribeGroupsRequest,
) -> DescribeGroupsResponse {
    let mut described = Vec::new();
    for group_id in request.groups {
        let group = group_id.0.to_string();
        let answer = DescribedGroup::default().with_group_id(group_id.clone());
        // A group nobody runs: "Empty" if it has committed offsets, "Dead" if not (Kafka's
        // states), without starting a coordinator for it.
        let coordinator = match coordinator(context, &group, false, -1).await {
            Ok(c) => c,
            Err(-1) => {
                let state = match committed(context, &group).await {
                    Ok(offsets) if !offsets.is_empty() => "Empty",
                    _ => "Dead",
                };
                described.push(answer.with_group_state(str(state)));
                continue;
            }
            Err(code) => {
                described.push(answer.with_error_code(code));
                continue;
            }
        };
        if let Ok(Some(classic)) = coordinator.send(DescribeClassic).await {
            described.push(
                answer
                    .with_group_state(str(classic.state))
                    .with_protocol_type(str(classic.protocol_type))
                    .with_protocol_data(str(classic.protocol))
                    .with_members(
                        classic
                            .members
                            .into_iter()
                            .map(|m| {
                                DescribedGroupMember::default()
                                    .with_member_id(str(m.member_id))
                                    .with_client_id(str(m.client_id))
                                    .with_member_metadata(m.metadata)
                                    .with_member_assignment(m.assignment)
                            })
                            .collect(),
                    ),
            );
            continue;
        }
        // A group of REST Proxy instances (or none): its state and members, without the
        // classic protocol's metadata.
        match coordinator.send(Describe).await {
            Ok(description) => described.push(
                answer
                    .with_group_state(str(description.state))
                    .with_protocol_type(str("consumer"))
                    .with_protocol_data(str(description.assignor))
                    .with_members(
                        description
                            .members
                            .into_iter()
                            .map(|m| {
                                DescribedGroupMember::default()
                                    .with_member_id(str(m.instance.clone()))
                                    .with_client_id(str(m.instance))
                                    .with_member_metadata(Bytes::new())
                                    .with_member_assignment(Bytes::new())
                            })
                            .collect(),
                    ),
            ),
            Err(_) => described
                .push(answer.with_error_code(ResponseError::CoordinatorNotAvailable.code())),
        }
    }
    DescribeGroupsResponse::default().with_groups(described)
}
