//! Kafka's broker-to-controller APIs (BrokerRegistration, BrokerHeartbeat,
//! AlterPartition, AllocateProducerIds) on the controller listener, as KRaft's brokers send them to the
//! active controller. The server side ([`handler`]) decodes them into
//! `ferrite_controller` events that this node's active controller decides and commits
//! (`controller.rs`) before answering; the client side ([`ControllerChannel`]) sends
//! them to the active controller named by the quorum, or hands them to this node's own
//! controller without a socket when it is the active one (a bare server). Both sides
//! use the same [`answer`], so a one-node and a three-node cluster run the same code.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ferrite_controller as fc;
use ferrite_metadata::BrokerEndpoint;
use kafka_protocol::messages::alter_partition_response::{
    PartitionData as AlterPartitionPartitionResult, TopicData as AlterPartitionTopicResult,
};
use kafka_protocol::messages::{
    AllocateProducerIdsRequest, AllocateProducerIdsResponse, AlterPartitionRequest,
    AlterPartitionResponse, ApiKey, BrokerHeartbeatRequest, BrokerHeartbeatResponse, BrokerId,
    BrokerRegistrationRequest, BrokerRegistrationResponse, CreateTopicsRequest,
    CreateTopicsResponse, DescribeQuorumRequest, DescribeQuorumResponse, ProducerId, RequestHeader,
    ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::ResponseError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::controller::Controller;
use crate::Broker;

/// Versions this node sends (and the lowest and highest it serves).
pub const BROKER_REGISTRATION_VERSION: i16 = 2;
pub const BROKER_HEARTBEAT_VERSION: i16 = 1;
pub const ALTER_PARTITION_VERSION: i16 = 3;
/// DescribeQuorum is forwarded to the active controller at its highest version and
/// answered to the client at the client's.
pub const DESCRIBE_QUORUM_VERSION: i16 = 2;
/// CreateTopics a broker forwards for an internal topic it creates on first use.
pub const CREATE_TOPICS_VERSION: i16 = 7;
const SERVED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::BrokerRegistration, 0, 4),
    (ApiKey::BrokerHeartbeat, 0, 1),
    (ApiKey::AlterPartition, 2, 3),
    (ApiKey::AllocateProducerIds, 0, 0),
    (ApiKey::DescribeQuorum, 0, 2),
    (ApiKey::CreateTopics, 2, 7),
];
/// Largest response frame the client accepts from a controller.
pub const CONTROLLER_RESPONSE_BYTES_MAX: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone)]
pub enum ControllerRequest {
    Register(BrokerRegistrationRequest),
    Heartbeat(BrokerHeartbeatRequest),
    AlterPartition(AlterPartitionRequest),
    AllocateProducerIds(AllocateProducerIdsRequest),
    DescribeQuorum(DescribeQuorumRequest),
}

#[derive(Debug, Clone)]
pub enum ControllerResponse {
    Register(BrokerRegistrationResponse),
    Heartbeat(BrokerHeartbeatResponse),
    AlterPartition(AlterPartitionResponse),
    AllocateProducerIds(AllocateProducerIdsResponse),
    DescribeQuorum(DescribeQuorumResponse),
}

impl ControllerRequest {
    fn api_key(&self) -> ApiKey {
        match self {
            ControllerRequest::Register(_) => ApiKey::BrokerRegistration,
            ControllerRequest::Heartbeat(_) => ApiKey::BrokerHeartbeat,
            ControllerRequest::AlterPartition(_) => ApiKey::AlterPartition,
            ControllerRequest::AllocateProducerIds(_) => ApiKey::AllocateProducerIds,
            ControllerRequest::DescribeQuorum(_) => ApiKey::DescribeQuorum,
        }
    }

    fn version(&self) -> i16 {
        match self {
            ControllerRequest::Register(_) => BROKER_REGISTRATION_VERSION,
            ControllerRequest::Heartbeat(_) => BROKER_HEARTBEAT_VERSION,
            ControllerRequest::AlterPartition(_) => ALTER_PARTITION_VERSION,
            ControllerRequest::AllocateProducerIds(_) => 0,
            ControllerRequest::DescribeQuorum(_) => DESCRIBE_QUORUM_VERSION,
        }
    }

    fn encode(&self, buf: &mut BytesMut, version: i16) -> Result<(), String> {
        match self {
            ControllerRequest::Register(r) => r.encode(buf, version),
            ControllerRequest::Heartbeat(r) => r.encode(buf, version),
            ControllerRequest::AlterPartition(r) => r.encode(buf, version),
            ControllerRequest::AllocateProducerIds(r) => r.encode(buf, version),
            ControllerRequest::DescribeQuorum(r) => r.encode(buf, version),
        }
        .map_err(|e| e.to_string())
    }
}

