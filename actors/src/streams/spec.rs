//! A stream job's spec as a client posts it, and its checks: the window logic's own, plus what
//! only the cluster knows (the topics exist, the output is not the input).

use pubg1_streaming::extract::{Extraction, Field};
use pubg1_streaming::{Aggregation, EmitMode, Spec, WindowKind};
use serde::{Deserialize, Serialize};

use crate::registry::Registry;

/// What `POST /streams` takes (and what is stored, replicated, with every job).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    /// Topic whose records the job aggregates.
    pub input: String,
    /// Topic the job writes its window results to (keyed by group key).
    pub output: String,
    pub window: WindowKind,
    pub aggregation: Aggregation,
    /// JSON pointer to the event time (integer milliseconds) in the record's value; absent:
    /// the record's timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_field: Option<String>,
    /// JSON pointer to the group key in the record's value; absent: the record's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_field: Option<String>,
    /// JSON pointer to the number aggregated (sum, min, max, avg).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_field: Option<String>,
    #[serde(default, deserialize_with = "null_is_default")]
    pub grace_ms: i64,
    #[serde(default, deserialize_with = "null_is_default")]
    pub lateness_ms: i64,
    #[serde(default = "final_emit", deserialize_with = "null_is_final")]
    pub emit: EmitMode,
}

fn final_emit() -> EmitMode {
    EmitMode::Final
}

/// An explicit `null` means the default, as an absent field does.
fn null_is_default<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    Ok(Option::<i64>::deserialize(d)?.unwrap_or_default())
}

fn null_is_final<'de, D: serde::Deserializer<'de>>(d: D) -> Result<EmitMode, D::Error> {
    Ok(Option::<EmitMode>::deserialize(d)?.unwrap_or(EmitMode::Final))
}

/// Why a spec is refused; the HTTP layer maps each to its status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecRefusal {
    #[error("job name '{0}' must be 1-249 characters of [a-zA-Z0-9._-] and not '.' or '..'")]
    BadName(String),
    #[error("topic '{0}' does not exist")]
    UnknownTopic(String),
    #[error("{0}")]
    Invalid(String),
}

impl JobSpec {
    pub fn engine_spec(&self) -> Spec {
        Spec {
            window: self.window,
            aggregation: self.aggregation,
            grace_ms: self.grace_ms,
            lateness_ms: self.lateness_ms,
            emit: self.emit,
        }
    }

    pub fn extraction(&self) -> Extraction {
        let field = |f: &Option<String>| f.clone().map_or(Field::Record, Field::Pointer);
        Extraction {
            time: field(&self.time_field),
            key: field(&self.key_field),
            value: self.value_field.clone(),
        }
    }

    /// Everything that can be checked without the cluster.
    pub fn validate(&self) -> Result<(), SpecRefusal> {
        // Spelled as topic names are.
        if crate::topic::validate_name(&self.name).is_err() {
            return Err(SpecRefusal::BadName(self.name.clone()));
        }
        self.engine_spec()
            .validate()
            .map_err(|e| SpecRefusal::Invalid(e.to_string()))?;
        self.extraction()
            .validate(self.aggregation)
            .map_err(|e| SpecRefusal::Invalid(e.to_string()))?;
        if self.value_field.is_some() && !self.aggregation.needs_value() {
            return Err(SpecRefusal::Invalid(
                "value_field is only for sum, min, max and avg; a count counts records".into(),
            ));
        }
        if self.input == self.output {
            return Err(SpecRefusal::Invalid(format!(
                "output '{}' must not be the input topic: the job would read its own results",
                self.output
            )));
        }
        Ok(())
    }

    /// [`JobSpec::validate`], and both topics exist.
    pub fn check(&self, registry: &Registry) -> Result<(), SpecRefusal> {
        self.validate()?;
        for topic in [&self.input, &self.output] {
            if registry.get(topic).is_none() {
                return Err(SpecRefusal::UnknownTopic(topic.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        serde_json::from_str(
            r#"{"name":"c","input":"in","output":"out","window":{"kind":"tumbling","size_ms":1000},"aggregation":"count"}"#,
        )
        .expect("spec")
    }

    #[test]
    fn a_minimal_spec_takes_the_documented_defaults() {
        let s = spec();
        assert_eq!((s.grace_ms, s.lateness_ms, s.emit), (0, 0, EmitMode::Final));
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.extraction().time, Field::Record);
    }

    #[test]
    fn bad_specs_are_refused_with_their_reason() {
        type Change = fn(&mut JobSpec);
        let cases: Vec<(Change, &str)> = vec![
            (|s| s.name = "a/b".into(), "job name"),
            (|s| s.output = "in".into(), "must not be the input"),
            (
                |s| {
                    s.window = WindowKind::Hopping {
                        size_ms: 10,
                        advance_ms: 20,
                    }
                },
                "must not exceed size_ms",
            ),
            (
                |s| s.window = WindowKind::Tumbling { size_ms: 0 },
                "positive",
            ),
            (
                |s| s.aggregation = Aggregation::Sum,
                "needs a numeric field",
            ),
            (|s| s.time_field = Some("ts".into()), "not a JSON pointer"),
            (|s| s.value_field = Some("/v".into()), "only for sum"),
            (|s| s.grace_ms = -1, "must not be negative"),
        ];
        for (change, expected) in cases {
            let mut s = spec();
            change(&mut s);
            let refused = s.validate().expect_err("refused").to_string();
            assert!(refused.contains(expected), "{refused:?} lacks {expected:?}");
        }
    }

    #[test]
    fn unknown_fields_are_refused_rather_than_ignored() {
        let text = r#"{"name":"c","input":"in","output":"out","window":{"kind":"tumbling","size_ms":1000},"aggregation":"count","grace":5}"#;
        assert!(serde_json::from_str::<JobSpec>(text).is_err());
    }

    #[test]
    fn null_optional_fields_take_their_defaults() {
        let text = r#"{"name":"c","input":"in","output":"out","window":{"kind":"tumbling","size_ms":1000},"aggregation":"count","grace_ms":null,"emit":null,"time_field":null}"#;
        assert_eq!(serde_json::from_str::<JobSpec>(text).ok(), Some(spec()));
    }
}
