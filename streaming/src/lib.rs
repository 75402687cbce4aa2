//! Windowed aggregations for PubG1's stream jobs, as pure, deterministic code with no runtime:
//! events in, window results out, the same for the same input on every broker.
//!
//! Definitions follow Kafka Streams' (its `TimeWindows`, `SlidingWindows` (KIP-450) and
//! `SessionWindows` javadoc). Times are milliseconds; every window is reported as
//! `[start, end)`, start inclusive and end exclusive:
//!
//! - **Tumbling** (`size`): `[k·size, (k+1)·size)`, aligned to the epoch.
//! - **Hopping** (`size`, `advance ≤ size`): `[k·advance, k·advance + size)`; a record is in
//!   `size/advance` of them. Computed by slicing: a record updates one slice of
//!   `gcd(size, advance)`, and a window is the sum of its slices.
//! - **Sliding** (`difference`): windows of `difference + 1` ms with both ends inclusive in
//!   Kafka's terms, created as records enter and leave: for each record at `t`, its *left*
//!   window `[t − difference, t]` and, when it holds any record, its *right* window
//!   `[t + 1, t + 1 + difference]` (reported as `[t − difference, t + 1)` and
//!   `[t + 1, t + 2 + difference)`).
//! - **Session** (`gap`): records of a key less than or exactly `gap` apart form one session
//!   `[first, last]` (Kafka Streams' definition, not Flink's `[first, last + gap)`); a record in
//!   the gap between two sessions merges them. Reported as `[first, last + 1)`.
//!
//! **Time.** Stream time is the largest event time seen (the record being processed
//! included); the watermark is stream time − `lateness`. A window closes when the watermark
//! reaches its end + `grace` (a session's end + `gap` + `grace`: until then a record could still
//! extend it). A record that belongs only to closed windows is *dropped* and counted
//! (per window for time windows, per key for sessions), never silently lost; a record later
//! than the watermark but within grace is included and counted as *late* in each window it
//! joins. Results are emitted once, when their window closes (`EmitMode::Final`), and, with
//! `EmitMode::Update`, also after every change.
//!
//! **Exactness.** Values are decimals (`rust_decimal`, from the JSON number's text), so a
//! sum is the same whatever order or grouping its additions took: a hopping window summed from
//! slices equals the sum recomputed record by record, and an offline recomputation equals the
//! job's output exactly.

pub mod aggregate;
pub mod engine;
pub mod extract;
mod panes;
pub mod window;

pub use aggregate::{Aggregate, Aggregation};
pub use engine::{EmitMode, Engine, Event, Output, Spec, WindowResult};
pub use rust_decimal::Decimal;
pub use window::{SpecError, Window, WindowKind};

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;
