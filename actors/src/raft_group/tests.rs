//! `RaftGroup` stepped synchronously: groups exchange messages by hand, no I/O.

use super::*;

const KEEP: u64 = 100;
const KEEP_MAX: u64 = 1_000;

fn group(id: u64) -> RaftGroup {
    let timing = RaftSettings {
        tick_ms: 1,
        log_keep_entries: KEEP,
        log_keep_entries_max: KEEP_MAX,
        ..RaftSettings::default()
    };
    let log = LogId {
        topic_id: 1,
        partition: 0,
    };
    RaftGroup::restore(log, id, &[1, 2, 3], PersistedRaft::default(), 0, timing).expect("raft")
}

/// Run every group's Ready loop and deliver messages until nothing moves; returns the
/// committed entries' data each group applied.
fn settle(groups: &mut [RaftGroup], applied: &mut [Vec<Vec<u8>>]) {
    settle_delivering(groups, applied, |_| true);
}

/// [`settle`], delivering only the messages `deliver` lets through (others are lost).
fn settle_delivering(
    groups: &mut [RaftGroup],
    applied: &mut [Vec<Vec<u8>>],
    deliver: impl Fn(&Message) -> bool,
) {
    for _round in 0..100 {
        let mut outbox = Vec::new();
        for (i, g) in groups.iter_mut().enumerate() {
            while let Some(mut work) = g.ready() {
                outbox.append(&mut work.messages);
                let committed = std::mem::take(&mut work.committed);
                let mut after = g.persisted(work);
                outbox.append(&mut after.messages);
                for entry in committed {
                    if !entry.data.is_empty() {
                        applied[i].push(entry.data.to_vec());
                    }
                    g.applied(entry.index, entry.index);
                }
            }
        }
        outbox.retain(|m| deliver(m));
        if outbox.is_empty() {
            return;
        }
        for message in outbox {
            let to = message.to as usize - 1;
            groups[to].step(message);
        }
    }
}

#[test]
fn three_groups_elect_a_leader_and_replicate_in_order() {
    let mut groups = vec![group(1), group(2), group(3)];
    let mut applied = vec![Vec::new(); 3];
    groups[0].campaign();
    settle(&mut groups, &mut applied);
    assert!(groups[0].is_leader());
    assert_eq!(groups[1].leader_id(), 1);
    assert_eq!(groups[0].propose(vec![], b"a".to_vec()), Ok(()));
    // A follower forwards proposals to the leader.
    assert_eq!(groups[2].propose(vec![], b"b".to_vec()), Ok(()));
    settle(&mut groups, &mut applied);
    for log in &applied {
        assert_eq!(log, &vec![b"a".to_vec(), b"b".to_vec()]);
    }
}

#[test]
fn a_partitioned_leader_is_replaced_and_cannot_commit() {
    let mut groups = vec![group(1), group(2), group(3)];
    let mut applied = vec![Vec::new(); 3];
    groups[0].campaign();
    settle(&mut groups, &mut applied);
    // Leader 1 is cut off: its proposal is never committed.
    assert_eq!(groups[0].propose(vec![], b"lost".to_vec()), Ok(()));
    let mut isolated = groups.remove(0);
    while let Some(work) = isolated.ready() {
        isolated.persisted(work);
    }
    // The other two time out and elect a new leader among themselves.
    for _ in 0..40 {
        for g in groups.iter_mut() {
            g.tick();
        }
        let mut outbox = Vec::new();
        for g in groups.iter_mut() {
            while let Some(mut work) = g.ready() {
                outbox.append(&mut work.messages);
                let mut after = g.persisted(work);
                outbox.append(&mut after.messages);
            }
        }
        for m in outbox.into_iter().filter(|m| m.to != 1) {
            let to = m.to as usize - 2;
            groups[to].step(m);
        }
    }
    let leader = groups
        .iter()
        .position(RaftGroup::is_leader)
        .expect("a new leader");
    assert_eq!(groups[leader].propose(vec![], b"kept".to_vec()), Ok(()));
    let mut all = vec![isolated];
    all.append(&mut groups);
    let mut applied_all = vec![Vec::new(); 3];
    // Heal: heartbeats reach node 1 again.
    for _ in 0..10 {
        for g in all.iter_mut() {
            g.tick();
        }
        settle(&mut all, &mut applied_all);
    }
    // After healing, everyone applies "kept" and nobody applies "lost".
    for log in &applied_all {
        assert!(log.contains(&b"kept".to_vec()), "{log:?}");
        assert!(!log.contains(&b"lost".to_vec()), "{log:?}");
    }
    assert!(!all[0].is_leader(), "the old leader stepped down");
}

