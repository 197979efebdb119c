#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

//! Hand-made histories: one clean, and one per anomaly with exactly that anomaly planted.

use super::*;
use serde_json::json;

fn invoke(process: i64, t: u64, value: i64, partition: i32) -> String {
    json!({"type": "invoke", "f": "send", "process": process, "time_ms": t, "topic": "t", "value": value, "partition": partition}).to_string()
}

fn ok(process: i64, t: u64, value: i64, partition: i32, offset: i64) -> String {
    json!({"type": "ok", "f": "send", "process": process, "time_ms": t, "topic": "t", "value": value, "partition": partition, "offset": offset}).to_string()
}

/// An ok send whose offset the client never learned (librdkafka's implicit
/// acknowledgement of an idempotent batch whose response was lost).
fn ok_unplaced(process: i64, t: u64, value: i64, partition: i32) -> String {
    json!({"type": "ok", "f": "send", "process": process, "time_ms": t, "topic": "t", "value": value, "partition": partition, "offset": null}).to_string()
}

fn fail(process: i64, t: u64, value: i64, error: &str) -> String {
    json!({"type": "fail", "f": "send", "process": process, "time_ms": t, "topic": "t", "value": value, "error": error}).to_string()
}

fn info(process: i64, t: u64, value: i64) -> String {
    json!({"type": "info", "f": "send", "process": process, "time_ms": t, "topic": "t", "value": value, "error": "timed out"}).to_string()
}

/// `records`: (partition, offset, value).
fn poll(process: i64, t: u64, records: &[(i32, i64, i64)]) -> String {
    let records: Vec<_> = records
        .iter()
        .map(|&(partition, offset, value)| json!({"topic": "t", "partition": partition, "offset": offset, "value": value}))
        .collect();
    json!({"type": "ok", "f": "poll", "process": process, "time_ms": t, "records": records})
        .to_string()
}

fn final_read(t: u64, records: &[(i32, i64, i64)]) -> String {
    poll(99, t, records).replace("\"poll\"", "\"final_read\"")
}

fn marker(f: &str, process: i64, t: u64, partitions: &[i32]) -> String {
    json!({"type": "ok", "f": f, "process": process, "time_ms": t, "partitions": partitions})
        .to_string()
}

fn fault(t: u64, what: &str) -> String {
    json!({"type": "info", "f": "fault", "time_ms": t, "error": what}).to_string()
}

fn run(lines: &[String]) -> Report {
    check_history(lines.join("\n").as_bytes()).unwrap()
}

/// Exactly `expected` anomalies of `kind`, none of any other kind.
fn assert_only(report: &Report, kind: AnomalyKind, expected: u64) {
    for k in AnomalyKind::ALL {
        let want = if k == kind { expected } else { 0 };
        assert_eq!(
            report.count(k),
            want,
            "{} in\n{}",
            k.name(),
            report.to_text()
        );
    }
}

/// Two producers, two partitions, a consumer in assign mode, one in subscribe mode
/// with a rebalance, a definitely failed send never read, an unknown (timed-out) send
/// that did land, faults, and the final reads.
fn clean_history() -> Vec<String> {
    vec![
        marker("assign", 1, 0, &[0, 1]),
        marker("rebalance", 2, 0, &[0]),
        invoke(10, 1, 100, 0),
        ok(10, 2, 100, 0, 0),
        invoke(11, 2, 200, 1),
        ok(11, 3, 200, 1, 0),
        invoke(10, 3, 101, 0),
        ok(10, 4, 101, 0, 1),
        fault(5, "kill -9 node 2"),
        invoke(11, 5, 201, 1),
        fail(11, 6, 201, "NOT_ENOUGH_REPLICAS"),
        invoke(11, 7, 202, 1),
        info(11, 9, 202),
        poll(1, 10, &[(0, 0, 100), (1, 0, 200), (0, 1, 101)]),
        poll(2, 10, &[(0, 0, 100)]),
        // Consumer 2's group rebalances: it now owns partition 1 and restarts there.
        marker("rebalance", 2, 11, &[1]),
        poll(2, 12, &[(1, 0, 200), (1, 1, 202)]),
        poll(1, 12, &[(1, 1, 202)]),
        fault(13, "heal"),
        final_read(20, &[(0, 0, 100), (0, 1, 101), (1, 0, 200), (1, 1, 202)]),
    ]
}

