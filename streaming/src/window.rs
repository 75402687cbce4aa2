//! Window kinds, their validation, and which time windows hold a timestamp.

use serde::{Deserialize, Serialize};

/// A window as reported: `[start, end)` in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Window {
    pub start: i64,
    pub end: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WindowKind {
    Tumbling { size_ms: i64 },
    Hopping { size_ms: i64, advance_ms: i64 },
    Sliding { difference_ms: i64 },
    Session { gap_ms: i64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{0} must be positive")]
    NotPositive(&'static str),
    #[error("advance_ms ({advance}) must not exceed size_ms ({size})")]
    HopLargerThanSize { advance: i64, size: i64 },
    #[error("{0} must not be negative")]
    Negative(&'static str),
    #[error("{0} is larger than a stream job allows (at most {1} ms)")]
    TooLarge(&'static str, i64),
    #[error("size_ms / advance_ms is {windows}: a record would be in that many windows (at most {WINDOWS_PER_RECORD_MAX})")]
    TooManyWindows { windows: i64 },
}

/// Hopping windows a record may be in, at most.
pub const WINDOWS_PER_RECORD_MAX: i64 = 1000;

/// Longest window, gap, grace or lateness: a year (keeps every sum of times far from overflow).
pub const SPAN_MAX_MS: i64 = 366 * 24 * 3600 * 1000;

impl WindowKind {
    pub fn validate(&self) -> Result<(), SpecError> {
        let positive = |value: i64, name: &'static str| {
            if value <= 0 {
                Err(SpecError::NotPositive(name))
            } else if value > SPAN_MAX_MS {
                Err(SpecError::TooLarge(name, SPAN_MAX_MS))
            } else {
                Ok(())
            }
        };
        match *self {
            WindowKind::Tumbling { size_ms } => positive(size_ms, "size_ms"),
            WindowKind::Hopping {
                size_ms,
                advance_ms,
            } => {
                positive(size_ms, "size_ms")?;
                positive(advance_ms, "advance_ms")?;
                if advance_ms > size_ms {
                    return Err(SpecError::HopLargerThanSize {
                        advance: advance_ms,
                        size: size_ms,
                    });
                }
                // Each record is in size/advance windows: bounded, so one record cannot make
                // millions of updates, nor a query of a key's windows run for minutes.
                if size_ms / advance_ms > WINDOWS_PER_RECORD_MAX {
                    return Err(SpecError::TooManyWindows {
                        windows: size_ms / advance_ms,
                    });
                }
                Ok(())
            }
            WindowKind::Sliding { difference_ms } => positive(difference_ms, "difference_ms"),
            WindowKind::Session { gap_ms } => positive(gap_ms, "gap_ms"),
        }
    }

    /// (size, advance) of a time-aligned kind (tumbling: advance = size).
    pub(crate) fn aligned(&self) -> Option<(i64, i64)> {
        match *self {
            WindowKind::Tumbling { size_ms } => Some((size_ms, size_ms)),
            WindowKind::Hopping {
                size_ms,
                advance_ms,
            } => Some((size_ms, advance_ms)),
            _ => None,
        }
    }
}

/// The aligned windows `[k·advance, k·advance + size)` that hold `t`, earliest first.
pub(crate) fn aligned_windows(size: i64, advance: i64, t: i64) -> Vec<Window> {
    // The last window starting at or before t, then back while it still holds t.
    let last_start = t.div_euclid(advance) * advance;
    let mut windows = Vec::new();
    let mut start = last_start;
    while start + size > t {
        windows.push(Window {
            start,
            end: start + size,
        });
        start -= advance;
    }
    windows.reverse();
    windows
}

pub(crate) fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hopping_record_is_in_size_over_advance_windows_and_boundaries_are_half_open() {
        let w = aligned_windows(10, 5, 10);
        assert_eq!(
            w,
            vec![Window { start: 5, end: 15 }, Window { start: 10, end: 20 }]
        );
        assert_eq!(
            aligned_windows(10, 10, 9),
            vec![Window { start: 0, end: 10 }]
        );
        assert_eq!(
            aligned_windows(10, 10, -1),
            vec![Window { start: -10, end: 0 }]
        );
        assert_eq!(aligned_windows(10, 3, 0).len(), 4, "starts -9, -6, -3, 0");
    }

    #[test]
    fn bad_specs_are_named() {
        assert_eq!(
            WindowKind::Hopping {
                size_ms: 5,
                advance_ms: 10
            }
            .validate(),
            Err(SpecError::HopLargerThanSize {
                advance: 10,
                size: 5
            })
        );
        assert_eq!(
            WindowKind::Session { gap_ms: 0 }.validate(),
            Err(SpecError::NotPositive("gap_ms"))
        );
    }
}