/// One round of Ready handling for every group, as an owner does it: persist, apply (the
/// applied data goes to `applied`, and each durable apply becomes the snapshot point, its
/// data being how many entries the state machine holds), install snapshots. Returns the
/// messages to deliver and the snapshots installed, by group position.
fn round(
    groups: &mut [RaftGroup],
    applied: &mut [Vec<Vec<u8>>],
) -> (Vec<Message>, Vec<(usize, SnapshotInstall)>) {
    let mut outbox = Vec::new();
    let mut installed = Vec::new();
    for (i, g) in groups.iter_mut().enumerate() {
        while let Some(mut work) = g.ready() {
            outbox.append(&mut work.messages);
            if let Some(snapshot) = work.snapshot.clone() {
                // The state machine becomes the leader's at the snapshot: its entry count.
                let count = u64::from_be_bytes(snapshot.data[..].try_into().expect("8 bytes"));
                applied[i] = (0..count).map(|n| n.to_be_bytes().to_vec()).collect();
                installed.push((i, snapshot));
            }
            let committed = std::mem::take(&mut work.committed);
            let snapshot_index = work.snapshot.as_ref().map(|s| s.index);
            let mut after = g.persisted(work);
            outbox.append(&mut after.messages);
            if let Some(index) = snapshot_index {
                g.applied(index, index);
            }
            for entry in &committed {
                if !entry.data.is_empty() {
                    applied[i].push(entry.data.to_vec());
                }
            }
            if let Some(last) = committed.last() {
                g.applied(last.index, last.index);
                let count = applied[i].len() as u64;
                g.set_snapshot_point(last.index, Bytes::from(count.to_be_bytes().to_vec()));
            }
        }
    }
    (outbox, installed)
}

/// A dead follower does not make the leader keep more than `log_keep_bytes_max` of log,
/// however few entries that is.
#[test]
fn a_leader_keeps_at_most_its_byte_bound_of_log_for_a_dead_follower() {
    let settings = RaftSettings {
        tick_ms: 1,
        log_keep_entries: 10,
        log_keep_entries_max: 1_000_000,
        log_keep_bytes_max: 1024 * 1024,
        ..RaftSettings::default()
    };
    let log = LogId {
        topic_id: 1,
        partition: 0,
    };
    let mut groups: Vec<RaftGroup> = (1..=3)
        .map(|id| {
            RaftGroup::restore(log, id, &[1, 2, 3], PersistedRaft::default(), 0, settings)
                .expect("raft")
        })
        .collect();
    let mut applied = vec![Vec::new(); 3];
    groups[0].campaign();
    settle(&mut groups, &mut applied);
    assert!(groups[0].is_leader());
    let _dead = groups.pop();
    // 400 entries of 16 KiB: 6.4 MiB, with node 3 never acknowledging any.
    for n in 0..400u32 {
        let mut data = vec![0u8; 16 * 1024];
        data[..4].copy_from_slice(&n.to_be_bytes());
        assert_eq!(groups[0].propose(vec![], data), Ok(()));
        settle_delivering(&mut groups, &mut applied, |m| m.to != 3);
    }
    let kept = groups[0].log_bytes();
    assert!(
        kept <= 1024 * 1024 + 10 * 16 * 1024 + 16 * 1024,
        "kept {kept} bytes"
    );
    assert!(
        kept >= 512 * 1024,
        "kept {kept} bytes: more was compacted than needed"
    );
}