#[test]
fn a_clean_history_has_no_anomaly() {
    let report = run(&clean_history());
    for k in AnomalyKind::ALL {
        assert_eq!(report.count(k), 0, "{}\n{}", k.name(), report.to_text());
    }
    assert!(report.is_valid());
    assert!(report.anomalies.is_empty());
    assert_eq!(report.values_acknowledged, 3);
    assert_eq!(report.values_read, 4);
    assert_eq!(report.faults, 2);
    assert_eq!(
        report.sends,
        OperationCounts {
            invoked: 5,
            ok: 3,
            fail: 1,
            info: 1
        }
    );
}

#[test]
fn lost_write() {
    // Offset 1 acknowledged, never read; offset 2 of the same partition was read.
    let report = run(&[
        ok(10, 1, 100, 0, 0),
        ok(10, 2, 101, 0, 1),
        ok(10, 3, 102, 0, 2),
        final_read(10, &[(0, 0, 100), (0, 2, 102)]),
    ]);
    assert_only(&report, AnomalyKind::LostWrite, 1);
    let a = &report.anomalies[0];
    assert_eq!(
        (a.partition, a.offset, a.value.clone()),
        (0, Some(1), Some(Value::Int(101)))
    );
    assert!(!report.is_valid());
}

#[test]
fn unseen() {
    // Acknowledged at the partition's end, never read, nothing later read either.
    let report = run(&[
        ok(10, 1, 100, 0, 0),
        ok(10, 2, 101, 0, 1),
        final_read(10, &[(0, 0, 100)]),
    ]);
    assert_only(&report, AnomalyKind::Unseen, 1);
    assert_eq!(report.anomalies[0].offset, Some(1));
    assert!(!report.is_valid());
}

#[test]
fn inconsistent_offsets() {
    // A consumer saw 100 at offset 0; the final read finds 999 there.
    let report = run(&[
        ok(10, 1, 100, 0, 0),
        poll(1, 2, &[(0, 0, 100)]),
        final_read(10, &[(0, 0, 999), (0, 1, 100)]),
    ]);
    assert_eq!(report.count(AnomalyKind::InconsistentOffsets), 1);
    // 100 at offsets 0 and 1 is also a duplicate; nothing else.
    assert_eq!(report.count(AnomalyKind::Duplicate), 1);
    for k in [
        AnomalyKind::LostWrite,
        AnomalyKind::Unseen,
        AnomalyKind::NonmonotonicPoll,
        AnomalyKind::PollSkip,
        AnomalyKind::AbortedRead,
    ] {
        assert_eq!(report.count(k), 0, "{}", k.name());
    }
    let a = report
        .anomalies
        .iter()
        .find(|a| a.kind == AnomalyKind::InconsistentOffsets)
        .unwrap();
    assert_eq!(a.offset, Some(0));
    assert!(
        a.detail.contains("100") && a.detail.contains("999"),
        "{}",
        a.detail
    );
}

#[test]
fn inconsistent_offsets_against_an_acknowledgement() {
    // The broker acknowledged 101 at offset 1, but offset 1 holds 555.
    let report = run(&[
        ok(10, 1, 100, 0, 0),
        ok(10, 2, 101, 0, 1),
        final_read(10, &[(0, 0, 100), (0, 1, 555), (0, 2, 101)]),
    ]);
    assert_eq!(report.count(AnomalyKind::InconsistentOffsets), 1);
    assert_eq!(
        report.count(AnomalyKind::Duplicate),
        1,
        "101 acknowledged at 1, read at 2"
    );
    assert_eq!(report.count(AnomalyKind::LostWrite), 0);
}

#[test]
fn duplicate() {
    // A retried send without idempotence: the same value at offsets 1 and 2.
    let report = run(&[
        ok(10, 1, 100, 0, 0),
        info(10, 2, 101),
        ok(10, 3, 101, 0, 2),
        final_read(10, &[(0, 0, 100), (0, 1, 101), (0, 2, 101)]),
    ]);
    assert_only(&report, AnomalyKind::Duplicate, 1);
    assert!(report.is_valid(), "duplicates alone do not fail a run");
    assert!(
        report.anomalies[0].detail.contains("t/0@1")
            && report.anomalies[0].detail.contains("t/0@2")
    );
}

