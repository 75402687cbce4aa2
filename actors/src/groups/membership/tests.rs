//! Membership on its own: joins, leaves, expiry and the two-step hand-over, with time passed in.

use proptest::prelude::*;

use super::*;

fn t6() -> BTreeMap<String, u32> {
    BTreeMap::from([("t".to_owned(), 6)])
}

fn sub() -> BTreeSet<String> {
    BTreeSet::from(["t".to_owned()])
}

const SESSION: Duration = Duration::from_secs(10);

/// Heartbeat every member until nothing changes (what members polling in a loop do).
fn settle(group: &mut Membership, now: Instant) {
    for _ in 0..4 {
        let ids: Vec<String> = group.members().keys().cloned().collect();
        for id in ids {
            group.heartbeat(&id, now).expect("member");
        }
    }
}

fn loads(group: &Membership) -> Vec<usize> {
    group.members().values().map(|m| m.owned.len()).collect()
}

/// No partition has two owners, and `owners` and each member's `owned` agree.
fn check_single_owner(group: &Membership) {
    let mut seen = BTreeSet::new();
    for (id, member) in group.members() {
        for tp in &member.owned {
            assert!(seen.insert(tp.clone()), "{tp:?} owned twice");
            assert_eq!(group.owner_of(tp), Some(id));
        }
    }
    assert_eq!(seen.len(), group.owners.len());
}

#[test]
fn three_members_own_two_partitions_each() {
    let now = Instant::now();
    let mut group = Membership::new(Assignor::Sticky, 0);
    for id in ["a", "b", "c"] {
        group.join(id, sub(), SESSION, t6(), now);
    }
    settle(&mut group, now);
    assert_eq!(loads(&group), vec![2, 2, 2]);
    assert!(group.is_stable());
    assert!(group.rebalancing_since.is_none());
    check_single_owner(&group);
}

#[test]
fn a_partition_reaches_its_new_owner_only_after_the_old_one_released_it() {
    let now = Instant::now();
    let mut group = Membership::new(Assignor::Sticky, 0);
    for id in ["a", "b", "c"] {
        group.join(id, sub(), SESSION, t6(), now);
    }
    settle(&mut group, now);
    // Every member is in a poll when "d" joins.
    for id in ["a", "b", "c"] {
        group.begin_poll(id, now).expect("poll");
    }
    let generation = group.generation;
    group.join("d", sub(), SESSION, t6(), now);
    assert!(group.generation > generation);
    assert!(group.rebalancing_since.is_some());
    let moving: Vec<TopicPartition> = group.target_of("d").expect("d").iter().cloned().collect();
    assert_eq!(moving.len(), 1);
    let old_owner = group.owner_of(&moving[0]).cloned().expect("owned");
    // The newcomer asks first: what it is to get is still owned, so it gets nothing yet; nor
    // is anything taken from the old owner while its poll is under way.
    assert_eq!(group.heartbeat("d", now).expect("d"), Reconciled::default());
    assert_eq!(
        group.heartbeat(&old_owner, now).expect("hb"),
        Reconciled::default()
    );
    assert_eq!(group.owner_of(&moving[0]), Some(&old_owner));
    for id in ["a", "b", "c"] {
        group.end_poll(id, now);
    }
    let released = group.heartbeat(&old_owner, now).expect("hb");
    assert_eq!(released.revoked, moving);
    assert_eq!(group.owner_of(&moving[0]), None);
    let taken = group.heartbeat("d", now).expect("d");
    assert_eq!(taken.assigned, moving);
    settle(&mut group, now);
    check_single_owner(&group);
    let mut sorted = loads(&group);
    sorted.sort_unstable();
    assert_eq!(sorted, vec![1, 1, 2, 2]);
    assert!(group.rebalancing_since.is_none());
}

#[test]
fn a_leaving_member_frees_its_partitions_at_once_and_an_expired_one_after_its_session() {
    let start = Instant::now();
    let mut group = Membership::new(Assignor::Sticky, 0);
    for id in ["a", "b", "c"] {
        group.join(id, sub(), SESSION, t6(), start);
    }
    settle(&mut group, start);
    assert!(group.leave("a", t6(), start));
    settle(&mut group, start);
    assert_eq!(loads(&group), vec![3, 3]);
    // "c" stops heartbeating; "b" keeps going.
    let later = start + SESSION + Duration::from_secs(1);
    group.heartbeat("b", later).expect("b");
    assert_eq!(group.expire(t6(), later), vec!["c".to_owned()]);
    settle(&mut group, later);
    assert_eq!(loads(&group), vec![6]);
    assert_eq!(
        group.heartbeat("c", later),
        Err(MembershipError::UnknownMember)
    );
}

