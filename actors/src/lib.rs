//! The actors of a PubG1 broker and the storage they share.
//!
//! ```text
//! BrokerSupervisor ─┬─ PartitionReplica × P   one per partition: assigns offsets, appends
//!                   │                          (crash → restarted from RocksDB)
//! Metadata          │  topic catalog: create/delete, durable before hosted
//! Storage           └─ RocksDB + one group-commit writer thread (fsync per group, not per request)
//! ```
//!
//! Modules:
//! - [`batch`]: Kafka v2 record batches (encode with offsets, header + CRC checks, decode).
//! - [`partitioner`]: Kafka's murmur2 key → partition.
//! - [`topic`]: topic names, configs, limits.
//! - [`storage`]: RocksDB column families, keys, group commit, reads.
//! - [`partition_replica`], [`broker_supervisor`], [`metadata`], [`peer_link`]: the actors, one
//!   a module ([`partition_replica`] is a directory: actor, shared state, installs, retention).
//! - [`raft_group`] (sans-IO Raft: what raft-rs wants done), [`raft_driver`] (its Ready loop for
//!   actors, panics contained), [`proposals`] (clients waiting for their proposals), [`snapshot`],
//!   [`state_machine`] (what applying a committed entry does: the seam internal topics use).
//! - [`groups`]: consumer groups: committed offsets as Raft state, their coordinators, the
//!   assignors and the classic (JoinGroup/SyncGroup) protocol.
//! - [`transport`]: per-peer queues (bounded in messages and bytes) and cluster liveness.
//! - [`registry`]: the name → partitions map the HTTP layer reads without messaging actors.
//! - [`log_reader`]: fetch with long poll, off the write path.
//! - [`metrics`]: the broker's Prometheus registry.
//! - [`port`]: listening ports claimed before start-up, listened on once the broker serves.
//!
//! [`Broker`] wires them together; the `pubg1-broker` binary adds config and HTTP.

pub mod batch;
pub mod broker_supervisor;
pub mod error;
pub mod groups;
pub mod log_reader;
pub mod metadata;
pub mod metrics;
pub mod partition_replica;
pub mod partitioner;
pub mod peer_link;
pub mod port;
pub mod producers;
pub mod proposals;
pub mod raft_driver;
pub mod raft_group;
pub mod registry;
pub mod snapshot;
pub mod state_machine;
pub mod storage;
pub mod streams;
pub mod topic;
pub mod transport;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::broker_supervisor::{BrokerSupervisor, StopAll};
use crate::error::{StartError, StorageError};
use crate::groups::coordinator::CoordinatorSettings;
use crate::groups::offsets_replica::{
    offsets_replicas, OffsetsReplica, OffsetsShared, OffsetsWiring,
};
use crate::metadata::{CatalogLimits, HostAll, Metadata, MetadataWiring};
use crate::metrics::Metrics;
use crate::partition_replica::ReplicaSettings;
use crate::peer_link::PeerLink;
use crate::port::ClaimedPort;
use crate::raft_group::RaftSettings;
use crate::registry::Registry;
use crate::storage::{Storage, StorageSettings};
use crate::transport::{Cluster, Transport};

/// What [`Broker::start`] needs; the binary builds it from its validated config.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub data_dir: PathBuf,
    pub retention_check_interval: Duration,
    pub limits: CatalogLimits,
    /// Arbiter threads the partition actors are spread over.
    pub partition_threads: usize,
    /// This broker's id, its node id in every Raft group.
    pub broker_id: u64,
    pub raft_settings: RaftSettings,
    pub storage_settings: StorageSettings,
    /// Where this broker listens for peer (Raft) connections; None for a lone broker.
    pub peer_listen: Option<std::net::SocketAddr>,
    /// Every broker of the cluster with its peer address, this one included; empty = alone.
    pub seeds: Vec<(u64, std::net::SocketAddr)>,
    /// This broker's HTTP address as other brokers should advertise it to clients.
    pub http_advertised: String,
    /// This broker's Kafka listener address (host:port) as clients should reach it; None when
    /// it has no Kafka listener.
    pub kafka_advertised: Option<String>,
    /// Partitions of the offsets topic; the same on every broker of a cluster.
    pub offsets_partitions: u32,
    pub coordinator: CoordinatorSettings,
}

