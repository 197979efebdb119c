//! The private RPC between controller voters, on the controller listener.
//!
//! Framing is Ferrite's (Kafka's): a 4-byte big-endian length, then the body. A request
//! body starts like a Kafka request header, `api_key i16 = QUORUM_RPC_API_KEY`,
//! `api_version i16 = 0`, `correlation_id i32`, then one JSON [`QuorumRequest`]; a
//! response body is `correlation_id i32` and one JSON [`QuorumResponse`]. The API key is
//! outside Kafka's range and never advertised in ApiVersions, so a Kafka dispatcher on
//! the same listener can route these frames here by key. Requests on one connection are
//! answered in order, one at a time.
//!
//! Messages: openraft's AppendEntries, Vote and InstallSnapshot (chunks of at most
//! `SNAPSHOT_CHUNK_BYTES`), `Write`, a metadata change forwarded by a node that is not
//! the leader, and `AddObserver`, a broker-only node asking to follow the log. Every call has a timeout; a failed connection is dropped and
//! re-established on the next call. Outgoing connections are bound to the node's own
//! controller address, so firewall rules on loopback addresses (127.0.0.x) can cut
//! voters apart.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode, RPCTypes};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::frame::LOG_FRAME_BODY_BYTES_MAX;
use crate::node::Shared;
use crate::{MetadataBatch, NodeId, TypeConfig};

/// The private API key of the quorum RPC: outside Kafka's key range, never advertised.
pub const QUORUM_RPC_API_KEY: i16 = 32_000;
pub const QUORUM_RPC_VERSION: i16 = 0;
/// Request header: api_key, api_version, correlation_id.
const REQUEST_HEADER_BYTES: usize = 8;
const RESPONSE_HEADER_BYTES: usize = 4;
/// Largest frame either side accepts: one largest log entry plus the envelope. An
/// AppendEntries that would encode larger is split (openraft's PayloadTooLarge).
pub const QUORUM_RPC_FRAME_BYTES_MAX: usize = LOG_FRAME_BODY_BYTES_MAX + 1024 * 1024;
/// Snapshot chunk size (openraft's `snapshot_max_chunk_size`). JSON writes bytes as
/// numbers, up to 4 characters each, so a chunk frame stays far below the frame limit.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 1024 * 1024;
/// Incoming connections served at once on the controller listener.
pub const QUORUM_RPC_CONNECTIONS_MAX: usize = 32;
/// Time a peer has to send the rest of a frame once its length arrived, and to take a
/// response.
pub const QUORUM_RPC_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A request between voters.
/// Externally tagged (`{"vote":{...}}`), so membership maps with integer keys decode.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuorumRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A metadata change forwarded to the leader.
    Write(MetadataBatch),
    /// A broker-only node asks the leader to replicate the metadata log to it, as an
    /// openraft learner at `addr` (its quorum RPC listener): KRaft's observer.
    AddObserver {
        node_id: NodeId,
        addr: String,
    },
}

/// The answer to a [`QuorumRequest`], the variant matching the request's.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuorumResponse {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Write(Result<u64, WriteRefusal>),
    AddObserver(Result<(), WriteRefusal>),
}

/// Why a forwarded write was not committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum WriteRefusal {
    /// The receiver is not the active controller; its idea of who is.
    NotController { leader: Option<NodeId> },
    /// Not committed within the leader's write timeout (it may still commit).
    Timeout,
    /// The quorum on the receiver has stopped.
    Stopped,
    /// An observer that cannot be added: its id is a voter's, or the leader has
    /// `QUORUM_OBSERVERS_MAX` already.
    Refused { why: String },
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("request of {0} bytes is above QUORUM_RPC_FRAME_BYTES_MAX")]
    TooLarge(usize),
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// One peer's connection, (re)established on demand.
pub struct PeerClient {
    self_id: NodeId,
    target: NodeId,
    addr: String,
    bind_ip: Option<IpAddr>,
    stream: Option<TcpStream>,
    correlation_id: i32,
    request_timeout: Duration,
    reconnect_backoff: Duration,
}

