//! The read path: fetch committed records of one partition, with a long poll, or of many at
//! once without one (group polls).
//!
//! Fetches never go through the partition actor's mailbox. They read the high watermark from
//! [`PartitionShared`], wait on its watch channel when the consumer is caught up, and read RocksDB
//! from the blocking pool, so a busy producer never delays a consumer and vice versa.

use std::sync::Arc;
use std::time::Duration;

use crate::batch::{self, StoredRecord};
use crate::error::{PartitionError, StorageError};
use crate::metrics::Metrics;
use crate::partition_replica::PartitionShared;
use crate::storage::Storage;

/// What a consumer asks for.
#[derive(Debug, Clone, Copy)]
pub struct FetchRequest {
    pub offset: u64,
    pub records_max: usize,
    /// Soft cap on key + value bytes returned; at least one record is returned if any exists.
    pub bytes_max: usize,
    /// How long to wait for data when `offset` is at (or, on a lagging replica, past) the high
    /// watermark.
    pub wait: Duration,
}

/// Committed records from the requested offset, and where the log stands.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub records: Vec<StoredRecord>,
    pub high_watermark: u64,
    pub log_start_offset: u64,
}

fn out_of_range(offset: u64, partition: &PartitionShared) -> PartitionError {
    PartitionError::OffsetOutOfRange {
        offset,
        log_start_offset: partition.log_start_offset(),
        high_watermark: partition.high_watermark(),
    }
}

/// Whether `offset` is known to lie outside the log without waiting: below its start, or past
/// the end of a replica that knows the end (a leader caught up with its term, or a quiesced
/// replica; see [`fetch`]).
fn outside_the_log(offset: u64, partition: &PartitionShared) -> bool {
    offset < partition.log_start_offset()
        || (offset > partition.high_watermark()
            && (partition.is_led_here_caught_up() || partition.is_quiesced()))
}

/// Read committed records of `partition` from `request.offset`.
pub async fn fetch(
    storage: &Storage,
    partition: &Arc<PartitionShared>,
    metrics: &Metrics,
    request: FetchRequest,
) -> Result<Fetched, PartitionError> {
    let offset = request.offset;
    let asked_at = std::time::Instant::now();
    if offset < partition.log_start_offset() {
        return Err(out_of_range(offset, partition));
    }
    // Past this replica's end. A leader that has applied an entry of its own term knows the
    // log's end: out of range at once (one just elected may still be applying what an
    // earlier leader committed, and answers as a lagging replica does). A
    // lagging replica (a consumer at the tail, or one that just moved here from another
    // replica) waits like any long poll, and says "out of range" only on the leader's word
    // given after the question (a status report newer than the request that puts the log's
    // end below the offset); otherwise it answers with no records, which a client just asks
    // again, where a wrong "out of range" makes Kafka clients reset their position.
    // A quiesced replica knows too: its group is idle and it holds all of the leader's log.
    if offset > partition.high_watermark()
        && (partition.is_led_here_caught_up() || partition.is_quiesced())
    {
        return Err(out_of_range(offset, partition));
    }
    if offset >= partition.high_watermark() && !request.wait.is_zero() {
        let mut watermark = partition.subscribe_high_watermark();
        // Timing out is the normal end of a long poll with nothing new.
        let _ = tokio::time::timeout(request.wait, watermark.wait_for(|hw| *hw > offset)).await;
    }
    let high_watermark = partition.high_watermark();
    if offset > high_watermark
        && offset > partition.known_log_end()
        && partition.leader_reported_since(asked_at)
    {
        return Err(out_of_range(offset, partition));
    }
    let batches = if offset < high_watermark {
        let (reader, log, bytes_max) = (storage.clone(), partition.log, request.bytes_max);
        tokio::task::spawn_blocking(move || {
            reader.read_batches(log, offset, high_watermark, bytes_max)
        })
        .await
        .map_err(|_| StorageError::ShutDown)??
    } else {
        Vec::new()
    };
    assemble(partition, metrics, &request, high_watermark, &batches)
}

