//! The cluster (issue 8): three real `ferrite server` processes in combined mode on
//! 127.0.0.1 (ports picked by binding :0), a metadata quorum of three voters, brokers that
//! register and heartbeat with short sessions, and rdkafka clients. Every wait has a
//! timeout; processes are killed by PID.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::{wait_for, OP_TIMEOUT};

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
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::TopicPartitionList;

const START_TIMEOUT: Duration = Duration::from_secs(60);
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

/// A port for a node that may be killed and restarted on it (the voters list names it).
/// Taken below the kernel's ephemeral range (`ip_local_port_range`): a port from that
/// range, free while its node was down, could be taken by any outgoing connection or
/// port-0 bind of the tests running beside, and the restart failed with "Address already
/// in use". Distinct within this test process (a counter from a per-run base); one that
/// does not bind is skipped.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    static BASE: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    assert!(
        ephemeral_low > LOWEST + 2_000,
        "ip_local_port_range starts at {ephemeral_low}: no room for fixed test ports"
    );
    let span = ephemeral_low - LOWEST;
    let base = *BASE.get_or_init(|| {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
            ^ std::process::id();
        seed % span
    });
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOWEST + (base + n) % span;
        let port = u16::try_from(port).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOWEST}..{ephemeral_low}");
}

impl Cluster {
    /// Starts three combined nodes and waits for all three ready lines.
    fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    /// [`Cluster::start`] with more `--set` configs on every node.
    fn start_with(extra: &[&str]) -> Cluster {
        Cluster::start_opts(extra, false)
    }

    /// [`Cluster::start_with`], each node in its own rack `rack-<id>` if `racks`.
    fn start_opts(extra: &[&str], racks: bool) -> Cluster {
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
            if racks {
                args.extend(["--rack".to_string(), format!("rack-{id}")]);
            }
            for s in [
                format!("broker.session.timeout.ms={SESSION_MS}"),
                "broker.heartbeat.interval.ms=500".to_string(),
                "offsets.topic.num.partitions=3".to_string(),
                "leader.imbalance.check.interval.seconds=1".to_string(),
            ]
            .into_iter()
            .chain(extra.iter().map(|s| s.to_string()))
            {
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

    /// Starts a broker-only node (`--process-roles broker`, no controller listener of
    /// its own in the voters) with node 1's settings, and waits for its ready line.
    fn add_broker_only(&mut self, id: i32) {
        let template = &self.nodes[0];
        let data_dir = template.data_dir.with_file_name(format!("node-{id}"));
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args: Vec<String> = Vec::new();
        let mut it = template.args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--node-id" | "--listen" | "--data-dir" | "--controller-listen" => {
                    it.next();
                }
                _ => args.push(a.clone()),
            }
        }
        args.extend([
            "--node-id".to_string(),
            id.to_string(),
            "--listen".to_string(),
            addr.clone(),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
            "--process-roles".to_string(),
            "broker".to_string(),
        ]);
        self.nodes.push(Node {
            id,
            addr,
            data_dir,
            args,
            child: None,
        });
        let node = self.nodes.last_mut().unwrap();
        let rx = spawn(node);
        wait_ready(&rx, node);
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

