//! Sockets: the accept loop and, per connection, one task that reads and handles
//! requests and one that writes the answers, joined by a bounded queue.
//!
//! Pipelined requests are answered in the order they arrived. Reads that commute
//! (Fetch, ListOffsets, Describe*, ...) are handled concurrently, up to
//! `CONNECTION_REQUESTS_IN_FLIGHT_MAX`, so that one long-polling Fetch does not hold up
//! the ones behind it. Every other request (Produce, admin, group changes) waits until
//! everything before it has finished and finishes before anything after it starts, as
//! in Kafka, where a client that pipelines produce requests relies on that ordering.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ferrite_protocol::{
    decode_request, frame_length, FramePart, ProtocolError, Request, FRAME_PREFIX_BYTES,
};
use ferrite_storage::FileRegion;
use futures::stream::{FuturesOrdered, StreamExt};
use kafka_protocol::messages::ApiKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::config::limits;
use crate::handlers::{self, Reply};
use crate::Broker;

/// Accepts connections until `shutdown` resolves.
pub async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits::CONNECTIONS_MAX));
    let request_memory = Arc::new(RequestMemory::new());
    let mut accept_errors = crate::RateLimitedLog::default();
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
                    // Out of descriptors (EMFILE/ENFILE) repeats for as long as it lasts:
                    // one line per interval, with the count, and its real cause.
                    if let Some(suppressed) = accept_errors.ready(crate::now_ms()) {
                        let cause = match e.raw_os_error() {
                            Some(24) => "this process is out of file descriptors (RLIMIT_NOFILE); raise `ulimit -n` or host fewer partitions or connections",
                            Some(23) => "the system is out of file descriptors (fs.file-max)",
                            _ => "",
                        };
                        tracing::warn!(error = %e, cause, suppressed, "accept failed; new connections wait in the backlog");
                    }
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

/// The broker-wide memory for request bodies (Kafka's `queued.max.request.bytes`).
///
/// A frame takes its whole length when its length prefix is read, or nothing: a
/// connection whose frame does not fit is muted (it reads nothing more) and tries again
/// when memory is released. Nobody queues for memory, so a waiting 100 MB frame does not
/// hold back the small requests behind it, as a fair semaphore's queue would (its head
/// waiter collects every released permit). Frames up to `REQUEST_BYTES_SMALL_MAX` may
/// also use a reserve that large frames cannot touch, so that clients announcing large
/// frames and sending them slowly cannot take every byte; the time to receive one
/// frame is bounded too (`request.read.timeout.ms`), so what they hold comes back.
pub struct RequestMemory {
    shared: Arc<Semaphore>,
    small: Arc<Semaphore>,
    released: Notify,
    exhausted_log: std::sync::Mutex<crate::RateLimitedLog>,
}

impl RequestMemory {
    fn new() -> Self {
        RequestMemory {
            shared: Arc::new(Semaphore::new(limits::REQUEST_BYTES_IN_FLIGHT_MAX)),
            small: Arc::new(Semaphore::new(limits::REQUEST_BYTES_SMALL_RESERVED_MAX)),
            released: Notify::new(),
            exhausted_log: std::sync::Mutex::new(crate::RateLimitedLog::default()),
        }
    }

    fn try_reserve(self: &Arc<Self>, len: usize) -> Option<MemoryGrant> {
        let permits = memory_permits(len);
        let permit = self
            .shared
            .clone()
            .try_acquire_many_owned(permits)
            .ok()
            .or_else(|| {
                (len <= limits::REQUEST_BYTES_SMALL_MAX)
                    .then(|| self.small.clone().try_acquire_many_owned(permits).ok())
                    .flatten()
            });
        match permit {
            Some(permit) => Some(MemoryGrant {
                permit: Some(permit),
                pool: self.clone(),
            }),
            None => {
                let ready = self
                    .exhausted_log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .ready(crate::now_ms());
                if let Some(suppressed) = ready {
                    tracing::warn!(
                        frame_bytes = len,
                        free_bytes = self.shared.available_permits(),
                        small_reserve_free_bytes = self.small.available_permits(),
                        budget_bytes = limits::REQUEST_BYTES_IN_FLIGHT_MAX,
                        suppressed,
                        "request memory budget exhausted: the connection waits (muted) until memory is released"
                    );
                }
                None
            }
        }
    }

    /// Resolves when some memory may have been released (or after a short while, so
    /// that a release between a failed try and this wait is not missed for long).
    async fn released(&self) {
        let _ = tokio::time::timeout(
            Duration::from_millis(limits::REQUEST_MEMORY_RETRY_MS),
            self.released.notified(),
        )
        .await;
    }
}

