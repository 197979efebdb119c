//! Records of the `__consumer_offsets` topic in Kafka's binary format, so that tools which
//! read the topic directly (Burrow, kafka-consumer-offsets decoders) understand Ferrite's,
//! and a log written by Kafka reads here. The layouts are those of Kafka's schemas in
//! `group-coordinator/src/main/resources/common/message/`:
//!
//! - `OffsetCommitKey` versions 0-1 (`group`, `topic`, `partition`); written as version 1.
//! - `GroupMetadataKey` version 2 (`group`).
//! - `OffsetCommitValue` versions 0-4 (4 is flexible, KIP-482); written as version 3, as
//!   Kafka 3.x/4.x do (`MetadataVersion.offsetCommitValueVersion`: 1 only when an
//!   expire timestamp is set, which OffsetCommit v5+ cannot ask for).
//! - `GroupMetadataValue` versions 0-4; written as version 3 (`groupMetadataValueVersion`).
//!
//! Both key and value start with their schema version as an int16; the key's version says
//! which record it is. Kafka 4.x's new group coordinator also writes key versions 3 and up
//! (KIP-848 consumer groups, share groups) into this topic; they are reported as
//! [`RecordDecodeError::KeyVersion`] and skipped by the loader, since Ferrite has only
//! classic groups.
//!
//! Ferrite before this format wrote its own JSON (`{"t":"offset",...}`); such a record's
//! key reads as version 31522 (`{"`). [`GroupRecord::decode_any`] still reads it, so
//! that start-up can migrate an old data directory (see the broker's `group_manager`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash)]
#[serde(tag = "t")]
/// The key of Ferrite's pre-binary JSON records, read only to migrate them.
pub enum GroupRecordKey {
    #[serde(rename = "offset")]
    Offset {
        v: u8,
        group: String,
        topic: String,
        partition: i32,
    },
    #[serde(rename = "group")]
    Group { v: u8, group: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetValue {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: Option<String>,
    pub commit_timestamp_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberValue {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    /// The subscription metadata of the chosen protocol.
    pub subscription: Vec<u8>,
    pub assignment: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupValue {
    pub protocol_type: String,
    pub generation_id: i32,
    pub protocol_name: Option<String>,
    pub leader: Option<String>,
    pub state_timestamp_ms: i64,
    pub members: Vec<MemberValue>,
}

/// One record: key plus value, `None` being a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupRecord {
    Offset {
        group: String,
        topic: String,
        partition: i32,
        value: Option<OffsetValue>,
    },
    Group {
        group: String,
        value: Option<GroupValue>,
    },
}

use crate::codec::{
    put_bytes, put_nullable_string, put_string, put_uvarint, skip_tagged, CodecError, Reader,
};

pub const OFFSET_COMMIT_KEY_VERSION: i16 = 1;
pub const GROUP_METADATA_KEY_VERSION: i16 = 2;
pub const OFFSET_COMMIT_VALUE_VERSION_WRITTEN: i16 = 3;
pub const GROUP_METADATA_VALUE_VERSION_WRITTEN: i16 = 3;
/// The JSON records' `v` field before the binary format.
const LEGACY_JSON_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordDecodeError {
    #[error("undecodable __consumer_offsets record: {0}")]
    Codec(#[from] CodecError),
    #[error("__consumer_offsets key version {0} is not a classic group record")]
    KeyVersion(i16),
    #[error("unsupported OffsetCommitValue version {0}")]
    OffsetValueVersion(i16),
    #[error("unsupported GroupMetadataValue version {0}")]
    GroupValueVersion(i16),
    #[error("undecodable Ferrite JSON __consumer_offsets record: {0}")]
    LegacyJson(String),
}

type DecodeResult<T> = Result<T, RecordDecodeError>;

/// How a record read from the topic was encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordFormat {
    /// Kafka's binary schemas (what Ferrite writes).
    Kafka,
    /// Ferrite's JSON from before the binary format; start-up migrates it.
    LegacyJson,
}

impl OffsetValue {
    pub fn encode(&self, version: i16) -> Vec<u8> {
        assert!(
            (0..=4).contains(&version),
            "OffsetCommitValue has versions 0-4"
        );
        let metadata = self.metadata.as_deref().unwrap_or("");
        let mut out = Vec::with_capacity(32 + metadata.len());
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        if version >= 3 {
            out.extend_from_slice(&self.leader_epoch.to_be_bytes());
        }
        if version >= 4 {
            put_uvarint(&mut out, crate::codec::len_u32(metadata.len()) + 1);
            out.extend_from_slice(metadata.as_bytes());
        } else {
            put_string(&mut out, metadata);
        }
        out.extend_from_slice(&self.commit_timestamp_ms.to_be_bytes());
        if version == 1 {
            // expireTimestamp: none (KIP-211 removed per-commit retention).
            out.extend_from_slice(&(-1i64).to_be_bytes());
        }
        if version >= 4 {
            put_uvarint(&mut out, 0); // no tagged fields
        }
        out
    }

    pub fn decode(buf: &[u8]) -> DecodeResult<OffsetValue> {
        let mut r = Reader::new(buf);
        let version = r.i16()?;
        if !(0..=4).contains(&version) {
            return Err(RecordDecodeError::OffsetValueVersion(version));
        }
        let offset = r.i64()?;
        let leader_epoch = if version >= 3 { r.i32()? } else { -1 };
        let metadata = if version >= 4 {
            r.compact_string()?
        } else {
            r.string()?
        };
        let commit_timestamp_ms = r.i64()?;
        if version == 1 {
            // expireTimestamp: Kafka 2.1+ ignores it too (offsets.retention.minutes rules).
            r.i64()?;
        }
        if version >= 4 {
            skip_tagged(&mut r)?;
        }
        r.finish()?;
        Ok(OffsetValue {
            offset,
            leader_epoch,
            metadata: Some(metadata),
            commit_timestamp_ms,
        })
    }
}

impl GroupValue {
    pub fn encode(&self, version: i16) -> Vec<u8> {
        // Version 4 (flexible) is read but not written, as in Kafka 4.x.
        assert!(
            (0..=3).contains(&version),
            "GroupMetadataValue is written at versions 0-3"
        );
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&version.to_be_bytes());
        put_string(&mut out, &self.protocol_type);
        out.extend_from_slice(&self.generation_id.to_be_bytes());
        put_nullable_string(&mut out, self.protocol_name.as_deref());
        put_nullable_string(&mut out, self.leader.as_deref());
        if version >= 2 {
            out.extend_from_slice(&self.state_timestamp_ms.to_be_bytes());
        }
        let n = i32::try_from(self.members.len()).unwrap_or(i32::MAX);
        out.extend_from_slice(&n.to_be_bytes());
        for m in &self.members {
            put_string(&mut out, &m.member_id);
            if version >= 3 {
                put_nullable_string(&mut out, m.group_instance_id.as_deref());
            }
            put_string(&mut out, &m.client_id);
            put_string(&mut out, &m.client_host);
            if version >= 1 {
                out.extend_from_slice(&m.rebalance_timeout_ms.to_be_bytes());
            }
            out.extend_from_slice(&m.session_timeout_ms.to_be_bytes());
            put_bytes(&mut out, &m.subscription);
            put_bytes(&mut out, &m.assignment);
        }
        out
    }

    pub fn decode(buf: &[u8]) -> DecodeResult<GroupValue> {
        let mut r = Reader::new(buf);
        let version = r.i16()?;
        if !(0..=4).contains(&version) {
            return Err(RecordDecodeError::GroupValueVersion(version));
        }
        let flexible = version >= 4;
        let string = |r: &mut Reader<'_>| {
            if flexible {
                r.compact_string()
            } else {
                r.string()
            }
        };
        let nullable = |r: &mut Reader<'_>| {
            if flexible {
                r.compact_nullable_string()
            } else {
                r.nullable_string()
            }
        };
        let bytes = |r: &mut Reader<'_>| {
            if flexible {
                r.compact_bytes()
            } else {
                r.bytes()
            }
        };
        let protocol_type = string(&mut r)?;
        let generation_id = r.i32()?;
        let protocol_name = nullable(&mut r)?;
        let leader = nullable(&mut r)?;
        let state_timestamp_ms = if version >= 2 { r.i64()? } else { -1 };
        let count = if flexible {
            r.compact_len()?.ok_or(CodecError::Length(-1))?
        } else {
            let n = r.i32()?;
            usize::try_from(n).map_err(|_| CodecError::Length(n.into()))?
        };
        // No capacity from the count: a corrupt count fails at the first missing byte.
        let mut members = Vec::new();
        for _ in 0..count {
            let member_id = string(&mut r)?;
            let group_instance_id = if version >= 3 {
                nullable(&mut r)?
            } else {
                None
            };
            let client_id = string(&mut r)?;
            let client_host = string(&mut r)?;
            let rebalance_timeout_ms = if version >= 1 { Some(r.i32()?) } else { None };
            let session_timeout_ms = r.i32()?;
            let subscription = bytes(&mut r)?;
            let assignment = bytes(&mut r)?;
            if flexible {
                skip_tagged(&mut r)?;
            }
            members.push(MemberValue {
                member_id,
                group_instance_id,
                client_id,
                client_host,
                session_timeout_ms,
                // Version 0 had no rebalance timeout; Kafka uses the session timeout.
                rebalance_timeout_ms: rebalance_timeout_ms.unwrap_or(session_timeout_ms),
                subscription,
                assignment,
            });
        }
        if flexible {
            skip_tagged(&mut r)?;
        }
        r.finish()?;
        Ok(GroupValue {
            protocol_type,
            generation_id,
            protocol_name,
            leader,
            state_timestamp_ms,
            members,
        })
    }
}