    /// SIGSTOP (`true`) or SIGCONT (`false`) by PID.
    fn pause(&self, id: i32, stop: bool) {
        let node = self.nodes.iter().find(|n| n.id == id).unwrap();
        let pid = node.child.as_ref().unwrap().id();
        let signal = if stop { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
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

/// Every value of partition 0, from offset 0 to its high watermark at the call.
fn consume_to_end(bootstrap: &str, topic: &str) -> Vec<String> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "3")
        .set("group.id", "cluster-test-reader")
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap();
    let (_, high) = c.fetch_watermarks(topic, 0, OP_TIMEOUT).unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut got = Vec::new();
    let mut next = 0;
    let deadline = Instant::now() + OP_TIMEOUT;
    while next < high {
        assert!(Instant::now() < deadline, "read {next} of {high} offsets");
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            got.push(String::from_utf8(m.payload().unwrap().to_vec()).unwrap());
            next = m.offset() + 1;
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
    // One cluster, one cluster id: every node answers the same one (librdkafka warns
    // of "different ClusterId" otherwise), and each data directory was written with it.
    let ids: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| {
            let d = wait_for("cluster describe", OP_TIMEOUT, || cluster_describe(&n.addr));
            d["cluster_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(
        ids.iter().all(|id| *id == ids[0] && id.len() == 22),
        "{ids:?}"
    );
    for n in &cluster.nodes {
        let meta = std::fs::read_to_string(n.data_dir.join("meta.properties")).unwrap();
        assert!(
            meta.lines().any(|l| l == format!("cluster.id={}", ids[0])),
            "node {}: {meta}",
            n.id
        );
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

    // The first controller comes back: it starts believing it still leads its old term
    // (its stored vote) and must join the current one, not fail its start; with it the
    // two live nodes are a majority again and commit.
    cluster.restart(controller);
    let admin: AdminClient<DefaultClientContext> = cluster.config().create().unwrap();
    wait_for(
        "a topic committed after the old controller rejoined",
        OP_TIMEOUT,
        || {
            rt.block_on(create_topic(
                &admin,
                "after-rejoin",
                1,
                1,
                &[],
                Duration::from_secs(5),
            ))
            .ok()
        },
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

const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// The harness's `offsets.topic.num.partitions`.
const OFFSETS_PARTITIONS: i32 = 3;

/// Kafka's `Utils.abs(group.hashCode()) % partitions`: Java's `String.hashCode` over
/// UTF-16 units with i32 wrapping, and `abs(i32::MIN) == 0`. Computed here rather than
/// taken from the broker, so the test checks the broker's placement too.
fn group_partition(group: &str, partitions: i32) -> i32 {
    let mut h: i32 = 0;
    for unit in group.encode_utf16() {
        h = h.wrapping_mul(31).wrapping_add(i32::from(unit));
    }
    let abs = if h == i32::MIN { 0 } else { h.abs() };
    abs % partitions
}

/// A consumer of `group` that commits only what it is told to, bootstrapped from the
/// nodes running now.
fn group_consumer(cluster: &Cluster, group: &str) -> BaseConsumer {
    cluster
        .config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap()
}

/// Errors a commit or an offset fetch may meet while a coordinator moves or loads.
fn retriable(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::CoordinatorLoadInProgress
                | C::CoordinatorNotAvailable
                | C::NotCoordinator
                | C::RequestTimedOut
                | C::OperationTimedOut
                | C::TimedOutQueue
                | C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::NetworkException
                | C::LeaderNotAvailable
                | C::NotLeaderForPartition
                | C::UnknownTopicOrPartition
        )
    )
}

/// Commits `offsets[p]` for partition `p` of `topic` synchronously, retrying retriable
/// errors for at most `timeout`.
fn commit_offsets(c: &BaseConsumer, topic: &str, offsets: &[i64], timeout: Duration) {
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets.iter().enumerate() {
        tpl.add_partition_offset(topic, p as i32, rdkafka::Offset::Offset(*o))
            .unwrap();
    }
    let started = Instant::now();
    let deadline = started + timeout;
    let mut attempts = 0;
    loop {
        attempts += 1;
        match c.commit(&tpl, rdkafka::consumer::CommitMode::Sync) {
            Ok(()) => {
                eprintln!(
                    "committed {offsets:?} after {attempts} attempt(s), {:?}",
                    started.elapsed()
                );
                return;
            }
            Err(e) if retriable(&e) && Instant::now() < deadline => {
                eprintln!("commit of {offsets:?}: retriable {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!(
                "commit of {offsets:?} failed after {attempts} attempt(s), {:?}: {e}",
                started.elapsed()
            ),
        }
    }
}

/// The committed offsets of partitions `0..n` of `topic` as one OffsetFetch answers
/// them (`None` for no committed offset: Invalid, -1), or the error.
fn fetch_committed(c: &BaseConsumer, topic: &str, n: i32) -> Result<Vec<Option<i64>>, String> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..n {
        tpl.add_partition(topic, p);
    }
    let got = c
        .committed_offsets(tpl, Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    (0..n)
        .map(|p| {
            let e = got
                .find_partition(topic, p)
                .ok_or_else(|| format!("partition {p} missing from the answer"))?;
            e.error().map_err(|e| format!("partition {p}: {e}"))?;
            Ok(match e.offset() {
                rdkafka::Offset::Offset(o) => Some(o),
                _ => None,
            })
        })
        .collect()
}

/// Asks the group's coordinator (through a new consumer bootstrapped from the live
/// nodes) for the committed offsets until every partition has one, for at most
/// `timeout`; then asserts they are `expected`. A coordinator that keeps answering "no
/// committed offset" fails the test with what it answered.
fn assert_committed(
    cluster: &Cluster,
    group: &str,
    topic: &str,
    expected: &[i64],
    timeout: Duration,
    who: &str,
) {
    let c = group_consumer(cluster, group);
    let started = Instant::now();
    let deadline = started + timeout;
    // Each distinct answer once, with when it was first seen.
    let mut seen: Vec<(Duration, String)> = Vec::new();
    let mut rounds = 0;
    loop {
        rounds += 1;
        let r = fetch_committed(&c, topic, expected.len() as i32);
        let answer = format!("{r:?}");
        if seen.last().is_none_or(|(_, a)| *a != answer) {
            eprintln!(
                "{who}: committed offsets {answer} at {:?}",
                started.elapsed()
            );
            seen.push((started.elapsed(), answer));
        }
        if let Ok(got) = &r {
            if got.iter().all(Option::is_some) {
                let got: Vec<i64> = got.iter().flatten().copied().collect();
                assert_eq!(
                    got, expected,
                    "{who} answered committed offsets {got:?}, expected {expected:?}"
                );
                eprintln!("{who}: {got:?} after {:?}", started.elapsed());
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{who} did not answer the committed offsets {expected:?} within {timeout:?} \
             ({rounds} OffsetFetch rounds); its answers (None = no committed offset, \
             Invalid/-1), each from when first seen: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The leader of `partition` of `topic` as some live node answers, once that leader is
/// live, not in `not`, and (with `full_isr`) the ISR holds all three nodes.
fn live_leader(
    cluster: &Cluster,
    topic: &str,
    partition: i32,
    not: &[i32],
    full_isr: bool,
    what: &str,
) -> (i32, Vec<i32>) {
    let live: Vec<(i32, String)> = cluster
        .live()
        .iter()
        .map(|n| (n.id, n.addr.clone()))
        .collect();
    wait_for(what, OP_TIMEOUT, || {
        live.iter().find_map(|(_, addr)| {
            metadata(addr, Some(topic))
                .and_then(|s| s.partitions.get(&partition).cloned())
                .filter(|(l, _, isr)| {
                    live.iter().any(|(id, _)| id == l)
                        && !not.contains(l)
                        && (!full_isr || isr.len() == 3)
                })
                .map(|(l, _, isr)| (l, isr))
        })
    })
}

/// The sizes of every node's copy of `__consumer_offsets-partition` (for the log: was the
/// commit replicated before the kill?).
fn offsets_replica_sizes(cluster: &Cluster, partition: i32) -> Vec<(i32, u64)> {
    cluster
        .nodes
        .iter()
        .map(|n| {
            let dir = n.data_dir.join(format!("{OFFSETS_TOPIC}-{partition}"));
            let size = std::fs::read_dir(&dir)
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                        .filter_map(|e| e.metadata().ok())
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0);
            (n.id, size)
        })
        .collect()
}

#[test]
fn committed_offsets_survive_a_coordinator_kill() {
    // Java's hash, checked on known values: "a" is 97, "polygenelubricants" is i32::MIN.
    assert_eq!(group_partition("a", 1000), 97);
    assert_eq!(group_partition("polygenelubricants", 7), 0);

    let t0 = Instant::now();
    let mut cluster = Cluster::start();
    let rt = runtime();
    let group = "failover-group";
    let topic = "offsets-failover";
    let first_addr = cluster.nodes[0].addr.clone();

    // 1. `__consumer_offsets` exists with 3 partitions of 3 replicas, ISRs full.
    wait_for(
        "__consumer_offsets with 3 full partitions",
        OP_TIMEOUT,
        || {
            metadata(&first_addr, Some(OFFSETS_TOPIC)).filter(|s| {
                s.partitions.len() == OFFSETS_PARTITIONS as usize
                    && s.partitions
                        .values()
                        .all(|(l, r, isr)| *l >= 0 && r.len() == 3 && isr.len() == 3)
            })
        },
    );
    let admin: AdminClient<DefaultClientContext> = cluster.config().create().unwrap();
    rt.block_on(create_topic(&admin, topic, 2, 3, &[], OP_TIMEOUT))
        .unwrap();
    wait_for("offsets-failover with full ISRs", OP_TIMEOUT, || {
        metadata(&first_addr, Some(topic)).filter(|s| {
            s.partitions.len() == 2
                && s.partitions
                    .values()
                    .all(|(l, _, isr)| *l >= 0 && isr.len() == 3)
        })
    });
    eprintln!("cluster up, topics ready after {:?}", t0.elapsed());

    // 2. Commit 42 and 7, read them back.
    let c = group_consumer(&cluster, group);
    commit_offsets(&c, topic, &[42, 7], OP_TIMEOUT);
    assert_eq!(
        fetch_committed(&c, topic, 2),
        Ok(vec![Some(42), Some(7)]),
        "read-back from the first coordinator"
    );
    drop(c);

    // 3. kill -9 the coordinator: the leader of the group's partition.
    let partition = group_partition(group, OFFSETS_PARTITIONS);
    let (first, _) = live_leader(
        &cluster,
        OFFSETS_TOPIC,
        partition,
        &[],
        true,
        "the coordinator",
    );
    eprintln!(
        "group {group} is in {OFFSETS_TOPIC}-{partition}; coordinator 1 is node {first}; \
         replica log sizes before the kill {:?}",
        offsets_replica_sizes(&cluster, partition)
    );
    cluster.kill9(first);
    let killed_at = Instant::now();

    // 4. A new leader of that partition.
    let (second, isr) = live_leader(
        &cluster,
        OFFSETS_TOPIC,
        partition,
        &[first],
        false,
        "a new leader of the group's __consumer_offsets partition",
    );
    eprintln!(
        "coordinator 2 is node {second} (ISR {isr:?}), {:?} after the kill",
        killed_at.elapsed()
    );

    // 5. The new coordinator answers the offsets committed through the old one.
    assert_committed(
        &cluster,
        group,
        topic,
        &[42, 7],
        OP_TIMEOUT,
        &format!("coordinator 2 (node {second}, after node {first} was killed)"),
    );
    eprintln!(
        "offsets survived the first kill, {:?} after it",
        killed_at.elapsed()
    );

    // 6. Commit through the new coordinator; the killed node comes back and catches up;
    // kill -9 the coordinator again, and the third one answers the new offsets.
    let c = group_consumer(&cluster, group);
    commit_offsets(&c, topic, &[43, 8], OP_TIMEOUT);
    assert_eq!(
        fetch_committed(&c, topic, 2),
        Ok(vec![Some(43), Some(8)]),
        "read-back from coordinator 2 (node {second})"
    );
    drop(c);
    cluster.restart(first);
    let restarted_at = Instant::now();
    live_leader(
        &cluster,
        OFFSETS_TOPIC,
        partition,
        &[],
        true,
        "the group's __consumer_offsets partition with its ISR of 3 again",
    );
    // Preferred-leader elections run every second: let leadership settle (the same
    // leader with a full ISR for 3 s) before picking the coordinator to kill.
    let mut stable: Option<(i32, Instant)> = None;
    let current = wait_for("a settled coordinator", OP_TIMEOUT, || {
        let (l, _) = live_leader(&cluster, OFFSETS_TOPIC, partition, &[], true, "a leader");
        match stable {
            Some((s, since)) if s == l && since.elapsed() >= Duration::from_secs(3) => Some(l),
            Some((s, _)) if s == l => None,
            _ => {
                stable = Some((l, Instant::now()));
                None
            }
        }
    });
    eprintln!(
        "node {first} restarted; ISR full and node {current} leads {OFFSETS_TOPIC}-{partition} \
         {:?} after the restart; replica log sizes {:?}",
        restarted_at.elapsed(),
        offsets_replica_sizes(&cluster, partition)
    );
    // The settled coordinator answers the new offsets before it is killed: when
    // preferred-leader election gave the partition back to the restarted node, this is
    // the check that it caught up and reloaded on becoming leader (the coordinator after
    // the next kill may be node {second}, which holds them in memory).
    assert_committed(
        &cluster,
        group,
        topic,
        &[43, 8],
        OP_TIMEOUT,
        &format!("the settled coordinator (node {current}, restarted node {first})"),
    );
    cluster.kill9(current);
    let killed_at = Instant::now();
    let (third, isr) = live_leader(
        &cluster,
        OFFSETS_TOPIC,
        partition,
        &[current],
        false,
        "a third leader of the group's __consumer_offsets partition",
    );
    eprintln!(
        "coordinator 3 is node {third} (ISR {isr:?}), {:?} after killing node {current}",
        killed_at.elapsed()
    );
    assert_committed(
        &cluster,
        group,
        topic,
        &[43, 8],
        OP_TIMEOUT,
        &format!("coordinator 3 (node {third}, after node {current} was killed)"),
    );
    eprintln!(
        "coordinators {first} -> {second} -> {current} -> {third}; total {:?}",
        t0.elapsed()
    );
}

/// Reads `topic`'s partitions 0..partitions from the beginning with `isolation`, until
/// `count` records or the timeout; (partition, value) pairs.
fn consume_isolated(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    isolation: &str,
    count: usize,
) -> Vec<(i32, String)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "3")
        .set("group.id", format!("txn-reader-{isolation}"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + OP_TIMEOUT;
    while got.len() < count && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            got.push((
                m.partition(),
                String::from_utf8(m.payload().unwrap().to_vec()).unwrap(),
            ));
        }
    }
    // A little longer: nothing beyond `count` may arrive.
    let settle = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settle {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            got.push((
                m.partition(),
                String::from_utf8(m.payload().unwrap().to_vec()).unwrap(),
            ));
        }
    }
    got.sort();
    got
}

#[test]
fn transaction_markers_reach_partitions_led_by_other_brokers() {
    let cluster = Cluster::start();
    // Three replicas: markers go to each leader and reach followers only by
    // replication. One replica: the coordinator hosts at most one of the partitions, so
    // AddPartitionsToTxn must know the others from the cluster's metadata.
    for (topic, replicas) in [("txn-spread", 3), ("txn-spread-rf1", 1)] {
        transaction_over_three_leaders(&cluster, topic, replicas);
    }
}

fn transaction_over_three_leaders(cluster: &Cluster, topic: &str, replicas: i32) {
    let t0 = Instant::now();
    let rt = runtime();
    let first_addr = cluster.nodes[0].addr.clone();
    let admin: AdminClient<DefaultClientContext> = cluster.config().create().unwrap();
    rt.block_on(create_topic(&admin, topic, 3, replicas, &[], OP_TIMEOUT))
        .unwrap();
    // Preferred leaders rotate with placement: three partitions, three distinct leaders.
    let leaders = wait_for("txn-spread led by three brokers", OP_TIMEOUT, || {
        metadata(&first_addr, Some(topic)).and_then(|s| {
            let leaders: std::collections::BTreeSet<i32> =
                s.partitions.values().map(|(l, _, _)| *l).collect();
            let full = s.partitions.len() == 3
                && s.partitions
                    .values()
                    .all(|(l, _, isr)| *l >= 0 && isr.len() == replicas as usize);
            (full && leaders.len() == 3).then_some(leaders)
        })
    });
    eprintln!(
        "{topic}: ready, leaders {leaders:?}, after {:?}",
        t0.elapsed()
    );

    let producer: rdkafka::producer::BaseProducer = cluster
        .config()
        .set("transactional.id", format!("{topic}-producer"))
        .create()
        .unwrap();
    producer.init_transactions(OP_TIMEOUT).unwrap();
    eprintln!("{topic}: init_transactions done after {:?}", t0.elapsed());
    let send = |value: &str, partition: i32| {
        producer
            .send(
                rdkafka::producer::BaseRecord::<(), str>::to(topic)
                    .payload(value)
                    .partition(partition),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    };
    producer.begin_transaction().unwrap();
    for p in 0..3 {
        send(&format!("committed-{p}"), p);
    }
    producer.commit_transaction(OP_TIMEOUT).unwrap();
    producer.begin_transaction().unwrap();
    for p in 0..3 {
        send(&format!("aborted-{p}"), p);
    }
    producer.flush(OP_TIMEOUT).unwrap();
    producer.abort_transaction(OP_TIMEOUT).unwrap();
    eprintln!("{topic}: committed and aborted after {:?}", t0.elapsed());

    let committed: Vec<(i32, String)> = (0..3).map(|p| (p, format!("committed-{p}"))).collect();
    let got = consume_isolated(&cluster.bootstrap(), topic, 3, "read_committed", 3);
    assert_eq!(
        got, committed,
        "read_committed sees exactly the committed records"
    );
    let mut all = committed.clone();
    all.extend((0..3).map(|p| (p, format!("aborted-{p}"))));
    all.sort();
    let got = consume_isolated(&cluster.bootstrap(), topic, 3, "read_uncommitted", 6);
    assert_eq!(got, all, "read_uncommitted sees both transactions");
    eprintln!("{topic}: done after {:?}", t0.elapsed());
}

/// The transaction coordinator's records are acks=all (Kafka's): even with
/// min.insync.replicas=2 on its topic, a commit is not acknowledged while a replica of the
/// transactional id's `__transaction_state` partition is frozen, and it completes once
/// that replica runs again. The committed record is then read_committed, also after the
/// coordinator is killed. On a broker that wrote these records acks=1 the commit was
/// acknowledged at once.
#[test]
fn a_commit_is_acknowledged_only_once_its_records_reach_the_isr() {
    const TXN_STATE: &str = "__transaction_state";
    let t0 = Instant::now();
    let mut cluster = Cluster::start_with(&["min.insync.replicas=3"]);
    let rt = runtime();
    let topic = "txn-isr";
    let tid = "txn-isr-producer";
    let first_addr = cluster.nodes[0].addr.clone();
    let admin: AdminClient<DefaultClientContext> = cluster.config().create().unwrap();
    rt.block_on(create_topic(&admin, topic, 1, 3, &[], OP_TIMEOUT))
        .unwrap();
    let producer: rdkafka::producer::BaseProducer = cluster
        .config()
        .set("transactional.id", tid)
        .create()
        .unwrap();
    wait_for("txn-isr with a full ISR", OP_TIMEOUT, || {
        metadata(&first_addr, Some(topic)).filter(|s| {
            s.partitions
                .values()
                .all(|(l, _, isr)| *l >= 0 && isr.len() == 3)
                && !s.partitions.is_empty()
        })
    });
    producer.init_transactions(OP_TIMEOUT).unwrap();
    // The coordinator's topic takes transaction.state.log.min.isr (2), not the
    // brokers' min.insync.replicas (3), as Kafka creates it.
    let described = rt
        .block_on(admin.describe_configs(
            [&rdkafka::admin::ResourceSpecifier::Topic(TXN_STATE)],
            &AdminOptions::new().operation_timeout(Some(OP_TIMEOUT)),
        ))
        .unwrap();
    let entries = described.into_iter().next().unwrap().unwrap().entries;
    let min_isr = entries
        .iter()
        .find(|e| e.name == "min.insync.replicas")
        .unwrap();
    assert_eq!(
        min_isr.value.as_deref(),
        Some("2"),
        "{TXN_STATE}'s min.insync.replicas"
    );
    assert!(
        matches!(min_isr.source, rdkafka::admin::ConfigSource::DynamicTopic),
        "{TXN_STATE}'s min.insync.replicas is a topic config: {:?}",
        min_isr.source
    );
    let partition = group_partition(tid, 50);
    let (coordinator, _) =
        live_leader(&cluster, TXN_STATE, partition, &[], true, "the coordinator");
    let frozen = cluster
        .nodes
        .iter()
        .map(|n| n.id)
        .find(|id| *id != coordinator)
        .unwrap();
    eprintln!(
        "{tid} is in {TXN_STATE}-{partition}, coordinator node {coordinator}; freezing node {frozen}; {:?}",
        t0.elapsed()
    );
    producer.begin_transaction().unwrap();
    producer
        .send(
            rdkafka::producer::BaseRecord::<(), str>::to(topic)
                .payload("committed")
                .partition(0),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(OP_TIMEOUT).unwrap();

    cluster.pause(frozen, true);
    let committed = std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        let p = &producer;
        scope.spawn(move || {
            let _ = tx.send(p.commit_transaction(OP_TIMEOUT));
        });
        // Less than the brokers' session: the frozen node is still in the ISR.
        let early = rx.recv_timeout(Duration::from_millis(1200));
        cluster.pause(frozen, false);
        assert!(
            early.is_err(),
            "the commit was acknowledged while node {frozen}, in the ISR of {TXN_STATE}-{partition}, was frozen: {early:?}"
        );
        rx.recv_timeout(OP_TIMEOUT + Duration::from_secs(5))
            .expect("commit_transaction returned")
    });
    committed.expect("the commit completes once the frozen node runs again");
    eprintln!("committed after the thaw, {:?}", t0.elapsed());
    let want = vec![(0, "committed".to_string())];
    assert_eq!(
        consume_isolated(&cluster.bootstrap(), topic, 1, "read_committed", 1),
        want,
        "read_committed sees the committed record"
    );
    drop(producer);
    cluster.kill9(coordinator);
    assert_eq!(
        consume_isolated(&cluster.bootstrap(), topic, 1, "read_committed", 1),
        want,
        "read_committed sees the committed record after the coordinator was killed"
    );
    eprintln!("done after {:?}", t0.elapsed());
}

/// Offsets committed in a transaction become the group's committed offsets only once
/// the COMMIT marker in the group's `__consumer_offsets` partition is replicated, as
/// Kafka applies them after the marker's acks=all append. The group's offsets partition
/// is placed on its leader and a frozen follower, the transactional id's
/// `__transaction_state` partition on the two other nodes: the commit's marker waits
/// for the frozen node (the commit itself is answered once PrepareCommit is replicated),
/// and meanwhile OffsetFetch answers the offset committed before.
/// On a broker that applied the offsets at the marker's append, OffsetFetch answered the
/// new offset while the marker could still be lost to a failover; on one that verified
/// TxnOffsetCommit and transactional batches against its own coordinator only, both were
/// refused (NOT_COORDINATOR) by a broker not hosting the id's partition.
#[test]
fn transactional_offsets_count_only_once_their_marker_is_replicated() {
    const TXN_STATE: &str = "__transaction_state";
    let t0 = Instant::now();
    // Two replicas for the internal topics; sessions long enough that the frozen node
    // stays in the ISR while the test looks.
    let cluster = Cluster::start_with(&[
        "offsets.topic.replication.factor=2",
        "transaction.state.log.replication.factor=2",
        "broker.session.timeout.ms=20000",
    ]);
    let rt = runtime();
    let topic = "txo-in";
    let admin: AdminClient<DefaultClientContext> = cluster.config().create().unwrap();
    rt.block_on(create_topic(&admin, topic, 1, 3, &[], OP_TIMEOUT))
        .unwrap();
    // Creates __transaction_state.
    let probe: rdkafka::producer::BaseProducer = cluster
        .config()
        .set("transactional.id", "txo-probe")
        .create()
        .unwrap();
    probe.init_transactions(OP_TIMEOUT).unwrap();
    drop(probe);
    let controller = active_controller(&cluster);
    let first_addr = cluster.nodes[0].addr.clone();
    // A group whose offsets partition has both replicas in sync and a follower that is
    // not the active controller (freezing that would move the quorum too), and a
    // transactional id whose partition has neither that follower nor any other
    // out-of-sync replica.
    let (group, leader, frozen, tid) = wait_for("a placement to freeze", OP_TIMEOUT, || {
        let offsets = metadata(&first_addr, Some(OFFSETS_TOPIC))?;
        let txns = metadata(&first_addr, Some(TXN_STATE))?;
        if offsets.partitions.len() != OFFSETS_PARTITIONS as usize || txns.partitions.len() != 50 {
            return None;
        }
        (0..100).find_map(|i| {
            let group = format!("txo-group-{i}");
            let (l, replicas, isr) = offsets
                .partitions
                .get(&group_partition(&group, OFFSETS_PARTITIONS))?
                .clone();
            let f = *replicas.iter().find(|r| **r != l)?;
            if l < 0 || isr.len() != 2 || f == controller {
                return None;
            }
            let tid = (0..1000).map(|j| format!("txo-{i}-{j}")).find(|tid| {
                txns.partitions
                    .get(&group_partition(tid, 50))
                    .is_some_and(|(tl, r, isr)| *tl >= 0 && !r.contains(&f) && isr.len() == r.len())
            })?;
            Some((group, l, f, tid))
        })
    });
    let offsets_partition = group_partition(&group, OFFSETS_PARTITIONS);
    eprintln!(
        "{group} in {OFFSETS_TOPIC}-{offsets_partition} led by node {leader}, follower {frozen}; {tid} elsewhere; {:?}",
        t0.elapsed()
    );
    let not_frozen = cluster
        .nodes
        .iter()
        .filter(|n| n.id != frozen)
        .map(|n| n.addr.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let leader_addr = cluster
        .nodes
        .iter()
        .find(|n| n.id == leader)
        .unwrap()
        .addr
        .clone();
    let producer: rdkafka::producer::BaseProducer = cluster
        .config()
        .set("bootstrap.servers", &not_frozen)
        .set("transactional.id", &tid)
        .create()
        .unwrap();
    // Asks the group's coordinator only; read_uncommitted, so OffsetFetch does not ask
    // for stable offsets (librdkafka would wait out UNSTABLE_OFFSET_COMMIT).
    let fetcher: BaseConsumer = cluster
        .config()
        .set("bootstrap.servers", &leader_addr)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_uncommitted")
        .create()
        .unwrap();
    let group_metadata = fetcher.group_metadata().unwrap();
    let offsets = |o: i64| {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, rdkafka::Offset::Offset(o))
            .unwrap();
        tpl
    };
    // An output partition on the node that does not host the id's
    // `__transaction_state` partition: its leader takes the transactional batch
    // (the coordinator is elsewhere), as it takes the group's TxnOffsetCommit.
    let out = "txo-out";
    let assignment: &[&[i32]] = &[&[frozen]];
    let opts = AdminOptions::new().operation_timeout(Some(OP_TIMEOUT));
    let created = rt
        .block_on(admin.create_topics(
            [&NewTopic::new(
                out,
                1,
                TopicReplication::Variable(assignment),
            )],
            &opts,
        ))
        .unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    wait_for("txo-out led by its one replica", OP_TIMEOUT, || {
        metadata(&first_addr, Some(out))
            .filter(|s| s.partitions.get(&0).is_some_and(|p| p.0 == frozen))
    });
    producer.init_transactions(OP_TIMEOUT).unwrap();
    producer.begin_transaction().unwrap();
    producer
        .send(
            rdkafka::producer::BaseRecord::<(), str>::to(out)
                .payload("processed")
                .partition(0),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(OP_TIMEOUT).unwrap();
    producer
        .send_offsets_to_transaction(&offsets(5), &group_metadata, OP_TIMEOUT)
        .unwrap();
    producer.commit_transaction(OP_TIMEOUT).unwrap();
    assert_eq!(
        consume_isolated(&cluster.bootstrap(), out, 1, "read_committed", 1),
        vec![(0, "processed".to_string())],
        "the committed output on a broker that is not the coordinator's replica"
    );
    let committed = |want: i64| {
        wait_for(&format!("committed offset {want}"), OP_TIMEOUT, || {
            (fetch_committed(&fetcher, topic, 1).ok()? == vec![Some(want)]).then_some(())
        })
    };
    committed(5);

    producer.begin_transaction().unwrap();
    producer
        .send_offsets_to_transaction(&offsets(9), &group_metadata, OP_TIMEOUT)
        .unwrap();
    cluster.pause(frozen, true);
    // EndTxn answers once PrepareCommit is replicated (on the two other nodes); the
    // COMMIT marker is then appended to the group's partition, where it waits for the
    // frozen follower.
    producer.commit_transaction(OP_TIMEOUT).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(fetch_committed(&fetcher, topic, 1));
        std::thread::sleep(Duration::from_millis(300));
    }
    let sizes = offsets_replica_sizes(&cluster, offsets_partition);
    cluster.pause(frozen, false);
    eprintln!(
        "while node {frozen} was frozen: OffsetFetch {answers:?}, replica sizes {sizes:?}; {:?}",
        t0.elapsed()
    );
    for a in &answers {
        assert_eq!(
            a.as_ref().ok(),
            Some(&vec![Some(5)]),
            "OffsetFetch while the COMMIT marker in {OFFSETS_TOPIC}-{offsets_partition} was not replicated (node {frozen} frozen): {answers:?}"
        );
    }
    // Once the follower has the marker, the transaction's offset is the committed one.
    committed(9);
    // An aborted transaction's offsets never count, also once its marker is replicated.
    producer.begin_transaction().unwrap();
    producer
        .send_offsets_to_transaction(&offsets(12), &group_metadata, OP_TIMEOUT)
        .unwrap();
    producer.abort_transaction(OP_TIMEOUT).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        fetch_committed(&fetcher, topic, 1),
        Ok(vec![Some(9)]),
        "after an aborted transaction"
    );
    eprintln!("done after {:?}", t0.elapsed());
}

/// One transactional batch of one record, for [`transactional_writes_are_verified_with_a_coordinator_on_another_broker`].
fn transactional_batch(producer_id: i64, producer_epoch: i16, sequence: i32) -> bytes::Bytes {
    use ferrite_protocol::kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };
    let record = Record {
        transactional: true,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id,
        producer_epoch,
        timestamp_type: TimestampType::Creation,
        offset: 0,
        sequence,
        timestamp: 0,
        key: None,
        value: Some(bytes::Bytes::from(format!("seq-{sequence}"))),
        headers: Default::default(),
    };
    let mut buf = bytes::BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        [record].iter(),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .unwrap();
    buf.freeze()
}

/// KIP-890 part 1 across brokers. A transactional batch, and a TxnOffsetCommit, is
/// accepted only for a partition the producer's transaction holds, also when the
/// transaction's coordinator is another broker (the partition leader asks it with
/// AddPartitionsToTxn v4 verify-only) and not only when it is the leader itself. A batch
/// that arrives after the commit (KAFKA-17754's late batch) is refused instead of opening
/// a transaction that no marker would close, so the partition's last stable offset is
/// not held back. Before, a write whose coordinator was elsewhere was taken unverified.
#[test]
fn transactional_writes_are_verified_with_a_coordinator_on_another_broker() {
    use ferrite_protocol::kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
    use ferrite_protocol::kafka_protocol::messages::list_offsets_request::{
        ListOffsetsPartition, ListOffsetsTopic,
    };
    use ferrite_protocol::kafka_protocol::messages::produce_request::{
        PartitionProduceData, TopicProduceData,
    };
    use ferrite_protocol::kafka_protocol::messages::txn_offset_commit_request::{
        TxnOffsetCommitRequestPartition, TxnOffsetCommitRequestTopic,
    };
    use ferrite_protocol::kafka_protocol::messages::*;
    use ferrite_protocol::kafka_protocol::protocol::StrBytes;
    const TOPIC: &str = "verified";
    const TID: &str = "verify-txn";
    const INVALID_TXN_STATE: i16 = 48;
    let cluster = Cluster::start();
    let rt = runtime();
    let admin: AdminClient<DefaultClientContext> = cluster.config().create().unwrap();
    rt.block_on(create_topic(&admin, TOPIC, 3, 3, &[], OP_TIMEOUT))
        .unwrap();
    let first = cluster.nodes[0].addr.clone();
    let leaders: BTreeMap<i32, i32> = wait_for("three leaders, full ISRs", OP_TIMEOUT, || {
        let s = metadata(&first, Some(TOPIC))?;
        let leaders: BTreeMap<i32, i32> =
            s.partitions.iter().map(|(p, (l, _, _))| (*p, *l)).collect();
        let distinct: std::collections::BTreeSet<i32> = leaders.values().copied().collect();
        let full = s.partitions.len() == 3
            && s.partitions
                .values()
                .all(|(l, _, isr)| *l >= 0 && isr.len() == 3);
        (full && distinct.len() == 3).then_some(leaders)
    });
    let addr_of = |id: i32| {
        cluster
            .nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap()
            .addr
            .clone()
    };
    let str_bytes = |s: &str| StrBytes::from_string(s.to_string());
    let find_coordinator = |key: &str, key_type: i8| -> i32 {
        wait_for("FindCoordinator", OP_TIMEOUT, || {
            let r: FindCoordinatorResponse = common::raw(
                &first,
                ApiKey::FindCoordinator,
                3,
                &FindCoordinatorRequest::default()
                    .with_key(str_bytes(key))
                    .with_key_type(key_type),
            );
            (r.error_code == 0).then_some(r.node_id.0)
        })
    };
    let coordinator = find_coordinator(TID, 1);
    let coordinator_addr = addr_of(coordinator);
    let remote = *leaders.iter().find(|(_, l)| **l != coordinator).unwrap().0;
    let local = *leaders.iter().find(|(_, l)| **l == coordinator).unwrap().0;
    eprintln!(
        "coordinator {coordinator}, leaders {leaders:?}: partition {remote} remote, {local} local"
    );
    let init: InitProducerIdResponse = wait_for("InitProducerId", OP_TIMEOUT, || {
        let r: InitProducerIdResponse = common::raw(
            &coordinator_addr,
            ApiKey::InitProducerId,
            3,
            &InitProducerIdRequest::default()
                .with_transactional_id(Some(TransactionalId(str_bytes(TID))))
                .with_transaction_timeout_ms(60_000)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
        );
        (r.error_code == 0).then_some(r)
    });
    let (pid, epoch) = (init.producer_id.0, init.producer_epoch);
    let produce = |partition: i32, sequence: i32| -> i16 {
        let req = ProduceRequest::default()
            .with_transactional_id(Some(TransactionalId(str_bytes(TID))))
            .with_acks(-1)
            .with_timeout_ms(10_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(TopicName(str_bytes(TOPIC)))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(partition)
                    .with_records(Some(transactional_batch(pid, epoch, sequence)))])]);
        let r: ProduceResponse =
            common::raw(&addr_of(leaders[&partition]), ApiKey::Produce, 9, &req);
        r.responses[0].partition_responses[0].error_code
    };
    let end_txn = |commit: bool| {
        let r: EndTxnResponse = common::raw(
            &coordinator_addr,
            ApiKey::EndTxn,
            3,
            &EndTxnRequest::default()
                .with_transactional_id(TransactionalId(str_bytes(TID)))
                .with_producer_id(ProducerId(pid))
                .with_producer_epoch(epoch)
                .with_committed(commit),
        );
        assert_eq!(r.error_code, 0, "EndTxn");
    };
    let completed = |state: &str| {
        wait_for(state, OP_TIMEOUT, || {
            let r: DescribeTransactionsResponse = common::raw(
                &coordinator_addr,
                ApiKey::DescribeTransactions,
                0,
                &DescribeTransactionsRequest::default()
                    .with_transactional_ids(vec![TransactionalId(str_bytes(TID))]),
            );
            (&*r.transaction_states[0].transaction_state == state).then_some(())
        })
    };

