//! The metadata quorum over real TCP on 127.0.0.1 ephemeral ports: formation, commits,
//! failover, catch-up from the log and from a snapshot, the minority side, and crash
//! recovery. Timers are shortened; every wait has a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::time::Duration;

use ferrite_metadata::MetadataRecord;
use ferrite_raft::{MetadataQuorum, QuorumConfig, QuorumError, QuorumRole, QuorumTiming, Voter};
use tokio::net::TcpListener;
use tokio::time::Instant;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

fn timing() -> QuorumTiming {
    QuorumTiming {
        heartbeat_interval: Duration::from_millis(100),
        election_timeout: Duration::from_millis(600),
        fetch_timeout: Duration::from_millis(1200),
        request_timeout: Duration::from_millis(1000),
        reconnect_backoff: Duration::from_millis(100),
        write_timeout: Duration::from_secs(4),
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

fn topic(name: &str) -> Vec<MetadataRecord> {
    vec![MetadataRecord::Topic {
        name: name.into(),
        topic_id: Uuid::new_v4(),
    }]
}

struct Cluster {
    dirs: Vec<tempfile::TempDir>,
    addrs: Vec<SocketAddr>,
    voters: Vec<Voter>,
    nodes: Vec<Option<MetadataQuorum>>,
    snapshot_interval_entries: u64,
    entries_kept_after_snapshot: u64,
}

impl Cluster {
    async fn new(n: usize) -> Cluster {
        Self::with_snapshots(n, 1000, 100).await
    }

    async fn with_snapshots(n: usize, interval: u64, kept: u64) -> Cluster {
        init_tracing();
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for _ in 0..n {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(l.local_addr().unwrap());
            listeners.push(l);
        }
        let voters = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| Voter {
                id: i as u64 + 1,
                host: a.ip().to_string(),
                port: a.port(),
            })
            .collect();
        let mut c = Cluster {
            dirs: (0..n).map(|_| tempfile::tempdir().unwrap()).collect(),
            addrs,
            voters,
            nodes: (0..n).map(|_| None).collect(),
            snapshot_interval_entries: interval,
            entries_kept_after_snapshot: kept,
        };
        for (i, l) in listeners.into_iter().enumerate() {
            c.nodes[i] = Some(c.start_on(i, l).await.unwrap());
        }
        c
    }

    fn config(&self, i: usize) -> QuorumConfig {
        let mut config = QuorumConfig::new(
            i as u64 + 1,
            self.addrs[i],
            self.voters.clone(),
            self.dirs[i].path().to_path_buf(),
        );
        config.timing = timing();
        config.snapshot_interval_entries = self.snapshot_interval_entries;
        config.entries_kept_after_snapshot = self.entries_kept_after_snapshot;
        config
    }

    async fn start_on(&self, i: usize, l: TcpListener) -> Result<MetadataQuorum, QuorumError> {
        MetadataQuorum::start_with(self.config(i), Some(l)).await
    }

    /// Restarts node `i` on its old address and directory.
    async fn restart(&mut self, i: usize) -> Result<(), QuorumError> {
        assert!(self.nodes[i].is_none());
        let l = TcpListener::bind(self.addrs[i]).await.unwrap();
        self.nodes[i] = Some(self.start_on(i, l).await?);
        Ok(())
    }

    async fn stop(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.shutdown().await;
        }
    }

    fn node(&self, i: usize) -> &MetadataQuorum {
        self.nodes[i].as_ref().unwrap()
    }

    /// Waits until exactly one running node is the active controller and every other
    /// running node names it; returns its position.
    async fn wait_leader(&self) -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            let running: Vec<usize> = (0..self.nodes.len())
                .filter(|i| self.nodes[*i].is_some())
                .collect();
            let active: Vec<usize> = running
                .iter()
                .copied()
                .filter(|i| self.node(*i).status().is_active_controller)
                .collect();
            if let [leader] = active.as_slice() {
                let id = *leader as u64 + 1;
                if running
                    .iter()
                    .all(|i| self.node(*i).status().leader_id == Some(id))
                {
                    return *leader;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Writes through node `i`, retrying while a leader is being (re)elected.
    async fn write(&self, i: usize, records: Vec<MetadataRecord>) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.node(i).write(records.clone()).await {
                Ok(index) => return index,
                Err(e @ (QuorumError::NotController { .. } | QuorumError::Timeout(_))) => {
                    assert!(
                        Instant::now() < deadline,
                        "write not committed within {WAIT:?}: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("write failed: {e}"),
            }
        }
    }

    async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_voter_quorum_commits_and_restarts_with_its_image() {
    let mut c = Cluster::new(1).await;
    assert_eq!(c.wait_leader().await, 0);
    let a = c.write(0, topic("a")).await;
    let b = c.write(0, topic("b")).await;
    assert!(b > a);
    let applied = c.node(0).wait_applied(b, WAIT).await.unwrap();
    assert!(applied.image.topic("a").is_some() && applied.image.topic("b").is_some());

    c.stop(0).await;
    c.restart(0).await.unwrap();
    // The committed entries are re-applied at start, before any election.
    let applied = c
        .node(0)
        .wait_applied(b, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(applied.image.topic("b").is_some());
    c.wait_leader().await;
    let after = c.write(0, topic("c")).await;
    assert!(after > b);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voters_form_a_quorum_and_commit_through_any_voter() {
    let c = Cluster::new(3).await;
    let leader = c.wait_leader().await;
    let follower = (leader + 1) % 3;
    let a = c.write(leader, topic("from-leader")).await;
    // A follower forwards to the leader.
    let b = c.write(follower, topic("from-follower")).await;
    assert!(b > a);
    let images: Vec<_> = futures_join(&c, b).await;
    for img in &images {
        assert!(img.topic("from-leader").is_some() && img.topic("from-follower").is_some());
        assert_eq!(**img, *images[0]);
    }
    let status = c.node(leader).status();
    assert_eq!(status.voter_log_end.len(), 3, "{status:?}");
    c.shutdown().await;
}

async fn futures_join(
    c: &Cluster,
    index: u64,
) -> Vec<std::sync::Arc<ferrite_metadata::MetadataImage>> {
    let mut out = Vec::new();
    for i in 0..c.nodes.len() {
        if let Some(n) = &c.nodes[i] {
            out.push(n.wait_applied(index, WAIT).await.unwrap().image);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_shutdown_elects_another_and_the_old_leader_catches_up_from_the_log() {
    let mut c = Cluster::new(3).await;
    let old = c.wait_leader().await;
    let a = c.write(old, topic("before")).await;
    c.node(old).wait_applied(a, WAIT).await.unwrap();
    let old_epoch = c.node(old).status().leader_epoch;

    c.stop(old).await;
    let new = c.wait_leader().await;
    assert_ne!(new, old);
    assert!(c.node(new).status().leader_epoch > old_epoch);
    let survivor = (0..3).find(|i| *i != old && *i != new).unwrap();
    let b = c.write(survivor, topic("after")).await;
    for img in futures_join(&c, b).await {
        assert!(img.topic("before").is_some() && img.topic("after").is_some());
    }

    // The old leader restarts, follows, and gets what it missed from the log.
    c.restart(old).await.unwrap();
    let img = c.node(old).wait_applied(b, WAIT).await.unwrap().image;
    assert!(img.topic("after").is_some());
    assert_eq!(
        c.node(old).status().snapshot_index,
        None,
        "caught up without a snapshot"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_voter_catches_up_from_a_snapshot_after_the_leader_purged_its_log() {
    // A snapshot every 3 entries, nothing kept behind it.
    let mut c = Cluster::with_snapshots(3, 3, 0).await;
    let leader = c.wait_leader().await;
    let lagging = (leader + 1) % 3;
    let first = c.write(leader, topic("t0")).await;
    c.node(lagging).wait_applied(first, WAIT).await.unwrap();
    c.stop(lagging).await;

    let mut last = first;
    for i in 1..10 {
        last = c.write(leader, topic(&format!("t{i}"))).await;
    }
    // The leader snapshots and purges past everything the lagging voter has.
    let deadline = Instant::now() + WAIT;
    while c
        .node(leader)
        .status()
        .purged_index
        .is_none_or(|p| p <= first + 1)
    {
        assert!(
            Instant::now() < deadline,
            "leader never purged: {:?}",
            c.node(leader).status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(c.dirs[leader].path().join("quorum.snapshot").exists());

    c.restart(lagging).await.unwrap();
    let img = c
        .node(lagging)
        .wait_applied(last, WAIT)
        .await
        .unwrap()
        .image;
    assert_eq!(img.topics().count(), 10);
    let leader_img = c.node(leader).wait_applied(last, WAIT).await.unwrap().image;
    assert_eq!(
        img.topics().collect::<Vec<_>>(),
        leader_img.topics().collect::<Vec<_>>()
    );
    // The status follows openraft's metrics, a moment after the image.
    let deadline = Instant::now() + WAIT;
    while c.node(lagging).status().snapshot_index.is_none() {
        assert!(
            Instant::now() < deadline,
            "the lagging voter has no snapshot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // And it restarts from that snapshot plus its log.
    c.stop(lagging).await;
    c.restart(lagging).await.unwrap();
    let img = c
        .node(lagging)
        .wait_applied(last, WAIT)
        .await
        .unwrap()
        .image;
    assert_eq!(img.topics().count(), 10);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_a_majority_commits_nothing_and_stops_being_active() {
    let mut c = Cluster::new(3).await;
    let leader = c.wait_leader().await;
    let a = c.write(leader, topic("committed")).await;
    c.node(leader).wait_applied(a, WAIT).await.unwrap();
    for i in 0..3 {
        if i != leader {
            c.stop(i).await;
        }
    }
    let applied_before = c.node(leader).applied().borrow().raft_commit_index;

    // While it still believes it leads, a write cannot commit: it times out.
    let started = Instant::now();
    match c.node(leader).write(topic("lost")).await {
        Err(QuorumError::Timeout(_)) | Err(QuorumError::NotController { .. }) => {}
        other => panic!("a minority committed a write: {other:?}"),
    }
    assert!(started.elapsed() <= timing().write_timeout + Duration::from_secs(2));

    // Within the fetch timeout (plus slack) it stops claiming to be the controller.
    let deadline = Instant::now() + timing().fetch_timeout + Duration::from_secs(5);
    loop {
        let s = c.node(leader).status();
        if !s.is_active_controller && s.leader_id.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still active without a majority: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Now it refuses at once.
    let started = Instant::now();
    assert!(matches!(
        c.node(leader).write(topic("refused")).await,
        Err(QuorumError::NotController { leader: None })
    ));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        c.node(leader).applied().borrow().raft_commit_index,
        applied_before
    );

    // One voter back makes a majority again: writes commit.
    let back = (leader + 1) % 3;
    c.restart(back).await.unwrap();
    let b = c.write(back, topic("healed")).await;
    let img = c.node(back).wait_applied(b, WAIT).await.unwrap().image;
    assert!(img.topic("healed").is_some() && img.topic("refused").is_none());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_with_a_torn_log_tail_recovers_and_corruption_is_refused() {
    let mut c = Cluster::new(1).await;
    c.wait_leader().await;
    let a = c.write(0, topic("a")).await;
    let b = c.write(0, topic("b")).await;
    c.node(0).wait_applied(b, WAIT).await.unwrap();
    c.stop(0).await;

    // The crash cut an append short: half a frame after the last full one.
    let log = c.dirs[0].path().join(ferrite_raft::log_store::LOG_FILE);
    let full = std::fs::read(&log).unwrap();
    let mut torn = full.clone();
    torn.extend_from_slice(&[0, 0, 1, 0, 0x12, 0x34, 0x56, 0x78, b'{', b'"']);
    std::fs::write(&log, &torn).unwrap();
    c.restart(0).await.unwrap();
    let img = c.node(0).wait_applied(b, WAIT).await.unwrap().image;
    assert!(img.topic("a").is_some() && img.topic("b").is_some());
    c.wait_leader().await;
    let d = c.write(0, topic("after-crash")).await;
    assert!(d > b && a < b);
    c.stop(0).await;

    // A flipped byte in an early entry, with valid entries after it: refused.
    let mut bad = std::fs::read(&log).unwrap();
    bad[12] ^= 0x20;
    std::fs::write(&log, &bad).unwrap();
    match c.restart(0).await {
        Err(QuorumError::Store(e)) => assert!(e.to_string().contains("corrupt"), "{e}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(()) => panic!("a corrupt quorum log was accepted"),
    }
    c.shutdown().await;
}

/// Starts observer `id` (a broker-only node) on a fresh ephemeral port.
async fn start_observer(
    c: &Cluster,
    id: u64,
    dir: &std::path::Path,
) -> Result<MetadataQuorum, QuorumError> {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let mut config = QuorumConfig::new(id, addr, c.voters.clone(), dir.to_path_buf());
    config.role = QuorumRole::Observer {
        advertised: addr.to_string(),
    };
    config.timing = timing();
    MetadataQuorum::start_with(config, Some(l)).await
}

/// Waits until the observer names voter position `leader` as the leader.
async fn wait_observer_follows(observer: &MetadataQuorum, leader: usize) {
    let deadline = Instant::now() + WAIT;
    while observer.status().leader_id != Some(leader as u64 + 1) {
        assert!(
            Instant::now() < deadline,
            "observer does not follow {}: {:?}",
            leader + 1,
            observer.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_follows_the_log_forwards_writes_and_never_votes() {
    // A snapshot every 3 entries, nothing kept behind it: the observer, started late,
    // can only catch up from a snapshot.
    let mut c = Cluster::with_snapshots(3, 3, 0).await;
    let leader = c.wait_leader().await;
    let mut last = 0;
    for i in 0..8 {
        last = c.write(leader, topic(&format!("t{i}"))).await;
    }
    let dir = tempfile::tempdir().unwrap();

    // An observer may not take a voter's id.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut bad = QuorumConfig::new(
        2,
        l.local_addr().unwrap(),
        c.voters.clone(),
        dir.path().into(),
    );
    bad.role = QuorumRole::Observer {
        advertised: l.local_addr().unwrap().to_string(),
    };
    assert!(matches!(
        MetadataQuorum::start_with(bad, Some(l)).await,
        Err(QuorumError::Config(_))
    ));

    let observer = start_observer(&c, 4, dir.path()).await.unwrap();
    let img = observer.wait_applied(last, WAIT).await.unwrap().image;
    assert_eq!(img.topics().count(), 8);
    wait_observer_follows(&observer, leader).await;

    // Its writes are forwarded to the leader and reach everyone.
    let from_observer = observer
        .write(topic("from-observer"))
        .await
        .expect("a write through the observer");
    for img in futures_join(&c, from_observer).await {
        assert!(img.topic("from-observer").is_some());
    }
    observer.wait_applied(from_observer, WAIT).await.unwrap();
    let described = c.node(leader).describe().unwrap();
    assert_eq!(described.voters.len(), 3, "{described:?}");
    assert!(
        described.observers.iter().any(|o| o.node_id == 4),
        "{described:?}"
    );
    assert!(described.voters.iter().all(|v| v.node_id != 4));

    // The leader goes: a voter takes over, the observer never stands.
    c.stop(leader).await;
    let new = c.wait_leader().await;
    assert!(!observer.status().is_active_controller);
    wait_observer_follows(&observer, new).await;
    let after_failover = c.write(new, topic("after-failover")).await;
    assert!(observer
        .wait_applied(after_failover, WAIT)
        .await
        .unwrap()
        .image
        .topic("after-failover")
        .is_some());

    // Restarted on another port, it is reached at the new address.
    observer.shutdown().await;
    let observer = start_observer(&c, 4, dir.path()).await.unwrap();
    let after_restart = c.write(new, topic("after-restart")).await;
    let img = observer
        .wait_applied(after_restart, WAIT)
        .await
        .unwrap()
        .image;
    assert!(img.topic("after-restart").is_some() && img.topic("t0").is_some());
    assert!(!observer.status().is_active_controller);

    // The two remaining voters still make a majority of three without it.
    c.restart(leader).await.unwrap();
    let last = c.write(new, topic("last")).await;
    observer.wait_applied(last, WAIT).await.unwrap();
    observer.shutdown().await;
    c.shutdown().await;
}