/// Read committed records of many partitions at once, none waiting for more (the group poll:
/// one trip to the blocking pool for all of a member's partitions instead of one each).
pub async fn fetch_many(
    storage: &Storage,
    metrics: &Metrics,
    requests: Vec<(Arc<PartitionShared>, FetchRequest)>,
) -> Vec<Result<Fetched, PartitionError>> {
    // Where each log stands now; what is read is bounded by it.
    let plans: Vec<Result<u64, PartitionError>> = requests
        .iter()
        .map(|(partition, request)| {
            let offset = request.offset;
            if outside_the_log(offset, partition) {
                return Err(out_of_range(offset, partition));
            }
            Ok(partition.high_watermark())
        })
        .collect();
    let reads: Vec<(crate::topic::LogId, u64, u64, usize)> = requests
        .iter()
        .zip(&plans)
        .filter_map(|((partition, request), plan)| match plan {
            Ok(hw) if request.offset < *hw => {
                Some((partition.log, request.offset, *hw, request.bytes_max))
            }
            _ => None,
        })
        .collect();
    let reader = storage.clone();
    let read = tokio::task::spawn_blocking(move || {
        reads
            .into_iter()
            .map(|(log, offset, hw, bytes_max)| reader.read_batches(log, offset, hw, bytes_max))
            .collect::<Vec<_>>()
    })
    .await;
    let mut read = match read {
        Ok(read) => read.into_iter(),
        Err(_) => {
            return requests
                .iter()
                .map(|_| Err(StorageError::ShutDown.into()))
                .collect()
        }
    };
    requests
        .iter()
        .zip(plans)
        .map(|((partition, request), plan)| {
            let high_watermark = plan?;
            let batches = if request.offset < high_watermark {
                read.next().unwrap_or(Err(StorageError::ShutDown))?
            } else {
                Vec::new()
            };
            assemble(partition, metrics, request, high_watermark, &batches)
        })
        .collect()
}

/// Stored batches as they are, from the one holding an offset (Kafka's fetch returns whole
/// batches; the client skips the records before the offset it asked for).
#[derive(Debug, Clone)]
pub struct FetchedBatches {
    pub batches: Vec<bytes::Bytes>,
    pub high_watermark: u64,
    pub log_start_offset: u64,
}

/// Committed batches of `partition` from the one holding `offset`, up to `bytes_max` (the
/// first batch always, however large), without waiting: the Kafka fetch waits across all its
/// partitions itself. Out of range only outside the log: below its start, or past the end of a
/// leader that has caught up with its term (a lagging replica, or a leader just elected,
/// answers with nothing, as [`fetch`] does).
pub async fn fetch_batches(
    storage: &Storage,
    partition: &Arc<PartitionShared>,
    metrics: &Metrics,
    offset: u64,
    bytes_max: usize,
) -> Result<FetchedBatches, PartitionError> {
    if outside_the_log(offset, partition) {
        return Err(out_of_range(offset, partition));
    }
    let high_watermark = partition.high_watermark();
    let batches = if offset < high_watermark {
        let (reader, log) = (storage.clone(), partition.log);
        tokio::task::spawn_blocking(move || {
            reader.read_batches(log, offset, high_watermark, bytes_max)
        })
        .await
        .map_err(|_| StorageError::ShutDown)??
    } else {
        Vec::new()
    };
    if offset < partition.log_start_offset() {
        return Err(out_of_range(offset, partition));
    }
    // The first batch must hold `offset` and the rest follow it without a gap: a hole would
    // hand a Kafka client a silent gap, so it is checked here as `assemble` checks records.
    let mut expected = offset;
    for stored in &batches {
        let header = batch::parse_header(stored)?;
        if header.base_offset > expected || header.next_offset() <= expected {
            return Err(PartitionError::Storage(StorageError::Corrupt {
                what: format!("log of {}/{}", partition.topic, partition.partition),
                message: format!(
                    "the read from {offset} expected offset {expected} and found a batch at {}..{}",
                    header.base_offset,
                    header.next_offset()
                ),
            }));
        }
        let topic = [partition.topic.as_ref()];
        metrics
            .fetch_records_total
            .with_label_values(&topic)
            .inc_by(header.next_offset() - expected);
        metrics
            .fetch_bytes_total
            .with_label_values(&topic)
            .inc_by(header.size_bytes);
        expected = header.next_offset();
    }
    Ok(FetchedBatches {
        batches,
        high_watermark,
        log_start_offset: partition.log_start_offset(),
    })
}

