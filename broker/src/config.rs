//! Broker configuration: one typed struct, layered defaults < TOML file < `PUBG1_*` env < flags,
//! validated once at start-up with messages that name the bad key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This broker's id, unique in its cluster.
    pub id: u32,
    /// Where RocksDB keeps this broker's data; created if missing.
    pub data_dir: PathBuf,
    /// HTTP listen address.
    pub http: SocketAddr,
    /// Listen address for other brokers' Raft traffic. Only used in a cluster (`seeds` set).
    pub peer: SocketAddr,
    /// Every broker of the cluster as `id@host:port` (peer addresses), this one included.
    /// Empty: a lone broker, a cluster of one.
    pub seeds: Vec<String>,
    /// Milliseconds per Raft tick; elections start after 10–20 ticks without a leader.
    pub raft_tick_ms: u64,
    /// Raft entries each partition keeps behind its applied index for followers a little behind.
    pub raft_log_keep_entries: u64,
    /// Most Raft entries a leader keeps for a slow or dead follower; one further behind is
    /// brought up to date by snapshot.
    pub raft_log_keep_entries_max: u64,
    /// Applied records are written without RocksDB's WAL (Raft's log has them) and made
    /// durable by a flush after this many bytes of them…
    pub records_flush_bytes: usize,
    /// …or this long after the first unflushed one. Raft logs are compacted only up to what a
    /// flush holds.
    pub records_flush_interval_ms: u64,
    /// HTTP worker threads; 0 means one per core.
    pub http_workers: usize,
    /// Largest request body accepted; larger ones get 413 before being read whole.
    pub request_body_bytes_max: usize,
    /// Most records one produce request may carry.
    pub produce_records_max: usize,
    /// Upper bound a consumer may ask for with `max_records`.
    pub fetch_records_max: usize,
    /// Upper bound a consumer may ask for with `max_bytes`.
    pub fetch_bytes_max: usize,
    /// Longest long poll a consumer may ask for with `timeout_ms`.
    pub fetch_wait_ms_max: u64,
    /// Topics one broker holds at most.
    pub topics_max: usize,
    /// Partitions one topic has at most (each is an actor with its own timers).
    pub partitions_per_topic_max: u32,
    /// How often each partition checks its retention limits.
    pub retention_check_interval_ms: u64,
    /// Threads the partition actors are spread over; 0 means one per core.
    pub partition_threads: usize,
    /// Partitions of the internal offsets topic (each a Raft group over up to 3 brokers);
    /// must be the same on every broker of a cluster, and not changed once groups exist.
    pub offsets_topic_partitions: u32,
    /// How long an empty consumer group waits for more members after its first one joins
    /// before handing out partitions (Kafka's `group.initial.rebalance.delay.ms`, 3 s there).
    pub initial_rebalance_delay_ms: u64,
    /// Session timeout of a consumer instance that does not choose one.
    pub consumer_session_timeout_ms: u64,
    /// A consumer instance without a subscription not heard from for this long is removed.
    pub consumer_instance_timeout_ms: u64,
    /// Consumer instances one group may have.
    pub consumer_instances_per_group_max: usize,
    /// How often a stream job checkpoints while it has new input; its results reach the
    /// output topic after the checkpoint that decides them.
    pub stream_checkpoint_interval_ms: u64,
    /// Kafka protocol listen address, e.g. 127.0.0.1:9092; absent: no Kafka listener.
    pub kafka: Option<SocketAddr>,
    /// host:port Kafka clients are told to connect to (Metadata answers); default: `kafka`.
    pub kafka_advertised: Option<String>,
    /// Largest Kafka request frame accepted (Kafka's `socket.request.max.bytes`); a larger
    /// one closes its connection.
    pub kafka_frame_bytes_max: usize,
    /// Kafka requests one connection may have in progress at once (clients pipeline; the
    /// answers go back in request order); further ones wait to be read.
    pub kafka_in_flight_max: usize,
    /// Create a topic a Kafka client asks Metadata about (Kafka's `auto.create.topics.enable`).
    pub auto_create_topics: bool,
    /// Partitions of a topic created without a count (auto-created, or `num_partitions` -1).
    pub default_partitions: u32,
    /// Replication factor of such a topic, at most the brokers in the cluster.
    pub default_replication_factor: u16,
    pub log_format: LogFormat,
    /// A tracing filter such as `info` or `pubg1=debug`; `RUST_LOG` overrides it.
    pub log_filter: String,
}

/// Bounds of a consumer instance's session timeout (config default and per instance).
pub const SESSION_TIMEOUT_MIN_MS: u64 = 500;
pub const SESSION_TIMEOUT_MAX_MS: u64 = 300_000;