#[test]
fn a_follower_behind_the_compacted_log_catches_up_by_snapshot() {
    let mut groups = vec![group(1), group(2), group(3)];
    let mut applied = vec![Vec::new(); 3];
    groups[0].campaign();
    settle(&mut groups, &mut applied);
    // Node 3 is cut off while the other two commit. The leader keeps its log for node 3 up
    // to KEEP_MAX entries, then compacts past it anyway.
    let mut commit_without_node_3 = |groups: &mut Vec<RaftGroup>, entries: u64, start: u64| {
        for n in start..start + entries {
            assert_eq!(groups[0].propose(vec![], n.to_be_bytes().to_vec()), Ok(()));
            if n % 50 == 49 {
                for _ in 0..5 {
                    let (outbox, installed) = round(groups, &mut applied);
                    assert!(installed.is_empty());
                    for m in outbox.into_iter().filter(|m| m.to != 3) {
                        let to = m.to as usize - 1;
                        groups[to].step(m);
                    }
                }
            }
        }
    };
    let behind = groups.pop().expect("node 3");
    commit_without_node_3(&mut groups, 500, 0);
    let kept = groups[0].node.store().first_index().expect("first index");
    assert_eq!(kept, 1, "the leader keeps what its slow follower needs");
    commit_without_node_3(&mut groups, 2 * KEEP_MAX, 500);
    let leader_first = groups[0].node.store().first_index().expect("first index");
    assert!(
        leader_first > 2,
        "past the bound the leader compacts (first index {leader_first})"
    );
    // Heal: the leader cannot send entries node 3 lacks, so it sends a snapshot, then the
    // entries after it; node 3 ends with the same state machine as everyone else.
    groups.push(behind);
    let mut snapshots = Vec::new();
    for _ in 0..30 {
        for g in groups.iter_mut() {
            g.tick();
        }
        let (outbox, mut installed) = round(&mut groups, &mut applied);
        snapshots.append(&mut installed);
        for m in outbox {
            let to = m.to as usize - 1;
            groups[to].step(m);
        }
    }
    assert_eq!(snapshots.len(), 1, "one snapshot, to node 3: {snapshots:?}");
    let (to, snapshot) = &snapshots[0];
    assert_eq!(*to, 2);
    assert!(snapshot.index + 1 >= leader_first, "{snapshot:?}");
    let expected: Vec<Vec<u8>> = (0..500 + 2 * KEEP_MAX)
        .map(|n| n.to_be_bytes().to_vec())
        .collect();
    for (i, log) in applied.iter().enumerate() {
        assert_eq!(log.len(), expected.len(), "node {}", i + 1);
        assert!(log == &expected, "node {} applied something else", i + 1);
    }
    assert_eq!(groups[2].commit_index(), groups[0].commit_index());
    // And it keeps replicating normally afterwards.
    assert_eq!(groups[0].propose(vec![], b"after".to_vec()), Ok(()));
    for _ in 0..5 {
        let (outbox, installed) = round(&mut groups, &mut applied);
        assert!(installed.is_empty());
        for m in outbox {
            let to = m.to as usize - 1;
            groups[to].step(m);
        }
    }
    assert!(applied
        .iter()
        .all(|log| log.last() == Some(&b"after".to_vec())));
}

