//! Topic `compression.type` other than `producer`: produced batches are rewritten with the
//! topic's codec before they are validated and appended, as Kafka's `LogValidator` does
//! (`validateMessagesAndAssignOffsetsCompressed`: a batch already in the target codec is
//! kept as sent; any other is decompressed, its records re-encoded and compressed).
//!
//! The default, `producer`, never comes here: the produce path stays zero-decode and the
//! stored bytes are the producer's. Recompression keeps each batch's records, offsets
//! deltas, timestamps, headers and producer id/epoch/sequence; it changes the attributes'
//! codec, the CRC and the length. Decompression is bounded by the vendored decoder's
//! limit (64 MiB, see vendor/kafka-protocol/PATCHED.md), and `max.message.bytes` is then
//! checked on the recompressed batch, as in Kafka.

use bytes::{Bytes, BytesMut};
use ferrite_storage::BatchIter;
use kafka_protocol::records::{
    Compression, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
};

/// The codec bits of a batch's attributes.
const CODEC_MASK: i16 = 0x07;

#[derive(Debug, thiserror::Error)]
pub enum RecompressError {
    /// The batch cannot be read (bad framing, CRC, compressed data): CORRUPT_MESSAGE.
    #[error("cannot decode a batch to recompress it: {0}")]
    Decode(String),
    #[error("cannot recompress a batch: {0}")]
    Encode(String),
}

fn compression(codec: u8) -> Option<Compression> {
    Some(match codec {
        0 => Compression::None,
        1 => Compression::Gzip,
        2 => Compression::Snappy,
        3 => Compression::Lz4,
        4 => Compression::Zstd,
        _ => return None,
    })
}

/// The batches of `records` in `codec` (0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd), or
/// `None` when every batch already uses it (nothing to rewrite).
pub fn recompress(records: &[u8], codec: u8) -> Result<Option<Bytes>, RecompressError> {
    let Some(target) = compression(codec) else {
        return Ok(None);
    };
    let mut headers = Vec::new();
    for b in BatchIter::new(records) {
        let (_, header, _) = b.map_err(|e| RecompressError::Decode(e.to_string()))?;
        headers.push(header);
    }
    if headers
        .iter()
        .all(|h| h.attributes & CODEC_MASK == i16::from(codec))
    {
        return Ok(None);
    }
    let mut out = BytesMut::with_capacity(records.len());
    for b in BatchIter::new(records) {
        let (_, header, batch) = b.map_err(|e| RecompressError::Decode(e.to_string()))?;
        if header.attributes & CODEC_MASK == i16::from(codec) {
            out.extend_from_slice(batch);
            continue;
        }
        let mut buf = Bytes::copy_from_slice(batch);
        let set = RecordBatchDecoder::decode(&mut buf)
            .map_err(|e| RecompressError::Decode(e.to_string()))?;
        if set.records.is_empty() {
            return Err(RecompressError::Decode("a batch without records".into()));
        }
        RecordBatchEncoder::encode(
            &mut out,
            set.records.iter(),
            &RecordEncodeOptions {
                version: 2,
                compression: target,
            },
        )
        .map_err(|e| RecompressError::Encode(e.to_string()))?;
    }
    Ok(Some(out.freeze()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use ferrite_storage::test_support::{make_batch, make_producer_batch, Producer};
    use ferrite_storage::BatchHeader;

    fn values(records: &[u8]) -> Vec<(i64, Option<Bytes>, i64)> {
        let mut b = Bytes::copy_from_slice(records);
        RecordBatchDecoder::decode_all(&mut b)
            .unwrap()
            .into_iter()
            .flat_map(|s| s.records)
            .map(|r| (r.offset, r.value, r.timestamp))
            .collect()
    }

    #[test]
    fn rewrites_only_batches_in_another_codec() {
        let plain = make_batch(5, 1_000, b"hello hello hello");
        assert!(
            recompress(&plain, 0).unwrap().is_none(),
            "already uncompressed"
        );
        for codec in 1..=4u8 {
            let z = recompress(&plain, codec).unwrap().unwrap();
            let h = BatchHeader::parse(&z).unwrap();
            assert_eq!(h.attributes & CODEC_MASK, i16::from(codec));
            assert_eq!(h.record_count, 5);
            assert_eq!(h.base_timestamp, 1_000);
            // Re-encoding takes the max timestamp from the records (all at delta 0 in
            // make_batch), as Kafka's recompression does, not from the old header.
            assert_eq!(h.max_timestamp, 1_000);
            assert_eq!(values(&z), values(&plain));
            assert!(recompress(&z, codec).unwrap().is_none(), "kept as sent");
            // And back to uncompressed.
            let back = recompress(&z, 0).unwrap().unwrap();
            assert_eq!(
                BatchHeader::parse(&back).unwrap().attributes & CODEC_MASK,
                0
            );
            assert_eq!(values(&back), values(&plain));
        }
    }

    #[test]
    fn keeps_the_producer_fields_and_refuses_corruption() {
        let b = make_producer_batch(
            3,
            10,
            b"v",
            Producer {
                producer_id: 77,
                producer_epoch: 2,
                base_sequence: 40,
            },
        );
        let z = recompress(&b, 4).unwrap().unwrap();
        let h = BatchHeader::parse(&z).unwrap();
        assert_eq!(
            (h.producer_id, h.producer_epoch, h.base_sequence),
            (77, 2, 40)
        );
        assert_eq!(h.last_offset_delta, 2);
        let mut bad = b.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert!(matches!(
            recompress(&bad, 4),
            Err(RecompressError::Decode(_))
        ));
        assert!(recompress(&b[..20], 4).is_err());
    }
}
