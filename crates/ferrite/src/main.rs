//! `ferrite`: the broker (`ferrite server`) and Kafka client subcommands in one binary.

mod bench;
mod client;
mod cluster;
mod dev_cluster;
mod group;
mod producers;
mod transactions;
mod wire;

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
    /// Log filter, overriding RUST_LOG: a level (error, warn, info, debug, trace) or
    /// directives like `info,ferrite_broker=debug` [default: info for `server`,
    /// warn for the client subcommands].
    #[arg(long, global = true, value_parser = parse_log_filter, value_name = "FILTER")]
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
    /// List and describe transactions (transactional ids, their state and partitions).
    Transactions(transactions::TransactionsArgs),
    /// Describe the cluster: brokers, active controller, and the metadata quorum.
    Cluster(cluster::ClusterArgs),
    /// Load generators: produce, consume and end-to-end, with HDR latency histograms.
    Bench(bench::BenchArgs),
    /// Development helpers: `dev cluster` runs N nodes on loopback as child processes.
    Dev(dev_cluster::DevArgs),
}

impl Command {
    /// Whether the subcommand was asked for JSON output (errors are JSON then too).
    fn json(&self) -> bool {
        match self {
            Command::Server(_) => false,
            Command::Topic(a) => a.json(),
            Command::Produce(a) => a.json(),
            Command::Consume(a) => a.json(),
            Command::Group(a) => a.json(),
            Command::Transactions(a) => a.json(),
            Command::Cluster(a) => a.json(),
            Command::Bench(a) => a.json(),
            Command::Dev(_) => false,
        }
    }
}

fn parse_log_filter(s: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    // A lone word would parse as a target name (`--log-level verbose` enabling
    // everything for a target called "verbose"): a lone word must be a level.
    let lone_word = !s.contains(['=', ',', ':', '[']);
    if lone_word && !LEVELS.contains(&s.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "expected a level ({}) or directives like `info,ferrite_broker=debug`",
            LEVELS.join(", ")
        ));
    }
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_string())
        .map_err(|e| {
            format!("{e}; expected a level (error, warn, info, debug, trace) or directives like `info,ferrite_broker=debug`")
        })
}

#[derive(Args)]
struct ServerArgs {
    /// Address to listen on (listeners); a host name such as localhost is resolved and
    /// advertised as given. 0.0.0.0 needs --advertised-listener [default: 127.0.0.1:9092].
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Address given to clients in metadata (advertised.listeners) [default: the
    /// --listen host name, else the bound address].
    #[arg(long, value_name = "HOST:PORT")]
    advertised_listener: Option<String>,
    /// Data directory (log.dirs) [default: ./ferrite-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// This node's id (node.id), as a broker and as a controller voter [default: 0].
    #[arg(long, value_name = "N")]
    node_id: Option<i32>,
    /// What this node runs (process.roles): broker, controller or both
    /// [default: broker,controller; `broker` alone joins the quorum of
    /// --controller-quorum-voters as an observer; `controller` alone is not supported yet].
    #[arg(long, value_name = "ROLES")]
    process_roles: Option<String>,
    /// The controller listener for the metadata quorum's RPC [default: this node's
    /// address in --controller-quorum-voters; an ephemeral port without them, and on a
    /// broker-only node (where the leader replicates the metadata log to it)].
    #[arg(long, value_name = "HOST:PORT")]
    controller_listen: Option<String>,
    /// The controller voters (controller.quorum.voters), e.g.
    /// 1@127.0.0.11:9093,2@127.0.0.12:9093,3@127.0.0.13:9093 [default: this node alone].
    #[arg(long, value_name = "ID@HOST:PORT,...")]
    controller_quorum_voters: Option<String>,
    /// This broker's rack (broker.rack), for replica placement [default: none].
    #[arg(long, value_name = "NAME")]
    rack: Option<String>,
    /// Broker configs with Kafka's key names: a Kafka `server.properties` file
    /// (`num.partitions=3`) or TOML (`"num.partitions" = 3`), told apart by the
    /// extension (.properties, .toml) or else by the content [default: none].
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
        // openraft logs every vote and role change at info: its warnings are what an operator needs.
        "info,openraft=warn"
    } else {
        "warn,rdkafka=off"
    };
    let filter = cli
        .log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| default_filter.to_string());
    let env_filter = match tracing_subscriber::EnvFilter::try_new(&filter) {
        Ok(f) => f,
        Err(e) => {
            // Only RUST_LOG gets here (--log-level is checked by the parser).
            eprintln!(
                "ferrite: RUST_LOG={filter} is not a log filter ({e}); using {default_filter}"
            );
            tracing_subscriber::EnvFilter::new(default_filter)
        }
    };
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .init();
    let json = cli.command.json();
    let is_server = matches!(cli.command, Command::Server(_));
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
            Command::Transactions(args) => transactions::transactions(args).await,
            Command::Cluster(args) => cluster::cluster(args).await,
            Command::Bench(args) => bench::bench(args).await,
            Command::Dev(args) => dev_cluster::dev(args).await,
        }
    });
    if result.is_ok() && is_server {
        // The broker shut down cleanly: every log is durable and the marker written.
        // What is left is freeing the memory and descriptors of every partition one by
        // one (most of a second with 19,000 partitions, issue 14), which the kernel does
        // at once at exit.
        std::process::exit(0);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                let code = e
                    .downcast_ref::<wire::BrokerError>()
                    .map(|b| b.code.clone());
                eprintln!(
                    "{}",
                    serde_json::json!({"error": {"code": code, "message": format!("{e:#}")}})
                );
            } else {
                eprintln!("ferrite: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn build_config(args: &ServerArgs) -> anyhow::Result<BrokerConfig> {
    let mut config = BrokerConfig::default();
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        apply_config_file(&mut config, path, &text)?;
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
    if let Some(r) = &args.process_roles {
        config.set("process.roles", r)?;
    }
    if let Some(l) = &args.controller_listen {
        config.set("controller.listen", l)?;
    }
    if let Some(v) = &args.controller_quorum_voters {
        config.set("controller.quorum.voters", v)?;
    }
    // As Kafka refuses it: clients cannot connect to the meta-address they would be told.
    let unroutable = |host: &str| {
        host.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified())
    };
    match &config.advertised_listener {
        Some((host, _)) if unroutable(host) => anyhow::bail!(
            "--advertised-listener {host} is the non-routable meta-address; advertise an address clients can reach"
        ),
        None if config.listen.ip().is_unspecified() => anyhow::bail!(
            "--listen {} binds every interface, but clients must be told an address they can \
             reach: add --advertised-listener HOST:PORT (advertised.listeners), e.g. this \
             machine's name or IP and port {}",
            config.listen,
            config.listen.port()
        ),
        _ => {}
    }
    Ok(config)
}

