//! A minimal Kafka admin client over the wire, for the requests whose answers librdkafka's
//! Rust binding does not pass on whole: the `rdkafka` crate drops the broker's
//! `error_message` from CreateTopics, DeleteTopics and CreatePartitions results and the
//! per-resource errors of AlterConfigs. Users need the broker's sentence ("replication
//! factor 3 is larger than the 1 available brokers"), not only the code's name.
//!
//! One connection at a time, blocking, with a timeout on every step; versions are
//! negotiated with ApiVersions, and admin requests go to the controller named in Metadata.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use ferrite_protocol::kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse,
};
use ferrite_protocol::kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use ferrite_protocol::kafka_protocol::ResponseError;

/// Longest a TCP connect may take before the address is reported unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the CLI waits for one response.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response frame accepted (the broker's answers to admin requests are small).
const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// A Kafka error code from the broker, with its message: what the CLI prints, and under
/// `--json` what `{"error": {...}}` carries.
#[derive(Debug)]
pub struct BrokerError {
    /// What was being done, e.g. "cannot create topic orders".
    pub context: String,
    /// Kafka's name of the code, e.g. `INVALID_REPLICATION_FACTOR`.
    pub code: String,
    /// The broker's `error_message`, when it sent one.
    pub message: Option<String>,
}

impl std::fmt::Display for BrokerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.context, self.code)?;
        if let Some(m) = &self.message {
            write!(f, ": {m}")?;
        }
        Ok(())
    }
}

impl std::error::Error for BrokerError {}

/// Kafka's name of an error code (`TOPIC_ALREADY_EXISTS`), from the protocol crate's variant.
pub fn code_name(code: i16) -> String {
    match ResponseError::try_from_code(code) {
        None => "NONE".to_string(),
        Some(ResponseError::Unknown(c)) => format!("UNKNOWN_ERROR_CODE_{c}"),
        Some(e) => {
            let camel = format!("{e:?}");
            let mut out = String::with_capacity(camel.len() + 8);
            for (i, c) in camel.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    out.push('_');
                }
                out.push(c.to_ascii_uppercase());
            }
            out
        }
    }
}

/// `Err(BrokerError)` when `code` is an error.
pub fn check(
    context: impl FnOnce() -> String,
    code: i16,
    message: Option<&StrBytes>,
) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    Err(BrokerError {
        context: context(),
        code: code_name(code),
        message: message.map(|m| m.to_string()).filter(|m| !m.is_empty()),
    }
    .into())
}

/// Connects to the first reachable address of a comma-separated bootstrap list. Fails
/// within `CONNECT_TIMEOUT` per address, naming the address and the OS's reason
/// ("connection refused").
pub fn connect_any(bootstrap: &str) -> Result<TcpStream> {
    let mut last = None;
    for server in bootstrap
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        match connect(server) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("--bootstrap-server is empty")))
}

fn connect(server: &str) -> Result<TcpStream> {
    let addrs: Vec<_> = server
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {server}"))?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                s.set_read_timeout(Some(RESPONSE_TIMEOUT))?;
                s.set_write_timeout(Some(RESPONSE_TIMEOUT))?;
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            bail!("cannot connect to {server}: connection refused (is a broker running there?)")
        }
        Some(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            bail!("cannot connect to {server}: no answer within {CONNECT_TIMEOUT:?}")
        }
        Some(e) => bail!("cannot connect to {server}: {e}"),
        None => bail!("cannot resolve {server}: no addresses"),
    }
}

/// One connection to one broker, with the API versions it supports.
pub struct Conn {
    stream: TcpStream,
    correlation_id: i32,
    versions: Vec<(i16, i16, i16)>,
}

impl Conn {
    pub fn open(bootstrap: &str) -> Result<Conn> {
        let stream = connect_any(bootstrap)?;
        let mut conn = Conn {
            stream,
            correlation_id: 0,
            versions: Vec::new(),
        };
        // v0 is understood by every broker; its answer lists the versions of the rest.
        let r: ApiVersionsResponse =
            conn.send(ApiKey::ApiVersions, 0, &ApiVersionsRequest::default())?;
        check(|| "ApiVersions".to_string(), r.error_code, None)?;
        conn.versions = r
            .api_keys
            .iter()
            .map(|k| (k.api_key, k.min_version, k.max_version))
            .collect();
        Ok(conn)
    }

