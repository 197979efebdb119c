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
        // A topic created on a running node keeps the leader epoch it was created with.
        assert_eq!(p["leader_epoch"], 0, "partition {idx}");
        assert_eq!(p["replicas"], serde_json::json!([0]));
        assert_eq!(p["isr"], serde_json::json!([0]));
        assert_eq!(p["offline_replicas"], serde_json::json!([]));
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

/// Runs the binary with raw bytes on stdin; returns (success, stdout bytes, stderr).
fn ferrite_bytes(server: &Server, args: &[&str], stdin: &[u8]) -> (bool, Vec<u8>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(args)
        .args(["--bootstrap-server", &server.addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let bytes = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        input.write_all(&bytes).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn produce_keeps_input_order_for_one_key() {
    let server = Server::start(&[]);
    let (ok, _, err) = ferrite(
        &server,
        &["topic", "create", "ordered", "--partitions", "3"],
        None,
    );
    assert!(ok, "{err}");
    let input: String = (0..10_000).map(|i| format!("k:{i}\n")).collect();
    let (ok, out, err) = ferrite(
        &server,
        &["produce", "ordered", "--key-separator", ":", "--json"],
        Some(&input),
    );
    assert!(ok, "{err}");
    assert_eq!(json(&out)["produced"], 10_000);
    let p = partition_for_key(b"k", 3).to_string();
    let (ok, out, err) = ferrite(
        &server,
        &[
            "consume",
            "ordered",
            "--partition",
            &p,
            "--from-beginning",
            "--exit-at-end",
        ],
        None,
    );
    assert!(ok, "{err}");
    let got: Vec<String> = out.lines().map(str::to_string).collect();
    let want: Vec<String> = (0..10_000).map(|i| i.to_string()).collect();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "same-key lines arrive in input order");
}

#[test]
fn produce_and_consume_are_byte_exact() {
    let server = Server::start(&[]);
    let (ok, _, err) = ferrite(&server, &["topic", "create", "bytes"], None);
    assert!(ok, "{err}");
    // Every byte value but the newline, one message per value, then all of them in one.
    let mut input = Vec::new();
    let mut want: Vec<Vec<u8>> = Vec::new();
    for b in (0..=255u8).filter(|b| *b != b'\n') {
        want.push(vec![b]);
    }
    want.push((0..=255u8).filter(|b| *b != b'\n').collect());
    for m in &want {
        input.extend_from_slice(m);
        input.push(b'\n');
    }
    let (ok, _, err) = ferrite_bytes(&server, &["produce", "bytes"], &input);
    assert!(ok, "{err}");
    // The newline byte itself, with NUL as the delimiter.
    let with_newline: Vec<u8> = (1..=255u8).collect();
    let mut input = with_newline.clone();
    input.push(0);
    let (ok, _, err) = ferrite_bytes(&server, &["produce", "bytes", "--delimiter", "\\0"], &input);
    assert!(ok, "{err}");
    want.push(with_newline);
    let (ok, out, err) = ferrite_bytes(
        &server,
        &["consume", "bytes", "--from-beginning", "--exit-at-end"],
        &[],
    );
    assert!(ok, "{err}");
    let mut expected = Vec::new();
    for m in &want {
        expected.extend_from_slice(m);
        expected.push(b'\n');
    }
    assert!(out == expected, "raw values come back byte for byte");

    // A line that cannot be sent is named by its line number.
    let mut input = b"small\n".to_vec();
    input.extend(std::iter::repeat_n(b'x', 2_000_000));
    input.push(b'\n');
    let (ok, _, err) = ferrite_bytes(&server, &["produce", "bytes"], &input);
    assert!(!ok);
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn produce_to_a_partition_with_headers() {
    let server = Server::start(&[]);
    let (ok, _, err) = ferrite(
        &server,
        &["topic", "create", "hdr", "--partitions", "4"],
        None,
    );
    assert!(ok, "{err}");
    let (ok, _, err) = ferrite(
        &server,
        &[
            "produce",
            "hdr",
            "--partition",
            "2",
            "--header",
            "source=cli",
            "--header",
            "trace=a=b",
        ],
        Some("one\ntwo\n"),
    );
    assert!(ok, "{err}");
    let (ok, out, err) = ferrite(
        &server,
        &[
            "consume",
            "hdr",
            "--from-beginning",
            "--exit-at-end",
            "--json",
        ],
        None,
    );
    assert!(ok, "{err}");
    let msgs: Vec<serde_json::Value> = out.lines().map(json).collect();
    assert_eq!(msgs.len(), 2);
    for m in &msgs {
        assert_eq!(m["partition"], 2);
        assert_eq!(m["headers"][0]["key"], "source");
        assert_eq!(m["headers"][0]["value"], "cli");
        assert_eq!(m["headers"][1]["key"], "trace");
        assert_eq!(m["headers"][1]["value"], "a=b");
    }
    let (ok, _, err) = ferrite(
        &server,
        &["produce", "hdr", "--partition", "9"],
        Some("x\n"),
    );
    assert!(!ok);
    assert!(err.contains("no partition 9"), "{err}");
}

fn group_members_and_lag(server: &Server, group: &str) -> (usize, i64, i64) {
    let (ok, out, err) = ferrite(server, &["group", "describe", group, "--json"], None);
    assert!(ok, "{err}");
    let d = json(&out);
    let rows = d["partitions"].as_array().unwrap();
    let committed: i64 = rows
        .iter()
        .map(|r| r["committed_offset"].as_i64().unwrap_or(0))
        .sum();
    let lag: i64 = rows.iter().map(|r| r["lag"].as_i64().unwrap_or(0)).sum();
    (d["members"].as_array().unwrap().len(), committed, lag)
}

#[test]
fn group_consume_honours_options_and_commits_on_exit() {
    let server = Server::start(&[]);
    let (ok, _, err) = ferrite(
        &server,
        &["topic", "create", "gc", "--partitions", "2"],
        None,
    );
    assert!(ok, "{err}");
    let input: String = (0..5_000).map(|i| format!("k{}:v{i}\n", i % 7)).collect();
    let (ok, _, err) = ferrite(
        &server,
        &["produce", "gc", "--key-separator", ":", "--header", "h=1"],
        Some(&input),
    );
    assert!(ok, "{err}");
    let (ok, out, err) = ferrite(
        &server,
        &[
            "consume",
            "gc",
            "--group",
            "g1",
            "--from-beginning",
            "--exit-at-end",
            "--json",
        ],
        None,
    );
    assert!(ok, "{err}");
    let msgs: Vec<serde_json::Value> = out.lines().map(json).collect();
    assert_eq!(msgs.len(), 5_000);
    for m in &msgs {
        assert!(m["key"].as_str().unwrap().starts_with('k'));
        assert!(m["timestamp"].as_i64().unwrap() > 0);
        assert_eq!(m["headers"][0]["key"], "h");
    }
    // Committed on exit, and the member left: nothing to wait for.
    assert_eq!(group_members_and_lag(&server, "g1"), (0, 5_000, 0));
    // Again: from the committed offsets, so nothing; --format full marks null keys.
    let (ok, out, err) = ferrite(&server, &["produce", "gc"], Some("no-key\n"));
    assert!(ok, "{err}");
    let (ok, out2, err) = ferrite(
        &server,
        &[
            "consume",
            "gc",
            "--group",
            "g1",
            "--exit-at-end",
            "--format",
            "full",
        ],
        None,
    );
    assert!(ok, "{err} {out}");
    let fields: Vec<&str> = out2.trim_end().split('\t').collect();
    assert_eq!(fields.len(), 5, "{out2}");
    assert_eq!(fields[3], "\\N", "a null key is \\N");
    assert_eq!(fields[4], "no-key");
    // Offsets that the group's commits would contradict are refused with a pointer.
    let (ok, _, err) = ferrite(
        &server,
        &["consume", "gc", "--group", "g1", "--offset", "-5"],
        None,
    );
    assert!(!ok);
    assert!(err.contains("reset-offsets"), "{err}");
}

#[test]
fn group_consumer_leaves_the_group_on_sigterm_and_sigint() {
    let server = Server::start(&[]);
    let (ok, _, err) = ferrite(
        &server,
        &["topic", "create", "leave", "--partitions", "2"],
        None,
    );
    assert!(ok, "{err}");
    let input: String = (0..100).map(|i| format!("{i}\n")).collect();
    let (ok, _, err) = ferrite(&server, &["produce", "leave"], Some(&input));
    assert!(ok, "{err}");
    let mut expected_commit = 100;
    for signal in ["-TERM", "-INT"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
            .args(["consume", "leave", "--group", "lg", "--from-beginning"])
            .args(["--bootstrap-server", &server.addr])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Read until it has printed everything: it is then a member holding both partitions.
        let mut lines =
            std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
        let want = if signal == "-TERM" { 100 } else { 10 };
        for _ in 0..want {
            lines.next().unwrap().unwrap();
        }
        Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        let status = wait_child(&mut child, std::time::Duration::from_secs(20));
        assert!(status.success(), "{signal}: {status}");
        // No member left behind until a session timeout: the group is free at once.
        let (members, committed, _) = group_members_and_lag(&server, "lg");
        assert_eq!((members, committed), (0, expected_commit), "{signal}");
        let more: String = (0..10).map(|i| format!("more{i}\n")).collect();
        let (ok, _, err) = ferrite(&server, &["produce", "leave"], Some(&more));
        assert!(ok, "{err}");
        expected_commit += 10;
    }
    // Another member gets the partitions at once and starts at the commits. The producer's
    // sticky partitioner may have put the last ten in a partition the group never
    // committed; --from-beginning starts such a partition at its first record (not at its
    // end), so exactly the ten uncommitted records are read either way.
    let (ok, out, err) = ferrite(
        &server,
        &[
            "consume",
            "leave",
            "--group",
            "lg",
            "--from-beginning",
            "--exit-at-end",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 10, "{out}");
}

/// Waits (bounded) for `child` to exit; kills it and fails past the timeout.
fn wait_child(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process did not exit within {timeout:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn errors_carry_the_brokers_message_and_are_json_under_json() {
    let server = Server::start(&[]);
    let (ok, _, err) = ferrite(
        &server,
        &["topic", "create", "e", "--replication-factor", "3"],
        None,
    );
    assert!(!ok);
    assert!(err.contains("INVALID_REPLICATION_FACTOR"), "{err}");
    assert!(
        err.contains("available brokers"),
        "the broker's message: {err}"
    );
    let (ok, _, err) = ferrite(
        &server,
        &[
            "topic",
            "create",
            "e",
            "--replication-factor",
            "3",
            "--json",
        ],
        None,
    );
    assert!(!ok);
    let e = json(&err);
    assert_eq!(e["error"]["code"], "INVALID_REPLICATION_FACTOR");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("available brokers"));
    let (ok, _, err) = ferrite(&server, &["topic", "create", "e"], None);
    assert!(ok, "{err}");
    let (ok, _, err) = ferrite(&server, &["topic", "alter", "e"], None);
    assert!(!ok);
    assert!(err.contains("nothing to alter"), "{err}");
    let (ok, _, err) = ferrite(
        &server,
        &["topic", "alter", "e", "--config", "no.such.config=1"],
        None,
    );
    assert!(!ok);
    assert!(
        err.contains("INVALID_CONFIG") && err.contains("no.such.config"),
        "{err}"
    );
    let (ok, _, err) = ferrite(&server, &["topic", "delete", "nope", "--json"], None);
    assert!(!ok);
    assert_eq!(json(&err)["error"]["code"], "UNKNOWN_TOPIC_OR_PARTITION");

    // A port nobody listens on: refused at once, said once, for admin and client commands.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    for args in [
        vec!["topic", "create", "x"],
        vec!["topic", "list"],
        vec!["consume", "x"],
        vec!["group", "list"],
    ] {
        let started = std::time::Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
            .args(&args)
            .args(["-b", &closed])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(
            err.matches("connection refused").count(),
            1,
            "{args:?}: {err}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{args:?}"
        );
    }
    // The environment variable names the broker too.
    let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(["topic", "list", "--json"])
        .env("FERRITE_BOOTSTRAP_SERVER", &server.addr)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(list.as_array().unwrap().iter().any(|t| t == "e"));
}

/// Starts `ferrite server` with `args`; returns the child and its ready line, or the
/// exit status and stderr when it refuses to start.
fn server_with(args: &[&str]) -> Result<(std::process::Child, String), String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .arg("server")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    if line.starts_with("ferrite ready") {
        return Ok((child, line));
    }
    let status = wait_child(&mut child, std::time::Duration::from_secs(20));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    Err(format!("{status}: {err}"))
}

fn stop(mut child: std::process::Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    wait_child(&mut child, std::time::Duration::from_secs(20));
}

#[test]
fn topic_create_takes_the_brokers_defaults_and_listen_accepts_names() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data = data.to_str().unwrap();
    let (child, line) = server_with(&[
        "--listen",
        "localhost:0",
        "--data-dir",
        data,
        "--set",
        "num.partitions=3",
    ])
    .unwrap();
    let addr = line.split_whitespace().nth(4).unwrap().to_string();
    let server = Server::at(&addr);
    let (ok, out, err) = ferrite(&server, &["topic", "create", "d", "--json"], None);
    assert!(ok, "{err}");
    assert_eq!(json(&out)["partitions"], 3, "{out}");
    assert_eq!(json(&out)["replication_factor"], 1, "{out}");
    let (_, out, _) = ferrite(&server, &["topic", "describe", "d", "--json"], None);
    assert_eq!(json(&out)["partitions"].as_array().unwrap().len(), 3);
    stop(child);

    // 0.0.0.0 without an advertised address is refused, saying what to add.
    let err = server_with(&["--listen", "0.0.0.0:0", "--data-dir", data]).unwrap_err();
    assert!(err.contains("--advertised-listener"), "{err}");
    let (child, _) = server_with(&[
        "--listen",
        "0.0.0.0:0",
        "--advertised-listener",
        "127.0.0.1:9",
        "--data-dir",
        data,
    ])
    .unwrap();
    stop(child);
}

#[test]
fn config_files_in_kafka_properties_and_toml() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // As Kafka's own config/server.properties writes it, with settings Ferrite has no use for.
    let props = tmp.path().join("server.properties");
    std::fs::write(
        &props,
        format!(
            "# Kafka broker\nprocess.roles=broker,controller\nnode.id=0\n\
             controller.quorum.voters=0@localhost:9093\n\
             listeners=PLAINTEXT://127.0.0.1:0,CONTROLLER://:9093\n\
             num.network.threads=3\nlog.dirs={}\nnum.partitions=2\n\
             log.retention.hours=168\n",
            data.display()
        ),
    )
    .unwrap();
    let (child, line) = server_with(&["--config", props.to_str().unwrap()]).unwrap();
    let addr = line.split_whitespace().nth(4).unwrap().to_string();
    let server = Server::at(&addr);
    let (ok, out, err) = ferrite(&server, &["topic", "create", "p", "--json"], None);
    assert!(ok, "{err}");
    assert_eq!(
        json(&out)["partitions"],
        2,
        "num.partitions from server.properties"
    );
    stop(child);
    assert!(
        data.join("meta.properties").exists(),
        "log.dirs from server.properties"
    );

    // A bad value in a properties file names the line.
    std::fs::write(&props, "num.partitions=3\nnum.partitions=many\n").unwrap();
    let err = server_with(&["--config", props.to_str().unwrap()]).unwrap_err();
    assert!(err.contains("server.properties:2"), "{err}");

    // TOML with an unquoted dotted key: a hint to quote it.
    let toml = tmp.path().join("ferrite.toml");
    std::fs::write(&toml, "num.partitions = 3\n").unwrap();
    let err = server_with(&["--config", toml.to_str().unwrap()]).unwrap_err();
    assert!(err.contains("\"num.partitions\" = "), "{err}");
}

fn help(sub: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(sub)
        .arg("-h")
        .output()
        .unwrap();
    assert!(out.status.success(), "{sub:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_argument_is_described_and_bench_shows_its_own_options() {
    for sub in [
        vec!["server"],
        vec!["topic", "create"],
        vec!["topic", "list"],
        vec!["topic", "describe"],
        vec!["topic", "alter"],
        vec!["topic", "delete"],
        vec!["produce"],
        vec!["consume"],
        vec!["group", "list"],
        vec!["group", "describe"],
        vec!["group", "delete"],
        vec!["group", "reset-offsets"],
        vec!["bench", "produce"],
        vec!["bench", "consume"],
        vec!["bench", "e2e"],
    ] {
        let text = help(&sub);
        // `  -b, --bootstrap-server <HOST:PORT>  Broker(s) ...`: a flag, then its description
        // on the same line or (clap's layout for long texts) indented on the next.
        let lines: Vec<&str> = text.lines().collect();
        let mut section = "";
        for (i, line) in lines.iter().enumerate() {
            if line.ends_with(':') && !line.starts_with(' ') {
                section = line;
                continue;
            }
            let entry = line.trim_start();
            let is_entry = entry.starts_with('-') || entry.starts_with('<');
            if !(section == "Options:" || section == "Arguments:") || !is_entry {
                continue;
            }
            let indent = line.len() - entry.len();
            let same_line = entry.split("  ").filter(|s| !s.trim().is_empty()).count() >= 2;
            let next_line = lines.get(i + 1).is_some_and(|n| {
                let t = n.trim_start();
                !t.is_empty() && n.len() - t.len() > indent && !t.starts_with('-')
            });
            assert!(same_line || next_line, "{sub:?}: no description: `{line}`");
        }
        for valued in [
            "--bootstrap-server",
            "--acks",
            "--format",
            "--topic ",
            "--timeout",
        ] {
            if let Some(i) = text.lines().position(|l| l.contains(valued)) {
                let entry: Vec<&str> = text.lines().skip(i).take(6).collect();
                let entry = entry.join("\n");
                assert!(
                    entry.contains("[default:"),
                    "{sub:?}: `{entry}` shows no default"
                );
            }
        }
    }
    let consume = help(&["bench", "consume"]);
    for producer_only in [
        "--rate",
        "--acks",
        "--linger-ms",
        "--message-size",
        "--keys",
    ] {
        assert!(
            !consume.contains(producer_only),
            "bench consume shows {producer_only}"
        );
    }
    assert!(!help(&["bench", "produce"]).contains("--group"));
    assert!(help(&["topic", "list"]).contains("-b, --bootstrap-server"));
    assert!(help(&["topic", "list"]).contains("FERRITE_BOOTSTRAP_SERVER"));

    // --log-level is checked before anything runs.
    for bad in ["verbose", "info,=x=y"] {
        let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
            .args(["--log-level", bad, "topic", "list", "-b", "127.0.0.1:1"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}: a usage error");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--log-level"),
            "{bad}"
        );
    }
}

#[test]
fn consume_from_the_end_and_reset_offsets_options() {
    let server = Server::start(&[]);
    for t in ["ra", "rb"] {
        let (ok, _, err) = ferrite(&server, &["topic", "create", t, "--partitions", "2"], None);
        assert!(ok, "{err}");
        let input: String = (0..20).map(|i| format!("{i}\n")).collect();
        let (ok, _, err) = ferrite(&server, &["produce", t, "--partition", "0"], Some(&input));
        assert!(ok, "{err}");
        let (ok, _, err) = ferrite(&server, &["produce", t, "--partition", "1"], Some(&input));
        assert!(ok, "{err}");
    }
    // --offset -N: the last N of each partition.
    let (ok, out, err) = ferrite(
        &server,
        &[
            "consume",
            "ra",
            "--partition",
            "0",
            "--offset",
            "-3",
            "--exit-at-end",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(out, "17\n18\n19\n");
    let (ok, out, err) = ferrite(
        &server,
        &["consume", "ra", "--offset", "latest", "--exit-at-end"],
        None,
    );
    assert!(ok, "{err}");
    assert!(out.is_empty());

    // The group has read everything of both topics.
    for t in ["ra", "rb"] {
        let (ok, out, err) = ferrite(
            &server,
            &[
                "consume",
                t,
                "--group",
                "rg",
                "--offset",
                "earliest",
                "--exit-at-end",
            ],
            None,
        );
        assert!(ok, "{err}");
        assert_eq!(out.lines().count(), 40);
    }
    let plan = |args: &[&str]| -> Vec<(String, i64, i64)> {
        let mut all = vec!["group", "reset-offsets", "rg", "--json"];
        all.extend_from_slice(args);
        let (ok, out, err) = ferrite(&server, &all, None);
        assert!(ok, "{args:?}: {err}");
        let d = json(&out);
        let mut rows: Vec<(String, i64, i64)> = d["plan"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["topic"].as_str().unwrap().to_string(),
                    r["partition"].as_i64().unwrap(),
                    r["new"].as_i64().unwrap(),
                )
            })
            .collect();
        rows.sort();
        rows
    };
    let row = |t: &str, p: i64, o: i64| (t.to_string(), p, o);
    assert_eq!(
        plan(&["--all-topics", "--to-earliest"]),
        [
            row("ra", 0, 0),
            row("ra", 1, 0),
            row("rb", 0, 0),
            row("rb", 1, 0)
        ]
    );
    assert_eq!(
        plan(&["--topic", "ra", "--partitions", "1", "--shift-by", "-5"]),
        [row("ra", 1, 15)]
    );
    assert_eq!(
        plan(&["--all-topics", "--partitions", "0", "--to-current"]),
        [row("ra", 0, 20), row("rb", 0, 20)]
    );
    // Everything was written within the last day and nothing in the future.
    assert_eq!(
        plan(&["--topic", "rb", "--by-duration", "P1D"]),
        [row("rb", 0, 0), row("rb", 1, 0)]
    );
    assert_eq!(
        plan(&["--topic", "rb", "--by-duration", "PT0S"]),
        [row("rb", 0, 20), row("rb", 1, 20)]
    );
    // Executed: the group re-reads exactly the shifted part.
    let (ok, _, err) = ferrite(
        &server,
        &[
            "group",
            "reset-offsets",
            "rg",
            "--topic",
            "ra",
            "--partitions",
            "1",
            "--shift-by",
            "-5",
            "--execute",
        ],
        None,
    );
    assert!(ok, "{err}");
    let (ok, out, err) = ferrite(
        &server,
        &["consume", "ra", "--group", "rg", "--exit-at-end"],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(out, "15\n16\n17\n18\n19\n");
    let (ok, _, err) = ferrite(
        &server,
        &[
            "group",
            "reset-offsets",
            "rg",
            "--topic",
            "ra",
            "--partitions",
            "7",
            "--to-earliest",
        ],
        None,
    );
    assert!(!ok);
    assert!(err.contains("no partition 7"), "{err}");
}

/// Starts a server on `data`, waits for its ready line, stops it (SIGKILL when `kill`,
/// else SIGTERM) and returns its address and everything it logged.
fn run_server_once(data: &std::path::Path, kill: bool, between: impl FnOnce(&str)) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).unwrap();
        s
    });
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("ferrite ready"), "{line}");
    between(line.split_whitespace().nth(4).unwrap());
    if kill {
        child.kill().unwrap();
        child.wait().unwrap();
    } else {
        stop(child);
    }
    log.join().unwrap()
}

#[test]
fn first_start_is_quiet_and_recovery_logs_one_summary_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let first = run_server_once(&data, true, |addr| {
        let (ok, _, err) = ferrite(
            &Server::at(addr),
            &["topic", "create", "r", "--partitions", "5"],
            None,
        );
        assert!(ok, "{err}");
    });
    assert!(
        !first.to_lowercase().contains("recover"),
        "first start: {first}"
    );
    assert!(!first.contains("WARN"), "first start: {first}");
    // After SIGKILL: one line for all the recovered partitions (5 + the offsets topic's).
    let second = run_server_once(&data, false, |_| {});
    assert_eq!(
        second.matches("recovered partition log").count(),
        1,
        "{second}"
    );
    let third = run_server_once(&data, false, |_| {});
    assert!(
        !third.to_lowercase().contains("recover"),
        "after a clean stop: {third}"
    );
}
