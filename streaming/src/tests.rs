//! The engine against the brute-force reference on random inputs (out of order, late, within
//! and beyond grace, equal timestamps, window boundaries), and edge cases by hand.

use proptest::prelude::*;
use rust_decimal::Decimal;

use crate::aggregate::Aggregation;
use crate::engine::{EmitMode, Engine, Event, Output, Spec, WindowResult};
use crate::reference;
use crate::window::{Window, WindowKind};

fn run(spec: Spec, events: &[Event]) -> (Vec<WindowResult>, Vec<Output>, u64) {
    let mut engine = Engine::new(spec).expect("valid spec");
    let mut outputs = Vec::new();
    for event in events {
        outputs.extend(engine.process(event.clone()));
    }
    let finals = outputs
        .iter()
        .filter_map(|o| match o {
            Output::Final(r) => Some(r.clone()),
            Output::Update(_) => None,
        })
        .collect();
    (finals, outputs, engine.dropped_total())
}

fn kinds() -> impl Strategy<Value = WindowKind> {
    prop_oneof![
        (1i64..40).prop_map(|size_ms| WindowKind::Tumbling { size_ms }),
        (1i64..40, 1i64..40).prop_map(|(a, b)| WindowKind::Hopping {
            size_ms: a.max(b),
            advance_ms: a.min(b)
        }),
        (1i64..30).prop_map(|difference_ms| WindowKind::Sliding { difference_ms }),
        (1i64..30).prop_map(|gap_ms| WindowKind::Session { gap_ms }),
    ]
}

fn specs() -> impl Strategy<Value = Spec> {
    (
        kinds(),
        prop_oneof![
            Just(Aggregation::Count),
            Just(Aggregation::Sum),
            Just(Aggregation::Min),
            Just(Aggregation::Max),
            Just(Aggregation::Avg)
        ],
        0i64..30,
        0i64..20,
        prop_oneof![Just(EmitMode::Final), Just(EmitMode::Update)],
    )
        .prop_map(|(window, aggregation, grace_ms, lateness_ms, emit)| Spec {
            window,
            aggregation,
            grace_ms,
            lateness_ms,
            emit,
        })
}