impl GroupRecord {
    pub fn group(&self) -> &str {
        match self {
            GroupRecord::Offset { group, .. } | GroupRecord::Group { group, .. } => group,
        }
    }

    /// Key and value bytes as stored in the topic (Kafka's binary format).
    pub fn encode(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        match self {
            GroupRecord::Offset {
                group,
                topic,
                partition,
                value,
            } => {
                let mut key = Vec::with_capacity(8 + group.len() + topic.len());
                key.extend_from_slice(&OFFSET_COMMIT_KEY_VERSION.to_be_bytes());
                put_string(&mut key, group);
                put_string(&mut key, topic);
                key.extend_from_slice(&partition.to_be_bytes());
                (
                    key,
                    value
                        .as_ref()
                        .map(|v| v.encode(OFFSET_COMMIT_VALUE_VERSION_WRITTEN)),
                )
            }
            GroupRecord::Group { group, value } => {
                let mut key = Vec::with_capacity(4 + group.len());
                key.extend_from_slice(&GROUP_METADATA_KEY_VERSION.to_be_bytes());
                put_string(&mut key, group);
                (
                    key,
                    value
                        .as_ref()
                        .map(|v| v.encode(GROUP_METADATA_VALUE_VERSION_WRITTEN)),
                )
            }
        }
    }

