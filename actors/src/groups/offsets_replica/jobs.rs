//! The stream jobs of an offsets partition, run on its leader: a [`WindowJob`] per job while
//! this replica serves (leads, with an applied entry of its own term), restarted with backoff
//! when one stops, stopped when the job is deleted or leadership goes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::OffsetsReplica;
use crate::broker_supervisor::Backoff;
use crate::streams::checkpoint::{Checkpoint, Counters};
use crate::streams::job::{Live, StopJob, WindowJob};
use crate::streams::machine::JobRecord;
use crate::streams::{
    DescribeJobs, GetJob, InputProgress, JobSettings, JobView, JobWindows, PartitionWindows,
};

/// A job this replica runs (or ran, until its restart is due).
pub(super) struct RunningJob {
    addr: Addr<WindowJob>,
    uid: u64,
    live: Arc<Live>,
    backoff: Backoff,
    /// When a stopped runner may start again.
    restart_at: Option<Instant>,
}

impl OffsetsReplica {
    fn job_settings(&self) -> JobSettings {
        let timing = self.wiring.timing;
        JobSettings {
            storage: self.wiring.storage.clone(),
            registry: self.wiring.registry.clone(),
            cluster: self.wiring.cluster.clone(),
            metrics: self.wiring.metrics.clone(),
            // As for coordinators: by then a deposed leader has stepped down (check-quorum)
            // and stopped its runners.
            takeover_hold: Duration::from_millis(2 * timing.election_tick as u64 * timing.tick_ms),
            checkpoint_interval: self.wiring.coordinator.checkpoint_interval,
        }
    }

    /// Run exactly the applied jobs while serving, none otherwise.
    pub(super) fn sync_jobs(&mut self) {
        if !self.serving() {
            self.stop_jobs();
            return;
        }
        let Some(me) = self.shared.addr() else { return };
        let metrics = self.wiring.metrics.clone();
        let jobs = self.machine.jobs();
        self.jobs.retain(|name, running| {
            let current = jobs.get(name).is_some_and(|r| r.uid == running.uid);
            if !current {
                running.addr.do_send(StopJob);
                metrics.forget_job(name);
            }
            current
        });
        let now = Instant::now();
        let mut start = Vec::new();
        for (name, record) in jobs.iter() {
            match self.jobs.get_mut(name) {
                Some(running) if running.addr.connected() => {}
                Some(running) => match running.restart_at {
                    None => running.restart_at = Some(now + running.backoff.next_delay()),
                    Some(at) if at <= now => start.push(record.clone()),
                    Some(_) => {}
                },
                None => start.push(record.clone()),
            }
        }
        for record in start {
            let previous = self.jobs.remove(&record.spec.name);
            let (live, backoff) = match previous {
                Some(p) => (p.live, p.backoff),
                None => (Arc::new(Live::default()), Backoff::default()),
            };
            let settings = self.job_settings();
            let (spec, uid, epoch, me, job_live) = (
                record.spec.clone(),
                record.uid,
                record.epoch,
                me.clone(),
                live.clone(),
            );
            let addr = WindowJob::new(spec, uid, epoch, me, settings, job_live).start();
            tracing::info!(job = %record.spec.name, epoch, "stream job starting here");
            self.jobs.insert(
                record.spec.name.clone(),
                RunningJob {
                    addr,
                    uid,
                    live,
                    backoff,
                    restart_at: None,
                },
            );
        }
    }

    pub(super) fn stop_jobs(&mut self) {
        for (name, running) in self.jobs.drain() {
            running.addr.do_send(StopJob);
            self.wiring.metrics.forget_job(&name);
        }
    }

    /// Lag and checkpoint age of the jobs running here, for the gauges.
    pub(super) fn refresh_job_gauges(&self) {
        for (name, running) in &self.jobs {
            let labels = [name.as_str()];
            if let Ok(Some(at)) = running.live.last_checkpoint.lock().map(|a| *a) {
                self.wiring
                    .metrics
                    .stream_checkpoint_age_seconds
                    .with_label_values(&labels)
                    .set(at.elapsed().as_secs_f64());
            }
            if let Some(record) = self.machine.jobs().get(name) {
                let view = self.job_view(record);
                self.wiring
                    .metrics
                    .stream_lag_records
                    .with_label_values(&labels)
                    .set(view.lag as i64);
            }
        }
    }

