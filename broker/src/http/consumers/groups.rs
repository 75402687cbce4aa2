//! `GET /consumer-groups` and `GET /consumer-groups/{group}`: groups, their members and lag.

use std::collections::BTreeSet;

use actix_web::http::StatusCode;
use actix_web::{get, web, HttpRequest, HttpResponse};
use pubg1_actors::groups::assignor::Assignor;
use pubg1_actors::groups::coordinator::{Describe, GroupDescription, Subscription};
use pubg1_actors::groups::offsets_machine::TopicPartition;
use pubg1_actors::groups::offsets_replica::{Coordinated, ListGroups};
use serde::Serialize;
use utoipa::ToSchema;

use super::super::error::{ApiError, ErrorBody};
use super::super::State;
use super::{coordinator, stopped, v2, PartitionRef};

#[derive(Debug, Serialize, ToSchema)]
pub struct GroupSummary {
    pub group: String,
    /// Partitions the group has committed offsets for.
    pub committed_partitions: usize,
    /// The offsets partition holding the group.
    pub offsets_partition: u32,
    /// The group's coordinator as this broker sees it (0: unknown).
    pub coordinator: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GroupList {
    pub consumer_groups: Vec<GroupSummary>,
}

/// Groups with committed state, as the offsets partitions this broker replicates hold them.
#[utoipa::path(
    tag = "consumers",
    responses((status = 200, body = GroupList, content_type = "application/vnd.kafka.v2+json"))
)]
#[get("/consumer-groups")]
pub async fn list_groups(state: State) -> Result<HttpResponse, ApiError> {
    let mut groups = Vec::new();
    for partition in state.broker.registry.offsets() {
        let Some(addr) = partition.addr().filter(|_| partition.hosted) else {
            continue;
        };
        let Ok(listed) = addr.send(ListGroups).await else {
            continue;
        };
        for (group, group_state) in listed {
            groups.push(GroupSummary {
                group,
                committed_partitions: group_state.offsets.len(),
                offsets_partition: partition.partition,
                coordinator: partition.leader(),
            });
        }
    }
    groups.sort_by(|a, b| a.group.cmp(&b.group));
    Ok(v2(StatusCode::OK).json(GroupList {
        consumer_groups: groups,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MemberInfo {
    pub instance_id: String,
    /// `subscribed` (group-managed), `manual` (own assignment) or `idle`.
    pub mode: String,
    pub topics: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic_pattern: Option<String>,
    /// Partitions it owns now.
    pub assignment: Vec<PartitionRef>,
    /// Partitions the assignor wants it to own (equal to `assignment` once stable).
    pub target_assignment: Vec<PartitionRef>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: u32,
    /// Next offset the group will consume; null if it committed none.
    pub committed_offset: Option<u64>,
    /// The partition's high watermark.
    pub log_end_offset: u64,
    /// log_end_offset − committed_offset (from the log start when nothing is committed).
    pub lag: u64,
    /// The instance that owns the partition now, if any.
    pub owner: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GroupInfo {
    pub group: String,
    /// `Empty`, `Rebalancing` or `Stable`.
    pub state: String,
    /// Moves on with every change of the target assignment.
    pub generation: u32,
    /// Moves on each time a broker takes the group over as coordinator.
    pub coordinator_epoch: u32,
    pub coordinator: u64,
    pub assignor: String,
    pub members: Vec<MemberInfo>,
    pub partitions: Vec<PartitionLag>,
}

/// One group: state, members and their partitions, committed offsets and lag.
#[utoipa::path(
    tag = "consumers",
    params(("group" = String, Path, description = "Consumer group", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$")),
    responses((status = 200, body = GroupInfo, content_type = "application/vnd.kafka.v2+json"), (status = 307, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody))
)]
#[get("/consumer-groups/{group}")]
pub async fn describe_group(
    state: State,
    group: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let description = match coordinator(&state, &req, &group, false).await? {
        Coordinated::Running(coordinator) => {
            coordinator.send(Describe).await.map_err(|_| stopped())?
        }
        // Nobody consumes it now: its committed offsets, no members.
        Coordinated::Stored(stored) => GroupDescription {
            group: group.clone(),
            state: "Empty",
            generation: 0,
            coordinator_epoch: stored.generation,
            assignor: Assignor::default().name(),
            members: Vec::new(),
            committed: stored.offsets,
        },
    };
    let owners: Vec<(TopicPartition, String)> = description
        .members
        .iter()
        .flat_map(|m| m.owned.iter().map(|tp| (tp.clone(), m.instance.clone())))
        .collect();
    let mut partitions: BTreeSet<TopicPartition> = description.committed.keys().cloned().collect();
    partitions.extend(owners.iter().map(|(tp, _)| tp.clone()));
    for member in &description.members {
        partitions.extend(member.target.iter().cloned());
    }
    let registry = &state.broker.registry;
    let lag = partitions
        .into_iter()
        .map(|tp| {
            let shared = registry
                .get(&tp.topic)
                .and_then(|h| h.partition(tp.partition).cloned());
            let (start, end) = shared
                .as_ref()
                .map_or((0, 0), |p| (p.log_start_offset(), p.known_log_end()));
            let committed = description.committed.get(&tp).map(|c| c.offset);
            PartitionLag {
                lag: end.saturating_sub(committed.unwrap_or(start)),
                committed_offset: committed,
                log_end_offset: end,
                owner: owners
                    .iter()
                    .find(|(o, _)| *o == tp)
                    .map(|(_, m)| m.clone()),
                topic: tp.topic,
                partition: tp.partition,
            }
        })
        .collect();
    let members = description
        .members
        .into_iter()
        .map(|m| {
            let (topics, topic_pattern) = match m.subscription {
                Some(Subscription::Topics(t)) => (t.into_iter().collect(), None),
                Some(Subscription::Pattern(p)) => (Vec::new(), Some(p)),
                None => (Vec::new(), None),
            };
            MemberInfo {
                instance_id: m.instance,
                mode: m.mode.to_owned(),
                topics,
                topic_pattern,
                assignment: m.owned.into_iter().map(Into::into).collect(),
                target_assignment: m.target.into_iter().map(Into::into).collect(),
            }
        })
        .collect();
    Ok(v2(StatusCode::OK).json(GroupInfo {
        group: description.group,
        state: description.state.to_owned(),
        generation: description.generation,
        coordinator_epoch: description.coordinator_epoch,
        coordinator: state.broker.cluster.self_id,
        assignor: description.assignor.to_owned(),
        members,
        partitions: lag,
    }))
}
