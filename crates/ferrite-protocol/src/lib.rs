//! Kafka wire framing, version negotiation and request decoding, on top of the generated
//! codecs of the `kafka-protocol` crate. Sans-I/O: it turns bytes into typed requests
//! and typed responses into bytes; the broker owns the sockets.

use bytes::{Buf, BufMut, Bytes, BytesMut};
pub use kafka_protocol;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, RequestHeader, RequestKind, ResponseHeader, ResponseKind,
};
use kafka_protocol::protocol::{Decodable, Encodable};

mod splice;
pub use splice::{
    encode_fetch_response_spliced, records_placeholder, FramePart, RECORDS_PLACEHOLDER_BYTES,
};

/// Bytes of the length prefix in front of every request and response.
pub const FRAME_PREFIX_BYTES: usize = 4;
/// Kafka's `socket.request.max.bytes` default.
pub const REQUEST_BYTES_MAX_DEFAULT: usize = 100 * 1024 * 1024;

/// The APIs and versions Ferrite implements. ApiVersions advertises exactly these, so
/// clients pick versions the handlers understand. Version floors are Kafka 4.0's
/// (KIP-896 removed older versions); the ceilings are what the handlers implement.
pub const SUPPORTED_APIS: &[(ApiKey, i16, i16)] = &[
    // v12 is KIP-890 transaction v2 signalling and v13 adds topic ids (KIP-516): not yet.
    (ApiKey::Produce, 3, 11),
    // v13 fetches by topic id (KIP-516); v15 drops ReplicaId for ReplicaState (KIP-903).
    (ApiKey::Fetch, 4, 16),
    // Kafka 4.0's floor is v2 (KIP-896); v3 adds CurrentLeaderEpoch (KIP-320), v4 is
    // flexible. Followers and librdkafka (after a leader change) use it.
    (ApiKey::OffsetForLeaderEpoch, 2, 4),
    // v7 adds MAX_TIMESTAMP (-3, KIP-734); v8 EARLIEST_LOCAL (-4, KIP-405) is not offered.
    (ApiKey::ListOffsets, 1, 7),
    // v10 adds topic ids (KIP-516); v13 adds top-level error code (KIP-1102): not yet.
    (ApiKey::Metadata, 0, 12),
    // v3 is flexible (KIP-511: client software name and version).
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::DeleteRecords, 0, 2),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::AlterConfigs, 0, 2),
    (ApiKey::CreatePartitions, 0, 3),
    // Reassignment (KIP-455); AlterPartitionReassignments v1 adds
    // AllowReplicationFactorChange (KIP-860).
    (ApiKey::AlterPartitionReassignments, 0, 1),
    (ApiKey::ListPartitionReassignments, 0, 0),
    // Preferred (KIP-183) and, v1+, unclean (KIP-460) elections on request.
    (ApiKey::ElectLeaders, 0, 2),
    (ApiKey::IncrementalAlterConfigs, 0, 1),
    (ApiKey::DescribeCluster, 0, 1),
    // The metadata quorum (KIP-595); v1 adds fetch/caught-up times (KIP-836), v2 the
    // voters' endpoints (KIP-853). Forwarded to the active controller.
    (ApiKey::DescribeQuorum, 0, 2),
    // Consumer groups, classic protocol. FindCoordinator v5+ is KIP-890, v6 share groups.
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    // v9 is the KIP-848 consumer protocol's member epoch; v10 uses topic ids.
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 8),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 5),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::OffsetDelete, 0, 0),
    // Kafka 4.0 removed v0 (KIP-896); it is v1 byte for byte, and kafka-python (through
    // 2.x) sends only v0, so it stays.
    (ApiKey::DescribeLogDirs, 0, 4),
    // Idempotent and transactional producers (a transactional id goes to handlers/txn.rs).
    // v3 adds ProducerId/ProducerEpoch (KIP-360), which Kafka ignores without a
    // transactional id; v4 (PRODUCER_FENCED, KIP-588) and v5 (TRANSACTION_ABORTABLE,
    // KIP-890) only add errors of transactional producers; v6 is KIP-939's 2PC.
    (ApiKey::InitProducerId, 0, 5),
    (ApiKey::DescribeProducers, 0, 0),
    // Transactions, transaction version 1. AddPartitionsToTxn v4 is the brokers' batched
    // verify form (KIP-890 part 1), served to registered brokers only (clients send v3
    // at most); v5 (TRANSACTION_ABORTABLE), EndTxn/TxnOffsetCommit v4 (the same) and v5
    // (transaction version 2, KIP-890 part 2) are not offered.
    (ApiKey::AddPartitionsToTxn, 0, 4),
    (ApiKey::AddOffsetsToTxn, 0, 3),
    (ApiKey::EndTxn, 0, 3),
    (ApiKey::TxnOffsetCommit, 0, 3),
    // Broker to broker: the transaction coordinator's COMMIT/ABORT markers for the
    // partitions another broker leads. v1 only (flexible; Kafka 4.0 removed v0).
    (ApiKey::WriteTxnMarkers, 1, 1),
    // Admin side of transactions (KIP-664). ListTransactions v1 adds the duration filter
    // (KIP-994); v2's transactional id pattern (a Java regular expression) is not offered.
    (ApiKey::DescribeTransactions, 0, 0),
    (ApiKey::ListTransactions, 0, 1),
];