    // Not added: refused at both leaders, the coordinator's own and the other.
    assert_eq!(
        produce(remote, 0),
        INVALID_TXN_STATE,
        "unadded partition, coordinator elsewhere"
    );
    assert_eq!(
        produce(local, 0),
        INVALID_TXN_STATE,
        "unadded partition, coordinator here"
    );
    let added: AddPartitionsToTxnResponse = common::raw(
        &coordinator_addr,
        ApiKey::AddPartitionsToTxn,
        3,
        &AddPartitionsToTxnRequest::default()
            .with_v3_and_below_transactional_id(TransactionalId(str_bytes(TID)))
            .with_v3_and_below_producer_id(ProducerId(pid))
            .with_v3_and_below_producer_epoch(epoch)
            .with_v3_and_below_topics(vec![AddPartitionsToTxnTopic::default()
                .with_name(TopicName(str_bytes(TOPIC)))
                .with_partitions(vec![remote, local])]),
    );
    for p in &added.results_by_topic_v3_and_below[0].results_by_partition {
        assert_eq!(p.partition_error_code, 0, "AddPartitionsToTxn");
    }
    // Added: accepted, the first batch verified, the next one inside the open transaction.
    assert_eq!(
        produce(remote, 0),
        0,
        "added partition, coordinator elsewhere"
    );
    assert_eq!(produce(local, 0), 0, "added partition, coordinator here");
    assert_eq!(produce(remote, 1), 0, "second batch of the transaction");
    end_txn(true);
    completed("CompleteCommit");
    // The late batch after the commit: refused, no transaction opened.
    assert_eq!(
        produce(remote, 2),
        INVALID_TXN_STATE,
        "late batch, coordinator elsewhere"
    );
    assert_eq!(
        produce(local, 1),
        INVALID_TXN_STATE,
        "late batch, coordinator here"
    );
    let remote_addr = addr_of(leaders[&remote]);
    let latest = |isolation: i8| -> i64 {
        let r: ListOffsetsResponse = common::raw(
            &remote_addr,
            ApiKey::ListOffsets,
            5,
            &ListOffsetsRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_isolation_level(isolation)
                .with_topics(vec![ListOffsetsTopic::default()
                    .with_name(TopicName(str_bytes(TOPIC)))
                    .with_partitions(vec![ListOffsetsPartition::default()
                        .with_partition_index(remote)
                        .with_timestamp(-1)])]),
        );
        r.topics[0].partitions[0].offset
    };
    // Two batches and the COMMIT marker; nothing open, so read_committed reaches the end.
    wait_for(
        "last stable offset at the end of the partition",
        OP_TIMEOUT,
        || (latest(1) == 3 && latest(0) == 3).then_some(()),
    );

