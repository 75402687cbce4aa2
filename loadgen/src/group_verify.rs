//! The group verifier: what the members of a consumer group received, committed and saw
//! committed, against what the producers had acknowledged.
//!
//! Members commit what each poll returned before they poll again, so with exclusive ownership
//! every offset reaches exactly one member, except where a member's poll was never committed:
//! the member was killed, or its instance was lost with its coordinator or its session. Each
//! redelivery is explained by the earlier delivery it repeats. Pure functions over what the
//! member threads logged, so every anomaly is unit-tested on fabricated logs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::verify::Ack;

/// Records of one partition that one poll returned: offsets `first..=last`, contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Index into the incarnations.
    pub incarnation: u32,
    pub partition: u32,
    pub first: u64,
    pub last: u64,
    /// Milliseconds since the run started, when the poll's answer arrived.
    pub received_ms: u64,
    /// Whether the commit the member sent right after this poll was acknowledged.
    pub committed: bool,
    /// Whether the member sent that commit at all (it had processed the records), whatever the
    /// answer; a member killed with the poll in hand did not.
    pub processed: bool,
}

/// How an instance of a member ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// Still a member at the end of the run (it then left).
    Running,
    /// Left the group by deleting its instance.
    Left,
    /// Killed by the scenario: it stopped polling without leaving or committing its last poll.
    Killed,
    /// Its instance went away under it (404, or its coordinator stopped answering): the
    /// coordinator moved, or its session expired; the member joined again as a new instance.
    Lost,
}

/// One instance of a member in the group (a member that loses its instance joins again as the
/// next incarnation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incarnation {
    pub member: u32,
    pub end: End,
    pub ended_ms: Option<u64>,
}

/// A committed offset as someone saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    pub partition: u32,
    /// The committed offset (the next one to consume).
    pub offset: u64,
    /// When the request that saw it was sent, and when its answer arrived (ms since start).
    pub sent_ms: u64,
    pub received_ms: u64,
}

/// A change of membership on the timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipEvent {
    pub at_ms: u64,
    pub description: String,
}

/// How long consumption of the partitions that changed owner paused after a membership event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rebalance {
    pub event: String,
    pub at_ms: u64,
    /// Partitions whose first records processed after the event went to another member than
    /// the last processed before it.
    pub partitions_moved: usize,
    /// Event → the last of those partitions delivered again (None: none moved, or one never was).
    pub resumed_after_ms: Option<u64>,
    /// The median of those partitions' times to their first records after the event.
    #[serde(default)]
    pub resumed_median_ms: Option<u64>,
    /// Event → the coordinator described the group as stable again (every partition with its
    /// target owner), sampled every 100 ms before the next event; None if never seen stable.
    #[serde(default)]
    pub stable_after_ms: Option<u64>,
}

/// What the group verifier found. `undelivered`, `committed_redelivered`, `two_owners`,
/// `delivered_twice_to_one_member` and `committed_backwards` fail the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupVerdict {
    /// Records returned by polls (every delivery counts).
    pub delivered: u64,
    /// Acknowledged records no member received and processed (a delivery counts when its
    /// member sent its commit or lived on).
    pub undelivered: u64,
    /// Records delivered again after their first delivery, by cause.
    pub redelivered_member_killed: u64,
    pub redelivered_instance_lost: u64,
    pub redelivered_rebalance: u64,
    /// Delivered again although the commit covering them had been acknowledged.
    pub committed_redelivered: u64,
    /// Delivered again to a member while the member that read them first went on reading
    /// the partition after that.
    pub two_owners: u64,
    pub delivered_twice_to_one_member: u64,
    /// A committed offset seen lower than one acknowledged or seen before it.
    pub committed_backwards: u64,
    pub examples: Vec<String>,
}

impl GroupVerdict {
    pub fn is_clean(&self) -> bool {
        self.undelivered == 0
            && self.committed_redelivered == 0
            && self.two_owners == 0
            && self.delivered_twice_to_one_member == 0
            && self.committed_backwards == 0
    }

    pub fn redelivered(&self) -> u64 {
        self.redelivered_member_killed + self.redelivered_instance_lost + self.redelivered_rebalance
    }