/// Decides one request on this node's controller (the active one; otherwise every
/// answer is NOT_CONTROLLER) and answers after the change is committed.
pub async fn answer(controller: &Controller, req: ControllerRequest) -> ControllerResponse {
    match req {
        ControllerRequest::DescribeQuorum(r) => ControllerResponse::DescribeQuorum(
            crate::handlers::quorum::describe_local(controller, &r),
        ),
        ControllerRequest::AllocateProducerIds(r) => {
            let resp = AllocateProducerIdsResponse::default()
                .with_producer_id_start(ProducerId(-1))
                .with_producer_id_len(0);
            ControllerResponse::AllocateProducerIds(
                match crate::producer_ids::allocate_block(controller, r.broker_id.0, r.broker_epoch)
                    .await
                {
                    Ok(start) => resp
                        .with_producer_id_start(ProducerId(start))
                        .with_producer_id_len(
                            i32::try_from(crate::producer_ids::PRODUCER_ID_BLOCK_SIZE)
                                .unwrap_or(i32::MAX),
                        ),
                    Err(crate::producer_ids::ProducerIdError::Metadata(e)) => {
                        resp.with_error_code(crate::error::quorum_error_code(&e))
                    }
                    Err(_) => resp.with_error_code(ResponseError::UnknownServerError.code()),
                },
            )
        }
        ControllerRequest::Register(r) => {
            let event = fc::Event::RegisterBroker(fc::BrokerRegistration {
                broker_id: r.broker_id.0,
                cluster_id: r.cluster_id.to_string(),
                incarnation_id: r.incarnation_id,
                listeners: r
                    .listeners
                    .iter()
                    .map(|l| BrokerEndpoint {
                        name: l.name.to_string(),
                        host: l.host.to_string(),
                        port: l.port,
                        security_protocol: l.security_protocol,
                    })
                    .collect(),
                rack: r.rack.as_ref().map(|r| r.to_string()),
            });
            let resp = BrokerRegistrationResponse::default().with_broker_epoch(-1);
            ControllerResponse::Register(match controller.handle(event).await {
                Ok(fc::Reply::RegisterBroker(Ok(reply))) => {
                    tracing::info!(
                        broker_id = r.broker_id.0,
                        broker_epoch = reply.broker_epoch,
                        incarnation_id = %r.incarnation_id,
                        "broker registered"
                    );
                    resp.with_broker_epoch(reply.broker_epoch)
                }
                Ok(fc::Reply::RegisterBroker(Err(e))) => {
                    tracing::info!(broker_id = r.broker_id.0, error = %e, "broker registration refused");
                    resp.with_error_code(e.code())
                }
                Ok(_) => resp.with_error_code(ResponseError::UnknownServerError.code()),
                Err(e) => resp.with_error_code(crate::error::quorum_error_code(&e)),
            })
        }
        ControllerRequest::Heartbeat(h) => {
            let event = fc::Event::Heartbeat(fc::BrokerHeartbeat {
                broker_id: h.broker_id.0,
                broker_epoch: h.broker_epoch,
                current_metadata_offset: h.current_metadata_offset,
                want_fence: h.want_fence,
                want_shut_down: h.want_shut_down,
            });
            let resp = BrokerHeartbeatResponse::default().with_is_fenced(true);
            ControllerResponse::Heartbeat(match controller.handle(event).await {
                Ok(fc::Reply::Heartbeat(Ok(reply))) => resp
                    .with_is_caught_up(reply.is_caught_up)
                    .with_is_fenced(reply.is_fenced)
                    .with_should_shut_down(reply.should_shut_down),
                Ok(fc::Reply::Heartbeat(Err(e))) => resp.with_error_code(e.code()),
                Ok(_) => resp.with_error_code(ResponseError::UnknownServerError.code()),
                Err(e) => resp.with_error_code(crate::error::quorum_error_code(&e)),
            })
        }
        ControllerRequest::AlterPartition(a) => {
            let event = fc::Event::AlterPartition(fc::AlterPartition {
                broker_id: a.broker_id.0,
                broker_epoch: a.broker_epoch,
                topics: a
                    .topics
                    .iter()
                    .map(|t| fc::AlterPartitionTopic {
                        topic_id: t.topic_id,
                        partitions: t
                            .partitions
                            .iter()
                            .map(|p| fc::AlterPartitionData {
                                partition: p.partition_index,
                                leader_epoch: p.leader_epoch,
                                // v3+ carries broker epochs (KIP-903); older versions
                                // the ids alone (no epoch check).
                                new_isr: if p.new_isr_with_epochs.is_empty() {
                                    p.new_isr
                                        .iter()
                                        .map(|b| fc::IsrMember {
                                            broker_id: b.0,
                                            broker_epoch: -1,
                                        })
                                        .collect()
                                } else {
                                    p.new_isr_with_epochs
                                        .iter()
                                        .map(|b| fc::IsrMember {
                                            broker_id: b.broker_id.0,
                                            broker_epoch: b.broker_epoch,
                                        })
                                        .collect()
                                },
                                partition_epoch: p.partition_epoch,
                            })
                            .collect(),
                    })
                    .collect(),
            });
            let resp = AlterPartitionResponse::default();
            ControllerResponse::AlterPartition(match controller.handle(event).await {
                Ok(fc::Reply::AlterPartition(Ok(results))) => {
                    let mut topics: Vec<AlterPartitionTopicResult> = Vec::new();
                    for r in results {
                        let mut p = AlterPartitionPartitionResult::default()
                            .with_partition_index(r.partition)
                            .with_leader_id(BrokerId(-1));
                        match r.result {
                            Ok(s) => {
                                p = p
                                    .with_leader_id(BrokerId(s.leader))
                                    .with_leader_epoch(s.leader_epoch)
                                    .with_isr(s.isr.into_iter().map(BrokerId).collect())
                                    .with_partition_epoch(s.partition_epoch)
                            }
                            Err(e) => p = p.with_error_code(e.code()),
                        }
                        match topics.iter_mut().find(|t| t.topic_id == r.topic_id) {
                            Some(t) => t.partitions.push(p),
                            None => topics.push(
                                AlterPartitionTopicResult::default()
                                    .with_topic_id(r.topic_id)
                                    .with_partitions(vec![p]),
                            ),
                        }
                    }
                    resp.with_topics(topics)
                }
                Ok(fc::Reply::AlterPartition(Err(e))) => resp.with_error_code(e.code()),
                Ok(_) => resp.with_error_code(ResponseError::UnknownServerError.code()),
                Err(e) => resp.with_error_code(crate::error::quorum_error_code(&e)),
            })
        }
    }
}

