//! The stream jobs of an offsets partition, run on its leader: a [`WindowJob`] per job while
//! this replica serves (leads, with an applied entry of its own term), restarted with backoff
//! when one stops, stopped when the job is deleted or leadership goes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::OffsetsReplica;
use crate::broker_supervisor::Backoff;
use crate::streams::checkpoint::Checkpoint;
use crate::streams::job::{Figures, Live, StopJob, WindowJob};
use crate::streams::machine::JobRecord;
use crate::streams::{
    DescribeJobs, GetJob, InputProgress, JobSettings, JobView, JobWindows, PartitionWindows,
};

/// A job this replica runs (or ran, until its restart is due).
pub(super) struct RunningJob {
    addr: Addr<WindowJob>,
    /// The job's own thread: its runner locks its state, encodes and decodes checkpoints there,
    /// never on a thread that drives Raft groups.
    arbiter: Arbiter,
    uid: u64,
    live: Arc<Live>,
    backoff: Backoff,
    /// When a stopped runner may start again.
    restart_at: Option<Instant>,
}

impl RunningJob {
    /// Stop the runner, then its thread (once the stop is handled).
    fn stop(&self) {
        self.addr.do_send(StopJob);
        self.arbiter.stop();
    }
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
                running.stop();
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
                Some(p) => {
                    p.arbiter.stop();
                    (p.live, p.backoff)
                }
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
            let arbiter = Arbiter::new();
            let addr = WindowJob::start_in_arbiter(&arbiter.handle(), move |_| {
                WindowJob::new(spec, uid, epoch, me, settings, job_live)
            });
            tracing::info!(job = %record.spec.name, epoch, "stream job starting here");
            self.jobs.insert(
                record.spec.name.clone(),
                RunningJob {
                    addr,
                    arbiter,
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
            running.stop();
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
            let figures = running.live.figures.lock().ok().and_then(|f| f.clone());
            if let Some(record) = self.machine.jobs().get(name) {
                let view = job_view(&self.view_context(), record, String::new(), figures);
                self.wiring
                    .metrics
                    .stream_lag_records
                    .with_label_values(&labels)
                    .set(view.lag as i64);
            }
        }
    }

    fn view_context(&self) -> ViewContext {
        ViewContext {
            registry: self.wiring.registry.clone(),
            offsets_partition: self.shared.partition,
            runs_on: self.shared.leader(),
        }
    }
}

/// A running job's phase and figures (none before its state is restored).
type LiveStatus = (String, Option<Figures>);

/// What a job's status needs besides the job.
struct ViewContext {
    registry: crate::registry::Registry,
    offsets_partition: u32,
    runs_on: u64,
}

/// A job's status from its figures (the runner's, or its last checkpoint's).
fn job_view(
    cx: &ViewContext,
    record: &JobRecord,
    phase: String,
    figures: Option<Figures>,
) -> JobView {
    let input_topic = cx.registry.get(&record.spec.input);
    let mut view = JobView {
        spec: record.spec.clone(),
        uid: record.uid,
        epoch: record.epoch,
        offsets_partition: cx.offsets_partition,
        runs_on: cx.runs_on,
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
        let offset = figures
            .as_ref()
            .and_then(|f| f.offsets.get(p as usize).copied())
            .unwrap_or(0);
        let high_watermark = input_topic
            .as_ref()
            .and_then(|t| t.partition(p))
            .map_or(0, |s| s.known_log_end());
        let lag = high_watermark.saturating_sub(offset);
        view.lag += lag;
        view.input.push(InputProgress {
            partition: p,
            offset,
            high_watermark,
            lag,
        });
    }
    if let Some(f) = figures {
        view.records_in = f.counters.records_in;
        view.late_records = f.counters.late;
        view.dropped_records = f.dropped;
        view.results_out = f.counters.results_out;
        view.pending_results = f.pending;
        view.skipped_records = f
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

impl Handler<GetJob> for OffsetsReplica {
    type Result = MessageResult<GetJob>;

    fn handle(&mut self, msg: GetJob, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.machine.jobs().get(&msg.0).cloned())
    }
}

impl Handler<DescribeJobs> for OffsetsReplica {
    type Result = ResponseFuture<Vec<JobView>>;

    /// Figures of a job that runs elsewhere come from its checkpoint, decoded on the blocking
    /// pool (a checkpoint may be megabytes; this is a Raft thread).
    fn handle(&mut self, msg: DescribeJobs, _ctx: &mut Self::Context) -> Self::Result {
        let wanted: Vec<(JobRecord, Option<LiveStatus>)> = self
            .machine
            .jobs()
            .iter()
            .filter(|(name, _)| msg.0.as_ref().is_none_or(|n| n == *name))
            .map(|(name, record)| {
                let live = self
                    .jobs
                    .get(name)
                    .filter(|r| r.uid == record.uid)
                    .map(|r| {
                        let phase = r.live.phase.lock().map(|p| p.clone()).unwrap_or_default();
                        let figures = r.live.figures.lock().ok().and_then(|f| f.clone());
                        (phase, figures)
                    });
                (record.clone(), live)
            })
            .collect();
        let cx = self.view_context();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                wanted
                    .into_iter()
                    .map(|(record, live)| {
                        let stored = || {
                            record
                                .checkpoint
                                .as_ref()
                                .and_then(|b| Checkpoint::decode(b).ok())
                                .map(|c| Figures::of(&c))
                        };
                        let (phase, figures) = match live {
                            Some((phase, figures)) => (phase, figures.or_else(stored)),
                            None => ("runs on another broker".to_owned(), stored()),
                        };
                        job_view(&cx, &record, phase, figures)
                    })
                    .collect()
            })
            .await
            .unwrap_or_default()
        })
    }
}

impl Handler<JobWindows> for OffsetsReplica {
    type Result = ResponseFuture<Result<Vec<PartitionWindows>, String>>;

    /// On the blocking pool: the runner holds the state while it processes a step.
    fn handle(&mut self, msg: JobWindows, _ctx: &mut Self::Context) -> Self::Result {
        let Some(live) = self.jobs.get(&msg.job).map(|r| r.live.clone()) else {
            let error = format!("stream job '{}' does not run on this broker", msg.job);
            return Box::pin(async move { Err(error) });
        };
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let guard = live.state.lock().map_err(|_| "state lock poisoned")?;
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
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
        })
    }
}