    fn example(&mut self, text: String) {
        if self.examples.len() < 20 {
            self.examples.push(text);
        }
    }
}

/// Judge the deliveries against the acknowledgements and the incarnations' ends.
pub fn verify(
    acks: &[Ack],
    deliveries: &[Delivery],
    incarnations: &[Incarnation],
    observations: &[Observation],
) -> GroupVerdict {
    let mut verdict = GroupVerdict {
        delivered: deliveries.iter().map(|d| d.last - d.first + 1).sum(),
        ..GroupVerdict::default()
    };
    let mut by_partition: BTreeMap<u32, Vec<Delivery>> = BTreeMap::new();
    for d in deliveries {
        by_partition.entry(d.partition).or_default().push(*d);
    }
    for (partition, list) in &mut by_partition {
        list.sort_by_key(|d| (d.received_ms, d.first));
        redeliveries(*partition, list, incarnations, &mut verdict);
    }
    // A record counts as received only by a member that processed it: it sent the commit for
    // it (a commit whose answer was lost may well have been stored), or lived on.
    let processed: BTreeMap<u32, Vec<Delivery>> = by_partition
        .iter()
        .map(|(p, list)| {
            let kept = list
                .iter()
                .filter(|d| {
                    d.processed
                        || incarnations
                            .get(d.incarnation as usize)
                            .is_none_or(|i| matches!(i.end, End::Running | End::Left))
                })
                .copied()
                .collect();
            (*p, kept)
        })
        .collect();
    undelivered(acks, &processed, &mut verdict);
    backwards(observations, &mut verdict);
    verdict
}

fn redeliveries(
    partition: u32,
    list: &[Delivery],
    incarnations: &[Incarnation],
    verdict: &mut GroupVerdict,
) {
    // Highest offset delivered so far: most deliveries start past it and repeat nothing.
    let mut delivered_to: Option<u64> = None;
    for (i, later) in list.iter().enumerate() {
        if delivered_to.is_some_and(|to| later.first <= to) {
            // Offsets of `later` already delivered, each judged by its latest earlier delivery.
            let mut remaining: Vec<(u64, u64)> = vec![(later.first, later.last)];
            for earlier in list[..i].iter().rev() {
                let mut next = Vec::new();
                for (from, to) in remaining {
                    let (lo, hi) = (from.max(earlier.first), to.min(earlier.last));
                    if lo > hi {
                        next.push((from, to));
                        continue;
                    }
                    judge(
                        partition,
                        earlier,
                        later,
                        hi - lo + 1,
                        list,
                        incarnations,
                        verdict,
                    );
                    if from < lo {
                        next.push((from, lo - 1));
                    }
                    if hi < to {
                        next.push((hi + 1, to));
                    }
                }
                remaining = next;
                if remaining.is_empty() {
                    break;
                }
            }
        }
        delivered_to = Some(delivered_to.map_or(later.last, |to| to.max(later.last)));
    }
}

fn judge(
    partition: u32,
    earlier: &Delivery,
    later: &Delivery,
    count: u64,
    list: &[Delivery],
    incarnations: &[Incarnation],
    verdict: &mut GroupVerdict,
) {
    let what = format!(
        "partition {partition}: {count} records from offset {} delivered to incarnation {} at {} ms, again to {} at {} ms",
        later.first.max(earlier.first),
        earlier.incarnation,
        earlier.received_ms,
        later.incarnation,
        later.received_ms
    );
    let end = incarnations
        .get(earlier.incarnation as usize)
        .map_or(End::Running, |i| i.end);
    if earlier.incarnation == later.incarnation {
        verdict.delivered_twice_to_one_member += count;
        verdict.example(format!("delivered twice to one member: {what}"));
    } else if list
        .iter()
        .any(|d| d.incarnation == earlier.incarnation && d.received_ms > later.received_ms)
    {
        // The earlier reader went on reading this partition after it reached the later one,
        // however the earlier reader ended (a zombie's instance ends lost).
        verdict.two_owners += count;
        verdict.example(format!("two owners: {what}"));
    } else if earlier.committed
        || list.iter().any(|d| {
            // A later commit of the first reader covered these offsets before they came again.
            d.incarnation == earlier.incarnation
                && d.committed
                && d.received_ms < later.received_ms
                && d.last >= later.first.max(earlier.first)
        })
    {
        verdict.committed_redelivered += count;
        verdict.example(format!("committed, then redelivered: {what}"));
    } else if matches!(end, End::Killed) {
        verdict.redelivered_member_killed += count;
    } else if matches!(end, End::Lost) {
        verdict.redelivered_instance_lost += count;
    } else {
        verdict.redelivered_rebalance += count;
    }
}

