//! `PartitionReplica`: the actor that owns one partition's log.
//!
//! It is the only writer of its log, so it assigns offsets: each append takes the next offsets,
//! is encoded as one Kafka v2 batch and queued to [`Storage`] together with the new [`LogState`].
//! Appends are pipelined (the actor does not wait for one fsync before assigning the next batch),
//! and the storage writer applies them in order, so offsets are dense and become durable in order.
//! The high watermark moves only when a batch is durable, and the reply goes out after that.
//!
//! Crash safety: handler bodies run under `catch_unwind`; a panic stops this actor only, and the
//! [`crate::broker_supervisor::BrokerSupervisor`] starts a new one, which first waits for the
//! storage queue to drain (a barrier) and then recovers its state from RocksDB. Offsets therefore
//! continue after the last durable batch, with no gap and no reuse.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use tokio::sync::watch;

use crate::batch::{self, BatchHeader, NewRecord};
use crate::error::{PartitionError, StorageError};
use crate::metrics::Metrics;
use crate::storage::{log_key, record_key, Cf, Durable, LogState, Storage, WriteOp};
use crate::topic::{LogId, TopicConfigs};

/// Messages a partition actor may hold before senders wait: bounds memory per partition.
pub const PARTITION_MAILBOX_CAPACITY: usize = 1024;

/// What the rest of the broker shares with a partition's actor, across its restarts.
///
/// Readers (fetch, describe, metrics) use this directly and never queue behind appends.
#[derive(Debug)]
pub struct PartitionShared {
    pub topic: Arc<str>,
    pub partition: u32,
    pub log: LogId,
    /// The live actor incarnation; `None` while it restarts and after retirement.
    /// A std Mutex: held only to clone or swap the address, never across an await.
    addr: Mutex<Option<Addr<PartitionReplica>>>,
    /// Offset after the last durable record; consumers read strictly below it. Only grows.
    /// A watch channel so long-polling fetches wake when it moves instead of polling.
    high_watermark: watch::Sender<u64>,
    /// First offset still retained; only grows.
    log_start_offset: AtomicU64,
    log_size_bytes: AtomicU64,
    /// Set when the topic is deleted; a retired partition is never restarted.
    retired: AtomicBool,
}

impl PartitionShared {
    pub fn new(topic: Arc<str>, partition: u32, log: LogId) -> Self {
        Self {
            topic,
            partition,
            log,
            addr: Mutex::new(None),
            high_watermark: watch::Sender::new(0),
            log_start_offset: AtomicU64::new(0),
            log_size_bytes: AtomicU64::new(0),
            retired: AtomicBool::new(false),
        }
    }

    pub fn high_watermark(&self) -> u64 {
        *self.high_watermark.borrow()
    }

    pub fn subscribe_high_watermark(&self) -> watch::Receiver<u64> {
        self.high_watermark.subscribe()
    }

    pub fn log_start_offset(&self) -> u64 {
        self.log_start_offset.load(Ordering::Acquire)
    }

    pub fn log_size_bytes(&self) -> u64 {
        self.log_size_bytes.load(Ordering::Acquire)
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    pub(crate) fn set_addr(&self, addr: Option<Addr<PartitionReplica>>) {
        if let Ok(mut slot) = self.addr.lock() {
            *slot = addr;
        }
    }

    pub(crate) fn addr(&self) -> Option<Addr<PartitionReplica>> {
        self.addr.lock().ok().and_then(|slot| slot.clone())
    }

    fn unavailable(&self) -> PartitionError {
        if self.is_retired() {
            PartitionError::Deleted {
                topic: self.topic.to_string(),
                partition: self.partition,
            }
        } else {
            PartitionError::Restarting {
                topic: self.topic.to_string(),
                partition: self.partition,
            }
        }
    }

    /// Append `records` as one batch and wait until it is durable.
    pub async fn append(&self, records: Vec<NewRecord>) -> Result<Appended, PartitionError> {
        let addr = self.addr().ok_or_else(|| self.unavailable())?;
        addr.send(Append { records })
            .await
            .map_err(|_| self.unavailable())?
    }
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: u64,
    pub record_count: u32,
}

/// Append records to the partition; replies once they are durable.
#[derive(Debug)]
pub struct Append {
    pub records: Vec<NewRecord>,
}

impl Message for Append {
    type Result = Result<Appended, PartitionError>;
}

/// Stop for good (topic deleted), after every write this actor queued is durable.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Retire;

/// Sent to the supervisor when an incarnation stops.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ReplicaStopped {
    pub shared: Arc<PartitionShared>,
    pub crashed: bool,
}

/// Makes the next handled message panic: exercises the crash-restart path in tests.
#[cfg(test)]
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct InjectPanic;

/// Settings every replica of a broker shares.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaSettings {
    pub retention_check_interval: Duration,
}

