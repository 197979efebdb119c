//! Machine limits tell the truth (issue 14, items 3 to 5): a full disk (a small tmpfs as
//! the data directory) is logged once when it fills and once when it recovers, admin
//! changes that cannot be stored fail whole, a group whose rebalance cannot be persisted
//! does not flood the log, and reads keep working meanwhile; more partitions than file
//! descriptors are hosted through the bounded segment file cache, and a CreateTopics that
//! would leave no descriptor for segment files is refused with a clear error before
//! anything is created.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::OP_TIMEOUT;
use ferrite_protocol::kafka_protocol;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
    MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use rdkafka::consumer::{BaseConsumer, Consumer};

const KAFKA_STORAGE_ERROR: i16 = 56;
const INVALID_PARTITIONS: i16 = 37;

/// A broker whose stderr goes to a file the test reads.
struct Broker {
    child: Option<Child>,
    addr: String,
    log: PathBuf,
}

impl Broker {
    /// `ulimit_n`: run under `ulimit -n N` (soft and hard).
    fn start(data: &Path, log: &Path, extra: &[&str], ulimit_n: Option<u32>) -> Broker {
        let bin = env!("CARGO_BIN_EXE_ferrite");
        let mut args = vec![
            "server".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            data.display().to_string(),
        ];
        for e in extra {
            args.push("--set".into());
            args.push(e.to_string());
        }
        let mut cmd = match ulimit_n {
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(bin)
                    .args(&args);
                c
            }
            None => {
                let mut c = Command::new(bin);
                c.args(&args);
                c
            }
        };
        let mut child = cmd
            .env("RUST_LOG", "warn,ferrite_broker=info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let addr = loop {
            let line = rx
                .recv_timeout(common::STARTUP_TIMEOUT)
                .unwrap_or_else(|_| {
                    let _ = child.kill();
                    panic!(
                        "no ready line: {}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    )
                });
            if let Some(rest) = line.strip_prefix("ferrite ready: listening on ") {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        Broker {
            child: Some(child),
            addr,
            log: log.to_path_buf(),
        }
    }

    /// Descriptors the broker process has open.
    fn open_fds(&self) -> usize {
        let pid = self.child.as_ref().unwrap().id();
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    }

    fn log_lines(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop. `None` (the test
/// then says it is skipped) where mounting is not permitted.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs here (needs root); the full-disk test did not run"
            );
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Fills the filesystem of `path` to its last byte with `path`.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    for chunk in [1 << 16, 4096, 1] {
        let buf = vec![7u8; chunk];
        while f.write_all(&buf).is_ok() {}
    }
}

fn topic_name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

fn produce(addr: &str, topic: &str) -> i16 {
    produce_to(addr, topic, 0)
}

fn produce_to(addr: &str, topic: &str, partition: i32) -> i16 {
    let batch = ferrite_storage::test_support::make_batch(10, 1_700_000_000_000, &[b'x'; 2000]);
    let req = ProduceRequest::default()
        .with_acks(1)
        .with_timeout_ms(5000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(topic_name(topic))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(partition)
                .with_records(Some(batch.into()))])]);
    let resp: ProduceResponse = common::raw(addr, ApiKey::Produce, 9, &req);
    resp.responses[0].partition_responses[0].error_code
}

fn create_topic(addr: &str, topic: &str, partitions: i32) -> (i16, String) {
    let req = CreateTopicsRequest::default()
        .with_timeout_ms(5000)
        .with_topics(vec![CreatableTopic::default()
            .with_name(topic_name(topic))
            .with_num_partitions(partitions)
            .with_replication_factor(1)]);
    let resp: CreateTopicsResponse = common::raw(addr, ApiKey::CreateTopics, 5, &req);
    let t = &resp.topics[0];
    (
        t.error_code,
        t.error_message
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_default(),
    )
}

fn delete_topic(addr: &str, topic: &str) -> i16 {
    let req = DeleteTopicsRequest::default()
        .with_timeout_ms(5000)
        .with_topics(vec![
            DeleteTopicState::default().with_name(Some(topic_name(topic)))
        ]);
    let resp: DeleteTopicsResponse = common::raw(addr, ApiKey::DeleteTopics, 6, &req);
    resp.responses[0].error_code
}

/// `(error code, record bytes)` of a Fetch of `topic`-0 from offset 0.
fn fetch(addr: &str, topic: &str) -> (i16, usize) {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::{FetchRequest, FetchResponse};
    let req = FetchRequest::default()
        .with_replica_id(kafka_protocol::messages::BrokerId(-1))
        .with_max_wait_ms(0)
        .with_max_bytes(1 << 20)
        .with_topics(vec![FetchTopic::default()
            .with_topic(topic_name(topic))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(0)
                .with_fetch_offset(0)
                .with_partition_max_bytes(1 << 20)])]);
    let resp: FetchResponse = common::raw(addr, ApiKey::Fetch, 12, &req);
    let p = &resp.responses[0].partitions[0];
    (p.error_code, p.records.as_ref().map_or(0, |r| r.len()))
}

/// Whether the broker lists `topic`, and with how many partitions.
fn listed(addr: &str, topic: &str) -> Option<usize> {
    let req = MetadataRequest::default()
        .with_topics(Some(vec![
            MetadataRequestTopic::default().with_name(Some(topic_name(topic)))
        ]))
        .with_allow_auto_topic_creation(false);
    let resp: MetadataResponse = common::raw(addr, ApiKey::Metadata, 9, &req);
    let t = &resp.topics[0];
    (t.error_code == 0).then_some(t.partitions.len())
}

