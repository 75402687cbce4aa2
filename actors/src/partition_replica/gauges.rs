//! A replica's own gauge series, looked up once: a lookup by label values hashes the labels and
//! locks the metric family, and thousands of replicas refreshing their gauges every few
//! hundred milliseconds made those lookups about 3% of a busy broker's CPU (perf, 3,000
//! partitions electing).

use prometheus::IntGauge;

use crate::metrics::Metrics;

pub(super) struct ReplicaGauges {
    pub(super) high_watermark: IntGauge,
    pub(super) log_start_offset: IntGauge,
    pub(super) log_size_bytes: IntGauge,
    pub(super) raft_leader: IntGauge,
    pub(super) raft_term: IntGauge,
    pub(super) raft_commit_index: IntGauge,
    pub(super) raft_applied_index: IntGauge,
    pub(super) raft_follower_lag_entries: IntGauge,
}

impl ReplicaGauges {
    pub(super) fn new(metrics: &Metrics, topic: &str, partition: u32) -> Self {
        let partition = partition.to_string();
        let labels = [topic, partition.as_str()];
        Self {
            high_watermark: metrics.partition_high_watermark.with_label_values(&labels),
            log_start_offset: metrics
                .partition_log_start_offset
                .with_label_values(&labels),
            log_size_bytes: metrics.partition_log_size_bytes.with_label_values(&labels),
            raft_leader: metrics.raft_leader.with_label_values(&labels),
            raft_term: metrics.raft_term.with_label_values(&labels),
            raft_commit_index: metrics.raft_commit_index.with_label_values(&labels),
            raft_applied_index: metrics.raft_applied_index.with_label_values(&labels),
            raft_follower_lag_entries: metrics.raft_follower_lag_entries.with_label_values(&labels),
        }
    }
}
