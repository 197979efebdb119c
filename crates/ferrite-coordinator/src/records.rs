//! Records of the `__consumer_offsets` topic. Each is one Kafka record whose key names
//! what it is about and whose value is the latest state (a null value is a tombstone).
//! The encoding is Ferrite's own JSON, versioned by the `v` field; it is not Kafka's
//! binary `OffsetCommitKey`/`GroupMetadataValue` schemas.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash)]
#[serde(tag = "t")]
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

pub const RECORD_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
#[error("undecodable __consumer_offsets record: {0}")]
pub struct RecordDecodeError(String);

impl GroupRecord {
    pub fn group(&self) -> &str {
        match self {
            GroupRecord::Offset { group, .. } | GroupRecord::Group { group, .. } => group,
        }
    }

    /// Key and value bytes as stored in the topic.
    pub fn encode(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        // Serializing these plain structs cannot fail; an empty key would be a bug caught
        // by the decode round-trip test.
        match self {
            GroupRecord::Offset {
                group,
                topic,
                partition,
                value,
            } => {
                let key = GroupRecordKey::Offset {
                    v: RECORD_VERSION,
                    group: group.clone(),
                    topic: topic.clone(),
                    partition: *partition,
                };
                (
                    serde_json::to_vec(&key).unwrap_or_default(),
                    value
                        .as_ref()
                        .map(|v| serde_json::to_vec(v).unwrap_or_default()),
                )
            }
            GroupRecord::Group { group, value } => {
                let key = GroupRecordKey::Group {
                    v: RECORD_VERSION,
                    group: group.clone(),
                };
                (
                    serde_json::to_vec(&key).unwrap_or_default(),
                    value
                        .as_ref()
                        .map(|v| serde_json::to_vec(v).unwrap_or_default()),
                )
            }
        }
    }

    pub fn decode(key: &[u8], value: Option<&[u8]>) -> Result<GroupRecord, RecordDecodeError> {
        let err = |e: serde_json::Error| RecordDecodeError(e.to_string());
        match serde_json::from_slice::<GroupRecordKey>(key).map_err(err)? {
            GroupRecordKey::Offset {
                group,
                topic,
                partition,
                ..
            } => Ok(GroupRecord::Offset {
                group,
                topic,
                partition,
                value: value.map(serde_json::from_slice).transpose().map_err(err)?,
            }),
            GroupRecordKey::Group { group, .. } => Ok(GroupRecord::Group {
                group,
                value: value.map(serde_json::from_slice).transpose().map_err(err)?,
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let records = [
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
            },
            GroupRecord::Offset {
                group: "g".into(),
                topic: "t".into(),
                partition: 3,
                value: None,
            },
            GroupRecord::Group {
                group: "g".into(),
                value: None,
            },
        ];
        for r in records {
            let (k, v) = r.encode();
            assert_eq!(GroupRecord::decode(&k, v.as_deref()).unwrap(), r);
        }
        assert!(GroupRecord::decode(b"garbage", None).is_err());
    }
}
