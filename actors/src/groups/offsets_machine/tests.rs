//! The offsets machine on its own: what it accepts, refuses and writes, entry by entry.

use raft::prelude::Entry;

use super::*;
use crate::state_machine::apply_committed;

const LOG: LogId = LogId {
    topic_id: 9,
    partition: 2,
};

fn at(topic: &str, partition: u32) -> TopicPartition {
    TopicPartition {
        topic: topic.into(),
        partition,
    }
}

fn committed(offset: u64) -> Committed {
    Committed {
        offset,
        metadata: String::new(),
        committed_at_ms: 1_764_000_000_000,
    }
}

fn entry(index: u64, command: &GroupCommand) -> Entry {
    Entry {
        index,
        term: 3,
        data: rmp_serde::to_vec_named(command).expect("encode").into(),
        ..Default::default()
    }
}

fn commit(group: &str, generation: Option<u32>, offset: u64) -> GroupCommand {
    GroupCommand::Commit {
        group: group.into(),
        generation,
        offsets: vec![(at("orders", 0), committed(offset))],
    }
}

fn generation(group: &str, generation: u32) -> GroupCommand {
    GroupCommand::Generation {
        group: group.into(),
        generation,
    }
}

#[test]
fn a_commit_of_an_older_generation_is_refused_on_every_replica_alike() {
    let entries = || {
        vec![
            entry(1, &generation("g", 1)),
            entry(2, &commit("g", Some(1), 10)),
            entry(3, &generation("g", 2)),
            // A member that missed the rebalance commits late: refused, offset stays 10.
            entry(4, &commit("g", Some(1), 99)),
            entry(5, &commit("g", Some(2), 20)),
            // A client outside group management may commit at any time.
            entry(6, &commit("manual", None, 7)),
            entry(7, &generation("g", 1)),
            entry(8, &generation("g", 2)),
        ]
    };
    let (mut one, mut two) = (OffsetsMachine::new(LOG), OffsetsMachine::new(LOG));
    let first = apply_committed(&mut one, entries(), |_| None);
    let second = apply_committed(&mut two, entries(), |_| None);
    assert_eq!(format!("{:?}", first.ops), format!("{:?}", second.ops));
    let results: Vec<Result<Option<u32>, GroupRefusal>> = first
        .effects
        .into_iter()
        .map(|(_, r)| r.map(|state| state.map(|s| s.generation)))
        .collect();
    assert_eq!(
        results,
        vec![
            Ok(Some(1)),
            Ok(None),
            Ok(Some(2)),
            Err(GroupRefusal::IllegalGeneration {
                group: "g".into(),
                sent: 1,
                current: 2
            }),
            Ok(None),
            Ok(None),
            Err(GroupRefusal::GenerationBackwards {
                group: "g".into(),
                sent: 1,
                current: 2
            }),
            // A second takeover at the same epoch (a deposed coordinator's, forwarded late).
            Err(GroupRefusal::GenerationBackwards {
                group: "g".into(),
                sent: 2,
                current: 2
            }),
        ]
    );
    let g = one.group("g").expect("group g");
    assert_eq!(g.generation, 2);
    assert_eq!(g.offsets[&at("orders", 0)].offset, 20);
    assert_eq!(
        one.group("manual").expect("manual").offsets[&at("orders", 0)].offset,
        7
    );
    assert_eq!(one.applied_index(), 8);
    // Every write stays in `group_offsets`, under this partition's prefix.
    for op in &first.ops {
        let WriteOp::Put { cf, key, .. } = op else {
            panic!("only puts here: {op:?}");
        };
        assert_eq!(*cf, Cf::GroupOffsets);
        assert!(key.starts_with(&log_key(LOG)));
    }
}

#[test]
fn a_deleted_group_loses_its_offsets_and_a_second_delete_is_refused() {
    let mut machine = OffsetsMachine::new(LOG);
    let applied = apply_committed(
        &mut machine,
        vec![
            entry(1, &commit("g", None, 5)),
            entry(2, &GroupCommand::DeleteGroup { group: "g".into() }),
            entry(3, &GroupCommand::DeleteGroup { group: "g".into() }),
        ],
        |_| None,
    );
    assert!(machine.group("g").is_none());
    assert_eq!(
        applied.effects.last().map(|(_, r)| r.clone()),
        Some(Err(GroupRefusal::NoSuchGroup("g".into())))
    );
    assert!(applied.ops.iter().any(|op| matches!(
        op,
        WriteOp::Delete {
            cf: Cf::GroupOffsets,
            ..
        }
    )));
}

