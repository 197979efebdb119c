//! The cluster (issue 8): three real `ferrite server` processes in combined mode on
//! 127.0.0.1 (ports picked by binding :0), a metadata quorum of three voters, brokers that
//! register and heartbeat with short sessions, and rdkafka clients. Every wait has a
//! timeout; processes are killed by PID.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::TopicPartitionList;

const START_TIMEOUT: Duration = Duration::from_secs(60);
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// The session the nodes run with: a dead broker is fenced after this.
const SESSION_MS: u64 = 1500;

struct Node {
    id: i32,
    addr: String,
    data_dir: PathBuf,
    /// The `ferrite server` arguments, for a restart.
    args: Vec<String>,
    child: Option<Child>,
}

struct Cluster {
    nodes: Vec<Node>,
    _tmp: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// Starts three combined nodes and waits for all three ready lines.
    fn start() -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let ids = [1, 2, 3];
        let ports: Vec<(u16, u16)> = ids.iter().map(|_| (free_port(), free_port())).collect();
        let voters = ids
            .iter()
            .zip(&ports)
            .map(|(id, (_, c))| format!("{id}@127.0.0.1:{c}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        for (id, (kafka, ctl)) in ids.iter().zip(&ports) {
            let data_dir = tmp.path().join(format!("node-{id}"));
            let addr = format!("127.0.0.1:{kafka}");
            let mut args: Vec<String> = vec![
                "server".into(),
                "--node-id".into(),
                id.to_string(),
                "--listen".into(),
                addr.clone(),
                "--controller-listen".into(),
                format!("127.0.0.1:{ctl}"),
                "--controller-quorum-voters".into(),
                voters.clone(),
                "--data-dir".into(),
                data_dir.display().to_string(),
            ];
            for s in [
                format!("broker.session.timeout.ms={SESSION_MS}"),
                "broker.heartbeat.interval.ms=500".to_string(),
                "offsets.topic.num.partitions=3".to_string(),
                "leader.imbalance.check.interval.seconds=1".to_string(),
            ] {
                args.push("--set".into());
                args.push(s);
            }
            nodes.push(Node {
                id: *id,
                addr,
                data_dir,
                args,
                child: None,
            });
        }
        let pending: Vec<mpsc::Receiver<String>> = nodes.iter_mut().map(spawn).collect();
        for (rx, node) in pending.iter().zip(&mut nodes) {
            wait_ready(rx, node);
        }
        Cluster { nodes, _tmp: tmp }
    }

    /// Starts a stopped node again with its arguments and waits for its ready line.
    fn restart(&mut self, id: i32) {
        let node = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
        assert!(node.child.is_none());
        let rx = spawn(node);
        wait_ready(&rx, node);
    }

