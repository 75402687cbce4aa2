//! From a stored record to an [`Event`]: a job's spec says where the event time, the group key
//! and the value are (the record's own timestamp and key, or JSON pointers into its value).
//! A record that lacks what the spec needs is *skipped* with its reason, counted by the job,
//! and never stops it.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::aggregate::Aggregation;
use crate::engine::Event;

/// Where a field comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    /// The record's timestamp (for the time) or its key (for the group key).
    Record,
    /// A JSON pointer (RFC 6901) into the record's value, e.g. `/sensor/id`.
    Pointer(String),
}

/// What a job reads from each record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extraction {
    pub time: Field,
    pub key: Field,
    /// The numeric field (a pointer); None for a count.
    pub value: Option<String>,
}

/// Why an extraction spec is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractionError {
    #[error("'{0}' is not a JSON pointer: it must be empty or start with '/'")]
    BadPointer(String),
    #[error("{0} needs a numeric field (value)")]
    ValueNeeded(&'static str),
}

/// Why a record was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Skip {
    /// Its value is not JSON (and a pointer needs JSON).
    NotJson,
    /// A field the spec names is missing.
    Missing,
    /// The event time is not an integer number of milliseconds.
    BadTime,
    /// The value to aggregate is not a number.
    NotANumber,
}

fn check_pointer(pointer: &str) -> Result<(), ExtractionError> {
    if pointer.is_empty() || pointer.starts_with('/') {
        Ok(())
    } else {
        Err(ExtractionError::BadPointer(pointer.to_owned()))
    }
}

impl Extraction {
    pub fn validate(&self, aggregation: Aggregation) -> Result<(), ExtractionError> {
        for field in [&self.time, &self.key] {
            if let Field::Pointer(p) = field {
                check_pointer(p)?;
            }
        }
        match (&self.value, aggregation.needs_value()) {
            (Some(p), _) => check_pointer(p),
            (None, true) => Err(ExtractionError::ValueNeeded(match aggregation {
                Aggregation::Sum => "sum",
                Aggregation::Min => "min",
                Aggregation::Max => "max",
                _ => "avg",
            })),
            (None, false) => Ok(()),
        }
    }

    /// The event of a record (key bytes, value bytes, timestamp in ms), or why it is skipped.
    pub fn event(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        timestamp: i64,
    ) -> Result<Event, Skip> {
        let needs_json = matches!(self.time, Field::Pointer(_))
            || matches!(self.key, Field::Pointer(_))
            || self.value.is_some();
        let json: Option<Value> = if needs_json {
            let bytes = value.ok_or(Skip::Missing)?;
            Some(serde_json::from_slice(bytes).map_err(|_| Skip::NotJson)?)
        } else {
            None
        };
        let at = |pointer: &str| {
            json.as_ref()
                .and_then(|j| j.pointer(pointer))
                .ok_or(Skip::Missing)
        };
        let time = match &self.time {
            Field::Record => timestamp,
            Field::Pointer(p) => at(p)?.as_i64().ok_or(Skip::BadTime)?,
        };
        let group = match &self.key {
            // A key sent in a JSON format is JSON text: a string key is its content.
            Field::Record => match key {
                Some(k) => match serde_json::from_slice::<String>(k) {
                    Ok(text) => text,
                    Err(_) => String::from_utf8_lossy(k).into_owned(),
                },
                None => String::new(),
            },
            Field::Pointer(p) => match at(p)? {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            },
        };
        let value = match &self.value {
            None => None,
            Some(p) => Some(number(at(p)?).ok_or(Skip::NotANumber)?),
        };
        Ok(Event {
            key: group,
            time,
            value,
        })
    }
}

/// A JSON number as an exact decimal (from its text, so 0.1 is exactly 0.1).
fn number(value: &Value) -> Option<Decimal> {
    let Value::Number(n) = value else {
        return None;
    };
    let text = n.to_string();
    text.parse::<Decimal>()
        .ok()
        .or_else(|| Decimal::from_scientific(&text).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Extraction {
        Extraction {
            time: Field::Pointer("/ts".into()),
            key: Field::Pointer("/sensor".into()),
            value: Some("/reading".into()),
        }
    }

    #[test]
    fn fields_come_from_pointers_or_the_record() {
        let event = spec()
            .event(
                None,
                Some(br#"{"ts": 1200, "sensor": "s1", "reading": 0.1}"#),
                7,
            )
            .expect("event");
        assert_eq!(event.key, "s1");
        assert_eq!(event.time, 1200);
        assert_eq!(event.value, "0.1".parse().ok());
        let count = Extraction {
            time: Field::Record,
            key: Field::Record,
            value: None,
        };
        let event = count
            .event(Some(b"k"), Some(b"not json at all"), 7)
            .expect("event");
        assert_eq!(
            (event.key.as_str(), event.time, event.value),
            ("k", 7, None)
        );
        // A key produced in a JSON format is JSON text; a string key groups by its content.
        let json_key = count.event(Some(br#""k""#), None, 7).expect("event");
        assert_eq!(json_key.key, "k");
        let number_key = count.event(Some(b"42"), None, 7).expect("event");
        assert_eq!(number_key.key, "42");
        let numeric_key = spec()
            .event(None, Some(br#"{"ts": 1, "sensor": 42, "reading": 1e2}"#), 0)
            .expect("event");
        assert_eq!(numeric_key.key, "42");
        assert_eq!(numeric_key.value, Some(Decimal::from(100)));
    }

    #[test]
    fn records_without_what_the_spec_needs_are_skipped_with_a_reason() {
        let spec = spec();
        let skip = |value: &[u8]| spec.event(None, Some(value), 0).expect_err("skipped");
        assert_eq!(skip(b"{"), Skip::NotJson);
        assert_eq!(skip(br#"{"ts": 1, "sensor": "s"}"#), Skip::Missing);
        assert_eq!(
            skip(br#"{"ts": "noon", "sensor": "s", "reading": 1}"#),
            Skip::BadTime
        );
        assert_eq!(
            skip(br#"{"ts": 1, "sensor": "s", "reading": "1"}"#),
            Skip::NotANumber
        );
        assert_eq!(spec.event(None, None, 0), Err(Skip::Missing));
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut bad = spec();
        bad.key = Field::Pointer("sensor".into());
        assert_eq!(
            bad.validate(Aggregation::Sum),
            Err(ExtractionError::BadPointer("sensor".into()))
        );
        let mut no_value = spec();
        no_value.value = None;
        assert_eq!(
            no_value.validate(Aggregation::Sum),
            Err(ExtractionError::ValueNeeded("sum"))
        );
        assert_eq!(no_value.validate(Aggregation::Count), Ok(()));
    }
}
