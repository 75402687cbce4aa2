//! `pubg1-broker`: one PubG1 broker process.
//!
//! Parses flags (clap) over file and environment config (figment), validates it, starts the
//! broker's actors on its RocksDB, then serves HTTP until SIGTERM/SIGINT, after which it stops
//! accepting requests, lets in-flight ones finish, drains every queued write and flushes RocksDB.

mod config;
mod http;
mod kafka;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use actix_web::HttpServer;
use anyhow::Context;
use clap::Parser;
use pubg1_actors::groups::coordinator::CoordinatorSettings;
use pubg1_actors::metadata::CatalogLimits;
use pubg1_actors::port::ClaimedPort;
use pubg1_actors::raft_group::RaftSettings;
use pubg1_actors::storage::StorageSettings;
use pubg1_actors::{Broker, BrokerSettings};
use serde::Serialize;

use crate::config::{Config, LogFormat};

/// mimalloc rather than glibc's malloc: perf on a replicated broker under batched load had
/// glibc's allocator (`_int_malloc`, `_int_free`, `malloc_consolidate`, …) at ~13% of all CPU,
/// most of it on the HTTP and partition threads handing buffers to each other. Built without
/// transparent huge pages (`no_thp`): mimalloc asks for them on its arenas, and each touched
/// 2 MiB page is resident whole — at 1,000 partitions that was 94 of a broker's 142 MB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Flags override the config file and `PUBG1_*` environment variables, key by key.
#[derive(Debug, Parser, Serialize)]
#[command(
    name = "pubg1-broker",
    version,
    about = "A PubG1 broker: a durable, Kafka-shaped log over HTTP"
)]
struct Cli {
    /// TOML config file (keys as in the Config struct, e.g. `data_dir = "data/1"`).
    #[arg(long, env = "PUBG1_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Broker id, unique in the cluster.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u32>,
    /// Data directory for RocksDB.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// HTTP listen address, e.g. 127.0.0.1:8081.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<SocketAddr>,
    /// Listen address for other brokers' Raft traffic, e.g. 127.0.0.1:9091.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<SocketAddr>,
    /// Every broker of the cluster as id@host:port (peer addresses), comma separated.
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    seeds: Option<Vec<String>>,
    /// Kafka protocol listen address, e.g. 127.0.0.1:9092 (none by default).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    kafka: Option<SocketAddr>,
    /// host:port Kafka clients are told to connect to (default: the --kafka address).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    kafka_advertised: Option<String>,
    /// How often partitions check retention, in milliseconds.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    retention_check_interval_ms: Option<u64>,
    /// Log format.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref(), &cli) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("pubg1-broker: invalid configuration: {message}");
            std::process::exit(2);
        }
    };
    init_tracing(&config);
    actix_rt::System::new().block_on(run(config))
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let seeds = config.parsed_seeds().map_err(anyhow::Error::msg)?;
    let settings = BrokerSettings {
        data_dir: config.data_dir.clone(),
        retention_check_interval: Duration::from_millis(config.retention_check_interval_ms),
        limits: CatalogLimits {
            topics_max: config.topics_max,
            partitions_per_topic_max: config.partitions_per_topic_max,
        },
        partition_threads: config.partition_threads(),
        broker_id: u64::from(config.id),
        raft_settings: RaftSettings {
            tick_ms: config.raft_tick_ms,
            log_keep_entries: config.raft_log_keep_entries,
            log_keep_entries_max: config.raft_log_keep_entries_max,
            ..RaftSettings::default()
        },
        storage_settings: StorageSettings {
            flush_bytes: config.records_flush_bytes,
            flush_interval: Duration::from_millis(config.records_flush_interval_ms),
            ..StorageSettings::default()
        },
        peer_listen: (!seeds.is_empty()).then_some(config.peer),
        seeds,
        http_advertised: config.http.to_string(),
        kafka_advertised: config
            .kafka
            .map(|kafka| config.kafka_advertised.clone().unwrap_or(kafka.to_string())),
        offsets_partitions: config.offsets_topic_partitions,
        coordinator: CoordinatorSettings {
            initial_rebalance_delay: Duration::from_millis(config.initial_rebalance_delay_ms),
            instance_idle_timeout: Duration::from_millis(config.consumer_instance_timeout_ms),
            instances_max: config.consumer_instances_per_group_max,
            checkpoint_interval: Duration::from_millis(config.stream_checkpoint_interval_ms),
        },
    };
    // Both ports are claimed before storage opens (the peer port inside Broker::start): a taken
    // port stops start-up with nothing written, and clients are refused until the broker serves.
    let port = ClaimedPort::claim(config.http)
        .with_context(|| format!("binding HTTP to {}", config.http))?;
    let kafka_port = config
        .kafka
        .map(|address| {
            ClaimedPort::claim(address).with_context(|| format!("binding Kafka to {address}"))
        })
        .transpose()?;
    let broker = Broker::start(settings)
        .await
        .with_context(|| format!("starting broker in {}", config.data_dir.display()))?;
    let kafka = match kafka_port {
        Some(port) => Some(
            kafka::start(broker.clone(), &config, port)
                .with_context(|| format!("serving Kafka on {:?}", config.kafka))?,
        ),
        None => None,
    };
    let served = serve(broker.clone(), &config, port).await;
    if let Some(kafka) = kafka {
        kafka.stop();
    }
    // Also when serving failed: storage closes with its threads joined before the process exits.
    tracing::info!("HTTP stopped; draining writes and closing storage");
    broker.shutdown().await;
    tracing::info!("shutdown complete");
    served
}

/// Serve HTTP on `port` until SIGTERM/SIGINT (actix-web's handling: stop accepting, finish
/// in-flight requests, then return).
async fn serve(broker: Broker, config: &Config, port: ClaimedPort) -> anyhow::Result<()> {
    let listener = port
        .listen()
        .with_context(|| format!("listening on {}", config.http))?;
    let state = http::state(broker, config.clone());
    let server = HttpServer::new(move || http::app(state.clone()))
        .workers(config.http_workers())
        .shutdown_timeout(10)
        .listen(listener)
        .with_context(|| format!("serving HTTP on {}", config.http))?;
    let bound: Vec<String> = server.addrs().iter().map(ToString::to_string).collect();
    tracing::info!(id = config.id, http = ?bound, data_dir = %config.data_dir.display(), "broker started");
    server.run().await.context("HTTP server")
}
