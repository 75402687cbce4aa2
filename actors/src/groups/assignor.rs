//! Server-side assignors: which member should own which partition, computed by the coordinator
//! from the members' subscriptions and the topics' partition counts. Pure functions; the
//! coordinator ([`super::membership`]) moves partitions towards their result incrementally.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::offsets_machine::TopicPartition;

/// How partitions are spread over a group's members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Assignor {
    /// Kafka's RangeAssignor: per topic, consecutive partitions to members in id order.
    Range,
    /// Kafka's RoundRobinAssignor: all partitions, dealt to members in id order.
    RoundRobin,
    /// Balanced (no member owns more than one partition more than another that could take it)
    /// and keeping each member's partitions where it can: the least movement on a rebalance.
    #[default]
    Sticky,
}

impl Assignor {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "range" => Some(Self::Range),
            "round-robin" | "roundrobin" => Some(Self::RoundRobin),
            "sticky" | "uniform" => Some(Self::Sticky),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Range => "range",
            Self::RoundRobin => "round-robin",
            Self::Sticky => "sticky",
        }
    }
}

/// Member id → the topics it is subscribed to.
pub type Subscriptions = BTreeMap<String, BTreeSet<String>>;
/// Member id → the partitions it is (or should be) assigned.
pub type Assignment = BTreeMap<String, BTreeSet<TopicPartition>>;

/// The target assignment: every partition of a subscribed topic goes to exactly one member
/// subscribed to its topic. `topics` holds partition counts; `previous` is the last target
/// (the sticky assignor keeps what it can of it). Every member appears in the result.
pub fn assign(
    assignor: Assignor,
    members: &Subscriptions,
    topics: &BTreeMap<String, u32>,
    previous: &Assignment,
) -> Assignment {
    let mut result: Assignment = members
        .keys()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    let subscribers = |topic: &str| -> Vec<&String> {
        members
            .iter()
            .filter(|(_, subscribed)| subscribed.contains(topic))
            .map(|(member, _)| member)
            .collect()
    };
    let all: Vec<TopicPartition> = topics
        .iter()
        .filter(|(topic, _)| !subscribers(topic).is_empty())
        .flat_map(|(topic, count)| {
            (0..*count).map(move |partition| TopicPartition {
                topic: topic.clone(),
                partition,
            })
        })
        .collect();
    match assignor {
        Assignor::Range => {
            for (topic, count) in topics {
                let takers = subscribers(topic);
                if takers.is_empty() {
                    continue;
                }
                let (per, extra) = (
                    *count as usize / takers.len(),
                    *count as usize % takers.len(),
                );
                let mut next = 0u32;
                for (i, member) in takers.iter().enumerate() {
                    let take = per + usize::from(i < extra);
                    for partition in next..next + take as u32 {
                        insert(&mut result, member, topic, partition);
                    }
                    next += take as u32;
                }
            }
        }
        Assignor::RoundRobin => {
            let ids: Vec<&String> = members.keys().collect();
            let mut turn = 0usize;
            for tp in all {
                // Every partition here has a subscriber, so this finds one within a lap.
                for _ in 0..ids.len() {
                    let member = ids[turn % ids.len()];
                    turn += 1;
                    if members[member].contains(&tp.topic) {
                        insert(&mut result, member, &tp.topic, tp.partition);
                        break;
                    }
                }
            }
        }
        Assignor::Sticky => sticky(&mut result, members, &all, previous),
    }
    result
}

fn insert(result: &mut Assignment, member: &str, topic: &str, partition: u32) {
    if let Some(owned) = result.get_mut(member) {
        owned.insert(TopicPartition {
            topic: topic.to_owned(),
            partition,
        });
    }
}

