//! A local cluster of real brokers: free peer ports, one data dir each, all killed on drop.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{anyhow, Result};

use crate::{free_port, wait_until, BrokerProcess, Client, StartError};

/// How long a partition may go without an agreed leader before a test fails.
pub const ELECTION_DEADLINE: Duration = Duration::from_secs(20);
/// How long replicas may take to agree on every high watermark after a fault.
pub const CONVERGE_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct TestCluster {
    /// Broker `id` is `brokers[id - 1]`.
    pub brokers: Vec<BrokerProcess>,
    _dir: Option<tempfile::TempDir>,
}

impl TestCluster {
    /// Start `n` brokers as one cluster and wait until every one is ready.
    pub fn start(n: usize) -> Result<Self> {
        Self::start_with_env(n, &[])
    }

    /// [`TestCluster::start`] with extra `PUBG1_*` settings for every broker. A broker that finds
    /// a picked port taken by another process fails the attempt; the cluster is then started
    /// again from scratch on new ports (twice at most). Any other start-up failure is returned.
    pub fn start_with_env(n: usize, env: &[(&str, &str)]) -> Result<Self> {
        StartError::retry_port_races(|| Self::start_once(n, env))
    }

    /// [`TestCluster::start`] with a Kafka listener on every broker.
    pub fn start_with_kafka(n: usize) -> Result<Self> {
        StartError::retry_port_races(|| Self::start_once_with(n, &[], &|_, _| Ok(()), true))
    }

