//! The verifier: what the cluster acknowledged against what it holds at the end.
//!
//! Every produced record carries its producer id and sequence number. Producers never resend a
//! sequence (a failed request's sequences are abandoned), so any sequence found twice in the log
//! is a real duplicate, not a retry. Pure functions over two lists, so every anomaly is
//! unit-tested on fabricated logs.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

/// Identifies one produced record: (producer id, sequence).
pub type RecordId = (u32, u64);

/// An acknowledgement: the record and where the cluster said it landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ack {
    pub producer: u32,
    pub sequence: u64,
    pub partition: u32,
    pub offset: u64,
}

/// A record as read back at the end of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub partition: u32,
    pub offset: u64,
    pub producer: u32,
    pub sequence: u64,
}

/// What the verifier found. `lost`, `duplicated` and `moved` count acknowledged records and make
/// the run fail; the others are information.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Verdict {
    pub acknowledged: u64,
    pub stored: u64,
    /// Acknowledged, and nowhere in the log.
    pub lost: u64,
    /// Acknowledged, and in the log more than once.
    pub duplicated: u64,
    /// Acknowledged at one partition/offset, found only at another.
    pub moved: u64,
    /// Pairs of one producer's acknowledged records in one partition whose log order contradicts
    /// the order they were sent in. (An unacknowledged record may land later than records sent
    /// after it: its request timed out at the client but was still carried out, as without an
    /// idempotent producer in Kafka. Those are counted in `unacknowledged_stored` only.)
    pub reordered: u64,
    /// In the log but never acknowledged (their request failed or timed out after the write):
    /// allowed, at-least-once for unacknowledged records.
    pub unacknowledged_stored: u64,
    /// Up to 20 examples per anomaly, for the report.
    pub examples: Vec<String>,
}

impl Verdict {
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.moved == 0
    }
}

const EXAMPLES_MAX: usize = 20;

/// The places one record was found at.
enum Places {
    One((u32, u64)),
    Many(Vec<(u32, u64)>),
}

impl Places {
    fn push(&mut self, place: (u32, u64)) {
        match self {
            Places::One(first) => *self = Places::Many(vec![*first, place]),
            Places::Many(places) => places.push(place),
        }
    }

    fn as_slice(&self) -> &[(u32, u64)] {
        match self {
            Places::One(place) => std::slice::from_ref(place),
            Places::Many(places) => places,
        }
    }
}

/// Compare the acknowledgements with the log read back.
pub fn verify(acks: &[Ack], log: &[Stored]) -> Verdict {
    let mut verdict = Verdict {
        acknowledged: acks.len() as u64,
        stored: log.len() as u64,
        ..Verdict::default()
    };
    // Where each record is stored: one place inline (no allocation per record: logs run to
    // tens of millions), further places in a vector.
    let mut found: HashMap<RecordId, Places> = HashMap::with_capacity(log.len());
    for s in log {
        let place = (s.partition, s.offset);
        found
            .entry((s.producer, s.sequence))
            .and_modify(|places| places.push(place))
            .or_insert(Places::One(place));
    }
    let example = |verdict: &mut Verdict, text: String| {
        if verdict.examples.len() < EXAMPLES_MAX {
            verdict.examples.push(text);
        }
    };
    let mut acked: HashMap<RecordId, (u32, u64)> = HashMap::with_capacity(acks.len());
    for a in acks {
        acked.insert((a.producer, a.sequence), (a.partition, a.offset));
        match found.get(&(a.producer, a.sequence)) {
            None => {
                verdict.lost += 1;
                example(
                    &mut verdict,
                    format!(
                        "lost: producer {} sequence {} acknowledged at {}/{}",
                        a.producer, a.sequence, a.partition, a.offset
                    ),
                );
            }
            Some(places) => {
                let places = places.as_slice();
                if places.len() > 1 {
                    verdict.duplicated += 1;
                    example(
                        &mut verdict,
                        format!(
                            "duplicated: producer {} sequence {} stored at {places:?}",
                            a.producer, a.sequence
                        ),
                    );
                }
                if !places.contains(&(a.partition, a.offset)) {
                    verdict.moved += 1;
                    example(
                        &mut verdict,
                        format!(
                            "moved: producer {} sequence {} acknowledged at {}/{}, stored at {places:?}",
                            a.producer, a.sequence, a.partition, a.offset
                        ),
                    );
                }
            }
        }
    }
    verdict.unacknowledged_stored =
        found.keys().filter(|id| !acked.contains_key(id)).count() as u64;
    // Reordering: per (partition, producer), acknowledged sequences must increase with offsets.
    let mut streams: BTreeMap<(u32, u32), Vec<(u64, u64)>> = BTreeMap::new();
    for s in log
        .iter()
        .filter(|s| acked.contains_key(&(s.producer, s.sequence)))
    {
        streams
            .entry((s.partition, s.producer))
            .or_default()
            .push((s.offset, s.sequence));
    }
    for ((partition, producer), mut stream) in streams {
        stream.sort_unstable();
        for pair in stream.windows(2) {
            if pair[1].1 < pair[0].1 {
                verdict.reordered += 1;
                example(
                    &mut verdict,
                    format!(
                        "reordered: producer {producer} in partition {partition}: sequence {} at offset {} after sequence {} at offset {}",
                        pair[1].1, pair[1].0, pair[0].1, pair[0].0
                    ),
                );
            }
        }
    }
    verdict
}