/// A running broker's actors and shared handles.
#[derive(Debug, Clone)]
pub struct Broker {
    pub storage: Storage,
    pub metrics: Arc<Metrics>,
    pub registry: Registry,
    pub metadata: Addr<Metadata>,
    pub supervisor: Addr<BrokerSupervisor>,
    pub cluster: Cluster,
}

impl Broker {
    /// Open storage, recover the catalog and host every partition. Call inside an actix System.
    ///
    /// The peer port is claimed first, so a taken port is refused before anything is opened. A
    /// failure after storage opened closes it (its threads joined) before returning: a process
    /// that exits with RocksDB's background work still running can crash on the way out.
    pub async fn start(settings: BrokerSettings) -> Result<Self, StartError> {
        let peer_listener = settings
            .peer_listen
            .map(|address| {
                ClaimedPort::claim(address)
                    .and_then(ClaimedPort::listen)
                    .map_err(|source| StartError::PeerListener { address, source })
            })
            .transpose()?;
        let metrics = Arc::new(Metrics::new());
        std::fs::create_dir_all(&settings.data_dir).map_err(|e| StorageError::Open {
            path: settings.data_dir.display().to_string(),
            message: e.to_string(),
        })?;
        let storage = Storage::open_with(
            &settings.data_dir,
            metrics.clone(),
            settings.storage_settings,
        )?;
        let catalog = match storage.load_catalog() {
            Ok(catalog) => catalog,
            Err(e) => {
                storage.shutdown();
                return Err(e.into());
            }
        };
        let registry = Registry::default();
        let me = settings.broker_id;
        let mut brokers: Vec<u64> = settings.seeds.iter().map(|(id, _)| *id).collect();
        brokers.push(me);
        let cluster = Cluster::new(me, brokers, settings.http_advertised.clone());
        if let Some(kafka) = &settings.kafka_advertised {
            cluster.set_kafka(me, kafka.clone());
        }
        let transport = Transport::default();
        let arbiters: Vec<Arbiter> = (0..settings.partition_threads.max(1))
            .map(|_| Arbiter::new())
            .collect();
        // Peer links and the peer listener run on the first partition thread: a Raft message
        // between the socket and its partition then crosses no thread when one thread hosts
        // the partitions.
        let peer_thread = arbiters[0].handle();
        for (id, address) in settings.seeds.iter().filter(|(id, _)| *id != me) {
            let queue = transport.register(*id);
            let (id, address, cluster, metrics) = (*id, *address, cluster.clone(), metrics.clone());
            PeerLink::start_in_arbiter(&peer_thread, move |_| {
                PeerLink::new(id, address, cluster, metrics, queue)
            });
        }
        if let Some(listener) = peer_listener {
            peer_link::serve(
                listener,
                registry.clone(),
                cluster.clone(),
                metrics.clone(),
                &peer_thread,
            );
        }
        host_offsets(
            &settings,
            &arbiters,
            OffsetsWiring {
                storage: storage.clone(),
                registry: registry.clone(),
                cluster: cluster.clone(),
                transport: transport.clone(),
                metrics: metrics.clone(),
                timing: settings.raft_settings,
                coordinator: settings.coordinator.clone(),
            },
        );
        let replica = ReplicaSettings {
            retention_check_interval: settings.retention_check_interval,
            broker_id: me,
            timing: settings.raft_settings,
            transport: transport.clone(),
            cluster: cluster.clone(),
        };
        let supervisor = BrokerSupervisor::new(
            storage.clone(),
            metrics.clone(),
            replica,
            registry.clone(),
            arbiters,
        )
        .start();
        let wiring = MetadataWiring {
            storage: storage.clone(),
            supervisor: supervisor.clone(),
            registry: registry.clone(),
            cluster: cluster.clone(),
            transport,
            metrics: metrics.clone(),
        };
        // Supervised: a crashed metadata actor starts again, from the durable catalog, at the
        // same address.
        let (limits, raft_settings) = (settings.limits, settings.raft_settings);
        let metadata = actix::Supervisor::start(move |_| {
            Metadata::new(wiring, limits, raft_settings, catalog)
        });
        let hosted = metadata.send(HostAll).await;
        let broker = Self {
            storage,
            metrics,
            registry,
            metadata,
            supervisor,
            cluster,
        };
        if hosted.is_err() {
            broker.shutdown().await;
            return Err(StorageError::ShutDown.into());
        }
        watch_liveness(
            broker.cluster.clone(),
            broker.registry.clone(),
            &peer_thread,
        );
        Ok(broker)
    }