/// Keep the previous owner of every partition it may still own, hand out the rest to the
/// least loaded subscriber, then move single partitions from the most to the least loaded
/// member that can take them until no move narrows the spread.
fn sticky(
    result: &mut Assignment,
    members: &Subscriptions,
    all: &[TopicPartition],
    previous: &Assignment,
) {
    let exists: BTreeSet<&TopicPartition> = all.iter().collect();
    let mut owner: BTreeMap<TopicPartition, String> = BTreeMap::new();
    for (member, owned) in previous {
        let Some(subscribed) = members.get(member) else {
            continue;
        };
        for tp in owned {
            if exists.contains(tp) && subscribed.contains(&tp.topic) && !owner.contains_key(tp) {
                owner.insert(tp.clone(), member.clone());
            }
        }
    }
    let mut load: BTreeMap<&String, usize> = members.keys().map(|m| (m, 0)).collect();
    for member in owner.values() {
        if let Some((_, n)) = load.iter_mut().find(|(m, _)| **m == member) {
            *n += 1;
        }
    }
    for tp in all {
        if owner.contains_key(tp) {
            continue;
        }
        let least = members
            .iter()
            .filter(|(_, subscribed)| subscribed.contains(&tp.topic))
            .map(|(member, _)| member)
            .min_by_key(|member| (load[member], *member));
        if let Some(member) = least {
            owner.insert(tp.clone(), member.clone());
            if let Some(n) = load.get_mut(member) {
                *n += 1;
            }
        }
    }
    // Narrow the spread one partition at a time; each move lowers the sum of squared loads,
    // so this ends.
    loop {
        let mut best: Option<(TopicPartition, String)> = None;
        let mut by_load: Vec<(&String, usize)> = load.iter().map(|(m, n)| (*m, *n)).collect();
        by_load.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        'search: for (heavy, heavy_load) in &by_load {
            // Move the member's highest-numbered partitions first: the result is stable.
            for (tp, _) in owner.iter().rev().filter(|(_, o)| o == heavy) {
                let light = members
                    .iter()
                    .filter(|(m, subscribed)| {
                        subscribed.contains(&tp.topic) && load[m] + 1 < *heavy_load
                    })
                    .map(|(m, _)| m)
                    .min_by_key(|m| (load[m], *m));
                if let Some(light) = light {
                    best = Some((tp.clone(), light.clone()));
                    break 'search;
                }
            }
        }
        let Some((tp, light)) = best else { break };
        if let Some(heavy) = owner.insert(tp, light.clone()) {
            if let Some(n) = load.get_mut(&heavy) {
                *n -= 1;
            }
        }
        if let Some(n) = load.get_mut(&light) {
            *n += 1;
        }
    }
    for (tp, member) in owner {
        insert(result, &member, &tp.topic, tp.partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subs(members: &[(&str, &[&str])]) -> Subscriptions {
        members
            .iter()
            .map(|(m, topics)| {
                (
                    (*m).to_owned(),
                    topics.iter().map(|t| (*t).to_owned()).collect(),
                )
            })
            .collect()
    }

    fn counts(result: &Assignment) -> Vec<usize> {
        result.values().map(BTreeSet::len).collect()
    }

    fn topics(list: &[(&str, u32)]) -> BTreeMap<String, u32> {
        list.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect()
    }

    fn every_partition_once(result: &Assignment, topics: &BTreeMap<String, u32>) {
        let mut seen = BTreeSet::new();
        for owned in result.values() {
            for tp in owned {
                assert!(seen.insert(tp.clone()), "{tp:?} assigned twice");
            }
        }
        let total: u32 = topics.values().sum();
        assert_eq!(seen.len(), total as usize, "every partition assigned");
    }

    #[test]
    fn each_assignor_splits_six_partitions_two_two_two() {
        let members = subs(&[("a", &["t"]), ("b", &["t"]), ("c", &["t"])]);
        let t = topics(&[("t", 6)]);
        for assignor in [Assignor::Range, Assignor::RoundRobin, Assignor::Sticky] {
            let result = assign(assignor, &members, &t, &Assignment::new());
            assert_eq!(counts(&result), vec![2, 2, 2], "{assignor:?}");
            every_partition_once(&result, &t);
        }
    }

    #[test]
    fn range_gives_consecutive_partitions_and_round_robin_deals() {
        let members = subs(&[("a", &["t"]), ("b", &["t"])]);
        let t = topics(&[("t", 5)]);
        let range = assign(Assignor::Range, &members, &t, &Assignment::new());
        let parts =
            |r: &Assignment, m: &str| -> Vec<u32> { r[m].iter().map(|tp| tp.partition).collect() };
        assert_eq!(parts(&range, "a"), vec![0, 1, 2]);
        assert_eq!(parts(&range, "b"), vec![3, 4]);
        let rr = assign(Assignor::RoundRobin, &members, &t, &Assignment::new());
        assert_eq!(parts(&rr, "a"), vec![0, 2, 4]);
        assert_eq!(parts(&rr, "b"), vec![1, 3]);
    }

    #[test]
    fn sticky_moves_only_what_balance_needs_when_a_member_joins_and_leaves() {
        let t = topics(&[("t", 6)]);
        let three = subs(&[("a", &["t"]), ("b", &["t"]), ("c", &["t"])]);
        let before = assign(Assignor::Sticky, &three, &t, &Assignment::new());
        let four = subs(&[("a", &["t"]), ("b", &["t"]), ("c", &["t"]), ("d", &["t"])]);
        let after = assign(Assignor::Sticky, &four, &t, &before);
        every_partition_once(&after, &t);
        let mut loads = counts(&after);
        loads.sort_unstable();
        assert_eq!(loads, vec![1, 1, 2, 2]);
        let moved: usize = before
            .iter()
            .map(|(m, owned)| owned.difference(&after[m]).count())
            .sum();
        assert_eq!(
            moved, 1,
            "one partition moves to the new member, nothing else"
        );
        // "b" leaves: only its partitions move.
        let without_b = subs(&[("a", &["t"]), ("c", &["t"]), ("d", &["t"])]);
        let last = assign(Assignor::Sticky, &without_b, &t, &after);
        every_partition_once(&last, &t);
        assert_eq!(counts(&last), vec![2, 2, 2]);
        for member in ["a", "c", "d"] {
            assert!(
                after[member].is_subset(&last[member]),
                "{member} kept its partitions"
            );
        }
    }

    #[test]
    fn only_subscribers_get_a_topic_and_a_topic_nobody_wants_is_unassigned() {
        let members = subs(&[("a", &["t", "u"]), ("b", &["t"])]);
        let t = topics(&[("t", 2), ("u", 2), ("v", 3)]);
        for assignor in [Assignor::Range, Assignor::RoundRobin, Assignor::Sticky] {
            let result = assign(assignor, &members, &t, &Assignment::new());
            assert!(result["b"].iter().all(|tp| tp.topic == "t"), "{assignor:?}");
            assert!(result.values().flatten().all(|tp| tp.topic != "v"));
            assert_eq!(result.values().map(BTreeSet::len).sum::<usize>(), 4);
        }
        let sticky = assign(Assignor::Sticky, &members, &t, &Assignment::new());
        assert_eq!(counts(&sticky), vec![2, 2], "sticky balances across topics");
    }

    #[test]
    fn sticky_balances_a_thousand_partitions_over_ten_members() {
        let names: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
        let members: Subscriptions = names
            .iter()
            .map(|m| (m.clone(), BTreeSet::from(["t".to_owned()])))
            .collect();
        let t = topics(&[("t", 1000)]);
        let first = assign(Assignor::Sticky, &members, &t, &Assignment::new());
        assert!(counts(&first).iter().all(|n| *n == 100));
        let mut nine = members.clone();
        nine.remove("m3");
        let second = assign(Assignor::Sticky, &nine, &t, &first);
        every_partition_once(&second, &t);
        let loads = counts(&second);
        assert!(loads.iter().max().unwrap_or(&0) - loads.iter().min().unwrap_or(&0) <= 1);
        for (member, owned) in &second {
            assert!(
                first[member].is_subset(owned),
                "{member} kept its partitions"
            );
        }
    }
}
