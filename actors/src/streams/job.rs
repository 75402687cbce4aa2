//! `WindowJob`: one stream job's runner, an actor on the leader of the job's offsets partition.
//!
//! It takes the job over (moving its epoch on, so a deposed runner's checkpoints are refused),
//! restores the last checkpoint, waits out a deposed runner, writes the results that checkpoint
//! decided and the output does not hold yet, then loops: read the input partitions from the
//! log, feed each partition's window engine (on the blocking pool), and every
//! `checkpoint_interval` checkpoint and write the results the checkpoint decided. Any failure
//! ends the runner; its offsets replica starts a new one from the last checkpoint.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use pubg1_streaming::extract::Extraction;
use pubg1_streaming::Engine;

use super::checkpoint::{result_value, Checkpoint, Counters, OutputRecord, Task};
use super::machine::JobCommand;
use super::remote::{self, FENCED};
use super::spec::JobSpec;
use super::JobSettings;
use crate::batch::StoredRecord;
use crate::error::PartitionError;
use crate::groups::offsets_machine::GroupCommand;
use crate::groups::offsets_replica::{OffsetsReplica, ProposeGroup};
use crate::log_reader::{self, FetchRequest};
use crate::partition_replica::{now_ms, PartitionShared};
use crate::partitioner::partition_for_key;
use crate::registry::TopicHandle;

mod output;

/// Bytes read per input partition per step.
const READ_BYTES: usize = 1024 * 1024;
/// Results written per request to the output.
const PUBLISH_RECORDS: usize = 2000;
/// A checkpoint is taken early once this many results, or this many bytes of them, wait for
/// one (they are in it, and it is one Raft entry).
const PENDING_MAX: usize = 50_000;
const PENDING_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Drop counts per window are kept this long behind the watermark (for queries), and for at
/// most this many windows.
const DROPPED_HORIZON_MS: i64 = 3_600_000;
const DROPPED_WINDOWS_MAX: usize = 10_000;

/// What a runner shares with its replica (status, queries) across its restarts.
///
/// `state` is locked only off the threads that drive Raft groups (the runner has a thread of
/// its own; window queries run on the blocking pool); status and gauges read `figures`, which
/// is held only to copy it.
#[derive(Debug, Default)]
pub struct Live {
    /// `taking over`, `writing pending results`, `running`, or why it stopped.
    pub phase: Mutex<String>,
    /// The job's state as of its last processed record (a checkpoint in the making).
    pub state: Mutex<Option<Checkpoint>>,
    pub figures: Mutex<Option<Figures>>,
    pub last_checkpoint: Mutex<Option<Instant>>,
}

/// The figures of a job's state that its status shows.
#[derive(Debug, Clone)]
pub struct Figures {
    pub offsets: Vec<u64>,
    pub counters: Counters,
    pub dropped: u64,
    pub pending: usize,
}

impl Figures {
    pub fn of(state: &Checkpoint) -> Self {
        Self {
            offsets: state.tasks.iter().map(|t| t.offset).collect(),
            counters: state.counters.clone(),
            dropped: state.dropped(),
            pending: state.pending.len(),
        }
    }
}

impl Live {
    fn set_phase(&self, phase: impl Into<String>) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase.into();
        }
    }

    fn publish_figures(&self, state: &Checkpoint) {
        if let Ok(mut f) = self.figures.lock() {
            *f = Some(Figures::of(state));
        }
    }
}

pub struct WindowJob {
    runner: Option<Runner>,
    live: Arc<Live>,
}

impl WindowJob {
    pub fn new(
        spec: JobSpec,
        uid: u64,
        epoch: u32,
        replica: Addr<OffsetsReplica>,
        settings: JobSettings,
        live: Arc<Live>,
    ) -> Self {
        let extraction = spec.extraction();
        Self {
            runner: Some(Runner {
                spec,
                extraction,
                uid,
                epoch,
                replica,
                settings,
                live: live.clone(),
                exact: HashSet::new(),
                sequences: HashMap::new(),
                unanswered: None,
                dirty: false,
                last_checkpoint: Instant::now(),
            }),
            live,
        }
    }
}

impl Actor for WindowJob {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(runner) = self.runner.take() else {
            return;
        };
        let live = self.live.clone();
        let name = runner.spec.name.clone();
        ctx.spawn(runner.run().into_actor(self).map(move |result, _act, ctx| {
            let why = match result {
                Ok(()) => "stopped".to_owned(),
                Err(e) => e,
            };
            tracing::warn!(job = %name, reason = %why, "stream job runner stopped");
            live.set_phase(format!("stopped: {why}"));
            ctx.stop();
        }));
    }
}