fn undelivered(
    acks: &[Ack],
    by_partition: &BTreeMap<u32, Vec<Delivery>>,
    verdict: &mut GroupVerdict,
) {
    // Delivered offsets of each partition as merged ranges.
    let mut covered: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
    for (partition, list) in by_partition {
        let mut ranges: Vec<(u64, u64)> = list.iter().map(|d| (d.first, d.last)).collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (from, to) in ranges {
            match merged.last_mut() {
                Some(last) if from <= last.1 + 1 => last.1 = last.1.max(to),
                _ => merged.push((from, to)),
            }
        }
        covered.insert(*partition, merged);
    }
    for ack in acks {
        let ranges = covered.get(&ack.partition).map_or(&[][..], Vec::as_slice);
        let at = ranges.partition_point(|r| r.1 < ack.offset);
        if ranges.get(at).is_none_or(|r| r.0 > ack.offset) {
            verdict.undelivered += 1;
            verdict.example(format!(
                "undelivered: producer {} sequence {} acknowledged at {}/{}",
                ack.producer, ack.sequence, ack.partition, ack.offset
            ));
        }
    }
}

/// A committed offset must never be seen lower than one acknowledged, or seen, before the
/// request that saw it was sent.
fn backwards(observations: &[Observation], verdict: &mut GroupVerdict) {
    let mut by_partition: BTreeMap<u32, Vec<Observation>> = BTreeMap::new();
    for o in observations {
        by_partition.entry(o.partition).or_default().push(*o);
    }
    for (partition, mut list) in by_partition {
        list.sort_by_key(|o| o.sent_ms);
        let mut known: Vec<Observation> = list.clone();
        known.sort_by_key(|o| o.received_ms);
        let (mut floor, mut next) = (0u64, 0usize);
        let mut floor_from: Option<Observation> = None;
        for o in &list {
            while next < known.len() && known[next].received_ms < o.sent_ms {
                if known[next].offset > floor {
                    floor = known[next].offset;
                    floor_from = Some(known[next]);
                }
                next += 1;
            }
            if o.offset < floor {
                verdict.committed_backwards += 1;
                verdict.example(format!(
                    "committed offset of partition {partition} seen at {} (asked at {} ms) after {} was seen at {} ms",
                    o.offset,
                    o.sent_ms,
                    floor,
                    floor_from.map_or(0, |f| f.received_ms)
                ));
            }
        }
    }
}