    // TxnOffsetCommit at a group coordinator that is not the transaction's coordinator.
    let group = (0..64)
        .map(|i| format!("verify-group-{i}"))
        .find(|g| find_coordinator(g, 0) != coordinator)
        .unwrap();
    let group_addr = addr_of(find_coordinator(&group, 0));
    let txn_offset_commit = || -> i16 {
        let r: TxnOffsetCommitResponse = common::raw(
            &group_addr,
            ApiKey::TxnOffsetCommit,
            3,
            &TxnOffsetCommitRequest::default()
                .with_transactional_id(TransactionalId(str_bytes(TID)))
                .with_group_id(GroupId(str_bytes(&group)))
                .with_producer_id(ProducerId(pid))
                .with_producer_epoch(epoch)
                .with_generation_id(-1)
                .with_member_id(str_bytes(""))
                .with_topics(vec![TxnOffsetCommitRequestTopic::default()
                    .with_name(TopicName(str_bytes(TOPIC)))
                    .with_partitions(vec![TxnOffsetCommitRequestPartition::default()
                        .with_partition_index(0)
                        .with_committed_offset(42)
                        .with_committed_leader_epoch(-1)])]),
        );
        r.topics[0].partitions[0].error_code
    };
    assert_eq!(
        txn_offset_commit(),
        INVALID_TXN_STATE,
        "offsets before AddOffsetsToTxn"
    );
    let r: AddOffsetsToTxnResponse = common::raw(
        &coordinator_addr,
        ApiKey::AddOffsetsToTxn,
        3,
        &AddOffsetsToTxnRequest::default()
            .with_transactional_id(TransactionalId(str_bytes(TID)))
            .with_producer_id(ProducerId(pid))
            .with_producer_epoch(epoch)
            .with_group_id(GroupId(str_bytes(&group))),
    );
    assert_eq!(r.error_code, 0, "AddOffsetsToTxn");
    assert_eq!(txn_offset_commit(), 0, "offsets after AddOffsetsToTxn");
    end_txn(true);
    completed("CompleteCommit");
    let consumer: BaseConsumer = cluster.config().set("group.id", &group).create().unwrap();
    wait_for("the transactional offset committed", OP_TIMEOUT, || {
        let got = fetch_committed(&consumer, TOPIC, 1).ok()?;
        (got == vec![Some(42)]).then_some(())
    });

