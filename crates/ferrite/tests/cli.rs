//! The `ferrite` client subcommands against a real server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::Server;
use ferrite::murmur2::partition_for_key;

fn ferrite(server: &Server, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(args)
        .args(["--bootstrap-server", &server.addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn topic_produce_consume_and_admin_through_the_cli() {
    let server = Server::start(&[]);
    let (ok, _, err) = ferrite(
        &server,
        &[
            "topic",
            "create",
            "cli",
            "--partitions",
            "4",
            "--config",
            "retention.ms=3600000",
        ],
        None,
    );
    assert!(ok, "{err}");
    let (ok, _, _) = ferrite(
        &server,
        &["topic", "create", "cli", "--partitions", "4"],
        None,
    );
    assert!(!ok, "creating it twice fails");
    let (_, out, _) = ferrite(&server, &["topic", "list", "--json"], None);
    assert!(json(&out).as_array().unwrap().iter().any(|t| t == "cli"));

    // Keyed lines go where the Java client's murmur2 puts them.
    let input: String = (0..200)
        .map(|i| format!("user{}:event{i}\n", i % 17))
        .collect();
    let (ok, out, err) = ferrite(
        &server,
        &["produce", "cli", "--key-separator", ":", "--json"],
        Some(&input),
    );
    assert!(ok, "{err}");
    assert_eq!(json(&out)["produced"], 200);
    let (_, out, _) = ferrite(&server, &["topic", "describe", "cli", "--json"], None);
    let d = json(&out);
    let mut expected = [0i64; 4];
    for i in 0..200 {
        expected[partition_for_key(format!("user{}", i % 17).as_bytes(), 4) as usize] += 1;
    }
    for p in d["partitions"].as_array().unwrap() {
        let idx = p["partition"].as_i64().unwrap() as usize;
        assert_eq!(
            p["log_end_offset"].as_i64().unwrap(),
            expected[idx],
            "partition {idx}"
        );
        assert_eq!(p["leader"], 0);
    }
    assert_eq!(d["configs"]["retention.ms"], "3600000");

    // Consume everything, in order per partition, with key, partition, offset, timestamp.
    let (ok, out, err) = ferrite(
        &server,
        &[
            "consume",
            "cli",
            "--from-beginning",
            "--exit-at-end",
            "--json",
        ],
        None,
    );
    assert!(ok, "{err}");
    let msgs: Vec<serde_json::Value> = out.lines().map(json).collect();
    assert_eq!(msgs.len(), 200);
    let mut last: [i64; 4] = [-1; 4];
    for m in &msgs {
        let p = m["partition"].as_i64().unwrap() as usize;
        let o = m["offset"].as_i64().unwrap();
        assert_eq!(o, last[p] + 1, "contiguous offsets");
        last[p] = o;
        assert!(m["timestamp"].as_i64().unwrap() > 0);
        let key = m["key"].as_str().unwrap();
        assert_eq!(partition_for_key(key.as_bytes(), 4) as usize, p);
    }
    // From an offset, and stopping after N.
    let (_, out, _) = ferrite(
        &server,
        &[
            "consume",
            "cli",
            "--partition",
            "0",
            "--offset",
            "2",
            "--max-messages",
            "1",
            "--format",
            "full",
        ],
        None,
    );
    assert_eq!(out.split('\t').nth(1), Some("2"), "{out}");
    // From a timestamp in the future: nothing, and it still stops at the end.
    let future = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 3_600_000)
        .to_string();
    let (ok, out, err) = ferrite(
        &server,
        &["consume", "cli", "--timestamp", &future, "--exit-at-end"],
        None,
    );
    assert!(ok, "{err}");
    assert!(out.is_empty());

    // Alter: configs and partition count; a bad config is refused.
    let (ok, _, err) = ferrite(
        &server,
        &[
            "topic",
            "alter",
            "cli",
            "--config",
            "segment.bytes=1048576",
            "--partitions",
            "6",
        ],
        None,
    );
    assert!(ok, "{err}");
    let (_, out, _) = ferrite(&server, &["topic", "describe", "cli", "--json"], None);
    let d = json(&out);
    assert_eq!(d["partitions"].as_array().unwrap().len(), 6);
    assert_eq!(d["configs"]["segment.bytes"], "1048576");
    assert_eq!(
        d["configs"]["retention.ms"], "3600000",
        "other overrides are kept"
    );
    let (ok, _, _) = ferrite(
        &server,
        &["topic", "alter", "cli", "--config", "no.such=1"],
        None,
    );
    assert!(!ok, "unknown config must fail");
    let (ok, _, _) = ferrite(&server, &["topic", "delete", "cli"], None);
    assert!(ok);
    let (_, out, _) = ferrite(&server, &["topic", "list", "--json"], None);
    assert!(!json(&out).as_array().unwrap().iter().any(|t| t == "cli"));
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        vec!["--help"],
        vec!["server", "--help"],
        vec!["topic", "--help"],
        vec!["topic", "create", "--help"],
        vec!["produce", "--help"],
        vec!["consume", "--help"],
        vec!["group", "--help"],
        vec!["group", "reset-offsets", "--help"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
            .args(&sub)
            .output()
            .unwrap();
        assert!(out.status.success(), "{sub:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{sub:?}"
        );
    }
}

#[test]
fn toml_config_file_sets_broker_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("ferrite.toml");
    std::fs::write(
        &cfg,
        "\"num.partitions\" = 3\n\"auto.create.topics.enable\" = true\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path().join("data"))
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line.split_whitespace().nth(4).unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(["produce", "auto", "--bootstrap-server", &addr])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args([
            "topic",
            "describe",
            "auto",
            "--json",
            "--bootstrap-server",
            &addr,
        ])
        .output()
        .unwrap();
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        d["partitions"].as_array().unwrap().len(),
        3,
        "num.partitions from the TOML file"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
