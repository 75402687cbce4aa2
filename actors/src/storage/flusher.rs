//! The flusher thread: flushes `records` when the writer asks and then raises the durable
//! applied indexes the flush holds (the compaction cap of every Raft log).

use std::collections::HashMap;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use rocksdb::DB;

use super::{cf_handle, raise, Cf, DurableApplied, Waiter};
use crate::error::StorageError;
use crate::metrics::Metrics;
use crate::topic::LogId;

/// A flush of `records` the writer asks for: the applied indexes written since the last one,
/// and who waits for it.
pub(super) struct FlushRequest {
    pub(super) applied: HashMap<LogId, u64>,
    pub(super) waiters: Vec<Waiter>,
}

/// Flushes `records` when the writer asks, then publishes the applied indexes the flush made
/// durable (everything written before the request is in the flushed memtable).
pub(super) struct Flusher {
    pub(super) db: Arc<DB>,
    pub(super) requests: Receiver<FlushRequest>,
    pub(super) durable_applied: DurableApplied,
    pub(super) metrics: Arc<Metrics>,
}

impl Flusher {
    pub(super) fn run(self) {
        while let Ok(FlushRequest { applied, waiters }) = self.requests.recv() {
            let started = Instant::now();
            let flushed = cf_handle(&self.db, Cf::Records).and_then(|cf| {
                self.db
                    .flush_cf(cf)
                    .map_err(|e| StorageError::rocks("flush", e))
            });
            match flushed {
                Ok(()) => {
                    self.metrics
                        .storage_flush_seconds
                        .observe(started.elapsed().as_secs_f64());
                    if let Ok(mut map) = self.durable_applied.lock() {
                        for (log, index) in applied {
                            raise(&mut map, log, index);
                        }
                    }
                }
                // Nothing becomes durable: Raft logs stay uncompacted, which is safe; RocksDB
                // fails later writes if its background error persists.
                Err(ref e) => tracing::error!(error = %e, "flushing records failed"),
            }
            for waiter in waiters {
                let _ = waiter.send(flushed.clone());
            }
        }
    }
}
