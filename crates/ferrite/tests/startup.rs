//! Start-up never deletes what it cannot account for (issue 14, item 1). Each test damages
//! a stopped broker's data directory the way a disk, an operator or a bad restore would,
//! then starts the broker twice: both starts must behave the same, and nothing may be
//! deleted (a refused start leaves the directory byte for byte as it was).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Server, OP_TIMEOUT};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

const START_TIMEOUT: Duration = Duration::from_secs(60);
const TOPIC: &str = "keep";
const MESSAGES: usize = 3000;

/// A populated, cleanly stopped data directory: topic `keep` with one partition in
/// several small segments holding `MESSAGES` offsets, plus `__consumer_offsets`.
fn populated() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::start_in(&data, "127.0.0.1:0", &["offsets.topic.num.partitions=2"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(server.create_topic(TOPIC, 1, &[("segment.bytes", "16384")]));
    let producer: ThreadedProducer<DefaultProducerContext> = server
        .config()
        .set("linger.ms", "5")
        .set("batch.size", "4000")
        .create()
        .unwrap();
    let deadline = Instant::now() + OP_TIMEOUT;
    for i in 0..MESSAGES {
        let value = format!("value-{i:06}-{}", "x".repeat(40));
        let mut record = BaseRecord::<(), _>::to(TOPIC).payload(&value).partition(0);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, r)) => {
                    assert!(Instant::now() < deadline, "producer stuck: {e}");
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(OP_TIMEOUT).unwrap();
    assert_eq!(high_watermark(&server.addr), MESSAGES as i64);
    server.stop();
    (tmp, data)
}

fn high_watermark(addr: &str) -> i64 {
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("log_level", "3")
        .create()
        .unwrap();
    c.fetch_watermarks(TOPIC, 0, OP_TIMEOUT).unwrap().1
}

enum Outcome {
    Started {
        child: Child,
        addr: String,
        log: mpsc::Receiver<String>,
    },
    Refused {
        stderr: String,
    },
}

/// Starts `ferrite server` on `data` and waits for it to be ready or to exit.
fn try_start(data: &Path, listen: &str, extra: &[&str]) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrite"));
    cmd.arg("server")
        .arg("--listen")
        .arg(listen)
        .arg("--data-dir")
        .arg(data);
    for e in extra {
        cmd.arg("--set").arg(e);
    }
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let out_tx = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = out_tx.send(line);
        }
    });
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + START_TIMEOUT;
    let mut seen = String::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix("ferrite ready: listening on ") {
                    let addr = rest.split_whitespace().next().unwrap().to_string();
                    // What start-up logged before the ready line.
                    let (ltx, lrx) = mpsc::channel();
                    for l in seen.lines() {
                        ltx.send(l.to_string()).unwrap();
                    }
                    std::thread::spawn(move || {
                        while let Ok(l) = rx.recv() {
                            if ltx.send(l).is_err() {
                                break;
                            }
                        }
                    });
                    return Outcome::Started {
                        child,
                        addr,
                        log: lrx,
                    };
                }
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(status) = child.try_wait().unwrap() {
                    // Drain what is left of its output.
                    std::thread::sleep(Duration::from_millis(100));
                    while let Ok(line) = rx.try_recv() {
                        seen.push_str(&line);
                        seen.push('\n');
                    }
                    assert!(!status.success(), "server exited 0 without starting");
                    return Outcome::Refused { stderr: seen };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("server neither started nor exited within {START_TIMEOUT:?}: {seen}");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().unwrap();
                assert!(!status.success(), "server exited 0 without starting");
                return Outcome::Refused { stderr: seen };
            }
        }
    }
}

