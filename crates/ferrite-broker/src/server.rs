//! Sockets: the accept loop and one task pair per connection.
//!
//! Requests on one connection are handled one at a time, in order, as Kafka does: a
//! client that pipelines produce requests relies on that for ordering. Reading the next
//! request overlaps with writing the previous response, through a bounded queue.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferrite_protocol::{decode_request, frame_length, ProtocolError, FRAME_PREFIX_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tracing::Instrument;

use crate::config::limits;
use crate::handlers;
use crate::Broker;

/// Accepts connections until `shutdown` resolves.
pub async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits::CONNECTIONS_MAX));
    let request_memory = Arc::new(Semaphore::new(limits::REQUEST_BYTES_IN_FLIGHT_MAX));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let broker = broker.clone();
        let request_memory = request_memory.clone();
        tokio::spawn(async move {
            let span = tracing::debug_span!("connection", %peer);
            if let Err(reason) = serve_connection(broker, stream, peer, request_memory)
                .instrument(span)
                .await
            {
                tracing::info!(%peer, %reason, "closing connection");
            }
            drop(permit);
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnectionEnd {
    #[error("client closed the connection")]
    Closed,
    #[error("idle for longer than connections.max.idle.ms")]
    Idle,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("writer gone")]
    WriterGone,
}

async fn serve_connection(
    broker: Arc<Broker>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    request_memory: Arc<Semaphore>,
) -> Result<(), ConnectionEnd> {
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<BytesMut>(limits::CONNECTION_RESPONSES_QUEUED_MAX);
    let writer = tokio::spawn(async move {
        while let Some(buf) = rx.recv().await {
            if let Err(e) = wr.write_all(&buf).await {
                tracing::debug!(error = %e, "write failed");
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    let result = read_loop(&broker, &mut rd, &tx, peer, &request_memory).await;
    drop(tx);
    let _ = writer.await;
    match result {
        Err(ConnectionEnd::Closed) => Ok(()),
        other => other,
    }
}

async fn read_loop(
    broker: &Arc<Broker>,
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    tx: &mpsc::Sender<BytesMut>,
    peer: std::net::SocketAddr,
    request_memory: &Semaphore,
) -> Result<(), ConnectionEnd> {
    let idle = Duration::from_millis(broker.config.connections_max_idle_ms);
    loop {
        let mut prefix = [0u8; FRAME_PREFIX_BYTES];
        match tokio::time::timeout(idle, rd.read_exact(&mut prefix)).await {
            Err(_) => return Err(ConnectionEnd::Idle),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ConnectionEnd::Closed)
            }
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(_)) => {}
        }
        let len = frame_length(prefix, broker.config.request_bytes_max)?;
        // Memory for request bodies is a broker-wide budget (Kafka's queued.max.request.bytes):
        // a client announcing a large frame waits here instead of growing the heap.
        let permits =
            u32::try_from(len.min(limits::REQUEST_BYTES_IN_FLIGHT_MAX)).unwrap_or(u32::MAX);
        let _memory = request_memory
            .acquire_many(permits)
            .await
            .map_err(|_| ConnectionEnd::WriterGone)?;
        let mut body = BytesMut::zeroed(len);
        match tokio::time::timeout(idle, rd.read_exact(&mut body)).await {
            Err(_) => return Err(ConnectionEnd::Idle),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ConnectionEnd::Protocol(ProtocolError::Truncated(len)))
            }
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(_)) => {}
        }
        let frame: Bytes = body.freeze();
        let request = match decode_request(frame) {
            Ok(r) => r,
            Err(ProtocolError::UnsupportedVersion {
                api_key: kafka_protocol::messages::ApiKey::ApiVersions,
                correlation_id,
                version,
            }) => {
                // KIP-511: answer with our versions so the client can retry with one we know.
                tracing::info!(
                    version,
                    "ApiVersions version not supported; answering UNSUPPORTED_VERSION"
                );
                let resp = ferrite_protocol::unsupported_api_versions_response(correlation_id)?;
                tx.send(resp).await.map_err(|_| ConnectionEnd::WriterGone)?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let api_key = request.api_key;
        let version = request.version();
        let correlation_id = request.header.correlation_id;
        let span = tracing::info_span!(
            "request",
            api = ?api_key,
            version,
            correlation_id,
            client_id = request.header.client_id.as_deref().unwrap_or(""),
        );
        let response = async {
            tracing::trace!(request = ?request.body, "handling");
            let response = handlers::handle(broker, request, peer).await;
            tracing::trace!(?response, "handled");
            response
        }
        .instrument(span)
        .await;
        if let Some(body) = response {
            let buf = ferrite_protocol::encode_response(api_key, version, correlation_id, &body)?;
            tx.send(buf).await.map_err(|_| ConnectionEnd::WriterGone)?;
        }
    }
}
