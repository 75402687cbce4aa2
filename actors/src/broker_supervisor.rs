//! `BrokerSupervisor`: starts, restarts and retires the partition actors of one broker.
//!
//! Why not actix's built-in `Supervisor`: it restarts an actor only when it stops, never on a
//! panic, and it cannot tell "crashed, restart me" from "topic deleted, stay down". Here each
//! `PartitionReplica` catches its own panics and stops; its `stopped` hook reports to this actor,
//! which starts a fresh incarnation (with backoff for crash loops) unless the partition is
//! retired. Replicas are spread over a pool of arbiters, one per core, so one busy partition does
//! not stall the others and none share a thread with the HTTP workers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::metrics::Metrics;
use crate::partition_replica::{
    PartitionReplica, PartitionShared, ReplicaSettings, ReplicaStopped, Retire,
};
use crate::registry::{Registry, TopicHandle};
use crate::storage::{topic_delete_ops, Storage};
use crate::topic::{LogId, TopicMeta};

/// First restart delay after a crash; doubles per crash within [`CRASH_WINDOW`].
const RESTART_DELAY_INITIAL: Duration = Duration::from_millis(50);
/// Longest restart delay: a crash-looping partition retries this often.
const RESTART_DELAY_MAX: Duration = Duration::from_secs(5);
/// Crashes further apart than this reset the backoff.
const CRASH_WINDOW: Duration = Duration::from_secs(60);

/// Start replicas for every partition of a topic and publish it in the registry.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct HostTopic {
    pub meta: Arc<TopicMeta>,
}

/// Remove a topic from the registry and stop its replicas once their writes are durable.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RetireTopic {
    pub name: String,
}

/// Send a test-only message to the live actor of one partition.
#[cfg(test)]
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct InjectPanicInto {
    pub topic: String,
    pub partition: u32,
}

/// Restart delays for one crash-prone actor: 50 ms doubling to 5 s for crashes closer than a
/// minute apart.
#[derive(Debug, Clone, Copy, Default)]
pub struct Backoff {
    consecutive: u32,
    last: Option<Instant>,
}

impl Backoff {
    /// The delay before restarting after a crash now.
    pub fn next_delay(&mut self) -> Duration {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) > CRASH_WINDOW)
        {
            self.consecutive = 0;
        }
        self.consecutive += 1;
        self.last = Some(now);
        let factor = 2u32.saturating_pow(self.consecutive - 1);
        RESTART_DELAY_INITIAL
            .saturating_mul(factor)
            .min(RESTART_DELAY_MAX)
    }
}

pub struct BrokerSupervisor {
    storage: Storage,
    metrics: Arc<Metrics>,
    settings: ReplicaSettings,
    registry: Registry,
    arbiters: Vec<Arbiter>,
    /// Set at broker shutdown: crashed replicas are no longer restarted.
    stopping: bool,
    next_arbiter: usize,
    crashes: HashMap<LogId, Backoff>,
}

impl BrokerSupervisor {
    pub fn new(
        storage: Storage,
        metrics: Arc<Metrics>,
        settings: ReplicaSettings,
        registry: Registry,
        arbiters: Vec<Arbiter>,
    ) -> Self {
        Self {
            storage,
            metrics,
            settings,
            registry,
            arbiters,
            stopping: false,
            next_arbiter: 0,
            crashes: HashMap::new(),
        }
    }

    fn start_replica(
        &mut self,
        shared: Arc<PartitionShared>,
        meta: &TopicMeta,
        ctx: &mut Context<Self>,
    ) {
        if self.stopping || self.arbiters.is_empty() {
            return;
        }
        let arbiter = self.arbiters[self.next_arbiter % self.arbiters.len()].handle();
        self.next_arbiter += 1;
        let (storage, metrics, settings, configs) = (
            self.storage.clone(),
            self.metrics.clone(),
            self.settings.clone(),
            meta.configs,
        );
        let voters = shared.replicas.clone();
        let supervisor = ctx.address().recipient();
        let for_actor = shared.clone();
        let addr = PartitionReplica::start_in_arbiter(&arbiter, move |_| {
            PartitionReplica::new(
                for_actor, storage, metrics, configs, settings, voters, supervisor,
            )
        });
        shared.set_addr(Some(addr));
    }

    fn restart_delay(&mut self, log: LogId) -> Duration {
        self.crashes.entry(log).or_default().next_delay()
    }
}

