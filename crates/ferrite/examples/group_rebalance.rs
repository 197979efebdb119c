//! Consumer group benchmark (issue: consumer groups, "Performance"): how long a group of
//! 10 members on 60 partitions takes to be Stable again after a member leaves cleanly, is
//! killed, or is a static member that restarts; and OffsetCommit throughput.
//!
//! Run against a broker: `cargo run --release -p ferrite --example group_rebalance --
//! 127.0.0.1:9092 [rounds]`. Members are librdkafka consumers; the killed and the static
//! members run as `ferrite consume --group` child processes so that they can be SIGKILLed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

const MEMBERS: usize = 10;
const PARTITIONS: i32 = 60;
const SESSION_MS: &str = "6000";
const LIMIT: Duration = Duration::from_secs(120);

fn cfg(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap).set("log_level", "3");
    c
}

fn member_thread(
    bootstrap: &str,
    group: &str,
    topic: &str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let mut c = cfg(bootstrap);
    c.set("group.id", group)
        .set("session.timeout.ms", SESSION_MS)
        .set("heartbeat.interval.ms", "500");
    let topic = topic.to_string();
    std::thread::spawn(move || {
        let consumer: BaseConsumer = c.create().unwrap();
        consumer.subscribe(&[&topic]).unwrap();
        while !stop.load(Ordering::SeqCst) {
            let _ = consumer.poll(Duration::from_millis(50));
        }
        drop(consumer); // LeaveGroup
    })
}

fn child_member(bootstrap: &str, group: &str, topic: &str, instance: Option<&str>) -> Child {
    let exe = std::env::var("FERRITE_BIN").unwrap_or_else(|_| "target/release/ferrite".to_string());
    let mut cmd = Command::new(exe);
    cmd.args([
        "consume",
        topic,
        "--group",
        group,
        "--bootstrap-server",
        bootstrap,
    ])
    .args([
        "--property",
        &format!("session.timeout.ms={SESSION_MS}"),
        "--property",
        "heartbeat.interval.ms=500",
    ]);
    if let Some(i) = instance {
        cmd.args(["--property", &format!("group.instance.id={i}")]);
    }
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ferrite consume (set FERRITE_BIN)")
}

/// `(state, members)` from DescribeGroups.
fn describe(probe: &BaseConsumer, group: &str) -> (String, usize) {
    match probe.fetch_group_list(Some(group), Duration::from_secs(5)) {
        Ok(list) => list
            .groups()
            .first()
            .map(|g| (g.state().to_string(), g.members().len()))
            .unwrap_or_default(),
        Err(_) => (String::new(), 0),
    }
}

fn member_ids(probe: &BaseConsumer, group: &str) -> Vec<String> {
    match probe.fetch_group_list(Some(group), Duration::from_secs(5)) {
        Ok(list) => list
            .groups()
            .first()
            .map(|g| g.members().iter().map(|m| m.id().to_string()).collect())
            .unwrap_or_default(),
        Err(_) => vec![],
    }
}

