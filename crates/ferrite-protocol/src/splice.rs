//! Zero-copy Fetch responses: the response is encoded by the `kafka-protocol` codecs with
//! a small placeholder standing in for each partition's records, then cut where each
//! placeholder stands so that the broker can write the real record bytes straight from
//! the segment file (`sendfile`) between the encoded pieces.
//!
//! Only the length prefix in front of each placeholder is rewritten here; every other
//! byte is the codec's own output, so no Kafka field is encoded by hand.
//!
//! Why a placeholder cannot be mistaken for another field: its tag starts with 0xFE and
//! holds 0xFF, bytes that never occur in UTF-8 (every string in a Fetch response), and
//! the numeric fields before a records field (error code, offsets, replica id) are
//! small, non-negative or -1, never 0xFE.. in their high byte. The prefix in front of
//! the tag and the index after it are checked too.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ResponseKind};

use crate::{encode_response, ProtocolError, FRAME_PREFIX_BYTES};

const PLACEHOLDER_TAG: [u8; 12] = [
    0xFE, 0xFF, 0x5A, 0x43, 0xFE, 0x00, 0xFF, 0x17, 0xC0, 0xFE, 0xFF, 0x01,
];
/// Bytes of one placeholder: the tag and a big-endian u32 index.
pub const RECORDS_PLACEHOLDER_BYTES: usize = PLACEHOLDER_TAG.len() + 4;

/// Fetch v12 is the first flexible version (KIP-482): records carry a compact
/// (unsigned varint, length + 1) prefix instead of an int32.
const FETCH_FIRST_FLEXIBLE_VERSION: i16 = 12;

/// The stand-in for the records of the `index`-th spliced partition, in encoding order.
pub fn records_placeholder(index: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(RECORDS_PLACEHOLDER_BYTES);
    b.put_slice(&PLACEHOLDER_TAG);
    b.put_u32(index);
    b.freeze()
}

/// One piece of a spliced response frame, written in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramePart {
    /// Encoded bytes (the first one starts with the frame's length prefix).
    Bytes(Bytes),
    /// The record bytes of placeholder `index`, `len` bytes long, supplied by the caller.
    Records { index: usize, len: u64 },
}

/// Encodes a Fetch response whose partitions' records hold [`records_placeholder`]s
/// numbered 0.. in encoding order (topics, then partitions, as listed), where
/// placeholder `i` stands for `records_lens[i]` bytes of records. Returns the frame cut
/// into pieces; the frame length prefix counts the real record bytes.
pub fn encode_fetch_response_spliced(
    version: i16,
    correlation_id: i32,
    body: &ResponseKind,
    records_lens: &[u64],
) -> Result<Vec<FramePart>, ProtocolError> {
    let api_key = ApiKey::Fetch;
    let err = |reason: String| ProtocolError::Encode {
        api_key,
        version,
        reason,
    };
    if !matches!(body, ResponseKind::Fetch(_)) {
        return Err(err("spliced encoding is for Fetch responses only".into()));
    }
    let flexible = version >= FETCH_FIRST_FLEXIBLE_VERSION;
    let old_prefix: &[u8] = if flexible {
        &[RECORDS_PLACEHOLDER_BYTES as u8 + 1]
    } else {
        &[0, 0, 0, RECORDS_PLACEHOLDER_BYTES as u8]
    };
    let mut buf = encode_response(api_key, version, correlation_id, body)?;

    // Find every placeholder first so that the frame length can be patched before the
    // buffer is frozen and cut.
    let mut found = Vec::with_capacity(records_lens.len());
    let mut cursor = FRAME_PREFIX_BYTES;
    for (index, _) in records_lens.iter().enumerate() {
        let expected = records_placeholder(u32::try_from(index).map_err(|e| err(e.to_string()))?);
        let at = buf
            .get(cursor..)
            .and_then(|rest| {
                rest.windows(RECORDS_PLACEHOLDER_BYTES)
                    .position(|w| w == expected.as_ref())
            })
            .map(|p| p + cursor)
            .ok_or_else(|| err(format!("records placeholder {index} not found")))?;
        let prefix_at = at
            .checked_sub(old_prefix.len())
            .filter(|p| *p >= cursor)
            .ok_or_else(|| err(format!("records placeholder {index} has no length prefix")))?;
        if buf.get(prefix_at..at) != Some(old_prefix) {
            return Err(err(format!(
                "records placeholder {index} has a wrong length prefix"
            )));
        }
        found.push(prefix_at);
        cursor = at + RECORDS_PLACEHOLDER_BYTES;
    }

    let mut prefixes = Vec::with_capacity(records_lens.len());
    let mut frame_len = (buf.len() - FRAME_PREFIX_BYTES) as u64;
    for len in records_lens {
        let prefix = records_prefix(*len, flexible).map_err(err)?;
        frame_len = frame_len - (old_prefix.len() + RECORDS_PLACEHOLDER_BYTES) as u64
            + prefix.len() as u64
            + len;
        prefixes.push(prefix);
    }
    let frame_len = i32::try_from(frame_len).map_err(|_| err("frame over 2 GiB".into()))?;
    if let Some(p) = buf.get_mut(..FRAME_PREFIX_BYTES) {
        p.copy_from_slice(&frame_len.to_be_bytes());
    }

    let buf = buf.freeze();
    let mut parts = Vec::with_capacity(records_lens.len() * 3 + 1);
    let mut cursor = 0;
    for (index, ((prefix_at, prefix), len)) in found
        .into_iter()
        .zip(prefixes)
        .zip(records_lens)
        .enumerate()
    {
        parts.push(FramePart::Bytes(buf.slice(cursor..prefix_at)));
        parts.push(FramePart::Bytes(prefix));
        parts.push(FramePart::Records { index, len: *len });
        cursor = prefix_at + old_prefix.len() + RECORDS_PLACEHOLDER_BYTES;
    }
    parts.push(FramePart::Bytes(buf.slice(cursor..)));
    Ok(parts)
}

