//! Records of the `__transaction_state` topic in Kafka's binary format
//! (`TransactionLogKey.json` version 0, `TransactionLogValue.json` versions 0 and 1), so a
//! log written by Ferrite reads in Kafka's tools and the other way round.
//!
//! Both key and value start with their schema version as an int16. The value's version 1
//! is flexible (KIP-482): compact strings/arrays and tagged fields; Ferrite writes version
//! 1 (as Kafka 4.x does with transaction.version 2) and reads both. A null value is the
//! tombstone of an expired transactional id.

use std::collections::BTreeSet;

use super::TxnState;
use crate::codec::{len_u32, put_uvarint, skip_tagged, CodecError, Reader};

pub const KEY_VERSION: i16 = 0;
pub const VALUE_VERSION_WRITTEN: i16 = 1;
/// Longest transactional id a key may carry (an int16-length string).
pub const TRANSACTIONAL_ID_BYTES_MAX: usize = i16::MAX as usize;
/// A bound on the decoded partition list, so a corrupt count cannot allocate unboundedly.
pub const PARTITIONS_DECODED_MAX: usize = 1_000_000;

/// `TransactionLogValue`: the whole state of one transactional id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnLogValue {
    pub producer_id: i64,
    /// Tagged field 0 (version 1+), default -1.
    pub previous_producer_id: i64,
    /// Tagged field 1 (version 1+), default -1.
    pub next_producer_id: i64,
    pub producer_epoch: i16,
    pub transaction_timeout_ms: i32,
    pub transaction_status: TxnState,
    /// Written grouped by topic; null when the state is Empty, as Kafka writes it.
    pub transaction_partitions: BTreeSet<(String, i32)>,
    pub transaction_last_update_timestamp_ms: i64,
    pub transaction_start_timestamp_ms: i64,
    /// Tagged field 2 (version 1+), default 0.
    pub client_transaction_version: i16,
}

/// One record: key plus value, `None` being a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnRecord {
    pub transactional_id: String,
    pub value: Option<TxnLogValue>,
    /// Not part of the log: the epoch the coordinator keeps in memory to answer a KIP-360
    /// retry of InitProducerId. Kafka does not persist it either and reloads it as -1;
    /// [`TxnRecord::decode`] does the same.
    pub last_producer_epoch: i16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxnRecordDecodeError {
    #[error("__transaction_state record truncated at byte {0}")]
    Truncated(usize),
    #[error("unsupported __transaction_state key version {0}")]
    KeyVersion(i16),
    #[error("unsupported __transaction_state value version {0}")]
    ValueVersion(i16),
    #[error("unknown transaction status {0}")]
    Status(i8),
    #[error("invalid length {0} in __transaction_state record")]
    Length(i64),
    #[error("transactional id is not UTF-8")]
    Utf8,
    #[error("{0} trailing bytes after __transaction_state record")]
    Trailing(usize),
}

type DecodeResult<T> = Result<T, TxnRecordDecodeError>;

impl From<CodecError> for TxnRecordDecodeError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::Truncated(at) => TxnRecordDecodeError::Truncated(at),
            CodecError::Length(n) => TxnRecordDecodeError::Length(n),
            CodecError::Utf8 => TxnRecordDecodeError::Utf8,
            CodecError::Trailing(n) => TxnRecordDecodeError::Trailing(n),
        }
    }
}

fn grouped(parts: &BTreeSet<(String, i32)>) -> Vec<(&str, Vec<i32>)> {
    let mut out: Vec<(&str, Vec<i32>)> = Vec::new();
    for (topic, p) in parts {
        match out.last_mut() {
            Some((t, ids)) if *t == topic.as_str() => ids.push(*p),
            _ => out.push((topic.as_str(), vec![*p])),
        }
    }
    out
}