impl Default for Config {
    fn default() -> Self {
        Self {
            id: 1,
            data_dir: PathBuf::from("data/1"),
            http: SocketAddr::from(([127, 0, 0, 1], 8081)),
            peer: SocketAddr::from(([127, 0, 0, 1], 9091)),
            seeds: Vec::new(),
            raft_tick_ms: 30,
            raft_log_keep_entries: 200,
            raft_log_keep_entries_max: 50_000,
            records_flush_bytes: 16 * 1024 * 1024,
            records_flush_interval_ms: 5_000,
            http_workers: 0,
            request_body_bytes_max: 16 * 1024 * 1024,
            produce_records_max: 10_000,
            fetch_records_max: 10_000,
            fetch_bytes_max: 64 * 1024 * 1024,
            fetch_wait_ms_max: 30_000,
            topics_max: 1_000,
            partitions_per_topic_max: 256,
            retention_check_interval_ms: 5_000,
            partition_threads: 0,
            offsets_topic_partitions: 8,
            initial_rebalance_delay_ms: 250,
            consumer_session_timeout_ms: 10_000,
            consumer_instance_timeout_ms: 300_000,
            consumer_instances_per_group_max: 1_000,
            stream_checkpoint_interval_ms: 200,
            kafka: None,
            kafka_advertised: None,
            kafka_frame_bytes_max: 100 * 1024 * 1024,
            kafka_in_flight_max: 64,
            auto_create_topics: true,
            default_partitions: 1,
            default_replication_factor: 3,
            log_format: LogFormat::Text,
            log_filter: "info".to_owned(),
        }
    }
}

