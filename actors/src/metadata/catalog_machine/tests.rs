//! The catalog machine on its own: no actor, no RocksDB — what it applies and what it asks to
//! write, entry by entry.

use raft::prelude::Entry;

use super::*;
use crate::state_machine::apply_committed;

fn create(name: &str) -> Vec<u8> {
    rmp_serde::to_vec_named(&Command::CreateTopic {
        name: name.into(),
        partitions: 3,
        replication_factor: 1,
        configs: TopicConfigs::default(),
        assignment: vec![vec![1]; 3],
        created_at_ms: 1_764_000_000_000,
    })
    .expect("encode")
}

fn delete(name: &str) -> Vec<u8> {
    rmp_serde::to_vec_named(&Command::DeleteTopic { name: name.into() }).expect("encode")
}

fn entry(index: u64, data: Vec<u8>) -> Entry {
    Entry {
        index,
        term: 2,
        data: data.into(),
        context: index.to_be_bytes().to_vec().into(),
        ..Default::default()
    }
}

fn fresh() -> CatalogMachine {
    CatalogMachine::from_durable(Catalog {
        topics: Vec::new(),
        next_topic_id: 0,
        next_producer_id: 0,
        applied_index: 0,
    })
}

fn names(machine: &CatalogMachine) -> Vec<(String, u32)> {
    machine
        .topics
        .values()
        .map(|t| (t.name.clone(), t.topic_id))
        .collect()
}

#[test]
fn replicas_applying_the_same_entries_reach_the_same_catalog_and_writes() {
    let entries = || {
        vec![
            entry(1, Vec::new()),
            entry(2, create("a")),
            entry(3, create("b")),
            entry(4, create("a")),
            entry(5, delete("b")),
            entry(6, delete("nope")),
        ]
    };
    let (mut one, mut two) = (fresh(), fresh());
    let first = apply_committed(&mut one, entries(), |_| None);
    let second = apply_committed(&mut two, entries(), |_| None);
    assert_eq!(format!("{:?}", first.ops), format!("{:?}", second.ops));
    assert_eq!(names(&one), names(&two));
    assert_eq!(names(&one), vec![("a".to_string(), 1)]);
    // Ids are never reused: `b` had 2, the next topic gets 3.
    assert_eq!(one.next_topic_id, 3);
    assert_eq!(one.applied_index(), 6);
    assert_eq!(first.last, Some((6, 2)));
    // The empty entry (a new leader's) yields no effect; every other one does, in order.
    let outcomes: Vec<String> = first
        .effects
        .iter()
        .map(|(_, (result, effect))| match (result, effect) {
            (Ok(Outcome::Created(meta)), Effect::Host(hosted)) if meta.name == hosted.name => {
                format!("created {}", meta.name)
            }
            (Ok(Outcome::Deleted), Effect::Retire(name)) => format!("deleted {name}"),
            (Err(e), Effect::Nothing) => format!("refused: {e}"),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        outcomes,
        vec![
            "created a".to_string(),
            "created b".to_string(),
            format!("refused: {}", TopicError::AlreadyExists("a".into())),
            "deleted b".to_string(),
            format!("refused: {}", TopicError::NotFound("nope".into())),
        ]
    );
    // The applied index is written with the applies, so a restart applies nothing twice.
    let applied = format!("{:?}", applied_index_op(6));
    assert_eq!(
        format!("{:?}", first.ops.last()),
        format!("Some({applied})")
    );
    // A delete takes the topic's data with it.
    let deleted = format!("{:?}", topic_delete_ops(2));
    assert!(format!("{:?}", first.ops).contains(&deleted[1..deleted.len() - 1]));
}

#[test]
fn an_entry_is_matched_with_the_proposal_that_made_it() {
    let mut machine = fresh();
    let applied = apply_committed(
        &mut machine,
        vec![entry(7, create("mine")), entry(8, create("theirs"))],
        |context| (context == 7u64.to_be_bytes()).then_some(41),
    );
    let owners: Vec<Option<u64>> = applied.effects.iter().map(|(own, _)| *own).collect();
    assert_eq!(owners, vec![Some(41), None]);
}

#[test]
fn a_restored_snapshot_replaces_the_catalog_and_says_what_to_host_and_retire() {
    let mut leader = fresh();
    apply_committed(
        &mut leader,
        vec![
            entry(1, create("kept")),
            entry(2, create("gone")),
            entry(3, delete("gone")),
            entry(4, create("new")),
        ],
        |_| None,
    );
    // A broker that saw `kept` and `gone` and then fell behind the leader's compacted log.
    let mut behind = fresh();
    apply_committed(
        &mut behind,
        vec![entry(1, create("kept")), entry(2, create("gone"))],
        |_| None,
    );
    let (ops, effects) = behind.restore(4, &leader.snapshot()).expect("restore");
    assert_eq!(names(&behind), names(&leader));
    assert_eq!(behind.next_topic_id, leader.next_topic_id);
    assert_eq!(behind.applied_index(), 4);
    let mut changes: Vec<String> = effects
        .iter()
        .map(|(_, effect)| match effect {
            Effect::Host(meta) => format!("host {}", meta.name),
            Effect::Retire(name) => format!("retire {name}"),
            Effect::Nothing => "nothing".into(),
        })
        .collect();
    changes.sort();
    assert_eq!(changes, vec!["host new", "retire gone"]);
    let written = format!("{ops:?}");
    let deleted = format!("{:?}", topic_delete_ops(2));
    assert!(
        written.contains(&deleted[1..deleted.len() - 1]),
        "gone's data is deleted"
    );
    assert!(written.contains(&format!("{:?}", applied_index_op(4))));
    // The same snapshot restored twice changes nothing the second time.
    let (_, again) = behind.restore(4, &leader.snapshot()).expect("restore");
    assert!(again.is_empty());
}

#[test]
fn a_snapshot_that_does_not_decode_is_refused_and_changes_nothing() {
    let mut machine = fresh();
    apply_committed(&mut machine, vec![entry(1, create("a"))], |_| None);
    let refused = machine.restore(9, b"not a catalog");
    assert!(matches!(refused, Err(StorageError::Corrupt { .. })));
    assert_eq!(names(&machine), vec![("a".to_string(), 1)]);
    assert_eq!(machine.applied_index(), 1);
}

#[test]
fn producer_ids_are_handed_out_in_disjoint_blocks_that_survive_a_snapshot() {
    let allocate =
        |count| rmp_serde::to_vec_named(&Command::AllocateProducerIds { count }).expect("encode");
    let mut leader = fresh();
    let applied = apply_committed(
        &mut leader,
        vec![entry(1, allocate(1000)), entry(2, allocate(1000))],
        |_| None,
    );
    let blocks: Vec<(i64, u32)> = applied
        .effects
        .iter()
        .map(|(_, (result, _))| match result {
            Ok(Outcome::ProducerIds { first, count }) => (*first, *count),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(blocks, vec![(0, 1000), (1000, 1000)]);
    // A broker restored from the leader's snapshot never hands out an id already given.
    let mut behind = fresh();
    behind.restore(2, &leader.snapshot()).expect("restore");
    let next = apply_committed(&mut behind, vec![entry(3, allocate(10))], |_| None);
    assert!(matches!(
        next.effects[0].1 .0,
        Ok(Outcome::ProducerIds {
            first: 2000,
            count: 10
        })
    ));
}