impl PeerClient {
    pub fn new(
        self_id: NodeId,
        target: NodeId,
        addr: String,
        bind_ip: Option<IpAddr>,
        request_timeout: Duration,
        reconnect_backoff: Duration,
    ) -> PeerClient {
        PeerClient {
            self_id,
            target,
            addr,
            bind_ip,
            stream: None,
            correlation_id: 0,
            request_timeout,
            reconnect_backoff,
        }
    }

    /// Sends one request and waits for its answer, within `timeout`. Any failure drops
    /// the connection, so the next call starts on a fresh one.
    pub async fn call(
        &mut self,
        request: &QuorumRequest,
        timeout: Duration,
    ) -> Result<QuorumResponse, CallError> {
        let body = serde_json::to_vec(request).map_err(|e| CallError::Protocol(e.to_string()))?;
        let frame_len = REQUEST_HEADER_BYTES + body.len();
        if frame_len > QUORUM_RPC_FRAME_BYTES_MAX {
            return Err(CallError::TooLarge(frame_len));
        }
        let result = tokio::time::timeout(timeout, self.exchange(body))
            .await
            .unwrap_or(Err(CallError::Timeout(timeout)));
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn exchange(&mut self, body: Vec<u8>) -> Result<QuorumResponse, CallError> {
        if self.stream.is_none() {
            self.stream = Some(self.connect().await?);
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err(CallError::Protocol("no connection".into()));
        };
        self.correlation_id = self.correlation_id.wrapping_add(1);
        let correlation_id = self.correlation_id;
        let mut frame = Vec::with_capacity(4 + REQUEST_HEADER_BYTES + body.len());
        frame.extend_from_slice(&((REQUEST_HEADER_BYTES + body.len()) as u32).to_be_bytes());
        frame.extend_from_slice(&QUORUM_RPC_API_KEY.to_be_bytes());
        frame.extend_from_slice(&QUORUM_RPC_VERSION.to_be_bytes());
        frame.extend_from_slice(&correlation_id.to_be_bytes());
        frame.extend_from_slice(&body);
        stream.write_all(&frame).await?;
        let response = read_frame(stream).await?;
        let (header, json) = split_header::<RESPONSE_HEADER_BYTES>(&response)
            .ok_or_else(|| CallError::Protocol("short response".into()))?;
        let got = i32::from_be_bytes(header);
        if got != correlation_id {
            return Err(CallError::Protocol(format!(
                "correlation id {got} where {correlation_id} was expected"
            )));
        }
        serde_json::from_slice(json)
            .map_err(|e| CallError::Protocol(format!("undecodable response: {e}")))
    }

    async fn connect(&self) -> Result<TcpStream, CallError> {
        let err = |source| CallError::Connect {
            addr: self.addr.clone(),
            source,
        };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&self.addr)
            .await
            .map_err(err)?
            .collect();
        // Prefer the family of our own address, since the socket is bound to it.
        let target = addrs
            .iter()
            .find(|a| self.bind_ip.is_none_or(|ip| ip.is_ipv4() == a.is_ipv4()))
            .or(addrs.first())
            .copied()
            .ok_or_else(|| err(std::io::Error::other("no address")))?;
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(err)?;
        if let Some(ip) = self.bind_ip.filter(|ip| ip.is_ipv4() == target.is_ipv4()) {
            // Our own address as the source, any port: firewall rules keyed on source
            // addresses then see which voter is talking.
            socket.bind(SocketAddr::new(ip, 0)).map_err(err)?;
        }
        let stream = socket.connect(target).await.map_err(err)?;
        stream.set_nodelay(true).map_err(err)?;
        Ok(stream)
    }

    fn rpc_timeout(&self, option: &RPCOption) -> Duration {
        option.hard_ttl().min(self.request_timeout)
    }