/// One request's outcome, for unavailability windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Milliseconds since the run started, when the answer came.
    pub at_ms: u64,
    pub ok: bool,
    /// The partition the request was for, when the producer chose it (keyless producers send
    /// each request to one partition); None for keyed requests.
    pub partition: Option<u32>,
}

/// A fault as the run carried it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultEvent {
    pub at_ms: u64,
    pub description: String,
    /// Partitions of the producers' topic the fault's brokers led when it struck; their
    /// requests measure its unavailability. Empty: every request does.
    pub affected: Vec<u32>,
}

/// How long publishing was unavailable after a fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Window {
    pub fault: String,
    pub at_ms: u64,
    /// The partitions whose requests were watched (empty: all).
    #[serde(default)]
    pub partitions: Vec<u32>,
    /// First failed request after the fault (None: nothing failed before the next fault).
    pub first_failure_ms: Option<u64>,
    /// First successful request after that failure.
    pub recovered_ms: Option<u64>,
    /// `recovered - first failure`; 0 when nothing failed, None when it never recovered.
    pub unavailable_ms: Option<u64>,
    /// `recovered - fault`: an upper bound that also covers requests hanging on the failed
    /// broker before they failed. None when nothing failed or it never recovered.
    #[serde(default)]
    pub fault_to_recovery_ms: Option<u64>,
}

impl Window {
    /// "430 ms (fault → first success 441 ms)", "none (nothing failed)" or "did not recover".
    pub fn describe(&self) -> String {
        match (self.unavailable_ms, self.fault_to_recovery_ms) {
            (Some(0), _) => "none (nothing failed)".to_owned(),
            (Some(ms), Some(bound)) => format!("{ms} ms (fault → first success {bound} ms)"),
            (Some(ms), None) => format!("{ms} ms"),
            (None, _) => "did not recover".to_owned(),
        }
    }
}