    // AddPartitionsToTxn v4 as a partition leader sends it (the test runs on a
    // registered broker's address): verify-only answers per partition and writes
    // nothing; adding refuses partitions the cluster does not have.
    use ferrite_protocol::kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTransaction;
    let v4 = |verify_only: bool, topic: &str, partition: i32| -> i16 {
        let r: AddPartitionsToTxnResponse = common::raw(
            &coordinator_addr,
            ApiKey::AddPartitionsToTxn,
            4,
            &AddPartitionsToTxnRequest::default().with_transactions(vec![
                AddPartitionsToTxnTransaction::default()
                    .with_transactional_id(TransactionalId(str_bytes(TID)))
                    .with_producer_id(ProducerId(pid))
                    .with_producer_epoch(epoch)
                    .with_verify_only(verify_only)
                    .with_topics(vec![AddPartitionsToTxnTopic::default()
                        .with_name(TopicName(str_bytes(topic)))
                        .with_partitions(vec![partition])]),
            ]),
        );
        assert_eq!(
            r.error_code, 0,
            "AddPartitionsToTxn v4 from a broker's address"
        );
        r.results_by_transaction[0].topic_results[0].results_by_partition[0].partition_error_code
    };
    assert_eq!(
        v4(true, TOPIC, remote),
        INVALID_TXN_STATE,
        "not in the (ended) transaction"
    );
    assert_eq!(
        v4(false, "no-such-topic", 0),
        3,
        "UNKNOWN_TOPIC_OR_PARTITION"
    );
    assert_eq!(v4(false, TOPIC, remote), 0, "added by a broker");
    assert_eq!(v4(true, TOPIC, remote), 0, "now in the transaction");
    end_txn(false);
    completed("CompleteAbort");
}

