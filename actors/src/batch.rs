//! Kafka v2 record batches: the one on-disk and on-wire data format.
//!
//! Every partition stores its log as Kafka v2 `RecordBatch`es, so the HTTP API today and the Kafka
//! protocol listener later read the same bytes. Encoding and decoding of records is delegated to the
//! `kafka-protocol` crate; this module adds what a log needs on top: assigning offsets, reading the
//! fixed-size header without decoding records, and checking the CRC before a batch is written and
//! after it is read (a torn or bit-rotted batch is an error, never data).

use bytes::{Bytes, BytesMut};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
    TimestampType, NO_PARTITION_LEADER_EPOCH, NO_PRODUCER_EPOCH, NO_PRODUCER_ID,
};

use crate::error::BatchError;
use crate::producers::ProducerBatch;

/// Size of the fixed v2 batch header that precedes the records.
pub const HEADER_BYTES: usize = 61;
const MAGIC_V2: i8 = 2;
const PARTITION_LEADER_EPOCH_OFFSET: usize = 12;
const CRC_OFFSET: usize = 17;
const ATTRIBUTES_OFFSET: usize = 21;

/// One record as a producer hands it to a partition, before it has an offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
}

/// A record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
}

/// The fields of a batch header the log needs, read without decoding records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: u64,
    /// Total size of the batch in bytes, header included.
    pub size_bytes: u64,
    pub record_count: u32,
    pub max_timestamp_ms: i64,
    /// The idempotent producer that wrote it (`id` -1 if none), read from the header.
    pub producer: ProducerBatch,
}

impl BatchHeader {
    /// Offset one past the last record of this batch.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }
}

/// Encode `records` as one uncompressed v2 batch whose first record gets `base_offset`.
///
/// Offsets are dense: record `i` gets `base_offset + i`. All records share `timestamp_ms`, the
/// broker's append time (the encoder cannot set the LogAppendTime attribute bit, so the batch says
/// CreateTime with the broker's clock). Retention by time goes by batches' max timestamps: the
/// broker's clock for these, the producer's for batches a Kafka client sent (which may be at
/// most an hour ahead, see [`check_client_batch`]).
pub fn encode(
    base_offset: u64,
    timestamp_ms: i64,
    records: &[NewRecord],
) -> Result<Bytes, BatchError> {
    encode_as(base_offset, timestamp_ms, records, None)
}

/// An idempotent producer's place in its sequence: who, which epoch, and the first record's
/// sequence number (the batch's records take the following ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerSequence {
    pub id: i64,
    pub epoch: i16,
    pub base_sequence: i32,
}

/// [`encode`], with the producer id, epoch and base sequence of an idempotent producer in the
/// header (Kafka's layout, so the Kafka listener and the HTTP API write the same batches).
pub fn encode_as(
    base_offset: u64,
    timestamp_ms: i64,
    records: &[NewRecord],
    producer: Option<ProducerSequence>,
) -> Result<Bytes, BatchError> {
    if let Some(p) = producer {
        // The encoder starts a new batch where sequences wrap; one request is one batch.
        if i64::from(p.base_sequence) + records.len() as i64 > i64::from(i32::MAX) + 1
            || p.id < 0
            || p.epoch < 0
            || p.base_sequence < 0
        {
            return Err(BatchError::Encode(format!(
                "producer {} epoch {} cannot write {} records from sequence {}",
                p.id,
                p.epoch,
                records.len(),
                p.base_sequence
            )));
        }
    }
    if records.is_empty() {
        return Err(BatchError::Empty);
    }
    let base =
        i64::try_from(base_offset).map_err(|_| BatchError::OffsetOverflow { base_offset })?;
    let kafka_records: Vec<Record> = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let delta = i as i64;
            Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: NO_PARTITION_LEADER_EPOCH,
                producer_id: producer.map_or(NO_PRODUCER_ID, |p| p.id),
                producer_epoch: producer.map_or(NO_PRODUCER_EPOCH, |p| p.epoch),
                timestamp_type: TimestampType::Creation,
                offset: base + delta,
                // The encoder splits a batch wherever `offset - sequence` changes; with
                // `sequence = delta - 1` it stays constant and the batch's base sequence is -1,
                // Kafka's "no sequence" for a non-idempotent producer.
                sequence: match producer {
                    Some(p) => p.base_sequence + delta as i32,
                    None => delta as i32 - 1,
                },
                timestamp: timestamp_ms,
                key: r.key.clone(),
                value: r.value.clone(),
                headers: Default::default(),
            }
        })
        .collect();
    let mut buf = BytesMut::new();
    let options = RecordEncodeOptions {
        version: MAGIC_V2,
        compression: Compression::None,
    };
    RecordBatchEncoder::encode(&mut buf, kafka_records.iter(), &options)
        .map_err(|e| BatchError::Encode(e.to_string()))?;
    let bytes = buf.freeze();
    let header = parse_header(&bytes)?;
    // Invariant pair: what we meant to write is what the header says (one batch, dense offsets).
    assert_eq!(
        header.base_offset, base_offset,
        "encoder moved the base offset"
    );
    assert_eq!(
        header.record_count as usize,
        records.len(),
        "encoder split or dropped records"
    );
    assert_eq!(
        header.size_bytes as usize,
        bytes.len(),
        "encoder produced more than one batch"
    );
    Ok(bytes)
}