/// The first offset at or after `timestamp_ms` (by each record's timestamp, as Kafka's
/// ListOffsets finds it), with that record's timestamp; None if no record is that late.
/// Blocking work on the blocking pool: headers are scanned, one batch decoded.
pub async fn offset_for_timestamp(
    storage: &Storage,
    partition: &Arc<PartitionShared>,
    timestamp_ms: i64,
) -> Result<Option<(u64, i64)>, PartitionError> {
    let (reader, log) = (storage.clone(), partition.log);
    let (start, end) = (partition.log_start_offset(), partition.high_watermark());
    tokio::task::spawn_blocking(move || {
        let mut found = None;
        reader.scan_headers(log, start, |header| {
            if header.base_offset >= end {
                return false;
            }
            if header.max_timestamp_ms >= timestamp_ms {
                found = Some(header.base_offset);
                return false;
            }
            true
        })?;
        let Some(base) = found else {
            return Ok(None);
        };
        for stored in reader.read_batches(log, base, end, 1)? {
            for record in batch::decode(&stored)? {
                if record.offset >= start && record.timestamp_ms >= timestamp_ms {
                    return Ok(Some((record.offset, record.timestamp_ms)));
                }
            }
        }
        Ok(None)
    })
    .await
    .map_err(|_| PartitionError::Storage(StorageError::ShutDown))?
}

/// The offset and timestamp of the record with the largest timestamp (the first such if
/// several), Kafka's ListOffsets `-3`; None for an empty log.
pub async fn offset_of_max_timestamp(
    storage: &Storage,
    partition: &Arc<PartitionShared>,
) -> Result<Option<(u64, i64)>, PartitionError> {
    let (reader, log) = (storage.clone(), partition.log);
    let (start, end) = (partition.log_start_offset(), partition.high_watermark());
    tokio::task::spawn_blocking(move || {
        let mut best: Option<(u64, i64)> = None;
        reader.scan_headers(log, start, |header| {
            if header.base_offset >= end {
                return false;
            }
            if best.is_none_or(|(_, ts)| header.max_timestamp_ms > ts) {
                best = Some((header.base_offset, header.max_timestamp_ms));
            }
            true
        })?;
        let Some((base, max)) = best else {
            return Ok(None);
        };
        for stored in reader.read_batches(log, base, end, 1)? {
            for record in batch::decode(&stored)? {
                if record.offset >= start && record.timestamp_ms == max {
                    return Ok(Some((record.offset, record.timestamp_ms)));
                }
            }
        }
        Ok(None)
    })
    .await
    .map_err(|_| PartitionError::Storage(StorageError::ShutDown))?
}

/// The records of `batches` from `request.offset` below `high_watermark`, within the request's
/// bounds, checked dense and still above the log start.
fn assemble(
    partition: &PartitionShared,
    metrics: &Metrics,
    request: &FetchRequest,
    high_watermark: u64,
    batches: &[bytes::Bytes],
) -> Result<Fetched, PartitionError> {
    let offset = request.offset;
    let mut records = Vec::new();
    let mut bytes = 0usize;
    'batches: for stored in batches {
        for record in batch::decode(stored)? {
            if record.offset < offset || record.offset >= high_watermark {
                continue;
            }
            let size = record.key.as_ref().map_or(0, |k| k.len())
                + record.value.as_ref().map_or(0, |v| v.len());
            if records.len() >= request.records_max
                || (!records.is_empty() && bytes + size > request.bytes_max)
            {
                break 'batches;
            }
            bytes += size;
            records.push(record);
        }
    }
    // Retention may have moved the log start while we read: those records are gone, not skipped.
    if offset < partition.log_start_offset() {
        return Err(out_of_range(offset, partition));
    }
    // Invariant pair to the append path: what we return is dense from the requested offset. A
    // hole here would hand a consumer a silent gap, so it is checked in release builds too.
    if let Some((i, record)) = records
        .iter()
        .enumerate()
        .find(|(i, r)| r.offset != offset + *i as u64)
    {
        return Err(PartitionError::Storage(StorageError::Corrupt {
            what: format!("log of {}/{}", partition.topic, partition.partition),
            message: format!(
                "offset {} is missing: the read from {offset} found offset {} in its place",
                offset + i as u64,
                record.offset
            ),
        }));
    }
    let topic = [partition.topic.as_ref()];
    metrics
        .fetch_records_total
        .with_label_values(&topic)
        .inc_by(records.len() as u64);
    metrics
        .fetch_bytes_total
        .with_label_values(&topic)
        .inc_by(bytes as u64);
    Ok(Fetched {
        records,
        high_watermark,
        log_start_offset: partition.log_start_offset(),
    })
}
