//! Prometheus metrics of one broker, on a registry of its own (not the process-global default) so
//! several brokers in one test process do not mix their numbers.
//!
//! Names follow Prometheus conventions (`pubg1_` prefix, base units, `_total` counters) and are
//! checked by `promtool check metrics` in the test suite.

use prometheus::{
    exponential_buckets, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Every metric the broker exports. Fields are cheap handles; clone the `Arc<Metrics>`.
pub struct Metrics {
    pub registry: Registry,
    pub produce_records_total: IntCounterVec,
    pub produce_duplicates_total: IntCounterVec,
    pub produce_bytes_total: IntCounterVec,
    pub produce_latency_seconds: HistogramVec,
    pub fetch_records_total: IntCounterVec,
    pub fetch_bytes_total: IntCounterVec,
    /// Consumer lag as of the latest fetch on this broker: high watermark minus the offset the
    /// fetch left off at.
    pub fetch_lag_records: IntGaugeVec,
    /// Age of each fetched record (now minus the time its batch was appended): end-to-end
    /// latency from the broker's side.
    pub fetch_record_age_seconds: HistogramVec,
    pub storage_fsync_seconds: Histogram,
    /// Flushes of `records`, which make replayable (WAL-less) applies durable.
    pub storage_flush_seconds: Histogram,
    pub storage_group_commit_writes: Histogram,
    pub storage_group_commit_bytes: Histogram,
    pub storage_write_errors_total: IntCounter,
    /// Bytes of written WAL pages evicted from the page cache (see `storage::WalPages`).
    pub storage_wal_evicted_bytes_total: IntCounter,
    pub partition_high_watermark: IntGaugeVec,
    pub partition_log_start_offset: IntGaugeVec,
    pub partition_log_size_bytes: IntGaugeVec,
    pub actor_restarts_total: IntCounterVec,
    /// Raft groups (partition replicas) on this broker that are quiesced: idle, not ticking.
    pub raft_quiesced_groups: IntGauge,
    pub http_request_duration_seconds: HistogramVec,
    /// Raft term of each group this broker replicates (group = topic/partition, or `__metadata`).
    pub raft_term: IntGaugeVec,
    /// Broker id of each group's leader as seen here; 0 = none known.
    pub raft_leader: IntGaugeVec,
    pub raft_leader_changes_total: IntCounterVec,
    /// Elections this broker's replica of a group started (pre-vote campaigns count).
    pub raft_elections_total: IntCounterVec,
    pub raft_commit_index: IntGaugeVec,
    pub raft_applied_index: IntGaugeVec,
    /// On a group's leader: entries the slowest follower lacks.
    pub raft_follower_lag_entries: IntGaugeVec,
    /// Snapshots this broker's replica installed (it was behind the leader's compacted log).
    pub raft_snapshots_installed_total: IntCounterVec,
    /// Record bytes fetched from other replicas to install snapshots.
    pub raft_snapshot_fetched_bytes_total: IntCounterVec,
    pub peer_connects_total: IntCounterVec,
    pub peer_queue_depth: IntGaugeVec,
    /// Consumer groups coordinated by this broker (series go when the coordinator does).
    pub group_members: IntGaugeVec,
    pub group_generation: IntGaugeVec,
    pub group_rebalances_total: IntCounterVec,
    /// From the first change of a group's target assignment to every member owning its target.
    pub group_rebalance_duration_seconds: HistogramVec,
    pub group_committed_offset: IntGaugeVec,
    /// High watermark minus committed offset, per group and partition it committed or owns.
    pub group_lag_records: IntGaugeVec,
    /// From a commit's proposal to its application (quorum-committed and fsync'd here).
    pub group_commit_latency_seconds: Histogram,
    /// Stream jobs running on this broker (series go when the job stops here).
    pub stream_records_in_total: IntCounterVec,
    pub stream_results_out_total: IntCounterVec,
    pub stream_late_records_total: IntCounterVec,
    pub stream_dropped_records_total: IntCounterVec,
    pub stream_skipped_records_total: IntCounterVec,
    pub stream_checkpoint_seconds: HistogramVec,
    pub stream_checkpoint_age_seconds: GaugeVec,
    pub stream_lag_records: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Latency buckets from 50 µs to ~13 s: fsyncs and produce round trips both fit.
fn latency_buckets() -> Vec<f64> {
    exponential_buckets(0.000_05, 2.0, 19).unwrap_or_default()
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let topic = &["topic"];
        let partition = &["topic", "partition"];
        let metrics = Self {
            produce_records_total: counter_vec(
                "pubg1_produce_records_total",
                "Records acknowledged to producers.",
                topic,
            ),
            produce_duplicates_total: counter_vec(
                "pubg1_produce_duplicate_batches_total",
                "Idempotent producers' resends of batches already stored: answered with the original offsets, not stored again.",
                topic,
            ),
            produce_bytes_total: counter_vec(
                "pubg1_produce_bytes_total",
                "Bytes of record batches acknowledged to producers.",
                topic,
            ),
            produce_latency_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "pubg1_produce_latency_seconds",
                    "Time from a partition receiving an append to it being durable.",
                )
                .buckets(latency_buckets()),
                topic,
            )
            .expect("valid metric"),
            fetch_lag_records: gauge_vec(
                "pubg1_fetch_lag_records",
                "Consumer lag as of the latest fetch on this broker: high watermark minus the offset that fetch left off at.",
                partition,
            ),
            fetch_record_age_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "pubg1_fetch_record_age_seconds",
                    "Age of each fetched record when it is handed to a consumer (now minus its append time): end-to-end latency as the broker sees it.",
                )
                .buckets(latency_buckets()),
                topic,
            )
            .expect("valid metric"),
            fetch_records_total: counter_vec(
                "pubg1_fetch_records_total",
                "Records returned to consumers.",
                topic,
            ),
            fetch_bytes_total: counter_vec(
                "pubg1_fetch_bytes_total",
                "Bytes of record batches read for consumers.",
                topic,
            ),
            storage_fsync_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "pubg1_storage_fsync_seconds",
                    "Duration of one group-committed, fsync'd RocksDB write.",
                )
                .buckets(latency_buckets()),
            )
            .expect("valid metric"),
            storage_flush_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "pubg1_storage_flush_seconds",
                    "Duration of one flush of the records memtable (makes applied records durable without a WAL).",
                )
                .buckets(latency_buckets()),
            )
            .expect("valid metric"),
            storage_group_commit_writes: Histogram::with_opts(
                HistogramOpts::new(
                    "pubg1_storage_group_commit_writes",
                    "Writes merged into one fsync'd group commit.",
                )
                .buckets(exponential_buckets(1.0, 2.0, 14).unwrap_or_default()),
            )
            .expect("valid metric"),
            storage_group_commit_bytes: Histogram::with_opts(
                HistogramOpts::new(
                    "pubg1_storage_group_commit_bytes",
                    "Bytes written by one group commit.",
                )
                .buckets(exponential_buckets(64.0, 4.0, 12).unwrap_or_default()),
            )
            .expect("valid metric"),
            storage_write_errors_total: IntCounter::new(
                "pubg1_storage_write_errors_total",
                "Durable writes that failed; any makes the storage fail closed.",
            )
            .expect("valid metric"),
            storage_wal_evicted_bytes_total: IntCounter::new(
                "pubg1_storage_wal_evicted_bytes_total",
                "Bytes of fsync'd write-ahead log evicted from the page cache.",
            )
            .expect("valid metric"),
            partition_high_watermark: gauge_vec(
                "pubg1_partition_high_watermark",
                "Offset after the last durable record.",
                partition,
            ),
            partition_log_start_offset: gauge_vec(
                "pubg1_partition_log_start_offset",
                "First offset still retained.",
                partition,
            ),
            partition_log_size_bytes: gauge_vec(
                "pubg1_partition_log_size_bytes",
                "Bytes of record batches retained.",
                partition,
            ),
            raft_term: gauge_vec(
                "pubg1_raft_term",
                "Current Raft term of a group.",
                partition,
            ),
            raft_leader: gauge_vec(
                "pubg1_raft_leader",
                "Broker id of a group's Raft leader as seen by this broker (0 = unknown).",
                partition,
            ),
            raft_leader_changes_total: counter_vec(
                "pubg1_raft_leader_changes_total",
                "Leadership changes (elections won or leaders learned) seen by this broker.",
                partition,
            ),
            raft_snapshots_installed_total: counter_vec(
                "pubg1_raft_snapshots_installed_total",
                "Snapshots this broker's replica of a partition installed (it was behind the leader's compacted Raft log).",
                partition,
            ),
            raft_snapshot_fetched_bytes_total: counter_vec(
                "pubg1_raft_snapshot_fetched_bytes_total",
                "Record bytes this broker's replica fetched from other replicas to install snapshots.",
                partition,
            ),
            raft_elections_total: counter_vec(
                "pubg1_raft_elections_total",
                "Elections (pre-vote or vote campaigns) this broker's replica of a group started.",
                partition,
            ),
            raft_commit_index: gauge_vec(
                "pubg1_raft_commit_index",
                "Highest Raft index known committed in a group (commit minus applied = apply lag).",
                partition,
            ),
            raft_applied_index: gauge_vec(
                "pubg1_raft_applied_index",
                "Highest Raft index applied to this replica's log.",
                partition,
            ),
            raft_follower_lag_entries: gauge_vec(
                "pubg1_raft_follower_lag_entries",
                "On the leader: how many entries the slowest follower is behind (0 elsewhere).",
                partition,
            ),
            peer_connects_total: counter_vec(
                "pubg1_peer_connects_total",
                "Outbound peer connections established (a reconnect counts again).",
                &["peer"],
            ),
            peer_queue_depth: gauge_vec(
                "pubg1_peer_queue_depth",
                "Raft messages waiting for a peer link at its last flush.",
                &["peer"],
            ),
            raft_quiesced_groups: IntGauge::with_opts(Opts::new(
                "pubg1_raft_quiesced_groups",
                "Partition replicas on this broker whose idle Raft group is quiesced (no ticks, no heartbeats).",
            ))
            .expect("valid metric"),
            group_members: gauge_vec(
                "pubg1_group_members",
                "Members of a consumer group this broker coordinates.",
                &["group"],
            ),
            group_generation: gauge_vec(
                "pubg1_group_generation",
                "Generation of a consumer group's target assignment.",
                &["group"],
            ),
            group_rebalances_total: counter_vec(
                "pubg1_group_rebalances_total",
                "Changes of a consumer group's target assignment.",
                &["group"],
            ),
            group_rebalance_duration_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "pubg1_group_rebalance_duration_seconds",
                    "Time from a group's target assignment changing to every member owning its target.",
                )
                .buckets(latency_buckets()),
                &["group"],
            )
            .expect("valid metric"),
            group_committed_offset: gauge_vec(
                "pubg1_group_committed_offset",
                "Offset a consumer group committed (the next it will consume).",
                &["group", "topic", "partition"],
            ),
            group_lag_records: gauge_vec(
                "pubg1_group_lag_records",
                "High watermark minus a consumer group's committed offset.",
                &["group", "topic", "partition"],
            ),
            group_commit_latency_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "pubg1_group_commit_latency_seconds",
                    "Offset commit latency on the coordinator: proposal to quorum-committed and applied.",
                )
                .buckets(latency_buckets()),
            )
            .expect("valid metric"),
            stream_records_in_total: counter_vec(
                "pubg1_stream_records_in_total",
                "Input records a stream job processed (skipped ones included).",
                &["stream"],
            ),
            stream_results_out_total: counter_vec(
                "pubg1_stream_results_out_total",
                "Window results a stream job wrote to its output topic.",
                &["stream"],
            ),
            stream_late_records_total: counter_vec(
                "pubg1_stream_late_records_total",
                "Records a stream job took after the watermark had passed them (within grace).",
                &["stream"],
            ),
            stream_dropped_records_total: counter_vec(
                "pubg1_stream_dropped_records_total",
                "Records a stream job dropped as later than grace (counted per window they missed).",
                &["stream"],
            ),
            stream_skipped_records_total: counter_vec(
                "pubg1_stream_skipped_records_total",
                "Records a stream job skipped: not JSON, a field missing, or not a number.",
                &["stream"],
            ),
            stream_checkpoint_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "pubg1_stream_checkpoint_seconds",
                    "Time to encode a stream job's checkpoint and get it committed and applied.",
                )
                .buckets(latency_buckets()),
                &["stream"],
            )
            .expect("valid metric"),
            stream_checkpoint_age_seconds: GaugeVec::new(
                Opts::new(
                    "pubg1_stream_checkpoint_age_seconds",
                    "Time since a stream job's last checkpoint.",
                ),
                &["stream"],
            )
            .expect("valid metric"),
            stream_lag_records: gauge_vec(
                "pubg1_stream_lag_records",
                "Input records a stream job has not read yet (high watermark minus its offset).",
                &["stream"],
            ),
            actor_restarts_total: counter_vec(
                "pubg1_actor_restarts_total",
                "Actors restarted by their supervisor after a crash.",
                &["actor"],
            ),
            http_request_duration_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "pubg1_http_request_duration_seconds",
                    "HTTP request latency by route and status class.",
                )
                .buckets(latency_buckets()),
                &["method", "route", "status"],
            )
            .expect("valid metric"),
            registry,
        };
        metrics.register_all();
        metrics
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.produce_records_total.clone()),
            Box::new(self.produce_duplicates_total.clone()),
            Box::new(self.produce_bytes_total.clone()),
            Box::new(self.produce_latency_seconds.clone()),
            Box::new(self.fetch_records_total.clone()),
            Box::new(self.fetch_bytes_total.clone()),
            Box::new(self.fetch_lag_records.clone()),
            Box::new(self.fetch_record_age_seconds.clone()),
            Box::new(self.storage_fsync_seconds.clone()),
            Box::new(self.storage_flush_seconds.clone()),
            Box::new(self.storage_group_commit_writes.clone()),
            Box::new(self.storage_group_commit_bytes.clone()),
            Box::new(self.storage_write_errors_total.clone()),
            Box::new(self.storage_wal_evicted_bytes_total.clone()),
            Box::new(self.partition_high_watermark.clone()),
            Box::new(self.partition_log_start_offset.clone()),
            Box::new(self.partition_log_size_bytes.clone()),
            Box::new(self.actor_restarts_total.clone()),
            Box::new(self.raft_quiesced_groups.clone()),
            Box::new(self.http_request_duration_seconds.clone()),
            Box::new(self.raft_term.clone()),
            Box::new(self.raft_leader.clone()),
            Box::new(self.raft_leader_changes_total.clone()),
            Box::new(self.raft_elections_total.clone()),
            Box::new(self.raft_commit_index.clone()),
            Box::new(self.raft_applied_index.clone()),
            Box::new(self.raft_follower_lag_entries.clone()),
            Box::new(self.raft_snapshots_installed_total.clone()),
            Box::new(self.raft_snapshot_fetched_bytes_total.clone()),
            Box::new(self.peer_connects_total.clone()),
            Box::new(self.peer_queue_depth.clone()),
            Box::new(self.group_members.clone()),
            Box::new(self.group_generation.clone()),
            Box::new(self.group_rebalances_total.clone()),
            Box::new(self.group_rebalance_duration_seconds.clone()),
            Box::new(self.group_committed_offset.clone()),
            Box::new(self.group_lag_records.clone()),
            Box::new(self.group_commit_latency_seconds.clone()),
            Box::new(self.stream_records_in_total.clone()),
            Box::new(self.stream_results_out_total.clone()),
            Box::new(self.stream_late_records_total.clone()),
            Box::new(self.stream_dropped_records_total.clone()),
            Box::new(self.stream_skipped_records_total.clone()),
            Box::new(self.stream_checkpoint_seconds.clone()),
            Box::new(self.stream_checkpoint_age_seconds.clone()),
            Box::new(self.stream_lag_records.clone()),
        ];
        for collector in collectors {
            // Names are distinct constants above; a clash is a programming error.
            self.registry
                .register(collector)
                .expect("metric names are unique");
        }
    }

    /// Drop the per-partition series of a deleted topic so dashboards do not show ghosts.
    pub fn forget_partition(&self, topic: &str, partition: u32) {
        let labels = [topic, &partition.to_string()];
        for gauge in [
            &self.partition_high_watermark,
            &self.partition_log_start_offset,
            &self.partition_log_size_bytes,
            &self.raft_term,
            &self.raft_leader,
            &self.raft_commit_index,
            &self.raft_applied_index,
            &self.raft_follower_lag_entries,
        ] {
            let _ = gauge.remove_label_values(&labels);
        }
    }

    /// Drop a consumer group's series (its coordinator stopped here).
    pub fn forget_group(&self, group: &str, partitions: &[(String, u32)]) {
        let _ = self.group_members.remove_label_values(&[group]);
        let _ = self.group_generation.remove_label_values(&[group]);
        let _ = self.group_rebalances_total.remove_label_values(&[group]);
        let _ = self
            .group_rebalance_duration_seconds
            .remove_label_values(&[group]);
        for (topic, partition) in partitions {
            let labels = [group, topic.as_str(), &partition.to_string()];
            let _ = self.group_committed_offset.remove_label_values(&labels);
            let _ = self.group_lag_records.remove_label_values(&labels);
        }
    }

    /// Drop a stream job's series (it stopped running here).
    pub fn forget_job(&self, job: &str) {
        let labels = [job];
        for counter in [
            &self.stream_records_in_total,
            &self.stream_results_out_total,
            &self.stream_late_records_total,
            &self.stream_dropped_records_total,
            &self.stream_skipped_records_total,
        ] {
            let _ = counter.remove_label_values(&labels);
        }
        let _ = self.stream_checkpoint_seconds.remove_label_values(&labels);
        let _ = self
            .stream_checkpoint_age_seconds
            .remove_label_values(&labels);
        let _ = self.stream_lag_records.remove_label_values(&labels);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}
