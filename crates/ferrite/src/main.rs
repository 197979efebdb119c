//! `ferrite`: the broker (`ferrite server`) and Kafka client subcommands in one binary.

mod bench;
mod client;
mod group;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ferrite_broker::{Broker, BrokerConfig};

#[derive(Parser)]
#[command(
    name = "ferrite",
    version,
    about = "A Kafka-compatible distributed commit log"
)]
struct Cli {
    /// Log filter (overrides RUST_LOG), e.g. `info` or `ferrite_broker=debug`.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a broker. With no arguments: single node on 127.0.0.1:9092, data in ./ferrite-data.
    Server(ServerArgs),
    /// Create, list, describe, alter and delete topics.
    Topic(client::TopicArgs),
    /// Produce lines from stdin to a topic.
    Produce(client::ProduceArgs),
    /// Consume a topic to stdout.
    Consume(client::ConsumeArgs),
    /// List, describe, delete consumer groups and reset their offsets.
    Group(group::GroupArgs),
    /// Load generators: produce, consume and end-to-end, with HDR latency histograms.
    Bench(bench::BenchArgs),
}

#[derive(Args)]
struct ServerArgs {
    /// Address to listen on.
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Address given to clients in metadata (defaults to the bound address).
    #[arg(long, value_name = "HOST:PORT")]
    advertised_listener: Option<String>,
    /// Data directory.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// This broker's node id.
    #[arg(long, value_name = "N")]
    node_id: Option<i32>,
    /// This broker's rack, for replica placement.
    #[arg(long, value_name = "NAME")]
    rack: Option<String>,
    /// TOML file of broker configs (Kafka key names, e.g. `"num.partitions" = 3`).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Any broker config, Kafka key names; repeatable. Applied after --config.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The client subcommands stay quiet: librdkafka reports expected events (such as the
    // end of a partition) as errors through the rdkafka crate's logger.
    let default_filter = if matches!(cli.command, Command::Server(_)) {
        "info"
    } else {
        "warn,rdkafka=off"
    };
    let filter = cli
        .log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| default_filter.to_string());
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferrite: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Server(args) => run_server(args).await,
            Command::Topic(args) => client::topic(args).await,
            Command::Produce(args) => client::produce(args).await,
            Command::Consume(args) => client::consume(args).await,
            Command::Group(args) => group::group(args).await,
            Command::Bench(args) => bench::bench(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrite: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn build_config(args: &ServerArgs) -> anyhow::Result<BrokerConfig> {
    let mut config = BrokerConfig::default();
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e| anyhow::anyhow!("{} is not valid TOML: {e}", path.display()))?;
        for (key, value) in table {
            let value = match value {
                toml::Value::String(s) => s,
                other => other.to_string(),
            };
            config
                .set(&key, &value)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
    }
    for kv in &args.set {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--set expects KEY=VALUE, got `{kv}`"))?;
        config.set(k.trim(), v.trim())?;
    }
    if let Some(l) = &args.listen {
        config.set("listeners", l)?;
    }
    if let Some(a) = &args.advertised_listener {
        config.set("advertised.listeners", a)?;
    }
    if let Some(d) = &args.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(n) = args.node_id {
        config.set("node.id", &n.to_string())?;
    }
    if let Some(r) = &args.rack {
        config.set("broker.rack", r)?;
    }
    Ok(config)
}

async fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    let config = build_config(&args)?;
    let node_id = config.node_id;
    let running = Broker::start(config).await?;
    let broker = running.broker.clone();
    println!(
        "ferrite ready: listening on {} node_id={node_id}",
        running.local_addr
    );
    tracing::info!(addr = %running.local_addr, advertised = ?broker.advertised, data_dir = %broker.config.data_dir.display(), "broker ready");
    let background = tokio::spawn(broker.clone().run_background());
    let group_ticker = tokio::spawn(ferrite_broker::group_manager::run_ticker(broker.clone()));
    ferrite_broker::server::serve(broker.clone(), running.listener, shutdown_signal()).await;
    tracing::info!("shutting down: flushing logs");
    background.abort();
    group_ticker.abort();
    broker.shutdown()?;
    tracing::info!("clean shutdown complete");
    Ok(())
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