/// Mostly rising times with jitter back and forth, some far behind (late) and some repeated.
fn events() -> impl Strategy<Value = Vec<Event>> {
    proptest::collection::vec((0usize..3, 0i64..12, -60i64..8, -500i64..500), 1..120).prop_map(
        |steps| {
            let mut clock = 0i64;
            steps
                .into_iter()
                .map(|(key, advance, jitter, cents)| {
                    clock += advance;
                    Event {
                        key: ["a", "b", "c"][key].to_owned(),
                        time: clock + jitter,
                        value: Some(Decimal::new(cents, 2)),
                    }
                })
                .collect()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn the_engine_equals_the_brute_force_reference(spec in specs(), events in events()) {
        let (finals, outputs, dropped) = run(spec, &events);
        let (expected, expected_dropped) = reference::finals(&spec, &events);
        prop_assert_eq!(&finals, &expected);
        prop_assert_eq!(dropped, expected_dropped);
        // Finals come in window order, each window once.
        for pair in finals.windows(2) {
            prop_assert!((pair[0].window.end, pair[0].window.start, &pair[0].key)
                < (pair[1].window.end, pair[1].window.start, &pair[1].key));
        }
        // With updates on, each final window's last update is its final result.
        if spec.emit == EmitMode::Update {
            for f in &finals {
                let last = outputs.iter().rev().find_map(|o| match o {
                    Output::Update(u) if u.key == f.key && u.window == f.window => Some(u),
                    _ => None,
                });
                prop_assert_eq!(last, Some(f));
            }
        }
    }

    #[test]
    fn a_checkpoint_restored_midway_gives_the_same_results(
        spec in specs(), events in events(), cut in 0usize..120
    ) {
        let cut = cut.min(events.len());
        let mut engine = Engine::new(spec).expect("valid spec");
        let mut outputs = Vec::new();
        for event in &events[..cut] {
            outputs.extend(engine.process(event.clone()));
        }
        // As a checkpoint stores it (MessagePack, as every stored value here).
        let saved = rmp_serde::to_vec(&engine).expect("serialize");
        let mut restored: Engine = rmp_serde::from_slice(&saved).expect("deserialize");
        for event in &events[cut..] {
            outputs.extend(restored.process(event.clone()));
        }
        let (_, whole, _) = run(spec, &events);
        prop_assert_eq!(outputs, whole);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// A key's open windows are what it will emit as finals if no more of its records come:
    /// a query of a job's current state shows what the output will get.
    #[test]
    fn open_windows_are_the_finals_still_to_come(spec in specs(), events in events()) {
        let mut engine = Engine::new(spec).expect("valid spec");
        for event in &events {
            engine.process(event.clone());
        }
        let open: Vec<Vec<WindowResult>> =
            ["a", "b", "c"].iter().map(|k| engine.open_windows(k)).collect();
        // A record of another key far in the future closes every window.
        let flush = Event { key: "z".into(), time: 1_000_000, value: Some(Decimal::ONE) };
        let finals: Vec<WindowResult> = engine
            .process(flush)
            .into_iter()
            .filter_map(|o| match o {
                Output::Final(r) => Some(r),
                Output::Update(_) => None,
            })
            .collect();
        for (k, open) in ["a", "b", "c"].iter().zip(open) {
            let mut emitted: Vec<WindowResult> =
                finals.iter().filter(|r| r.key == *k).cloned().collect();
            let mut open = open;
            emitted.sort_by_key(|r| (r.window.start, r.window.end));
            open.sort_by_key(|r| (r.window.start, r.window.end));
            prop_assert_eq!(open, emitted);
        }
    }
}

fn spec(window: WindowKind, aggregation: Aggregation, grace_ms: i64) -> Spec {
    Spec {
        window,
        aggregation,
        grace_ms,
        lateness_ms: 0,
        emit: EmitMode::Final,
    }
}

fn at(key: &str, time: i64, value: i64) -> Event {
    Event {
        key: key.to_owned(),
        time,
        value: Some(Decimal::from(value)),
    }
}

#[test]
fn a_record_in_the_gap_merges_two_sessions() {
    let spec = spec(WindowKind::Session { gap_ms: 10 }, Aggregation::Sum, 100);
    // Two sessions [0, 5] and [20, 20], then 12 falls within 10 of both; then time moves on.
    let (finals, _, _) = run(
        spec,
        &[
            at("k", 0, 1),
            at("k", 5, 2),
            at("k", 20, 4),
            at("k", 12, 8),
            at("k", 500, 0),
        ],
    );
    assert_eq!(finals.len(), 1, "{finals:?}");
    assert_eq!(finals[0].window, Window { start: 0, end: 21 });
    assert_eq!(finals[0].value, Some(Decimal::from(15)));
    assert_eq!(
        finals[0].late, 1,
        "12 came after the watermark (20) had passed it"
    );
}

#[test]
fn tumbling_boundaries_are_half_open_and_late_records_are_counted_or_dropped() {
    let spec = spec(WindowKind::Tumbling { size_ms: 10 }, Aggregation::Count, 5);
    let events = [
        at("k", 9, 0),  // [0, 10)
        at("k", 10, 0), // [10, 20)
        at("k", 14, 0), // stream time 14: [0, 10) closes at 15
        at("k", 3, 0),  // behind the watermark, within grace: late, counted
        at("k", 15, 0), // [0, 10) closes
        at("k", 4, 0),  // too late: dropped
        at("k", 40, 0),
    ];
    let (finals, _, dropped) = run(spec, &events);
    assert_eq!(finals[0].window, Window { start: 0, end: 10 });
    assert_eq!((finals[0].aggregate.count, finals[0].late), (2, 1));
    assert_eq!(finals[1].window, Window { start: 10, end: 20 });
    assert_eq!(finals[1].aggregate.count, 3);
    assert_eq!(dropped, 1);
}

#[test]
fn a_hopping_sum_equals_its_windows_recomputed_record_by_record() {
    let spec = spec(
        WindowKind::Hopping {
            size_ms: 10,
            advance_ms: 4,
        },
        Aggregation::Sum,
        0,
    );
    let events: Vec<Event> = (0..40)
        .map(|t| at("k", t, t))
        .chain([at("k", 100, 0)])
        .collect();
    let (finals, _, _) = run(spec, &events);
    for f in &finals {
        let expected: i64 = (f.window.start.max(0)..f.window.end.min(40)).sum();
        assert_eq!(f.value, Some(Decimal::from(expected)), "{:?}", f.window);
    }
    assert_eq!(
        finals.first().map(|f| f.window),
        Some(Window { start: -8, end: 2 })
    );
}

#[test]
fn sliding_windows_appear_as_records_enter_and_leave() {
    let spec = spec(
        WindowKind::Sliding { difference_ms: 10 },
        Aggregation::Count,
        0,
    );
    let (finals, _, _) = run(spec, &[at("k", 5, 0), at("k", 12, 0), at("k", 100, 0)]);
    let windows: Vec<(Window, u64)> = finals
        .iter()
        .map(|f| (f.window, f.aggregate.count))
        .collect();
    assert_eq!(
        windows,
        vec![
            (Window { start: -5, end: 6 }, 1), // 5 enters
            (Window { start: 2, end: 13 }, 2), // 12 enters, 5 still in
            (Window { start: 6, end: 17 }, 1), // 5 left: 12 alone
        ]
    );
}