/// A copy of the batch `bytes` (encoded with any base offset) that starts at `base_offset`,
/// with `leader_epoch` (the Raft term that committed it) as its partition leader epoch.
///
/// Both sit before the CRC'd part of a v2 batch, so they are written without touching the
/// records or the CRC; the header is validated on the way (CRC included).
pub fn with_base_offset_and_epoch(
    bytes: &[u8],
    base_offset: u64,
    leader_epoch: u64,
) -> Result<(Bytes, BatchHeader), BatchError> {
    let base =
        i64::try_from(base_offset).map_err(|_| BatchError::OffsetOverflow { base_offset })?;
    parse_header(bytes)?;
    let mut out = BytesMut::from(bytes);
    out[0..8].copy_from_slice(&base.to_be_bytes());
    let epoch = i32::try_from(leader_epoch).unwrap_or(i32::MAX);
    out[PARTITION_LEADER_EPOCH_OFFSET..PARTITION_LEADER_EPOCH_OFFSET + 4]
        .copy_from_slice(&epoch.to_be_bytes());
    let out = out.freeze();
    let header = parse_header(&out)?;
    Ok((out, header))
}

/// Put `at_ms` in the base offset field of the proposed batch `bytes`: outside the CRC, and
/// overwritten with the real base offset at apply (see the partition's apply).
pub fn stamp_proposal(bytes: &mut [u8], at_ms: i64) {
    bytes[0..8].copy_from_slice(&at_ms.max(1).to_be_bytes());
}

/// A proposed batch's base offset field (the proposer's clock, see [`stamp_proposal`]) and its
/// producer, read from the fixed header without checking the CRC; None if too short to be one.
pub fn peek_proposal(bytes: &[u8]) -> Option<(i64, ProducerBatch)> {
    if bytes.len() < HEADER_BYTES {
        return None;
    }
    let record_count = u32::try_from(i32::from_be_bytes(array(bytes, 57))).unwrap_or(0);
    Some((
        i64::from_be_bytes(array(bytes, 0)),
        ProducerBatch {
            id: i64::from_be_bytes(array(bytes, 43)),
            epoch: i16::from_be_bytes(array(bytes, 51)),
            base_sequence: i32::from_be_bytes(array(bytes, 53)),
            record_count,
        },
    ))
}

/// Attribute bits a client batch may not carry here: transactional (0x10) and control (0x20)
/// batches belong to transactions, which PubG1 does not implement.
const TRANSACTIONAL_OR_CONTROL: i16 = 0x30;

/// Why a batch a Kafka client sent cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientBatchError {
    /// Not a whole, intact v2 batch: length, magic, CRC, or records that do not decode to what
    /// the header says (count, dense offsets), or more than it may decompress to.
    Corrupt(String),
    /// Well-formed, but not acceptable: more than one batch, a reserved producer id.
    Invalid(String),
    /// A timestamp too far in the future (it would hold time-based retention back).
    Timestamp(String),
    /// A transactional or control batch.
    Transactional,
}

