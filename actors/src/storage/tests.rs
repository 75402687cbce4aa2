//! Storage tests on real RocksDB in temp dirs.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rocksdb::WriteBatch;

use super::wal_pages::WalPages;
use super::writer::BatchSizes;
use super::*;
use crate::batch;
use crate::batch::NewRecord;

fn open(dir: &Path) -> Storage {
    Storage::open(dir, Arc::new(Metrics::new())).expect("open")
}

#[test]
fn wal_pages_advises_whole_written_pages_once_and_keeps_the_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = dir.path().join("000012.log");
    let other = dir.path().join("000013.sst");
    let mut bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&wal, &bytes).expect("write wal");
    std::fs::write(&other, [7u8; 9000]).expect("write other");
    let mut pages = WalPages::new(dir.path().to_path_buf());
    assert_eq!(pages.written(WalPages::EVERY_BYTES - 1), 0, "not due yet");
    // Due: the two whole pages of the 10,000-byte WAL, not its tail, not the .sst.
    assert_eq!(pages.written(1), 8192);
    assert_eq!(pages.advise(), 0, "nothing new");
    let more = [9u8; 5000];
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&wal)
            .expect("open wal");
        file.write_all(&more).expect("append");
        file.sync_all().expect("sync");
    }
    bytes.extend_from_slice(&more);
    // 15,000 bytes: pages 3 (bytes 8192..12288) is whole now; the tail is not.
    assert_eq!(pages.advise(), 4096);
    assert_eq!(
        std::fs::read(&wal).expect("read back"),
        bytes,
        "advice drops no data"
    );
    std::fs::remove_file(&wal).expect("remove");
    assert_eq!(pages.advise(), 0);
    assert!(pages.advised.is_empty(), "deleted files are forgotten");
}

#[actix_rt::test]
async fn the_writer_evicts_the_wal_it_syncs_and_the_data_reads_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage_metrics = Arc::new(Metrics::new());
    let storage = Storage::open(dir.path(), storage_metrics.clone()).expect("open");
    let value = vec![5u8; 64 * 1024];
    let writes = WalPages::EVERY_BYTES / value.len() + 2;
    for i in 0..writes as u64 {
        storage
            .write(vec![WriteOp::Put {
                cf: Cf::Metadata,
                key: i.to_be_bytes().to_vec(),
                value: Bytes::from(value.clone()),
            }])
            .await
            .expect("write");
    }
    // The writer made the passes: at least the bytes of all but the last pass's tail.
    let evicted = storage_metrics.storage_wal_evicted_bytes_total.get();
    assert!(
        evicted >= (WalPages::EVERY_BYTES - 4096) as u64,
        "evicted {evicted} bytes"
    );
    storage.shutdown();
    drop(storage);
    let storage = open(dir.path());
    let db = &storage.inner.db;
    let cf = cf_handle(db, Cf::Metadata).expect("cf");
    for i in 0..writes as u64 {
        let read = db.get_cf(cf, i.to_be_bytes()).expect("get");
        assert_eq!(read.as_deref(), Some(&value[..]), "key {i}");
    }
}