#[test]
fn nonmonotonic_poll() {
    let report = run(&[
        ok(10, 1, 100, 0, 0),
        ok(10, 1, 101, 0, 1),
        ok(10, 1, 102, 0, 2),
        poll(1, 2, &[(0, 0, 100), (0, 1, 101), (0, 2, 102)]),
        // Back to offset 1 with no assignment change.
        poll(1, 3, &[(0, 1, 101)]),
        final_read(10, &[(0, 0, 100), (0, 1, 101), (0, 2, 102)]),
    ]);
    assert_only(&report, AnomalyKind::NonmonotonicPoll, 1);
    assert_eq!(report.anomalies[0].process, Some(1));
    assert_eq!(report.anomalies[0].offset, Some(1));
}

#[test]
fn going_back_after_a_rebalance_is_fine() {
    let report = run(&[
        ok(10, 1, 100, 0, 0),
        ok(10, 1, 101, 0, 1),
        poll(1, 2, &[(0, 0, 100), (0, 1, 101)]),
        marker("rebalance", 1, 3, &[0]),
        poll(1, 4, &[(0, 1, 101)]),
        final_read(10, &[(0, 0, 100), (0, 1, 101)]),
    ]);
    assert!(report.anomalies.is_empty(), "{}", report.to_text());
}

#[test]
fn poll_skip() {
    let report = run(&[
        ok(10, 1, 100, 1, 0),
        ok(10, 1, 101, 1, 1),
        ok(10, 1, 102, 1, 2),
        poll(1, 2, &[(1, 0, 100)]),
        // Offset 1 exists (acknowledged, read at the end) but this consumer jumps over it.
        poll(1, 3, &[(1, 2, 102)]),
        final_read(10, &[(1, 0, 100), (1, 1, 101), (1, 2, 102)]),
    ]);
    assert_only(&report, AnomalyKind::PollSkip, 1);
    assert!(report.anomalies[0]
        .detail
        .contains("skipping known offsets 1"));
}

#[test]
fn a_gap_no_one_knows_of_is_not_a_skip() {
    // Offsets may have gaps (transaction markers, compaction): only known offsets count.
    let report = run(&[
        ok(10, 1, 100, 1, 0),
        ok(10, 1, 102, 1, 2),
        poll(1, 2, &[(1, 0, 100)]),
        poll(1, 3, &[(1, 2, 102)]),
        final_read(10, &[(1, 0, 100), (1, 2, 102)]),
    ]);
    assert!(report.anomalies.is_empty(), "{}", report.to_text());
}

#[test]
fn aborted_read() {
    let report = run(&[
        ok(10, 1, 100, 0, 0),
        invoke(10, 2, 101, 0),
        fail(10, 3, 101, "NOT_ENOUGH_REPLICAS"),
        poll(1, 4, &[(0, 0, 100), (0, 1, 101)]),
        final_read(10, &[(0, 0, 100), (0, 1, 101)]),
    ]);
    // Read by the poll and by the final read: two reads of a failed send.
    assert_only(&report, AnomalyKind::AbortedRead, 2);
    assert!(report.anomalies[0].detail.contains("NOT_ENOUGH_REPLICAS"));
}

#[test]
fn every_planted_anomaly_in_one_history() {
    let mut lines = clean_history();
    lines.pop(); // replaced by a final read that shows the anomalies
    lines.extend([
        ok(10, 30, 103, 0, 2), // lost: never read, offset 3 read
        ok(10, 31, 104, 0, 3),
        ok(10, 32, 300, 2, 0), // unseen: partition 2 never read
        ok(10, 33, 105, 0, 4), // duplicate: read at 4 and 5
        poll(1, 40, &[(0, 3, 104), (0, 1, 101)]), // nonmonotonic for consumer 1
        poll(2, 41, &[(1, 0, 200)]), // consumer 2 goes back: nonmonotonic too
        final_read(
            50,
            &[
                (0, 0, 100),
                (0, 1, 777), // inconsistent: 101 acknowledged at 1
                (0, 3, 104),
                (0, 4, 105),
                (0, 5, 105),
                (1, 0, 200),
                (1, 1, 202),
                (1, 2, 201), // aborted: 201 failed
            ],
        ),
    ]);
    let report = run(&lines);
    let text = report.to_text();
    assert_eq!(report.count(AnomalyKind::LostWrite), 1, "{text}");
    assert_eq!(report.count(AnomalyKind::Unseen), 1, "{text}");
    assert_eq!(report.count(AnomalyKind::InconsistentOffsets), 1, "{text}");
    assert_eq!(report.count(AnomalyKind::Duplicate), 1, "{text}");
    assert_eq!(report.count(AnomalyKind::NonmonotonicPoll), 2, "{text}");
    assert_eq!(report.count(AnomalyKind::AbortedRead), 1, "{text}");
    // Consumer 1 read 0@1 then jumps to 0@3 in this poll: offset 2 is known (acknowledged).
    assert_eq!(report.count(AnomalyKind::PollSkip), 1, "{text}");
    assert!(!report.is_valid());
}