/// A leader quiesces right after its last commit, so its followers may never hear that commit
/// by heartbeat: the notice carries it, and a follower that holds the same log commits on it.
#[test]
fn a_follower_commits_on_the_quiesce_notice_of_an_idle_leader() {
    let mut groups = vec![group(1), group(2), group(3)];
    let mut applied = vec![Vec::new(); 3];
    groups[0].campaign();
    settle(&mut groups, &mut applied);
    assert_eq!(groups[0].propose(vec![], b"last".to_vec()), Ok(()));
    let index = groups[0].last_index();
    // Followers get the entry and acknowledge it; the leader's word that it committed is lost.
    settle_delivering(&mut groups, &mut applied, |m| {
        m.from != 1 || m.commit < index
    });
    assert!(groups[0].is_quiescent(), "the leader has nothing in flight");
    let term = groups[0].term();
    for follower in &groups[1..] {
        assert!(follower.commit_index() < index);
        assert!(!follower.may_quiesce_at(term, index, 1));
    }
    // A notice that does not describe this replica's log changes nothing, and does not panic.
    groups[1].adopt_quiesce_notice(term + 1, index, 1);
    groups[1].adopt_quiesce_notice(term, index + 5, 1);
    groups[1].adopt_quiesce_notice(term, index, 3);
    assert!(groups[1].commit_index() < index);
    // The leader's notice commits and applies through its index: the follower may quiesce.
    groups[1].adopt_quiesce_notice(term, index, 1);
    groups[2].adopt_quiesce_notice(term, index, 1);
    let leader_spoke = std::cell::Cell::new(false);
    settle_delivering(&mut groups, &mut applied, |m| {
        leader_spoke.set(leader_spoke.get() || m.from == 1);
        true
    });
    assert!(
        !leader_spoke.get(),
        "the followers' answers make the quiesced leader send nothing"
    );
    for (i, follower) in groups.iter().enumerate().skip(1) {
        assert_eq!(follower.commit_index(), index);
        assert!(follower.may_quiesce_at(term, index, 1));
        assert_eq!(applied[i].last().map(Vec::as_slice), Some(&b"last"[..]));
    }
    assert!(
        groups[0].is_quiescent(),
        "the followers' answers do not disturb the leader"
    );
}

/// With node 1 cut off, tick nodes 2 and 3 until one of them leads and the other knows it,
/// delivering between them only what `deliver` lets through; returns the new leader's id.
fn elect_without_node_1(
    groups: &mut [RaftGroup],
    applied: &mut [Vec<Vec<u8>>],
    deliver: impl Fn(&Message) -> bool,
) -> u64 {
    for _ in 0..100 {
        groups[1].tick();
        groups[2].tick();
        settle_delivering(groups, applied, |m| m.from != 1 && m.to != 1 && deliver(m));
        let leader = (2..=3).find(|id| groups[*id as usize - 1].is_leader());
        if let Some(leader) = leader.filter(|l| groups[(5 - l) as usize - 1].leader_id() == *l) {
            return leader;
        }
    }
    panic!("nodes 2 and 3 elected no leader");
}

/// The guard that matters: a follower whose entry at the notice's index is of an older term
/// does not commit it on the notice, though term, leader and index all match.
#[test]
fn a_quiesce_notice_commits_nothing_of_another_term() {
    let mut groups = vec![group(1), group(2), group(3)];
    let mut applied = vec![Vec::new(); 3];
    groups[0].campaign();
    settle(&mut groups, &mut applied);
    assert_eq!(groups[0].propose(vec![], b"x".to_vec()), Ok(()));
    let index = groups[0].last_index();
    let old_term = groups[0].term();
    settle_delivering(&mut groups, &mut applied, |m| {
        m.from != 1 || m.commit < index
    });
    // Leader 1 falls silent; 2 and 3 elect one of them in a new term, whose appends (its own
    // first entry) never reach the other.
    let leader = elect_without_node_1(&mut groups, &mut applied, |m| {
        m.get_msg_type() != MessageType::MsgAppend
    });
    let follower = &mut groups[(5 - leader) as usize - 1];
    let term = follower.term();
    assert!(term > old_term);
    assert_eq!(follower.leader_id(), leader);
    assert_eq!(
        follower.last_index(),
        index,
        "the new leader's entry never arrived"
    );
    assert!(follower.commit_index() < index);
    follower.adopt_quiesce_notice(term, index, leader);
    follower.adopt_quiesce_notice(old_term, index, 1);
    assert!(
        follower.commit_index() < index,
        "an entry of term {old_term} is not committed on a notice of term {term}"
    );
}

