//! The window engine: events in (in the order the log holds them), results out. All of its
//! state is in [`Engine`], which serializes whole: a checkpoint is the engine as of an input
//! offset, and the same events after it give the same results on any broker.

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregate, Aggregation};
use crate::panes::{Panes, Slice};
use crate::window::{aligned_windows, gcd, SpecError, Window, WindowKind, SPAN_MAX_MS};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmitMode {
    /// Once per window, when it closes.
    Final,
    /// After every change as well.
    Update,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub window: WindowKind,
    pub aggregation: Aggregation,
    /// How long after its end a window still takes records.
    pub grace_ms: i64,
    /// How far behind stream time the watermark runs.
    pub lateness_ms: i64,
    pub emit: EmitMode,
}

impl Spec {
    pub fn validate(&self) -> Result<(), SpecError> {
        self.window.validate()?;
        for (value, name) in [
            (self.grace_ms, "grace_ms"),
            (self.lateness_ms, "lateness_ms"),
        ] {
            if value < 0 {
                return Err(SpecError::Negative(name));
            }
            if value > SPAN_MAX_MS {
                return Err(SpecError::TooLarge(name, SPAN_MAX_MS));
            }
        }
        Ok(())
    }
}

/// One input record as the job sees it: its group key, event time and numeric value (None
/// when the aggregation needs none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub key: String,
    pub time: i64,
    pub value: Option<Decimal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowResult {
    pub key: String,
    pub window: Window,
    pub aggregate: Aggregate,
    /// The spec's aggregation of it.
    pub value: Option<Decimal>,
    /// Records it took after the watermark had passed their time (within grace).
    pub late: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Final(WindowResult),
    Update(WindowResult),
}

/// A sliding window's record, kept while a window that may hold it is open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Buffered {
    time: i64,
    value: Option<Decimal>,
    late: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    first: i64,
    last: i64,
    aggregate: Aggregate,
    late: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Engine {
    spec: Spec,
    stream_time: Option<i64>,
    /// Every window ending at or before this has closed (None: none yet).
    closed_through: Option<i64>,
    /// Tumbling/hopping: per key, slice start → aggregate; and per slice start, the keys
    /// with data in it (so closing a window touches only its own slices).
    slices: BTreeMap<String, BTreeMap<i64, Slice>>,
    slice_keys: BTreeMap<i64, BTreeSet<String>>,
    /// Per key, the slices of its last closed window as a two-stack queue: a cache (results
    /// are exact whichever way they are summed), so not part of a checkpoint.
    #[serde(skip)]
    panes: std::collections::HashMap<String, Panes>,
    /// Sliding: per key, its records in time order.
    buffers: BTreeMap<String, Vec<Buffered>>,
    /// Session: per key, its open sessions in time order, and the closed ones a record could
    /// still fall within the gap of.
    sessions: BTreeMap<String, Vec<Session>>,
    closed_sessions: BTreeMap<String, Vec<(i64, i64)>>,
    /// Records dropped as too late: per (key, window) for time windows; per key (window
    /// `[t, t + 1)` of the record) for sessions. Bounded by [`Engine::forget_dropped_before`].
    dropped: BTreeMap<(String, Window), u64>,
    dropped_total: u64,
}