    /// Decodes a record in Kafka's binary format.
    pub fn decode(key: &[u8], value: Option<&[u8]>) -> DecodeResult<GroupRecord> {
        let mut r = Reader::new(key);
        let version = r.i16()?;
        match version {
            0 | 1 => {
                let group = r.string()?;
                let topic = r.string()?;
                let partition = r.i32()?;
                r.finish()?;
                Ok(GroupRecord::Offset {
                    group,
                    topic,
                    partition,
                    value: value.map(OffsetValue::decode).transpose()?,
                })
            }
            2 => {
                let group = r.string()?;
                r.finish()?;
                Ok(GroupRecord::Group {
                    group,
                    value: value.map(GroupValue::decode).transpose()?,
                })
            }
            v => Err(RecordDecodeError::KeyVersion(v)),
        }
    }

    /// Decodes either format: Kafka's binary, or Ferrite's JSON from before it (whose keys
    /// start with `{`, which as an int16 version is 31488 or more, never a Kafka key).
    pub fn decode_any(
        key: &[u8],
        value: Option<&[u8]>,
    ) -> DecodeResult<(GroupRecord, RecordFormat)> {
        if key.first() == Some(&b'{') {
            return decode_legacy_json(key, value).map(|r| (r, RecordFormat::LegacyJson));
        }
        GroupRecord::decode(key, value).map(|r| (r, RecordFormat::Kafka))
    }
}

