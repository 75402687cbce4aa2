//! A brute-force recomputation of the same definitions, for tests: every record is kept, every
//! window enumerated, nothing incremental. The engine must agree with it exactly.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use crate::aggregate::Aggregate;
use crate::engine::{Event, Spec, WindowResult};
use crate::window::{Window, WindowKind};

/// The records a window or session took: each one's value and whether it came late.
type Taken = Vec<(Option<Decimal>, bool)>;

struct Kept {
    key: String,
    time: i64,
    value: Option<Decimal>,
    late: bool,
}

/// The results of every window closed once all `events` are in (in window order), and how
/// many records were dropped.
pub fn finals(spec: &Spec, events: &[Event]) -> (Vec<WindowResult>, u64) {
    let grace = spec.grace_ms;
    let mut stream_time: Option<i64> = None;
    let mut dropped = 0u64;
    // Time windows: (window, key) → the records it took.
    let mut taken: BTreeMap<(Window, String), Taken> = BTreeMap::new();
    let mut kept: Vec<Kept> = Vec::new();
    let mut watermark = i64::MIN;
    for event in events {
        let s = stream_time.map_or(event.time, |s| s.max(event.time));
        stream_time = Some(s);
        watermark = s - spec.lateness_ms;
        let t = event.time;
        let late = t < watermark;
        match spec.window {
            WindowKind::Tumbling { size_ms } | WindowKind::Hopping { size_ms, .. } => {
                let advance = match spec.window {
                    WindowKind::Hopping { advance_ms, .. } => advance_ms,
                    _ => size_ms,
                };
                // Every window start k·advance with start ≤ t < start + size.
                let mut k = (t - size_ms).div_euclid(advance) - 1;
                while k * advance <= t {
                    let window = Window {
                        start: k * advance,
                        end: k * advance + size_ms,
                    };
                    if window.start <= t && t < window.end {
                        if watermark >= window.end + grace {
                            dropped += 1;
                        } else {
                            taken
                                .entry((window, event.key.clone()))
                                .or_default()
                                .push((event.value, late));
                        }
                    }
                    k += 1;
                }
            }
            WindowKind::Sliding { .. } => {
                if watermark >= t + 1 + grace {
                    dropped += 1;
                } else {
                    kept.push(Kept {
                        key: event.key.clone(),
                        time: t,
                        value: event.value,
                        late,
                    });
                }
            }
            WindowKind::Session { gap_ms } => {
                let closed = sessions(&kept, &event.key, gap_ms)
                    .into_iter()
                    .filter(|(_, last, _)| watermark >= last + gap_ms + 1 + grace)
                    .any(|(first, last, _)| first - gap_ms <= t && t <= last + gap_ms);
                if closed || watermark >= t + gap_ms + 1 + grace {
                    dropped += 1;
                } else {
                    kept.push(Kept {
                        key: event.key.clone(),
                        time: t,
                        value: event.value,
                        late,
                    });
                }
            }
        }
    }
    let mut results = Vec::new();
    let through = watermark - grace;
    let result = |key: &str, window: Window, records: &[(Option<Decimal>, bool)]| {
        let mut aggregate = Aggregate::default();
        records.iter().for_each(|(v, _)| aggregate.add(*v));
        WindowResult {
            key: key.to_owned(),
            window,
            value: aggregate.result(spec.aggregation),
            aggregate,
            late: records.iter().filter(|(_, late)| *late).count() as u64,
        }
    };
    match spec.window {
        WindowKind::Tumbling { .. } | WindowKind::Hopping { .. } => {
            for ((window, key), records) in &taken {
                if window.end <= through {
                    results.push(result(key, *window, records));
                }
            }
        }
        WindowKind::Sliding { difference_ms } => {
            let mut windows: BTreeMap<(Window, String), ()> = BTreeMap::new();
            for k in &kept {
                windows.insert(
                    (
                        Window {
                            start: k.time - difference_ms,
                            end: k.time + 1,
                        },
                        k.key.clone(),
                    ),
                    (),
                );
                let right = Window {
                    start: k.time + 1,
                    end: k.time + 2 + difference_ms,
                };
                if kept
                    .iter()
                    .any(|o| o.key == k.key && right.start <= o.time && o.time < right.end)
                {
                    windows.insert((right, k.key.clone()), ());
                }
            }
            for (window, key) in windows.keys() {
                if window.end <= through {
                    let records: Taken = kept
                        .iter()
                        .filter(|k| &k.key == key && window.start <= k.time && k.time < window.end)
                        .map(|k| (k.value, k.late))
                        .collect();
                    results.push(result(key, *window, &records));
                }
            }
        }
        WindowKind::Session { gap_ms } => {
            let mut keys: Vec<&String> = kept.iter().map(|k| &k.key).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                for (first, last, records) in sessions(&kept, key, gap_ms) {
                    if watermark >= last + gap_ms + 1 + grace {
                        results.push(result(
                            key,
                            Window {
                                start: first,
                                end: last + 1,
                            },
                            &records,
                        ));
                    }
                }
            }
        }
    }
    results.sort_by(|a, b| {
        (a.window.end, a.window.start, &a.key).cmp(&(b.window.end, b.window.start, &b.key))
    });
    (results, dropped)
}

/// The sessions of `key` among the kept records: chains of records at most `gap` apart.
fn sessions(kept: &[Kept], key: &str, gap: i64) -> Vec<(i64, i64, Taken)> {
    let mut mine: Vec<&Kept> = kept.iter().filter(|k| k.key == key).collect();
    mine.sort_by_key(|k| k.time);
    let mut out: Vec<(i64, i64, Taken)> = Vec::new();
    for k in mine {
        match out.last_mut() {
            Some((_, last, records)) if k.time - *last <= gap => {
                *last = k.time;
                records.push((k.value, k.late));
            }
            _ => out.push((k.time, k.time, vec![(k.value, k.late)])),
        }
    }
    out
}
