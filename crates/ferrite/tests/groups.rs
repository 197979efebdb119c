//! Consumer groups with librdkafka against a real `ferrite server`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{wait_for, Server, OP_TIMEOUT};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

const GROUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Records rebalance callbacks.
#[derive(Default)]
struct Ctx {
    assigns: AtomicUsize,
    revokes: AtomicUsize,
    revoked: Mutex<Vec<BTreeSet<i32>>>,
}
impl ClientContext for Ctx {}
impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = r {
            self.revokes.fetch_add(1, Ordering::SeqCst);
            self.revoked
                .lock()
                .unwrap()
                .push(tpl.elements().iter().map(|e| e.partition()).collect());
        }
    }
    fn post_rebalance(&self, _: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = r {
            self.assigns.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A group member polling on its own thread, committing after each message.
struct Member {
    stop: Arc<AtomicBool>,
    assignment: Arc<Mutex<BTreeSet<i32>>>,
    ctx: Arc<Mutex<Option<Arc<Ctx>>>>,
    thread: Option<JoinHandle<()>>,
}

type Seen = Arc<Mutex<Vec<String>>>;

impl Member {
    fn start(
        server: &Server,
        group: &str,
        topic: &str,
        extra: &[(&str, &str)],
        seen: Seen,
    ) -> Member {
        let stop = Arc::new(AtomicBool::new(false));
        let assignment = Arc::new(Mutex::new(BTreeSet::new()));
        let ctx_slot: Arc<Mutex<Option<Arc<Ctx>>>> = Arc::default();
        let mut cfg = server.config();
        cfg.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .set_log_level(RDKafkaLogLevel::Error);
        for (k, v) in extra {
            cfg.set(*k, *v);
        }
        let topic = topic.to_string();
        let (stop2, assignment2, ctx2) = (stop.clone(), assignment.clone(), ctx_slot.clone());
        let thread = std::thread::spawn(move || {
            let consumer: BaseConsumer<Ctx> = cfg.create_with_context(Ctx::default()).unwrap();
            consumer.subscribe(&[&topic]).unwrap();
            while !stop2.load(Ordering::SeqCst) {
                if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                    let m = m.unwrap();
                    seen.lock()
                        .unwrap()
                        .push(String::from_utf8(m.payload().unwrap().to_vec()).unwrap());
                    consumer.commit_message(&m, CommitMode::Sync).unwrap();
                }
                let a: BTreeSet<i32> = consumer
                    .assignment()
                    .unwrap()
                    .elements()
                    .iter()
                    .map(|e| e.partition())
                    .collect();
                *assignment2.lock().unwrap() = a;
                let mut slot = ctx2.lock().unwrap();
                if slot.is_none() {
                    *slot = Some(Arc::new(Ctx::default()));
                }
                let c = consumer.context();
                let mine = slot.as_ref().unwrap();
                mine.assigns
                    .store(c.assigns.load(Ordering::SeqCst), Ordering::SeqCst);
                mine.revokes
                    .store(c.revokes.load(Ordering::SeqCst), Ordering::SeqCst);
                *mine.revoked.lock().unwrap() = c.revoked.lock().unwrap().clone();
            }
            consumer.unsubscribe();
            drop(consumer); // close(): a dynamic member sends LeaveGroup
        });
        Member {
            stop,
            assignment,
            ctx: ctx_slot,
            thread: Some(thread),
        }
    }

    fn assignment(&self) -> BTreeSet<i32> {
        self.assignment.lock().unwrap().clone()
    }

    fn counters(&self) -> (usize, usize, Vec<BTreeSet<i32>>) {
        match self.ctx.lock().unwrap().as_ref() {
            Some(c) => (
                c.assigns.load(Ordering::SeqCst),
                c.revokes.load(Ordering::SeqCst),
                c.revoked.lock().unwrap().clone(),
            ),
            None => (0, 0, vec![]),
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until the members' assignments are disjoint, cover `0..partitions` and have
/// the given sizes (sorted).
fn wait_balanced(members: &[&Member], partitions: i32, sizes: &[usize]) {
    wait_for(
        &format!("assignment sizes {sizes:?}"),
        GROUP_TIMEOUT,
        || {
            let sets: Vec<BTreeSet<i32>> = members.iter().map(|m| m.assignment()).collect();
            let mut got: Vec<usize> = sets.iter().map(BTreeSet::len).collect();
            got.sort_unstable();
            let union: BTreeSet<i32> = sets.iter().flatten().copied().collect();
            let total: usize = sets.iter().map(BTreeSet::len).sum();
            (got == sizes && total == union.len() && union == (0..partitions).collect())
                .then_some(())
        },
    );
}

async fn produce(server: &Server, topic: &str, from: usize, count: usize) {
    let producer: FutureProducer = server.config().set("linger.ms", "2").create().unwrap();
    let futures: Vec<_> = (from..from + count)
        .map(|i| {
            let p = producer.clone();
            let topic = topic.to_string();
            async move {
                let v = format!("m{i}");
                let k = format!("k{i}");
                p.send(FutureRecord::to(&topic).key(&k).payload(&v), OP_TIMEOUT)
                    .await
                    .unwrap();
            }
        })
        .collect();
    futures::future::join_all(futures).await;
}

fn wait_seen(seen: &Seen, expected: usize) {
    wait_for(
        &format!("{expected} distinct messages"),
        GROUP_TIMEOUT,
        || {
            let distinct: BTreeSet<String> = seen.lock().unwrap().iter().cloned().collect();
            (distinct.len() >= expected).then_some(())
        },
    );
}

fn server() -> Server {
    Server::start(&[
        "group.initial.rebalance.delay.ms=200",
        "group.min.session.timeout.ms=1000",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_split_partitions_and_survive_join_leave_and_kill() {
    let server = server();
    server.create_topic("gt", 6, &[]).await;
    produce(&server, "gt", 0, 300).await;
    let seen: Seen = Arc::default();
    let a = Member::start(&server, "g1", "gt", &[], seen.clone());
    let b = Member::start(&server, "g1", "gt", &[], seen.clone());
    let c = Member::start(&server, "g1", "gt", &[], seen.clone());
    wait_balanced(&[&a, &b, &c], 6, &[2, 2, 2]);
    wait_seen(&seen, 300);

    // A fourth member joins.
    let d = Member::start(&server, "g1", "gt", &[], seen.clone());
    wait_balanced(&[&a, &b, &c, &d], 6, &[1, 1, 2, 2]);
    produce(&server, "gt", 300, 300).await;
    wait_seen(&seen, 600);

    // One leaves cleanly.
    d.stop();
    wait_balanced(&[&a, &b, &c], 6, &[2, 2, 2]);
    produce(&server, "gt", 600, 300).await;
    wait_seen(&seen, 900);
    // No crash so far, and commits follow processing: exactly once.
    let all = seen.lock().unwrap().clone();
    let distinct: BTreeSet<&String> = all.iter().collect();
    assert_eq!(all.len(), distinct.len(), "duplicates without any crash");

    // A member in another process is killed: its partitions move after the session timeout.
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args([
            "consume",
            "gt",
            "--group",
            "g1",
            "--from-beginning",
            "--bootstrap-server",
            &server.addr,
        ])
        .args([
            "--property",
            "session.timeout.ms=3000",
            "--property",
            "heartbeat.interval.ms=300",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child_lines = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let out = child.stdout.take().unwrap();
        let lines = child_lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        });
    }
    wait_for(
        "the fourth member to take partitions",
        GROUP_TIMEOUT,
        || {
            let held: usize = [&a, &b, &c].iter().map(|m| m.assignment().len()).sum();
            (held < 6).then_some(())
        },
    );
    child.kill().unwrap();
    child.wait().unwrap();
    wait_balanced(&[&a, &b, &c], 6, &[2, 2, 2]);
    produce(&server, "gt", 900, 300).await;
    wait_seen(&seen, 1200);
    a.stop();
    b.stop();
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_read_independently_and_offsets_survive_restart() {
    let mut server = server();
    server.create_topic("indep", 2, &[]).await;
    produce(&server, "indep", 0, 100).await;
    for group in ["ga", "gb"] {
        let seen: Seen = Arc::default();
        let m = Member::start(&server, group, "indep", &[], seen.clone());
        wait_seen(&seen, 100);
        assert_eq!(
            seen.lock().unwrap().len(),
            100,
            "{group} reads everything once"
        );
        m.stop();
    }
    // `ferrite group describe` reports committed offsets and lag.
    produce(&server, "indep", 100, 10).await;
    let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args([
            "group",
            "describe",
            "ga",
            "--json",
            "--bootstrap-server",
            &server.addr,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "Empty");
    let lag: i64 = v["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["lag"].as_i64().unwrap())
        .sum();
    let rows = v["partitions"].as_array().unwrap();
    for r in rows {
        assert_eq!(
            r["lag"].as_i64().unwrap(),
            r["log_end_offset"].as_i64().unwrap() - r["committed_offset"].as_i64().unwrap()
        );
    }
    assert_eq!(lag, 10);

    // Committed offsets survive kill -9 and a graceful restart.
    for graceful in [false, true] {
        if graceful {
            server.stop();
        } else {
            server.kill9();
        }
        server.restart();
        let c: BaseConsumer = server.config().set("group.id", "ga").create().unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("indep", 0);
        tpl.add_partition("indep", 1);
        let committed = c.committed_offsets(tpl, OP_TIMEOUT).unwrap();
        let sum: i64 = committed
            .elements()
            .iter()
            .map(|e| {
                if let Offset::Offset(o) = e.offset() {
                    o
                } else {
                    0
                }
            })
            .sum();
        assert_eq!(sum, 100, "graceful={graceful}");
    }
    // A restarted consumer resumes after its commits: only the 10 new messages.
    let seen: Seen = Arc::default();
    let m = Member::start(&server, "ga", "indep", &[], seen.clone());
    wait_seen(&seen, 10);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(seen.lock().unwrap().len(), 10);
    m.stop();

    // reset-offsets: refused while members run, then applied; a restart reads from 0.
    let seen: Seen = Arc::default();
    let m = Member::start(&server, "gb", "indep", &[], seen.clone());
    wait_for("gb to be assigned", GROUP_TIMEOUT, || {
        (m.assignment().len() == 2).then_some(())
    });
    let busy = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args([
            "group",
            "reset-offsets",
            "gb",
            "--topic",
            "indep",
            "--to-earliest",
            "--execute",
            "--bootstrap-server",
            &server.addr,
        ])
        .output()
        .unwrap();
    assert!(
        !busy.status.success(),
        "reset of a non-empty group must be refused"
    );
    m.stop();
    wait_for("gb to become empty", GROUP_TIMEOUT, || {
        let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
            .args([
                "group",
                "describe",
                "gb",
                "--json",
                "--bootstrap-server",
                &server.addr,
            ])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["state"] == "Empty").then_some(())
    });
    let dry = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args([
            "group",
            "reset-offsets",
            "gb",
            "--topic",
            "indep",
            "--to-earliest",
            "--dry-run",
            "--json",
            "--bootstrap-server",
            &server.addr,
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(v["executed"], false);
    assert!(v["plan"].as_array().unwrap().iter().all(|p| p["new"] == 0));
    let ok = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args([
            "group",
            "reset-offsets",
            "gb",
            "--topic",
            "indep",
            "--to-earliest",
            "--execute",
            "--bootstrap-server",
            &server.addr,
        ])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let seen: Seen = Arc::default();
    let m = Member::start(&server, "gb", "indep", &[], seen.clone());
    wait_seen(&seen, 110);
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_member_restart_does_not_rebalance_others() {
    let server = server();
    server.create_topic("st", 4, &[]).await;
    let seen: Seen = Arc::default();
    let props = |id: &'static str| [("group.instance.id", id), ("session.timeout.ms", "10000")];
    let a = Member::start(&server, "gs", "st", &props("static-a"), seen.clone());
    let b = Member::start(&server, "gs", "st", &props("static-b"), seen.clone());
    wait_balanced(&[&a, &b], 4, &[2, 2]);
    std::thread::sleep(Duration::from_millis(1500));
    let before_b = b.counters();
    let a_assignment = a.assignment();
    // Restart a: static members do not leave the group on close.
    a.stop();
    let a2 = Member::start(&server, "gs", "st", &props("static-a"), seen.clone());
    wait_for("a to get its partitions back", GROUP_TIMEOUT, || {
        (a2.assignment() == a_assignment).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(b.counters().0, before_b.0, "b was reassigned");
    assert_eq!(b.counters().1, before_b.1, "b was revoked");
    assert_eq!(b.assignment().len(), 2);

    // A second process with the same instance id fences the first.
    let fenced = Member::start(&server, "gs", "st", &props("static-a"), seen.clone());
    wait_for("the new instance to take over", GROUP_TIMEOUT, || {
        (fenced.assignment() == a_assignment).then_some(())
    });
    drop(a2);
    fenced.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooperative_sticky_revokes_only_moved_partitions() {
    let server = server();
    server.create_topic("coop", 6, &[]).await;
    let seen: Seen = Arc::default();
    let coop = [("partition.assignment.strategy", "cooperative-sticky")];
    let a = Member::start(&server, "gc", "coop", &coop, seen.clone());
    wait_balanced(&[&a], 6, &[6]);
    let b = Member::start(&server, "gc", "coop", &coop, seen.clone());
    wait_balanced(&[&a, &b], 6, &[3, 3]);
    let (_, _, revoked) = a.counters();
    // Incremental: a gave up exactly the 3 partitions b took, never all 6.
    assert!(!revoked.is_empty());
    assert!(revoked.iter().all(|r| r.len() <= 3), "{revoked:?}");
    let moved: BTreeSet<i32> = revoked.iter().flatten().copied().collect();
    assert_eq!(moved, b.assignment());
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_list_and_delete() {
    let server = server();
    server.create_topic("gl", 1, &[]).await;
    produce(&server, "gl", 0, 5).await;
    let seen: Seen = Arc::default();
    let m = Member::start(&server, "to-delete", "gl", &[], seen.clone());
    wait_seen(&seen, 5);
    let list = |state: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
            .args([
                "group",
                "list",
                "--json",
                "--bootstrap-server",
                &server.addr,
            ])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .any(|g| g["group"] == "to-delete" && g["state"] == state)
    };
    assert!(list("Stable"));
    let del = |expect_ok: bool| {
        let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
            .args([
                "group",
                "delete",
                "to-delete",
                "--bootstrap-server",
                &server.addr,
            ])
            .output()
            .unwrap();
        assert_eq!(
            out.status.success(),
            expect_ok,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    del(false); // NON_EMPTY_GROUP
    m.stop();
    wait_for("group to be empty", GROUP_TIMEOUT, || {
        list("Empty").then_some(())
    });
    del(true);
    let committed: HashMap<i32, Offset> = {
        let c: BaseConsumer = server
            .config()
            .set("group.id", "to-delete")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("gl", 0);
        c.committed_offsets(tpl, OP_TIMEOUT)
            .unwrap()
            .elements()
            .iter()
            .map(|e| (e.partition(), e.offset()))
            .collect()
    };
    assert_eq!(
        committed[&0],
        Offset::Invalid,
        "offsets deleted with the group"
    );
}

use common::raw;
use ferrite_protocol::kafka_protocol;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_group_requests_get_kafka_errors() {
    use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
    use kafka_protocol::messages::offset_commit_request::{
        OffsetCommitRequestPartition, OffsetCommitRequestTopic,
    };
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::ResponseError;
    let server = server();
    server.create_topic("known", 2, &[]).await;
    let s = |v: &str| StrBytes::from_string(v.to_string());
    let join = |session: i32, protocols: Vec<JoinGroupRequestProtocol>| {
        JoinGroupRequest::default()
            .with_group_id(GroupId(s("bad")))
            .with_session_timeout_ms(session)
            .with_rebalance_timeout_ms(10_000)
            .with_member_id(s(""))
            .with_protocol_type(s("consumer"))
            .with_protocols(protocols)
    };
    let proto = |meta: Vec<u8>| {
        JoinGroupRequestProtocol::default()
            .with_name(s("range"))
            .with_metadata(meta.into())
    };
    let r: JoinGroupResponse = raw(&server.addr, ApiKey::JoinGroup, 5, &join(10_000, vec![]));
    assert_eq!(
        r.error_code,
        ResponseError::InconsistentGroupProtocol.code()
    );
    let r: JoinGroupResponse = raw(
        &server.addr,
        ApiKey::JoinGroup,
        5,
        &join(10, vec![proto(vec![])]),
    );
    assert_eq!(r.error_code, ResponseError::InvalidSessionTimeout.code());
    let r: JoinGroupResponse = raw(
        &server.addr,
        ApiKey::JoinGroup,
        5,
        &join(999_999_999, vec![proto(vec![])]),
    );
    assert_eq!(r.error_code, ResponseError::InvalidSessionTimeout.code());
    let r: JoinGroupResponse = raw(
        &server.addr,
        ApiKey::JoinGroup,
        5,
        &join(10_000, vec![proto(vec![0u8; 2 * 1024 * 1024])]),
    );
    assert_eq!(r.error_code, ResponseError::InvalidRequest.code());
    // KIP-394: a new dynamic member first gets MEMBER_ID_REQUIRED and an id.
    let r: JoinGroupResponse = raw(
        &server.addr,
        ApiKey::JoinGroup,
        5,
        &join(10_000, vec![proto(vec![])]),
    );
    assert_eq!(r.error_code, ResponseError::MemberIdRequired.code());
    assert!(!r.member_id.is_empty());
    let hb: HeartbeatResponse = raw(
        &server.addr,
        ApiKey::Heartbeat,
        4,
        &HeartbeatRequest::default()
            .with_group_id(GroupId(s("bad")))
            .with_member_id(s("ghost"))
            .with_generation_id(1),
    );
    assert_eq!(hb.error_code, ResponseError::UnknownMemberId.code());

    // A commit naming an unknown topic and partition fails for those only.
    let part = |p: i32| {
        OffsetCommitRequestPartition::default()
            .with_partition_index(p)
            .with_committed_offset(5)
    };
    let commit = OffsetCommitRequest::default()
        .with_group_id(GroupId(s("committer")))
        .with_generation_id_or_member_epoch(-1)
        .with_member_id(s(""))
        .with_topics(vec![
            OffsetCommitRequestTopic::default()
                .with_name(TopicName(s("known")))
                .with_partitions(vec![part(0), part(7)]),
            OffsetCommitRequestTopic::default()
                .with_name(TopicName(s("unknown")))
                .with_partitions(vec![part(0)]),
        ]);
    let r: OffsetCommitResponse = raw(&server.addr, ApiKey::OffsetCommit, 8, &commit);
    let codes: Vec<(String, i32, i16)> = r
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(move |p| (t.name.0.to_string(), p.partition_index, p.error_code))
        })
        .collect();
    let unknown = ResponseError::UnknownTopicOrPartition.code();
    assert_eq!(
        codes,
        vec![
            ("known".into(), 0, 0),
            ("known".into(), 7, unknown),
            ("unknown".into(), 0, unknown)
        ]
    );
    let fetch: OffsetFetchResponse = raw(
        &server.addr,
        ApiKey::OffsetFetch,
        7,
        &OffsetFetchRequest::default()
            .with_group_id(GroupId(s("committer")))
            .with_topics(None),
    );
    assert_eq!(fetch.topics.len(), 1);
    assert_eq!(fetch.topics[0].partitions[0].committed_offset, 5);
    let fetch_v8: OffsetFetchResponse = raw(
        &server.addr,
        ApiKey::OffsetFetch,
        8,
        &OffsetFetchRequest::default().with_groups(vec![
            kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestGroup::default()
                .with_group_id(GroupId(s("committer")))
                .with_topics(None),
            kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestGroup::default()
                .with_group_id(GroupId(s("other")))
                .with_topics(None),
        ]),
    );
    assert_eq!(fetch_v8.groups.len(), 2, "KIP-709 batched OffsetFetch");
    assert_eq!(
        fetch_v8.groups[0].topics[0].partitions[0].committed_offset,
        5
    );
    // OffsetDelete on an empty group removes the commit.
    use kafka_protocol::messages::offset_delete_request::{
        OffsetDeleteRequestPartition, OffsetDeleteRequestTopic,
    };
    let od: OffsetDeleteResponse = raw(
        &server.addr,
        ApiKey::OffsetDelete,
        0,
        &OffsetDeleteRequest::default()
            .with_group_id(GroupId(s("committer")))
            .with_topics(vec![OffsetDeleteRequestTopic::default()
                .with_name(TopicName(s("known")))
                .with_partitions(vec![
                    OffsetDeleteRequestPartition::default().with_partition_index(0)
                ])]),
    );
    assert_eq!(od.error_code, 0);
    assert_eq!(od.topics[0].partitions[0].error_code, 0);
    let fetch: OffsetFetchResponse = raw(
        &server.addr,
        ApiKey::OffsetFetch,
        7,
        &OffsetFetchRequest::default()
            .with_group_id(GroupId(s("committer")))
            .with_topics(None),
    );
    assert!(fetch.topics.is_empty(), "{fetch:?}");
    let od: OffsetDeleteResponse = raw(
        &server.addr,
        ApiKey::OffsetDelete,
        0,
        &OffsetDeleteRequest::default().with_group_id(GroupId(s("no-such-group"))),
    );
    assert_eq!(od.error_code, ResponseError::GroupIdNotFound.code());
    // Deleting a group that does not exist.
    let del: DeleteGroupsResponse = raw(
        &server.addr,
        ApiKey::DeleteGroups,
        2,
        &DeleteGroupsRequest::default().with_groups_names(vec![GroupId(s("nope"))]),
    );
    assert_eq!(
        del.results[0].error_code,
        ResponseError::GroupIdNotFound.code()
    );
    // Clients may not write the internal topic.
    let md: MetadataResponse = raw(
        &server.addr,
        ApiKey::Metadata,
        12,
        &MetadataRequest::default().with_topics(None),
    );
    assert!(md
        .topics
        .iter()
        .any(|t| t.is_internal
            && t.name.as_ref().map(|n| n.0.as_str()) == Some("__consumer_offsets")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_offsets_is_compacted_and_survives_restart() {
    let mut server = Server::start(&[
        "offsets.topic.num.partitions=1",
        "offsets.topic.segment.bytes=4096",
        "log.retention.check.interval.ms=200",
    ]);
    server.create_topic("cmp", 1, &[]).await;
    produce(&server, "cmp", 0, 10).await;
    let c: BaseConsumer = server
        .config()
        .set("group.id", "compactme")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let commits = 600;
    for i in 0..commits {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("cmp", 0, Offset::Offset(i % 10))
            .unwrap();
        c.commit(&tpl, CommitMode::Sync).unwrap();
    }
    let dir = server.data_dir.join("__consumer_offsets-0");
    let log_bytes = || -> u64 {
        std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            // Compaction renames a new file over an old one while this runs: a file
            // listed a moment ago may be gone now, and counts as nothing.
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    };
    // ~600 commits of ~150 bytes each were written; compaction keeps the latest per key.
    wait_for("compaction of __consumer_offsets", GROUP_TIMEOUT, || {
        (log_bytes() < 16 * 1024).then_some(())
    });
    server.kill9();
    server.restart();
    let c: BaseConsumer = server
        .config()
        .set("group.id", "compactme")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition("cmp", 0);
    let got = c.committed_offsets(tpl, OP_TIMEOUT).unwrap();
    assert_eq!(
        got.elements()[0].offset(),
        Offset::Offset((commits - 1) % 10)
    );
}

/// Every record key and value of `__consumer_offsets-0`, read by a plain librdkafka
/// consumer (assign, no group), as tools like Burrow read the topic.
fn read_offsets_topic(server: &Server) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let c: BaseConsumer = server
        .config()
        .set("group.id", "raw-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("__consumer_offsets", 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + OP_TIMEOUT;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no end of __consumer_offsets-0"
        );
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push((
                m.key().unwrap_or_default().to_vec(),
                m.payload().map(<[u8]>::to_vec),
            )),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => return out,
            Some(Err(e)) => panic!("reading __consumer_offsets: {e}"),
            None => {}
        }
    }
}

/// A data directory written before Kafka's binary format (Ferrite's JSON records in
/// `__consumer_offsets`) is migrated at start-up: the committed offsets survive, and
/// afterwards the topic holds only Kafka-format records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_consumer_offsets_are_migrated_to_kafkas_format() {
    use ferrite_protocol::kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };
    let mut server = Server::start(&["offsets.topic.num.partitions=1"]);
    server.create_topic("mig", 2, &[]).await;
    produce(&server, "mig", 0, 20).await;
    fn commit(server: &Server, group: &str, offset: i64) {
        let c: BaseConsumer = server
            .config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("mig", 0, Offset::Offset(offset))
            .unwrap();
        c.commit(&tpl, CommitMode::Sync).unwrap();
    }
    commit(&server, "binary-group", 5);
    server.stop();

    // What Ferrite wrote before: JSON keys and values, a commit and a deleted group.
    let json = |k: &str, v: Option<&str>| (k.to_string(), v.map(str::to_string));
    let legacy = [
        json(
            r#"{"t":"offset","v":1,"group":"json-group","topic":"mig","partition":1}"#,
            Some(r#"{"offset":7,"leader_epoch":0,"metadata":"from json","commit_timestamp_ms":1}"#),
        ),
        json(
            r#"{"t":"offset","v":1,"group":"gone","topic":"mig","partition":0}"#,
            Some(r#"{"offset":3,"leader_epoch":0,"metadata":null,"commit_timestamp_ms":1}"#),
        ),
        json(
            r#"{"t":"offset","v":1,"group":"gone","topic":"mig","partition":0}"#,
            None,
        ),
    ];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let records: Vec<Record> = legacy
        .iter()
        .enumerate()
        .map(|(i, (k, v))| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: -1,
            timestamp: now,
            key: Some(bytes::Bytes::from(k.clone())),
            value: v.clone().map(bytes::Bytes::from),
            headers: Default::default(),
        })
        .collect();
    let mut batch = bytes::BytesMut::new();
    RecordBatchEncoder::encode(
        &mut batch,
        records.iter(),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .unwrap();
    let dir = server.data_dir.join("__consumer_offsets-0");
    let (mut log, _) =
        ferrite_storage::PartitionLog::open(&dir, ferrite_storage::LogConfig::default(), true)
            .unwrap();
    log.append(&batch, 0, now).unwrap();
    log.close().unwrap();

    server.restart();
    fn committed(server: &Server, group: &str, partition: i32) -> (Offset, String) {
        let c: BaseConsumer = server.config().set("group.id", group).create().unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("mig", partition);
        let got = c.committed_offsets(tpl, OP_TIMEOUT).unwrap();
        let e = &got.elements()[0];
        (e.offset(), e.metadata().to_string())
    }
    assert_eq!(committed(&server, "binary-group", 0).0, Offset::Offset(5));
    assert_eq!(
        committed(&server, "json-group", 1),
        (Offset::Offset(7), "from json".to_string())
    );
    assert_eq!(committed(&server, "gone", 0).0, Offset::Invalid);

    // The topic now holds Kafka's records only: OffsetCommitKey version 1, value version 3.
    let check_kafka_format = |records: &[(Vec<u8>, Option<Vec<u8>>)]| {
        assert!(!records.is_empty());
        for (k, v) in records {
            assert_ne!(k.first(), Some(&b'{'), "a JSON key is left: {k:?}");
            let version = i16::from_be_bytes([k[0], k[1]]);
            assert!((0..=2).contains(&version), "key version {version}");
            if let Some(v) = v {
                let vv = i16::from_be_bytes([v[0], v[1]]);
                assert_eq!(vv, 3, "value version");
            }
        }
    };
    let after = read_offsets_topic(&server);
    check_kafka_format(&after);
    let json_group_key: Vec<u8> = [
        &[0u8, 1][..],
        &[0, 10],
        b"json-group",
        &[0, 3],
        b"mig",
        &[0, 0, 0, 1],
    ]
    .concat();
    assert!(after.iter().any(|(k, _)| *k == json_group_key));

    // A second start has nothing to migrate and keeps the same state.
    server.stop();
    server.restart();
    assert_eq!(committed(&server, "json-group", 1).0, Offset::Offset(7));
    commit(&server, "binary-group", 9);
    assert_eq!(committed(&server, "binary-group", 0).0, Offset::Offset(9));
    check_kafka_format(&read_offsets_topic(&server));
}