    /// Every running broker's Kafka address, comma-separated (a client's bootstrap list).
    pub fn bootstrap(&self) -> String {
        self.brokers
            .iter()
            .filter(|b| b.is_running())
            .filter_map(|b| b.kafka.map(|a| a.to_string()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// [`TestCluster::start_with_env`], calling `prepare(id, data_dir)` for every broker before
    /// it is spawned (to put a data dir on a filesystem of its own, say).
    pub fn start_prepared(
        n: usize,
        env: &[(&str, &str)],
        prepare: &dyn Fn(u64, &std::path::Path) -> Result<()>,
    ) -> Result<Self> {
        StartError::retry_port_races(|| Self::start_once_prepared(n, env, prepare))
    }

    fn start_once(n: usize, env: &[(&str, &str)]) -> Result<Self> {
        Self::start_once_prepared(n, env, &|_, _| Ok(()))
    }

    fn start_once_prepared(
        n: usize,
        env: &[(&str, &str)],
        prepare: &dyn Fn(u64, &std::path::Path) -> Result<()>,
    ) -> Result<Self> {
        Self::start_once_with(n, env, prepare, false)
    }

    fn start_once_with(
        n: usize,
        env: &[(&str, &str)],
        prepare: &dyn Fn(u64, &std::path::Path) -> Result<()>,
        kafka: bool,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let peers: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_>>()?;
        let seeds: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(i, port)| format!("{}@127.0.0.1:{port}", i + 1))
            .collect();
        let mut brokers = Vec::new();
        for (i, port) in peers.iter().enumerate() {
            let args = vec![
                "--id".to_owned(),
                (i + 1).to_string(),
                "--peer".to_owned(),
                format!("127.0.0.1:{port}"),
                "--seeds".to_owned(),
                seeds.join(","),
            ];
            let data_dir = dir.path().join(format!("broker-{}", i + 1));
            prepare(i as u64 + 1, &data_dir)?;
            brokers.push(BrokerProcess::spawn_configured(
                &data_dir, args, env, kafka,
            )?);
        }
        for broker in &mut brokers {
            broker.wait_ready()?;
        }
        // KEEP_PUBG1_TEST_DIRS=1 keeps data dirs and broker logs for a post-mortem.
        let dir = if std::env::var_os("KEEP_PUBG1_TEST_DIRS").is_some() {
            eprintln!("keeping cluster data and logs in {}", dir.path().display());
            let _ = dir.keep();
            None
        } else {
            Some(dir)
        };
        Ok(Self { brokers, _dir: dir })
    }

    pub fn broker(&self, id: u64) -> &BrokerProcess {
        &self.brokers[id as usize - 1]
    }

    pub fn broker_mut(&mut self, id: u64) -> &mut BrokerProcess {
        &mut self.brokers[id as usize - 1]
    }

    /// The leader of a partition once every running broker names the same one.
    pub fn leader_of(&self, topic: &str, partition: u32) -> Result<u64> {
        let http = Client::new();
        wait_until(ELECTION_DEADLINE, "an agreed partition leader", || {
            let mut seen = None;
            for broker in self.brokers.iter().filter(|b| b.is_running()) {
                let reply = http
                    .get(&broker.url(&format!("/topics/{topic}/partitions/{partition}")))
                    .ok()?;
                let leader = reply.body["leader"].as_u64().filter(|l| *l != 0)?;
                if seen.is_some_and(|s| s != leader) {
                    return None;
                }
                seen = Some(leader);
            }
            seen.filter(|id| self.broker(*id).is_running())
        })
    }

    /// Produce URLs of `topic` on every running broker, for publishers that survive restarts.
    pub fn topic_urls(&self, topic: &str) -> Vec<String> {
        self.brokers
            .iter()
            .filter(|b| b.is_running())
            .map(|b| b.url(&format!("/topics/{topic}")))
            .collect()
    }

    /// Create `topic` with replication factor 3 through broker 1 and wait until every partition
    /// has a leader every broker agrees on.
    pub fn create_replicated(&self, topic: &str, partitions: u32) -> Result<()> {
        self.create_replicated_with_factor(topic, partitions, 3)
    }

    /// [`TestCluster::create_replicated`] with `factor` replicas per partition.
    pub fn create_replicated_with_factor(
        &self,
        topic: &str,
        partitions: u32,
        factor: u16,
    ) -> Result<()> {
        let http = Client::new();
        let body = serde_json::json!({"name": topic, "partitions": partitions, "replication_factor": factor});
        let reply = http.post_json(&self.broker(1).url("/topics"), &body)?;
        anyhow::ensure!(
            reply.status == 201,
            "creating {topic}: {} {}",
            reply.status,
            reply.text
        );
        for partition in 0..partitions {
            self.leader_of(topic, partition)?;
        }
        Ok(())
    }

    /// Every running broker holds the same records at the same offsets, byte for byte, once
    /// their high watermarks agree; returns how many records each holds.
    pub fn assert_replicas_identical(&self, topic: &str, partitions: u32) -> Result<usize> {
        self.wait_converged(topic, CONVERGE_DEADLINE)?;
        let http = Client::new();
        let mut logs = Vec::new();
        for broker in self.brokers.iter().filter(|b| b.is_running()) {
            logs.push(crate::workload::fetch_topic(
                &http, broker, topic, partitions,
            )?);
        }
        for (i, log) in logs.iter().enumerate().skip(1) {
            anyhow::ensure!(
                log == &logs[0],
                "broker {}'s replicas of {topic} differ from broker 1's",
                i + 1
            );
        }
        Ok(logs[0].values().map(Vec::len).sum())
    }

    /// Kill -9 `follower` and keep it down, with `load` running, until partition 0 of `topic`
    /// has committed `records` more and its leader has flushed `records` twice (a leader
    /// compacts its Raft log only as far as a flush holds): restarted, the follower is behind
    /// the leader's compacted log. Restarts it and waits until it has installed a snapshot.
    pub fn put_behind_compacted_log(
        &mut self,
        topic: &str,
        follower: u64,
        load: &crate::workload::Load,
        records: usize,
    ) -> Result<()> {
        let leader = self.leader_of(topic, 0)?;
        let flushes = "pubg1_storage_flush_seconds_count";
        let flushed_before = crate::metric(self.broker(leader), flushes)?;
        self.broker_mut(follower).kill9();
        load.wait_for_more(records, "load with the follower down")?;
        wait_until(
            Duration::from_secs(60),
            "two flushes on the leader while the follower is down",
            || {
                crate::metric(self.broker(leader), flushes)
                    .ok()
                    .filter(|n| *n >= flushed_before + 2.0)
            },
        )?;
        self.broker_mut(follower).restart()?;
        let installed =
            format!(r#"pubg1_raft_snapshots_installed_total{{partition="0",topic="{topic}"}}"#);
        wait_until(
            Duration::from_secs(30),
            "the restarted follower to install a snapshot",
            || {
                crate::metric(self.broker(follower), &installed)
                    .ok()
                    .filter(|n| *n >= 1.0)
            },
        )?;
        Ok(())
    }

    /// Wait until every running broker's replica of every partition has the same high watermark.
    pub fn wait_converged(&self, topic: &str, deadline: Duration) -> Result<Vec<u64>> {
        let http = Client::new();
        wait_until(deadline, "replicas to converge", || {
            let mut first: Option<Vec<u64>> = None;
            for broker in self.brokers.iter().filter(|b| b.is_running()) {
                let hws = crate::high_watermarks(&http, broker, topic).ok()?;
                match &first {
                    Some(f) if *f != hws => return None,
                    _ => first = Some(hws),
                }
            }
            first
        })
    }
}

/// Shared, updatable list of URLs publishers rotate through when a broker fails them.
pub type Urls = Arc<RwLock<Vec<String>>>;

pub fn urls(list: Vec<String>) -> Urls {
    Arc::new(RwLock::new(list))
}

/// Point running publishers at a new set of brokers.
pub fn set(targets: &Urls, list: Vec<String>) -> Result<()> {
    *targets.write().map_err(|_| anyhow!("poisoned"))? = list;
    Ok(())
}

pub fn pick(urls: &Urls, n: usize) -> Result<String> {
    let list = urls.read().map_err(|_| anyhow!("poisoned"))?;
    list.get(n % list.len().max(1))
        .cloned()
        .ok_or_else(|| anyhow!("no urls"))
}