/// A frame's share of [`RequestMemory`], returned (and waiters woken) on drop.
struct MemoryGrant {
    permit: Option<OwnedSemaphorePermit>,
    pool: Arc<RequestMemory>,
}

impl Drop for MemoryGrant {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.pool.released.notify_waiters();
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnectionEnd {
    #[error("client closed the connection")]
    Closed,
    #[error("idle for longer than connections.max.idle.ms")]
    Idle,
    #[error("a request of {0} bytes was not received within request.read.timeout.ms")]
    RequestReadTimeout(usize),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("writer gone")]
    WriterGone,
}

/// A response on its way to the socket.
enum Outgoing {
    Frame(BytesMut),
    /// A zero-copy Fetch: encoded pieces with file regions between them.
    Spliced {
        parts: Vec<FramePart>,
        regions: Vec<FileRegion>,
    },
}

/// A request frame read off the socket, holding its share of the request memory budget
/// until it has been handled.
struct Frame {
    body: Bytes,
    _memory: MemoryGrant,
}

async fn serve_connection(
    broker: Arc<Broker>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    request_memory: Arc<RequestMemory>,
) -> Result<(), ConnectionEnd> {
    let (rd, wr) = stream.into_split();
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(limits::CONNECTION_RESPONSES_QUEUED_MAX);
    let writer = tokio::spawn(write_loop(wr, out_rx));
    let result = process_loop(&broker, rd, &out_tx, peer, request_memory).await;
    drop(out_tx);
    let _ = writer.await;
    match result {
        Err(ConnectionEnd::Closed) => Ok(()),
        other => other,
    }
}

async fn write_loop(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(out) = rx.recv().await {
        let written = match out {
            Outgoing::Frame(buf) => wr.write_all(&buf).await,
            Outgoing::Spliced { parts, regions } => write_spliced(&mut wr, parts, &regions).await,
        };
        if let Err(e) = written {
            // A short region means the frame can no longer be completed: the connection
            // ends and the client retries the fetch.
            tracing::info!(error = %e, "write failed; closing the connection");
            return;
        }
    }
    let _ = wr.shutdown().await;
}

async fn write_spliced(
    wr: &mut OwnedWriteHalf,
    parts: Vec<FramePart>,
    regions: &[FileRegion],
) -> std::io::Result<()> {
    for part in parts {
        match part {
            FramePart::Bytes(b) => wr.write_all(&b).await?,
            FramePart::Records { index, len } => {
                let region = regions
                    .get(index)
                    .filter(|r| r.len == len)
                    .ok_or_else(|| std::io::Error::other("spliced frame without its region"))?;
                send_region(wr.as_ref(), region).await?;
            }
        }
    }
    Ok(())
}