/// For each fault in order: the first failed request for an affected partition after it (before
/// the next fault), then the first successful request for an affected partition after that
/// failure. Requests for other partitions say nothing about this fault, so they are not
/// counted. `outcomes` must be sorted by time.
pub fn unavailability(faults: &[FaultEvent], outcomes: &[Outcome]) -> Vec<Window> {
    faults
        .iter()
        .enumerate()
        .map(|(i, fault)| {
            let at = &fault.at_ms;
            let until = faults.get(i + 1).map_or(u64::MAX, |next| next.at_ms);
            let watched = |o: &&Outcome| {
                fault.affected.is_empty() || o.partition.is_none_or(|p| fault.affected.contains(&p))
            };
            let first_failure = outcomes
                .iter()
                .filter(watched)
                .find(|o| o.at_ms >= *at && o.at_ms < until && !o.ok)
                .map(|o| o.at_ms);
            let recovered = first_failure.and_then(|failed| {
                outcomes
                    .iter()
                    .filter(watched)
                    .find(|o| o.at_ms > failed && o.ok)
                    .map(|o| o.at_ms)
            });
            let unavailable_ms = match (first_failure, recovered) {
                (None, _) => Some(0),
                (Some(failed), Some(ok)) => Some(ok - failed),
                (Some(_), None) => None,
            };
            let fault_to_recovery_ms = recovered.map(|ok| ok - at);
            Window {
                fault_to_recovery_ms,
                fault: fault.description.clone(),
                at_ms: *at,
                partitions: fault.affected.clone(),
                first_failure_ms: first_failure,
                recovered_ms: recovered,
                unavailable_ms,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(producer: u32, sequence: u64, partition: u32, offset: u64) -> Ack {
        Ack {
            producer,
            sequence,
            partition,
            offset,
        }
    }

    fn stored(partition: u32, offset: u64, producer: u32, sequence: u64) -> Stored {
        Stored {
            partition,
            offset,
            producer,
            sequence,
        }
    }

    #[test]
    fn a_faithful_log_is_clean() {
        let acks = [ack(1, 0, 0, 0), ack(1, 1, 0, 1), ack(2, 0, 1, 0)];
        let log = [stored(0, 0, 1, 0), stored(0, 1, 1, 1), stored(1, 0, 2, 0)];
        let verdict = verify(&acks, &log);
        assert!(verdict.is_clean(), "{verdict:?}");
        assert_eq!(verdict.reordered + verdict.unacknowledged_stored, 0);
        assert_eq!((verdict.acknowledged, verdict.stored), (3, 3));
    }

    #[test]
    fn an_acknowledged_record_missing_from_the_log_is_lost() {
        let acks = [ack(1, 0, 0, 0), ack(1, 1, 0, 1)];
        let verdict = verify(&acks, &[stored(0, 0, 1, 0)]);
        assert_eq!(verdict.lost, 1);
        assert!(!verdict.is_clean());
        assert!(verdict.examples[0].contains("sequence 1"), "{verdict:?}");
    }

    #[test]
    fn an_acknowledged_record_stored_twice_is_duplicated() {
        let acks = [ack(1, 0, 0, 0)];
        let verdict = verify(&acks, &[stored(0, 0, 1, 0), stored(0, 1, 1, 0)]);
        assert_eq!((verdict.duplicated, verdict.moved, verdict.lost), (1, 0, 0));
        assert!(!verdict.is_clean());
    }

    #[test]
    fn an_acknowledged_record_at_another_offset_or_partition_moved() {
        let acks = [ack(1, 0, 0, 5), ack(1, 1, 0, 6)];
        let verdict = verify(&acks, &[stored(0, 7, 1, 0), stored(1, 6, 1, 1)]);
        assert_eq!((verdict.moved, verdict.lost), (2, 0));
        assert!(!verdict.is_clean());
    }

    #[test]
    fn one_producers_records_out_of_send_order_are_reordered() {
        let acks = [ack(1, 0, 0, 1), ack(1, 1, 0, 0)];
        let log = [stored(0, 0, 1, 1), stored(0, 1, 1, 0)];
        let verdict = verify(&acks, &log);
        assert_eq!(verdict.reordered, 1);
        // Different producers, or the same producer in different partitions, do not count.
        let acks = [ack(2, 5, 0, 0), ack(1, 0, 0, 1), ack(1, 9, 1, 0)];
        let log = [stored(0, 0, 2, 5), stored(0, 1, 1, 0), stored(1, 0, 1, 9)];
        assert_eq!(verify(&acks, &log).reordered, 0);
        // A timed-out (unacknowledged) request carried out late is not a reordering.
        let acks = [ack(1, 1, 0, 0)];
        let log = [stored(0, 0, 1, 1), stored(0, 1, 1, 0)];
        let verdict = verify(&acks, &log);
        assert_eq!((verdict.reordered, verdict.unacknowledged_stored), (0, 1));
    }

    #[test]
    fn unacknowledged_records_in_the_log_are_counted_but_allowed() {
        let verdict = verify(
            &[ack(1, 0, 0, 0)],
            &[stored(0, 0, 1, 0), stored(0, 1, 1, 1)],
        );
        assert_eq!(verdict.unacknowledged_stored, 1);
        assert!(verdict.is_clean());
    }

    #[test]
    fn unavailability_runs_from_first_failure_to_first_success_per_fault() {
        let outcome = |at_ms, ok| Outcome {
            at_ms,
            ok,
            partition: Some(0),
        };
        let outcomes = [
            outcome(900, true),
            outcome(1_100, false),
            outcome(1_300, false),
            outcome(1_550, true),
            outcome(5_000, true),
            outcome(9_500, false),
        ];
        let event = |at_ms, description: &str| FaultEvent {
            at_ms,
            description: description.to_owned(),
            affected: vec![0],
        };
        let faults = [
            event(1_000, "kill"),
            event(3_000, "restart"),
            event(9_000, "pause"),
        ];
        let windows = unavailability(&faults, &outcomes);
        assert_eq!(windows[0].unavailable_ms, Some(450));
        assert_eq!(windows[0].first_failure_ms, Some(1_100));
        assert_eq!(windows[0].fault_to_recovery_ms, Some(550));
        assert_eq!(windows[1].unavailable_ms, Some(0), "nothing failed");
        assert_eq!(windows[2].unavailable_ms, None, "never recovered");
        // Requests for partitions the fault did not touch do not end (or start) its window.
        let mut mixed = outcomes.to_vec();
        mixed.push(Outcome {
            at_ms: 1_200,
            ok: true,
            partition: Some(1),
        });
        mixed.sort_unstable_by_key(|o| o.at_ms);
        assert_eq!(unavailability(&faults, &mixed)[0].unavailable_ms, Some(450));
    }
}