fn stop(mut child: Child) {
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "server exited with {status}");
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("server did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every file under `dir` with its bytes (the lock file aside, which start-up creates).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if path.is_dir() {
                out.insert(rel.join(""), Vec::new());
                walk(root, &path, out);
            } else if rel != Path::new(".lock") {
                let mut bytes = Vec::new();
                std::fs::File::open(&path)
                    .unwrap()
                    .read_to_end(&mut bytes)
                    .unwrap();
                out.insert(rel, bytes);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Starts twice; both must be refused with `expect` in the message, and the directory
/// must be exactly as before.
fn refused_twice(data: &Path, extra: &[&str], expect: &str) {
    let before = snapshot(data);
    for attempt in 1..=2 {
        match try_start(data, "127.0.0.1:0", extra) {
            Outcome::Started { child, .. } => {
                stop(child);
                panic!("start {attempt} should have been refused ({expect})");
            }
            Outcome::Refused { stderr } => assert!(
                stderr.contains(expect),
                "start {attempt}: expected `{expect}` in: {stderr}"
            ),
        }
        let after = snapshot(data);
        let changed: Vec<_> = before
            .keys()
            .chain(after.keys())
            .filter(|k| before.get(*k) != after.get(*k))
            .collect();
        assert!(
            changed.is_empty(),
            "start {attempt} changed the data directory: {changed:?}"
        );
    }
}

fn partition_dir(data: &Path) -> PathBuf {
    data.join(format!("{TOPIC}-0"))
}

fn segments(data: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(partition_dir(data))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segs.sort();
    segs
}

fn metadata_log(data: &Path) -> PathBuf {
    data.join("__cluster_metadata").join("metadata.log")
}

fn flip_byte(path: &Path, from_end: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes.len() - from_end;
    bytes[at] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn bad_last_metadata_entry_after_clean_shutdown_is_refused() {
    let (_tmp, data) = populated();
    assert!(data.join(".clean-shutdown").exists());
    flip_byte(&metadata_log(&data), 3);
    refused_twice(&data, &[], "corrupt");
}

#[test]
fn missing_or_empty_metadata_log_beside_partitions_is_refused() {
    let (tmp, data) = populated();
    let saved = tmp.path().join("metadata.log.saved");
    std::fs::rename(metadata_log(&data), &saved).unwrap();
    refused_twice(&data, &[], "metadata log");
    std::fs::write(metadata_log(&data), b"").unwrap();
    refused_twice(&data, &[], "is empty");
    // Restored, the broker starts with every message.
    std::fs::rename(&saved, metadata_log(&data)).unwrap();
    match try_start(&data, "127.0.0.1:0", &[]) {
        Outcome::Started { child, addr, .. } => {
            assert_eq!(high_watermark(&addr), MESSAGES as i64);
            stop(child);
        }
        Outcome::Refused { stderr } => panic!("restored directory refused: {stderr}"),
    }
}

#[test]
fn unknown_topic_partition_directory_is_set_aside_not_deleted() {
    let (_tmp, data) = populated();
    let ghost = data.join("ghost-0");
    std::fs::create_dir(&ghost).unwrap();
    let first = segments(&data)[0].clone();
    std::fs::copy(&first, ghost.join(first.file_name().unwrap())).unwrap();
    let ghost_bytes = std::fs::read(&first).unwrap();
    for attempt in 1..=2 {
        match try_start(&data, "127.0.0.1:0", &[]) {
            Outcome::Started { child, addr, log } => {
                assert_eq!(high_watermark(&addr), MESSAGES as i64);
                stop(child);
                let logged: Vec<String> = log.iter().collect();
                if attempt == 1 {
                    assert!(
                        logged.iter().any(|l| l.contains("set aside")),
                        "no report of the stray directory: {logged:?}"
                    );
                }
            }
            Outcome::Refused { stderr } => panic!("start {attempt} refused: {stderr}"),
        }
        assert!(!ghost.exists());
        let strays: Vec<PathBuf> = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let n = p.file_name().unwrap().to_str().unwrap();
                n.starts_with("ghost-0.") && n.ends_with("-stray")
            })
            .collect();
        assert_eq!(strays.len(), 1, "start {attempt}: {strays:?}");
        assert_eq!(
            std::fs::read(strays[0].join(first.file_name().unwrap())).unwrap(),
            ghost_bytes
        );
    }
}

#[test]
fn corrupt_segment_is_refused_on_every_start_and_failed_starts_change_nothing() {
    let (_tmp, data) = populated();
    // A port in use and a bad config are refused before the data is touched.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let before = snapshot(&data);
    match try_start(&data, &taken_addr, &[]) {
        Outcome::Refused { stderr } => assert!(stderr.contains("cannot listen"), "{stderr}"),
        Outcome::Started { child, .. } => {
            stop(child);
            panic!("started on a port in use")
        }
    }
    assert!(
        snapshot(&data) == before,
        "a start on a busy port changed the data"
    );
    refused_twice(&data, &["log.segment.bytes=lots"], "log.segment.bytes");

    let segs = segments(&data);
    assert!(segs.len() >= 3, "want several segments, have {segs:?}");
    // The last batch of a middle segment lies after its last index entry, so a clean
    // start reads it.
    flip_byte(&segs[1], 2);
    refused_twice(&data, &[], "corrupt");
    assert!(
        data.join(".clean-shutdown").exists(),
        "the marker must stay"
    );
}