    /// SIGTERM by PID, and wait (bounded) for the exit.
    fn terminate(&mut self, id: i32) {
        let node = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
        let mut c = node.child.take().unwrap();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                assert!(status.success(), "node {id} exited with {status}");
                return;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("node {id} did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self, id: i32) {
        let node = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
        if let Some(mut c) = node.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn live(&self) -> Vec<&Node> {
        self.nodes.iter().filter(|n| n.child.is_some()).collect()
    }

    /// A bootstrap string of the nodes still running.
    fn bootstrap(&self) -> String {
        self.live()
            .iter()
            .map(|n| n.addr.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap())
            .set("log_level", "3")
            .set("topic.metadata.refresh.interval.ms", "500")
            .set("retry.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "500");
        c
    }
}

fn spawn(node: &mut Node) -> mpsc::Receiver<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(&node.args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    node.child = Some(child);
    rx
}

fn wait_ready(rx: &mpsc::Receiver<String>, node: &mut Node) {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("ferrite ready: listening on ") => return,
            Ok(_) => {}
            Err(_) => {
                if let Some(mut c) = node.child.take() {
                    let _ = c.kill();
                }
                panic!(
                    "node {} did not print its ready line within {START_TIMEOUT:?}",
                    node.id
                );
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (brokers, controller id, partition leader/replicas/isr per partition) as node
/// `addr` answers Metadata.
struct Seen {
    brokers: Vec<i32>,
    partitions: BTreeMap<i32, (i32, Vec<i32>, Vec<i32>)>,
}

fn metadata(addr: &str, topic: Option<&str>) -> Option<Seen> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("log_level", "0")
        .create()
        .ok()?;
    let md = c.fetch_metadata(topic, Duration::from_secs(5)).ok()?;
    let mut brokers: Vec<i32> = md.brokers().iter().map(|b| b.id()).collect();
    brokers.sort_unstable();
    let mut partitions = BTreeMap::new();
    if let Some(t) = topic.and_then(|name| md.topics().iter().find(|t| t.name() == name)) {
        for p in t.partitions() {
            partitions.insert(
                p.id(),
                (p.leader(), p.replicas().to_vec(), p.isr().to_vec()),
            );
        }
    }
    Some(Seen {
        brokers,
        partitions,
    })
}

async fn create_topic(
    admin: &AdminClient<DefaultClientContext>,
    name: &str,
    partitions: i32,
    rf: i32,
    configs: &[(&str, &str)],
    timeout: Duration,
) -> Result<(), String> {
    let mut t = NewTopic::new(name, partitions, TopicReplication::Fixed(rf));
    for (k, v) in configs {
        t = t.set(k, v);
    }
    let opts = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    match admin.create_topics([&t], &opts).await {
        Ok(results) => results
            .into_iter()
            .next()
            .unwrap()
            .map(|_| ())
            .map_err(|(_, e)| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Produces `values` with acks=all, each acknowledged before the next goes out (so the
/// set of acknowledged values is exact); returns the acknowledged ones.
async fn produce_all(producer: &FutureProducer, topic: &str, values: &[String]) -> Vec<String> {
    let mut acked = Vec::new();
    for v in values {
        let r = producer
            .send(
                FutureRecord::<(), String>::to(topic)
                    .payload(v)
                    .partition(0),
                OP_TIMEOUT,
            )
            .await;
        if r.is_ok() {
            acked.push(v.clone());
        }
    }
    acked
}

/// Every value of partition 0 from offset 0 up to `count` values, read from `bootstrap`.
fn consume(bootstrap: &str, topic: &str, count: usize) -> Vec<String> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "3")
        .set("group.id", "cluster-test-reader")
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + OP_TIMEOUT;
    while got.len() < count && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            got.push(String::from_utf8(m.payload().unwrap().to_vec()).unwrap());
        }
    }
    got
}

/// The bytes of a replica's partition log: every segment file, in name order.
fn replica_bytes(data_dir: &Path, topic: &str) -> Vec<u8> {
    let dir = data_dir.join(format!("{topic}-0"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| std::fs::read(f).unwrap())
        .collect()
}

#[test]
fn quorum_forms_replicates_and_fails_over() {
    let mut cluster = Cluster::start();
    let rt = runtime();
    // Every node answers Metadata with all three brokers.
    for n in &cluster.nodes {
        let seen = wait_for("3 brokers in Metadata", OP_TIMEOUT, || {
            metadata(&n.addr, None).filter(|s| s.brokers == vec![1, 2, 3])
        });
        assert_eq!(seen.brokers, vec![1, 2, 3]);
    }

    // RF 3 is placed over the three brokers; RF 4 is refused.
    let admin: AdminClient<DefaultClientContext> = cluster.config().create().unwrap();
    let topic = "replicated";
    rt.block_on(create_topic(
        &admin,
        topic,
        1,
        3,
        &[("min.insync.replicas", "2")],
        OP_TIMEOUT,
    ))
    .unwrap();
    let err = rt
        .block_on(create_topic(&admin, "too-wide", 1, 4, &[], OP_TIMEOUT))
        .unwrap_err();
    assert!(
        err.contains("replication factor") || err.contains("InvalidReplicationFactor"),
        "{err}"
    );
    let (leader, replicas, _) = wait_for("the partition with its ISR of 3", OP_TIMEOUT, || {
        metadata(&cluster.nodes[0].addr, Some(topic))
            .and_then(|s| s.partitions.get(&0).cloned())
            .filter(|(l, _, isr)| *l >= 0 && isr.len() == 3)
    });
    let mut sorted = replicas.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![1, 2, 3]);

    // acks=all produce, then every replica holds the same bytes.
    let producer: FutureProducer = cluster
        .config()
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("message.timeout.ms", "20000")
        .create()
        .unwrap();
    let first: Vec<String> = (0..50).map(|i| format!("before-{i:03}")).collect();
    let acked = rt.block_on(produce_all(&producer, topic, &first));
    assert_eq!(acked, first, "every acks=all produce is acknowledged");
    assert_eq!(consume(&cluster.bootstrap(), topic, first.len()), first);
    let dirs: Vec<PathBuf> = cluster.nodes.iter().map(|n| n.data_dir.clone()).collect();
    wait_for("identical replica logs", OP_TIMEOUT, || {
        let logs: Vec<Vec<u8>> = dirs.iter().map(|d| replica_bytes(d, topic)).collect();
        (!logs[0].is_empty() && logs.iter().all(|l| *l == logs[0])).then_some(())
    });

    // kill -9 the leader: a new leader from the ISR, and producing continues with no
    // acknowledged record lost.
    cluster.kill9(leader);
    let killed_at = Instant::now();
    let survivor = cluster.live()[0].addr.clone();
    let (new_leader, _, isr) = wait_for("a new leader", OP_TIMEOUT, || {
        metadata(&survivor, Some(topic))
            .and_then(|s| s.partitions.get(&0).cloned())
            .filter(|(l, _, _)| *l >= 0 && *l != leader)
    });
    let failover = killed_at.elapsed();
    eprintln!("failover: new leader {new_leader} (ISR {isr:?}) after {failover:?}");
    assert_ne!(new_leader, leader);
    let second: Vec<String> = (0..50).map(|i| format!("after-{i:03}")).collect();
    let acked_after = rt.block_on(produce_all(&producer, topic, &second));
    assert!(
        !acked_after.is_empty(),
        "producing continues after failover"
    );
    let all = consume(&cluster.bootstrap(), topic, first.len() + acked_after.len());
    for v in first.iter().chain(&acked_after) {
        assert!(all.contains(v), "acknowledged {v} lost after failover");
    }
}

/// The active controller as Metadata's controller id names it, asked of every live node
/// until one knows.
fn active_controller(cluster: &Cluster) -> i32 {
    wait_for("an active controller", OP_TIMEOUT, || {
        cluster
            .live()
            .iter()
            .find_map(|n| controller_id_raw(&n.addr))
    })
}

/// Metadata v12's controller id, by raw wire (rdkafka does not expose it).
fn controller_id_raw(addr: &str) -> Option<i32> {
    use ferrite_protocol::kafka_protocol::messages::{
        ApiKey, MetadataRequest, MetadataResponse, RequestHeader, ResponseHeader,
    };
    use ferrite_protocol::kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
    use std::io::{Read, Write};
    let version = 12;
    let mut body = bytes::BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::Metadata as i16)
        .with_request_api_version(version)
        .with_correlation_id(1)
        .with_client_id(Some(StrBytes::from_static_str("raw")))
        .encode(&mut body, ApiKey::Metadata.request_header_version(version))
        .ok()?;
    MetadataRequest::default()
        .with_topics(Some(vec![]))
        .encode(&mut body, version)
        .ok()?;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(&(body.len() as u32).to_be_bytes()).ok()?;
    s.write_all(&body).ok()?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut frame).ok()?;
    let mut frame = bytes::Bytes::from(frame);
    ResponseHeader::decode(
        &mut frame,
        ApiKey::Metadata.response_header_version(version),
    )
    .ok()?;
    let md = MetadataResponse::decode(&mut frame, version).ok()?;
    (md.controller_id.0 >= 0).then_some(md.controller_id.0)
}

#[test]
fn controller_failover_keeps_committing_and_a_minority_commits_nothing() {
    let mut cluster = Cluster::start();
    let rt = runtime();
    let controller = active_controller(&cluster);
    cluster.kill9(controller);
    // The other two elect a controller; CreateTopics commits (clients retry
    // NOT_CONTROLLER and timeouts while the election runs).
    let admin: AdminClient<DefaultClientContext> = cluster.config().create().unwrap();
    wait_for(
        "CreateTopics after the controller died",
        OP_TIMEOUT,
        || match rt.block_on(create_topic(
            &admin,
            "after-controller-death",
            1,
            2,
            &[],
            Duration::from_secs(5),
        )) {
            Ok(()) => Some(()),
            Err(e) if e.contains("already exists") => Some(()),
            Err(_) => None,
        },
    );
    let next = active_controller(&cluster);
    assert_ne!(next, controller);
    // DescribeQuorum, asked of the survivor that is not the active controller (so it is
    // forwarded): the new leader, all three voters, the live follower caught up to the
    // high watermark.
    let follower = cluster
        .live()
        .iter()
        .find(|n| n.id != next)
        .map(|n| n.addr.clone())
        .unwrap();
    let quorum = wait_for("DescribeQuorum naming the new leader", OP_TIMEOUT, || {
        cluster_describe(&follower).filter(|d| {
            let q = &d["quorum"];
            q["leader_id"] == next
                && q["voters"].as_array().is_some_and(|v| {
                    v.iter()
                        .any(|v| v["id"] != next && v["id"] != controller && v["lag"] == 0)
                })
        })
    });
    let q = &quorum["quorum"];
    let mut voters: Vec<i64> = q["voters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["id"].as_i64())
        .collect();
    voters.sort_unstable();
    assert_eq!(voters, vec![1, 2, 3], "{quorum}");
    assert!(q["high_watermark"].as_i64().unwrap() > 0, "{quorum}");
    assert!(q["leader_epoch"].as_i64().unwrap() > 0, "{quorum}");
    let survivor = cluster.live()[0].addr.clone();
    wait_for("the new topic in Metadata", OP_TIMEOUT, || {
        metadata(&survivor, Some("after-controller-death"))
            .filter(|s| s.partitions.get(&0).is_some_and(|p| p.0 >= 0))
    });

    // Kill one more: the last node alone is a minority and commits nothing.
    cluster.kill9(next);
    let admin: AdminClient<DefaultClientContext> = cluster.config().create().unwrap();
    let r = rt.block_on(create_topic(
        &admin,
        "in-the-minority",
        1,
        1,
        &[],
        Duration::from_secs(8),
    ));
    assert!(r.is_err(), "a one-node minority committed a topic: {r:?}");
    let last = cluster.live()[0].addr.clone();
    let seen = metadata(&last, Some("in-the-minority"));
    assert!(
        seen.is_none_or(|s| s.partitions.is_empty()),
        "the minority shows a topic it could not commit"
    );
    // Nor does it claim a quorum leader.
    assert!(
        cluster_describe(&last).is_none(),
        "a one-node minority described a quorum leader"
    );
}

/// `ferrite cluster describe --json` against `addr`: `None` when it fails (no active
/// controller reachable, for one).
fn cluster_describe(addr: &str) -> Option<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(["cluster", "describe", "--json", "-b", addr])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

#[test]
fn sigterm_moves_leadership_first_and_a_restarted_broker_rejoins() {
    let mut cluster = Cluster::start();
    let rt = runtime();
    let admin: AdminClient<DefaultClientContext> = cluster.config().create().unwrap();
    let topic = "rolling";
    rt.block_on(create_topic(
        &admin,
        topic,
        3,
        3,
        &[("min.insync.replicas", "2")],
        OP_TIMEOUT,
    ))
    .unwrap();
    let addr = cluster.nodes[0].addr.clone();
    let seen = wait_for("three partitions with full ISRs", OP_TIMEOUT, || {
        metadata(&addr, Some(topic)).filter(|s| {
            s.partitions.len() == 3 && s.partitions.values().all(|p| p.0 >= 0 && p.2.len() == 3)
        })
    });
    // The broker that leads partition 0 (and is preferred there).
    let (leader, replicas, _) = seen.partitions[&0].clone();
    assert_eq!(
        replicas[0], leader,
        "a new topic's leader is its preferred replica"
    );

    // SIGTERM: its leaderships move before it exits, so right after the exit no
    // partition names it leader (without the controlled shutdown they would move only
    // when its session expired).
    cluster.terminate(leader);
    let other = cluster.live()[0].addr.clone();
    let after = metadata(&other, Some(topic)).expect("metadata from a survivor");
    for (p, (l, _, isr)) in &after.partitions {
        assert_ne!(
            *l, leader,
            "partition {p} is still led by the stopped broker"
        );
        assert!(*l >= 0, "partition {p} has no leader");
        assert!(
            !isr.contains(&leader),
            "partition {p}'s ISR keeps the stopped broker"
        );
    }
    let producer: FutureProducer = cluster
        .config()
        .set("acks", "all")
        .set("message.timeout.ms", "20000")
        .create()
        .unwrap();
    let values: Vec<String> = (0..20).map(|i| format!("while-down-{i}")).collect();
    assert_eq!(rt.block_on(produce_all(&producer, topic, &values)), values);

    // It restarts, catches up, rejoins the ISR (AlterPartition through the controller)
    // and gets its preferred leadership back (leader.imbalance.check.interval.seconds=1).
    cluster.restart(leader);
    wait_for(
        "the preferred leader back with a full ISR",
        OP_TIMEOUT,
        || {
            metadata(&other, Some(topic))
                .and_then(|s| s.partitions.get(&0).cloned())
                .filter(|(l, _, isr)| *l == leader && isr.len() == 3)
        },
    );
    let got = consume(&cluster.bootstrap(), topic, values.len());
    assert_eq!(got, values);
}
