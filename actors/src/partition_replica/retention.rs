//! Retention: which prefix of a log goes (a pure planner over batch headers) and how the
//! replica deletes it.

use std::sync::atomic::Ordering;

use actix::prelude::*;

use super::{now_ms, PartitionReplica};
use crate::batch::BatchHeader;
use crate::error::StorageError;
use crate::storage::{log_state_op, record_key, Cf, LogState, Replayable, WriteOp};
use crate::topic::TopicConfigs;

/// Most retention checks skipped in a row for a log that neither grew nor had anything to delete.
const RETENTION_SKIP_MAX: u32 = 12;

/// How often an unchanging log is scanned for retention: checks skipped, and the log's end at
/// the last scan that found nothing to delete.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RetentionIdle {
    log_end: Option<u64>,
    backoff: u32,
    skip: u32,
}

impl PartitionReplica {
    pub(super) fn check_retention(&mut self, ctx: &mut Context<Self>) {
        let configs = self.configs;
        if self.retention_running
            || self.raft.is_none()
            || self.installing.is_some()
            || (configs.retention_ms.is_none() && configs.retention_bytes.is_none())
        {
            return;
        }
        // A log that has not grown since a scan that deleted nothing is scanned again only every
        // few checks (up to 12, a minute by default): thousands of idle partitions would
        // otherwise each read their batch headers every 5 s. Time-based retention is days.
        let unchanged = self.retention_idle.log_end == Some(self.state.next_offset);
        if unchanged && self.retention_idle.skip > 0 {
            self.retention_idle.skip -= 1;
            return;
        }
        if !unchanged {
            self.retention_idle.backoff = 0;
        }
        self.retention_running = true;
        let scanned_end = self.state.next_offset;
        let storage = self.storage.clone();
        let log = self.shared.log;
        let mut planner =
            RetentionPlanner::new(self.state, self.shared.high_watermark(), configs, now_ms());
        let scan = async move {
            tokio::task::spawn_blocking(move || {
                storage
                    .scan_headers(log, planner.start, |h| planner.offer(h))
                    .map(|()| planner.plan())
            })
            .await
            .unwrap_or(Err(StorageError::ShutDown))
        };
        ctx.spawn(scan.into_actor(self).map(move |result, act, _ctx| {
            act.retention_running = false;
            match result {
                Ok(Some(plan)) => {
                    act.retention_idle = RetentionIdle::default();
                    act.apply_retention(plan);
                }
                Ok(None) => {
                    let idle = &mut act.retention_idle;
                    idle.backoff = (idle.backoff * 2).clamp(1, RETENTION_SKIP_MAX);
                    idle.skip = idle.backoff;
                    idle.log_end = Some(scanned_end);
                }
                Err(e) => tracing::warn!(topic = %act.shared.topic, partition = act.shared.partition, error = %e, "retention scan failed"),
            }
        }));
    }

    pub(super) fn apply_retention(&mut self, plan: RetentionPlan) {
        let old_start = self.state.log_start_offset;
        // Retention writes the log state as it is in memory. While a Ready is in hand (its
        // write queued, retried on a full queue, or a snapshot being fetched) memory is ahead
        // of what is written, and that write, landing after this one, would put the old log
        // start back over deleted batches. The next check plans again.
        if plan.new_start <= old_start || self.driver.is_busy() {
            return;
        }
        let next = LogState {
            log_start_offset: plan.new_start,
            size_bytes: self.state.size_bytes - plan.freed_bytes,
            ..self.state
        };
        let log = self.shared.log;
        let (from, to) = (record_key(log, old_start), record_key(log, plan.new_start));
        // Replayable like an apply: lost in a crash, retention simply deletes again.
        let ops = Replayable {
            log,
            applied_index: next.applied_index,
            ops: vec![
                WriteOp::DeleteRange {
                    cf: Cf::Records,
                    from: from.clone(),
                    to: to.clone(),
                },
                log_state_op(log, &next),
            ],
        };
        // Readers must stop asking for the range before it disappears.
        self.shared
            .log_start_offset
            .store(plan.new_start, Ordering::Release);
        match self.storage.submit_replayable(Vec::new(), false, ops) {
            Ok(done) => {
                self.state = next;
                self.shared
                    .log_size_bytes
                    .store(next.size_bytes, Ordering::Release);
                self.publish_log_gauges();
                // A snapshot offered from now on says where the log starts now (with many
                // producers the point may be refreshed a little later; an install that asks
                // for deleted records is told where the log starts, `deleted_below`).
                self.offer_snapshot_point();
                tracing::info!(topic = %self.shared.topic, partition = self.shared.partition, from = old_start, to = plan.new_start, freed_bytes = plan.freed_bytes, "retention deleted old batches");
                let storage = self.storage.clone();
                actix::spawn(async move {
                    if matches!(done.await, Ok(Ok(()))) {
                        let _ = tokio::task::spawn_blocking(move || {
                            storage.compact_records(&from, &to)
                        })
                        .await;
                    }
                });
            }
            Err(e) => {
                self.shared
                    .log_start_offset
                    .store(old_start, Ordering::Release);
                tracing::warn!(error = %e, "retention deferred: storage queue refused the delete");
            }
        }
    }
}

/// Which prefix of a log retention deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPlan {
    pub new_start: u64,
    pub freed_bytes: u64,
}

