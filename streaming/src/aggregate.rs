//! Aggregations over a numeric field: count, sum, min, max, avg, kept as one exact
//! accumulator that merges (so slices combine into windows).

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    Count,
    Sum,
    Min,
    Max,
    Avg,
}

impl Aggregation {
    /// Whether it reads a numeric field (count does not).
    pub fn needs_value(self) -> bool {
        self != Aggregation::Count
    }
}

/// Count, sum, min and max of the values seen: enough for every [`Aggregation`], and
/// mergeable. Sums are exact decimals, so merging in any grouping gives the same result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aggregate {
    pub count: u64,
    pub sum: Decimal,
    pub min: Option<Decimal>,
    pub max: Option<Decimal>,
}

impl Aggregate {
    pub fn add(&mut self, value: Option<Decimal>) {
        self.count += 1;
        if let Some(v) = value {
            // A sum past Decimal's 28 digits saturates rather than panics; no realistic
            // stream gets there (it is noted in the job's status if it ever does).
            self.sum = self.sum.checked_add(v).unwrap_or(self.sum);
            self.min = Some(self.min.map_or(v, |m| m.min(v)));
            self.max = Some(self.max.map_or(v, |m| m.max(v)));
        }
    }

    pub fn merge(&mut self, other: &Aggregate) {
        self.count += other.count;
        self.sum = self.sum.checked_add(other.sum).unwrap_or(self.sum);
        self.min = match (self.min, other.min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max = match (self.max, other.max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    /// The aggregation's result (None for min/max/avg of nothing).
    pub fn result(&self, aggregation: Aggregation) -> Option<Decimal> {
        match aggregation {
            Aggregation::Count => Some(Decimal::from(self.count)),
            Aggregation::Sum => Some(self.sum),
            Aggregation::Min => self.min,
            Aggregation::Max => self.max,
            Aggregation::Avg => (self.count > 0)
                .then(|| self.sum.checked_div(Decimal::from(self.count)))
                .flatten(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_slices_equal_one_accumulation_exactly() {
        let values: Vec<Decimal> = ["0.1", "0.2", "0.3", "1e-3", "-7.25"]
            .iter()
            .map(|v| {
                Decimal::from_scientific(v)
                    .or_else(|_| v.parse())
                    .expect("decimal")
            })
            .collect();
        let mut whole = Aggregate::default();
        values.iter().for_each(|v| whole.add(Some(*v)));
        let (mut left, mut right) = (Aggregate::default(), Aggregate::default());
        values[..2].iter().for_each(|v| left.add(Some(*v)));
        values[2..].iter().for_each(|v| right.add(Some(*v)));
        right.merge(&left);
        assert_eq!(right, whole);
        assert_eq!(whole.result(Aggregation::Sum), "-6.649".parse().ok());
        assert_eq!(whole.result(Aggregation::Min), "-7.25".parse().ok());
    }
}