#[test]
fn a_second_poll_of_one_member_is_refused_and_a_polling_member_does_not_expire() {
    let start = Instant::now();
    let mut group = Membership::new(Assignor::Range, 0);
    group.join("a", sub(), SESSION, t6(), start);
    group.begin_poll("a", start).expect("first poll");
    assert_eq!(
        group.begin_poll("a", start),
        Err(MembershipError::PollInProgress)
    );
    let later = start + SESSION * 2;
    assert!(group.expire(t6(), later).is_empty());
    group.end_poll("a", later);
    assert!(
        group.expire(t6(), later).is_empty(),
        "end of poll is a heartbeat"
    );
}

#[test]
fn a_grown_topic_is_spread_over_the_members() {
    let now = Instant::now();
    let mut group = Membership::new(Assignor::Sticky, 0);
    group.join("a", sub(), SESSION, t6(), now);
    group.join("b", sub(), SESSION, t6(), now);
    settle(&mut group, now);
    group.observe_topics(BTreeMap::from([("t".to_owned(), 10)]), now);
    settle(&mut group, now);
    assert_eq!(loads(&group), vec![5, 5]);
    check_single_owner(&group);
}

#[derive(Debug, Clone)]
enum Op {
    Join(u8),
    Leave(u8),
    Heartbeat(u8),
    BeginPoll(u8),
    EndPoll(u8),
    Advance(u8),
    Grow(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6).prop_map(Op::Join),
        (0u8..6).prop_map(Op::Leave),
        (0u8..6).prop_map(Op::Heartbeat),
        (0u8..6).prop_map(Op::BeginPoll),
        (0u8..6).prop_map(Op::EndPoll),
        (0u8..20).prop_map(Op::Advance),
        (1u8..12).prop_map(Op::Grow),
    ]
}

proptest! {
    /// Whatever members do, no partition ever has two owners, a member never gains a
    /// partition while another still owns it, and once everyone heartbeats the assignment is
    /// balanced and complete.
    #[test]
    fn ownership_is_never_shared_and_converges(ops in proptest::collection::vec(op(), 1..80)) {
        let start = Instant::now();
        let mut now = start;
        let mut topics = t6();
        let mut group = Membership::new(Assignor::Sticky, 0);
        for op in ops {
            let before: BTreeMap<TopicPartition, String> = group.owners.clone();
            match op {
                Op::Join(m) => group.join(&format!("m{m}"), sub(), SESSION, topics.clone(), now),
                Op::Leave(m) => {
                    group.leave(&format!("m{m}"), topics.clone(), now);
                }
                Op::Heartbeat(m) => {
                    let _ = group.heartbeat(&format!("m{m}"), now);
                }
                Op::BeginPoll(m) => {
                    let _ = group.begin_poll(&format!("m{m}"), now);
                }
                Op::EndPoll(m) => group.end_poll(&format!("m{m}"), now),
                Op::Advance(s) => {
                    now += Duration::from_secs(u64::from(s));
                    group.expire(topics.clone(), now);
                }
                Op::Grow(n) => {
                    let count = topics["t"].max(u32::from(n));
                    topics.insert("t".to_owned(), count);
                    group.observe_topics(topics.clone(), now);
                }
            }
            check_single_owner(&group);
            // A partition changes hands only through "nobody": never straight from one member
            // to another within one step.
            for (tp, owner) in &group.owners {
                if let Some(previous) = before.get(tp) {
                    prop_assert_eq!(previous, owner, "{:?} moved owner to owner", tp);
                }
            }
        }
        let ids: Vec<String> = group.members().keys().cloned().collect();
        for id in &ids {
            group.end_poll(id, now);
        }
        settle(&mut group, now);
        check_single_owner(&group);
        prop_assert!(group.is_stable());
        if !ids.is_empty() {
            prop_assert_eq!(group.owners.len(), topics["t"] as usize);
            let l = loads(&group);
            prop_assert!(l.iter().max().unwrap_or(&0) - l.iter().min().unwrap_or(&0) <= 1);
        }
    }
}

#[test]
fn a_held_group_hands_out_nothing_until_the_hold_ends() {
    let start = Instant::now();
    let mut group = Membership::new(Assignor::Sticky, 0);
    group.hold_until(start + Duration::from_millis(500));
    group.join("a", sub(), SESSION, t6(), start);
    assert_eq!(
        group.heartbeat("a", start).expect("a"),
        Reconciled::default()
    );
    group.join(
        "b",
        sub(),
        SESSION,
        t6(),
        start + Duration::from_millis(100),
    );
    let after = start + Duration::from_millis(500);
    settle(&mut group, after);
    assert_eq!(
        loads(&group),
        vec![3, 3],
        "no partition went to 'a' and then moved"
    );
}