#[test]
fn full_disk_is_logged_once_and_admin_changes_fail_whole() {
    let Some(fs) = Tmpfs::mount("24m") else {
        return;
    };
    let data = fs.path().join("data");
    let log = tempfile::NamedTempFile::new().unwrap();
    let b = Broker::start(
        &data,
        log.path(),
        &[
            "offsets.topic.num.partitions=1",
            "log.segment.bytes=1048576",
        ],
        None,
    );
    assert_eq!(create_topic(&b.addr, "a", 1).0, 0);
    assert_eq!(produce(&b.addr, "a"), 0);
    let filler = fs.path().join("filler");
    fill(&filler);

    // Produce fails, many times, and it is logged once.
    for _ in 0..20 {
        assert_eq!(produce(&b.addr, "a"), KAFKA_STORAGE_ERROR);
    }
    assert_eq!(b.log_lines("log directory is full"), 1);
    // Reads keep working on a full disk.
    let (code, bytes) = fetch(&b.addr, "a");
    assert_eq!(code, 0);
    assert!(bytes > 2000, "fetched {bytes} bytes");

    // CreateTopics fails whole: nothing listed, no directory left behind.
    let (code, message) = create_topic(&b.addr, "b", 8);
    assert_ne!(code, 0, "created a topic on a full disk");
    eprintln!("CreateTopics on a full disk: {code} {message}");
    assert_eq!(listed(&b.addr, "b"), None);
    assert!(!data.join("b-0").exists() && !data.join("b-7").exists());
    // A consumer group whose rebalance cannot be stored does not flood the log.
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &b.addr)
        .set("group.id", "full")
        .set("log_level", "0")
        .create()
        .unwrap();
    c.subscribe(&["a"]).unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let _ = c.poll(Duration::from_millis(100));
    }
    let persist_errors = b.log_lines("cannot persist group record");
    assert!(
        (1..=2).contains(&persist_errors),
        "{persist_errors} persist errors logged in 5 s"
    );
    assert_eq!(
        c.assignment().unwrap().count(),
        0,
        "assigned without a stored rebalance"
    );

    // DeleteTopics either fails and the topic stays, or succeeds and it is gone.
    let code = delete_topic(&b.addr, "a");
    assert_eq!(
        listed(&b.addr, "a").is_some(),
        code != 0,
        "delete code {code}"
    );
    eprintln!("DeleteTopics on a full disk: {code}");
    let deleted = code == 0;

    // Space comes back: one WARN, and everything works again.
    std::fs::remove_file(&filler).unwrap();
    if listed(&b.addr, "a").is_none() {
        assert_eq!(create_topic(&b.addr, "a", 1).0, 0);
    }
    assert_eq!(produce(&b.addr, "a"), 0);
    assert_eq!(b.log_lines("log directory has space again"), 1);
    assert_eq!(
        create_topic(&b.addr, "b", 8).0,
        0,
        "b was left half created"
    );
    assert_eq!(listed(&b.addr, "b"), Some(8));
    if !deleted {
        common::wait_for("the group to get its assignment", OP_TIMEOUT, || {
            let _ = c.poll(Duration::from_millis(100));
            (c.assignment().unwrap().count() > 0).then_some(())
        });
    }
    assert_eq!(b.log_lines("log directory is full"), 1);
}

#[test]
fn more_partitions_than_descriptors_are_hosted_and_a_change_leaving_none_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let log = tmp.path().join("broker.log");
    const LIMIT: u32 = 1200;
    let b = Broker::start(
        &data,
        &log,
        &["offsets.topic.num.partitions=1"],
        Some(LIMIT),
    );
    assert_eq!(b.log_lines("file descriptor limit"), 1);
    assert_eq!(b.log_lines("segment files open at most"), 1);
    // More partitions than the process may open files: the cache holds a bounded number.
    let (code, message) = create_topic(&b.addr, "many", 1500);
    assert_eq!(code, 0, "{message}");
    assert_eq!(listed(&b.addr, "many"), Some(1500));
    for p in [0, 700, 1499, 3] {
        assert_eq!(produce_to(&b.addr, "many", p), 0, "partition {p}");
    }
    let fds = b.open_fds();
    // What the broker keeps for connections (1024) is left free.
    assert!(fds < LIMIT as usize - 1000, "{fds} descriptors open");
    drop(b);
    // And it starts again on that directory, under the same limit.
    let b = Broker::start(
        &data,
        &log,
        &["offsets.topic.num.partitions=1"],
        Some(LIMIT),
    );
    assert_eq!(listed(&b.addr, "many"), Some(1500));
    assert_eq!(produce_to(&b.addr, "many", 1499), 0);

    // Connections take what was kept for them: no descriptor is left for segment files,
    // and a CreateTopics is refused before anything is created.
    let idle = b.open_fds();
    let conns: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(&b.addr).unwrap())
        .collect();
    common::wait_for("the broker to accept 300 connections", OP_TIMEOUT, || {
        (b.open_fds() >= idle + 290).then_some(())
    });
    let (code, message) = create_topic(&b.addr, "more", 10);
    assert_eq!(code, INVALID_PARTITIONS, "{message}");
    assert!(message.contains("file descriptors"), "{message}");
    assert_eq!(listed(&b.addr, "more"), None);
    assert!(!data.join("more-0").exists());
    drop(conns);
    common::wait_for("the connections to close", OP_TIMEOUT, || {
        (b.open_fds() < idle + 20).then_some(())
    });
    assert_eq!(create_topic(&b.addr, "more", 10).0, 0);
    assert!((0..10).all(|p| data.join(format!("more-{p}")).is_dir()));
}
