//! The classic group protocol through a real coordinator: a broker's actors in-process on a
//! real RocksDB, JoinGroup/SyncGroup/Heartbeat/LeaveGroup/OffsetCommit sent to the
//! `GroupCoordinator` as the Kafka listener sends them, commits replicated through the
//! offsets partition's Raft group.

use std::time::Duration;

use actix::Addr;
use bytes::Bytes;

use super::*;
use crate::component_tests::{create, eventually, settings};
use crate::groups::classic::{ClassicError, JoinRequest, JoinResponse, Protocol};
use crate::groups::coordinator::{
    CommitOffsets, CreateInstance, Describe, DescribeClassic, GroupCoordinator, Heartbeat,
    InstanceConfig, JoinGroup, LeaveGroup, OffsetReset, Subscribe, Subscription, SyncGroup,
};
use crate::groups::error::GroupError;
use crate::groups::offsets_machine::TopicPartition;
use crate::groups::offsets_replica::{group_partition, Coordinate, Coordinated};

async fn coordinator(broker: &Broker, group: &str) -> Addr<GroupCoordinator> {
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < until {
        let offsets = broker.registry.offsets().to_vec();
        if let Some(addr) = offsets
            .get(group_partition(group, offsets.len().max(1) as u32) as usize)
            .and_then(|shared| shared.addr())
        {
            let asked = addr.send(Coordinate {
                group: group.to_owned(),
                create: true,
            });
            if let Ok(Ok(Coordinated::Running(coordinator))) = asked.await {
                return coordinator;
            }
        }
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no coordinator for {group} within 20 s");
}

fn join(member_id: &str, protocols: &[&str]) -> JoinGroup {
    JoinGroup(JoinRequest {
        member_id: member_id.to_owned(),
        client_id: "test".into(),
        protocol_type: "consumer".into(),
        protocols: protocols
            .iter()
            .map(|p| Protocol {
                name: (*p).to_owned(),
                metadata: Bytes::from_static(b"topics: t"),
            })
            .collect(),
        session_timeout: Duration::from_secs(10),
        rebalance_timeout: Duration::from_secs(10),
        require_known_member_id: false,
    })
}

fn tp(partition: u32) -> TopicPartition {
    TopicPartition {
        topic: "t".into(),
        partition,
    }
}

fn classic_refusal(result: Result<impl std::fmt::Debug, GroupError>) -> ClassicError {
    match result {
        Err(GroupError::Classic(e)) => e,
        other => panic!("expected a classic refusal, got {other:?}"),
    }
}

#[actix_rt::test]
async fn classic_members_join_sync_commit_and_rebalance_through_the_coordinator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(settings(dir.path())).await.expect("start");
    create(&broker, "t", 2, &[]).await;
    let coordinator = coordinator(&broker, "cg").await;

    // A first member leads generation 1 alone.
    let a: JoinResponse = coordinator
        .send(join("", &["range"]))
        .await
        .expect("mailbox")
        .expect("join a");
    assert_eq!((a.generation, a.leader.clone()), (1, a.member_id.clone()));
    let assignment = coordinator
        .send(SyncGroup {
            member_id: a.member_id.clone(),
            generation: 1,
            assignments: vec![(a.member_id.clone(), Bytes::from_static(b"t:0,1"))],
        })
        .await
        .expect("mailbox")
        .expect("sync a");
    assert_eq!(assignment, Bytes::from_static(b"t:0,1"));

    // A second member's join waits until the first joins again, which its heartbeat tells it.
    let pending_b = coordinator.send(join("", &["range"]));
    let b_join = actix_rt::spawn(pending_b);
    let told = eventually(Duration::from_secs(5), || {
        let (coordinator, id) = (coordinator.clone(), a.member_id.clone());
        async move {
            let beat = coordinator
                .send(Heartbeat {
                    member_id: id,
                    generation: 1,
                })
                .await;
            matches!(
                beat,
                Ok(Err(GroupError::Classic(ClassicError::RebalanceInProgress)))
            )
        }
    })
    .await;
    assert!(told, "the first member hears of the rebalance");
    let a2 = coordinator
        .send(join(&a.member_id, &["range"]))
        .await
        .expect("mailbox")
        .expect("a joins again");
    let b = b_join
        .await
        .expect("task")
        .expect("mailbox")
        .expect("join b");
    assert_eq!((a2.generation, b.generation), (2, 2));
    assert_eq!(a2.leader, a.member_id, "the leader stays");
    assert_eq!(a2.members.len(), 2, "the leader sees both members");
    assert!(b.members.is_empty());

    // b's sync waits for the leader's assignment.
    let b_sync = actix_rt::spawn(coordinator.send(SyncGroup {
        member_id: b.member_id.clone(),
        generation: 2,
        assignments: Vec::new(),
    }));
    coordinator
        .send(SyncGroup {
            member_id: a.member_id.clone(),
            generation: 2,
            assignments: vec![
                (a.member_id.clone(), Bytes::from_static(b"t:0")),
                (b.member_id.clone(), Bytes::from_static(b"t:1")),
            ],
        })
        .await
        .expect("mailbox")
        .expect("leader sync");
    let b_assignment = b_sync
        .await
        .expect("task")
        .expect("mailbox")
        .expect("sync b");
    assert_eq!(b_assignment, Bytes::from_static(b"t:1"));

    // Commits of the current generation are replicated and visible; the old one's refused.
    coordinator
        .send(CommitOffsets {
            member_id: b.member_id.clone(),
            generation: 2,
            offsets: vec![(tp(1), 0, "m".into())],
        })
        .await
        .expect("mailbox")
        .expect("commit");
    let stale = coordinator
        .send(CommitOffsets {
            member_id: a.member_id.clone(),
            generation: 1,
            offsets: vec![(tp(0), 0, String::new())],
        })
        .await
        .expect("mailbox");
    assert_eq!(
        classic_refusal(stale),
        ClassicError::IllegalGeneration { current: 2 }
    );
    let described = coordinator.send(Describe).await.expect("mailbox");
    assert_eq!(described.committed.get(&tp(1)).map(|c| c.offset), Some(0));
    assert!(
        !described.committed.contains_key(&tp(0)),
        "the stale commit changed nothing"
    );

    // REST instances cannot take over a group its classic members hold.
    let instance = coordinator
        .send(CreateInstance(InstanceConfig {
            name: Some("rest".into()),
            format: "json".into(),
            offset_reset: OffsetReset::Earliest,
            auto_commit: false,
            session_timeout: Duration::from_secs(10),
            poll_wait: Duration::from_millis(100),
        }))
        .await
        .expect("mailbox")
        .expect("create");
    let subscribed = coordinator
        .send(Subscribe {
            instance,
            subscription: Subscription::Topics(["t".to_owned()].into()),
        })
        .await
        .expect("mailbox");
    assert!(
        matches!(subscribed, Err(GroupError::Conflict(_))),
        "{subscribed:?}"
    );

    // a leaves: b is told to join again and carries generation 3 alone, as leader.
    let left = coordinator
        .send(LeaveGroup {
            member_ids: vec![a.member_id.clone(), "nobody".into()],
        })
        .await
        .expect("mailbox")
        .expect("leave");
    assert_eq!(left, vec![Ok(()), Err(ClassicError::UnknownMemberId)]);
    let beat = coordinator
        .send(Heartbeat {
            member_id: b.member_id.clone(),
            generation: 2,
        })
        .await
        .expect("mailbox");
    assert_eq!(classic_refusal(beat), ClassicError::RebalanceInProgress);
    let b3 = coordinator
        .send(join(&b.member_id, &["range"]))
        .await
        .expect("mailbox")
        .expect("b joins again");
    assert_eq!((b3.generation, b3.leader.clone()), (3, b.member_id.clone()));
    let view = coordinator
        .send(DescribeClassic)
        .await
        .expect("mailbox")
        .expect("a classic group");
    assert_eq!((view.state, view.members.len()), ("CompletingRebalance", 1));
    let gone = coordinator
        .send(Heartbeat {
            member_id: a.member_id.clone(),
            generation: 3,
        })
        .await
        .expect("mailbox");
    assert_eq!(classic_refusal(gone), ClassicError::UnknownMemberId);
    broker.shutdown().await;
}