/// Ask a job's runner to stop (its future is dropped at its next await).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopJob;

impl Handler<StopJob> for WindowJob {
    type Result = ();

    fn handle(&mut self, _msg: StopJob, ctx: &mut Self::Context) {
        self.live.set_phase("stopped: no longer runs here");
        ctx.stop();
    }
}

struct Runner {
    spec: JobSpec,
    extraction: Extraction,
    uid: u64,
    epoch: u32,
    replica: Addr<OffsetsReplica>,
    settings: JobSettings,
    live: Arc<Live>,
    /// Output partitions whose position is exact: nothing of this job's lies after it.
    exact: HashSet<u32>,
    /// Per output partition fenced by this runner, the sequence number its next write starts
    /// at (this runner writes as an idempotent producer: see [`Runner::producer`]).
    sequences: HashMap<u32, i32>,
    /// The last write that failed: (partition, base sequence, first and last result seq). Its
    /// retry must be the same records, or the partition would take other records for it.
    unanswered: Option<(u32, i32, u64, u64)>,
    /// Input processed since the last checkpoint.
    dirty: bool,
    last_checkpoint: Instant,
}

type Step = Result<(), String>;

impl Runner {
    fn name(&self) -> &str {
        &self.spec.name
    }

    async fn propose(&self, command: JobCommand) -> Step {
        match self
            .replica
            .send(ProposeGroup(GroupCommand::Job(command)))
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("offsets replica gone: {e}")),
        }
    }

    fn topic(&self, name: &str) -> Result<Arc<TopicHandle>, String> {
        self.settings
            .registry
            .get(name)
            .ok_or_else(|| format!("topic '{name}' does not exist"))
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut Checkpoint) -> T) -> Result<T, String> {
        let mut guard = self.live.state.lock().map_err(|_| "state lock poisoned")?;
        let state = guard.as_mut().ok_or("no state")?;
        let result = f(state);
        self.live.publish_figures(state);
        Ok(result)
    }

    async fn run(mut self) -> Step {
        self.live.set_phase("taking over");
        let epoch = self.epoch + 1;
        let takeover = JobCommand::Takeover {
            job: self.name().to_owned(),
            uid: self.uid,
            epoch,
        };
        self.propose(takeover).await?;
        self.epoch = epoch;
        let record = self
            .replica
            .send(super::GetJob(self.name().to_owned()))
            .await
            .map_err(|e| e.to_string())?
            .filter(|r| r.uid == self.uid && r.epoch == epoch)
            .ok_or("the job changed during the takeover")?;
        let state = match &record.checkpoint {
            Some(bytes) => Checkpoint::decode(bytes)?,
            None => Checkpoint {
                topic_ids: None,
                tasks: Vec::new(),
                next_seq: 0,
                pending: Vec::new(),
                positions: BTreeMap::new(),
                counters: Default::default(),
            },
        };
        self.live.publish_figures(&state);
        if let Ok(mut s) = self.live.state.lock() {
            *s = Some(state);
        }
        // A deposed runner stops within this (its replica steps down by check-quorum and
        // stops it); only then is the output's tail what it will stay.
        tokio::time::sleep(self.settings.takeover_hold).await;
        if let Some(gone) = self.output_gone() {
            return Err(gone);
        }
        self.live.set_phase("writing pending results");
        self.settle().await?;
        self.live.set_phase("running");
        self.last_checkpoint = Instant::now();
        loop {
            self.step().await?;
        }
    }

    /// Read what is new in the input, feed it to the engines, checkpoint when due.
    async fn step(&mut self) -> Step {
        let input = self.topic(&self.spec.input)?;
        let output = self.topic(&self.spec.output)?;
        let output_partitions = output.meta.partitions;
        let partitions = input.meta.partitions;
        let ids = (input.meta.topic_id, output.meta.topic_id);
        let offsets = self.with_state(|s| {
            if *s.topic_ids.get_or_insert(ids) != ids {
                return Err(format!(
                    "topic '{}' or '{}' was deleted and created again since the job started; \
                     delete the job and create it again",
                    self.spec.input, self.spec.output
                ));
            }
            let spec = self.spec.engine_spec();
            while (s.tasks.len() as u32) < partitions {
                let partition = s.tasks.len() as u32;
                let engine = Engine::new(spec).expect("a stored spec was validated");
                s.tasks.push(Task {
                    partition,
                    offset: 0,
                    engine,
                });
            }
            Ok(s.tasks.iter().map(|t| t.offset).collect::<Vec<u64>>())
        })??;
        let reads = self.read_inputs(&input, &offsets).await?;
        let read: usize = reads.iter().map(|(_, r)| r.len()).sum();
        if read == 0 {
            if self.dirty {
                return self.checkpoint().await;
            }
            wait_for_input(&input, &offsets).await;
            return Ok(());
        }
        let live = self.live.clone();
        let (extraction, name, uid) = (self.extraction.clone(), self.spec.name.clone(), self.uid);
        let (processed, delta) = tokio::task::spawn_blocking(move || {
            let mut guard = live.state.lock().map_err(|_| "state lock poisoned")?;
            let state = guard.as_mut().ok_or("no state")?;
            let before = (
                state.counters.records_in,
                state.counters.late,
                state.counters.skipped.values().sum::<u64>(),
                state.dropped(),
            );
            for (task, records) in reads {
                process(
                    state,
                    task,
                    records,
                    &extraction,
                    (&name, uid),
                    output_partitions,
                );
            }
            live.publish_figures(state);
            let c = &state.counters;
            let delta = [
                c.records_in - before.0,
                c.late - before.1,
                c.skipped.values().sum::<u64>() - before.2,
                state.dropped() - before.3,
            ];
            let full =
                state.pending.len() >= PENDING_MAX || state.pending_bytes() >= PENDING_BYTES_MAX;
            Ok::<_, String>((full, delta))
        })
        .await
        .map_err(|e| format!("processing failed: {e}"))??;
        // Counted here, not on the blocking pool: a stopped runner's future is dropped before
        // this, so it never brings back the series its replica removed.
        let labels = [self.spec.name.as_str()];
        let metrics = &self.settings.metrics;
        for (counter, n) in [
            &metrics.stream_records_in_total,
            &metrics.stream_late_records_total,
            &metrics.stream_skipped_records_total,
            &metrics.stream_dropped_records_total,
        ]
        .into_iter()
        .zip(delta)
        {
            counter.with_label_values(&labels).inc_by(n);
        }
        self.dirty = true;
        if processed || self.last_checkpoint.elapsed() >= self.settings.checkpoint_interval {
            self.checkpoint().await?;
        }
        Ok(())
    }

    async fn read_inputs(
        &self,
        input: &TopicHandle,
        offsets: &[u64],
    ) -> Result<Vec<(usize, Vec<StoredRecord>)>, String> {
        let storage = &self.settings.storage;
        let mut local = Vec::new();
        let mut reads = Vec::new();
        for (task, offset) in offsets.iter().enumerate() {
            let Some(shared) = input.partitions.get(task) else {
                return Err(format!(
                    "input topic '{}' has fewer partitions than the job read",
                    self.spec.input
                ));
            };
            if shared.hosted {
                local.push((task, shared.clone(), *offset));
            } else if let Some(leader) = self.leader_http(shared) {
                let (topic, p, offset) = (shared.topic.to_string(), shared.partition, *offset);
                let fetched = tokio::task::spawn_blocking(move || {
                    remote::fetch(&leader, &topic, p, offset, READ_BYTES)
                })
                .await
                .map_err(|e| e.to_string())?;
                match fetched {
                    Ok(records) => reads.push((task, records)),
                    // Retention deleted records before the job read them (the leader says
                    // out of range): go on from the log start it last reported.
                    Err(remote::Failure::OutOfRange) if offset < shared.log_start_offset() => {
                        let start = shared.log_start_offset();
                        self.with_state(|s| s.tasks[task].offset = start)?;
                        tracing::warn!(job = %self.name(), partition = p, offset, log_start_offset = start, "input records were deleted before the job read them");
                    }
                    // An unreachable leader is waited out like an empty partition.
                    Err(e) => {
                        tracing::debug!(job = %self.name(), partition = p, error = %e, "reading an input partition from its leader failed");
                    }
                }
            }
        }
        let requests = local
            .iter()
            .map(|(_, shared, offset)| {
                let request = FetchRequest {
                    offset: *offset,
                    records_max: usize::MAX,
                    bytes_max: READ_BYTES,
                    wait: Duration::ZERO,
                };
                (shared.clone(), request)
            })
            .collect();
        let fetched = log_reader::fetch_many(storage, &self.settings.metrics, requests).await;
        for ((task, shared, offset), result) in local.into_iter().zip(fetched) {
            match result {
                Ok(fetched) => reads.push((task, fetched.records)),
                // Retention deleted records before the job read them: go on from the log start.
                Err(PartitionError::OffsetOutOfRange {
                    log_start_offset, ..
                }) if offset < log_start_offset => {
                    self.with_state(|s| s.tasks[task].offset = log_start_offset)?;
                    tracing::warn!(job = %self.name(), partition = shared.partition, offset, log_start_offset, "input records were deleted before the job read them");
                }
                Err(e) => {
                    tracing::debug!(job = %self.name(), partition = shared.partition, error = %e, "reading an input partition failed");
                }
            }
        }
        Ok(reads)
    }

    fn leader_http(&self, shared: &PartitionShared) -> Option<String> {
        match shared.leader() {
            0 => None,
            leader => self.settings.cluster.http_of(leader),
        }
    }

    /// Checkpoint the state (the results it decided with it), then write those results.
    async fn checkpoint(&mut self) -> Step {
        // Every output partition a pending result goes to needs a position first: the
        // checkpoint must say where to look for them after a crash.
        let unplaced: Vec<u32> = self.with_state(|s| {
            let mut unplaced: Vec<u32> = s
                .pending
                .iter()
                .map(|r| r.partition)
                .filter(|p| !s.positions.contains_key(p))
                .collect();
            unplaced.sort_unstable();
            unplaced.dedup();
            unplaced
        })?;
        for partition in unplaced {
            let mut delay = Duration::from_millis(50);
            let end = loop {
                match self.barrier(partition).await {
                    Ok(end) => break end,
                    Err(e) => {
                        if let Some(gone) = self.output_gone() {
                            return Err(gone);
                        }
                        if e.starts_with(FENCED) {
                            return Err(e);
                        }
                        tracing::info!(job = %self.name(), partition, error = %e, "output barrier failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(1));
                    }
                }
            };
            self.with_state(|s| s.positions.insert(partition, end))?;
            self.exact.insert(partition);
        }
        let started = Instant::now();
        let live = self.live.clone();
        let data = tokio::task::spawn_blocking(move || {
            let guard = live.state.lock().map_err(|_| "state lock poisoned")?;
            guard.as_ref().ok_or("no state")?.encode()
        })
        .await
        .map_err(|e| e.to_string())??;
        let command = JobCommand::Checkpoint {
            job: self.name().to_owned(),
            uid: self.uid,
            epoch: self.epoch,
            data,
            at_ms: now_ms(),
        };
        self.propose(command).await?;
        let labels = [self.spec.name.as_str()];
        self.settings
            .metrics
            .stream_checkpoint_seconds
            .with_label_values(&labels)
            .observe(started.elapsed().as_secs_f64());
        self.dirty = false;
        self.last_checkpoint = Instant::now();
        if let Ok(mut at) = self.live.last_checkpoint.lock() {
            *at = Some(self.last_checkpoint);
        }
        self.settle().await
    }

    /// Write every pending result the output does not hold yet; retried until it succeeds
    /// (or the runner is stopped).
    async fn settle(&mut self) -> Step {
        let mut delay = Duration::from_millis(50);
        loop {
            match self.try_settle().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if let Some(gone) = self.output_gone() {
                        return Err(gone);
                    }
                    if e.starts_with(FENCED) {
                        return Err(e);
                    }
                    tracing::info!(job = %self.name(), error = %e, "writing results failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Each pending result leaves `pending` as soon as it is known to be in the output (found
    /// there, or written by this runner), so a retry after a partial failure writes only what
    /// is still missing; a partition whose last write's outcome is unknown is looked at again.
    async fn try_settle(&mut self) -> Step {
        let (pending, positions) = self.with_state(|s| (s.pending.clone(), s.positions.clone()))?;
        let mut by_partition: BTreeMap<u32, Vec<OutputRecord>> = BTreeMap::new();
        for record in pending {
            by_partition
                .entry(record.partition)
                .or_default()
                .push(record);
        }
        for (partition, records) in by_partition {
            let mut present = HashSet::new();
            if !self.exact.contains(&partition) {
                // Whatever of ours is in the output is below a barrier's end (a leader commits
                // nothing of an earlier term before an entry of its own).
                let from = positions.get(&partition).copied().unwrap_or(0);
                let end = self.barrier(partition).await?;
                present = self.scan(partition, from, end).await?;
                self.with_state(|s| {
                    s.positions.insert(partition, end);
                    let before = s.pending.len();
                    s.pending
                        .retain(|r| r.partition != partition || !present.contains(&r.seq));
                    s.counters.results_out += (before - s.pending.len()) as u64;
                })?;
                self.exact.insert(partition);
            }
            let missing: Vec<OutputRecord> = records
                .into_iter()
                .filter(|r| !present.contains(&r.seq))
                .collect();
            for chunk in missing.chunks(PUBLISH_RECORDS) {
                match self.publish(partition, chunk).await {
                    Ok(next) => {
                        let (first, last) = (chunk[0].seq, chunk[chunk.len() - 1].seq);
                        self.with_state(|s| {
                            s.positions.insert(partition, next);
                            s.pending.retain(|r| {
                                r.partition != partition || r.seq < first || r.seq > last
                            });
                            s.counters.results_out += chunk.len() as u64;
                        })?;
                        self.settings
                            .metrics
                            .stream_results_out_total
                            .with_label_values(&[self.spec.name.as_str()])
                            .inc_by(chunk.len() as u64);
                    }
                    // It may have been written: the retry sends the same records with the same
                    // sequence numbers (they stay pending), and the partition answers the
                    // second copy to land as a duplicate.
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// Feed one input partition's records to its engine; results become pending output records.
fn process(
    state: &mut Checkpoint,
    task: usize,
    records: Vec<StoredRecord>,
    extraction: &Extraction,
    (job, uid): (&str, u64),
    output_partitions: u32,
) {
    let mut pending_bytes = state.pending_bytes();
    let Some(t) = state.tasks.get_mut(task) else {
        return;
    };
    for record in records {
        if record.offset < t.offset {
            continue;
        }
        // Enough results wait for a checkpoint: the rest is read again after it (the offset
        // is exact, so nothing is skipped or taken twice).
        if state.pending.len() >= PENDING_MAX || pending_bytes >= PENDING_BYTES_MAX {
            break;
        }
        t.offset = record.offset + 1;
        state.counters.records_in += 1;
        let event = match extraction.event(
            record.key.as_deref(),
            record.value.as_deref(),
            record.timestamp_ms,
        ) {
            Ok(event) => event,
            Err(skip) => {
                *state.counters.skipped.entry(skip).or_default() += 1;
                continue;
            }
        };
        let late = t.engine.watermark().is_some_and(|w| event.time < w);
        let dropped = t.engine.dropped_total();
        for output in t.engine.process(event) {
            let result = match &output {
                pubg1_streaming::Output::Final(r) | pubg1_streaming::Output::Update(r) => r,
            };
            // As a JSON string, like the value: what a JSON-format producer would send.
            let key = Bytes::from(serde_json::to_vec(&result.key).unwrap_or_default());
            let seq = state.next_seq;
            state.next_seq += 1;
            let value = result_value(job, uid, seq, t.partition, &output);
            pending_bytes += key.len() + value.len() + 16;
            state.pending.push(OutputRecord {
                seq,
                partition: partition_for_key(&key, output_partitions),
                value,
                key,
            });
        }
        if late && t.engine.dropped_total() == dropped {
            state.counters.late += 1;
        }
    }
    if let Some(w) = t.engine.watermark() {
        t.engine
            .forget_dropped_before(w.saturating_sub(DROPPED_HORIZON_MS));
        // They only serve queries, and they are in every checkpoint: bounded in number too.
        if t.engine.dropped().len() > DROPPED_WINDOWS_MAX {
            let mut ends: Vec<i64> = t.engine.dropped().keys().map(|(_, w)| w.end).collect();
            ends.sort_unstable_by(|a, b| b.cmp(a));
            t.engine
                .forget_dropped_before(ends[DROPPED_WINDOWS_MAX - 1]);
        }
    }
}

/// Until an input partition hosted here moves past where the job stands, or 100 ms (the poll
/// interval of partitions read from other brokers).
async fn wait_for_input(input: &TopicHandle, offsets: &[u64]) {
    let mut watches: Vec<_> = input
        .partitions
        .iter()
        .zip(offsets)
        .filter(|(p, _)| p.hosted)
        .map(|(p, offset)| (p.subscribe_high_watermark(), *offset))
        .collect();
    if watches.is_empty() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        return;
    }
    let moved = futures::future::select_all(watches.iter_mut().map(|(w, offset)| {
        let offset = *offset;
        Box::pin(async move {
            let _ = w.wait_for(|hw| *hw > offset).await;
        })
    }));
    let _ = tokio::time::timeout(Duration::from_millis(100), moved).await;
}