/// How far ahead of the broker's clock a record's timestamp may be (Kafka's
/// `log.message.timestamp.after.max.ms` default since 3.6).
pub const TIMESTAMP_AHEAD_MAX_MS: i64 = 60 * 60 * 1000;

/// Check the `records` field of one partition of a Kafka produce request, the way it will be
/// stored and later read: exactly one v2 batch (Kafka's rule since Produce v3), whole, CRC
/// intact, not transactional, decoding (decompressed, bounded) to exactly the records its
/// header counts at dense offsets, no timestamp more than [`TIMESTAMP_AHEAD_MAX_MS`] ahead of
/// `now_ms`, and no producer id of the cluster's own. Everything a reader will later trust of
/// the batch is checked here, because a batch is replicated as it is: one a reader cannot
/// decode would break every reader of the partition. Returned with base offset 0, ready to
/// propose (the real base offset is set at apply).
pub fn check_client_batch(records: &Bytes, now_ms: i64) -> Result<Bytes, ClientBatchError> {
    let corrupt = |why: String| ClientBatchError::Corrupt(why);
    let header = parse_header(records).map_err(|e| corrupt(e.to_string()))?;
    let size = header.size_bytes as usize;
    if size != records.len() {
        return Err(ClientBatchError::Invalid(
            "exactly one record batch per partition".into(),
        ));
    }
    if header.record_count == 0 {
        return Err(corrupt("a batch without records".into()));
    }
    let attributes = i16::from_be_bytes(array(records, ATTRIBUTES_OFFSET));
    if attributes & TRANSACTIONAL_OR_CONTROL != 0 {
        return Err(ClientBatchError::Transactional);
    }
    if header.producer.id >= crate::producers::RESERVED_PRODUCER_IDS {
        return Err(ClientBatchError::Invalid(format!(
            "producer id {} is in the range the cluster keeps for itself",
            header.producer.id
        )));
    }
    if header.max_timestamp_ms > now_ms.saturating_add(TIMESTAMP_AHEAD_MAX_MS) {
        return Err(ClientBatchError::Timestamp(format!(
            "max timestamp {} is more than {TIMESTAMP_AHEAD_MAX_MS} ms ahead of the broker's clock",
            header.max_timestamp_ms
        )));
    }
    let mut batch = BytesMut::from(&records[..]);
    batch[0..8].copy_from_slice(&0i64.to_be_bytes());
    let batch = batch.freeze();
    let decoded = decode(&batch).map_err(|e| corrupt(e.to_string()))?;
    if let Some((i, r)) = decoded
        .iter()
        .enumerate()
        .find(|(i, r)| r.offset != *i as u64)
    {
        return Err(corrupt(format!(
            "record {i} has offset delta {}, not {i}",
            r.offset
        )));
    }
    Ok(batch)
}

/// Read and validate the fixed header of the batch at the start of `bytes`, CRC included.
pub fn parse_header(bytes: &[u8]) -> Result<BatchHeader, BatchError> {
    if bytes.len() < HEADER_BYTES {
        return Err(BatchError::Truncated { len: bytes.len() });
    }
    let base_offset = i64::from_be_bytes(array(bytes, 0));
    let batch_length = i32::from_be_bytes(array(bytes, 8));
    let magic = bytes[16] as i8;
    if magic != MAGIC_V2 {
        return Err(BatchError::Magic { magic });
    }
    let size_bytes =
        usize::try_from(batch_length).map_err(|_| BatchError::Truncated { len: bytes.len() })? + 12;
    if size_bytes > bytes.len() || size_bytes < HEADER_BYTES || base_offset < 0 {
        return Err(BatchError::Truncated { len: bytes.len() });
    }
    let stored_crc = u32::from_be_bytes(array(bytes, CRC_OFFSET));
    let computed_crc = crc32c::crc32c(&bytes[ATTRIBUTES_OFFSET..size_bytes]);
    if stored_crc != computed_crc {
        return Err(BatchError::Crc {
            base_offset,
            stored: stored_crc,
            computed: computed_crc,
        });
    }
    let last_offset_delta = i32::from_be_bytes(array(bytes, 23));
    let max_timestamp_ms = i64::from_be_bytes(array(bytes, 35));
    let record_count = i32::from_be_bytes(array(bytes, 57));
    let record_count =
        u32::try_from(record_count).map_err(|_| BatchError::Truncated { len: bytes.len() })?;
    if i64::from(last_offset_delta) + 1 != i64::from(record_count) {
        return Err(BatchError::Sparse {
            base_offset,
            last_offset_delta,
            record_count,
        });
    }
    Ok(BatchHeader {
        base_offset: base_offset as u64,
        size_bytes: size_bytes as u64,
        record_count,
        max_timestamp_ms,
        producer: ProducerBatch {
            id: i64::from_be_bytes(array(bytes, 43)),
            epoch: i16::from_be_bytes(array(bytes, 51)),
            base_sequence: i32::from_be_bytes(array(bytes, 53)),
            record_count,
        },
    })
}