impl TxnLogValue {
    pub fn encode(&self, version: i16) -> Vec<u8> {
        assert!(
            version == 0 || version == 1,
            "TransactionLogValue has versions 0 and 1"
        );
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&self.producer_id.to_be_bytes());
        out.extend_from_slice(&self.producer_epoch.to_be_bytes());
        out.extend_from_slice(&self.transaction_timeout_ms.to_be_bytes());
        out.extend_from_slice(&self.transaction_status.id().to_be_bytes());
        let null = self.transaction_status == TxnState::Empty;
        let groups = grouped(&self.transaction_partitions);
        if version == 0 {
            if null {
                out.extend_from_slice(&(-1i32).to_be_bytes());
            } else {
                out.extend_from_slice(&(groups.len() as i32).to_be_bytes());
                for (topic, ids) in &groups {
                    out.extend_from_slice(&(topic.len() as i16).to_be_bytes());
                    out.extend_from_slice(topic.as_bytes());
                    out.extend_from_slice(&(ids.len() as i32).to_be_bytes());
                    for id in ids {
                        out.extend_from_slice(&id.to_be_bytes());
                    }
                }
            }
        } else if null {
            put_uvarint(&mut out, 0);
        } else {
            put_uvarint(&mut out, len_u32(groups.len()) + 1);
            for (topic, ids) in &groups {
                put_uvarint(&mut out, len_u32(topic.len()) + 1);
                out.extend_from_slice(topic.as_bytes());
                put_uvarint(&mut out, len_u32(ids.len()) + 1);
                for id in ids {
                    out.extend_from_slice(&id.to_be_bytes());
                }
                put_uvarint(&mut out, 0); // PartitionsSchema's tagged fields
            }
        }
        out.extend_from_slice(&self.transaction_last_update_timestamp_ms.to_be_bytes());
        out.extend_from_slice(&self.transaction_start_timestamp_ms.to_be_bytes());
        if version >= 1 {
            // Tagged fields, ascending tag order, only when not the default.
            let mut tagged: Vec<(u32, Vec<u8>)> = Vec::new();
            if self.previous_producer_id != -1 {
                tagged.push((0, self.previous_producer_id.to_be_bytes().to_vec()));
            }
            if self.next_producer_id != -1 {
                tagged.push((1, self.next_producer_id.to_be_bytes().to_vec()));
            }
            if self.client_transaction_version != 0 {
                tagged.push((2, self.client_transaction_version.to_be_bytes().to_vec()));
            }
            put_uvarint(&mut out, len_u32(tagged.len()));
            for (tag, data) in tagged {
                put_uvarint(&mut out, tag);
                put_uvarint(&mut out, len_u32(data.len()));
                out.extend_from_slice(&data);
            }
        }
        out
    }

    pub fn decode(buf: &[u8]) -> DecodeResult<TxnLogValue> {
        let mut r = Reader::new(buf);
        let version = r.i16()?;
        if !(0..=1).contains(&version) {
            return Err(TxnRecordDecodeError::ValueVersion(version));
        }
        let producer_id = r.i64()?;
        let producer_epoch = r.i16()?;
        let transaction_timeout_ms = r.i32()?;
        let status = r.i8()?;
        let transaction_status =
            TxnState::from_id(status).ok_or(TxnRecordDecodeError::Status(status))?;
        let mut parts = BTreeSet::new();
        let topics: Option<usize> = if version == 0 {
            let n = r.i32()?;
            if n < -1 {
                return Err(TxnRecordDecodeError::Length(n.into()));
            }
            usize::try_from(n).ok()
        } else {
            (r.uvarint()? as usize).checked_sub(1)
        };
        for _ in 0..topics.unwrap_or(0) {
            let topic = if version == 0 {
                let n = r.i16()?;
                let n = usize::try_from(n).map_err(|_| TxnRecordDecodeError::Length(n.into()))?;
                r.string_bytes(n)?
            } else {
                let n = (r.uvarint()? as usize)
                    .checked_sub(1)
                    .ok_or(TxnRecordDecodeError::Length(-1))?;
                r.string_bytes(n)?
            };
            let ids = if version == 0 {
                let n = r.i32()?;
                usize::try_from(n).map_err(|_| TxnRecordDecodeError::Length(n.into()))?
            } else {
                (r.uvarint()? as usize)
                    .checked_sub(1)
                    .ok_or(TxnRecordDecodeError::Length(-1))?
            };
            if parts.len() + ids > PARTITIONS_DECODED_MAX {
                return Err(TxnRecordDecodeError::Length(ids as i64));
            }
            for _ in 0..ids {
                parts.insert((topic.clone(), r.i32()?));
            }
            if version >= 1 {
                skip_tagged(&mut r)?;
            }
        }
        let mut v = TxnLogValue {
            producer_id,
            previous_producer_id: -1,
            next_producer_id: -1,
            producer_epoch,
            transaction_timeout_ms,
            transaction_status,
            transaction_partitions: parts,
            transaction_last_update_timestamp_ms: r.i64()?,
            transaction_start_timestamp_ms: r.i64()?,
            client_transaction_version: 0,
        };
        if version >= 1 {
            let n = r.uvarint()?;
            for _ in 0..n {
                let tag = r.uvarint()?;
                let size = r.uvarint()? as usize;
                let mut f = Reader::new(r.take(size)?);
                match tag {
                    0 => v.previous_producer_id = f.i64()?,
                    1 => v.next_producer_id = f.i64()?,
                    2 => v.client_transaction_version = f.i16()?,
                    // Unknown tags are skipped, as the schema's compatibility rules require.
                    _ => continue,
                }
                f.finish()?;
            }
        }
        r.finish()?;
        Ok(v)
    }
}