/// Writes a file region to the socket with `sendfile(2)`: the bytes go from the page
/// cache to the socket without a copy through this process.
async fn send_region(sock: &TcpStream, region: &FileRegion) -> std::io::Result<()> {
    let mut offset = region.position;
    let end = region.position.saturating_add(region.len);
    while offset < end {
        sock.writable().await?;
        let count = usize::try_from(end - offset)
            .unwrap_or(usize::MAX)
            .min(limits::SENDFILE_CHUNK_BYTES_MAX);
        let sent = sock.try_io(Interest::WRITABLE, || {
            rustix::fs::sendfile(sock, &*region.file, Some(&mut offset), count)
                .map_err(std::io::Error::from)
        });
        match sent {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "{} ends before byte {} of a fetched region",
                        region.path.display(),
                        offset
                    ),
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Requests that only read state, so that running them concurrently with each other is
/// the same as running them in order.
fn commutes(api_key: ApiKey) -> bool {
    matches!(
        api_key,
        ApiKey::Fetch
            | ApiKey::ListOffsets
            | ApiKey::ApiVersions
            | ApiKey::DescribeConfigs
            | ApiKey::DescribeCluster
            | ApiKey::DescribeQuorum
            | ApiKey::DescribeLogDirs
            | ApiKey::DescribeGroups
            | ApiKey::ListGroups
            | ApiKey::OffsetFetch
            | ApiKey::FindCoordinator
    )
}

type Handled<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Option<Outgoing>, ConnectionEnd>> + Send + 'a>,
>;

/// The frame being read: its length once the prefix is in, and its share of the request
/// memory budget once granted. No body byte is read before the share is granted.
struct Incoming {
    len: usize,
    memory: Option<MemoryGrant>,
}

/// Reads, handles and answers requests in one task (a hop between tasks per request
/// showed up in latency and CPU at 10,000 requests/s). Reading uses `read_buf`, which
/// is cancel-safe, so the loop can wait on the socket and on requests in flight at once.
async fn process_loop(
    broker: &Arc<Broker>,
    mut rd: OwnedReadHalf,
    tx: &mpsc::Sender<Outgoing>,
    peer: std::net::SocketAddr,
    request_memory: Arc<RequestMemory>,
) -> Result<(), ConnectionEnd> {
    let idle = Duration::from_millis(broker.config.connections_max_idle_ms);
    let read_timeout = Duration::from_millis(broker.config.request_read_timeout_ms);
    let request_bytes_max = broker.config.request_bytes_max;
    let mut in_flight: FuturesOrdered<Handled<'_>> = FuturesOrdered::new();
    let mut buf = BytesMut::with_capacity(limits::CONNECTION_READ_BYTES);
    let mut incoming: Option<Incoming> = None;
    // Idle is time without a request or an answer, not without a byte: a client sending
    // a byte a second is not active. While part of a frame is in, the frame's own
    // deadline applies instead; time spent muted for memory does not count against it.
    let mut last_active = Instant::now();
    let mut frame_deadline: Option<Instant> = None;
    loop {
        // Frame boundaries and memory, without waiting.
        if incoming.is_none() {
            if let Some(prefix) = buf.get(..FRAME_PREFIX_BYTES) {
                let mut p = [0u8; FRAME_PREFIX_BYTES];
                p.copy_from_slice(prefix);
                let len = frame_length(p, request_bytes_max)?;
                incoming = Some(Incoming { len, memory: None });
            }
        }
        if let Some(inc) = incoming.as_mut().filter(|i| i.memory.is_none()) {
            inc.memory = request_memory.try_reserve(inc.len);
            if inc.memory.is_some() {
                frame_deadline = Some(Instant::now() + read_timeout);
            }
        }
        if !buf.is_empty() && frame_deadline.is_none() {
            frame_deadline = Some(Instant::now() + read_timeout);
        }
        let complete = incoming
            .as_ref()
            .is_some_and(|i| i.memory.is_some() && buf.len() >= FRAME_PREFIX_BYTES + i.len);
        if complete && in_flight.len() < limits::CONNECTION_REQUESTS_IN_FLIGHT_MAX {
            if let Some(Incoming {
                len,
                memory: Some(memory),
            }) = incoming.take()
            {
                buf.advance(FRAME_PREFIX_BYTES);
                let frame = Frame {
                    body: buf.split_to(len).freeze(),
                    _memory: memory,
                };
                frame_deadline = None;
                dispatch(broker, frame, peer, tx, &mut in_flight).await?;
                last_active = Instant::now();
            }
            continue;
        }

        let waiting_for_memory = incoming.as_ref().is_some_and(|i| i.memory.is_none());
        let want_bytes = match &incoming {
            Some(i) if i.memory.is_some() => (FRAME_PREFIX_BYTES + i.len).saturating_sub(buf.len()),
            Some(_) => 0,
            None => limits::CONNECTION_READ_BYTES,
        };
        let reading = want_bytes > 0 && in_flight.len() < limits::CONNECTION_REQUESTS_IN_FLIGHT_MAX;
        if reading {
            buf.reserve(want_bytes);
        }
        let deadline = if waiting_for_memory {
            None
        } else if !buf.is_empty() {
            frame_deadline.map(|d| (d, true))
        } else if in_flight.is_empty() {
            Some((last_active + idle, false))
        } else {
            None
        };
        let read = {
            let mut window = (&mut buf).limit(want_bytes);
            tokio::select! {
                biased;
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    send(tx, done?).await?;
                    last_active = Instant::now();
                    None
                }
                // Muted: this connection alone waits until memory is released.
                () = request_memory.released(), if waiting_for_memory => None,
                read = rd.read_buf(&mut window), if reading => Some(read),
                () = sleep_until_some(deadline) => {
                    return Err(match (deadline, &incoming) {
                        (Some((_, true)), Some(i)) => ConnectionEnd::RequestReadTimeout(i.len),
                        (Some((_, true)), None) => ConnectionEnd::RequestReadTimeout(buf.len()),
                        _ => ConnectionEnd::Idle,
                    });
                }
            }
        };
        match read {
            None | Some(Ok(1..)) => {}
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(0)) => {
                // Answer what was asked, then end.
                while let Some(done) = in_flight.next().await {
                    send(tx, done?).await?;
                }
                return Err(if buf.is_empty() {
                    ConnectionEnd::Closed
                } else {
                    ConnectionEnd::Protocol(ProtocolError::Truncated(
                        incoming.as_ref().map_or(buf.len(), |i| i.len),
                    ))
                });
            }
        }
    }
}