/// A Raft log written and compacted away for well over `WAL_BYTES_MAX`, while a hard state
/// written once sits in `raft_state`'s memtable: RocksDB flushes what pins the oldest WAL
/// file, so the WAL stays bounded, and the live entries and the hard state read back.
#[actix_rt::test]
async fn the_wal_stays_bounded_while_a_little_column_family_pins_its_oldest_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path());
    let log = LogId {
        topic_id: 3,
        partition: 1,
    };
    let encode =
        |message: &dyn protobuf::Message| Bytes::from(message.write_to_bytes().expect("encode"));
    let hard_state = raft::prelude::HardState {
        term: 1,
        ..Default::default()
    };
    let write_hard_state = WriteOp::Put {
        cf: Cf::RaftState,
        key: hard_state_key(log),
        value: encode(&hard_state),
    };
    storage.write(vec![write_hard_state]).await.expect("write");
    let data = Bytes::from(vec![9u8; 1 << 20]);
    let entries = 5 * WAL_BYTES_MAX / (1 << 20) / 2;
    for index in 1..=entries {
        let entry = raft::prelude::Entry {
            index,
            term: 1,
            data: data.clone(),
            ..Default::default()
        };
        let mut ops = vec![WriteOp::Put {
            cf: Cf::RaftLog,
            key: raft_entry_key(log, index),
            value: encode(&entry),
        }];
        if index % 16 == 0 {
            // Compaction, as a partition does once entries are applied and flushed.
            ops.push(WriteOp::DeleteRange {
                cf: Cf::RaftLog,
                from: raft_entry_key(log, 0),
                to: raft_entry_key(log, index - 8),
            });
        }
        let durable = storage.submit_unsynced(ops).expect("submit");
        if index % 64 == 0 {
            durable.await.expect("durable").expect("write");
        }
    }
    storage.barrier().await.expect("barrier");
    let wal_bytes: u64 = std::fs::read_dir(dir.path())
        .expect("read dir")
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "log"))
        .filter_map(|entry| entry.metadata().ok())
        .map(|metadata| metadata.len())
        .sum();
    let written = entries << 20;
    assert!(
        wal_bytes < WAL_BYTES_MAX * 3 / 2,
        "WAL holds {wal_bytes} bytes after {written} written (bound {WAL_BYTES_MAX})"
    );
    storage.shutdown();
    drop(storage);
    let storage = open(dir.path());
    let persisted = storage.load_raft(log).expect("load");
    let last_compaction = entries / 16 * 16;
    let first_kept = last_compaction - 8;
    let indexes: Vec<u64> = persisted.entries.iter().map(|e| e.index).collect();
    assert_eq!(indexes, (first_kept..=entries).collect::<Vec<_>>());
    assert!(persisted.entries.iter().all(|e| e.data == data));
    assert_eq!(persisted.hard_state, hard_state);
}

#[test]
fn topic_range_covers_exactly_one_topic() {
    let (from, to) = topic_key_range(7);
    assert!(
        record_key(
            LogId {
                topic_id: 7,
                partition: 0
            },
            0
        ) >= from
    );
    assert!(
        record_key(
            LogId {
                topic_id: 7,
                partition: u32::MAX
            },
            u64::MAX
        ) < to
    );
    assert!(
        record_key(
            LogId {
                topic_id: 8,
                partition: 0
            },
            0
        ) >= to
    );
    let (_, last) = topic_key_range(u32::MAX);
    assert_eq!(
        last,
        vec![0, 0, 0, 0],
        "wraps: callers never allocate u32::MAX"
    );
}

#[actix_rt::test]
async fn writes_survive_reopen_and_reads_check_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = LogId {
        topic_id: 1,
        partition: 0,
    };
    let records = vec![
        NewRecord {
            key: None,
            value: Some(Bytes::from_static(b"v"))
        };
        3
    ];
    {
        let storage = open(dir.path());
        let mut ops = Vec::new();
        let mut state = LogState::default();
        for _ in 0..4 {
            let bytes = batch::encode(state.next_offset, 1, &records).expect("encode");
            ops.push(WriteOp::Put {
                cf: Cf::Records,
                key: record_key(log, state.next_offset),
                value: bytes.clone(),
            });
            state.next_offset += 3;
            state.size_bytes += bytes.len() as u64;
        }
        ops.push(log_state_op(log, &state));
        storage.write(ops).await.expect("write");
        storage.shutdown();
    }
    let storage = open(dir.path());
    let state = storage.recover_log(log).expect("recover").state;
    assert_eq!(state.next_offset, 12);
    // Offset 4 lives in the batch starting at 3; reading below 9 stops before the batch at 9.
    let batches = storage.read_batches(log, 4, 9, usize::MAX).expect("read");
    let bases: Vec<u64> = batches
        .iter()
        .map(|b| batch::parse_header(b).expect("header").base_offset)
        .collect();
    assert_eq!(bases, vec![3, 6]);
    // A byte budget smaller than one batch still returns that one batch.
    assert_eq!(storage.read_batches(log, 0, 12, 1).expect("read").len(), 1);
    storage.shutdown();
}