/// The controller listener's handler for Kafka frames (see `ferrite_raft::KafkaHandler`).
pub fn handler(broker: Weak<Broker>) -> ferrite_raft::KafkaHandler {
    Arc::new(move |frame: Vec<u8>| -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Option<Vec<u8>>> + Send>,
    > {
        let broker = broker.clone();
        Box::pin(async move {
            let broker = broker.upgrade()?;
            serve_frame(&broker, Bytes::from(frame)).await
        })
    })
}

async fn serve_frame(broker: &Arc<Broker>, mut frame: Bytes) -> Option<Vec<u8>> {
    let controller = &broker.controller;
    if frame.len() < 8 {
        return None;
    }
    let mut peek = frame.clone();
    let raw_key = peek.get_i16();
    let version = peek.get_i16();
    let api_key = ApiKey::try_from(raw_key).ok()?;
    let served = SERVED
        .iter()
        .any(|(k, lo, hi)| *k == api_key && (*lo..=*hi).contains(&version));
    if !served {
        tracing::debug!(
            ?api_key,
            version,
            "request not served on the controller listener"
        );
        return None;
    }
    let header = RequestHeader::decode(&mut frame, api_key.request_header_version(version)).ok()?;
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    ResponseHeader::default()
        .with_correlation_id(header.correlation_id)
        .encode(&mut buf, api_key.response_header_version(version))
        .ok()?;
    if api_key == ApiKey::CreateTopics {
        // Answered by this node's CreateTopics handler: NOT_CONTROLLER per topic unless
        // it is the active controller.
        let req = CreateTopicsRequest::decode(&mut frame, version).ok()?;
        crate::handlers::admin::create_topics(broker, req, version)
            .await
            .encode(&mut buf, version)
            .ok()?;
        return finish_frame(buf);
    }
    let req = match api_key {
        ApiKey::BrokerRegistration => ControllerRequest::Register(
            BrokerRegistrationRequest::decode(&mut frame, version).ok()?,
        ),
        ApiKey::BrokerHeartbeat => {
            ControllerRequest::Heartbeat(BrokerHeartbeatRequest::decode(&mut frame, version).ok()?)
        }
        ApiKey::AlterPartition => ControllerRequest::AlterPartition(
            AlterPartitionRequest::decode(&mut frame, version).ok()?,
        ),
        ApiKey::AllocateProducerIds => ControllerRequest::AllocateProducerIds(
            AllocateProducerIdsRequest::decode(&mut frame, version).ok()?,
        ),
        ApiKey::DescribeQuorum => ControllerRequest::DescribeQuorum(
            DescribeQuorumRequest::decode(&mut frame, version).ok()?,
        ),
        _ => return None,
    };
    let resp = answer(controller, req).await;
    match &resp {
        ControllerResponse::Register(r) => r.encode(&mut buf, version),
        ControllerResponse::Heartbeat(r) => r.encode(&mut buf, version),
        ControllerResponse::AlterPartition(r) => r.encode(&mut buf, version),
        ControllerResponse::AllocateProducerIds(r) => r.encode(&mut buf, version),
        ControllerResponse::DescribeQuorum(r) => r.encode(&mut buf, version),
    }
    .ok()?;
    finish_frame(buf)
}

