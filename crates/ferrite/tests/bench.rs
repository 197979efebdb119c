//! `ferrite bench` against a real server: its counts match what moved and its histogram
//! holds every message. Behaviour only; speed is for BENCHMARKS.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::process::Command;

use common::Server;

/// Runs `ferrite bench ARGS --bootstrap-server .. --json`.
fn run_bench(server: &Server, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .arg("bench")
        .args(args)
        .args(["--bootstrap-server", &server.addr, "--json"])
        .output()
        .unwrap()
}

fn bench(server: &Server, args: &[&str]) -> serde_json::Value {
    let out = run_bench(server, args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bench_counts_bytes_and_latency_samples_match() {
    let server = Server::start(&[]);
    let p = bench(
        &server,
        &[
            "produce",
            "--topic",
            "b",
            "--count",
            "20000",
            "--message-size",
            "200",
            "--keys",
            "random",
            "--producers",
            "2",
        ],
    );
    assert_eq!(p["messages"], 20000);
    assert_eq!(p["bytes"], 20000 * 200);
    assert_eq!(
        p["latency_samples"], 20000,
        "every delivery is in the histogram"
    );
    for q in ["p50", "p90", "p99", "p999", "p9999", "max"] {
        assert!(p["latency_ms"][q].as_f64().unwrap() > 0.0, "{q}");
    }
    let c = bench(&server, &["consume", "--topic", "b"]);
    assert_eq!(c["messages"], 20000);
    assert_eq!(c["bytes"], 20000 * 200);
    assert!(c["latency_ms"].is_null());
    // The broker agrees on the count.
    let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args([
            "topic",
            "describe",
            "b",
            "--json",
            "--bootstrap-server",
            &server.addr,
        ])
        .output()
        .unwrap();
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stored: i64 = d["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["log_end_offset"].as_i64().unwrap())
        .sum();
    assert_eq!(stored, 20000);

    // A fixed rate: latency from the schedule, every message counted.
    let tmp = tempfile::tempdir().unwrap();
    let svg = tmp.path().join("p.svg");
    let r = bench(
        &server,
        &[
            "produce",
            "--topic",
            "r",
            "--count",
            "600",
            "--rate",
            "600",
            "--linger-ms",
            "0",
            "--plot",
            svg.to_str().unwrap(),
        ],
    );
    assert_eq!(r["messages"], 600);
    assert_eq!(r["latency_samples"], 600);
    for q in ["p50", "p90", "p99", "p999", "p9999", "max"] {
        assert!(r["latency_ms"][q].as_f64().unwrap() > 0.0, "{q}");
    }
    assert!(r["latency_ms"]["p50"].as_f64().unwrap() <= r["latency_ms"]["max"].as_f64().unwrap());
    assert!(
        r["seconds"].as_f64().unwrap() >= 0.9,
        "600 msgs at 600/s take about a second"
    );
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));

    // End to end.
    let e = bench(
        &server,
        &[
            "e2e",
            "--topic",
            "e",
            "--count",
            "500",
            "--rate",
            "500",
            "--linger-ms",
            "0",
        ],
    );
    assert_eq!(e["messages"], 500);
    assert_eq!(e["bytes"], 500 * 1024);
    assert_eq!(e["latency_samples"], 500);
    assert!(e["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
}

fn bench_fails(server: &Server, args: &[&str]) -> String {
    let out = run_bench(server, args);
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bench_group_keys_duration_and_bad_flags() {
    let server = Server::start(&["group.initial.rebalance.delay.ms=0"]);
    let p = bench(
        &server,
        &[
            "produce",
            "--topic",
            "g",
            "--partitions",
            "3",
            "--count",
            "3000",
            "--message-size",
            "100",
            "--keys",
            "fixed:10",
            "--acks",
            "all",
            "--compression",
            "lz4",
        ],
    );
    assert_eq!(p["messages"], 3000);
    assert_eq!(p["latency_samples"], 3000);
    // As a group member (subscribe), from the beginning.
    let c = bench(&server, &["consume", "--topic", "g", "--group", "bench-g"]);
    assert_eq!(c["messages"], 3000);
    assert_eq!(c["bytes"], 3000 * 100);
    // --duration bounds a run that --count alone would not.
    let d = bench(
        &server,
        &[
            "produce",
            "--topic",
            "d",
            "--duration",
            "1",
            "--rate",
            "200",
            "--count",
            "1000000",
        ],
    );
    let n = d["messages"].as_u64().unwrap();
    assert!((100..=300).contains(&n), "{n} messages in 1 s at 200/s");
    assert_eq!(d["latency_samples"], n);
    assert!(
        bench_fails(&server, &["produce", "--topic", "x", "--keys", "some"]).contains("--keys")
    );
    assert!(bench_fails(&server, &["e2e", "--topic", "x", "--count", "10"]).contains("--rate"));
}

/// `--transaction-ms`: transactional producers commit on the period, every commit is in
/// the commit histogram, and everything they sent is committed (read_committed reads it
/// all). Without --acks all it is refused, as librdkafka's transactions require.
#[test]
fn bench_transactional_producers_commit_on_the_period() {
    let server = Server::start(&[]);
    let p = bench(
        &server,
        &[
            "produce",
            "--topic",
            "t",
            "--partitions",
            "2",
            "--duration",
            "2",
            "--rate",
            "1000",
            "--count",
            "1000000",
            "--acks",
            "all",
            "--idempotence",
            "--transaction-ms",
            "100",
        ],
    );
    let n = p["messages"].as_u64().unwrap();
    let txns = p["transactions"].as_u64().unwrap();
    // About 2 s in 100 ms transactions, plus the last one's commit.
    assert!((10..=30).contains(&txns), "{txns} transactions in 2 s");
    assert!(p["commit_latency_ms"]["max"].as_f64().unwrap() > 0.0);
    // --count: the topic's offsets include the markers, which are no messages.
    let c = bench(
        &server,
        &["consume", "--topic", "t", "--count", &n.to_string()],
    );
    assert_eq!(
        c["messages"].as_u64().unwrap(),
        n,
        "every sent message committed"
    );
    assert!(bench_fails(
        &server,
        &["produce", "--topic", "t", "--transaction-ms", "100"]
    )
    .contains("--acks all"));
}