pub struct PartitionReplica {
    shared: Arc<PartitionShared>,
    storage: Storage,
    metrics: Arc<Metrics>,
    configs: TopicConfigs,
    settings: ReplicaSettings,
    supervisor: Recipient<ReplicaStopped>,
    /// The log including appends still in flight: offsets are assigned from `next_offset`.
    /// Invariant: `state.next_offset >= shared.high_watermark`, equal when nothing is in flight.
    state: LogState,
    /// True once `state` was loaded from storage; nothing is appended before.
    recovered: bool,
    retention_running: bool,
    crashed: bool,
}

impl PartitionReplica {
    pub fn new(
        shared: Arc<PartitionShared>,
        storage: Storage,
        metrics: Arc<Metrics>,
        configs: TopicConfigs,
        settings: ReplicaSettings,
        supervisor: Recipient<ReplicaStopped>,
    ) -> Self {
        Self {
            shared,
            storage,
            metrics,
            configs,
            settings,
            supervisor,
            state: LogState::default(),
            recovered: false,
            retention_running: false,
            crashed: false,
        }
    }

    fn labels(&self) -> [String; 2] {
        [
            self.shared.topic.to_string(),
            self.shared.partition.to_string(),
        ]
    }

    fn recovered(&mut self, state: LogState) {
        self.state = state;
        self.recovered = true;
        self.shared
            .log_start_offset
            .store(state.log_start_offset, Ordering::Release);
        self.shared
            .log_size_bytes
            .store(state.size_bytes, Ordering::Release);
        self.publish_durable(state.next_offset);
        self.publish_log_gauges();
        tracing::debug!(topic = %self.shared.topic, partition = self.shared.partition, ?state, "partition recovered");
    }

    /// The durable end of the log moved to `next_offset`: wake readers.
    fn publish_durable(&self, next_offset: u64) {
        self.shared.high_watermark.send_if_modified(|hw| {
            let moved = next_offset > *hw;
            if moved {
                *hw = next_offset;
            }
            moved
        });
        let labels = self.labels();
        let labels = [labels[0].as_str(), labels[1].as_str()];
        self.metrics
            .partition_high_watermark
            .with_label_values(&labels)
            .set(self.shared.high_watermark() as i64);
    }

    fn publish_log_gauges(&self) {
        let labels = self.labels();
        let labels = [labels[0].as_str(), labels[1].as_str()];
        self.metrics
            .partition_log_start_offset
            .with_label_values(&labels)
            .set(self.state.log_start_offset as i64);
        self.metrics
            .partition_log_size_bytes
            .with_label_values(&labels)
            .set(self.state.size_bytes as i64);
    }

    /// Assign offsets, encode, queue the durable write. Nothing changes if queueing fails.
    fn prepare_append(
        &mut self,
        records: &[NewRecord],
    ) -> Result<(Durable, Appended, u64), PartitionError> {
        if !self.recovered {
            return Err(self.shared.unavailable());
        }
        let base_offset = self.state.next_offset;
        let bytes = batch::encode(base_offset, now_ms(), records)?;
        let size = bytes.len() as u64;
        let next = LogState {
            next_offset: base_offset + records.len() as u64,
            size_bytes: self.state.size_bytes + size,
            ..self.state
        };
        let log = self.shared.log;
        let receiver = self.storage.submit(vec![
            WriteOp::Put {
                cf: Cf::Records,
                key: record_key(log, base_offset),
                value: bytes,
            },
            WriteOp::Put {
                cf: Cf::LogState,
                key: log_key(log),
                value: next.encode(),
            },
        ])?;
        // Offsets only grow: the invariant pair to `recover_log`'s check on the way back in.
        assert!(
            next.next_offset > self.state.next_offset,
            "offsets must grow"
        );
        self.state = next;
        self.shared
            .log_size_bytes
            .store(next.size_bytes, Ordering::Release);
        Ok((
            receiver,
            Appended {
                base_offset,
                record_count: records.len() as u32,
            },
            size,
        ))
    }

    /// A handler panicked: stop this incarnation so the supervisor starts a fresh one.
    fn crash(
        &mut self,
        ctx: &mut Context<Self>,
        panic: Box<dyn std::any::Any + Send>,
    ) -> PartitionError {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic".to_owned());
        tracing::error!(topic = %self.shared.topic, partition = self.shared.partition, %message, "partition actor crashed; restarting");
        self.crashed = true;
        ctx.stop();
        PartitionError::Restarting {
            topic: self.shared.topic.to_string(),
            partition: self.shared.partition,
        }
    }

    fn check_retention(&mut self, ctx: &mut Context<Self>) {
        let configs = self.configs;
        if self.retention_running
            || !self.recovered
            || (configs.retention_ms.is_none() && configs.retention_bytes.is_none())
        {
            return;
        }
        self.retention_running = true;
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
        ctx.spawn(scan.into_actor(self).map(|result, act, _ctx| {
            act.retention_running = false;
            match result {
                Ok(Some(plan)) => act.apply_retention(plan),
                Ok(None) => {}
                Err(e) => tracing::warn!(topic = %act.shared.topic, partition = act.shared.partition, error = %e, "retention scan failed"),
            }
        }));
    }