#[test]
fn availability_windows_and_fraction() {
    let report = run(&[
        invoke(10, 0, 1, 0),
        ok(10, 10, 1, 0, 0),
        invoke(10, 10, 2, 0),
        info(10, 510, 2),
        invoke(10, 510, 3, 0),
        ok(10, 520, 3, 0, 1),
        invoke(10, 520, 4, 1),
        fail(10, 530, 4, "NOT_LEADER_OR_FOLLOWER"),
        final_read(600, &[(0, 0, 1), (0, 1, 3)]),
    ]);
    assert_eq!(report.sends.ok, 2);
    assert!(
        (report.fraction_ok - 0.5).abs() < 1e-9,
        "{}",
        report.fraction_ok
    );
    let w0 = &report.longest_unavailable[0];
    assert_eq!(
        (w0.partition, w0.start_ms, w0.end_ms, w0.duration_ms),
        (0, 10, 520, 510)
    );
    // Partition 1 never had a successful send: the whole history.
    let w1 = &report.longest_unavailable[1];
    assert_eq!((w1.partition, w1.start_ms, w1.end_ms), (1, 0, 600));
}

#[test]
fn string_values_and_json_round_trip() {
    let lines = [
        json!({"type": "ok", "f": "send", "process": 1, "time_ms": 1, "value": "a", "partition": 0, "offset": 0}).to_string(),
        json!({"type": "ok", "f": "final_read", "process": 2, "time_ms": 2, "records": [{"partition": 0, "offset": 0, "value": "a"}]}).to_string(),
    ];
    let report = run(&lines);
    assert!(report.anomalies.is_empty());
    let back: Report = serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
    assert_eq!(back, report);
}

#[test]
fn malformed_lines_name_their_line() {
    let err =
        check_history("\n{\"type\":\"ok\",\"f\":\"send\",\"value\":1}\n".as_bytes()).unwrap_err();
    match err {
        HistoryError::Line { line, reason } => {
            assert_eq!(line, 2);
            assert!(reason.contains("needs its partition"), "{reason}");
        }
        other => panic!("{other}"),
    }
    assert!(matches!(
        check_history("{not json".as_bytes()),
        Err(HistoryError::Line { line: 1, .. })
    ));
    assert!(matches!(
        check_history("{\"type\":\"maybe\",\"f\":\"send\"}".as_bytes()),
        Err(HistoryError::Line { line: 1, .. })
    ));
}

#[test]
fn an_ok_send_without_offset_is_acknowledged_and_placed_by_the_next_one() {
    // Read: valid, and counted as acknowledged.
    let read = [
        invoke(10, 1, 100, 0),
        invoke(10, 1, 101, 0),
        ok_unplaced(10, 3, 100, 0),
        ok(10, 3, 101, 0, 1),
        final_read(9, &[(0, 0, 100), (0, 1, 101)]),
    ];
    let report = run(&read);
    assert!(report.anomalies.is_empty(), "{}", report.to_text());
    assert_eq!(report.values_acknowledged, 2);
    // Never read while its producer's next acknowledged offset was: a lost write.
    let lost = [
        invoke(10, 1, 100, 0),
        invoke(10, 1, 101, 0),
        ok_unplaced(10, 3, 100, 0),
        ok(10, 3, 101, 0, 1),
        final_read(9, &[(0, 1, 101)]),
    ];
    assert_only(&run(&lost), AnomalyKind::LostWrite, 1);
    // Never read and nothing bounds it: unseen.
    let unseen = [
        invoke(10, 1, 100, 0),
        ok_unplaced(10, 3, 100, 0),
        final_read(9, &[]),
    ];
    assert_only(&run(&unseen), AnomalyKind::Unseen, 1);
}

