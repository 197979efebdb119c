//! A Jepsen-style checker for Kafka workload histories (issue 10): one implementation
//! for the fault harness and the simulation. It reads a history of JSON lines
//! (`docs/history-format.md`) and reports, with the offending records:
//!
//! - `lost-write`: an acknowledged send never read, though a later offset of its
//!   partition was read;
//! - `inconsistent-offsets`: one offset of a partition with different values (in reads
//!   or acknowledged sends);
//! - `duplicate`: one value at two offsets (expected without the idempotent producer);
//! - `nonmonotonic-poll`: one consumer's next record of a partition at or below the
//!   previous one, with no assignment change between;
//! - `poll-skip`: one consumer jumping over an offset known to exist (some read or
//!   acknowledged send holds it), with no assignment change between;
//! - `aborted-read` (G1a): a value read whose send definitely failed, or whose
//!   transaction was aborted;
//! - `unseen`: acknowledged but never read, not even by the final reads, and not a
//!   lost-write (no later offset of its partition was read either);
//! - availability: the fraction of completed operations that succeeded, and per
//!   partition the longest window without a successful send.
//!
//! Transactional histories: a send with a `txn` id counts as acknowledged only if that
//! transaction's `txn` line is `ok` (committed), as failed if it is `fail` (aborted),
//! and as unknown otherwise; offsets held only by sends of uncommitted transactions
//! are not skips when a read_committed consumer passes over them.
//!
//! Pure: a history in, a [`Report`] out. No I/O beyond the `BufRead` it is given.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::BufRead;

use serde::{Deserialize, Serialize};

/// A history line longer than this is refused (a final read of a large partition is
/// one line per partition chunk; the harness splits reads to stay below it).
pub const HISTORY_LINE_BYTES_MAX: usize = 64 << 20;
/// Offending records listed per anomaly kind in a report; the count is always exact.
pub const ANOMALY_EXAMPLES_MAX: usize = 1_000;

/// A record value: the workload writes unique integers or strings.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Int(i64),
    Str(String),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// One record a consumer saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadRecord {
    #[serde(default)]
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub value: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpType {
    Invoke,
    Ok,
    Fail,
    Info,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpFunction {
    Send,
    Poll,
    Assign,
    Rebalance,
    FinalRead,
    Fault,
    /// A transaction's outcome: `ok` committed, `fail` aborted, `info` unknown.
    Txn,
}

/// One line of a history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    #[serde(rename = "type")]
    pub op_type: OpType,
    pub f: OpFunction,
    /// The client (producer or consumer) that performed it; -1 for harness events.
    #[serde(default = "no_process")]
    pub process: i64,
    #[serde(default)]
    pub time_ms: u64,
    #[serde(default)]
    pub topic: String,
    /// send: the value written.
    #[serde(default)]
    pub value: Option<Value>,
    /// send: the partition (intended at invoke, actual at ok).
    #[serde(default)]
    pub partition: Option<i32>,
    /// send ok: the offset the broker assigned.
    #[serde(default)]
    pub offset: Option<i64>,
    /// poll, final_read: the records in the order the consumer saw them.
    #[serde(default)]
    pub records: Vec<ReadRecord>,
    /// assign, rebalance: the partitions the consumer holds from now on.
    #[serde(default)]
    pub partitions: Vec<i32>,
    /// fault, fail, info: free text (the fault injected, the error).
    #[serde(default)]
    pub error: Option<String>,
    /// send, txn: the transaction the send belongs to (unique in the history).
    #[serde(default)]
    pub txn: Option<i64>,
}

fn no_process() -> i64 {
    -1
}

/// Why a history could not be read. (No thiserror: the crate depends on serde and
/// serde_json only.)
#[derive(Debug)]
pub enum HistoryError {
    Io(std::io::Error),
    Line { line: usize, reason: String },
}

impl std::error::Error for HistoryError {}

impl fmt::Display for HistoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HistoryError::Io(e) => write!(f, "reading the history: {e}"),
            HistoryError::Line { line, reason } => write!(f, "history line {line}: {reason}"),
        }
    }
}