    fn apply_retention(&mut self, plan: RetentionPlan) {
        let old_start = self.state.log_start_offset;
        if plan.new_start <= old_start {
            return;
        }
        let next = LogState {
            log_start_offset: plan.new_start,
            size_bytes: self.state.size_bytes - plan.freed_bytes,
            ..self.state
        };
        let log = self.shared.log;
        let (from, to) = (record_key(log, old_start), record_key(log, plan.new_start));
        let ops = vec![
            WriteOp::DeleteRange {
                cf: Cf::Records,
                from: from.clone(),
                to: to.clone(),
            },
            WriteOp::Put {
                cf: Cf::LogState,
                key: log_key(log),
                value: next.encode(),
            },
        ];
        // Readers must stop asking for the range before it disappears.
        self.shared
            .log_start_offset
            .store(plan.new_start, Ordering::Release);
        match self.storage.submit(ops) {
            Ok(done) => {
                self.state = next;
                self.shared
                    .log_size_bytes
                    .store(next.size_bytes, Ordering::Release);
                self.publish_log_gauges();
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

impl Actor for PartitionReplica {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(PARTITION_MAILBOX_CAPACITY);
        let storage = self.storage.clone();
        let log = self.shared.log;
        // Writes a previous incarnation queued must land before its state is read back.
        // The read is blocking RocksDB work, so it runs on the blocking pool, not this arbiter.
        let recover = async move {
            storage.barrier().await?;
            tokio::task::spawn_blocking(move || storage.recover_log(log))
                .await
                .unwrap_or(Err(StorageError::ShutDown))
        };
        ctx.wait(recover.into_actor(self).map(|result, act, ctx| match result {
            Ok(state) => act.recovered(state),
            Err(e) => {
                tracing::error!(topic = %act.shared.topic, partition = act.shared.partition, error = %e, "partition recovery failed");
                act.crashed = true;
                ctx.stop();
            }
        }));
        ctx.run_interval(self.settings.retention_check_interval, |act, ctx| {
            act.check_retention(ctx)
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.supervisor.do_send(ReplicaStopped {
            shared: self.shared.clone(),
            crashed: self.crashed,
        });
    }
}

impl Handler<Append> for PartitionReplica {
    type Result = ResponseActFuture<Self, Result<Appended, PartitionError>>;

    fn handle(&mut self, msg: Append, ctx: &mut Self::Context) -> Self::Result {
        let started = Instant::now();
        let prepared = match catch_unwind(AssertUnwindSafe(|| self.prepare_append(&msg.records))) {
            Ok(prepared) => prepared,
            Err(panic) => Err(self.crash(ctx, panic)),
        };
        let (durable, appended, bytes) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        Box::pin(
            durable
                .into_actor(self)
                .map(move |result, act, _ctx| match result {
                    Ok(Ok(())) => {
                        act.publish_durable(
                            appended.base_offset + u64::from(appended.record_count),
                        );
                        let topic = [act.shared.topic.as_ref()];
                        act.metrics
                            .produce_records_total
                            .with_label_values(&topic)
                            .inc_by(u64::from(appended.record_count));
                        act.metrics
                            .produce_bytes_total
                            .with_label_values(&topic)
                            .inc_by(bytes);
                        act.metrics
                            .produce_latency_seconds
                            .with_label_values(&topic)
                            .observe(started.elapsed().as_secs_f64());
                        Ok(appended)
                    }
                    Ok(Err(e)) => Err(e.into()),
                    Err(_) => Err(StorageError::ShutDown.into()),
                }),
        )
    }
}

impl Handler<Retire> for PartitionReplica {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _msg: Retire, _ctx: &mut Self::Context) -> Self::Result {
        self.shared.retire();
        let storage = self.storage.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let _ = storage.barrier().await;
            }
            .into_actor(self)
            .map(|(), _act, ctx| ctx.stop()),
        ))
    }
}

#[cfg(test)]
impl Handler<InjectPanic> for PartitionReplica {
    type Result = ();

    fn handle(&mut self, _msg: InjectPanic, ctx: &mut Self::Context) {
        if let Err(panic) = catch_unwind(|| panic!("injected by test")) {
            self.crash(ctx, panic);
        }
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
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
        },
        BatchHeader {
            base_offset: 10,
            size_bytes: 100,
            record_count: 5,
            max_timestamp_ms: 2_000,
        },
        BatchHeader {
            base_offset: 15,
            size_bytes: 100,
            record_count: 5,
            max_timestamp_ms: 3_000,
        },
    ];

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