#[actix_rt::test]
async fn recovery_refuses_a_log_state_that_disagrees_with_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path());
    let log = LogId {
        topic_id: 2,
        partition: 1,
    };
    let bytes = batch::encode(
        0,
        1,
        &[NewRecord {
            key: None,
            value: None,
        }],
    )
    .expect("encode");
    let wrong = LogState {
        log_start_offset: 0,
        next_offset: 5,
        size_bytes: bytes.len() as u64,
        applied_index: 1,
    };
    storage
        .write(vec![
            WriteOp::Put {
                cf: Cf::Records,
                key: record_key(log, 0),
                value: bytes,
            },
            log_state_op(log, &wrong),
        ])
        .await
        .expect("write");
    assert!(matches!(
        storage.recover_log(log),
        Err(StorageError::Corrupt { .. })
    ));
    storage.shutdown();
}

#[actix_rt::test]
async fn concurrent_writes_share_fsyncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = Arc::new(Metrics::new());
    let storage = Storage::open(dir.path(), metrics.clone()).expect("open");
    let writes: Vec<_> = (0..200u64)
        .map(|i| {
            storage
                .submit(vec![WriteOp::Put {
                    cf: Cf::Metadata,
                    key: i.to_be_bytes().to_vec(),
                    value: Bytes::from_static(b"x"),
                }])
                .expect("submit")
        })
        .collect();
    for w in writes {
        w.await.expect("waiter").expect("durable");
    }
    let fsyncs = metrics.storage_fsync_seconds.get_sample_count();
    assert!(
        fsyncs < 200,
        "200 queued writes took {fsyncs} fsyncs; group commit should merge them"
    );
    storage.shutdown();
    assert!(matches!(
        storage.submit(Vec::new()),
        Err(StorageError::ShutDown)
    ));
}

fn replayable_batch(log: LogId, state: &mut LogState, bytes: usize) -> Replayable {
    let value = vec![b'x'; bytes];
    let records = vec![NewRecord {
        key: None,
        value: Some(Bytes::from(value)),
    }];
    let batch = batch::encode(state.next_offset, 1, &records).expect("encode");
    let key = record_key(log, state.next_offset);
    state.next_offset += 1;
    state.size_bytes += batch.len() as u64;
    state.applied_index += 1;
    Replayable {
        log,
        applied_index: state.applied_index,
        ops: vec![
            WriteOp::Put {
                cf: Cf::Records,
                key,
                value: batch,
            },
            log_state_op(log, state),
        ],
    }
}

/// The state agrees with the last batch, but a batch in the middle is missing: recovery
/// must refuse the log (it used to check only the last batch, and a replica then served, or
/// led with, a log with a silent hole).
#[actix_rt::test]
async fn recovery_refuses_a_log_with_a_hole_before_its_last_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path());
    let log = LogId {
        topic_id: 2,
        partition: 3,
    };
    let mut state = LogState::default();
    let first = replayable_batch(log, &mut state, 10);
    let _hole = replayable_batch(log, &mut state, 10);
    let last = replayable_batch(log, &mut state, 10);
    let mut ops = first.ops;
    ops.extend(last.ops);
    storage.write(ops).await.expect("write");
    let stored = storage.read_log_state(log).expect("cheap check passes");
    assert_eq!(stored.next_offset, 3);
    let refused = storage.recover_log(log);
    assert!(
        matches!(&refused, Err(StorageError::Corrupt { message, .. }) if message.contains("after offset 1 starts at 2")),
        "{refused:?}"
    );
    storage.shutdown();
}