    /// Stop every partition actor (joining their threads, so none is torn down while the
    /// process exits), then finish every queued write and flush RocksDB. Nothing acknowledged is
    /// left in memory when this returns.
    pub async fn shutdown(&self) {
        if let Ok(arbiters) = self.supervisor.send(StopAll).await {
            for arbiter in arbiters {
                arbiter.stop();
                let _ = arbiter.join();
            }
        }
        self.storage.shutdown();
    }
}

/// Start this broker's replicas of the offsets topic, spread over the partition threads, each
/// under an actix `Supervisor` (a crashed one restarts from RocksDB at the same address).
fn host_offsets(settings: &BrokerSettings, arbiters: &[Arbiter], wiring: OffsetsWiring) {
    let me = settings.broker_id;
    let brokers = wiring.cluster.brokers.clone();
    let shared: Vec<Arc<OffsetsShared>> = (0..settings.offsets_partitions)
        .map(|p| Arc::new(OffsetsShared::new(p, offsets_replicas(&brokers, p), me)))
        .collect();
    wiring.registry.set_offsets(shared.clone());
    for partition in shared.into_iter().filter(|p| p.hosted) {
        let thread = arbiters[partition.partition as usize % arbiters.len()].handle();
        let wiring = wiring.clone();
        actix::Supervisor::start_in_arbiter(&thread, move |_| {
            OffsetsReplica::new(wiring, partition)
        });
    }
}

/// A broker not heard from for this long is taken as gone: its links ping every 100 ms.
const PEER_SILENCE_MAX: Duration = Duration::from_millis(500);

/// Watch the other brokers' liveness; when one falls silent, wake every quiesced group it holds
/// a replica of. A quiesced follower does not tick, so it would never notice its leader die; a
/// quiesced leader would never notice it is cut off (check-quorum runs on ticks).
fn watch_liveness(cluster: Cluster, registry: Registry, thread: &actix::ArbiterHandle) {
    thread.spawn(async move {
        let peers: Vec<u64> = cluster
            .brokers
            .iter()
            .copied()
            .filter(|id| *id != cluster.self_id)
            .collect();
        let mut alive: std::collections::HashMap<u64, bool> =
            peers.iter().map(|id| (*id, true)).collect();
        let period = Duration::from_millis(100);
        let mut every = tokio::time::interval(period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = std::time::Instant::now();
        loop {
            every.tick().await;
            // A watcher that itself ran late was starved with the reads that prove peers
            // alive: their frames may be waiting unread, so judge no one this round.
            let late = last.elapsed() > 3 * period;
            last = std::time::Instant::now();
            if late {
                continue;
            }
            for peer in &peers {
                let now = cluster.is_alive(*peer, PEER_SILENCE_MAX);
                let was = alive.insert(*peer, now).unwrap_or(true);
                if was && !now {
                    tracing::info!(peer, "broker fell silent; waking the groups it replicates");
                    for topic in registry.list() {
                        for partition in topic.partitions.iter().filter(|p| p.hosted) {
                            if partition.replicas.contains(peer) {
                                if let Some(addr) = partition.addr() {
                                    addr.do_send(transport::Wake);
                                }
                            }
                        }
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod component_tests;
#[cfg(test)]
mod fault_tests;
#[cfg(test)]
mod group_component_tests;