/// What an operator needs to know about a refused request: the API by name and key,
/// the version asked, and what Ferrite serves instead.
pub fn unsupported_message(api_key: ApiKey, version: i16) -> String {
    let key = api_key as i16;
    match supported_versions(api_key) {
        None => format!("{api_key:?} (api key {key}) v{version}: this API is not implemented"),
        Some((lo, _)) if version < lo => format!(
            "{api_key:?} (api key {key}) v{version}: older than the supported v{lo}; like \
             Kafka 4.0 (KIP-896), Ferrite refuses request versions older than Kafka 2.1's, \
             so the client is too old or configured for an old broker version"
        ),
        Some((_, hi)) => format!(
            "{api_key:?} (api key {key}) v{version}: newer than the supported v{hi}; the \
             client should have picked a version from ApiVersions"
        ),
    }
}

pub fn supported_versions(api_key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED_APIS
        .iter()
        .find(|(k, _, _)| *k == api_key)
        .map(|(_, lo, hi)| (*lo, *hi))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("request frame of {size} bytes exceeds socket.request.max.bytes {max}")]
    FrameTooLarge { size: i64, max: usize },
    #[error("negative request frame length {0}")]
    NegativeLength(i32),
    #[error("request frame too short for a header ({0} bytes)")]
    Truncated(usize),
    #[error("unknown api key {0}")]
    UnknownApiKey(i16),
    #[error("{}", unsupported_message(*api_key, *version))]
    UnsupportedVersion {
        api_key: ApiKey,
        version: i16,
        correlation_id: i32,
    },
    #[error("malformed {api_key:?} v{version} request: {reason}")]
    Malformed {
        api_key: ApiKey,
        version: i16,
        reason: String,
    },
    #[error("cannot encode {api_key:?} v{version} response: {reason}")]
    Encode {
        api_key: ApiKey,
        version: i16,
        reason: String,
    },
}

/// Reads the length prefix and checks it against the bound. Returns the body length.
pub fn frame_length(
    prefix: [u8; FRAME_PREFIX_BYTES],
    request_bytes_max: usize,
) -> Result<usize, ProtocolError> {
    let len = i32::from_be_bytes(prefix);
    let size = usize::try_from(len).map_err(|_| ProtocolError::NegativeLength(len))?;
    if size > request_bytes_max {
        return Err(ProtocolError::FrameTooLarge {
            size: i64::from(len),
            max: request_bytes_max,
        });
    }
    Ok(size)
}

/// A decoded request.
#[derive(Debug)]
pub struct Request {
    pub header: RequestHeader,
    pub api_key: ApiKey,
    pub body: RequestKind,
}

impl Request {
    pub fn version(&self) -> i16 {
        self.header.request_api_version
    }
}