/// Least time between two WARN lines about refused (unknown or unsupported) requests: a
/// client retrying in a loop must not flood the log. Refusals in between are counted and
/// the count is reported with the next line.
const REFUSED_REQUEST_WARN_INTERVAL_MS: i64 = 10_000;
static REFUSED_REQUEST_LAST_WARN_MS: std::sync::atomic::AtomicI64 =
    std::sync::atomic::AtomicI64::new(i64::MIN);
static REFUSED_REQUESTS_SUPPRESSED: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// An operator must see why an old client's connection is closed (the API by name and
/// key, and the version floor), at WARN, rate-limited.
fn warn_refused_request(peer: std::net::SocketAddr, e: &ProtocolError) {
    use std::sync::atomic::Ordering;
    let now = crate::now_ms();
    let last = REFUSED_REQUEST_LAST_WARN_MS.load(Ordering::Relaxed);
    let due = now.saturating_sub(last) >= REFUSED_REQUEST_WARN_INTERVAL_MS;
    if due
        && REFUSED_REQUEST_LAST_WARN_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let suppressed = REFUSED_REQUESTS_SUPPRESSED.swap(0, Ordering::Relaxed);
        tracing::warn!(%peer, suppressed, "refusing request and closing the connection: {e}");
    } else {
        REFUSED_REQUESTS_SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, "refusing request and closing the connection: {e}");
    }
}

/// Sleeps until the deadline, or forever without one.
async fn sleep_until_some(deadline: Option<(Instant, bool)>) {
    match deadline {
        Some((d, _)) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

fn memory_permits(len: usize) -> u32 {
    u32::try_from(len.min(limits::REQUEST_BYTES_IN_FLIGHT_MAX)).unwrap_or(u32::MAX)
}

/// Decodes a frame and starts it: reads that commute join the requests in flight; any
/// other request waits for those, then runs alone.
async fn dispatch<'a>(
    broker: &'a Arc<Broker>,
    frame: Frame,
    peer: std::net::SocketAddr,
    tx: &mpsc::Sender<Outgoing>,
    in_flight: &mut FuturesOrdered<Handled<'a>>,
) -> Result<(), ConnectionEnd> {
    let request = match decode_request(frame.body.clone()) {
        Ok(r) => r,
        Err(ProtocolError::UnsupportedVersion {
            api_key: ApiKey::ApiVersions,
            correlation_id,
            version,
        }) => {
            // KIP-511: answer with our versions so the client can retry with one we know.
            tracing::info!(
                version,
                "ApiVersions version not supported; answering UNSUPPORTED_VERSION"
            );
            let resp = ferrite_protocol::unsupported_api_versions_response(correlation_id)?;
            in_flight.push_back(Box::pin(async move { Ok(Some(Outgoing::Frame(resp))) }));
            return Ok(());
        }
        Err(e) => {
            if matches!(
                e,
                ProtocolError::UnsupportedVersion { .. } | ProtocolError::UnknownApiKey(_)
            ) {
                warn_refused_request(peer, &e);
            }
            // Answer what came before, then close.
            while let Some(done) = in_flight.next().await {
                send(tx, done?).await?;
            }
            return Err(e.into());
        }
    };
    if commutes(request.api_key) {
        in_flight.push_back(Box::pin(handle(broker, request, peer, frame)));
    } else {
        while let Some(done) = in_flight.next().await {
            send(tx, done?).await?;
        }
        send(tx, handle(broker, request, peer, frame).await?).await?;
    }
    Ok(())
}

async fn send(tx: &mpsc::Sender<Outgoing>, out: Option<Outgoing>) -> Result<(), ConnectionEnd> {
    match out {
        Some(out) => tx.send(out).await.map_err(|_| ConnectionEnd::WriterGone),
        None => Ok(()),
    }
}

/// Handles one request in its span and encodes the answer.
async fn handle(
    broker: &Arc<Broker>,
    request: Request,
    peer: std::net::SocketAddr,
    frame: Frame,
) -> Result<Option<Outgoing>, ConnectionEnd> {
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
    let reply = async {
        tracing::trace!(request = ?request.body, "handling");
        let reply = handlers::handle(broker, request, peer).await;
        // The request's bytes (produce records included) are no longer needed.
        drop(frame);
        reply
    }
    .instrument(span)
    .await;
    Ok(match reply {
        None => None,
        Some(Reply::Body(body)) => Some(Outgoing::Frame(ferrite_protocol::encode_response(
            api_key,
            version,
            correlation_id,
            &body,
        )?)),
        Some(Reply::SplicedFetch(body, regions)) => {
            let lens: Vec<u64> = regions.iter().map(|r| r.len).collect();
            let parts = ferrite_protocol::encode_fetch_response_spliced(
                version,
                correlation_id,
                &body,
                &lens,
            )?;
            Some(Outgoing::Spliced { parts, regions })
        }
    })
}
