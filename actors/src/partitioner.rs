//! Where a record goes when the producer names a topic but not a partition.
//!
//! Keyed records use Kafka's default partitioner, `toPositive(murmur2(key)) % partitions`, so a key
//! lands on the partition a Java, librdkafka or Sarama producer would pick for the same key bytes.
//! Keyless records are spread round-robin by the caller's counter.

/// Seed of Kafka's `Utils.murmur2`.
const KAFKA_MURMUR2_SEED: u32 = 0x9747_b28c;

/// Kafka's `Utils.murmur2`: MurmurHash2 over little-endian words with Kafka's seed, as a Java int.
pub fn kafka_murmur2(key: &[u8]) -> i32 {
    murmur2::murmur2(key, KAFKA_MURMUR2_SEED) as i32
}

/// The partition Kafka's default partitioner picks for `key` among `partitions`.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    // Kafka's toPositive: clear the sign bit (not abs, which overflows on i32::MIN).
    let positive = (kafka_murmur2(key) & 0x7fff_ffff) as u32;
    positive % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Apache Kafka's own vectors, `UtilsTest.testMurmur2` in the Java client.
    #[test]
    fn matches_kafka_murmur2_vectors() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(
                kafka_murmur2(key),
                expected,
                "key {:?}",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn partition_is_positive_hash_modulo_count() {
        // -973932308 & 0x7fffffff = 1173551340; 1173551340 % 3 = 0, % 7 = 4.
        assert_eq!(partition_for_key(b"21", 3), 1_173_551_340 % 3);
        assert_eq!(partition_for_key(b"21", 7), 1_173_551_340 % 7);
        // 479470107 is already positive.
        assert_eq!(partition_for_key(b"abc", 10), 479_470_107 % 10);
        for n in 1..64 {
            assert!(partition_for_key(b"foobar", n) < n);
        }
    }
}