pub fn encode_key(transactional_id: &str) -> Vec<u8> {
    assert!(
        transactional_id.len() <= TRANSACTIONAL_ID_BYTES_MAX,
        "transactional id length is checked at the request"
    );
    let mut out = Vec::with_capacity(4 + transactional_id.len());
    out.extend_from_slice(&KEY_VERSION.to_be_bytes());
    out.extend_from_slice(&(transactional_id.len() as i16).to_be_bytes());
    out.extend_from_slice(transactional_id.as_bytes());
    out
}

pub fn decode_key(buf: &[u8]) -> DecodeResult<String> {
    let mut r = Reader::new(buf);
    let version = r.i16()?;
    if version != KEY_VERSION {
        return Err(TxnRecordDecodeError::KeyVersion(version));
    }
    let n = r.i16()?;
    let n = usize::try_from(n).map_err(|_| TxnRecordDecodeError::Length(n.into()))?;
    let id = r.string_bytes(n)?;
    r.finish()?;
    Ok(id)
}

impl TxnRecord {
    /// Key and value bytes as stored in `__transaction_state`.
    pub fn encode(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        (
            encode_key(&self.transactional_id),
            self.value.as_ref().map(|v| v.encode(VALUE_VERSION_WRITTEN)),
        )
    }

    pub fn decode(key: &[u8], value: Option<&[u8]>) -> DecodeResult<TxnRecord> {
        Ok(TxnRecord {
            transactional_id: decode_key(key)?,
            value: value.map(TxnLogValue::decode).transpose()?,
            last_producer_epoch: super::NO_PRODUCER_EPOCH,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn value(status: TxnState, parts: &[(&str, i32)]) -> TxnLogValue {
        TxnLogValue {
            producer_id: 7,
            previous_producer_id: -1,
            next_producer_id: -1,
            producer_epoch: 2,
            transaction_timeout_ms: 60_000,
            transaction_status: status,
            transaction_partitions: parts.iter().map(|(t, p)| (t.to_string(), *p)).collect(),
            transaction_last_update_timestamp_ms: 1000,
            transaction_start_timestamp_ms: 900,
            client_transaction_version: 0,
        }
    }

    #[test]
    fn key_bytes_by_hand() {
        // int16 version 0, int16 length 3, "tx1"
        assert_eq!(encode_key("tx1"), vec![0, 0, 0, 3, b't', b'x', b'1']);
        assert_eq!(decode_key(&[0, 0, 0, 3, b't', b'x', b'1']).unwrap(), "tx1");
        assert_eq!(
            decode_key(&[0, 1, 0, 0]),
            Err(TxnRecordDecodeError::KeyVersion(1))
        );
        assert!(decode_key(&[0, 0, 0, 9, b'a']).is_err());
        assert!(decode_key(&[0, 0, 0xff, 0xff]).is_err());
        assert!(decode_key(&[0, 0, 0, 1, b'a', 0]).is_err());
    }

    #[test]
    fn value_v0_bytes_by_hand() {
        let v = value(TxnState::Ongoing, &[("t", 0), ("t", 2)]);
        let expected: Vec<u8> = [
            &[0u8, 0][..],                         // version 0
            &[0, 0, 0, 0, 0, 0, 0, 7],             // ProducerId 7
            &[0, 2],                               // ProducerEpoch 2
            &[0, 0, 0xea, 0x60],                   // TransactionTimeoutMs 60000
            &[1],                                  // TransactionStatus Ongoing
            &[0, 0, 0, 1],                         // one topic
            &[0, 1, b't'],                         // Topic "t"
            &[0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2], // PartitionIds [0, 2]
            &[0, 0, 0, 0, 0, 0, 0x03, 0xe8],       // LastUpdate 1000
            &[0, 0, 0, 0, 0, 0, 0x03, 0x84],       // Start 900
        ]
        .concat();
        assert_eq!(v.encode(0), expected);
        assert_eq!(TxnLogValue::decode(&expected).unwrap(), v);
    }

    #[test]
    fn value_v1_bytes_by_hand() {
        let mut v = value(TxnState::PrepareCommit, &[("ab", 5)]);
        v.previous_producer_id = 3;
        v.client_transaction_version = 2;
        let expected: Vec<u8> = [
            &[0u8, 1][..],
            &[0, 0, 0, 0, 0, 0, 0, 7],
            &[0, 2],
            &[0, 0, 0xea, 0x60],
            &[2],             // PrepareCommit
            &[2],             // compact array, 1 topic
            &[3, b'a', b'b'], // compact string "ab"
            &[2, 0, 0, 0, 5], // compact array [5]
            &[0],             // PartitionsSchema tagged fields
            &[0, 0, 0, 0, 0, 0, 0x03, 0xe8],
            &[0, 0, 0, 0, 0, 0, 0x03, 0x84],
            &[2],                            // two tagged fields
            &[0, 8, 0, 0, 0, 0, 0, 0, 0, 3], // tag 0 PreviousProducerId 3
            &[2, 2, 0, 2],                   // tag 2 ClientTransactionVersion 2
        ]
        .concat();
        assert_eq!(v.encode(1), expected);
        assert_eq!(TxnLogValue::decode(&expected).unwrap(), v);
    }

    #[test]
    fn empty_state_writes_null_partitions() {
        let v = value(TxnState::Empty, &[]);
        let b0 = v.encode(0);
        assert_eq!(&b0[17..21], &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(TxnLogValue::decode(&b0).unwrap(), v);
        let b1 = v.encode(1);
        assert_eq!(b1[17], 0);
        assert_eq!(*b1.last().unwrap(), 0, "no tagged fields");
        assert_eq!(TxnLogValue::decode(&b1).unwrap(), v);
    }

    #[test]
    fn unknown_tags_skipped_and_garbage_rejected() {
        let v = value(TxnState::CompleteAbort, &[]);
        let mut b = v.encode(1);
        let last = b.len() - 1;
        b.truncate(last);
        b.extend_from_slice(&[1, 9, 1, 0xaa]); // one tag 9 of one byte
        assert_eq!(TxnLogValue::decode(&b).unwrap(), v);
        let good = v.encode(1);
        for cut in 0..good.len() {
            assert!(TxnLogValue::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = good.clone();
        bad[16] = 9;
        assert_eq!(
            TxnLogValue::decode(&bad),
            Err(TxnRecordDecodeError::Status(9))
        );
        assert_eq!(
            TxnLogValue::decode(&[0, 2]),
            Err(TxnRecordDecodeError::ValueVersion(2))
        );
        // A partition count far beyond the bytes present fails, it does not allocate.
        let mut huge = value(TxnState::Ongoing, &[("t", 1)]).encode(0);
        huge[24..28].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(TxnLogValue::decode(&huge).is_err());
    }

    #[test]
    fn record_round_trip_and_tombstone() {
        let r = TxnRecord {
            transactional_id: "tx".into(),
            value: Some(value(TxnState::Ongoing, &[("a", 1), ("b", 0), ("b", 3)])),
            last_producer_epoch: super::super::NO_PRODUCER_EPOCH,
        };
        let (k, v) = r.encode();
        assert_eq!(TxnRecord::decode(&k, v.as_deref()).unwrap(), r);
        let t = TxnRecord {
            value: None,
            ..r.clone()
        };
        let (k, v) = t.encode();
        assert!(v.is_none());
        assert_eq!(TxnRecord::decode(&k, None).unwrap(), t);
    }
}