#[test]
fn meta_properties_is_checked_not_regenerated() {
    let (_tmp, data) = populated();
    let path = data.join("meta.properties");
    let original = std::fs::read_to_string(&path).unwrap();

    std::fs::write(&path, original.replace("version=1", "version=2")).unwrap();
    refused_twice(&data, &[], "unsupported version 2");

    std::fs::write(&path, format!("{original}log.dirs=/elsewhere\n")).unwrap();
    refused_twice(&data, &[], "unknown key `log.dirs`");

    let cluster_line = original
        .lines()
        .find(|l| l.starts_with("cluster.id="))
        .unwrap();
    std::fs::write(
        &path,
        original.replace(cluster_line, "cluster.id=AAAAAAAAAAAAAAAAAAAAAA"),
    )
    .unwrap();
    refused_twice(&data, &[], "cluster id mismatch");

    std::fs::write(&path, &original).unwrap();
    // A configured cluster.id other than the directory's: the data belongs elsewhere.
    refused_twice(
        &data,
        &["cluster.id=BBBBBBBBBBBBBBBBBBBBBB"],
        "belongs to another cluster",
    );
    refused_twice(&data, &["cluster.id=short"], "URL-safe base64");

    std::fs::remove_file(&path).unwrap();
    refused_twice(&data, &[], "meta.properties is missing");

    std::fs::write(&path, &original).unwrap();
    match try_start(&data, "127.0.0.1:0", &[]) {
        Outcome::Started { child, addr, .. } => {
            assert_eq!(high_watermark(&addr), MESSAGES as i64);
            stop(child);
        }
        Outcome::Refused { stderr } => panic!("restored meta.properties refused: {stderr}"),
    }
}

#[test]
fn recovery_reports_what_it_cuts_and_keeps_dropped_segments() {
    let (_tmp, data) = populated();
    let segs = segments(&data);
    assert!(segs.len() >= 4, "want several segments, have {segs:?}");
    // A crash (no marker) before any segment was synced (recovery point 0), with a
    // corrupt middle segment: recovery cuts it and sets the segments after it aside.
    std::fs::remove_file(data.join(".clean-shutdown")).unwrap();
    std::fs::write(
        partition_dir(&data).join("partition.checkpoint"),
        "v1 0 0\n",
    )
    .unwrap();
    let dropped_bytes = std::fs::read(&segs[2]).unwrap();
    // Damage the first batch of segment 1, so that everything after it is lost.
    let mut bytes = std::fs::read(&segs[1]).unwrap();
    bytes[70] ^= 0x5a;
    std::fs::write(&segs[1], bytes).unwrap();
    let mut ends = Vec::new();
    for attempt in 1..=2 {
        match try_start(&data, "127.0.0.1:0", &[]) {
            Outcome::Started { child, addr, log } => {
                ends.push(high_watermark(&addr));
                stop(child);
                let logged: Vec<String> = log.iter().collect();
                if attempt == 1 {
                    assert!(
                        logged
                            .iter()
                            .any(|l| l.contains("recovery truncated") && l.contains("offsets_lost")),
                        "{logged:?}"
                    );
                    assert!(
                        logged
                            .iter()
                            .any(|l| l.contains("recovery dropped a segment")
                                && l.contains("offsets_lost")),
                        "{logged:?}"
                    );
                }
            }
            Outcome::Refused { stderr } => panic!("start {attempt} refused: {stderr}"),
        }
        // The second start is a crash recovery too.
        if attempt == 1 {
            std::fs::remove_file(data.join(".clean-shutdown")).unwrap();
            std::fs::write(
                partition_dir(&data).join("partition.checkpoint"),
                "v1 0 0\n",
            )
            .unwrap();
        }
    }
    assert_eq!(ends[0], ends[1], "the two starts disagree on the log end");
    assert!(ends[0] < MESSAGES as i64);
    let mut kept = segs[2].clone().into_os_string();
    kept.push(".dropped");
    assert_eq!(std::fs::read(&kept).unwrap(), dropped_bytes);
}

#[test]
fn missing_middle_segment_is_reported() {
    let (tmp, data) = populated();
    let segs = segments(&data);
    assert!(segs.len() >= 3, "want several segments, have {segs:?}");
    std::fs::rename(&segs[1], tmp.path().join("moved.log")).unwrap();
    for attempt in 1..=2 {
        match try_start(&data, "127.0.0.1:0", &[]) {
            Outcome::Started { child, addr, log } => {
                assert_eq!(high_watermark(&addr), MESSAGES as i64);
                stop(child);
                let logged: Vec<String> = log.iter().collect();
                assert!(
                    logged.iter().any(|l| l.contains("missing from the log")),
                    "start {attempt}: {logged:?}"
                );
            }
            Outcome::Refused { stderr } => panic!("start {attempt} refused: {stderr}"),
        }
    }
    // Nothing else went: the other segments are all still there.
    let now = segments(&data);
    for s in segs.iter().filter(|s| **s != segs[1]) {
        assert!(now.contains(s), "{} is gone", s.display());
    }
}