/// Decode every record of one stored batch, after checking its header and CRC.
pub fn decode(bytes: &Bytes) -> Result<Vec<StoredRecord>, BatchError> {
    let header = parse_header(bytes)?;
    let mut buf = bytes.slice(..header.size_bytes as usize);
    let set =
        RecordBatchDecoder::decode(&mut buf).map_err(|e| BatchError::Decode(e.to_string()))?;
    let records: Vec<StoredRecord> = set
        .records
        .into_iter()
        .map(|r| StoredRecord {
            offset: r.offset as u64,
            timestamp_ms: r.timestamp,
            key: r.key,
            value: r.value,
        })
        .collect();
    if records.len() != header.record_count as usize {
        return Err(BatchError::Decode(format!(
            "header says {} records, decoded {}",
            header.record_count,
            records.len()
        )));
    }
    Ok(records)
}

fn array<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(key: Option<&str>, value: &str) -> NewRecord {
        NewRecord {
            key: key.map(|k| Bytes::from(k.to_owned())),
            value: Some(Bytes::from(value.to_owned())),
        }
    }

    #[test]
    fn round_trip_assigns_dense_offsets() {
        let records = vec![rec(Some("a"), "1"), rec(None, "2"), rec(Some("c"), "")];
        let bytes = encode(42, 1_700_000_000_000, &records).expect("encode");
        let header = parse_header(&bytes).expect("header");
        assert_eq!(header.base_offset, 42);
        assert_eq!(header.record_count, 3);
        assert_eq!(header.next_offset(), 45);
        assert_eq!(header.max_timestamp_ms, 1_700_000_000_000);
        let decoded = decode(&bytes).expect("decode");
        let offsets: Vec<u64> = decoded.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, vec![42, 43, 44]);
        assert_eq!(decoded[0].key.as_deref(), Some(&b"a"[..]));
        assert_eq!(decoded[1].key, None);
        assert_eq!(decoded[2].value.as_deref(), Some(&b""[..]));
        // Base sequence is "none" (-1) for a non-idempotent batch.
        assert_eq!(i32::from_be_bytes(array(&bytes, 53)), -1);
    }

    #[test]
    fn a_flipped_bit_is_a_crc_error() {
        let bytes = encode(0, 0, &[rec(Some("k"), "value")]).expect("encode");
        let mut corrupt = bytes.to_vec();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0x01;
        assert!(matches!(
            parse_header(&corrupt),
            Err(BatchError::Crc { .. })
        ));
        assert!(matches!(
            decode(&Bytes::from(corrupt)),
            Err(BatchError::Crc { .. })
        ));
    }

    #[test]
    fn short_or_foreign_bytes_are_rejected() {
        assert!(matches!(
            parse_header(&[0u8; 10]),
            Err(BatchError::Truncated { .. })
        ));
        let mut bytes = encode(0, 0, &[rec(None, "v")]).expect("encode").to_vec();
        bytes[16] = 1;
        assert!(matches!(
            parse_header(&bytes),
            Err(BatchError::Magic { magic: 1 })
        ));
        assert!(matches!(encode(0, 0, &[]), Err(BatchError::Empty)));
    }

    #[test]
    fn a_client_batch_is_checked_whole_and_stored_as_sent() {
        let now = 1_796_000_000_000;
        let one = encode(7, now, &[rec(None, "a"), rec(None, "b")]).expect("encode");
        let checked = check_client_batch(&one, now).expect("valid");
        // The base offset is reset; the rest is byte for byte what was sent.
        assert_eq!(parse_header(&checked).expect("header").base_offset, 0);
        assert_eq!(checked[8..], one[8..]);
        let (stored, header) = with_base_offset_and_epoch(&checked, 40, 3).expect("stored");
        assert_eq!((header.base_offset, header.record_count), (40, 2));
        assert_eq!(i32::from_be_bytes(array(&stored, 12)), 3);
        assert_eq!(decode(&stored).expect("decode")[1].offset, 41);

        let mut two = one.to_vec();
        two.extend_from_slice(&one);
        assert!(matches!(
            check_client_batch(&Bytes::from(two), now),
            Err(ClientBatchError::Invalid(_))
        ));
        let mut truncated = one.to_vec();
        truncated.pop();
        assert!(matches!(
            check_client_batch(&Bytes::from(truncated), now),
            Err(ClientBatchError::Corrupt(_))
        ));
        assert!(check_client_batch(&Bytes::new(), now).is_err());
        let resigned = |mut bytes: Vec<u8>| {
            let crc = crc32c::crc32c(&bytes[ATTRIBUTES_OFFSET..]);
            bytes[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
            Bytes::from(bytes)
        };
        let mut transactional = one.to_vec();
        transactional[22] |= 0x10;
        assert_eq!(
            check_client_batch(&resigned(transactional), now),
            Err(ClientBatchError::Transactional)
        );
        // A header that claims more records than the batch holds (CRC made valid): a reader
        // would fail on it, so it is never stored.
        let mut lying = one.to_vec();
        lying[23..27].copy_from_slice(&(i32::MAX - 1).to_be_bytes());
        lying[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(
            check_client_batch(&resigned(lying), now),
            Err(ClientBatchError::Corrupt(_))
        ));
        let ahead = encode(0, now + 2 * TIMESTAMP_AHEAD_MAX_MS, &[rec(None, "a")]).expect("encode");
        assert!(matches!(
            check_client_batch(&ahead, now),
            Err(ClientBatchError::Timestamp(_))
        ));
        let reserved = ProducerSequence {
            id: crate::producers::RESERVED_PRODUCER_IDS,
            epoch: 0,
            base_sequence: 0,
        };
        let theirs = encode_as(0, now, &[rec(None, "a")], Some(reserved)).expect("encode");
        assert!(matches!(
            check_client_batch(&theirs, now),
            Err(ClientBatchError::Invalid(_))
        ));
    }

    #[test]
    fn an_idempotent_batch_carries_its_producer_in_the_header() {
        let producer = ProducerSequence {
            id: 77,
            epoch: 2,
            base_sequence: 40,
        };
        let records = [rec(None, "a"), rec(None, "b"), rec(None, "c")];
        let bytes = encode_as(0, 5, &records, Some(producer)).expect("encode");
        let header = parse_header(&bytes).expect("header");
        assert_eq!(
            header.producer,
            ProducerBatch {
                id: 77,
                epoch: 2,
                base_sequence: 40,
                record_count: 3
            }
        );
        assert_eq!(header.producer.last_sequence(), 42);
        let plain = parse_header(&encode(0, 5, &records).expect("encode")).expect("header");
        assert!(!plain.producer.is_idempotent());
        let wraps = ProducerSequence {
            base_sequence: i32::MAX - 1,
            ..producer
        };
        assert!(matches!(
            encode_as(0, 5, &records, Some(wraps)),
            Err(BatchError::Encode(_))
        ));
    }

    proptest! {
        #[test]
        fn any_records_round_trip(
            base in 0u64..(1 << 40),
            values in proptest::collection::vec(
                (proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
                 proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64))), 1..50),
        ) {
            let records: Vec<NewRecord> = values
                .into_iter()
                .map(|(k, v)| NewRecord { key: k.map(Bytes::from), value: v.map(Bytes::from) })
                .collect();
            let bytes = encode(base, 7, &records).expect("encode");
            let decoded = decode(&bytes).expect("decode");
            prop_assert_eq!(decoded.len(), records.len());
            for (i, (d, r)) in decoded.iter().zip(&records).enumerate() {
                prop_assert_eq!(d.offset, base + i as u64);
                prop_assert_eq!(&d.key, &r.key);
                prop_assert_eq!(&d.value, &r.value);
            }
        }
    }
}
