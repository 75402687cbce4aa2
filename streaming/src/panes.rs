//! The slices of one key under a window that only moves forward, as a two-stack queue: each
//! window's aggregate costs O(1) merges amortized instead of one per slice, for any
//! aggregation (min and max too, which cannot be subtracted).

use serde::{Deserialize, Serialize};

use crate::aggregate::Aggregate;

/// One slice of a key's time windows: its records' aggregate, and how many came late.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Slice {
    pub(crate) aggregate: Aggregate,
    pub(crate) late: u64,
}

impl Slice {
    pub(crate) fn merge(&mut self, other: &Slice) {
        self.aggregate.merge(&other.aggregate);
        self.late += other.late;
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Panes {
    /// Popped from the top, oldest first; each holds the aggregate of itself and every newer
    /// slice below it.
    front: Vec<(i64, Slice)>,
    /// Pushed newest last, with their running total.
    back: Vec<(i64, Slice)>,
    back_total: Slice,
    /// Slices starting before this were pushed (or popped).
    pub(crate) to: i64,
}

impl Panes {
    pub(crate) fn new(to: i64) -> Self {
        Self {
            to,
            ..Self::default()
        }
    }

    pub(crate) fn push(&mut self, start: i64, slice: &Slice) {
        self.back_total.merge(slice);
        self.back.push((start, slice.clone()));
    }

    /// Drop every slice starting before `from`.
    pub(crate) fn pop_before(&mut self, from: i64) {
        loop {
            if self.front.is_empty() {
                if self.back.first().is_none_or(|(start, _)| *start >= from) {
                    return;
                }
                let mut suffix = Slice::default();
                for (start, slice) in self.back.drain(..).rev() {
                    suffix.merge(&slice);
                    self.front.push((start, suffix.clone()));
                }
                self.back_total = Slice::default();
            }
            match self.front.last() {
                Some((start, _)) if *start < from => {
                    self.front.pop();
                }
                _ => return,
            }
        }
    }

    /// The aggregate of every slice in the queue.
    pub(crate) fn total(&self) -> Slice {
        let mut total = self
            .front
            .last()
            .map(|(_, a)| a.clone())
            .unwrap_or_default();
        total.merge(&self.back_total);
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_total_is_the_total_of_what_it_holds() {
        let slice = |n: u64| Slice {
            aggregate: Aggregate {
                count: n,
                ..Aggregate::default()
            },
            late: 0,
        };
        let mut panes = Panes::new(0);
        for start in 0..10 {
            panes.push(start, &slice(1 << start));
            panes.pop_before(start - 3);
            let expected: u64 = ((start - 3).max(0)..=start).map(|s| 1u64 << s).sum();
            assert_eq!(
                panes.total().aggregate.count,
                expected,
                "window ending at {start}"
            );
        }
    }
}
