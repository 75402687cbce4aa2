//! Topics as the catalog knows them: names, per-topic configs, and the rules both must follow.
//!
//! Pure data and validation, so the HTTP layer, the metadata actor and (later) the metadata Raft
//! group all agree on what a valid topic is.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::TopicError;

/// Kafka's limit on topic name length.
pub const TOPIC_NAME_LENGTH_MAX: usize = 249;
/// Kafka's default `retention.ms`: seven days.
pub const RETENTION_MS_DEFAULT: u64 = 7 * 24 * 60 * 60 * 1000;

/// Durable identity of one partition's log. Topic ids are allocated once and never reused, so a
/// topic deleted and created again under the same name starts from an empty log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LogId {
    pub topic_id: u32,
    pub partition: u32,
}

/// A topic as stored in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    pub name: String,
    /// Unique for the life of the data dir; keys the topic's logs in RocksDB.
    pub topic_id: u32,
    pub partitions: u32,
    /// Kept for replication (later); a single broker stores one copy.
    pub replication_factor: u16,
    pub configs: TopicConfigs,
    pub created_at_ms: i64,
    /// Replica broker ids per partition (index = partition); the first is the preferred leader.
    #[serde(default)]
    pub assignment: Vec<Vec<u64>>,
}

impl TopicMeta {
    /// The Raft voters of `partition`; a topic without an assignment lives on `local` alone.
    pub fn replicas(&self, partition: u32, local: u64) -> Vec<u64> {
        self.assignment
            .get(partition as usize)
            .filter(|r| !r.is_empty())
            .cloned()
            .unwrap_or_else(|| vec![local])
    }

    pub fn log_id(&self, partition: u32) -> LogId {
        LogId {
            topic_id: self.topic_id,
            partition,
        }
    }
}

/// Per-topic settings, named and valued as Kafka's topic configs are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfigs {
    /// `retention.ms`: batches older than this (by broker append time) are deleted. `None` = -1.
    pub retention_ms: Option<u64>,
    /// `retention.bytes`: oldest batches are deleted while the log would stay at least this big
    /// without them (Kafka's rule, per batch instead of per segment). `None` = -1, unbounded.
    pub retention_bytes: Option<u64>,
}

impl Default for TopicConfigs {
    fn default() -> Self {
        Self {
            retention_ms: Some(RETENTION_MS_DEFAULT),
            retention_bytes: None,
        }
    }
}

impl TopicConfigs {
    /// Parse Kafka-style configs (`{"retention.ms": "60000"}`; numbers or strings); unknown keys
    /// and bad values are errors naming the key.
    pub fn from_kafka(configs: &BTreeMap<String, String>) -> Result<Self, TopicError> {
        let mut parsed = Self::default();
        for (key, value) in configs {
            match key.as_str() {
                "retention.ms" => parsed.retention_ms = parse_limit(key, value)?,
                "retention.bytes" => parsed.retention_bytes = parse_limit(key, value)?,
                _ => {
                    return Err(TopicError::InvalidArgument {
                        field: format!("configs.{key}"),
                        reason: "unknown topic config; supported: retention.ms, retention.bytes"
                            .into(),
                    })
                }
            }
        }
        Ok(parsed)
    }

    /// The same configs as Kafka would list them.
    pub fn to_kafka(&self) -> BTreeMap<String, String> {
        let show = |v: Option<u64>| v.map_or_else(|| "-1".to_owned(), |v| v.to_string());
        BTreeMap::from([
            ("retention.bytes".to_owned(), show(self.retention_bytes)),
            ("retention.ms".to_owned(), show(self.retention_ms)),
        ])
    }
}

fn parse_limit(key: &str, value: &str) -> Result<Option<u64>, TopicError> {
    let invalid = || TopicError::InvalidArgument {
        field: format!("configs.{key}"),
        reason: format!("'{value}' is not -1 or a positive whole number"),
    };
    match value.trim().parse::<i64>().map_err(|_| invalid())? {
        -1 => Ok(None),
        v if v > 0 => Ok(Some(v as u64)),
        _ => Err(invalid()),
    }
}

/// Kafka's topic-name rule: 1–249 of `[a-zA-Z0-9._-]`, and not `.` or `..`.
pub fn validate_name(name: &str) -> Result<(), TopicError> {
    let invalid = |reason: &str| TopicError::InvalidName {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    if name.is_empty() {
        return Err(invalid("a topic name cannot be empty"));
    }
    if name.len() > TOPIC_NAME_LENGTH_MAX {
        return Err(invalid(&format!(
            "longer than {TOPIC_NAME_LENGTH_MAX} characters"
        )));
    }
    if name == "." || name == ".." {
        return Err(invalid("'.' and '..' are not allowed"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(invalid(&format!(
            "character {bad:?} is not one of [a-zA-Z0-9._-]"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kafka_rules() {
        for ok in ["orders", "a", "A.b_c-9", &"x".repeat(249)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a b", "a/b", "ü", &"x".repeat(250)] {
            assert!(
                matches!(validate_name(bad), Err(TopicError::InvalidName { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn configs_parse_kafka_style() {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        };
        let parsed =
            TopicConfigs::from_kafka(&map(&[("retention.ms", "1000"), ("retention.bytes", "-1")]))
                .expect("valid");
        assert_eq!(
            parsed,
            TopicConfigs {
                retention_ms: Some(1000),
                retention_bytes: None
            }
        );
        assert_eq!(
            TopicConfigs::from_kafka(&map(&[])).expect("defaults"),
            TopicConfigs::default()
        );
        for bad in [
            ("retention.ms", "0"),
            ("retention.ms", "soon"),
            ("cleanup.policy", "compact"),
        ] {
            let err = TopicConfigs::from_kafka(&map(&[bad])).expect_err("invalid");
            assert!(err.to_string().contains(bad.0), "{err}");
        }
    }
}