/// Walks batches from the log start and decides, batch by batch, whether retention deletes it.
/// Pure, so the rule is unit-tested without a store: a batch goes if it is durable and either
/// older than `retention.ms` or the log stays at least `retention.bytes` without it.
#[derive(Debug, Clone)]
pub struct RetentionPlanner {
    start: u64,
    new_start: u64,
    size_after: u64,
    freed_bytes: u64,
    durable_end: u64,
    cutoff_ms: Option<i64>,
    bytes_min: Option<u64>,
}

impl RetentionPlanner {
    pub fn new(state: LogState, durable_end: u64, configs: TopicConfigs, now_ms: i64) -> Self {
        Self {
            start: state.log_start_offset,
            new_start: state.log_start_offset,
            size_after: state.size_bytes,
            freed_bytes: 0,
            durable_end,
            cutoff_ms: configs
                .retention_ms
                .map(|ms| now_ms.saturating_sub(ms as i64)),
            bytes_min: configs.retention_bytes,
        }
    }

    /// Offer the next batch; true if it is deleted and the walk should go on.
    pub fn offer(&mut self, header: &BatchHeader) -> bool {
        if header.next_offset() > self.durable_end || header.size_bytes > self.size_after {
            return false;
        }
        let expired = self
            .cutoff_ms
            .is_some_and(|cutoff| header.max_timestamp_ms < cutoff);
        let oversize = self
            .bytes_min
            .is_some_and(|min| self.size_after - header.size_bytes >= min);
        if !(expired || oversize) {
            return false;
        }
        self.size_after -= header.size_bytes;
        self.freed_bytes += header.size_bytes;
        self.new_start = header.next_offset();
        true
    }

    pub fn plan(&self) -> Option<RetentionPlan> {
        (self.new_start > self.start).then_some(RetentionPlan {
            new_start: self.new_start,
            freed_bytes: self.freed_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(
        configs: TopicConfigs,
        durable_end: u64,
        now: i64,
        batches: &[BatchHeader],
    ) -> Option<RetentionPlan> {
        let size = batches.iter().map(|b| b.size_bytes).sum();
        let state = LogState {
            log_start_offset: batches[0].base_offset,
            next_offset: durable_end,
            size_bytes: size,
            applied_index: 0,
        };
        let mut planner = RetentionPlanner::new(state, durable_end, configs, now);
        for b in batches {
            if !planner.offer(b) {
                break;
            }
        }
        planner.plan()
    }

    const LOG: [BatchHeader; 3] = [
        BatchHeader {
            base_offset: 0,
            size_bytes: 100,
            record_count: 10,
            max_timestamp_ms: 1_000,
            producer: NONE,
        },
        BatchHeader {
            base_offset: 10,
            size_bytes: 100,
            record_count: 5,
            max_timestamp_ms: 2_000,
            producer: NONE,
        },
        BatchHeader {
            base_offset: 15,
            size_bytes: 100,
            record_count: 5,
            max_timestamp_ms: 3_000,
            producer: NONE,
        },
    ];
    const NONE: crate::producers::ProducerBatch = crate::producers::ProducerBatch {
        id: -1,
        epoch: -1,
        base_sequence: -1,
        record_count: 0,
    };

    #[test]
    fn time_retention_deletes_batches_older_than_the_cutoff() {
        let configs = TopicConfigs {
            retention_ms: Some(1_500),
            retention_bytes: None,
        };
        // now 3_600: cutoff 2_100, so batches with max timestamps 1_000 and 2_000 go; now 2_600:
        // cutoff 1_100, only the first; now 2_000: cutoff 500, none.
        assert_eq!(
            plan(configs, 20, 3_600, &LOG),
            Some(RetentionPlan {
                new_start: 15,
                freed_bytes: 200
            })
        );
        assert_eq!(
            plan(configs, 20, 2_600, &LOG),
            Some(RetentionPlan {
                new_start: 10,
                freed_bytes: 100
            })
        );
        assert_eq!(plan(configs, 20, 2_000, &LOG), None);
    }

    #[test]
    fn size_retention_keeps_at_least_the_limit() {
        let configs = TopicConfigs {
            retention_ms: None,
            retention_bytes: Some(150),
        };
        // 300 bytes: dropping one leaves 200 >= 150, dropping two would leave 100 < 150.
        assert_eq!(
            plan(configs, 20, 0, &LOG),
            Some(RetentionPlan {
                new_start: 10,
                freed_bytes: 100
            })
        );
        let exact = TopicConfigs {
            retention_ms: None,
            retention_bytes: Some(100),
        };
        assert_eq!(
            plan(exact, 20, 0, &LOG),
            Some(RetentionPlan {
                new_start: 15,
                freed_bytes: 200
            })
        );
    }

    #[test]
    fn nothing_past_the_durable_end_is_touched() {
        let configs = TopicConfigs {
            retention_ms: Some(1),
            retention_bytes: None,
        };
        assert_eq!(
            plan(configs, 14, 1_000_000, &LOG),
            Some(RetentionPlan {
                new_start: 10,
                freed_bytes: 100
            })
        );
        assert_eq!(
            plan(configs, 20, 1_000_000, &LOG),
            Some(RetentionPlan {
                new_start: 20,
                freed_bytes: 300
            })
        );
    }
}