/// Decodes one request frame body (without the length prefix).
pub fn decode_request(mut frame: Bytes) -> Result<Request, ProtocolError> {
    if frame.len() < 8 {
        return Err(ProtocolError::Truncated(frame.len()));
    }
    let mut peek = frame.clone();
    let raw_key = peek.get_i16();
    let version = peek.get_i16();
    let correlation_id = peek.get_i32();
    let api_key = ApiKey::try_from(raw_key).map_err(|_| ProtocolError::UnknownApiKey(raw_key))?;
    let supported =
        supported_versions(api_key).is_some_and(|(lo, hi)| (lo..=hi).contains(&version));
    if !supported {
        return Err(ProtocolError::UnsupportedVersion {
            api_key,
            version,
            correlation_id,
        });
    }
    let malformed = |reason: String| ProtocolError::Malformed {
        api_key,
        version,
        reason,
    };
    let header_version = api_key.request_header_version(version);
    let header =
        RequestHeader::decode(&mut frame, header_version).map_err(|e| malformed(e.to_string()))?;
    let body = RequestKind::decode(api_key, &mut frame, codec_version(api_key, version))
        .map_err(|e| malformed(e.to_string()))?;
    Ok(Request {
        header,
        api_key,
        body,
    })
}

/// The version the generated codecs are asked for. DescribeLogDirs v0 is byte for byte
/// v1 (v1 only changed when a throttled response is sent), but kafka-protocol is generated
/// from Kafka 4's schemas, which dropped v0 (KIP-896); kafka-python sends only v0.
fn codec_version(api_key: ApiKey, version: i16) -> i16 {
    match (api_key, version) {
        (ApiKey::DescribeLogDirs, 0) => 1,
        _ => version,
    }
}

/// Encodes a response frame, length prefix included.
pub fn encode_response(
    api_key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &ResponseKind,
) -> Result<BytesMut, ProtocolError> {
    let err = |reason: String| ProtocolError::Encode {
        api_key,
        version,
        reason,
    };
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0); // Length, filled in below.
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    header
        .encode(&mut buf, api_key.response_header_version(version))
        .map_err(|e| err(e.to_string()))?;
    body.encode(&mut buf, codec_version(api_key, version))
        .map_err(|e| err(e.to_string()))?;
    let len = i32::try_from(buf.len() - FRAME_PREFIX_BYTES).map_err(|e| err(e.to_string()))?;
    #[allow(clippy::indexing_slicing)] // The prefix was written first.
    buf[..FRAME_PREFIX_BYTES].copy_from_slice(&len.to_be_bytes());
    Ok(buf)
}

/// The ApiVersions body: every supported API with its version range.
pub fn api_versions_body(error_code: i16) -> ApiVersionsResponse {
    use kafka_protocol::messages::api_versions_response::ApiVersion;
    ApiVersionsResponse::default()
        .with_error_code(error_code)
        .with_api_keys(
            SUPPORTED_APIS
                .iter()
                .map(|(k, lo, hi)| {
                    ApiVersion::default()
                        .with_api_key(*k as i16)
                        .with_min_version(*lo)
                        .with_max_version(*hi)
                })
                .collect(),
        )
}

/// The answer to an ApiVersions request of a version we do not know (KIP-511): the error
/// UNSUPPORTED_VERSION and our ranges, encoded as v0 so that any client can read it.
pub fn unsupported_api_versions_response(correlation_id: i32) -> Result<BytesMut, ProtocolError> {
    const UNSUPPORTED_VERSION: i16 = 35;
    encode_response(
        ApiKey::ApiVersions,
        0,
        correlation_id,
        &ResponseKind::ApiVersions(api_versions_body(UNSUPPORTED_VERSION)),
    )
}

/// The client side of the framing, shared by Ferrite's own clients (the CLI's admin
/// requests, the replica fetcher): why a request could not be framed or its response
/// not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientFrameError {
    #[error("cannot encode {api_key:?} v{version} request: {reason}")]
    Encode {
        api_key: ApiKey,
        version: i16,
        reason: String,
    },
    #[error("response of {size} bytes is larger than {max}")]
    ResponseTooLarge { size: usize, max: usize },
    #[error("negative response frame length {0}")]
    NegativeLength(i32),
    #[error("bad {api_key:?} response header: {reason}")]
    BadHeader { api_key: ApiKey, reason: String },
    #[error("{api_key:?} answered with correlation id {got}, expected {expected}")]
    CorrelationMismatch {
        api_key: ApiKey,
        got: i32,
        expected: i32,
    },
    #[error("bad {api_key:?} v{version} response: {reason}")]
    BadResponse {
        api_key: ApiKey,
        version: i16,
        reason: String,
    },
}