/// Stop hosting for good (broker shutdown): no more restarts; returns the arbiter pool so the
/// caller can stop and join it, dropping every partition actor before storage closes.
#[derive(Debug, Message)]
#[rtype(result = "Vec<Arbiter>")]
pub struct StopAll;

impl Handler<StopAll> for BrokerSupervisor {
    type Result = MessageResult<StopAll>;

    fn handle(&mut self, _msg: StopAll, _ctx: &mut Self::Context) -> Self::Result {
        self.stopping = true;
        MessageResult(std::mem::take(&mut self.arbiters))
    }
}

impl Actor for BrokerSupervisor {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
    }
}

impl Handler<HostTopic> for BrokerSupervisor {
    type Result = ();

    fn handle(&mut self, msg: HostTopic, ctx: &mut Self::Context) {
        // Idempotent: the metadata actor may ask again (after a restart it reconciles).
        if self
            .registry
            .get(&msg.meta.name)
            .is_some_and(|hosted| hosted.meta.topic_id == msg.meta.topic_id)
        {
            return;
        }
        let name: Arc<str> = Arc::from(msg.meta.name.as_str());
        let me = self.settings.broker_id;
        let partitions: Vec<Arc<PartitionShared>> = (0..msg.meta.partitions)
            .map(|p| {
                let replicas = msg.meta.replicas(p, me);
                Arc::new(PartitionShared::new(
                    name.clone(),
                    p,
                    msg.meta.log_id(p),
                    replicas,
                    me,
                ))
            })
            .collect();
        for shared in partitions.iter().filter(|p| p.hosted) {
            self.start_replica(shared.clone(), &msg.meta, ctx);
        }
        self.registry
            .insert(Arc::new(TopicHandle::new(msg.meta, partitions)));
    }
}

impl Handler<RetireTopic> for BrokerSupervisor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: RetireTopic, _ctx: &mut Self::Context) -> Self::Result {
        let Some(handle) = self.registry.remove(&msg.name) else {
            return Box::pin(async {});
        };
        let (metrics, storage) = (self.metrics.clone(), self.storage.clone());
        Box::pin(async move {
            for shared in &handle.partitions {
                shared.retire();
                if let Some(addr) = shared.addr() {
                    // Err means it already stopped: nothing of it is left in flight either way.
                    let _ = addr.send(Retire).await;
                }
                shared.set_addr(None);
                metrics.forget_partition(&shared.topic, shared.partition);
            }
            // The delete's own write removed the topic's keys when it was applied; a replica
            // that was still writing (a Ready in flight, a tick) wrote some back. Every replica
            // has stopped now: once their last writes are in, remove the topic's keys again.
            let cleanup = async {
                storage.barrier_patiently().await?;
                storage.write(topic_delete_ops(handle.meta.topic_id)).await
            };
            if let Err(e) = cleanup.await {
                tracing::warn!(topic = %handle.meta.name, error = %e, "cleaning up a deleted topic's keys failed");
            }
        })
    }
}

impl Handler<ReplicaStopped> for BrokerSupervisor {
    type Result = ();

    fn handle(&mut self, msg: ReplicaStopped, ctx: &mut Self::Context) {
        let shared = msg.shared;
        shared.set_addr(None);
        if shared.is_retired() || !msg.crashed || self.stopping {
            return;
        }
        let Some(topic) = self
            .registry
            .get(&shared.topic)
            .filter(|t| t.meta.topic_id == shared.log.topic_id)
        else {
            return;
        };
        self.metrics
            .actor_restarts_total
            .with_label_values(&["partition_replica"])
            .inc();
        let delay = self.restart_delay(shared.log);
        tracing::warn!(topic = %shared.topic, partition = shared.partition, ?delay, "restarting crashed partition actor");
        ctx.run_later(delay, move |act, ctx| {
            if !shared.is_retired() {
                act.start_replica(shared, &topic.meta, ctx);
            }
        });
    }
}

#[cfg(test)]
impl Handler<InjectPanicInto> for BrokerSupervisor {
    type Result = bool;

    fn handle(&mut self, msg: InjectPanicInto, _ctx: &mut Self::Context) -> bool {
        let addr = self
            .registry
            .get(&msg.topic)
            .and_then(|t| t.partition(msg.partition).and_then(|p| p.addr()));
        addr.map(|a| a.do_send(crate::partition_replica::InjectPanic))
            .is_some()
    }
}
