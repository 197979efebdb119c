//! `ferrite dev cluster`: N combined broker+controller nodes on loopback as child
//! processes of this one, for development and for trying a client against a cluster.
//!
//! Node `i` (1-based) listens on 127.0.0.1:`base_port + i - 1` and runs its controller
//! on 127.0.0.1:`base_port + nodes + i - 1`; its data directory is `DIR/node-i`. Every
//! node gets the same `--controller-quorum-voters`. When every node printed its ready
//! line, the bootstrap string is printed on stdout. Ctrl-C or SIGTERM stops every node
//! with SIGTERM (by PID), then SIGKILL after [`STOP_TIMEOUT_MS`]; a node that exits on
//! its own stops the others and the command fails.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A node must print its ready line within this.
const READY_TIMEOUT_MS: u64 = 120_000;
/// After SIGTERM, a node gets this long before SIGKILL.
const STOP_TIMEOUT_MS: u64 = 30_000;
/// Far more nodes than a development cluster on one machine needs.
const NODES_MAX: u16 = 64;

#[derive(Args)]
pub struct DevArgs {
    #[command(subcommand)]
    command: DevCommand,
}

#[derive(Subcommand)]
enum DevCommand {
    /// Start N combined broker+controller nodes on 127.0.0.1 as child processes; print
    /// the bootstrap string; stop them all on Ctrl-C or SIGTERM.
    Cluster(ClusterArgs),
}

#[derive(Args)]
struct ClusterArgs {
    /// How many nodes (each a broker and a controller voter).
    #[arg(long, default_value_t = 3)]
    nodes: u16,
    /// Spread the nodes over this many racks (broker.rack rack-0, rack-1, ..., in turn);
    /// 0 sets no rack.
    #[arg(long, default_value_t = 0)]
    racks: u16,
    /// First broker port; brokers use base-port .. base-port+N-1, controllers the next N.
    #[arg(long, default_value_t = 9092)]
    base_port: u16,
    /// Parent of the nodes' data directories (node-1, node-2, ...).
    #[arg(long, default_value = "ferrite-dev-cluster")]
    data_dir: PathBuf,
    /// A broker config given to every node, as for `ferrite server --set`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

/// One node's command line (without the binary).
struct NodePlan {
    node_id: u16,
    listen: String,
    args: Vec<String>,
}

fn plan(a: &ClusterArgs) -> anyhow::Result<Vec<NodePlan>> {
    if a.nodes == 0 || a.nodes > NODES_MAX {
        bail!("--nodes must be 1..={NODES_MAX}");
    }
    let ports_needed = u32::from(a.nodes) * 2;
    if u32::from(a.base_port) + ports_needed > 65_536 || a.base_port == 0 {
        bail!(
            "--base-port {} leaves no room for {ports_needed} ports",
            a.base_port
        );
    }
    let broker_port = |i: u16| a.base_port + i;
    let controller_port = |i: u16| a.base_port + a.nodes + i;
    let voters = (0..a.nodes)
        .map(|i| format!("{}@127.0.0.1:{}", i + 1, controller_port(i)))
        .collect::<Vec<_>>()
        .join(",");
    Ok((0..a.nodes)
        .map(|i| {
            let node_id = i + 1;
            let listen = format!("127.0.0.1:{}", broker_port(i));
            let mut args = vec![
                "server".to_string(),
                "--node-id".to_string(),
                node_id.to_string(),
                "--process-roles".to_string(),
                "broker,controller".to_string(),
                "--listen".to_string(),
                listen.clone(),
                "--controller-listen".to_string(),
                format!("127.0.0.1:{}", controller_port(i)),
                "--controller-quorum-voters".to_string(),
                voters.clone(),
                "--data-dir".to_string(),
                a.data_dir
                    .join(format!("node-{node_id}"))
                    .display()
                    .to_string(),
            ];
            if a.racks > 0 {
                args.push("--rack".to_string());
                args.push(format!("rack-{}", i % a.racks));
            }
            for s in &a.set {
                args.push("--set".to_string());
                args.push(s.clone());
            }
            NodePlan {
                node_id,
                listen,
                args,
            }
        })
        .collect())
}

pub async fn dev(args: DevArgs) -> anyhow::Result<()> {
    match args.command {
        DevCommand::Cluster(a) => cluster(a).await,
    }
}

struct Running {
    node_id: u16,
    child: Child,
}

async fn cluster(a: ClusterArgs) -> anyhow::Result<()> {
    let plans = plan(&a)?;
    let exe = std::env::current_exe().context("finding the ferrite binary")?;
    let mut running: Vec<Running> = Vec::new();
    let result = start_and_wait(&exe, &plans, &mut running).await;
    let stopped = stop_all(&mut running).await;
    result.and(stopped)
}

async fn start_and_wait(
    exe: &std::path::Path,
    plans: &[NodePlan],
    running: &mut Vec<Running>,
) -> anyhow::Result<()> {
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<u16>(plans.len());
    // Every node starts before any is waited for: the quorum needs a majority up.
    for p in plans {
        let mut child = Command::new(exe)
            .args(&p.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting node {}", p.node_id))?;
        if let Some(out) = child.stdout.take() {
            let tx = ready_tx.clone();
            let node_id = p.node_id;
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.starts_with("ferrite ready") {
                        let _ = tx.send(node_id).await;
                    }
                    println!("[node {node_id}] {line}");
                }
            });
        }
        running.push(Running {
            node_id: p.node_id,
            child,
        });
    }
    drop(ready_tx);
    let mut ready = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(READY_TIMEOUT_MS);
    while ready < plans.len() {
        tokio::select! {
            r = ready_rx.recv() => match r {
                Some(_) => ready += 1,
                None => break,
            },
            exited = first_exit(running) => {
                let (node_id, status) = exited;
                bail!("node {node_id} exited before the cluster was ready ({status})");
            }
            _ = tokio::time::sleep_until(deadline) => {
                bail!("{} of {} nodes ready after {READY_TIMEOUT_MS} ms", ready, plans.len());
            }
        }
    }
    let bootstrap = plans
        .iter()
        .map(|p| p.listen.as_str())
        .collect::<Vec<_>>()
        .join(",");
    println!("ferrite dev cluster ready: bootstrap {bootstrap}");
    tokio::select! {
        _ = shutdown_signal() => {
            println!("ferrite dev cluster: stopping {} nodes", running.len());
            Ok(())
        }
        exited = first_exit(running) => {
            let (node_id, status) = exited;
            bail!("node {node_id} exited ({status}); stopping the others")
        }
    }
}