/// Reads a JSON-lines history; blank lines are skipped.
pub fn parse_history(input: impl BufRead) -> Result<Vec<Op>, HistoryError> {
    let mut ops = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(HistoryError::Io)?;
        if line.trim().is_empty() {
            continue;
        }
        if line.len() > HISTORY_LINE_BYTES_MAX {
            return Err(HistoryError::Line {
                line: i + 1,
                reason: format!("longer than {HISTORY_LINE_BYTES_MAX} bytes"),
            });
        }
        let op: Op = serde_json::from_str(&line).map_err(|e| HistoryError::Line {
            line: i + 1,
            reason: e.to_string(),
        })?;
        if op.f == OpFunction::Send && op.op_type != OpType::Invoke && op.value.is_none() {
            return Err(HistoryError::Line {
                line: i + 1,
                reason: "a send completion needs its value".into(),
            });
        }
        // An ok send may lack its offset: librdkafka's idempotent producer acknowledges
        // a batch whose response was lost once a later batch of the same partition
        // succeeds (the sequence numbers prove the earlier one was written), without
        // learning its offset.
        if op.f == OpFunction::Send && op.op_type == OpType::Ok && op.partition.is_none() {
            return Err(HistoryError::Line {
                line: i + 1,
                reason: "an ok send needs its partition".into(),
            });
        }
        if op.f == OpFunction::Txn && op.txn.is_none() {
            return Err(HistoryError::Line {
                line: i + 1,
                reason: "a txn line needs its txn id".into(),
            });
        }
        ops.push(op);
    }
    Ok(ops)
}

/// Kinds of anomaly, with Jepsen's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AnomalyKind {
    LostWrite,
    InconsistentOffsets,
    Duplicate,
    NonmonotonicPoll,
    PollSkip,
    AbortedRead,
    Unseen,
}

impl AnomalyKind {
    pub const ALL: [AnomalyKind; 7] = [
        AnomalyKind::LostWrite,
        AnomalyKind::InconsistentOffsets,
        AnomalyKind::Duplicate,
        AnomalyKind::NonmonotonicPoll,
        AnomalyKind::PollSkip,
        AnomalyKind::AbortedRead,
        AnomalyKind::Unseen,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AnomalyKind::LostWrite => "lost-write",
            AnomalyKind::InconsistentOffsets => "inconsistent-offsets",
            AnomalyKind::Duplicate => "duplicate",
            AnomalyKind::NonmonotonicPoll => "nonmonotonic-poll",
            AnomalyKind::PollSkip => "poll-skip",
            AnomalyKind::AbortedRead => "aborted-read",
            AnomalyKind::Unseen => "unseen",
        }
    }

    /// The kinds that make a run fail. Duplicates are expected without the idempotent
    /// producer (a retried send), so they are reported but do not fail it.
    pub fn fails_run(self) -> bool {
        self != AnomalyKind::Duplicate
    }
}

/// One anomaly with the records that show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anomaly {
    pub kind: AnomalyKind,
    pub topic: String,
    pub partition: i32,
    /// The offset concerned (for duplicates, the first of them).
    pub offset: Option<i64>,
    pub value: Option<Value>,
    /// The consumer, for poll anomalies.
    pub process: Option<i64>,
    /// What was seen, in words (offsets, values, the previous record).
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OperationCounts {
    pub invoked: u64,
    pub ok: u64,
    pub fail: u64,
    pub info: u64,
}

/// The longest stretch of a partition's history without an acknowledged send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnavailableWindow {
    pub topic: String,
    pub partition: i32,
    pub start_ms: u64,
    pub end_ms: u64,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Anomalies per kind name; every kind is present, empty when none.
    pub counts: BTreeMap<String, u64>,
    /// Up to [`ANOMALY_EXAMPLES_MAX`] anomalies per kind, in history order.
    pub anomalies: Vec<Anomaly>,
    pub sends: OperationCounts,
    pub polls: OperationCounts,
    /// Transactions: ok committed, fail aborted, info unknown.
    #[serde(default)]
    pub transactions: OperationCounts,
    /// ok / (ok + fail + info) over sends and polls.
    pub fraction_ok: f64,
    pub longest_unavailable: Vec<UnavailableWindow>,
    pub values_acknowledged: u64,
    pub values_read: u64,
    pub faults: u64,
}

impl Report {
    pub fn count(&self, kind: AnomalyKind) -> u64 {
        self.counts.get(kind.name()).copied().unwrap_or(0)
    }

