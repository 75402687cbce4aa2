//! A snapshot install's side on the follower: flush, then fetch the records it lacks from the
//! other replicas (see [`crate::snapshot`]), and serve such fetches for others.

use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::{Installing, PartitionReplica, SNAPSHOT_FETCH_RETRY, SNAPSHOT_FETCH_TIMEOUT};
use crate::error::StorageError;
use crate::proposals::Unanswered;
use crate::raft_group::SnapshotInstall;
use crate::snapshot::{Install, Installed, SnapshotChunk, SnapshotData, CHUNK_BYTES_MAX};

/// Producers a snapshot point may carry before it is refreshed on a timer instead of on every
/// write (see `offer_snapshot_point`).
const PRODUCERS_OFFERED_EVERY_WRITE: usize = 64;
const PRODUCERS_OFFER_INTERVAL: Duration = Duration::from_millis(250);
use crate::storage::WriteOp;
use crate::transport::Outbound;

impl PartitionReplica {
    /// Start installing the leader's snapshot: fetch the records this replica lacks. Resolves
    /// to the writes that install it; the in-memory log state moves when it resolves.
    ///
    /// First `records` is flushed: this replica's applies so far may live only in the memtable
    /// (they skip the WAL and are replayed from the Raft log after a crash), and the install
    /// deletes that Raft log. Without the flush a kill -9 after the install would lose every
    /// record between the last flush and the install's start, with nothing left to replay.
    pub(super) fn start_install(
        &mut self,
        snapshot: SnapshotInstall,
    ) -> ResponseActFuture<Self, Result<Vec<WriteOp>, StorageError>> {
        let storage = self.storage.clone();
        let flushed = async move { storage.flush_records().await };
        Box::pin(flushed.into_actor(self).then(move |flushed, act, _ctx| {
            let started = flushed.map(|()| act.fetch_for_install(snapshot));
            match started {
                Ok(fetching) => fetching,
                Err(e) => Box::pin(actix::fut::ready(Err(e))),
            }
        }))
    }