#[test]
fn a_restored_snapshot_equals_the_leaders_state_and_replaces_this_partitions_keys_only() {
    let mut leader = OffsetsMachine::new(LOG);
    apply_committed(
        &mut leader,
        vec![
            entry(1, &generation("a", 4)),
            entry(2, &commit("a", Some(4), 40)),
            entry(3, &commit("b", None, 3)),
        ],
        |_| None,
    );
    let mut behind = OffsetsMachine::new(LOG);
    apply_committed(
        &mut behind,
        vec![entry(1, &commit("stale", None, 1))],
        |_| None,
    );
    let (ops, effects) = behind.restore(3, &leader.snapshot()).expect("restore");
    assert!(effects.is_empty());
    assert_eq!(behind.group("a"), leader.group("a"));
    assert_eq!(behind.group("b"), leader.group("b"));
    assert!(behind.group("stale").is_none());
    assert_eq!(behind.applied_index(), 3);
    let WriteOp::DeleteRange { cf, from, to } = &ops[0] else {
        panic!("the partition's keys go first: {ops:?}");
    };
    assert_eq!(*cf, Cf::GroupOffsets);
    assert!(from.starts_with(&log_key(LOG)) && to.starts_with(&log_key(LOG)));
    let other = LogId {
        topic_id: 9,
        partition: 3,
    };
    assert!(
        log_key(other).as_slice() >= to.as_slice(),
        "another partition's keys are outside the range"
    );
    assert!(matches!(
        behind.restore(4, b"not a snapshot"),
        Err(StorageError::Corrupt { .. })
    ));
}

/// What the machine writes is what it reads back: applied through real RocksDB, the storage
/// closed and opened again, the recovered machine equals the one that applied, applied index
/// included, and a second partition's keys stay its own.
#[actix_rt::test]
async fn committed_offsets_survive_a_restart_from_rocksdb() {
    let dir = tempfile::tempdir().expect("tempdir");
    let other = LogId {
        topic_id: 9,
        partition: 3,
    };
    let (mut mine, mut theirs) = (OffsetsMachine::new(LOG), OffsetsMachine::new(other));
    {
        let storage = Storage::open(
            dir.path(),
            std::sync::Arc::new(crate::metrics::Metrics::new()),
        )
        .expect("open");
        let applied = apply_committed(
            &mut mine,
            vec![
                entry(1, &generation("g", 3)),
                entry(2, &commit("g", Some(3), 30)),
                entry(3, &commit("h", None, 8)),
                entry(4, &GroupCommand::DeleteGroup { group: "h".into() }),
            ],
            |_| None,
        );
        storage.write(applied.ops).await.expect("write");
        let applied = apply_committed(&mut theirs, vec![entry(7, &commit("g", None, 700))], |_| {
            None
        });
        storage.write(applied.ops).await.expect("write");
        storage.shutdown();
    }
    let storage = Storage::open(
        dir.path(),
        std::sync::Arc::new(crate::metrics::Metrics::new()),
    )
    .expect("reopen");
    let recovered = OffsetsMachine::from_durable(LOG, &storage).expect("recover");
    assert_eq!(recovered.applied_index(), 4);
    assert_eq!(recovered.group("g"), mine.group("g"));
    assert_eq!(
        recovered.group("g").expect("g").offsets[&at("orders", 0)].offset,
        30
    );
    assert!(
        recovered.group("h").is_none(),
        "the deleted group stays deleted"
    );
    let recovered_other = OffsetsMachine::from_durable(other, &storage).expect("recover");
    assert_eq!(recovered_other.applied_index(), 7);
    assert_eq!(
        recovered_other.group("g").expect("g").offsets[&at("orders", 0)].offset,
        700
    );
    storage.shutdown();
}

#[test]
fn a_takeover_returns_the_group_as_applied_with_it_commits_included() {
    let mut machine = OffsetsMachine::new(LOG);
    let applied = apply_committed(
        &mut machine,
        vec![
            entry(1, &generation("g", 1)),
            // A deposed coordinator's commit, landing just before its successor's takeover:
            // the successor must start from a state that has it.
            entry(2, &commit("g", Some(1), 42)),
            entry(3, &generation("g", 2)),
        ],
        |_| None,
    );
    let takeover = applied.effects.last().map(|(_, r)| r.clone());
    let state = takeover
        .and_then(Result::ok)
        .flatten()
        .expect("the takeover's state");
    assert_eq!(state.generation, 2);
    assert_eq!(state.offsets[&at("orders", 0)].offset, 42);
}
