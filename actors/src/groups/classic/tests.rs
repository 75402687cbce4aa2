use super::*;

const SECOND: Duration = Duration::from_secs(1);

fn limits(delay: Duration) -> Limits {
    Limits {
        session_timeout_min: Duration::from_millis(500),
        session_timeout_max: Duration::from_secs(300),
        members_max: 4,
        initial_rebalance_delay: delay,
    }
}

fn request(member_id: &str, protocols: &[&str]) -> JoinRequest {
    JoinRequest {
        member_id: member_id.to_owned(),
        client_id: "c".into(),
        protocol_type: "consumer".into(),
        protocols: protocols
            .iter()
            .map(|name| Protocol {
                name: (*name).to_owned(),
                metadata: Bytes::from(format!("topics of {name}")),
            })
            .collect(),
        session_timeout: 10 * SECOND,
        rebalance_timeout: 5 * SECOND,
        require_known_member_id: false,
    }
}

/// a joins alone (generation 1, leader), b joins, a joins again: both at generation 2.
fn two_members(group: &mut ClassicGroup, now: Instant) -> (JoinResponse, JoinResponse) {
    let a = joined(&group.join(request("", &["range"]), now).expect("a").1)[0].clone();
    let _ = group.join(request("", &["range"]), now).expect("b");
    let responses = joined(
        &group
            .join(request(&a.member_id, &["range"]), now)
            .expect("a")
            .1,
    );
    let b = responses
        .iter()
        .find(|r| r.member_id != a.member_id)
        .expect("b")
        .clone();
    (a, b)
}