fn decode_legacy_json(key: &[u8], value: Option<&[u8]>) -> DecodeResult<GroupRecord> {
    let err = |e: serde_json::Error| RecordDecodeError::LegacyJson(e.to_string());
    match serde_json::from_slice::<GroupRecordKey>(key).map_err(err)? {
        GroupRecordKey::Offset {
            v,
            group,
            topic,
            partition,
        } if v == LEGACY_JSON_VERSION => Ok(GroupRecord::Offset {
            group,
            topic,
            partition,
            value: value.map(serde_json::from_slice).transpose().map_err(err)?,
        }),
        GroupRecordKey::Group { v, group } if v == LEGACY_JSON_VERSION => Ok(GroupRecord::Group {
            group,
            value: value.map(serde_json::from_slice).transpose().map_err(err)?,
        }),
        GroupRecordKey::Offset { v, .. } | GroupRecordKey::Group { v, .. } => Err(
            RecordDecodeError::LegacyJson(format!("unknown JSON record version {v}")),
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn offset_value() -> OffsetValue {
        OffsetValue {
            offset: 42,
            leader_epoch: 5,
            metadata: Some("m".into()),
            commit_timestamp_ms: 1000,
        }
    }

    fn group_value() -> GroupValue {
        GroupValue {
            protocol_type: "consumer".into(),
            generation_id: 3,
            protocol_name: Some("range".into()),
            leader: Some("m1".into()),
            state_timestamp_ms: 900,
            members: vec![MemberValue {
                member_id: "m1".into(),
                group_instance_id: Some("i".into()),
                client_id: "c".into(),
                client_host: "/h".into(),
                session_timeout_ms: 10_000,
                rebalance_timeout_ms: 300_000,
                subscription: vec![1, 2],
                assignment: vec![3],
            }],
        }
    }

    // The vectors below are laid out field by field from Kafka's schemas
    // (group-coordinator/src/main/resources/common/message/*.json).

    #[test]
    fn offset_commit_key_v1_bytes() {
        let r = GroupRecord::Offset {
            group: "g".into(),
            topic: "tp".into(),
            partition: 7,
            value: None,
        };
        let expected: Vec<u8> = [
            &[0u8, 1][..],       // version 1
            &[0, 1, b'g'],       // group
            &[0, 2, b't', b'p'], // topic
            &[0, 0, 0, 7],       // partition
        ]
        .concat();
        let (k, v) = r.encode();
        assert_eq!(k, expected);
        assert!(v.is_none(), "a tombstone has no value");
        assert_eq!(GroupRecord::decode(&k, None).unwrap(), r);
        // Version 0 has the same layout (Kafka before 0.10 wrote it).
        let mut v0 = expected.clone();
        v0[1] = 0;
        assert_eq!(GroupRecord::decode(&v0, None).unwrap(), r);
    }

    #[test]
    fn offset_commit_value_versions_bytes() {
        let v = offset_value();
        let v3: Vec<u8> = [
            &[0u8, 3][..],                   // version 3
            &[0, 0, 0, 0, 0, 0, 0, 42],      // offset
            &[0, 0, 0, 5],                   // leaderEpoch
            &[0, 1, b'm'],                   // metadata
            &[0, 0, 0, 0, 0, 0, 0x03, 0xe8], // commitTimestamp 1000
        ]
        .concat();
        assert_eq!(v.encode(3), v3);
        assert_eq!(OffsetValue::decode(&v3).unwrap(), v);
        // Version 1 (Kafka < 2.1, or with an expire timestamp): no leader epoch, an
        // expireTimestamp after the commit timestamp.
        let v1: Vec<u8> = [
            &[0u8, 1][..],
            &[0, 0, 0, 0, 0, 0, 0, 42],
            &[0, 1, b'm'],
            &[0, 0, 0, 0, 0, 0, 0x03, 0xe8],
            &[0, 0, 0, 0, 0, 0, 0x07, 0xd0], // expireTimestamp 2000, ignored
        ]
        .concat();
        let no_epoch = OffsetValue {
            leader_epoch: -1,
            ..v.clone()
        };
        assert_eq!(OffsetValue::decode(&v1).unwrap(), no_epoch);
        // Version 0 and 2: offset, metadata, commitTimestamp.
        let mut v2: Vec<u8> = [
            &[0u8, 2][..],
            &[0, 0, 0, 0, 0, 0, 0, 42],
            &[0, 1, b'm'],
            &[0, 0, 0, 0, 0, 0, 0x03, 0xe8],
        ]
        .concat();
        assert_eq!(OffsetValue::decode(&v2).unwrap(), no_epoch);
        v2[1] = 0;
        assert_eq!(OffsetValue::decode(&v2).unwrap(), no_epoch);
        // Version 4 (flexible): compact string, tagged fields; an unknown tag is skipped.
        let v4: Vec<u8> = [
            &[0u8, 4][..],
            &[0, 0, 0, 0, 0, 0, 0, 42],
            &[0, 0, 0, 5],
            &[2, b'm'], // compact string, length + 1
            &[0, 0, 0, 0, 0, 0, 0x03, 0xe8],
            &[1, 9, 1, 0xaa], // one tagged field: tag 9, one byte
        ]
        .concat();
        assert_eq!(OffsetValue::decode(&v4).unwrap(), v);
        let mut written_v4 = v.encode(4);
        assert_eq!(written_v4.pop(), Some(0), "no tagged fields written");
        assert_eq!(written_v4, v4[..v4.len() - 4]);
        // A null metadata is written as "" (Kafka's OffsetAndMetadata.NO_METADATA).
        let none = OffsetValue {
            metadata: None,
            ..v.clone()
        };
        assert_eq!(&none.encode(3)[14..16], &[0, 0]);
    }

    #[test]
    fn group_metadata_bytes() {
        let r = GroupRecord::Group {
            group: "g".into(),
            value: Some(group_value()),
        };
        let (k, v) = r.encode();
        assert_eq!(k, vec![0, 2, 0, 1, b'g'], "GroupMetadataKey version 2");
        let v3: Vec<u8> = [
            &[0u8, 3][..], // version 3
            &[0, 8],
            b"consumer",   // protocolType
            &[0, 0, 0, 3], // generation
            &[0, 5],
            b"range",                        // protocol
            &[0, 2, b'm', b'1'],             // leader
            &[0, 0, 0, 0, 0, 0, 0x03, 0x84], // currentStateTimestamp 900
            &[0, 0, 0, 1],                   // one member
            &[0, 2, b'm', b'1'],             // memberId
            &[0, 1, b'i'],                   // groupInstanceId
            &[0, 1, b'c'],                   // clientId
            &[0, 2, b'/', b'h'],             // clientHost
            &[0, 4, 0x93, 0xe0],             // rebalanceTimeout 300000
            &[0, 0, 0x27, 0x10],             // sessionTimeout 10000
            &[0, 0, 0, 2, 1, 2],             // subscription
            &[0, 0, 0, 1, 3],                // assignment
        ]
        .concat();
        assert_eq!(v.as_deref(), Some(&v3[..]));
        assert_eq!(GroupRecord::decode(&k, Some(&v3)).unwrap(), r);
        // Version 4 (flexible): compact strings and bytes, tagged fields per member and
        // at the end.
        let v4: Vec<u8> = [
            &[0u8, 4][..],
            &[9],
            b"consumer",
            &[0, 0, 0, 3],
            &[6],
            b"range",
            &[3, b'm', b'1'],
            &[0, 0, 0, 0, 0, 0, 0x03, 0x84],
            &[2], // compact array of one
            &[3, b'm', b'1'],
            &[2, b'i'],
            &[2, b'c'],
            &[3, b'/', b'h'],
            &[0, 4, 0x93, 0xe0],
            &[0, 0, 0x27, 0x10],
            &[3, 1, 2],
            &[2, 3],
            &[0], // member tagged fields
            &[0], // tagged fields
        ]
        .concat();
        assert_eq!(GroupValue::decode(&v4).unwrap(), group_value());
        // Version 0: no currentStateTimestamp, groupInstanceId, rebalanceTimeout (the
        // session timeout stands in for it, as in Kafka's loader).
        let mut g0 = group_value();
        g0.state_timestamp_ms = -1;
        g0.members[0].group_instance_id = None;
        g0.members[0].rebalance_timeout_ms = 10_000;
        let b0 = g0.encode(0);
        assert_eq!(GroupValue::decode(&b0).unwrap(), g0);
        // An empty group (after its last member left): null protocol and leader.
        let empty = GroupValue {
            protocol_type: "consumer".into(),
            generation_id: 4,
            protocol_name: None,
            leader: None,
            state_timestamp_ms: 5,
            members: vec![],
        };
        let b = empty.encode(3);
        assert_eq!(&b[16..20], &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(GroupValue::decode(&b).unwrap(), empty);
    }

    #[test]
    fn garbage_and_other_record_types_rejected() {
        let (k, v) = GroupRecord::Group {
            group: "g".into(),
            value: Some(group_value()),
        }
        .encode();
        let v = v.unwrap();
        for cut in 0..v.len() {
            assert!(
                GroupRecord::decode(&k, Some(&v[..cut])).is_err(),
                "cut at {cut}"
            );
        }
        for cut in 0..k.len() {
            assert!(
                GroupRecord::decode(&k[..cut], None).is_err(),
                "cut at {cut}"
            );
        }
        let mut trailing = v.clone();
        trailing.push(0);
        assert!(GroupRecord::decode(&k, Some(&trailing)).is_err());
        // Kafka 4.x's KIP-848 records (ConsumerGroupMetadataKey is version 3).
        assert_eq!(
            GroupRecord::decode(&[0, 3, 0, 1, b'g'], None),
            Err(RecordDecodeError::KeyVersion(3))
        );
        assert!(matches!(
            OffsetValue::decode(&[0, 5]),
            Err(RecordDecodeError::OffsetValueVersion(5))
        ));
        // A member count far beyond the bytes present fails without allocating.
        let mut huge = group_value().encode(3);
        let at = 2 + 10 + 4 + 7 + 4 + 8;
        huge[at..at + 4].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(GroupValue::decode(&huge).is_err());
    }

    #[test]
    fn legacy_json_records_still_read() {
        // Exactly what Ferrite wrote before the binary format.
        let key = br#"{"t":"offset","v":1,"group":"g","topic":"t","partition":3}"#;
        let value = br#"{"offset":42,"leader_epoch":0,"metadata":"m","commit_timestamp_ms":9}"#;
        assert_eq!(
            i16::from_be_bytes([key[0], key[1]]),
            31522,
            "Burrow's 'key version 31522'"
        );
        assert!(GroupRecord::decode(key, Some(value)).is_err());
        let (r, format) = GroupRecord::decode_any(key, Some(value)).unwrap();
        assert_eq!(format, RecordFormat::LegacyJson);
        assert_eq!(
            r,
            GroupRecord::Offset {
                group: "g".into(),
                topic: "t".into(),
                partition: 3,
                value: Some(OffsetValue {
                    offset: 42,
                    leader_epoch: 0,
                    metadata: Some("m".into()),
                    commit_timestamp_ms: 9,
                }),
            }
        );
        let gkey = br#"{"t":"group","v":1,"group":"g"}"#;
        let (r, _) = GroupRecord::decode_any(gkey, None).unwrap();
        assert_eq!(
            r,
            GroupRecord::Group {
                group: "g".into(),
                value: None
            }
        );
        assert!(GroupRecord::decode_any(b"{garbage", None).is_err());
        let (k, v) = r.encode();
        assert_eq!(
            GroupRecord::decode_any(&k, v.as_deref()).unwrap().1,
            RecordFormat::Kafka
        );
    }
}