    /// A connection to the controller, where admin requests go.
    pub fn controller(bootstrap: &str) -> Result<Conn> {
        let mut conn = Conn::open(bootstrap)?;
        let md = conn.cluster_metadata()?;
        let controller = md.brokers.iter().find(|b| b.node_id == md.controller_id);
        match controller {
            Some(b) => {
                let peer = conn.stream.peer_addr().ok();
                let addr = format!("{}:{}", b.host, b.port);
                let same = addr
                    .to_socket_addrs()
                    .map(|mut a| a.any(|a| Some(a) == peer))
                    .unwrap_or(false);
                if same {
                    Ok(conn)
                } else {
                    Conn::open(&addr)
                }
            }
            // No controller known: the bootstrap broker answers or says why not.
            None => Ok(conn),
        }
    }

    /// Metadata for no topic: the brokers and the controller id.
    pub fn cluster_metadata(&mut self) -> Result<MetadataResponse> {
        let version = self.version(ApiKey::Metadata, 1, 12)?;
        self.send(
            ApiKey::Metadata,
            version,
            &MetadataRequest::default().with_topics(Some(vec![])),
        )
    }

    /// The partition count of `topic` (Metadata for that topic; its error if any).
    pub fn partition_count(&mut self, topic: &str) -> Result<i32> {
        use ferrite_protocol::kafka_protocol::messages::metadata_request::MetadataRequestTopic;
        use ferrite_protocol::kafka_protocol::messages::TopicName;
        use ferrite_protocol::kafka_protocol::protocol::StrBytes;
        let version = self.version(ApiKey::Metadata, 1, 12)?;
        let r: MetadataResponse = self.send(
            ApiKey::Metadata,
            version,
            &MetadataRequest::default()
                .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(
                    TopicName(StrBytes::from_string(topic.to_string())),
                ))]))
                .with_allow_auto_topic_creation(false),
        )?;
        let t = r
            .topics
            .first()
            .ok_or_else(|| anyhow!("no metadata for topic {topic}"))?;
        check(|| format!("topic {topic}"), t.error_code, None)?;
        Ok(t.partitions.len() as i32)
    }

    /// The highest version of `key` both sides support, within `[ours_min, ours_max]`.
    pub fn version(&self, key: ApiKey, ours_min: i16, ours_max: i16) -> Result<i16> {
        let (_, min, max) = self
            .versions
            .iter()
            .copied()
            .find(|(k, _, _)| *k == key as i16)
            .ok_or_else(|| anyhow!("the broker does not support {key:?}"))?;
        let v = max.min(ours_max);
        if v < ours_min.max(min) {
            bail!(
                "the broker supports {key:?} v{min}-v{max}; ferrite needs v{ours_min}-v{ours_max}"
            );
        }
        Ok(v)
    }

    pub fn send<Req: Encodable, Resp: Decodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        body: &Req,
    ) -> Result<Resp> {
        self.correlation_id = self.correlation_id.wrapping_add(1);
        let buf = ferrite_protocol::encode_request(
            key,
            version,
            self.correlation_id,
            "ferrite-cli",
            body,
        )?;
        let peer = self.peer();
        let what = || format!("{key:?} to {peer}");
        self.stream.write_all(&buf).with_context(what)?;
        let mut prefix = [0u8; ferrite_protocol::FRAME_PREFIX_BYTES];
        self.stream.read_exact(&mut prefix).with_context(what)?;
        let len =
            ferrite_protocol::response_length(prefix, RESPONSE_BYTES_MAX).with_context(what)?;
        let mut frame = vec![0u8; len];
        self.stream.read_exact(&mut frame).with_context(what)?;
        let (resp, trailing) = ferrite_protocol::decode_response(
            Bytes::from(frame),
            key,
            version,
            self.correlation_id,
        )
        .with_context(what)?;
        if trailing > 0 {
            tracing::debug!(bytes = trailing, "trailing bytes after a response");
        }
        Ok(resp)
    }

    fn peer(&self) -> String {
        self.stream
            .peer_addr()
            .map_or_else(|_| "the broker".to_string(), |a| a.to_string())
    }
}

/// A librdkafka admin result code as a `BrokerError`: broker codes (non-negative, the
/// same numbers as Kafka's) by Kafka's name, librdkafka's own by its name; its text as
/// the message.
pub fn rdkafka_error(context: String, code: rdkafka::types::RDKafkaErrorCode) -> BrokerError {
    let number = code as i32;
    let name = match i16::try_from(number) {
        Ok(n) if n > 0 => code_name(n),
        _ => format!("{code:?}"),
    };
    BrokerError {
        context,
        code: name,
        message: Some(code.to_string()),
    }
}