    /// No anomaly of a kind that fails a run ([`AnomalyKind::fails_run`]).
    pub fn is_valid(&self) -> bool {
        AnomalyKind::ALL
            .iter()
            .all(|&k| !k.fails_run() || self.count(k) == 0)
    }

    /// The report for people.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        out.push_str(if self.is_valid() {
            "valid\n"
        } else {
            "INVALID\n"
        });
        for kind in AnomalyKind::ALL {
            out.push_str(&format!("{:>22}: {}\n", kind.name(), self.count(kind)));
        }
        out.push_str(&format!(
            "sends: {} invoked, {} ok, {} failed, {} unknown; polls: {} ok; fraction ok {:.4}\n",
            self.sends.invoked,
            self.sends.ok,
            self.sends.fail,
            self.sends.info,
            self.polls.ok,
            self.fraction_ok
        ));
        if self.transactions != OperationCounts::default() {
            out.push_str(&format!(
                "transactions: {} invoked, {} committed, {} aborted, {} unknown\n",
                self.transactions.invoked,
                self.transactions.ok,
                self.transactions.fail,
                self.transactions.info
            ));
        }
        out.push_str(&format!(
            "values acknowledged {}, read {}; faults {}\n",
            self.values_acknowledged, self.values_read, self.faults
        ));
        for w in &self.longest_unavailable {
            out.push_str(&format!(
                "longest without an acknowledged send: {}/{} {} ms ({}..{})\n",
                w.topic, w.partition, w.duration_ms, w.start_ms, w.end_ms
            ));
        }
        for a in &self.anomalies {
            out.push_str(&format!(
                "{} {}/{} offset {} value {}{}: {}\n",
                a.kind.name(),
                a.topic,
                a.partition,
                a.offset.map_or("-".into(), |o| o.to_string()),
                a.value.as_ref().map_or("-".into(), |v| v.to_string()),
                a.process
                    .map_or(String::new(), |p| format!(" consumer {p}")),
                a.detail
            ));
        }
        out
    }
}

type Tp = (String, i32);

#[derive(Default)]
struct Anomalies {
    counts: BTreeMap<AnomalyKind, u64>,
    list: Vec<Anomaly>,
}

impl Anomalies {
    fn add(&mut self, a: Anomaly) {
        let n = self.counts.entry(a.kind).or_insert(0);
        *n += 1;
        if *n <= ANOMALY_EXAMPLES_MAX as u64 {
            self.list.push(a);
        }
    }
}

/// Notes `value` at `offset` of `tp`, seen by a read or an acknowledged send, in both
/// directions (offset -> values, value -> places).
fn seen_at(
    at_offset: &mut BTreeMap<Tp, BTreeMap<i64, BTreeSet<Value>>>,
    places: &mut BTreeMap<Value, BTreeSet<(Tp, i64)>>,
    tp: &Tp,
    offset: i64,
    value: &Value,
) {
    at_offset
        .entry(tp.clone())
        .or_default()
        .entry(offset)
        .or_default()
        .insert(value.clone());
    places
        .entry(value.clone())
        .or_default()
        .insert((tp.clone(), offset));
}