/// A send of transaction `txn` acknowledged at `offset` (delivered to the log, not yet
/// committed).
fn txn_ok(process: i64, t: u64, value: i64, partition: i32, offset: i64, txn: i64) -> String {
    json!({"type": "ok", "f": "send", "process": process, "time_ms": t, "topic": "t", "value": value, "partition": partition, "offset": offset, "txn": txn}).to_string()
}

/// A transaction's outcome: `ok` committed, `fail` aborted, `info` unknown.
fn txn_end(op_type: &str, process: i64, t: u64, txn: i64) -> String {
    json!({"type": op_type, "f": "txn", "process": process, "time_ms": t, "txn": txn, "error": "abort chosen"}).to_string()
}

/// Transaction 1 committed (offsets 0, 1, marker 2), 2 aborted (3, 4, marker 5), 3
/// undecided (6) and never read, 4 committed (8). A read_committed consumer passes over
/// the aborted and undecided records.
fn transactional_history() -> Vec<String> {
    vec![
        marker("assign", 1, 0, &[0]),
        txn_ok(10, 1, 100, 0, 0, 1),
        txn_ok(10, 1, 101, 0, 1, 1),
        txn_end("ok", 10, 2, 1),
        txn_ok(10, 3, 102, 0, 3, 2),
        txn_ok(10, 3, 103, 0, 4, 2),
        txn_end("fail", 10, 4, 2),
        txn_ok(10, 5, 104, 0, 6, 3),
        txn_end("info", 10, 6, 3),
        txn_ok(10, 7, 105, 0, 8, 4),
        txn_end("ok", 10, 8, 4),
        poll(1, 9, &[(0, 0, 100), (0, 1, 101), (0, 8, 105)]),
        final_read(10, &[(0, 0, 100), (0, 1, 101), (0, 8, 105)]),
    ]
}

#[test]
fn a_transactional_history_passing_over_aborted_records_is_clean() {
    let report = run(&transactional_history());
    assert!(report.is_valid(), "{}", report.to_text());
    assert_eq!(report.count(AnomalyKind::Duplicate), 0);
    assert_eq!(report.values_acknowledged, 3, "only the committed sends");
    assert_eq!(
        (
            report.transactions.ok,
            report.transactions.fail,
            report.transactions.info
        ),
        (2, 1, 1)
    );
}

#[test]
fn reading_an_aborted_transactions_record_is_an_aborted_read() {
    let mut h = transactional_history();
    h.push(marker("assign", 2, 11, &[0]));
    h.push(poll(2, 12, &[(0, 4, 103)]));
    let report = run(&h);
    assert_only(&report, AnomalyKind::AbortedRead, 1);
    assert!(report.anomalies[0].detail.contains("transaction aborted"));
}

#[test]
fn a_committed_transactions_record_never_read_is_lost() {
    let h: Vec<String> = transactional_history()
        .into_iter()
        .map(|l| {
            l.replace(r#"[0,1,101],"#, "")
                .replace(r#"{"offset":1,"partition":0,"topic":"t","value":101},"#, "")
        })
        .collect();
    let report = run(&h);
    // Lost, and the consumer that passed over it skipped a committed record.
    assert_eq!(
        report.count(AnomalyKind::LostWrite),
        1,
        "{}",
        report.to_text()
    );
    assert_eq!(
        report.count(AnomalyKind::PollSkip),
        1,
        "{}",
        report.to_text()
    );
    assert_eq!(report.count(AnomalyKind::AbortedRead), 0);
    let lost = report
        .anomalies
        .iter()
        .find(|a| a.kind == AnomalyKind::LostWrite)
        .unwrap();
    assert_eq!(lost.value, Some(Value::Int(101)));
}

#[test]
fn an_undecided_transactions_record_read_counts_and_skipping_it_is_a_skip() {
    let mut h = transactional_history();
    // Transaction 3 did commit after all (a consumer read it); consumer 1, which passed
    // over it, skipped a real record.
    h.push(marker("assign", 2, 11, &[0]));
    h.push(poll(2, 12, &[(0, 6, 104)]));
    let report = run(&h);
    assert_only(&report, AnomalyKind::PollSkip, 1);
    assert_eq!(report.anomalies[0].process, Some(1));
}

#[test]
fn a_txn_line_needs_its_id() {
    let line = json!({"type": "ok", "f": "txn", "process": 10}).to_string();
    assert!(matches!(
        check_history(line.as_bytes()),
        Err(HistoryError::Line { line: 1, .. })
    ));
}