/// Writes the length prefix of a response frame built after a 4-byte placeholder.
fn finish_frame(mut buf: BytesMut) -> Option<Vec<u8>> {
    let len = i32::try_from(buf.len().checked_sub(4)?).ok()?;
    buf.get_mut(..4)?.copy_from_slice(&len.to_be_bytes());
    Some(buf.to_vec())
}

/// A broker's channel to the active controller: one connection to the controller
/// listener of the quorum's leader, re-made when the leader changes or a call fails.
pub struct ControllerChannel {
    /// This broker's own address: outgoing sockets are bound to it, so that firewall
    /// rules keyed on 127.0.0.x source addresses see which broker talks.
    bind_ip: Option<std::net::IpAddr>,
    conn: Option<(u64, TcpStream)>,
    correlation_id: i32,
    timeout: Duration,
}

impl ControllerChannel {
    pub fn new(bind_ip: std::net::IpAddr, timeout: Duration) -> ControllerChannel {
        ControllerChannel {
            bind_ip: Some(bind_ip).filter(|ip| !ip.is_unspecified()),
            conn: None,
            correlation_id: 0,
            timeout,
        }
    }

    /// Sends `req` to the active controller (this node's own, in-process, when it is
    /// the active one). Errors mean no answer (no controller known, unreachable,
    /// timed out); the caller retries.
    pub async fn call(
        &mut self,
        controller: &Controller,
        req: ControllerRequest,
    ) -> Result<ControllerResponse, String> {
        let quorum = controller.quorum();
        let status = quorum.status();
        if status.is_active_controller {
            self.conn = None;
            return tokio::time::timeout(self.timeout, answer(controller, req))
                .await
                .map_err(|_| "the local controller did not answer in time".to_string());
        }
        let Some(leader) = status.leader_id else {
            return Err("no active controller known".into());
        };
        let addr = quorum
            .voters()
            .get(&leader)
            .cloned()
            .ok_or_else(|| format!("controller {leader} is not a configured voter"))?;
        let result = tokio::time::timeout(self.timeout, self.exchange(leader, &addr, &req))
            .await
            .unwrap_or_else(|_| Err(format!("controller {leader} did not answer in time")));
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    async fn exchange(
        &mut self,
        leader: u64,
        addr: &str,
        req: &ControllerRequest,
    ) -> Result<ControllerResponse, String> {
        let version = req.version();
        let mut frame = self
            .exchange_frame(leader, addr, req.api_key(), version, |buf| {
                req.encode(buf, version)
            })
            .await?;
        let resp = match req {
            ControllerRequest::Register(_) => ControllerResponse::Register(
                BrokerRegistrationResponse::decode(&mut frame, version)
                    .map_err(|e| e.to_string())?,
            ),
            ControllerRequest::Heartbeat(_) => ControllerResponse::Heartbeat(
                BrokerHeartbeatResponse::decode(&mut frame, version).map_err(|e| e.to_string())?,
            ),
            ControllerRequest::AlterPartition(_) => ControllerResponse::AlterPartition(
                AlterPartitionResponse::decode(&mut frame, version).map_err(|e| e.to_string())?,
            ),
            ControllerRequest::AllocateProducerIds(_) => ControllerResponse::AllocateProducerIds(
                AllocateProducerIdsResponse::decode(&mut frame, version)
                    .map_err(|e| e.to_string())?,
            ),
            ControllerRequest::DescribeQuorum(_) => ControllerResponse::DescribeQuorum(
                DescribeQuorumResponse::decode(&mut frame, version).map_err(|e| e.to_string())?,
            ),
        };
        Ok(resp)
    }

    /// Creates topics through the active controller, as Kafka's brokers send
    /// CreateTopics to it for the internal topics they create on first use
    /// (`AutoTopicCreationManager`): in-process when this node is the active controller,
    /// else over the controller listener. The broker's own CreateTopics handler answers
    /// on both sides, so the topic configs are checked as an admin client's would be.
    /// Errors mean no answer; per-topic refusals (NOT_CONTROLLER while leadership moves)
    /// are in the response, and the caller retries.
    pub async fn create_topics(
        &mut self,
        broker: &Arc<Broker>,
        req: CreateTopicsRequest,
    ) -> Result<CreateTopicsResponse, String> {
        let quorum = broker.controller.quorum();
        let status = quorum.status();
        if status.is_active_controller {
            self.conn = None;
            return tokio::time::timeout(
                self.timeout,
                crate::handlers::admin::create_topics(broker, req, CREATE_TOPICS_VERSION),
            )
            .await
            .map_err(|_| "the local controller did not answer in time".to_string());
        }
        let Some(leader) = status.leader_id else {
            return Err("no active controller known".into());
        };
        let addr = quorum
            .voters()
            .get(&leader)
            .cloned()
            .ok_or_else(|| format!("controller {leader} is not a configured voter"))?;
        let timeout = self.timeout;
        let exchange = async {
            let mut frame = self
                .exchange_frame(
                    leader,
                    &addr,
                    ApiKey::CreateTopics,
                    CREATE_TOPICS_VERSION,
                    |buf| {
                        req.encode(buf, CREATE_TOPICS_VERSION)
                            .map_err(|e| e.to_string())
                    },
                )
                .await?;
            CreateTopicsResponse::decode(&mut frame, CREATE_TOPICS_VERSION)
                .map_err(|e| e.to_string())
        };
        let result = tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("controller {leader} did not answer in time")));
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    /// One request frame out, one response frame back on the connection to `leader`
    /// (made when missing); returns the response body after its checked header.
    async fn exchange_frame(
        &mut self,
        leader: u64,
        addr: &str,
        key: ApiKey,
        version: i16,
        encode: impl FnOnce(&mut BytesMut) -> Result<(), String>,
    ) -> Result<Bytes, String> {
        if self.conn.as_ref().is_none_or(|(id, _)| *id != leader) {
            self.conn = Some((leader, self.connect(addr).await?));
        }
        let Some((_, stream)) = self.conn.as_mut() else {
            return Err("no connection".into());
        };
        self.correlation_id = self.correlation_id.wrapping_add(1);
        let correlation_id = self.correlation_id;
        let mut buf = BytesMut::new();
        buf.put_i32(0);
        RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("ferrite-broker")))
            .encode(&mut buf, key.request_header_version(version))
            .map_err(|e| e.to_string())?;
        encode(&mut buf)?;
        let len = i32::try_from(buf.len() - 4).map_err(|e| e.to_string())?;
        if let Some(prefix) = buf.get_mut(..4) {
            prefix.copy_from_slice(&len.to_be_bytes());
        }
        stream.write_all(&buf).await.map_err(|e| e.to_string())?;
        let len = stream.read_u32().await.map_err(|e| e.to_string())? as usize;
        if len > CONTROLLER_RESPONSE_BYTES_MAX {
            return Err(format!("response of {len} bytes from the controller"));
        }
        let mut frame = vec![0u8; len];
        stream
            .read_exact(&mut frame)
            .await
            .map_err(|e| e.to_string())?;
        let mut frame = Bytes::from(frame);
        let header = ResponseHeader::decode(&mut frame, key.response_header_version(version))
            .map_err(|e| e.to_string())?;
        if header.correlation_id != correlation_id {
            return Err(format!(
                "correlation id {} where {correlation_id} was expected",
                header.correlation_id
            ));
        }
        Ok(frame)
    }

    async fn connect(&self, addr: &str) -> Result<TcpStream, String> {
        let target: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| format!("cannot resolve {addr}: {e}"))?
            .find(|a| self.bind_ip.is_none_or(|ip| ip.is_ipv4() == a.is_ipv4()))
            .ok_or_else(|| format!("cannot resolve {addr}"))?;
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| e.to_string())?;
        if let Some(ip) = self.bind_ip {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| format!("cannot bind {ip}: {e}"))?;
        }
        let stream = socket
            .connect(target)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(stream)
    }
}