    fn rpc_error<E: std::error::Error>(
        &self,
        action: RPCTypes,
        e: CallError,
    ) -> RPCError<NodeId, BasicNode, E> {
        match e {
            CallError::Timeout(timeout) => RPCError::Timeout(Timeout {
                action,
                id: self.self_id,
                target: self.target,
                timeout,
            }),
            CallError::Connect { .. } => RPCError::Unreachable(Unreachable::new(&e)),
            other => RPCError::Network(NetworkError::new(&other)),
        }
    }

    fn unexpected<E: std::error::Error>(&self) -> RPCError<NodeId, BasicNode, E> {
        let e = AnyError::error(format!("node {} answered another RPC", self.target));
        RPCError::Network(NetworkError::new(&e))
    }
}

fn split_header<const N: usize>(frame: &[u8]) -> Option<([u8; N], &[u8])> {
    let (header, rest) = frame.split_at_checked(N)?;
    Some((header.try_into().ok()?, rest))
}

/// Reads one length-prefixed frame, refusing lengths above the limit before allocating.
async fn read_frame(stream: &mut TcpStream) -> Result<Vec<u8>, CallError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    read_frame_body(stream, u32::from_be_bytes(len) as usize).await
}

async fn read_frame_body(stream: &mut TcpStream, len: usize) -> Result<Vec<u8>, CallError> {
    if len > QUORUM_RPC_FRAME_BYTES_MAX {
        return Err(CallError::Protocol(format!(
            "frame of {len} bytes above QUORUM_RPC_FRAME_BYTES_MAX ({QUORUM_RPC_FRAME_BYTES_MAX})"
        )));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let entries = rpc.entries.len() as u64;
        let timeout = self.rpc_timeout(&option);
        match self.call(&QuorumRequest::AppendEntries(rpc), timeout).await {
            Ok(QuorumResponse::AppendEntries(r)) => {
                r.map_err(|e| RemoteError::new(self.target, e).into())
            }
            Ok(_) => Err(self.unexpected()),
            // openraft splits the request and retries at once.
            Err(CallError::TooLarge(_)) if entries > 1 => {
                Err(PayloadTooLarge::new_entries_hint(entries / 2).into())
            }
            Err(e) => Err(self.rpc_error(RPCTypes::AppendEntries, e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let timeout = self.rpc_timeout(&option);
        match self
            .call(&QuorumRequest::InstallSnapshot(rpc), timeout)
            .await
        {
            Ok(QuorumResponse::InstallSnapshot(r)) => {
                r.map_err(|e| RemoteError::new(self.target, e).into())
            }
            Ok(_) => Err(self.unexpected()),
            Err(e) => Err(self.rpc_error(RPCTypes::InstallSnapshot, e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let timeout = self.rpc_timeout(&option);
        match self.call(&QuorumRequest::Vote(rpc), timeout).await {
            Ok(QuorumResponse::Vote(r)) => r.map_err(|e| RemoteError::new(self.target, e).into()),
            Ok(_) => Err(self.unexpected()),
            Err(e) => Err(self.rpc_error(RPCTypes::Vote, e)),
        }
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(self.reconnect_backoff))
    }
}

/// Builds openraft's per-peer clients. Addresses come from the configured voters, not
/// from the membership stored in the log, so a voter's address can change with the
/// configuration.
pub struct NetworkFactory {
    pub self_id: NodeId,
    pub voters: Arc<BTreeMap<NodeId, String>>,
    pub bind_ip: Option<IpAddr>,
    pub request_timeout: Duration,
    pub reconnect_backoff: Duration,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        let addr = self
            .voters
            .get(&target)
            .cloned()
            .unwrap_or_else(|| node.addr.clone());
        PeerClient::new(
            self.self_id,
            target,
            addr,
            self.bind_ip,
            self.request_timeout,
            self.reconnect_backoff,
        )
    }
}

/// Accepts connections on the controller listener and serves the quorum RPC until the
/// task is aborted (which drops every connection task with it).
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let permits = Arc::new(Semaphore::new(QUORUM_RPC_CONNECTIONS_MAX));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            // Reap finished connection tasks so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "controller listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = QUORUM_RPC_CONNECTIONS_MAX, "controller connection refused: QUORUM_RPC_CONNECTIONS_MAX reached");
            continue;
        };
        let shared = shared.clone();
        connections.spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_connection(stream, &shared).await {
                tracing::debug!(%peer, error = %e, "controller connection closed");
            }
        });
    }
}