    fn job_view(&self, record: &JobRecord) -> JobView {
        let running = self
            .jobs
            .get(&record.spec.name)
            .filter(|r| r.uid == record.uid);
        let stored = || {
            record
                .checkpoint
                .as_ref()
                .and_then(|b| Checkpoint::decode(b).ok())
        };
        // Only the figures are taken from the live state: cloning it would copy every window.
        let (phase, state) = match running {
            Some(r) => {
                let phase = r.live.phase.lock().map(|p| p.clone()).unwrap_or_default();
                let state = r
                    .live
                    .state
                    .lock()
                    .ok()
                    .and_then(|s| s.as_ref().map(Figures::of));
                (phase, state.or_else(|| stored().as_ref().map(Figures::of)))
            }
            None => (
                "runs on another broker".to_owned(),
                stored().as_ref().map(Figures::of),
            ),
        };
        let input_topic = self.wiring.registry.get(&record.spec.input);
        let mut input = Vec::new();
        let mut view = JobView {
            spec: record.spec.clone(),
            uid: record.uid,
            epoch: record.epoch,
            offsets_partition: self.shared.partition,
            runs_on: self.shared.leader(),
            phase,
            created_at_ms: record.created_at_ms,
            last_checkpoint_at_ms: record.checkpointed_at_ms,
            input: Vec::new(),
            lag: 0,
            records_in: 0,
            late_records: 0,
            dropped_records: 0,
            skipped_records: BTreeMap::new(),
            results_out: 0,
            pending_results: 0,
        };
        let partitions = input_topic.as_ref().map_or(0, |t| t.meta.partitions);
        for p in 0..partitions {
            let offset = state
                .as_ref()
                .and_then(|s| s.offsets.get(p as usize).copied())
                .unwrap_or(0);
            let high_watermark = input_topic
                .as_ref()
                .and_then(|t| t.partition(p))
                .map_or(0, |s| s.known_log_end());
            let lag = high_watermark.saturating_sub(offset);
            view.lag += lag;
            input.push(InputProgress {
                partition: p,
                offset,
                high_watermark,
                lag,
            });
        }
        view.input = input;
        if let Some(s) = state {
            view.records_in = s.counters.records_in;
            view.late_records = s.counters.late;
            view.dropped_records = s.dropped;
            view.results_out = s.counters.results_out;
            view.pending_results = s.pending;
            view.skipped_records = s
                .counters
                .skipped
                .iter()
                .map(|(reason, n)| {
                    let name = serde_json::to_value(reason)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    (name, *n)
                })
                .collect();
        }
        view
    }
}

/// The figures of a job's state that its status shows.
struct Figures {
    offsets: Vec<u64>,
    counters: Counters,
    dropped: u64,
    pending: usize,
}

impl Figures {
    fn of(state: &Checkpoint) -> Self {
        Self {
            offsets: state.tasks.iter().map(|t| t.offset).collect(),
            counters: state.counters.clone(),
            dropped: state.dropped(),
            pending: state.pending.len(),
        }
    }
}

impl Handler<GetJob> for OffsetsReplica {
    type Result = MessageResult<GetJob>;

    fn handle(&mut self, msg: GetJob, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.machine.jobs().get(&msg.0).cloned())
    }
}

impl Handler<DescribeJobs> for OffsetsReplica {
    type Result = MessageResult<DescribeJobs>;

    fn handle(&mut self, msg: DescribeJobs, _ctx: &mut Self::Context) -> Self::Result {
        let views = self
            .machine
            .jobs()
            .iter()
            .filter(|(name, _)| msg.0.as_ref().is_none_or(|n| n == *name))
            .map(|(_, record)| self.job_view(record))
            .collect();
        MessageResult(views)
    }
}

impl Handler<JobWindows> for OffsetsReplica {
    type Result = Result<Vec<PartitionWindows>, String>;

    fn handle(&mut self, msg: JobWindows, _ctx: &mut Self::Context) -> Self::Result {
        let running = self
            .jobs
            .get(&msg.job)
            .ok_or_else(|| format!("stream job '{}' does not run on this broker", msg.job))?;
        let guard = running
            .live
            .state
            .lock()
            .map_err(|_| "state lock poisoned")?;
        let state = guard
            .as_ref()
            .ok_or_else(|| format!("stream job '{}' is still starting", msg.job))?;
        Ok(state
            .tasks
            .iter()
            .map(|task| PartitionWindows {
                input_partition: task.partition,
                stream_time: task.engine.stream_time(),
                watermark: task.engine.watermark(),
                open: task.engine.open_windows(&msg.key),
                dropped: task
                    .engine
                    .dropped()
                    .iter()
                    .filter(|((key, _), _)| *key == msg.key)
                    .map(|((_, window), n)| (*window, *n))
                    .collect(),
            })
            .collect())
    }
}