/// Encodes a request frame, length prefix included.
pub fn encode_request<Req: Encodable>(
    api_key: ApiKey,
    version: i16,
    correlation_id: i32,
    client_id: &'static str,
    body: &Req,
) -> Result<BytesMut, ClientFrameError> {
    let err = |reason: String| ClientFrameError::Encode {
        api_key,
        version,
        reason,
    };
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0); // Length, filled in below.
    RequestHeader::default()
        .with_request_api_key(api_key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(kafka_protocol::protocol::StrBytes::from_static_str(
            client_id,
        )))
        .encode(&mut buf, api_key.request_header_version(version))
        .map_err(|e| err(e.to_string()))?;
    body.encode(&mut buf, version)
        .map_err(|e| err(e.to_string()))?;
    let len = i32::try_from(buf.len() - FRAME_PREFIX_BYTES).map_err(|e| err(e.to_string()))?;
    #[allow(clippy::indexing_slicing)] // The prefix was written first.
    buf[..FRAME_PREFIX_BYTES].copy_from_slice(&len.to_be_bytes());
    Ok(buf)
}

/// Reads a response's length prefix and checks it against the bound. Returns the body
/// length.
pub fn response_length(
    prefix: [u8; FRAME_PREFIX_BYTES],
    response_bytes_max: usize,
) -> Result<usize, ClientFrameError> {
    let len = i32::from_be_bytes(prefix);
    let size = usize::try_from(len).map_err(|_| ClientFrameError::NegativeLength(len))?;
    if size > response_bytes_max {
        return Err(ClientFrameError::ResponseTooLarge {
            size,
            max: response_bytes_max,
        });
    }
    Ok(size)
}