async fn serve_connection(mut stream: TcpStream, shared: &Shared) -> Result<(), CallError> {
    stream.set_nodelay(true)?;
    loop {
        // Idle connections wait without a deadline (peers keep them for the next call);
        // once a length arrived, the rest of the frame must follow promptly.
        let mut len = [0u8; 4];
        match stream.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let frame = tokio::time::timeout(
            QUORUM_RPC_IO_TIMEOUT,
            read_frame_body(&mut stream, u32::from_be_bytes(len) as usize),
        )
        .await
        .map_err(|_| CallError::Timeout(QUORUM_RPC_IO_TIMEOUT))??;
        let (header, json) = split_header::<REQUEST_HEADER_BYTES>(&frame)
            .ok_or_else(|| CallError::Protocol("short request".into()))?;
        let [k0, k1, v0, v1, c0, c1, c2, c3] = header;
        let api_key = i16::from_be_bytes([k0, k1]);
        let api_version = i16::from_be_bytes([v0, v1]);
        if api_key != QUORUM_RPC_API_KEY {
            // A Kafka request (a broker's registration, heartbeat or AlterPartition).
            let handler = shared
                .kafka_handler
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let Some(handler) = handler else {
                return Err(CallError::Protocol(format!(
                    "api key {api_key}: this node does not serve Kafka requests on its controller listener yet"
                )));
            };
            let Some(out) = handler(frame).await else {
                return Err(CallError::Protocol(format!(
                    "api key {api_key} version {api_version} refused"
                )));
            };
            tokio::time::timeout(QUORUM_RPC_IO_TIMEOUT, stream.write_all(&out))
                .await
                .map_err(|_| CallError::Timeout(QUORUM_RPC_IO_TIMEOUT))??;
            continue;
        }
        if api_version != QUORUM_RPC_VERSION {
            return Err(CallError::Protocol(format!(
                "api key {api_key} version {api_version} is not the quorum RPC"
            )));
        }
        let request: QuorumRequest = serde_json::from_slice(json)
            .map_err(|e| CallError::Protocol(format!("undecodable request: {e}")))?;
        let response = dispatch(shared, request).await;
        let body = serde_json::to_vec(&response).map_err(|e| CallError::Protocol(e.to_string()))?;
        let mut out = Vec::with_capacity(4 + RESPONSE_HEADER_BYTES + body.len());
        out.extend_from_slice(&((RESPONSE_HEADER_BYTES + body.len()) as u32).to_be_bytes());
        out.extend_from_slice(&[c0, c1, c2, c3]);
        out.extend_from_slice(&body);
        tokio::time::timeout(QUORUM_RPC_IO_TIMEOUT, stream.write_all(&out))
            .await
            .map_err(|_| CallError::Timeout(QUORUM_RPC_IO_TIMEOUT))??;
    }
}

async fn dispatch(shared: &Shared, request: QuorumRequest) -> QuorumResponse {
    match request {
        QuorumRequest::AppendEntries(r) => {
            QuorumResponse::AppendEntries(shared.raft.append_entries(r).await)
        }
        QuorumRequest::Vote(r) => QuorumResponse::Vote(shared.raft.vote(r).await),
        QuorumRequest::InstallSnapshot(r) => {
            QuorumResponse::InstallSnapshot(shared.raft.install_snapshot(r).await)
        }
        QuorumRequest::Write(records) => {
            QuorumResponse::Write(shared.write_forwarded(records).await)
        }
        QuorumRequest::AddObserver { node_id, addr } => {
            QuorumResponse::AddObserver(shared.add_observer(node_id, addr).await)
        }
    }
}