/// Which syntax a `--config` file is in.
#[derive(Debug, PartialEq, Eq)]
enum ConfigSyntax {
    Toml,
    Properties,
}

fn config_syntax(path: &std::path::Path, text: &str) -> ConfigSyntax {
    match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => ConfigSyntax::Toml,
        Some("properties") | Some("conf") | Some("cfg") => ConfigSyntax::Properties,
        // No telling extension: flat TOML is TOML. Kafka's `num.partitions=3` is also TOML,
        // but of nested tables, which Ferrite's TOML never has: that and anything TOML
        // rejects (`log.dirs=/tmp/x`) is a properties file.
        _ => match text.parse::<toml::Table>() {
            Ok(t) if !t.values().any(toml::Value::is_table) => ConfigSyntax::Toml,
            _ => ConfigSyntax::Properties,
        },
    }
}

fn apply_config_file(
    config: &mut BrokerConfig,
    path: &std::path::Path,
    text: &str,
) -> anyhow::Result<()> {
    let name = path.display();
    match config_syntax(path, text) {
        ConfigSyntax::Toml => {
            let table: toml::Table = text
                .parse()
                .map_err(|e| anyhow::anyhow!("{name} is not valid TOML: {e}"))?;
            for (key, value) in table {
                let value = match value {
                    toml::Value::String(s) => s,
                    toml::Value::Table(t) => {
                        // `num.partitions = 3` is a table `num` holding `partitions`.
                        let inner = t.keys().next().map_or(String::new(), |k| format!(".{k}"));
                        anyhow::bail!(
                            "{name}: `{key}{inner}` is read by TOML as nested tables; \
                             quote the key: \"{key}{inner}\" = ... (or use a server.properties file)"
                        );
                    }
                    other => other.to_string(),
                };
                config
                    .set(&key, &value)
                    .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            }
        }
        ConfigSyntax::Properties => {
            // A Kafka file sets much that Ferrite has no use for (thread counts, KRaft
            // controller settings): like Kafka with an unknown key, warn and go on.
            let mut ignored = Vec::new();
            for (line, key, value) in parse_properties(text) {
                match config.set(&key, &value) {
                    Ok(()) => {}
                    Err(ferrite_broker::config::ConfigError::UnknownKey(k)) => ignored.push(k),
                    Err(e) => anyhow::bail!("{name}:{line}: {e}"),
                }
            }
            if !ignored.is_empty() {
                tracing::warn!(file = %name, keys = %ignored.join(", "), "ignoring configs ferrite does not implement");
            }
        }
    }
    Ok(())
}