/// An interrupted snapshot install leaves batches past the log's end; recovery reports them
/// (they are not part of the log) and they can be deleted, after which the log is clean.
#[actix_rt::test]
async fn recovery_reports_what_an_interrupted_install_left_past_the_log_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path());
    let log = LogId {
        topic_id: 5,
        partition: 0,
    };
    let mut state = LogState::default();
    let mut ops = Vec::new();
    for _ in 0..2 {
        ops.extend(replayable_batch(log, &mut state, 10).ops);
    }
    let end = state;
    // Two batches fetched ahead by an install that never wrote its final state.
    for _ in 0..2 {
        let ahead = replayable_batch(log, &mut state, 10);
        ops.extend(ahead.ops.into_iter().take(1));
    }
    storage.write(ops).await.expect("write");
    let recovered = storage.recover_log(log).expect("recover");
    assert_eq!(recovered.state.next_offset, end.next_offset);
    assert!(recovered.leftovers);
    storage
        .write(vec![leftover_delete(log, &recovered.state)])
        .await
        .expect("delete");
    let again = storage.recover_log(log).expect("recover");
    assert_eq!((again.state, again.leftovers), (recovered.state, false));
    storage.shutdown();
}

#[actix_rt::test]
async fn a_flush_on_demand_makes_every_earlier_apply_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path());
    let logs = [1, 2].map(|partition| LogId {
        topic_id: 6,
        partition,
    });
    let mut states = [LogState::default(); 2];
    for round in 0..3 {
        for (log, state) in logs.iter().zip(states.iter_mut()) {
            let write = replayable_batch(*log, state, 100 + round);
            storage
                .submit_replayable(Vec::new(), false, write)
                .expect("submit");
        }
    }
    assert_eq!(storage.durable_applied(logs[0]), 0);
    storage.flush_records().await.expect("flush");
    for (log, state) in logs.iter().zip(&states) {
        assert_eq!(storage.durable_applied(*log), state.applied_index);
    }
    assert_eq!(storage.queue_depth(), 0);
    storage.shutdown();
}