/// A CreateTopics that is retried: a retry after an attempt that committed but timed
/// out finds the topic there.
fn created(r: Result<(), String>) -> Option<()> {
    match r {
        Ok(()) => Some(()),
        Err(e) if e.contains("already exists") || e.contains("TopicAlreadyExists") => Some(()),
        Err(_) => None,
    }
}

#[test]
fn a_broker_only_node_joins_the_running_quorum() {
    let mut cluster = Cluster::start();
    let rt = runtime();
    // A broker-only node may not take a voter's id: one clear refusal, nothing started.
    let mut voter_id = cluster.nodes[0].args.clone();
    let pos = voter_id.iter().position(|a| a == "--node-id").unwrap();
    voter_id[pos + 1] = "2".into();
    let pos = voter_id.iter().position(|a| a == "--data-dir").unwrap();
    voter_id[pos + 1] = cluster.nodes[0]
        .data_dir
        .with_file_name("refused")
        .display()
        .to_string();
    let pos = voter_id.iter().position(|a| a == "--listen").unwrap();
    voter_id[pos + 1] = format!("127.0.0.1:{}", free_port());
    let pos = voter_id
        .iter()
        .position(|a| a == "--controller-listen")
        .unwrap();
    voter_id.drain(pos..pos + 2);
    voter_id.extend(["--process-roles".to_string(), "broker".to_string()]);
    let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(&voter_id)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is in controller.quorum.voters"),
        "{stderr}"
    );

    cluster.add_broker_only(4);
    // Every node, the new one included, lists four brokers; the quorum describes it
    // as an observer and keeps three voters; it is never the controller.
    for n in &cluster.nodes {
        wait_for("4 brokers in Metadata", OP_TIMEOUT, || {
            metadata(&n.addr, None).filter(|s| s.brokers == vec![1, 2, 3, 4])
        });
    }
    let d = wait_for("the observer in cluster describe", OP_TIMEOUT, || {
        cluster_describe(&cluster.nodes[3].addr).filter(|d| {
            d["quorum"]["observers"]
                .as_array()
                .is_some_and(|o| o.iter().any(|o| o["id"] == 4))
        })
    });
    let voters: Vec<i64> = d["quorum"]["voters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_i64().unwrap())
        .collect();
    assert_eq!(voters, vec![1, 2, 3], "{d}");
    let ids: Vec<String> = [0, 3]
        .iter()
        .map(|i| {
            cluster_describe(&cluster.nodes[*i].addr).unwrap()["cluster_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids[0], ids[1], "one cluster id");

    // A topic over all four brokers, created through the new one: RF 4 is placed (it
    // counts as a broker) and its replica holds what the leader holds.
    let mut admin_config = cluster.config();
    admin_config.set("bootstrap.servers", &cluster.nodes[3].addr);
    let admin: AdminClient<DefaultClientContext> = admin_config.create().unwrap();
    let topic = "four-wide";
    rt.block_on(create_topic(&admin, topic, 1, 4, &[], OP_TIMEOUT))
        .unwrap();
    wait_for("an ISR of 4", OP_TIMEOUT, || {
        metadata(&cluster.nodes[3].addr, Some(topic))
            .and_then(|s| s.partitions.get(&0).cloned())
            .filter(|(l, _, isr)| *l >= 0 && isr.len() == 4)
    });
    let producer: FutureProducer = cluster
        .config()
        .set("acks", "all")
        .set("message.timeout.ms", "20000")
        .create()
        .unwrap();
    let values: Vec<String> = (0..20).map(|i| format!("v-{i}")).collect();
    assert_eq!(rt.block_on(produce_all(&producer, topic, &values)), values);
    let dirs: Vec<PathBuf> = cluster.nodes.iter().map(|n| n.data_dir.clone()).collect();
    wait_for("identical replica logs on all four", OP_TIMEOUT, || {
        let logs: Vec<Vec<u8>> = dirs.iter().map(|d| replica_bytes(d, topic)).collect();
        (!logs[0].is_empty() && logs.iter().all(|l| *l == logs[0])).then_some(())
    });

    // The active controller dies: the two voters left elect one (never the observer),
    // and a change made through the observer still commits.
    let controller = active_controller(&cluster);
    assert_ne!(controller, 4);
    cluster.kill9(controller);
    wait_for("a new controller", OP_TIMEOUT, || {
        controller_id_raw(&cluster.nodes[3].addr).filter(|c| *c != controller)
    });
    wait_for("CreateTopics through the observer", OP_TIMEOUT, || {
        created(rt.block_on(create_topic(
            &admin,
            "after-failover",
            1,
            2,
            &[],
            Duration::from_secs(5),
        )))
    });
    assert_ne!(active_controller(&cluster), 4);

    // Restarted, it rejoins (same node id, a new incarnation and quorum port) and
    // catches up on what it missed.
    cluster.kill9(4);
    let voters_admin: AdminClient<DefaultClientContext> = cluster.config().create().unwrap();
    wait_for(
        "CreateTopics while the observer is down",
        OP_TIMEOUT,
        || {
            created(rt.block_on(create_topic(
                &voters_admin,
                "while-observer-down",
                1,
                1,
                &[],
                Duration::from_secs(5),
            )))
        },
    );
    cluster.restart(4);
    let addr4 = cluster.nodes[3].addr.clone();
    wait_for(
        "the restarted observer sees the new topic",
        OP_TIMEOUT,
        || metadata(&addr4, Some("while-observer-down")).filter(|s| !s.partitions.is_empty()),
    );
    wait_for("the restarted broker back in the ISR", OP_TIMEOUT, || {
        metadata(&addr4, Some(topic))
            .and_then(|s| s.partitions.get(&0).cloned())
            .filter(|(_, _, isr)| isr.contains(&4))
    });
}

/// One partition's answer to a raw Fetch of partition 0 of `topic` from offset 0 as a
/// consumer (replica id -1) in `rack`.
fn fetch_as_consumer(
    addr: &str,
    topic: &str,
    version: i16,
    rack: &str,
) -> ferrite_protocol::kafka_protocol::messages::fetch_response::PartitionData {
    use ferrite_protocol::kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use ferrite_protocol::kafka_protocol::messages::{
        ApiKey, BrokerId, FetchRequest, FetchResponse, TopicName,
    };
    use ferrite_protocol::kafka_protocol::protocol::StrBytes;
    let req = FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(0)
        .with_min_bytes(0)
        .with_max_bytes(1 << 20)
        .with_session_epoch(-1)
        .with_rack_id(StrBytes::from_string(rack.to_string()))
        .with_topics(vec![FetchTopic::default()
            .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(0)
                .with_current_leader_epoch(-1)
                .with_fetch_offset(0)
                .with_last_fetched_epoch(-1)
                .with_log_start_offset(-1)
                .with_partition_max_bytes(1 << 20)])]);
    let resp: FetchResponse = common::raw(addr, ApiKey::Fetch, version, &req);
    assert_eq!(resp.error_code, 0);
    resp.responses[0].partitions[0].clone()
}

#[test]
fn consumers_read_from_an_in_sync_follower_in_their_rack() {
    let mut cluster = Cluster::start_opts(
        &["replica.selector.class=org.apache.kafka.common.replica.RackAwareReplicaSelector"],
        true,
    );
    let rt = runtime();
    let admin: AdminClient<DefaultClientContext> = cluster.config().create().unwrap();
    let topic = "near";
    rt.block_on(create_topic(&admin, topic, 1, 3, &[], OP_TIMEOUT))
        .unwrap();
    let (leader, replicas, _) = wait_for("an ISR of 3", OP_TIMEOUT, || {
        metadata(&cluster.nodes[0].addr, Some(topic))
            .and_then(|s| s.partitions.get(&0).cloned())
            .filter(|(l, _, isr)| *l >= 0 && isr.len() == 3)
    });
    let follower = *replicas.iter().find(|r| **r != leader).unwrap();
    let addrs: BTreeMap<i32, String> = cluster
        .nodes
        .iter()
        .map(|n| (n.id, n.addr.clone()))
        .collect();
    let addr_of = |id: i32| addrs[&id].clone();
    let producer: FutureProducer = cluster
        .config()
        .set("acks", "all")
        .set("message.timeout.ms", "20000")
        .create()
        .unwrap();
    let values: Vec<String> = (0..30).map(|i| format!("near-{i:02}")).collect();
    assert_eq!(rt.block_on(produce_all(&producer, topic, &values)), values);

    // The leader sends a consumer of the follower's rack there, with no records, and
    // keeps one of its own rack.
    let follower_rack = format!("rack-{follower}");
    let redirected = wait_for("a preferred read replica", OP_TIMEOUT, || {
        let p = fetch_as_consumer(&addr_of(leader), topic, 12, &follower_rack);
        (p.preferred_read_replica.0 >= 0).then_some(p)
    });
    assert_eq!(redirected.error_code, 0);
    assert_eq!(redirected.preferred_read_replica.0, follower);
    assert!(redirected.records.as_ref().is_none_or(|r| r.is_empty()));
    assert_eq!(redirected.high_watermark, 30);
    let own = fetch_as_consumer(&addr_of(leader), topic, 12, &format!("rack-{leader}"));
    assert_eq!(own.preferred_read_replica.0, -1);
    assert!(own.records.as_ref().is_some_and(|r| !r.is_empty()));
    // Without a rack, or before Fetch v11 (no client metadata), no redirection.
    assert_eq!(
        fetch_as_consumer(&addr_of(leader), topic, 12, "")
            .preferred_read_replica
            .0,
        -1
    );

    // The follower serves the consumer below its high watermark (v11+ only).
    let at_follower = wait_for("the follower's high watermark at 30", OP_TIMEOUT, || {
        let p = fetch_as_consumer(&addr_of(follower), topic, 12, &follower_rack);
        (p.error_code == 0 && p.high_watermark == 30).then_some(p)
    });
    assert!(at_follower.records.as_ref().is_some_and(|r| !r.is_empty()));
    assert_eq!(at_follower.preferred_read_replica.0, -1);
    let old = fetch_as_consumer(&addr_of(follower), topic, 10, &follower_rack);
    assert_eq!(
        old.error_code,
        ferrite_protocol::kafka_protocol::ResponseError::NotLeaderOrFollower.code()
    );

    // librdkafka with client.rack follows the redirection and reads everything.
    let c: BaseConsumer = cluster
        .config()
        .set("group.id", "near-reader")
        .set("client.rack", &follower_rack)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + OP_TIMEOUT;
    while got.len() < values.len() && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            got.push(String::from_utf8(m.payload().unwrap().to_vec()).unwrap());
        }
    }
    assert_eq!(got, values);

    // The follower stopped: it leaves the ISR, and the leader stops redirecting there.
    cluster.kill9(follower);
    wait_for(
        "no redirection to a replica out of the ISR",
        OP_TIMEOUT,
        || {
            let p = fetch_as_consumer(&addr_of(leader), topic, 12, &follower_rack);
            (p.preferred_read_replica.0 == -1).then_some(())
        },
    );
}