impl Engine {
    pub fn new(spec: Spec) -> Result<Self, SpecError> {
        spec.validate()?;
        Ok(Self {
            spec,
            stream_time: None,
            closed_through: None,
            slices: BTreeMap::new(),
            slice_keys: BTreeMap::new(),
            panes: std::collections::HashMap::new(),
            buffers: BTreeMap::new(),
            sessions: BTreeMap::new(),
            closed_sessions: BTreeMap::new(),
            dropped: BTreeMap::new(),
            dropped_total: 0,
        })
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    pub fn stream_time(&self) -> Option<i64> {
        self.stream_time
    }

    pub fn watermark(&self) -> Option<i64> {
        self.stream_time.map(|s| s - self.spec.lateness_ms)
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    /// Records dropped as too late, per (key, window).
    pub fn dropped(&self) -> &BTreeMap<(String, Window), u64> {
        &self.dropped
    }

    /// Keep the per-window drop counts of windows ending at or after `end` only.
    pub fn forget_dropped_before(&mut self, end: i64) {
        self.dropped.retain(|(_, w), _| w.end >= end);
    }

    /// The windows of `key` still open (not yet emitted as final), with their aggregates so
    /// far: what a query of a job's current state answers. Sessions as `[first, last + 1)`.
    pub fn open_windows(&self, key: &str) -> Vec<WindowResult> {
        let after = self.closed_through.unwrap_or(i64::MIN);
        let mut open = Vec::new();
        match self.spec.window {
            WindowKind::Tumbling { .. } | WindowKind::Hopping { .. } => {
                let (Some((size, advance)), Some(slices)) =
                    (self.spec.window.aligned(), self.slices.get(key))
                else {
                    return open;
                };
                let windows: BTreeSet<Window> = slices
                    .keys()
                    .flat_map(|start| aligned_windows(size, advance, *start))
                    .filter(|w| w.end > after)
                    .collect();
                for window in windows {
                    let slice = self.window_slice(key, window);
                    if slice.aggregate.count > 0 {
                        open.push(self.result(key, window, slice.aggregate, slice.late));
                    }
                }
            }
            WindowKind::Sliding { difference_ms } => {
                if let Some(buffer) = self.buffers.get(key) {
                    for window in sliding_windows(buffer, difference_ms) {
                        if window.end > after {
                            let (aggregate, late) = sliding_aggregate(buffer, window);
                            open.push(self.result(key, window, aggregate, late));
                        }
                    }
                }
            }
            WindowKind::Session { .. } => {
                for session in self.sessions.get(key).into_iter().flatten() {
                    let window = Window {
                        start: session.first,
                        end: session.last + 1,
                    };
                    open.push(self.result(key, window, session.aggregate.clone(), session.late));
                }
            }
        }
        open
    }

    /// Take one event; returns the results it closed or changed, finals in window order.
    pub fn process(&mut self, event: Event) -> Vec<Output> {
        let stream_time = self.stream_time.map_or(event.time, |s| s.max(event.time));
        self.stream_time = Some(stream_time);
        let watermark = stream_time - self.spec.lateness_ms;
        let mut out = Vec::new();
        match self.spec.window {
            WindowKind::Tumbling { .. } | WindowKind::Hopping { .. } => {
                self.aligned_event(event, watermark, &mut out);
                self.close_aligned(watermark, &mut out);
            }
            WindowKind::Sliding { difference_ms } => {
                self.sliding_event(event, watermark, difference_ms, &mut out);
                self.close_sliding(watermark, difference_ms, &mut out);
            }
            WindowKind::Session { gap_ms } => {
                // Closing first: a record within the gap of a session that just closed is late.
                self.close_sessions(watermark, gap_ms, &mut out);
                self.session_event(event, watermark, gap_ms, &mut out);
            }
        }
        out
    }

    fn drop_record(&mut self, key: &str, window: Window) {
        *self.dropped.entry((key.to_owned(), window)).or_default() += 1;
        self.dropped_total += 1;
    }

    fn result(&self, key: &str, window: Window, aggregate: Aggregate, late: u64) -> WindowResult {
        WindowResult {
            key: key.to_owned(),
            window,
            value: aggregate.result(self.spec.aggregation),
            aggregate,
            late,
        }
    }

    // Tumbling and hopping: slices of gcd(size, advance).

    fn aligned_event(&mut self, event: Event, watermark: i64, out: &mut Vec<Output>) {
        let Some((size, advance)) = self.spec.window.aligned() else {
            return;
        };
        let grace = self.spec.grace_ms;
        let t = event.time;
        // The earliest window holding t closes first; with it open (the common case) so are
        // the rest, and nothing needs listing unless the record is late or updates go out.
        let earliest_end = (t - size).div_euclid(advance) * advance + advance + size;
        let late = t < watermark;
        let mut open = Vec::new();
        if watermark >= earliest_end + grace || late || self.spec.emit == EmitMode::Update {
            for window in aligned_windows(size, advance, t) {
                if watermark >= window.end + grace {
                    self.drop_record(&event.key, window);
                } else {
                    open.push(window);
                }
            }
            if open.is_empty() {
                return;
            }
        }
        let slice = gcd(size, advance);
        let start = t.div_euclid(slice) * slice;
        let slices = match self.slices.get_mut(&event.key) {
            Some(slices) => slices,
            None => self.slices.entry(event.key.clone()).or_default(),
        };
        let fresh = !slices.contains_key(&start);
        let entry = slices.entry(start).or_default();
        entry.aggregate.add(event.value);
        // Late in every open window holding it: they all hold its slice (closed ones, which
        // dropped it, were emitted already).
        entry.late += u64::from(late);
        // A late record changed a slice a cached window already summed: sum it again.
        if self.panes.get(&event.key).is_some_and(|p| start < p.to) {
            self.panes.remove(&event.key);
        }
        if fresh {
            self.slice_keys
                .entry(start)
                .or_default()
                .insert(event.key.clone());
        }
        if self.spec.emit == EmitMode::Update {
            for window in open {
                let slice = self.window_slice(&event.key, window);
                out.push(Output::Update(self.result(
                    &event.key,
                    window,
                    slice.aggregate,
                    slice.late,
                )));
            }
        }
    }

    fn window_slice(&self, key: &str, window: Window) -> Slice {
        let mut total = Slice::default();
        if let Some(slices) = self.slices.get(key) {
            for (_, slice) in slices.range(window.start..window.end) {
                total.merge(slice);
            }
        }
        total
    }

    fn close_aligned(&mut self, watermark: i64, out: &mut Vec<Output>) {
        let Some((size, advance)) = self.spec.window.aligned() else {
            return;
        };
        let through = watermark - self.spec.grace_ms;
        if self.closed_through.is_some_and(|c| c >= through) {
            return;
        }
        // The first window end past what closed before that can hold data.
        let first_end_holding =
            |slice: i64| (slice - size).div_euclid(advance) * advance + advance + size;
        let mut end = match self.slice_keys.keys().next() {
            Some(first) => first_end_holding(*first),
            None => i64::MAX,
        };
        if let Some(after) = self.closed_through {
            end = end.max((after - size).div_euclid(advance) * advance + advance + size);
        }
        let mut finals = Vec::new();
        while end <= through {
            let window = Window {
                start: end - size,
                end,
            };
            if self
                .slice_keys
                .range(window.start..window.end)
                .next()
                .is_none()
            {
                // Nothing until the next slice with data: skip the empty windows between.
                match self.slice_keys.range(window.end..).next() {
                    Some((next, _)) => end = (end + advance).max(first_end_holding(*next)),
                    None => break,
                }
                continue;
            }
            // Every key with slices at all has them in an open window (closed ones are
            // pruned): going through them in order beats collecting the window's keys.
            for (key, slices) in &self.slices {
                let panes = match self.panes.get_mut(key) {
                    Some(panes) => panes,
                    None => self
                        .panes
                        .entry(key.clone())
                        .or_insert_with(|| Panes::new(window.start)),
                };
                for (start, slice) in slices.range(panes.to.max(window.start)..window.end) {
                    panes.push(*start, slice);
                }
                panes.to = panes.to.max(window.end);
                panes.pop_before(window.start);
                let total = panes.total();
                if total.aggregate.count > 0 {
                    finals.push(self.result(key, window, total.aggregate, total.late));
                }
            }
            end += advance;
        }
        out.extend(finals.into_iter().map(Output::Final));
        self.closed_through = Some(through);
        // A slice is needed while a window holding it is open: its last window ends one size
        // after the last window start at or before it.
        while let Some((&slice, _)) = self.slice_keys.first_key_value() {
            if slice.div_euclid(advance) * advance + size > through {
                break;
            }
            for key in self.slice_keys.remove(&slice).unwrap_or_default() {
                if let Some(slices) = self.slices.get_mut(&key) {
                    slices.remove(&slice);
                    if slices.is_empty() {
                        self.slices.remove(&key);
                        self.panes.remove(&key);
                    }
                }
            }
        }
    }

    // Sliding: records buffered while a window that may hold them is open.

    fn sliding_event(
        &mut self,
        event: Event,
        watermark: i64,
        difference: i64,
        out: &mut Vec<Output>,
    ) {
        let grace = self.spec.grace_ms;
        // Its left window [t − d, t] is the first of its windows to close; with it open, so
        // are all the others that hold it.
        if watermark >= event.time + 1 + grace {
            self.drop_record(
                &event.key,
                Window {
                    start: event.time - difference,
                    end: event.time + 1,
                },
            );
            return;
        }
        let buffer = self.buffers.entry(event.key.clone()).or_default();
        let at = buffer.partition_point(|b| b.time <= event.time);
        buffer.insert(
            at,
            Buffered {
                time: event.time,
                value: event.value,
                late: event.time < watermark,
            },
        );
        if self.spec.emit == EmitMode::Update {
            let t = event.time;
            let windows: BTreeSet<Window> = sliding_windows(buffer, difference)
                .into_iter()
                .filter(|w| (w.start <= t && t < w.end) || w.start == t + 1)
                .collect();
            for window in windows {
                let (aggregate, late) = sliding_aggregate(buffer, window);
                out.push(Output::Update(WindowResult {
                    key: event.key.clone(),
                    window,
                    value: aggregate.result(self.spec.aggregation),
                    aggregate,
                    late,
                }));
            }
        }
    }

    fn close_sliding(&mut self, watermark: i64, difference: i64, out: &mut Vec<Output>) {
        let through = watermark - self.spec.grace_ms;
        if self.closed_through.is_some_and(|c| c >= through) {
            return;
        }
        let after = self.closed_through.unwrap_or(i64::MIN);
        let mut finals = Vec::new();
        for (key, buffer) in &self.buffers {
            for window in sliding_windows(buffer, difference) {
                if window.end > after && window.end <= through {
                    let (aggregate, late) = sliding_aggregate(buffer, window);
                    finals.push(WindowResult {
                        key: key.clone(),
                        window,
                        value: aggregate.result(self.spec.aggregation),
                        aggregate,
                        late,
                    });
                }
            }
        }
        finals.sort_by(|a, b| {
            (a.window.end, a.window.start, &a.key).cmp(&(b.window.end, b.window.start, &b.key))
        });
        out.extend(finals.into_iter().map(Output::Final));
        self.closed_through = Some(through);
        // Open windows end after `through`, so start after `through − d − 1`; a record's right
        // window ends at t + 2 + d.
        for buffer in self.buffers.values_mut() {
            buffer.retain(|b| b.time + 2 + difference > through);
        }
        self.buffers.retain(|_, b| !b.is_empty());
    }

    // Sessions.

    fn close_sessions(&mut self, watermark: i64, gap: i64, out: &mut Vec<Output>) {
        let grace = self.spec.grace_ms;
        let mut finals = Vec::new();
        for (key, sessions) in &mut self.sessions {
            let closed = self.closed_sessions.entry(key.clone()).or_default();
            sessions.retain(|s| {
                if watermark >= s.last + gap + 1 + grace {
                    closed.push((s.first, s.last));
                    finals.push((key.clone(), s.clone()));
                    false
                } else {
                    true
                }
            });
        }
        self.sessions.retain(|_, s| !s.is_empty());
        // A record within the gap of a closed session is late anyway once its own session
        // [t, t] would be closed: past last + 2·gap + grace, the closed session is not needed.
        for closed in self.closed_sessions.values_mut() {
            closed.retain(|(_, last)| watermark < last + 2 * gap + 1 + grace);
        }
        self.closed_sessions.retain(|_, c| !c.is_empty());
        let mut finals: Vec<WindowResult> = finals
            .into_iter()
            .map(|(key, s)| {
                let window = Window {
                    start: s.first,
                    end: s.last + 1,
                };
                self.result(&key, window, s.aggregate, s.late)
            })
            .collect();
        finals.sort_by(|a, b| {
            (a.window.end, a.window.start, &a.key).cmp(&(b.window.end, b.window.start, &b.key))
        });
        out.extend(finals.into_iter().map(Output::Final));
    }

    fn session_event(&mut self, event: Event, watermark: i64, gap: i64, out: &mut Vec<Output>) {
        let t = event.time;
        let grace = self.spec.grace_ms;
        let near_closed = self
            .closed_sessions
            .get(&event.key)
            .is_some_and(|c| c.iter().any(|(f, l)| f - gap <= t && t <= l + gap));
        if near_closed || watermark >= t + gap + 1 + grace {
            self.drop_record(
                &event.key,
                Window {
                    start: t,
                    end: t + 1,
                },
            );
            return;
        }
        let sessions = self.sessions.entry(event.key.clone()).or_default();
        let mut merged = Session {
            first: t,
            last: t,
            aggregate: Aggregate::default(),
            late: u64::from(t < watermark),
        };
        merged.aggregate.add(event.value);
        sessions.retain(|s| {
            if s.first - gap <= t && t <= s.last + gap {
                merged.first = merged.first.min(s.first);
                merged.last = merged.last.max(s.last);
                merged.aggregate.merge(&s.aggregate);
                merged.late += s.late;
                false
            } else {
                true
            }
        });
        let at = sessions.partition_point(|s| s.first < merged.first);
        sessions.insert(at, merged.clone());
        if self.spec.emit == EmitMode::Update {
            let window = Window {
                start: merged.first,
                end: merged.last + 1,
            };
            out.push(Output::Update(self.result(
                &event.key,
                window,
                merged.aggregate,
                merged.late,
            )));
        }
    }
}

/// The sliding windows a key's buffered records define: each record's left window, and its
/// right window when that holds a record.
fn sliding_windows(buffer: &[Buffered], difference: i64) -> BTreeSet<Window> {
    let mut windows = BTreeSet::new();
    for b in buffer {
        windows.insert(Window {
            start: b.time - difference,
            end: b.time + 1,
        });
        let right = Window {
            start: b.time + 1,
            end: b.time + 2 + difference,
        };
        if buffer
            .iter()
            .any(|o| right.start <= o.time && o.time < right.end)
        {
            windows.insert(right);
        }
    }
    windows
}

fn sliding_aggregate(buffer: &[Buffered], window: Window) -> (Aggregate, u64) {
    let mut aggregate = Aggregate::default();
    let mut late = 0;
    for b in buffer
        .iter()
        .filter(|b| window.start <= b.time && b.time < window.end)
    {
        aggregate.add(b.value);
        late += u64::from(b.late);
    }
    (aggregate, late)
}