    /// The fetch part of [`PartitionReplica::start_install`], once the applies so far are
    /// flushed: everything from this replica's applied end to the snapshot's.
    pub(super) fn fetch_for_install(
        &mut self,
        snapshot: SnapshotInstall,
    ) -> ResponseActFuture<Self, Result<Vec<WriteOp>, StorageError>> {
        // The flush holds every apply so far, this log's included.
        self.storage
            .note_durable_applied(self.shared.log, self.state.applied_index);
        let install = SnapshotData::decode(&snapshot.data)
            .and_then(|data| Install::new(self.shared.log, self.state, snapshot.index, data));
        let install = match install {
            Ok(install) => install,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        tracing::info!(topic = %self.shared.topic, partition = self.shared.partition, index = snapshot.index, target = ?install.target(), from_offset = self.state.next_offset, "installing a snapshot: fetching records");
        let (done, receiver) = oneshot::channel();
        let source = install.target().source;
        self.installing = Some(Installing {
            install,
            done,
            request: 0,
            source,
            asked_at: Instant::now(),
        });
        self.fetch_next(source);
        let wait = async move { receiver.await.unwrap_or(Err(StorageError::ShutDown)) };
        Box::pin(wait.into_actor(self).map(move |result, act, _ctx| {
            let Installed {
                ops,
                state,
                producers,
            } = result?;
            act.adopt_state(state);
            act.producers = producers;
            // Entries up to the snapshot were not applied here one by one: whether a waiting
            // append is among them cannot be told.
            for pending in act.proposals.skip_to(snapshot.index) {
                let _ = pending.waiter.reply.send(Err(act.unanswered(Unanswered::Unknown)));
            }
            let labels = act.labels();
            let labels = [labels[0].as_str(), labels[1].as_str()];
            act.metrics
                .raft_snapshots_installed_total
                .with_label_values(&labels)
                .inc();
            tracing::info!(topic = %act.shared.topic, partition = act.shared.partition, ?state, "snapshot installed");
            Ok(ops)
        }))
    }

    /// A leader offers its applied state as the snapshot for followers behind its log.
    ///
    /// The point carries every producer's state, so with many producers it is refreshed at
    /// most every [`PRODUCERS_OFFER_INTERVAL`] rather than on every write: an older point is
    /// still a consistent one. A refresh skipped is owed, and made by the next Raft tick after
    /// the interval (a partition with a follower behind does not quiesce), so a follower left
    /// behind the compacted log gets a newer point even if nothing more is written.
    pub(super) fn offer_snapshot_point(&mut self) {
        if !self.raft.as_ref().is_some_and(|raft| raft.is_leader()) {
            return;
        }
        if self.producers.len() > PRODUCERS_OFFERED_EVERY_WRITE
            && self
                .producers_offered_at
                .is_some_and(|at| at.elapsed() < PRODUCERS_OFFER_INTERVAL)
        {
            self.snapshot_offer_owed = true;
            return;
        }
        self.snapshot_offer_owed = false;
        self.producers_offered_at = Some(Instant::now());
        let data = SnapshotData {
            log_start_offset: self.state.log_start_offset,
            next_offset: self.state.next_offset,
            source: self.settings.broker_id,
            producers: self
                .producers
                .iter()
                .map(|(id, entry)| (id, serde_bytes::ByteBuf::from(entry.encode().to_vec())))
                .collect(),
        };
        let applied_index = self.state.applied_index;
        if let Some(raft) = self.raft.as_mut() {
            raft.set_snapshot_point(applied_index, data.encode());
        }
    }

    /// Ask `source` for the next records the install needs, or finish it if none are missing.
    pub(super) fn fetch_next(&mut self, source: u64) {
        self.fetch_requests += 1;
        let (request, me) = (self.fetch_requests, self.settings.broker_id);
        let Some(installing) = self.installing.as_mut() else {
            return;
        };
        match installing.install.request(me, request) {
            Some(fetch) => {
                installing.request = request;
                installing.source = source;
                installing.asked_at = Instant::now();
                // A dropped fetch is retried after SNAPSHOT_FETCH_TIMEOUT.
                self.settings
                    .transport
                    .send_to(source, Outbound::Fetch(fetch));
            }
            None => {
                if let Some(installing) = self.installing.take() {
                    let _ = installing.done.send(installing.install.finish());
                }
            }
        }
    }

    /// The replica to ask after `current` failed: the partition's other voters in turn.
    pub(super) fn next_source(&self, current: u64) -> u64 {
        let me = self.settings.broker_id;
        let others: Vec<u64> = self.voters.iter().copied().filter(|v| *v != me).collect();
        let at = others.iter().position(|v| *v == current);
        match at {
            Some(i) => others[(i + 1) % others.len()],
            None => others.first().copied().unwrap_or(current),
        }
    }

    /// On every tick: a snapshot point skipped for being too soon, once it is due.
    pub(super) fn offer_owed_snapshot_point(&mut self) {
        if self.snapshot_offer_owed
            && self
                .producers_offered_at
                .is_none_or(|at| at.elapsed() >= PRODUCERS_OFFER_INTERVAL)
        {
            self.offer_snapshot_point();
        }
    }

    /// On every tick: re-ask (another replica) if a fetch went unanswered or failed.
    pub(super) fn retry_install(&mut self) {
        let Some(installing) = &self.installing else {
            return;
        };
        let wait = if installing.request == 0 {
            SNAPSHOT_FETCH_RETRY
        } else {
            SNAPSHOT_FETCH_TIMEOUT
        };
        if installing.asked_at.elapsed() >= wait {
            let next = self.next_source(installing.source);
            self.fetch_next(next);
        }
    }

    pub(super) fn chunk_arrived(&mut self, chunk: SnapshotChunk) {
        let Some(installing) = self.installing.as_mut() else {
            return;
        };
        if chunk.request != installing.request || installing.request == 0 {
            return; // an answer to a request given up on
        }
        let before = installing.install.fetched_bytes();
        let outcome = match (chunk.error, chunk.deleted_below) {
            // Retention on the source deleted what this install still needs since the
            // snapshot was made: those committed records are gone there, so this log restarts
            // where the source's starts (as when the snapshot itself says so).
            (Some(error), Some(start)) => installing.install.restart_at(start).ok_or(error),
            (Some(error), None) => Err(error),
            (None, _) => match installing.install.check(&chunk.batches) {
                // Written as it comes, past the log's recorded end (nothing reads there, and
                // recovery drops what an interrupted install left); unsynced: the install's
                // final synced write makes it durable, after it in the WAL.
                Ok(mut checked) => {
                    let ops = std::mem::take(&mut checked.ops);
                    match self.storage.submit_unsynced(ops) {
                        Ok(_) => Ok(installing.install.accept(checked)),
                        Err(e) => Err(format!("writing the chunk: {e}")),
                    }
                }
                Err(why) => Err(why),
            },
        };
        match outcome {
            Ok(_) => {
                let fetched = installing.install.fetched_bytes() - before;
                let source = installing.source;
                let labels = self.labels();
                let labels = [labels[0].as_str(), labels[1].as_str()];
                self.metrics
                    .raft_snapshot_fetched_bytes_total
                    .with_label_values(&labels)
                    .inc_by(fetched);
                self.fetch_next(source);
            }
            Err(why) => {
                tracing::warn!(topic = %self.shared.topic, partition = self.shared.partition, source = installing.source, %why, "snapshot fetch failed; asking another replica");
                installing.request = 0;
                installing.asked_at = Instant::now();
            }
        }
    }

    /// Another replica installing a snapshot asks for records: serve committed ones from
    /// storage, off this actor, and send them back.
    pub(super) fn serve_fetch(&self, fetch: crate::snapshot::SnapshotFetch) {
        let below = fetch.below.min(self.shared.high_watermark());
        let start = self.shared.log_start_offset();
        let (storage, transport, log) = (
            self.storage.clone(),
            self.settings.transport.clone(),
            self.shared.log,
        );
        actix::spawn(async move {
            let deleted_below = (fetch.offset < start).then_some(start);
            let batches = if fetch.offset < start {
                Err(format!(
                    "offset {} was deleted by retention (log starts at {start})",
                    fetch.offset
                ))
            } else if fetch.offset >= below {
                Err(format!(
                    "this replica has only applied up to offset {below}"
                ))
            } else {
                tokio::task::spawn_blocking(move || {
                    storage.read_batches(log, fetch.offset, below, CHUNK_BYTES_MAX)
                })
                .await
                .unwrap_or(Err(StorageError::ShutDown))
                .map_err(|e| e.to_string())
            };
            let (batches, error) = match batches {
                Ok(batches) => (batches, None),
                Err(error) => (Vec::new(), Some(error)),
            };
            let chunk = SnapshotChunk {
                group: log,
                request: fetch.request,
                batches,
                error,
                deleted_below,
            };
            transport.send_to(fetch.from, Outbound::Chunk(chunk));
        });
    }
}