/// `ferrite topic reassign` with these arguments against `bootstrap`: exit status,
/// stdout, stderr.
fn topic_reassign(bootstrap: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(["topic", "reassign"])
        .args(args)
        .args(["--bootstrap-server", bootstrap])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Issue 9 item 6: a partition moves from one broker to the two others while an
/// acks=all producer keeps writing to it. The new replicas copy the log through the
/// replica fetchers, the move completes once they are in sync, leadership leaves the
/// removed broker, whose log is deleted; every acknowledged value is read exactly once
/// and the two new replicas hold the same bytes.
#[test]
fn a_reassignment_under_load_moves_the_partition_and_loses_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    // No automatic preferred-leader pass: the ElectLeaders at the end must be the one
    // that moves the leadership.
    let cluster = Cluster::start_with(&["auto.leader.rebalance.enable=false"]);
    let rt = runtime();
    let admin: AdminClient<DefaultClientContext> = cluster.config().create().unwrap();
    let topic = "moving";
    rt.block_on(create_topic(&admin, topic, 1, 1, &[], OP_TIMEOUT))
        .unwrap();
    let (from, replicas, _) = wait_for("the partition led", OP_TIMEOUT, || {
        metadata(&cluster.nodes[0].addr, Some(topic))
            .and_then(|s| s.partitions.get(&0).cloned())
            .filter(|(l, _, _)| *l >= 0)
    });
    assert_eq!(replicas, vec![from]);
    let to: Vec<i32> = [1, 2, 3].into_iter().filter(|&b| b != from).collect();
    let from_dir = cluster.nodes[(from - 1) as usize]
        .data_dir
        .join(format!("{topic}-0"));
    assert!(from_dir.is_dir());

    // No move yet: listing shows none, cancelling is NO_REASSIGNMENT_IN_PROGRESS.
    let bootstrap = cluster.bootstrap();
    let (ok, out, err) = topic_reassign(&bootstrap, &[topic, "--json"]);
    assert!(ok, "{out}{err}");
    let listed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(listed["in_progress"], serde_json::json!([]), "{out}");
    let (ok, out, err) = topic_reassign(&bootstrap, &[topic, "--partition", "0", "--cancel"]);
    assert!(!ok, "{out}");
    assert!(err.contains("NO_REASSIGNMENT_IN_PROGRESS"), "{err}");
    // An unregistered broker: INVALID_REPLICA_ASSIGNMENT, nothing changes.
    let (ok, _, err) = topic_reassign(&bootstrap, &[topic, "--replicas", "1,9"]);
    assert!(!ok);
    assert!(err.contains("INVALID_REPLICA_ASSIGNMENT"), "{err}");

    // A log to copy, then a producer that keeps writing during the move.
    let producer: FutureProducer = cluster
        .config()
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("message.timeout.ms", "30000")
        .create()
        .unwrap();
    let before: Vec<String> = (0..2000).map(|i| format!("before-{i:05}")).collect();
    let acked_before = rt.block_on(produce_all(&producer, topic, &before));
    assert_eq!(acked_before.len(), before.len());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let producer = producer.clone();
        std::thread::spawn(move || {
            let rt = runtime();
            let mut acked = Vec::new();
            let mut i = 0;
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let v = format!("during-{i:06}");
                i += 1;
                let sent = Instant::now();
                acked.extend(rt.block_on(produce_all(&producer, topic, &[v])));
                slowest = slowest.max(sent.elapsed());
            }
            (acked, i, slowest)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let target = format!("{},{}", to[0], to[1]);
    let (ok, out, err) = topic_reassign(
        &bootstrap,
        &[
            topic,
            "--partition",
            "0",
            "--replicas",
            &target,
            "--wait",
            "60",
        ],
    );
    assert!(ok, "reassign: {out}{err}");
    assert!(out.contains("no reassignment in progress"), "{out}");
    let (leader, replicas, isr) = wait_for("the partition on its new replicas", OP_TIMEOUT, || {
        metadata(&cluster.nodes[0].addr, Some(topic))
            .and_then(|s| s.partitions.get(&0).cloned())
            .filter(|(l, r, isr)| *l >= 0 && *r == to && isr.len() == 2)
    });
    assert!(to.contains(&leader), "leader {leader} not in {to:?}");
    eprintln!("moved from {from} to {replicas:?}: leader {leader}, ISR {isr:?}");
    wait_for("the removed replica's log deleted", OP_TIMEOUT, || {
        (!from_dir.exists()).then_some(())
    });
    // Producing goes on after the move, at the new leader.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (acked_during, sent_during, slowest) = writer.join().unwrap();
    // A produce waiting at the removed leader is answered when its replica goes
    // (NOT_LEADER_OR_FOLLOWER, retried at the new leader), not left to the client's
    // 30 s request timeout (it was, before).
    assert!(
        slowest < Duration::from_secs(15),
        "a produce during the move took {slowest:?}"
    );
    assert!(!acked_during.is_empty());
    let after: Vec<String> = (0..50).map(|i| format!("after-{i:03}")).collect();
    let acked_after = rt.block_on(produce_all(&producer, topic, &after));
    assert_eq!(acked_after, after, "the new leader takes acks=all writes");
    eprintln!(
        "during the move: {} of {sent_during} acknowledged, the slowest in {slowest:?}",
        acked_during.len()
    );

    let acked: Vec<&String> = acked_before
        .iter()
        .chain(&acked_during)
        .chain(&acked_after)
        .collect();
    let all = consume_to_end(&cluster.bootstrap(), topic);
    let mut seen = std::collections::HashMap::new();
    for v in &all {
        *seen.entry(v.as_str()).or_insert(0) += 1;
    }
    for v in &acked {
        assert_eq!(
            seen.get(v.as_str()),
            Some(&1),
            "acknowledged {v} read {:?} times",
            seen.get(v.as_str())
        );
    }
    let dirs: Vec<PathBuf> = to
        .iter()
        .map(|&b| cluster.nodes[(b - 1) as usize].data_dir.clone())
        .collect();
    wait_for("identical logs on the new replicas", OP_TIMEOUT, || {
        let logs: Vec<Vec<u8>> = dirs.iter().map(|d| replica_bytes(d, topic)).collect();
        (!logs[0].is_empty() && logs[0] == logs[1]).then_some(())
    });

    // A new order keeps the leader (no replica added or removed: done at once), so the
    // preferred replica does not lead; ElectLeaders (preferred) moves it there, and a
    // second one is ELECTION_NOT_NEEDED.
    let reordered = format!("{},{}", to[1], to[0]);
    let (ok, out, err) = topic_reassign(&bootstrap, &[topic, "--replicas", &reordered]);
    assert!(ok, "{out}{err}");
    let (still, replicas, _) = wait_for("the new order", OP_TIMEOUT, || {
        metadata(&cluster.nodes[0].addr, Some(topic))
            .and_then(|s| s.partitions.get(&0).cloned())
            .filter(|(_, r, _)| *r == vec![to[1], to[0]])
    });
    assert_eq!((still, replicas[0]), (leader, to[1]));
    assert_ne!(
        leader, to[1],
        "the completed move elected the target's first replica"
    );
    let elect = |version: i16| {
        use ferrite_protocol::kafka_protocol::messages::elect_leaders_request::TopicPartitions;
        use ferrite_protocol::kafka_protocol::messages::{
            ApiKey, ElectLeadersRequest, ElectLeadersResponse, TopicName,
        };
        use ferrite_protocol::kafka_protocol::protocol::StrBytes;
        let controller = active_controller(&cluster);
        let addr = &cluster.nodes[(controller - 1) as usize].addr;
        let req = ElectLeadersRequest::default()
            .with_election_type(0)
            .with_timeout_ms(10_000)
            .with_topic_partitions(Some(vec![TopicPartitions::default()
                .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(vec![0, 7])]));
        let r: ElectLeadersResponse = common::raw(addr, ApiKey::ElectLeaders, version, &req);
        assert_eq!(r.error_code, 0);
        let mut codes: Vec<(i32, i16)> = r.replica_election_results[0]
            .partition_result
            .iter()
            .map(|p| (p.partition_id, p.error_code))
            .collect();
        codes.sort_unstable();
        codes
    };
    // Partition 7 does not exist: UNKNOWN_TOPIC_OR_PARTITION beside the election.
    assert_eq!(elect(2), vec![(0, 0), (7, 3)]);
    wait_for("the preferred replica leading", OP_TIMEOUT, || {
        metadata(&cluster.nodes[0].addr, Some(topic))
            .and_then(|s| s.partitions.get(&0).cloned())
            .filter(|(l, _, _)| *l == to[1])
    });
    assert_eq!(elect(0), vec![(0, 84), (7, 3)], "ELECTION_NOT_NEEDED");
}

/// Issue 9 item 6, the throttle: with `follower.replication.throttled.rate` a new
/// replica copies the log no faster than that rate, so the move is seen in progress
/// (ListPartitionReassignments: replicas, adding) and lasts at least the time the rate
/// allows; it then completes with the log intact on both replicas.
#[test]
fn a_throttled_reassignment_copies_at_the_configured_rate() {
    const RATE: u64 = 256 * 1024;
    let rate = format!("follower.replication.throttled.rate={RATE}");
    let cluster = Cluster::start_with(&[&rate]);
    let rt = runtime();
    let admin: AdminClient<DefaultClientContext> = cluster.config().create().unwrap();
    let topic = "throttled";
    rt.block_on(create_topic(&admin, topic, 1, 1, &[], OP_TIMEOUT))
        .unwrap();
    let (from, _, _) = wait_for("the partition led", OP_TIMEOUT, || {
        metadata(&cluster.nodes[0].addr, Some(topic))
            .and_then(|s| s.partitions.get(&0).cloned())
            .filter(|(l, _, _)| *l >= 0)
    });
    let other = if from == 1 { 2 } else { 1 };
    let producer: FutureProducer = cluster
        .config()
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "none")
        .create()
        .unwrap();
    let pad = "x".repeat(1000);
    let values: Vec<String> = (0..1500).map(|i| format!("{i:05}-{pad}")).collect();
    let acked = rt.block_on(produce_all(&producer, topic, &values));
    assert_eq!(acked.len(), values.len());
    let log_bytes = replica_bytes(&cluster.nodes[(from - 1) as usize].data_dir, topic).len() as u64;
    assert!(log_bytes > 4 * RATE, "{log_bytes}");

    let bootstrap = cluster.bootstrap();
    let started = Instant::now();
    let target = format!("{from},{other}");
    let (ok, out, err) = topic_reassign(&bootstrap, &[topic, "--replicas", &target, "--json"]);
    assert!(ok, "{out}{err}");
    let listed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        listed["in_progress"],
        serde_json::json!([{"partition": 0, "replicas": [from, other], "adding": [other], "removing": []}]),
        "{out}"
    );
    let (ok, out, err) = topic_reassign(&bootstrap, &[topic, "--wait", "60"]);
    assert!(ok, "{out}{err}");
    let took = started.elapsed();
    // The first second's budget is free; the rest of the log arrives at the rate at
    // most (a lower bound: a slow machine only takes longer).
    let least = Duration::from_millis((log_bytes - RATE) * 1000 / RATE);
    eprintln!("{log_bytes} bytes copied in {took:?} at {RATE} B/s (at least {least:?})");
    assert!(
        took >= least,
        "{log_bytes} bytes copied in {took:?}, faster than {RATE} B/s"
    );
    let (_, replicas, isr) = wait_for("both replicas in sync", OP_TIMEOUT, || {
        metadata(&cluster.nodes[0].addr, Some(topic))
            .and_then(|s| s.partitions.get(&0).cloned())
            .filter(|(_, _, isr)| isr.len() == 2)
    });
    assert_eq!(replicas, vec![from, other]);
    assert_eq!(isr.len(), 2);
    let dirs: Vec<PathBuf> = [from, other]
        .iter()
        .map(|&b| cluster.nodes[(b - 1) as usize].data_dir.clone())
        .collect();
    wait_for("identical logs", OP_TIMEOUT, || {
        let logs: Vec<Vec<u8>> = dirs.iter().map(|d| replica_bytes(d, topic)).collect();
        (logs[0].len() as u64 == log_bytes && logs[0] == logs[1]).then_some(())
    });
    assert_eq!(consume_to_end(&bootstrap, topic), values);
}