#[actix_rt::test]
async fn replayable_writes_are_readable_at_once_and_durable_after_a_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = Arc::new(Metrics::new());
    let storage = Storage::open(dir.path(), metrics.clone()).expect("open");
    let log = LogId {
        topic_id: 4,
        partition: 2,
    };
    let mut state = LogState::default();
    storage
        .submit_replayable(Vec::new(), false, replayable_batch(log, &mut state, 100))
        .expect("submit")
        .await
        .expect("waiter")
        .expect("written");
    assert_eq!(
        storage
            .recover_log(log)
            .expect("readable")
            .state
            .next_offset,
        1
    );
    assert_eq!(
        storage.durable_applied(log),
        0,
        "nothing is flushed yet, so nothing may be compacted"
    );
    assert_eq!(
        metrics.storage_fsync_seconds.get_sample_count(),
        0,
        "a replayable write is not fsync'd"
    );
    // Past `flush_bytes` the writer asks for a flush; the flusher then publishes the index.
    let writes = FLUSH_BYTES / (1 << 20) + 1;
    for _ in 0..writes {
        storage
            .submit_replayable(
                Vec::new(),
                false,
                replayable_batch(log, &mut state, 1 << 20),
            )
            .expect("submit")
            .await
            .expect("waiter")
            .expect("written");
    }
    // The flush was asked for after the write that crossed 16 MiB, the last but one.
    let deadline = Instant::now() + Duration::from_secs(30);
    while storage.durable_applied(log) < state.applied_index - 1 {
        assert!(
            Instant::now() < deadline,
            "no flush made the applies durable"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(metrics.storage_flush_seconds.get_sample_count() >= 1);
    storage.shutdown();
    drop(storage);
    // Shutdown flushes the rest: the whole log is back after a reopen.
    let storage = open(dir.path());
    let recovered = storage.recover_log(log).expect("recover").state;
    assert_eq!(recovered, state);
    storage.shutdown();
}

#[test]
fn a_group_never_mixes_logged_record_writes_with_replayable_ones() {
    let log = LogId {
        topic_id: 1,
        partition: 0,
    };
    let write = |logged: Vec<WriteOp>, replayable: Option<Replayable>| Command::Write {
        logged,
        sync: true,
        replayable,
        done: oneshot::channel().0,
    };
    let raft_op = WriteOp::Put {
        cf: Cf::RaftLog,
        key: vec![1],
        value: Bytes::new(),
    };
    let records_op = WriteOp::Put {
        cf: Cf::Records,
        key: vec![2],
        value: Bytes::new(),
    };
    let replay = || {
        Some(Replayable {
            log,
            applied_index: 1,
            ops: vec![records_op.clone()],
        })
    };
    let snapshot_install = write(vec![raft_op.clone(), records_op.clone()], None);
    let apply = write(vec![raft_op.clone()], replay());
    let raft_only = write(vec![raft_op.clone()], None);

    let sized = |commands: &[&Command]| {
        let mut size = BatchSizes::default();
        commands.iter().for_each(|command| size.add(command));
        size
    };
    let with_apply = sized(&[&apply]);
    assert!(with_apply.admits(&apply));
    assert!(with_apply.admits(&raft_only));
    assert!(!with_apply.admits(&snapshot_install));
    let with_install = sized(&[&snapshot_install]);
    assert!(!with_install.admits(&apply));
    assert!(with_install.admits(&raft_only));
    assert!(with_install.admits(&snapshot_install));
}

/// The writer allocates each group's `WriteBatch`es at the size `BatchSizes` computes: it
/// must be at least what RocksDB's encoding takes, or the batch grows (and copies) anyway.
#[test]
fn batch_sizes_are_at_least_the_write_batches_they_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path());
    let db = &storage.inner.db;
    let log = LogId {
        topic_id: 1,
        partition: 0,
    };
    let put = |cf, key: Vec<u8>, bytes: usize| WriteOp::Put {
        cf,
        key,
        value: Bytes::from(vec![7; bytes]),
    };
    let logged = vec![
        put(Cf::RaftLog, raft_entry_key(log, 7), 300_000),
        put(Cf::RaftLog, raft_entry_key(log, 8), 1),
        put(Cf::RaftState, vec![1; 40], 0),
        WriteOp::Delete {
            cf: Cf::RaftLog,
            key: vec![2; 16],
        },
        WriteOp::DeleteRange {
            cf: Cf::RaftLog,
            from: raft_entry_key(log, 0),
            to: raft_entry_key(log, 6),
        },
    ];
    let replayable = vec![
        put(Cf::Records, record_key(log, 0), 70_000),
        log_state_op(log, &LogState::default()),
    ];
    let mut size = BatchSizes::default();
    let (mut logged_batch, mut replayable_batch) = (WriteBatch::default(), WriteBatch::default());
    for _ in 0..3 {
        size.add(&Command::Write {
            logged: logged.clone(),
            sync: true,
            replayable: Some(Replayable {
                log,
                applied_index: 1,
                ops: replayable.clone(),
            }),
            done: oneshot::channel().0,
        });
        for op in &logged {
            super::put(db, &mut logged_batch, op).expect("put");
        }
        for op in &replayable {
            super::put(db, &mut replayable_batch, op).expect("put");
        }
    }
    assert!(logged_batch.size_in_bytes() <= size.logged);
    assert!(replayable_batch.size_in_bytes() <= size.replayable);
    // And not wildly more: the estimate is for allocation, not a bound found by doubling.
    assert!(
        size.bytes() < (logged_batch.size_in_bytes() + replayable_batch.size_in_bytes()) * 11 / 10
    );
    storage.shutdown();
}

#[test]
fn log_states_move_from_their_old_column_family_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = LogId {
        topic_id: 9,
        partition: 0,
    };
    let mut state = LogState::default();
    let replayable = replayable_batch(log, &mut state, 10);
    {
        // The layout before: the batch in `records`, the state in `log_state`.
        let storage = open(dir.path());
        let db = &storage.inner.db;
        let WriteOp::Put { key, value, .. } = &replayable.ops[0] else {
            panic!("a put")
        };
        db.put_cf(cf_handle(db, Cf::Records).expect("cf"), key, value)
            .expect("put");
        db.put_cf(
            cf_handle(db, Cf::LogState).expect("cf"),
            log_key(log),
            state.encode(),
        )
        .expect("put");
        storage.shutdown();
    }
    let storage = open(dir.path());
    assert_eq!(storage.recover_log(log).expect("recover").state, state);
    let db = &storage.inner.db;
    let old = cf_handle(db, Cf::LogState).expect("cf");
    assert!(db.iterator_cf(old, IteratorMode::Start).next().is_none());
    storage.shutdown();
}