/// Waits until the group is Stable with `members` members; returns the time since `t0`.
fn until_stable(probe: &BaseConsumer, group: &str, members: usize, t0: Instant) -> Duration {
    loop {
        let (state, n) = describe(probe, group);
        if state == "Stable" && n == members {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < LIMIT,
            "group {group} not Stable with {members} members: {state}/{n}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bootstrap = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:9092".to_string());
    let rounds: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let admin: AdminClient<DefaultClientContext> = cfg(&bootstrap).create().unwrap();
    let topic = format!("rebalance-{}", std::process::id());
    rt.block_on(admin.create_topics(
        [&NewTopic::new(
            &topic,
            PARTITIONS,
            TopicReplication::Fixed(1),
        )],
        &AdminOptions::new(),
    ))
    .unwrap();
    let probe: BaseConsumer = cfg(&bootstrap).create().unwrap();
    let (mut leave, mut kill, mut static_restart) = (vec![], vec![], vec![]);
    for round in 0..rounds {
        // Leave: 10 in-process members, one closes (LeaveGroup).
        let group = format!("leave-{round}-{}", std::process::id());
        let stops: Vec<Arc<AtomicBool>> = (0..MEMBERS)
            .map(|_| Arc::new(AtomicBool::new(false)))
            .collect();
        let threads: Vec<_> = stops
            .iter()
            .map(|s| member_thread(&bootstrap, &group, &topic, s.clone()))
            .collect();
        until_stable(&probe, &group, MEMBERS, Instant::now());
        let t0 = Instant::now();
        stops[0].store(true, Ordering::SeqCst);
        // Wait for the rebalance to start, then to finish.
        while describe(&probe, &group).1 == MEMBERS && t0.elapsed() < LIMIT {
            std::thread::sleep(Duration::from_millis(2));
        }
        leave.push(until_stable(&probe, &group, MEMBERS - 1, t0).as_secs_f64() * 1000.0);
        for s in &stops {
            s.store(true, Ordering::SeqCst);
        }
        threads.into_iter().for_each(|t| t.join().unwrap());

        // Kill: 9 in-process members plus one child process that is SIGKILLed.
        let group = format!("kill-{round}-{}", std::process::id());
        let stops: Vec<Arc<AtomicBool>> = (0..MEMBERS - 1)
            .map(|_| Arc::new(AtomicBool::new(false)))
            .collect();
        let threads: Vec<_> = stops
            .iter()
            .map(|s| member_thread(&bootstrap, &group, &topic, s.clone()))
            .collect();
        let mut child = child_member(&bootstrap, &group, &topic, None);
        until_stable(&probe, &group, MEMBERS, Instant::now());
        let t0 = Instant::now();
        child.kill().unwrap();
        child.wait().unwrap();
        while describe(&probe, &group).1 == MEMBERS && t0.elapsed() < LIMIT {
            std::thread::sleep(Duration::from_millis(5));
        }
        kill.push(until_stable(&probe, &group, MEMBERS - 1, t0).as_secs_f64() * 1000.0);
        for s in &stops {
            s.store(true, Ordering::SeqCst);
        }
        threads.into_iter().for_each(|t| t.join().unwrap());

        // Static restart: 9 in-process members plus a static child that is killed and restarted.
        let group = format!("static-{round}-{}", std::process::id());
        let stops: Vec<Arc<AtomicBool>> = (0..MEMBERS - 1)
            .map(|_| Arc::new(AtomicBool::new(false)))
            .collect();
        let threads: Vec<_> = stops
            .iter()
            .map(|s| member_thread(&bootstrap, &group, &topic, s.clone()))
            .collect();
        let mut child = child_member(&bootstrap, &group, &topic, Some("static-1"));
        until_stable(&probe, &group, MEMBERS, Instant::now());
        let before = member_ids(&probe, &group);
        let t0 = Instant::now();
        child.kill().unwrap();
        child.wait().unwrap();
        let mut child = child_member(&bootstrap, &group, &topic, Some("static-1"));
        // The group stays Stable; done when the new process holds the static member's
        // place (a new member id) and the group is Stable with all 10.
        loop {
            let ids = member_ids(&probe, &group);
            if ids.len() == MEMBERS
                && ids.iter().any(|i| !before.contains(i))
                && describe(&probe, &group).0 == "Stable"
            {
                break;
            }
            assert!(t0.elapsed() < LIMIT, "static member did not come back");
            std::thread::sleep(Duration::from_millis(5));
        }
        static_restart.push(t0.elapsed().as_secs_f64() * 1000.0);
        child.kill().unwrap();
        child.wait().unwrap();
        for s in &stops {
            s.store(true, Ordering::SeqCst);
        }
        threads.into_iter().for_each(|t| t.join().unwrap());
    }

    // OffsetCommit throughput: synchronous commits of 1 and of 60 partitions.
    let mut c = cfg(&bootstrap);
    c.set("group.id", format!("commits-{}", std::process::id()))
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = c.create().unwrap();
    let mut rates = vec![];
    for width in [1, PARTITIONS] {
        let t0 = Instant::now();
        let mut n = 0u64;
        while t0.elapsed() < Duration::from_secs(5) {
            let mut tpl = TopicPartitionList::new();
            for p in 0..width {
                tpl.add_partition_offset(&topic, p, Offset::Offset(n as i64))
                    .unwrap();
            }
            consumer.commit(&tpl, CommitMode::Sync).unwrap();
            n += 1;
        }
        rates.push((width, n as f64 / t0.elapsed().as_secs_f64()));
    }
    println!("group of {MEMBERS} members on {PARTITIONS} partitions, session.timeout.ms={SESSION_MS}, {rounds} rounds");
    println!(
        "stable again after a clean leave: median {:.0} ms {leave:.0?}",
        median(leave.clone())
    );
    println!(
        "stable again after a kill:        median {:.0} ms {kill:.0?}",
        median(kill.clone())
    );
    println!(
        "stable after a static restart:    median {:.0} ms {static_restart:.0?}",
        median(static_restart.clone())
    );
    for (width, rate) in rates {
        println!("OffsetCommit (sync, {width} partition(s) per commit): {rate:.0} commits/s");
    }
}
