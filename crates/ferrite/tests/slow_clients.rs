//! Slow clients cannot starve the rest (issue 14, item 2): connections that announce
//! ~100 MB frames and then send a byte a second (slowloris) must not stop a real client
//! from producing and consuming, nor new connections from being answered. The bounds
//! are generous (tens of seconds) and no assertion depends on timing beyond them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Server, OP_TIMEOUT};
use ferrite_protocol::kafka_protocol;
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, ApiVersionsResponse};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

/// Just under `socket.request.max.bytes`' default (100 MiB).
const DECLARED_FRAME_BYTES: i32 = 100 * 1024 * 1024 - 16;

/// Connections that announce a large frame and then trickle one byte a second, until
/// dropped.
struct Slowloris {
    stop: Arc<AtomicBool>,
    /// How many of the connections the broker has closed.
    closed: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Slowloris {
    fn start(addr: &str, connections: usize) -> Slowloris {
        let mut socks: Vec<TcpStream> = (0..connections)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(&DECLARED_FRAME_BYTES.to_be_bytes()).unwrap();
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let closed_count = Arc::new(AtomicUsize::new(0));
        let counter = closed_count.clone();
        let thread = std::thread::spawn(move || {
            // Returns how many the broker closed.
            let mut closed = vec![false; socks.len()];
            while !flag.load(Ordering::Relaxed) {
                for (s, closed) in socks.iter_mut().zip(closed.iter_mut()) {
                    if *closed {
                        continue;
                    }
                    let mut b = [0u8; 16];
                    let gone = match s.read(&mut b) {
                        Ok(0) => true,
                        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                        Ok(_) => false,
                    } || s.write(&[0u8]).is_err();
                    if gone {
                        *closed = true;
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
                for _ in 0..10 {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            closed.iter().filter(|c| **c).count()
        });
        Slowloris {
            stop,
            closed: closed_count,
            thread: Some(thread),
        }
    }

    /// Stops trickling; returns how many connections the broker had closed.
    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Slowloris {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A new connection's ApiVersions is answered.
fn api_versions_answered(addr: &str) {
    let resp: ApiVersionsResponse =
        common::raw(addr, ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
    assert_eq!(resp.error_code, 0);
}

/// A real client produces `count` messages and reads them back, within `OP_TIMEOUT`
/// each way.
fn produce_and_consume(server: &Server, topic: &str, from: i64, count: usize) {
    let producer: ThreadedProducer<DefaultProducerContext> = server
        .config()
        .set("linger.ms", "2")
        .set("message.timeout.ms", "30000")
        .create()
        .unwrap();
    let start = Instant::now();
    for i in 0..count {
        let value = format!("m{i}");
        producer
            .send(BaseRecord::<(), _>::to(topic).payload(&value).partition(0))
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(OP_TIMEOUT).unwrap();
    let produced = start.elapsed();
    let c: BaseConsumer = server
        .config()
        .set("group.id", "slow-clients")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(from))
        .unwrap();
    c.assign(&tpl).unwrap();
    let deadline = Instant::now() + OP_TIMEOUT;
    let mut seen = 0;
    while seen < count {
        assert!(Instant::now() < deadline, "consumed only {seen} of {count}");
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            assert_eq!(m.payload().unwrap(), format!("m{seen}").as_bytes());
            seen += 1;
        }
    }
    eprintln!(
        "produced {count} in {produced:?}, consumed them in {:?}",
        start.elapsed() - produced
    );
}

fn slowloris_does_not_starve(connections: usize) {
    let server = Server::start(&[]);
    let topic = format!("busy-{connections}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(server.create_topic(&topic, 1, &[]));
    let loris = Slowloris::start(&server.addr, connections);
    // Let every slow connection announce its frame and take or wait for memory.
    std::thread::sleep(Duration::from_secs(2));
    let mut from = 0;
    for round in 0..3 {
        api_versions_answered(&server.addr);
        let count = 200 * (round + 1);
        produce_and_consume(&server, &topic, from, count);
        from += count as i64;
    }
    drop(loris);
}

#[test]
fn six_slow_connections_with_100_mb_frames_do_not_block_others() {
    slowloris_does_not_starve(6);
}

#[test]
fn sixty_slow_connections_with_100_mb_frames_do_not_block_others() {
    slowloris_does_not_starve(60);
}

/// A frame that takes longer than `request.read.timeout.ms` to arrive is dropped with
/// its connection, and what it held is free again.
#[test]
fn slow_frames_are_cut_off_by_the_request_read_deadline() {
    let server = Server::start(&["request.read.timeout.ms=2000"]);
    let loris = Slowloris::start(&server.addr, 6);
    common::wait_for(
        "the broker to close the slow connections",
        OP_TIMEOUT,
        || (loris.closed.load(Ordering::Relaxed) == 6).then_some(()),
    );
    loris.finish();
    api_versions_answered(&server.addr);
}

/// Bytes trickling in are not activity: a frame sent a byte at a time is cut off by
/// `request.read.timeout.ms`, though a byte arrives far more often than that.
#[test]
fn trickling_bytes_do_not_keep_a_connection_open() {
    let server = Server::start(&[
        "connections.max.idle.ms=1000",
        "request.read.timeout.ms=3000",
    ]);
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    // A 1000-byte frame: at one byte per 300 ms it would take 5 minutes to arrive.
    s.write_all(&1000i32.to_be_bytes()).unwrap();
    let deadline = Instant::now() + OP_TIMEOUT;
    let mut b = [0u8; 1];
    let mut sent = 0u32;
    loop {
        assert!(
            Instant::now() < deadline,
            "connection still open after {sent} trickled bytes"
        );
        match s.read(&mut b) {
            Ok(0) => break,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
            Ok(_) => panic!("unexpected bytes from the broker"),
        }
        if s.write_all(&[0u8]).is_err() {
            break;
        }
        sent += 1;
    }
    assert!(sent < 1000);
}