/// The length prefix of a records field holding `len` bytes.
fn records_prefix(len: u64, flexible: bool) -> Result<Bytes, String> {
    let mut b = BytesMut::with_capacity(5);
    if flexible {
        let mut v = u32::try_from(len + 1).map_err(|_| "records over 4 GiB".to_string())?;
        while v >= 0x80 {
            b.put_u8((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        b.put_u8(v as u8);
    } else {
        b.put_i32(i32::try_from(len).map_err(|_| "records over 2 GiB".to_string())?);
    }
    Ok(b.freeze())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
    use kafka_protocol::messages::{FetchResponse, TopicName};
    use kafka_protocol::protocol::StrBytes;

    fn response(records: &[Option<Bytes>]) -> ResponseKind {
        let partitions = records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                PartitionData::default()
                    .with_partition_index(i as i32)
                    .with_high_watermark(-1)
                    .with_records(r.clone())
            })
            .collect();
        ResponseKind::Fetch(FetchResponse::default().with_responses(
            vec![FetchableTopicResponse::default()
                .with_topic(TopicName(StrBytes::from_static_str("t")))
                .with_partitions(partitions)],
        ))
    }

    /// Splicing the real bytes back in yields exactly the frame the plain encoder makes.
    #[test]
    fn spliced_frame_equals_the_copied_frame() {
        let sizes = [0usize, 1, 126, 127, 128, 16_383, 16_384, 70_000];
        let real: Vec<Bytes> = sizes
            .iter()
            .map(|n| Bytes::from((0..*n).map(|i| (i % 251) as u8).collect::<Vec<_>>()))
            .collect();
        for version in [4, 11, 12, 16] {
            let copied = encode_response(
                ApiKey::Fetch,
                version,
                7,
                &response(&real.iter().cloned().map(Some).collect::<Vec<_>>()),
            )
            .unwrap();
            let placeholders: Vec<Option<Bytes>> = (0..real.len())
                .map(|i| Some(records_placeholder(i as u32)))
                .collect();
            let lens: Vec<u64> = real.iter().map(|r| r.len() as u64).collect();
            let parts =
                encode_fetch_response_spliced(version, 7, &response(&placeholders), &lens).unwrap();
            let mut joined = Vec::new();
            for p in parts {
                match p {
                    FramePart::Bytes(b) => joined.extend_from_slice(&b),
                    FramePart::Records { index, len } => {
                        assert_eq!(len, real[index].len() as u64);
                        joined.extend_from_slice(&real[index]);
                    }
                }
            }
            assert_eq!(joined, copied.to_vec(), "fetch v{version}");
        }
    }

    #[test]
    fn missing_or_misordered_placeholders_are_errors() {
        let placeholders = vec![Some(records_placeholder(1)), Some(records_placeholder(0))];
        assert!(encode_fetch_response_spliced(12, 1, &response(&placeholders), &[3, 4]).is_err());
        assert!(encode_fetch_response_spliced(12, 1, &response(&[None]), &[3]).is_err());
    }
}