/// Decodes one response frame body (without the length prefix) to the request sent as
/// `api_key` v`version` with `correlation_id`. Returns the response and the count of
/// bytes left after it (none from a broker that speaks the version).
pub fn decode_response<Resp: Decodable>(
    mut frame: Bytes,
    api_key: ApiKey,
    version: i16,
    correlation_id: i32,
) -> Result<(Resp, usize), ClientFrameError> {
    let header = ResponseHeader::decode(&mut frame, api_key.response_header_version(version))
        .map_err(|e| ClientFrameError::BadHeader {
            api_key,
            reason: e.to_string(),
        })?;
    if header.correlation_id != correlation_id {
        return Err(ClientFrameError::CorrelationMismatch {
            api_key,
            got: header.correlation_id,
            expected: correlation_id,
        });
    }
    let resp = Resp::decode(&mut frame, version).map_err(|e| ClientFrameError::BadResponse {
        api_key,
        version,
        reason: e.to_string(),
    })?;
    Ok((resp, frame.remaining()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use kafka_protocol::messages::{ApiVersionsRequest, MetadataRequest};
    use kafka_protocol::protocol::StrBytes;
    use proptest::prelude::*;

    fn frame<T: Encodable>(key: ApiKey, version: i16, body: &T) -> Bytes {
        let mut buf = BytesMut::new();
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(42)
            .with_client_id(Some(StrBytes::from_static_str("test")));
        header
            .encode(&mut buf, key.request_header_version(version))
            .unwrap();
        body.encode(&mut buf, version).unwrap();
        buf.freeze()
    }

    #[test]
    fn decodes_every_supported_api_versions_version() {
        for v in 0..=3 {
            let r = decode_request(frame(
                ApiKey::ApiVersions,
                v,
                &ApiVersionsRequest::default(),
            ))
            .unwrap();
            assert_eq!(r.header.correlation_id, 42);
            assert!(matches!(r.body, RequestKind::ApiVersions(_)));
        }
        let r = decode_request(frame(ApiKey::Metadata, 12, &MetadataRequest::default())).unwrap();
        assert_eq!(r.version(), 12);
    }

    #[test]
    fn rejects_unknown_key_and_version() {
        let mut f = frame(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default()).to_vec();
        f[2..4].copy_from_slice(&99i16.to_be_bytes());
        assert!(matches!(
            decode_request(Bytes::from(f.clone())),
            Err(ProtocolError::UnsupportedVersion {
                correlation_id: 42,
                ..
            })
        ));
        f[0..2].copy_from_slice(&9999i16.to_be_bytes());
        assert_eq!(
            decode_request(Bytes::from(f)).unwrap_err(),
            ProtocolError::UnknownApiKey(9999)
        );
        let resp = unsupported_api_versions_response(7).unwrap();
        assert_eq!(&resp[4..8], &7i32.to_be_bytes());
        assert_eq!(&resp[8..10], &35i16.to_be_bytes());
    }

    #[test]
    fn frame_length_bounds() {
        assert_eq!(frame_length(10i32.to_be_bytes(), 100).unwrap(), 10);
        assert!(matches!(
            frame_length((-1i32).to_be_bytes(), 100),
            Err(ProtocolError::NegativeLength(-1))
        ));
        assert!(matches!(
            frame_length(i32::MAX.to_be_bytes(), 100),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn huge_array_count_is_an_error_not_an_abort() {
        // Metadata v1: header then topics array with count 2^31-1 and nothing after it.
        let mut f = frame(ApiKey::Metadata, 1, &MetadataRequest::default()).to_vec();
        let n = f.len();
        f[n - 4..].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(
            decode_request(Bytes::from(f)),
            Err(ProtocolError::Malformed { .. })
        ));
    }

    #[test]
    fn a_client_request_is_what_the_broker_decodes_and_the_answer_comes_back() {
        let body = MetadataRequest::default().with_allow_auto_topic_creation(false);
        let framed = encode_request(ApiKey::Metadata, 12, 7, "ferrite-test", &body).unwrap();
        let prefix: [u8; 4] = framed[..4].try_into().unwrap();
        assert_eq!(frame_length(prefix, 1 << 20).unwrap(), framed.len() - 4);
        let req = decode_request(Bytes::copy_from_slice(&framed[4..])).unwrap();
        assert_eq!(req.api_key, ApiKey::Metadata);
        assert_eq!(req.header.correlation_id, 7);
        assert_eq!(
            req.header.client_id.as_deref().map(|s| s.to_string()),
            Some("ferrite-test".to_string())
        );
        let answer = kafka_protocol::messages::MetadataResponse::default()
            .with_cluster_id(Some(StrBytes::from_static_str("c1")));
        let out = encode_response(
            ApiKey::Metadata,
            12,
            7,
            &ResponseKind::Metadata(answer.clone()),
        )
        .unwrap();
        let prefix: [u8; 4] = out[..4].try_into().unwrap();
        assert_eq!(response_length(prefix, 1 << 20).unwrap(), out.len() - 4);
        let body = Bytes::copy_from_slice(&out[4..]);
        let (got, trailing) = decode_response::<kafka_protocol::messages::MetadataResponse>(
            body.clone(),
            ApiKey::Metadata,
            12,
            7,
        )
        .unwrap();
        assert_eq!((got, trailing), (answer, 0));
        // An answer to another request, and a length past the bound, are refused.
        assert!(matches!(
            decode_response::<kafka_protocol::messages::MetadataResponse>(
                body,
                ApiKey::Metadata,
                12,
                8
            ),
            Err(ClientFrameError::CorrelationMismatch {
                got: 7,
                expected: 8,
                ..
            })
        ));
        assert!(matches!(
            response_length(100u32.to_be_bytes(), 99),
            Err(ClientFrameError::ResponseTooLarge { .. })
        ));
        assert_eq!(
            response_length((-1i32).to_be_bytes(), 99),
            Err(ClientFrameError::NegativeLength(-1))
        );
    }

    proptest! {
        // The request decoder never panics, whatever the bytes (the fuzz target runs the same).
        #[test]
        fn arbitrary_frames_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512), key in 0i16..80, version in 0i16..20) {
            let mut f = Vec::with_capacity(data.len() + 4);
            f.extend_from_slice(&key.to_be_bytes());
            f.extend_from_slice(&version.to_be_bytes());
            f.extend_from_slice(&data);
            let _ = decode_request(Bytes::from(f));
        }
    }
}
