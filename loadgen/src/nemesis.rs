//! The seeded nemesis: a random fault timeline that anyone can replay from its seed.
//!
//! Single faults do not find the bugs that lose data in replicated logs; sequences do (a
//! restart inside a flush interval, a crash during a snapshot install, a pause while another
//! broker recovers). The nemesis draws kill -9, SIGSTOP and network isolation on random
//! brokers, leaders and followers alike, each undone (restart, SIGCONT, heal) after a random
//! gap, with random gaps between faults: from 0.2 s, so restarts land inside the 5 s flush
//! interval and during recoveries, to 5 s. At most one broker is unavailable at a time, so a
//! majority of every partition stays up and everything acknowledged must survive.
//!
//! Pure: the same seed, fault count and broker count give the same timeline (ChaCha8 is
//! specified, unlike `StdRng`), so a failing seed can be rerun exactly.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::scenario::{Action, Fault};

/// Shortest gap between two steps of the timeline, in seconds.
pub const GAP_MIN_S: f64 = 0.2;
/// Longest gap between two steps of the timeline, in seconds.
pub const GAP_MAX_S: f64 = 5.0;

/// `faults` steps (each break and each repair counts as one) on brokers `1..=brokers`, starting
/// `start_s` into the run. With `isolate`, network isolation is among the faults (it needs
/// loadgen's proxies). The timeline always ends with every broker back.
pub fn timeline(seed: u64, faults: usize, brokers: u32, isolate: bool, start_s: f64) -> Vec<Fault> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut at_s = start_s;
    let mut out = Vec::with_capacity(faults + 1);
    // The broker down now and how to bring it back.
    let mut down: Option<(u32, Action)> = None;
    while out.len() < faults || down.is_some() {
        at_s += rng.gen_range(GAP_MIN_S..=GAP_MAX_S);
        let (action, target) = match down.take() {
            Some((broker, repair)) => (repair, broker),
            None => {
                let broker = rng.gen_range(1..=brokers.max(1));
                let kinds: &[(Action, Action)] = if isolate {
                    &[
                        (Action::Kill, Action::Restart),
                        (Action::Pause, Action::Resume),
                        (Action::Isolate, Action::Heal),
                    ]
                } else {
                    &[
                        (Action::Kill, Action::Restart),
                        (Action::Pause, Action::Resume),
                    ]
                };
                let (fault, repair) = kinds[rng.gen_range(0..kinds.len())];
                down = Some((broker, repair));
                (fault, broker)
            }
        };
        out.push(Fault {
            at_s: (at_s * 1000.0).round() / 1000.0,
            action,
            target: format!("broker:{target}"),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_timeline_and_another_seed_another() {
        let a = timeline(7, 100, 3, true, 1.0);
        let b = timeline(7, 100, 3, true, 1.0);
        let c = timeline(8, 100, 3, true, 1.0);
        let show = |t: &[Fault]| {
            t.iter()
                .map(|f| format!("{} {:?} {}", f.at_s, f.action, f.target))
                .collect::<Vec<_>>()
        };
        assert_eq!(show(&a), show(&b));
        assert_ne!(show(&a), show(&c));
    }

    #[test]
    fn one_broker_at_a_time_is_down_and_every_one_comes_back() {
        for seed in 0..50 {
            let faults = timeline(seed, 101, 3, true, 0.0);
            assert!(faults.len() >= 101);
            let mut down: Option<(String, Action)> = None;
            let mut last = 0.0;
            for fault in &faults {
                let gap = fault.at_s - last;
                assert!(
                    (GAP_MIN_S - 0.001..=GAP_MAX_S + 0.001).contains(&gap),
                    "{gap}"
                );
                last = fault.at_s;
                match down.take() {
                    Some((target, repair)) => {
                        assert_eq!(fault.target, target, "seed {seed}: repair another broker");
                        assert_eq!(fault.action, repair);
                    }
                    None => {
                        let repair = match fault.action {
                            Action::Kill => Action::Restart,
                            Action::Pause => Action::Resume,
                            Action::Isolate => Action::Heal,
                            other => panic!("seed {seed}: {other:?} while every broker is up"),
                        };
                        down = Some((fault.target.clone(), repair));
                    }
                }
            }
            assert!(
                down.is_none(),
                "seed {seed}: the timeline ends with a broker down"
            );
        }
    }

    #[test]
    fn every_kind_of_fault_is_drawn() {
        let faults = timeline(1, 200, 3, true, 0.0);
        for action in [Action::Kill, Action::Pause, Action::Isolate] {
            assert!(faults.iter().any(|f| f.action == action), "{action:?}");
        }
        let without = timeline(1, 200, 3, false, 0.0);
        assert!(without.iter().all(|f| f.action != Action::Isolate));
    }
}