impl Config {
    /// Defaults, then the TOML file if given, then `PUBG1_*` environment, then `overrides`.
    pub fn load(file: Option<&Path>, overrides: impl Serialize) -> Result<Self, String> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(format!("config file {} does not exist", file.display()));
            }
            figment = figment.merge(Toml::file(file));
        }
        let config: Config = figment
            .merge(Env::prefixed("PUBG1_").ignore(&["config"]))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    /// Reject settings the broker cannot run with, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let at_least = |key: &str, value: u64, min: u64| {
            if value < min {
                Err(format!("{key} must be at least {min} (got {value})"))
            } else {
                Ok(())
            }
        };
        at_least(
            "request_body_bytes_max",
            self.request_body_bytes_max as u64,
            1024,
        )?;
        at_least("produce_records_max", self.produce_records_max as u64, 1)?;
        at_least("fetch_records_max", self.fetch_records_max as u64, 1)?;
        at_least("fetch_bytes_max", self.fetch_bytes_max as u64, 1024)?;
        at_least("topics_max", self.topics_max as u64, 1)?;
        at_least(
            "partitions_per_topic_max",
            u64::from(self.partitions_per_topic_max),
            1,
        )?;
        at_least(
            "retention_check_interval_ms",
            self.retention_check_interval_ms,
            10,
        )?;
        if self.partitions_per_topic_max > 100_000 {
            return Err("partitions_per_topic_max must be at most 100000".into());
        }
        at_least("raft_tick_ms", self.raft_tick_ms, 5)?;
        at_least("raft_log_keep_entries", self.raft_log_keep_entries, 10)?;
        at_least(
            "records_flush_bytes",
            self.records_flush_bytes as u64,
            64 * 1024,
        )?;
        at_least(
            "records_flush_interval_ms",
            self.records_flush_interval_ms,
            10,
        )?;
        if self.raft_log_keep_entries_max < self.raft_log_keep_entries {
            return Err(format!(
                "raft_log_keep_entries_max ({}) must be at least raft_log_keep_entries ({})",
                self.raft_log_keep_entries_max, self.raft_log_keep_entries
            ));
        }
        if !(1..=256).contains(&self.offsets_topic_partitions) {
            return Err(format!(
                "offsets_topic_partitions must be between 1 and 256 (got {})",
                self.offsets_topic_partitions
            ));
        }
        if self.initial_rebalance_delay_ms > 60_000 {
            return Err("initial_rebalance_delay_ms must be at most 60000".into());
        }
        if !(SESSION_TIMEOUT_MIN_MS..=SESSION_TIMEOUT_MAX_MS)
            .contains(&self.consumer_session_timeout_ms)
        {
            return Err(format!(
                "consumer_session_timeout_ms must be between {SESSION_TIMEOUT_MIN_MS} and {SESSION_TIMEOUT_MAX_MS} (got {})",
                self.consumer_session_timeout_ms
            ));
        }
        at_least(
            "consumer_instance_timeout_ms",
            self.consumer_instance_timeout_ms,
            1_000,
        )?;
        at_least(
            "consumer_instances_per_group_max",
            self.consumer_instances_per_group_max as u64,
            1,
        )?;
        if !(10..=60_000).contains(&self.stream_checkpoint_interval_ms) {
            return Err(format!(
                "stream_checkpoint_interval_ms must be between 10 and 60000 (got {})",
                self.stream_checkpoint_interval_ms
            ));
        }
        at_least(
            "kafka_frame_bytes_max",
            self.kafka_frame_bytes_max as u64,
            64 * 1024,
        )?;
        if !(1..=1024).contains(&self.kafka_in_flight_max) {
            return Err(format!(
                "kafka_in_flight_max must be between 1 and 1024 (got {})",
                self.kafka_in_flight_max
            ));
        }
        if self.default_partitions == 0 || self.default_partitions > self.partitions_per_topic_max {
            return Err(format!(
                "default_partitions must be between 1 and partitions_per_topic_max ({})",
                self.partitions_per_topic_max
            ));
        }
        at_least(
            "default_replication_factor",
            u64::from(self.default_replication_factor),
            1,
        )?;
        if let Some(advertised) = &self.kafka_advertised {
            crate::kafka::split_host_port(advertised).ok_or_else(|| {
                format!("kafka_advertised must be host:port (got '{advertised}')")
            })?;
        }
        let seeds = self.parsed_seeds()?;
        if !seeds.is_empty() && !seeds.iter().any(|(id, _)| u64::from(self.id) == *id) {
            return Err(format!("seeds must include this broker's id {}", self.id));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err("data_dir must not be empty".into());
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_filter).is_err() {
            return Err(format!(
                "log_filter '{}' is not a valid tracing filter",
                self.log_filter
            ));
        }
        Ok(())
    }

    /// `seeds` as (broker id, peer address) pairs.
    pub fn parsed_seeds(&self) -> Result<Vec<(u64, SocketAddr)>, String> {
        let mut seeds = Vec::new();
        for seed in &self.seeds {
            let bad = || format!("seeds entry '{seed}' is not id@host:port");
            let (id, address) = seed.split_once('@').ok_or_else(bad)?;
            let id: u64 = id.trim().parse().map_err(|_| bad())?;
            let address: SocketAddr = address.trim().parse().map_err(|_| bad())?;
            if seeds.iter().any(|(other, _)| *other == id) {
                return Err(format!("seeds name broker {id} twice"));
            }
            seeds.push((id, address));
        }
        Ok(seeds)
    }

    pub fn http_workers(&self) -> usize {
        if self.http_workers == 0 {
            cores()
        } else {
            self.http_workers
        }
    }

    pub fn partition_threads(&self) -> usize {
        if self.partition_threads == 0 {
            cores()
        } else {
            self.partition_threads
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct NoOverrides {}

    #[test]
    fn defaults_are_valid_and_file_and_overrides_layer() {
        assert_eq!(Config::default().validate(), Ok(()));
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("broker.toml");
        std::fs::write(
            &file,
            "id = 7\nhttp = \"127.0.0.1:9000\"\nproduce_records_max = 5\n",
        )
        .expect("write");
        #[derive(Serialize)]
        struct Flags {
            id: u32,
        }
        let config = Config::load(Some(&file), Flags { id: 9 }).expect("load");
        assert_eq!(config.id, 9, "flags win over the file");
        assert_eq!(config.produce_records_max, 5);
        assert_eq!(config.http.port(), 9000);
    }

    #[test]
    fn bad_values_name_their_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("broker.toml");
        for (toml, key) in [
            ("http = \"not an address\"", "http"),
            ("produce_records_max = 0", "produce_records_max"),
            ("no_such_key = 1", "no_such_key"),
            ("log_format = \"xml\"", "log_format"),
            ("seeds = [\"one@127.0.0.1:9091\"]", "seeds"),
            (
                "seeds = [\"2@127.0.0.1:9092\"]",
                "seeds must include this broker",
            ),
            (
                "seeds = [\"1@127.0.0.1:9091\", \"1@127.0.0.1:9092\"]",
                "twice",
            ),
            ("raft_tick_ms = 1", "raft_tick_ms"),
            ("raft_log_keep_entries = 0", "raft_log_keep_entries"),
            ("records_flush_interval_ms = 0", "records_flush_interval_ms"),
            ("records_flush_bytes = 1000", "records_flush_bytes"),
            (
                "raft_log_keep_entries = 100\nraft_log_keep_entries_max = 50",
                "raft_log_keep_entries_max",
            ),
        ] {
            std::fs::write(&file, toml).expect("write");
            let err = Config::load(Some(&file), NoOverrides {}).expect_err(toml);
            assert!(
                err.contains(key),
                "error for {toml:?} should name {key}: {err}"
            );
        }
        let missing =
            Config::load(Some(&dir.path().join("nope.toml")), NoOverrides {}).expect_err("missing");
        assert!(missing.contains("nope.toml"), "{missing}");
    }
}