/// What a group asks to write, without RocksDB: a returning leader's divergent tail is replaced
/// in one Ready — truncated first, then the new leader's entries, then the hard state.
#[test]
fn a_replaced_tail_is_truncated_before_the_new_entries_are_written() {
    let mut groups = vec![group(1), group(2), group(3)];
    let mut applied = vec![Vec::new(); 3];
    groups[0].campaign();
    settle(&mut groups, &mut applied);
    // Leader 1 appends an entry nobody else gets, then is cut off.
    assert_eq!(groups[0].propose(vec![], b"lost".to_vec()), Ok(()));
    let (lost_at, lost_term) = (groups[0].last_index(), groups[0].term());
    while let Some(work) = groups[0].ready() {
        groups[0].persisted(work);
    }
    let leader = elect_without_node_1(&mut groups, &mut applied, |_| true) as usize - 1;
    assert_eq!(groups[leader].propose(vec![], b"kept".to_vec()), Ok(()));
    settle_delivering(&mut groups, &mut applied, |m| m.from != 1 && m.to != 1);
    // Heal: the new leader's appends reach node 1, whose Ready replaces its tail.
    let mut node1_writes = Vec::new();
    for _ in 0..20 {
        groups[leader].tick();
        for _round in 0..20 {
            let mut outbox = Vec::new();
            for (i, g) in groups.iter_mut().enumerate() {
                while let Some(mut work) = g.ready() {
                    if i == 0 {
                        node1_writes.push(std::mem::take(&mut work.persist));
                    }
                    outbox.append(&mut work.messages);
                    let committed = std::mem::take(&mut work.committed);
                    outbox.append(&mut g.persisted(work).messages);
                    if let Some(last) = committed.last() {
                        g.applied(last.index, last.index);
                    }
                }
            }
            for message in outbox {
                let to = message.to as usize - 1;
                groups[to].step(message);
            }
        }
    }
    let replaced = node1_writes
        .iter()
        .find(|w| w.iter().any(|p| matches!(p, Persist::Truncate { .. })))
        .expect("node 1 truncates its divergent tail");
    let Persist::Truncate { from, through } = replaced[0] else {
        panic!("the truncation comes first: {replaced:?}");
    };
    assert!(from <= lost_at && lost_at <= through, "{from}..={through}");
    let Some(Persist::Entry(first)) = replaced.get(1) else {
        panic!("then the new leader's entries: {replaced:?}");
    };
    assert_eq!(first.index, from);
    assert!(first.term > lost_term);
    assert!(matches!(replaced.last(), Some(Persist::HardState(_))));
}

/// With entries applied but only some of the applies durable (records are replayable), no
/// compaction passes the durable apply: a restart must be able to apply the rest again.
#[test]
fn compaction_never_passes_the_durable_apply() {
    let timing = RaftSettings {
        tick_ms: 1,
        log_keep_entries: KEEP,
        log_keep_entries_max: KEEP_MAX,
        ..RaftSettings::default()
    };
    let log = LogId {
        topic_id: 1,
        partition: 0,
    };
    let mut g =
        RaftGroup::restore(log, 1, &[1], PersistedRaft::default(), 0, timing).expect("raft");
    g.campaign();
    let mut committed_to = 0;
    let drain = |g: &mut RaftGroup, committed_to: &mut u64| {
        while let Some(mut work) = g.ready() {
            if let Some(last) = work.committed.last() {
                *committed_to = last.index;
            }
            work.committed.clear();
            g.persisted(work);
        }
    };
    drain(&mut g, &mut committed_to);
    for n in 0..(4 * KEEP) {
        assert_eq!(g.propose(vec![], n.to_be_bytes().to_vec()), Ok(()));
        drain(&mut g, &mut committed_to);
    }
    let last = g.last_index();
    assert_eq!(committed_to, last);
    let durable = last - 2 * KEEP;
    match g.applied(last, durable) {
        Some(Persist::Compact { index, term }) => {
            assert!(
                index <= durable,
                "compacted to {index}, durable only to {durable}"
            );
            assert!(term > 0);
        }
        other => panic!("a compaction was due: {other:?}"),
    }
    assert_eq!(
        g.applied(last, durable),
        None,
        "nothing more until more is durable"
    );
    // Once more is durable, compaction goes on (in steps of at least `log_keep_entries`),
    // keeping `log_keep_entries`.
    for n in 0..KEEP {
        assert_eq!(g.propose(vec![], n.to_be_bytes().to_vec()), Ok(()));
        drain(&mut g, &mut committed_to);
    }
    let last = g.last_index();
    match g.applied(last, last) {
        Some(Persist::Compact { index, .. }) => assert_eq!(index, last - KEEP),
        other => panic!("a compaction was due: {other:?}"),
    }
}