/// Checks a parsed history.
pub fn check(ops: &[Op]) -> Report {
    let mut anomalies = Anomalies::default();
    // Every (partition, offset) -> values seen there, by reads and acknowledged sends.
    let mut at_offset: BTreeMap<Tp, BTreeMap<i64, BTreeSet<Value>>> = BTreeMap::new();
    // Every value -> the (partition, offset) places it was seen at.
    let mut places: BTreeMap<Value, BTreeSet<(Tp, i64)>> = BTreeMap::new();
    let mut read_values: BTreeSet<Value> = BTreeSet::new();
    let mut max_read_offset: BTreeMap<Tp, i64> = BTreeMap::new();
    let mut acknowledged: Vec<(Tp, i64, Value)> = Vec::new();
    // Acknowledged without an offset: (partition, value, the process and the index of
    // the op), placed later by the next acknowledged offset of the same producer.
    let mut acknowledged_unplaced: Vec<(Tp, Value, i64, usize)> = Vec::new();
    // Per producer and partition: (op index, offset) of its acknowledged sends in order.
    let mut acked_by_process: BTreeMap<(i64, Tp), Vec<(usize, i64)>> = BTreeMap::new();
    let mut failed: BTreeMap<Value, String> = BTreeMap::new();
    let mut sends = OperationCounts::default();
    let mut polls = OperationCounts::default();
    let mut transactions = OperationCounts::default();
    // Each transaction's outcome: its last `txn` line that is not an invoke.
    let outcomes: BTreeMap<i64, &Op> = ops
        .iter()
        .filter(|op| op.f == OpFunction::Txn && op.op_type != OpType::Invoke)
        .filter_map(|op| op.txn.map(|id| (id, op)))
        .collect();
    // Offsets written by sends of aborted transactions, and of transactions with no
    // known outcome: a read_committed consumer passes over them.
    let mut aborted_at: BTreeSet<(Tp, i64)> = BTreeSet::new();
    let mut undecided_at: BTreeSet<(Tp, i64)> = BTreeSet::new();
    let mut faults = 0;
    let mut ok_send_times: BTreeMap<Tp, Vec<u64>> = BTreeMap::new();
    let (mut first_ms, mut last_ms) = (u64::MAX, 0u64);

    for (index, op) in ops.iter().enumerate() {
        first_ms = first_ms.min(op.time_ms);
        last_ms = last_ms.max(op.time_ms);
        let counts = match op.f {
            OpFunction::Send => Some(&mut sends),
            OpFunction::Poll => Some(&mut polls),
            OpFunction::Txn => Some(&mut transactions),
            OpFunction::Fault => {
                faults += u64::from(op.op_type != OpType::Invoke);
                None
            }
            _ => None,
        };
        if let Some(c) = counts {
            match op.op_type {
                OpType::Invoke => c.invoked += 1,
                OpType::Ok => c.ok += 1,
                OpType::Fail => c.fail += 1,
                OpType::Info => c.info += 1,
            }
        }
        // A transactional send that is not committed: written (its offset holds it)
        // but not acknowledged; aborted ones must never be read.
        let txn_outcome = op.txn.map(|id| outcomes.get(&id).map(|o| o.op_type));
        if let (OpFunction::Send, OpType::Ok, Some(outcome)) = (op.f, op.op_type, txn_outcome) {
            if outcome != Some(OpType::Ok) {
                if let (Some(p), Some(v)) = (op.partition, &op.value) {
                    let tp = (op.topic.clone(), p);
                    if let Some(o) = op.offset {
                        seen_at(&mut at_offset, &mut places, &tp, o, v);
                        if outcome == Some(OpType::Fail) {
                            aborted_at.insert((tp, o));
                        } else {
                            undecided_at.insert((tp, o));
                        }
                    }
                    if outcome == Some(OpType::Fail) {
                        let why = op
                            .txn
                            .and_then(|id| outcomes.get(&id))
                            .and_then(|o| o.error.clone())
                            .unwrap_or_default();
                        failed.insert(v.clone(), format!("its transaction aborted: {why}"));
                    }
                }
                continue;
            }
        }
        match (op.f, op.op_type) {
            (OpFunction::Send, OpType::Ok) => {
                if let (Some(p), Some(o), Some(v)) = (op.partition, op.offset, &op.value) {
                    let tp = (op.topic.clone(), p);
                    seen_at(&mut at_offset, &mut places, &tp, o, v);
                    ok_send_times
                        .entry(tp.clone())
                        .or_default()
                        .push(op.time_ms);
                    acked_by_process
                        .entry((op.process, tp.clone()))
                        .or_default()
                        .push((index, o));
                    acknowledged.push((tp, o, v.clone()));
                } else if let (Some(p), None, Some(v)) = (op.partition, op.offset, &op.value) {
                    let tp = (op.topic.clone(), p);
                    ok_send_times
                        .entry(tp.clone())
                        .or_default()
                        .push(op.time_ms);
                    acknowledged_unplaced.push((tp, v.clone(), op.process, index));
                }
            }
            (OpFunction::Send, OpType::Fail) => {
                if let Some(v) = &op.value {
                    failed.insert(v.clone(), op.error.clone().unwrap_or_default());
                }
            }
            (OpFunction::Send, OpType::Invoke) => {
                if let Some(p) = op.partition {
                    let _ = ok_send_times.entry((op.topic.clone(), p)).or_default();
                }
            }
            (OpFunction::Poll | OpFunction::FinalRead, OpType::Ok) => {
                for r in &op.records {
                    let tp = (r.topic.clone(), r.partition);
                    seen_at(&mut at_offset, &mut places, &tp, r.offset, &r.value);
                    read_values.insert(r.value.clone());
                    let m = max_read_offset.entry(tp).or_insert(r.offset);
                    *m = (*m).max(r.offset);
                }
            }
            _ => {}
        }
    }

    for (tp, offsets) in &at_offset {
        for (&offset, values) in offsets {
            if values.len() > 1 {
                anomalies.add(Anomaly {
                    kind: AnomalyKind::InconsistentOffsets,
                    topic: tp.0.clone(),
                    partition: tp.1,
                    offset: Some(offset),
                    value: None,
                    process: None,
                    detail: format!(
                        "values {}",
                        values
                            .iter()
                            .map(|v| v.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        }
    }
    for (value, at) in &places {
        if at.len() > 1 {
            let first = at.iter().next();
            anomalies.add(Anomaly {
                kind: AnomalyKind::Duplicate,
                topic: first.map(|((t, _), _)| t.clone()).unwrap_or_default(),
                partition: first.map_or(-1, |((_, p), _)| *p),
                offset: first.map(|(_, o)| *o),
                value: Some(value.clone()),
                process: None,
                detail: format!(
                    "at {}",
                    at.iter()
                        .map(|((t, p), o)| format!("{t}/{p}@{o}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
    }
    for (tp, offset, value) in &acknowledged {
        if read_values.contains(value) {
            continue;
        }
        let max_read = max_read_offset.get(tp).copied();
        let kind = if max_read.is_some_and(|m| m > *offset) {
            AnomalyKind::LostWrite
        } else {
            AnomalyKind::Unseen
        };
        anomalies.add(Anomaly {
            kind,
            topic: tp.0.clone(),
            partition: tp.1,
            offset: Some(*offset),
            value: Some(value.clone()),
            process: None,
            detail: match max_read {
                Some(m) => {
                    format!("acknowledged, never read; highest offset read in the partition {m}")
                }
                None => "acknowledged, never read; nothing read in the partition".into(),
            },
        });
    }
    for (tp, value, process, index) in &acknowledged_unplaced {
        if read_values.contains(value) {
            continue;
        }
        // Its producer's next acknowledged offset in the partition bounds it from above
        // (a producer's sends to one partition are acknowledged in order).
        let bound = acked_by_process
            .get(&(*process, tp.clone()))
            .and_then(|acks| acks.iter().find(|(i, _)| i > index))
            .map(|(_, o)| *o);
        let max_read = max_read_offset.get(tp).copied();
        let kind = match (bound, max_read) {
            (Some(b), Some(m)) if m >= b => AnomalyKind::LostWrite,
            _ => AnomalyKind::Unseen,
        };
        anomalies.add(Anomaly {
            kind,
            topic: tp.0.clone(),
            partition: tp.1,
            offset: None,
            value: Some(value.clone()),
            process: None,
            detail: format!(
                "acknowledged without an offset (below {}), never read; highest offset read in the partition {}",
                bound.map_or("-".into(), |b| b.to_string()),
                max_read.map_or("-".into(), |m| m.to_string())
            ),
        });
    }
    for op in ops {
        if matches!(op.f, OpFunction::Poll | OpFunction::FinalRead) && op.op_type == OpType::Ok {
            for r in &op.records {
                if let Some(error) = failed.get(&r.value) {
                    anomalies.add(Anomaly {
                        kind: AnomalyKind::AbortedRead,
                        topic: r.topic.clone(),
                        partition: r.partition,
                        offset: Some(r.offset),
                        value: Some(r.value.clone()),
                        process: Some(op.process),
                        detail: format!("read, but its send failed: {error}"),
                    });
                }
            }
        }
    }
    // Passing over an aborted record is right (reading it is the anomaly); an undecided
    // one that some read returned was committed after all, and passing over it a skip.
    let read_offsets: BTreeSet<(Tp, i64)> = ops
        .iter()
        .filter(|op| {
            matches!(op.f, OpFunction::Poll | OpFunction::FinalRead) && op.op_type == OpType::Ok
        })
        .flat_map(|op| op.records.iter())
        .map(|r| ((r.topic.clone(), r.partition), r.offset))
        .collect();
    let mut passable: BTreeSet<(Tp, i64)> =
        undecided_at.difference(&read_offsets).cloned().collect();
    passable.extend(aborted_at);
    check_poll_order(ops, &at_offset, &passable, &mut anomalies);

    let completed = sends.ok + sends.fail + sends.info + polls.ok + polls.fail + polls.info;
    let fraction_ok = if completed == 0 {
        1.0
    } else {
        (sends.ok + polls.ok) as f64 / completed as f64
    };
    let first_ms = if first_ms == u64::MAX { 0 } else { first_ms };
    let longest_unavailable = ok_send_times
        .into_iter()
        .map(|(tp, mut times)| {
            times.sort_unstable();
            let mut window = (first_ms, first_ms);
            let mut previous = first_ms;
            for t in times.into_iter().chain(std::iter::once(last_ms)) {
                if t.saturating_sub(previous) > window.1 - window.0 {
                    window = (previous, t);
                }
                previous = previous.max(t);
            }
            UnavailableWindow {
                topic: tp.0,
                partition: tp.1,
                start_ms: window.0,
                end_ms: window.1,
                duration_ms: window.1 - window.0,
            }
        })
        .collect();

    Report {
        counts: AnomalyKind::ALL
            .iter()
            .map(|&k| {
                (
                    k.name().to_string(),
                    anomalies.counts.get(&k).copied().unwrap_or(0),
                )
            })
            .collect(),
        anomalies: anomalies.list,
        sends,
        polls,
        transactions,
        fraction_ok,
        longest_unavailable,
        values_acknowledged: (acknowledged.len() + acknowledged_unplaced.len()) as u64,
        values_read: read_values.len() as u64,
        faults,
    }
}

/// nonmonotonic-poll and poll-skip: per consumer and partition, each record read by a
/// poll must be the next known offset after the previous one, unless the consumer's
/// assignment changed (an `assign` or `rebalance` line) in between. Final reads start
/// over from the beginning and are not checked for order.
fn check_poll_order(
    ops: &[Op],
    at_offset: &BTreeMap<Tp, BTreeMap<i64, BTreeSet<Value>>>,
    passable: &BTreeSet<(Tp, i64)>,
    anomalies: &mut Anomalies,
) {
    let mut last: BTreeMap<(i64, Tp), (i64, Value)> = BTreeMap::new();
    for op in ops {
        match (op.f, op.op_type) {
            (OpFunction::Assign | OpFunction::Rebalance, t) if t != OpType::Invoke => {
                last.retain(|(process, _), _| *process != op.process);
            }
            (OpFunction::Poll, OpType::Ok) => {
                for r in &op.records {
                    let tp = (r.topic.clone(), r.partition);
                    let key = (op.process, tp.clone());
                    if let Some((previous, previous_value)) = last.get(&key) {
                        let base = Anomaly {
                            kind: AnomalyKind::NonmonotonicPoll,
                            topic: tp.0.clone(),
                            partition: tp.1,
                            offset: Some(r.offset),
                            value: Some(r.value.clone()),
                            process: Some(op.process),
                            detail: String::new(),
                        };
                        if r.offset <= *previous {
                            anomalies.add(Anomaly {
                                detail: format!(
                                    "offset {} after offset {previous} (value {previous_value})",
                                    r.offset
                                ),
                                ..base
                            });
                        } else {
                            let skipped: Vec<i64> = at_offset
                                .get(&tp)
                                .map(|o| {
                                    o.range(previous.saturating_add(1)..r.offset)
                                        .map(|(k, _)| *k)
                                        .filter(|k| !passable.contains(&(tp.clone(), *k)))
                                        .collect()
                                })
                                .unwrap_or_default();
                            if !skipped.is_empty() {
                                anomalies.add(Anomaly {
                                    kind: AnomalyKind::PollSkip,
                                    detail: format!(
                                        "offset {} after offset {previous}, skipping known offsets {}",
                                        r.offset,
                                        skipped.iter().map(|o| o.to_string()).collect::<Vec<_>>().join(", ")
                                    ),
                                    ..base
                                });
                            }
                        }
                    }
                    last.insert(key, (r.offset, r.value.clone()));
                }
            }
            _ => {}
        }
    }
}

/// Parses and checks a history.
pub fn check_history(input: impl BufRead) -> Result<Report, HistoryError> {
    Ok(check(&parse_history(input)?))
}

#[cfg(test)]
mod tests;