/// For each membership event: the partitions whose first records after it went to another
/// member than their last records before it, and how long until the last of them resumed.
pub fn rebalances(
    events: &[MembershipEvent],
    deliveries: &[Delivery],
    incarnations: &[Incarnation],
) -> Vec<Rebalance> {
    let member = |d: &Delivery| {
        incarnations
            .get(d.incarnation as usize)
            .map_or(u32::MAX, |i| i.member)
    };
    // Only processed deliveries say who read a partition: a killed member's poll in hand
    // arrives after the kill, and counted it would hide its partitions moving.
    let mut by_partition: BTreeMap<u32, Vec<&Delivery>> = BTreeMap::new();
    for d in deliveries.iter().filter(|d| d.processed) {
        by_partition.entry(d.partition).or_default().push(d);
    }
    for list in by_partition.values_mut() {
        list.sort_by_key(|d| d.received_ms);
    }
    events
        .iter()
        .map(|event| {
            let mut moved = 0;
            let mut resumed: Option<u64> = Some(0);
            let mut each: Vec<u64> = Vec::new();
            for list in by_partition.values() {
                let at = list.partition_point(|d| d.received_ms < event.at_ms);
                let Some(before) = at.checked_sub(1).map(|i| list[i]) else {
                    continue;
                };
                match list.get(at) {
                    Some(after) if member(after) != member(before) => {
                        moved += 1;
                        resumed = resumed.map(|r| r.max(after.received_ms - event.at_ms));
                        each.push(after.received_ms - event.at_ms);
                    }
                    Some(_) => {}
                    None => resumed = None,
                }
            }
            Rebalance {
                event: event.description.clone(),
                at_ms: event.at_ms,
                partitions_moved: moved,
                resumed_after_ms: if moved == 0 { None } else { resumed },
                resumed_median_ms: {
                    each.sort_unstable();
                    each.get(each.len() / 2).copied()
                },
                stable_after_ms: None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(
        incarnation: u32,
        partition: u32,
        first: u64,
        last: u64,
        at: u64,
        committed: bool,
    ) -> Delivery {
        Delivery {
            incarnation,
            partition,
            first,
            last,
            received_ms: at,
            committed,
            processed: committed,
        }
    }

    fn inc(member: u32, end: End) -> Incarnation {
        Incarnation {
            member,
            end,
            ended_ms: None,
        }
    }

    fn ack(partition: u32, offset: u64) -> Ack {
        Ack {
            producer: 0,
            sequence: offset,
            partition,
            offset,
        }
    }

    #[test]
    fn a_clean_hand_over_repeats_nothing() {
        let incarnations = [inc(0, End::Left), inc(1, End::Running)];
        let deliveries = [d(0, 0, 0, 9, 10, true), d(1, 0, 10, 19, 20, true)];
        let acks: Vec<Ack> = (0..20).map(|o| ack(0, o)).collect();
        let verdict = verify(&acks, &deliveries, &incarnations, &[]);
        assert!(verdict.is_clean(), "{verdict:?}");
        assert_eq!((verdict.delivered, verdict.redelivered()), (20, 0));
    }

    #[test]
    fn redeliveries_are_explained_by_the_end_of_whoever_read_them_first() {
        let incarnations = [inc(0, End::Killed), inc(1, End::Lost), inc(2, End::Running)];
        let deliveries = [
            d(0, 0, 0, 9, 10, false),
            d(1, 0, 0, 14, 20, false),
            d(2, 0, 5, 19, 30, true),
        ];
        let verdict = verify(&[], &deliveries, &incarnations, &[]);
        assert!(verdict.is_clean(), "{verdict:?}");
        // 0..=9 again to incarnation 1 (killed first reader); 5..=14 again to 2 (lost reader).
        assert_eq!(verdict.redelivered_member_killed, 10);
        assert_eq!(verdict.redelivered_instance_lost, 10);
    }

    #[test]
    fn committed_records_read_again_fail_the_run() {
        let incarnations = [inc(0, End::Left), inc(1, End::Running)];
        let deliveries = [d(0, 0, 0, 9, 10, true), d(1, 0, 5, 12, 20, true)];
        let verdict = verify(&[], &deliveries, &incarnations, &[]);
        assert_eq!(verdict.committed_redelivered, 5);
        assert!(!verdict.is_clean());
        // An uncommitted poll whose offsets the reader's next commit covered.
        let covered = [
            d(0, 0, 0, 9, 10, false),
            d(0, 0, 10, 19, 15, true),
            d(1, 0, 0, 19, 20, true),
        ];
        let verdict = verify(&[], &covered, &incarnations, &[]);
        assert_eq!(verdict.committed_redelivered, 20);
    }

    #[test]
    fn two_readers_at_once_fail_the_run() {
        let incarnations = [inc(0, End::Running), inc(1, End::Running)];
        // 0 read 0..=9 without its commit going through, 1 read them too, and 0 read on.
        let deliveries = [
            d(0, 0, 0, 9, 10, false),
            d(1, 0, 0, 9, 20, true),
            d(0, 0, 10, 12, 30, true),
        ];
        let verdict = verify(&[], &deliveries, &incarnations, &[]);
        assert_eq!(verdict.two_owners, 10);
        let once = [d(0, 0, 0, 3, 10, true), d(0, 0, 2, 5, 20, true)];
        let verdict = verify(&[], &once, &incarnations, &[]);
        assert_eq!(verdict.delivered_twice_to_one_member, 2);
        // An uncommitted poll read again by the next owner, the first reader moving on to
        // other partitions only: a rebalance's redelivery.
        let handed = [
            d(0, 0, 0, 9, 10, false),
            d(1, 0, 0, 9, 20, true),
            d(0, 1, 0, 9, 30, true),
        ];
        let verdict = verify(&[], &handed, &incarnations, &[]);
        assert!(verdict.is_clean(), "{verdict:?}");
        assert_eq!(verdict.redelivered_rebalance, 10);
    }

    #[test]
    fn a_record_only_a_killed_member_saw_is_undelivered_and_a_zombie_reader_is_two_owners() {
        let incarnations = [inc(0, End::Killed), inc(1, End::Lost), inc(2, End::Running)];
        let acks: Vec<Ack> = (0..10).map(|o| ack(0, o)).collect();
        // 5..=9 reached only the killed member, uncommitted.
        let killed = [d(0, 0, 0, 9, 10, false), d(2, 0, 0, 4, 20, true)];
        let verdict = verify(&acks, &killed, &incarnations, &[]);
        assert_eq!(verdict.undelivered, 5);
        // A lost instance that went on reading after another member took the partition.
        let zombie = [
            d(1, 0, 0, 9, 10, false),
            d(2, 0, 0, 9, 20, true),
            d(1, 0, 10, 12, 30, false),
        ];
        let verdict = verify(&[], &zombie, &incarnations, &[]);
        assert_eq!(verdict.two_owners, 10);
    }

    #[test]
    fn acknowledged_records_nobody_read_are_undelivered() {
        let deliveries = [d(0, 0, 0, 4, 10, true), d(0, 0, 6, 9, 20, true)];
        let acks: Vec<Ack> = (0..10).map(|o| ack(0, o)).chain([ack(1, 0)]).collect();
        let verdict = verify(&acks, &deliveries, &[inc(0, End::Running)], &[]);
        assert_eq!(verdict.undelivered, 2, "offset 5 and partition 1");
    }

    #[test]
    fn a_committed_offset_seen_lower_after_a_higher_one_was_acknowledged() {
        let o = |offset, sent_ms, received_ms| Observation {
            partition: 0,
            offset,
            sent_ms,
            received_ms,
        };
        // Concurrent requests may see either; one sent after 10 was seen must not see 5.
        let fine = [o(10, 0, 5), o(5, 2, 8), o(12, 9, 12)];
        let mut verdict = GroupVerdict::default();
        backwards(&fine, &mut verdict);
        assert_eq!(verdict.committed_backwards, 0);
        backwards(&[o(10, 0, 5), o(5, 6, 8)], &mut verdict);
        assert_eq!(verdict.committed_backwards, 1);
    }

    #[test]
    fn rebalance_time_runs_from_the_event_to_the_last_moved_partition_resuming() {
        let incarnations = [inc(0, End::Left), inc(1, End::Running)];
        let deliveries = [
            d(0, 0, 0, 0, 100, true),
            d(1, 1, 0, 0, 100, true),
            d(1, 0, 1, 1, 450, true),
            d(1, 1, 1, 1, 300, true),
        ];
        let events = [MembershipEvent {
            at_ms: 200,
            description: "member 0 leaves".into(),
        }];
        let found = rebalances(&events, &deliveries, &incarnations);
        assert_eq!(found[0].partitions_moved, 1);
        assert_eq!(found[0].resumed_after_ms, Some(250));
    }

    #[test]
    fn a_killed_member_s_poll_in_hand_does_not_hide_its_partitions_moving() {
        // Member 0 is killed at 200 while a poll is out; the poll answers at 210 (recorded,
        // never processed), and the partition goes to member 1 after its session expires.
        let incarnations = [inc(0, End::Killed), inc(1, End::Running)];
        let deliveries = [
            d(0, 0, 0, 0, 100, true),
            d(0, 0, 1, 1, 210, false),
            d(1, 0, 1, 1, 2300, true),
        ];
        let events = [MembershipEvent {
            at_ms: 200,
            description: "member 0 killed".into(),
        }];
        let found = rebalances(&events, &deliveries, &incarnations);
        assert_eq!(found[0].partitions_moved, 1);
        assert_eq!(found[0].resumed_after_ms, Some(2100));
    }
}