/// The JoinGroup responses among `replies`.
fn joined(replies: &[Reply]) -> Vec<JoinResponse> {
    replies
        .iter()
        .filter_map(|r| match r {
            Reply::Join(_, Ok(response)) => Some(response.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_first_member_leads_generation_one_and_gets_its_assignment_back() {
    let now = Instant::now();
    let mut group = ClassicGroup::new("g", limits(Duration::ZERO));
    let replies = group.join(request("", &["range"]), now).expect("join").1;
    let responses = joined(&replies);
    assert_eq!(responses.len(), 1);
    let me = &responses[0];
    assert_eq!(
        (me.generation, me.leader.as_str()),
        (1, me.member_id.as_str())
    );
    assert_eq!(me.protocol_name, "range");
    assert_eq!(
        me.members.len(),
        1,
        "the leader gets every member's metadata"
    );
    assert_eq!(group.state(), State::CompletingRebalance);
    let synced = group
        .sync(
            &me.member_id,
            1,
            vec![(me.member_id.clone(), Bytes::from_static(b"p0"))],
            now,
        )
        .expect("sync");
    assert_eq!(
        synced,
        vec![Reply::Sync(
            me.member_id.clone(),
            Ok(Bytes::from_static(b"p0"))
        )]
    );
    assert_eq!(group.state(), State::Stable);
    assert_eq!(group.heartbeat(&me.member_id, 1, now), Ok(()));
    assert_eq!(group.check_commit(&me.member_id, 1, now), Ok(()));
}

#[test]
fn a_second_member_rebalances_the_group_and_the_old_generation_is_fenced() {
    let now = Instant::now();
    let mut group = ClassicGroup::new("g", limits(Duration::ZERO));
    let a = joined(
        &group
            .join(request("", &["range", "roundrobin"]), now)
            .expect("a")
            .1,
    )[0]
    .clone();
    group.sync(&a.member_id, 1, vec![], now).expect("sync a");
    // b joins: the rebalance waits for a to join again.
    let replies = group.join(request("", &["roundrobin"]), now).expect("b").1;
    assert!(joined(&replies).is_empty());
    assert_eq!(group.state(), State::PreparingRebalance);
    assert_eq!(
        group.heartbeat(&a.member_id, 1, now),
        Err(ClassicError::RebalanceInProgress)
    );
    // It may still commit what it processed before it joins again.
    assert_eq!(group.check_commit(&a.member_id, 1, now), Ok(()));
    let replies = group
        .join(request(&a.member_id, &["range", "roundrobin"]), now)
        .expect("a again")
        .1;
    let responses = joined(&replies);
    assert_eq!(responses.len(), 2, "both joins are answered together");
    assert!(responses
        .iter()
        .all(|r| r.generation == 2 && r.protocol_name == "roundrobin"));
    let leader = responses
        .iter()
        .find(|r| r.member_id == r.leader)
        .expect("a leader");
    assert_eq!(leader.member_id, a.member_id, "the leader stays the leader");
    assert_eq!(leader.members.len(), 2);
    let b = responses
        .iter()
        .find(|r| r.member_id != a.member_id)
        .expect("b")
        .clone();
    assert!(b.members.is_empty(), "only the leader sees the members");
    // The old generation can neither commit nor sync nor heartbeat.
    for outcome in [
        group.check_commit(&a.member_id, 1, now),
        group.heartbeat(&a.member_id, 1, now),
        group.sync(&a.member_id, 1, vec![], now).map(|_| ()),
    ] {
        assert_eq!(outcome, Err(ClassicError::IllegalGeneration { current: 2 }));
    }
    // b's sync waits for the leader's, which answers both.
    assert_eq!(group.sync(&b.member_id, 2, vec![], now), Ok(vec![]));
    assert_eq!(
        group.check_commit(&b.member_id, 2, now),
        Err(ClassicError::RebalanceInProgress)
    );
    let replies = group
        .sync(
            &a.member_id,
            2,
            vec![
                (a.member_id.clone(), Bytes::from_static(b"A")),
                (b.member_id.clone(), Bytes::from_static(b"B")),
            ],
            now,
        )
        .expect("leader sync");
    assert_eq!(replies.len(), 2);
    assert!(replies.contains(&Reply::Sync(
        b.member_id.clone(),
        Ok(Bytes::from_static(b"B"))
    )));
    assert_eq!(group.check_commit(&b.member_id, 2, now), Ok(()));
}

#[test]
fn members_that_do_not_join_again_in_time_are_dropped() {
    let t0 = Instant::now();
    let mut group = ClassicGroup::new("g", limits(Duration::ZERO));
    let a = joined(&group.join(request("", &["range"]), t0).expect("a").1)[0].clone();
    group.sync(&a.member_id, 1, vec![], t0).expect("sync");
    let _ = group.join(request("", &["range"]), t0).expect("b");
    // a never joins again: at the rebalance timeout (b's 5 s) the group goes on without it.
    assert!(group.tick(t0 + 4 * SECOND).is_empty());
    let responses = joined(&group.tick(t0 + 5 * SECOND));
    assert_eq!(responses.len(), 1);
    assert_eq!(responses[0].generation, 2);
    assert_ne!(responses[0].member_id, a.member_id);
    assert_eq!(
        group.heartbeat(&a.member_id, 2, t0),
        Err(ClassicError::UnknownMemberId)
    );
}

#[test]
fn an_expired_session_or_a_leave_rebalances_the_rest() {
    let t0 = Instant::now();
    let mut group = ClassicGroup::new("g", limits(Duration::ZERO));
    let (a, b) = two_members(&mut group, t0);
    group.sync(&a.member_id, 2, vec![], t0).expect("sync");
    // b heartbeats, a goes silent past its 10 s session.
    let later = t0 + 8 * SECOND;
    assert_eq!(group.heartbeat(&b.member_id, 2, later), Ok(()));
    assert!(group.tick(t0 + 11 * SECOND).is_empty());
    assert_eq!(group.state(), State::PreparingRebalance);
    let responses = joined(
        &group
            .join(request(&b.member_id, &["range"]), t0 + 11 * SECOND)
            .expect("b")
            .1,
    );
    assert_eq!(
        (responses[0].generation, responses[0].leader.as_str()),
        (3, b.member_id.as_str())
    );
    // b leaves: the group is empty at the next generation.
    let (outcomes, _) = group.leave(&[b.member_id.clone(), "nobody".into()], t0 + 12 * SECOND);
    assert_eq!(outcomes, vec![Ok(()), Err(ClassicError::UnknownMemberId)]);
    assert_eq!((group.state(), group.generation()), (State::Empty, 4));
    assert!(group.is_empty());
    assert_eq!(
        group.check_commit("", -1, t0),
        Ok(()),
        "a simple consumer may commit now"
    );
}

#[test]
fn mismatched_protocols_and_bounds_are_refused() {
    let now = Instant::now();
    let mut group = ClassicGroup::new("g", limits(Duration::ZERO));
    let _ = group.join(request("", &["range"]), now).expect("a");
    assert_eq!(
        group.join(request("", &["sticky"]), now).map(|j| j.1),
        Err(ClassicError::InconsistentGroupProtocol)
    );
    let mut other_type = request("", &["range"]);
    other_type.protocol_type = "connect".into();
    assert_eq!(
        group.join(other_type, now).map(|j| j.1),
        Err(ClassicError::InconsistentGroupProtocol)
    );
    let mut short = request("", &["range"]);
    short.session_timeout = Duration::from_millis(10);
    assert!(matches!(
        group.join(short, now),
        Err(ClassicError::InvalidSessionTimeout(_))
    ));
    assert_eq!(
        group.join(request("made-up", &["range"]), now).map(|j| j.1),
        Err(ClassicError::UnknownMemberId)
    );
    assert_eq!(
        group.check_commit("", -1, now),
        Err(ClassicError::IllegalGeneration { current: 1 })
    );
    for _ in 0..3 {
        let _ = group.join(request("", &["range"]), now).expect("room");
    }
    assert_eq!(
        group.join(request("", &["range"]), now).map(|j| j.1),
        Err(ClassicError::GroupMaxSizeReached)
    );
}

#[test]
fn a_new_member_is_given_its_id_first_when_it_asks_to_be() {
    let now = Instant::now();
    let mut group = ClassicGroup::new("g", limits(Duration::ZERO));
    let mut first = request("", &["range"]);
    first.require_known_member_id = true;
    let Err(ClassicError::MemberIdRequired(id)) = group.join(first, now) else {
        panic!("expected MEMBER_ID_REQUIRED");
    };
    assert_eq!(group.state(), State::Empty, "nothing joined yet");
    let responses = joined(
        &group
            .join(request(&id, &["range"]), now)
            .expect("join with id")
            .1,
    );
    assert_eq!(responses[0].member_id, id);
}

#[test]
fn the_first_rebalance_waits_the_initial_delay_for_more_members() {
    let t0 = Instant::now();
    let mut group = ClassicGroup::new("g", limits(3 * SECOND));
    assert!(joined(&group.join(request("", &["range"]), t0).expect("a").1).is_empty());
    assert!(joined(
        &group
            .join(request("", &["range"]), t0 + SECOND)
            .expect("b")
            .1
    )
    .is_empty());
    // b extended the delay to t0 + 4 s, capped by the rebalance timeout (t0 + 5 s).
    assert!(group.tick(t0 + 3 * SECOND).is_empty());
    let responses = joined(&group.tick(t0 + 4 * SECOND));
    assert_eq!(responses.len(), 2);
    assert!(responses.iter().all(|r| r.generation == 1));
}

#[test]
fn a_rebalance_during_the_sync_phase_answers_waiting_syncs() {
    let now = Instant::now();
    let mut group = ClassicGroup::new("g", limits(Duration::ZERO));
    let (_, b) = two_members(&mut group, now);
    assert_eq!(group.sync(&b.member_id, 2, vec![], now), Ok(vec![]));
    // A third member joins before the leader synced: b's sync is told to join again.
    let replies = group.join(request("", &["range"]), now).expect("c").1;
    assert!(replies.contains(&Reply::Sync(
        b.member_id.clone(),
        Err(ClassicError::RebalanceInProgress)
    )));
}

#[test]
fn a_member_whose_join_reply_was_lost_gets_the_same_generation_again() {
    let now = Instant::now();
    let mut group = ClassicGroup::new("g", limits(Duration::ZERO));
    let a = joined(&group.join(request("", &["range"]), now).expect("a").1)[0].clone();
    // The leader joins again before syncing, protocols unchanged: no new rebalance.
    let again = joined(
        &group
            .join(request(&a.member_id, &["range"]), now)
            .expect("again")
            .1,
    );
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].generation, again[0].members.len()), (1, 1));
    assert_eq!(group.state(), State::CompletingRebalance);
    group.sync(&a.member_id, 1, vec![], now).expect("sync");
    // Once stable, the leader joining again asks for a new assignment.
    let next = joined(
        &group
            .join(request(&a.member_id, &["range"]), now)
            .expect("leader")
            .1,
    );
    assert_eq!(next[0].generation, 2);
}

#[test]
fn a_leader_that_never_syncs_is_dropped_at_the_rebalance_timeout() {
    let t0 = Instant::now();
    let mut group = ClassicGroup::new("g", limits(Duration::ZERO));
    let (a, b) = two_members(&mut group, t0);
    // b syncs and waits; the leader a never does.
    assert_eq!(group.sync(&b.member_id, 2, vec![], t0), Ok(vec![]));
    assert!(group.tick(t0 + 4 * SECOND).is_empty());
    let replies = group.tick(t0 + 5 * SECOND);
    assert!(
        replies.contains(&Reply::Sync(
            b.member_id.clone(),
            Err(ClassicError::RebalanceInProgress)
        )),
        "b is told to join again: {replies:?}"
    );
    assert_eq!(
        group.heartbeat(&a.member_id, 2, t0),
        Err(ClassicError::UnknownMemberId)
    );
    let again = joined(
        &group
            .join(request(&b.member_id, &["range"]), t0 + 5 * SECOND)
            .expect("b")
            .1,
    );
    assert_eq!(
        (again[0].generation, again[0].leader.clone()),
        (3, b.member_id.clone())
    );
}
