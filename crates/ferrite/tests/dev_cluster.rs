//! `ferrite dev cluster` (issues 8 and 10): starts N combined nodes on loopback, prints
//! the bootstrap string, the nodes form one metadata quorum (a topic created through one
//! node is known to every node), every node's Metadata lists all the registered brokers,
//! and SIGTERM stops them all.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

const NODES: u16 = 3;
const READY_TIMEOUT: Duration = Duration::from_secs(150);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const METADATA_TIMEOUT: Duration = Duration::from_secs(30);

/// A base port with 2 * NODES free ports from it (probed by binding; another process may
/// still take one before the cluster binds it, which the test then reports).
fn free_base_port() -> u16 {
    for _ in 0..100 {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = probe.local_addr().unwrap().port();
        drop(probe);
        if u32::from(base) + u32::from(2 * NODES) >= 65_535 {
            continue;
        }
        let held: Vec<_> = (base..base + 2 * NODES)
            .map(|p| TcpListener::bind(("127.0.0.1", p)))
            .collect();
        if held.iter().all(Result::is_ok) {
            return base;
        }
    }
    panic!("no {} consecutive free ports found", 2 * NODES);
}

#[test]
fn dev_cluster_starts_every_node_and_stops_them_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args([
            "dev",
            "cluster",
            "--nodes",
            &NODES.to_string(),
            "--racks",
            "2",
        ])
        .args(["--base-port", &base.to_string()])
        .arg("--data-dir")
        .arg(tmp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + READY_TIMEOUT;
    let bootstrap = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(b) = line.strip_prefix("ferrite dev cluster ready: bootstrap ") {
                    break b.to_string();
                }
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no ready line within {READY_TIMEOUT:?}: {e}");
            }
        }
    };
    let expected: Vec<String> = (0..NODES)
        .map(|i| format!("127.0.0.1:{}", base + i))
        .collect();
    assert_eq!(bootstrap, expected.join(","));

    // A topic created through node 1 commits through the metadata quorum and reaches every
    // node's image: each node, asked alone, answers for itself and knows the topic.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &expected[0])
        .create()
        .unwrap();
    let topic = NewTopic::new("dev-cluster", 3, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in futures::executor::block_on(admin.create_topics([&topic], &opts)).unwrap() {
        r.unwrap();
    }
    drop(admin);
    for (i, addr) in expected.iter().enumerate() {
        let node_id = i32::try_from(i).unwrap() + 1;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", addr)
            .create()
            .unwrap();
        let deadline = Instant::now() + METADATA_TIMEOUT;
        loop {
            let md = consumer
                .fetch_metadata(Some("dev-cluster"), Duration::from_secs(10))
                .unwrap();
            assert!(
                md.brokers().iter().any(|b| b.id() == node_id),
                "node {node_id} at {addr} does not list itself"
            );
            let parts = md
                .topics()
                .iter()
                .find(|t| t.name() == "dev-cluster" && t.error().is_none())
                .map(|t| t.partitions().len());
            // Every node registered before its ready line; each node's image gets there.
            let mut brokers: Vec<i32> = md.brokers().iter().map(|b| b.id()).collect();
            brokers.sort_unstable();
            let all: Vec<i32> = (1..=i32::from(NODES)).collect();
            if parts == Some(3) && brokers == all {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {node_id} does not know the topic created through node 1 ({parts:?}) \
                 or every broker ({brokers:?})"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + STOP_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("dev cluster did not stop within {STOP_TIMEOUT:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "dev cluster exited with {status}");
    // Every node stopped with it: nothing listens on their broker ports any more.
    for addr in &expected {
        assert!(
            TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1)).is_err(),
            "{addr} still accepts connections after the dev cluster stopped"
        );
    }
}