/// Waits until any node exits; returns its id and status.
async fn first_exit(running: &mut [Running]) -> (u16, String) {
    loop {
        for r in running.iter_mut() {
            match r.child.try_wait() {
                Ok(Some(status)) => return (r.node_id, status.to_string()),
                Ok(None) => {}
                Err(e) => return (r.node_id, format!("wait failed: {e}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM to every running node by PID, then waits; SIGKILL after STOP_TIMEOUT_MS.
async fn stop_all(running: &mut [Running]) -> anyhow::Result<()> {
    for r in running.iter_mut() {
        if let Ok(None) = r.child.try_wait() {
            if let Some(pid) = r
                .child
                .id()
                .and_then(|p| i32::try_from(p).ok())
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
    }
    let mut failed = Vec::new();
    for r in running.iter_mut() {
        match tokio::time::timeout(Duration::from_millis(STOP_TIMEOUT_MS), r.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => failed.push(format!("node {} exited {status}", r.node_id)),
            Ok(Err(e)) => failed.push(format!("node {}: {e}", r.node_id)),
            Err(_) => {
                let _ = r.child.kill().await;
                failed.push(format!(
                    "node {} ignored SIGTERM for {STOP_TIMEOUT_MS} ms: killed",
                    r.node_id
                ));
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("{}", failed.join("; "))
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn args(nodes: u16, racks: u16) -> ClusterArgs {
        ClusterArgs {
            nodes,
            racks,
            base_port: 19092,
            data_dir: PathBuf::from("/tmp/dc"),
            set: vec!["num.partitions=3".to_string()],
        }
    }

    #[test]
    fn plan_gives_each_node_its_ports_voters_and_rack() {
        let p = plan(&args(3, 2)).unwrap();
        assert_eq!(p.len(), 3);
        let voters = "1@127.0.0.1:19095,2@127.0.0.1:19096,3@127.0.0.1:19097";
        assert_eq!(p[1].listen, "127.0.0.1:19093");
        let a = p[1].args.join(" ");
        assert_eq!(
            a,
            format!(
                "server --node-id 2 --process-roles broker,controller --listen 127.0.0.1:19093 \
                 --controller-listen 127.0.0.1:19096 --controller-quorum-voters {voters} \
                 --data-dir /tmp/dc/node-2 --rack rack-1 --set num.partitions=3"
            )
        );
        assert!(p[2].args.join(" ").contains("--rack rack-0"));
        assert!(!plan(&args(3, 0)).unwrap()[0]
            .args
            .contains(&"--rack".to_string()));
    }

    #[test]
    fn plan_refuses_impossible_sizes() {
        assert!(plan(&args(0, 0)).is_err());
        assert!(plan(&args(NODES_MAX + 1, 0)).is_err());
        let mut a = args(3, 0);
        a.base_port = 65_533;
        assert!(plan(&a).is_err());
    }
}