/// `(line number, key, value)` of a Java properties file: `#`/`!` comments, `=`, `:` or
/// white space between key and value, `\` line continuations and escapes.
fn parse_properties(text: &str) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((i, raw)) = lines.next() {
        let mut logical = raw.trim_start().to_string();
        if logical.is_empty() || logical.starts_with('#') || logical.starts_with('!') {
            continue;
        }
        // An odd number of trailing backslashes continues the line.
        while logical.chars().rev().take_while(|c| *c == '\\').count() % 2 == 1 {
            logical.pop();
            match lines.next() {
                Some((_, next)) => logical.push_str(next.trim_start()),
                None => break,
            }
        }
        let mut key = String::new();
        let mut chars = logical.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        key.push(unescape(n, &mut chars));
                    }
                }
                '=' | ':' => break,
                c if c.is_whitespace() => {
                    while chars.peek().is_some_and(|c| c.is_whitespace()) {
                        chars.next();
                    }
                    if matches!(chars.peek(), Some('=') | Some(':')) {
                        chars.next();
                    }
                    break;
                }
                c => key.push(c),
            }
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            if c == '\\' {
                if let Some(n) = chars.next() {
                    value.push(unescape(n, &mut chars));
                }
            } else {
                value.push(c);
            }
        }
        out.push((i + 1, key, value.trim_end().to_string()));
    }
    out
}

fn unescape(c: char, rest: &mut std::iter::Peekable<std::str::Chars<'_>>) -> char {
    match c {
        't' => '\t',
        'n' => '\n',
        'r' => '\r',
        'f' => '\u{c}',
        'u' => {
            let hex: String = rest.by_ref().take(4).collect();
            u32::from_str_radix(&hex, 16)
                .ok()
                .and_then(char::from_u32)
                .unwrap_or('\u{fffd}')
        }
        other => other,
    }
}

async fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    let config = build_config(&args)?;
    let node_id = config.node_id;
    let running = Broker::start(config).await?;
    let broker = running.broker.clone();
    // Before the ready line: a SIGTERM right after it must be a clean shutdown, not the
    // default action.
    let signal = shutdown_signal()?;
    // SIGTERM: a controlled shutdown first (leaderships move while this broker still
    // serves its followers), then the listener stops.
    let shutdown = {
        let broker = broker.clone();
        async move {
            signal.await;
            ferrite_broker::lifecycle::controlled_shutdown(&broker).await;
        }
    };
    println!(
        "ferrite ready: listening on {} node_id={node_id}",
        running.local_addr
    );
    tracing::info!(addr = %running.local_addr, advertised = ?broker.advertised, data_dir = %broker.config.data_dir.display(), "broker ready");
    let background = tokio::spawn(broker.clone().run_background());
    let group_ticker = tokio::spawn(ferrite_broker::group_manager::run_ticker(broker.clone()));
    ferrite_broker::server::serve(broker.clone(), running.listener, shutdown).await;
    tracing::info!("shutting down: flushing logs");
    background.abort();
    group_ticker.abort();
    broker.shutdown()?;
    tracing::info!("clean shutdown complete");
    Ok(())
}

/// Registers for SIGTERM and Ctrl-C now; the future ends when either arrives.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| anyhow::anyhow!("cannot handle SIGTERM: {e}"))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| anyhow::anyhow!("cannot handle SIGINT: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_files_parse_as_java_does() {
        let text = "# comment\n! also\n\nnum.partitions=3\nlog.dirs : /tmp/x\nbroker.rack  r1\n\
                    listeners=PLAINTEXT://:9092,\\\n   CONTROLLER://:9093\nkey\\=with=v\\u0041 \n";
        let got = parse_properties(text);
        let kv: Vec<(&str, &str)> = got
            .iter()
            .map(|(_, k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            kv,
            [
                ("num.partitions", "3"),
                ("log.dirs", "/tmp/x"),
                ("broker.rack", "r1"),
                ("listeners", "PLAINTEXT://:9092,CONTROLLER://:9093"),
                ("key=with", "vA"),
            ]
        );
        assert_eq!(got.first().map(|g| g.0), Some(4), "line numbers");
    }

    #[test]
    fn config_syntax_by_extension_then_content() {
        let p = std::path::Path::new;
        assert_eq!(
            config_syntax(p("a.properties"), "x = 1"),
            ConfigSyntax::Properties
        );
        assert_eq!(config_syntax(p("a.toml"), "a=b"), ConfigSyntax::Toml);
        assert_eq!(
            config_syntax(p("a"), "\"num.partitions\" = 3"),
            ConfigSyntax::Toml
        );
        assert_eq!(
            config_syntax(p("a"), "num.partitions=3\nlog.dirs=/x"),
            ConfigSyntax::Properties
        );
        assert_eq!(
            config_syntax(p("a"), "num.partitions=3"),
            ConfigSyntax::Properties
        );
    }
}
