//! `ferrite topic describe --producers`: the DescribeProducers API, which librdkafka does
//! not offer, as one raw request to each partition's leader (what
//! `kafka-transactions.sh describe-producers` sends).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, BytesMut};
use ferrite_protocol::kafka_protocol::messages::describe_producers_request::TopicRequest;
use ferrite_protocol::kafka_protocol::messages::{
    ApiKey, DescribeProducersRequest, DescribeProducersResponse, RequestHeader, ResponseHeader,
    TopicName,
};
use ferrite_protocol::kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response accepted (a partition with a million producers is ~40 MB).
const RESPONSE_BYTES_MAX: usize = 256 * 1024 * 1024;

/// The active producers of `partitions` of `topic`, asked of `leader` ("host:port"):
/// one JSON object per partition.
pub fn describe(leader: &str, topic: &str, partitions: Vec<i32>) -> Result<Vec<Value>> {
    const VERSION: i16 = 0;
    let req = DescribeProducersRequest::default().with_topics(vec![TopicRequest::default()
        .with_name(TopicName(StrBytes::from_string(topic.to_string())))
        .with_partition_indexes(partitions)]);
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    RequestHeader::default()
        .with_request_api_key(ApiKey::DescribeProducers as i16)
        .with_request_api_version(VERSION)
        .with_correlation_id(1)
        .with_client_id(Some(StrBytes::from_static_str("ferrite-cli")))
        .encode(
            &mut buf,
            ApiKey::DescribeProducers.request_header_version(VERSION),
        )?;
    req.encode(&mut buf, VERSION)?;
    let len = i32::try_from(buf.len() - 4)?;
    buf.get_mut(..4)
        .ok_or_else(|| anyhow!("short frame"))?
        .copy_from_slice(&len.to_be_bytes());

    let mut s = TcpStream::connect(leader).with_context(|| format!("connect {leader}"))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    s.write_all(&buf)?;
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix)?;
    let size = usize::try_from(i32::from_be_bytes(prefix))?;
    if size > RESPONSE_BYTES_MAX {
        bail!("DescribeProducers response of {size} bytes is too large");
    }
    let mut body = vec![0u8; size];
    s.read_exact(&mut body)?;
    let mut body = bytes::Bytes::from(body);
    let header = ResponseHeader::decode(
        &mut body,
        ApiKey::DescribeProducers.response_header_version(VERSION),
    )?;
    if header.correlation_id != 1 {
        bail!("response to another request");
    }
    let resp = DescribeProducersResponse::decode(&mut body, VERSION)?;
    if body.has_remaining() {
        bail!("trailing bytes after the DescribeProducers response");
    }
    let mut out = Vec::new();
    for t in resp.topics {
        for p in t.partitions {
            let producers: Vec<Value> = p
                .active_producers
                .iter()
                .map(|s| {
                    json!({
                        "producer_id": s.producer_id.0, "producer_epoch": s.producer_epoch,
                        "last_sequence": s.last_sequence, "last_timestamp": s.last_timestamp,
                    })
                })
                .collect();
            out.push(json!({
                "partition": p.partition_index, "error_code": p.error_code,
                "error_message": p.error_message.as_ref().map(|m| m.to_string()),
                "producers": producers,
            }));
        }
    }
    Ok(out)
}
