//! Scenario files: what to run, for how long, and what to break when.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The scenario `loadgen demo` runs (also `loadgen/scenarios/demo.toml`).
pub const DEMO: &str = include_str!("../scenarios/demo.toml");
/// The cluster and load `loadgen chaos` runs its seeded fault timeline on.
pub const CHAOS: &str = include_str!("../scenarios/chaos.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Seconds of load.
    pub duration_s: f64,
    #[serde(default)]
    pub cluster: ClusterSpec,
    pub topics: Vec<TopicSpec>,
    pub producers: ProducerSpec,
    /// What the producers and tailing consumers speak: `http` (the REST API) or `kafka` (the
    /// Kafka wire protocol, to each partition's leader). Groups and stream jobs use HTTP either
    /// way; the verifier reads every broker's copy over HTTP.
    #[serde(default)]
    pub protocol: Protocol,
    /// Consumers tail the producers' topic and measure end-to-end latency (none if absent).
    #[serde(default)]
    pub consumers: Option<ConsumerSpec>,
    /// A consumer group reading the producers' topic through the REST Proxy v2 consumer API,
    /// verified for at-least-once delivery across rebalances and faults (none if absent).
    #[serde(default)]
    pub group: Option<crate::group::GroupSpec>,
    /// A stream job over events of its own, its output compared with an offline
    /// recomputation at the end (none if absent).
    #[serde(default)]
    pub stream: Option<crate::stream::StreamSpec>,
    #[serde(default)]
    pub faults: Vec<Fault>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Kafka,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Kafka => "kafka",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSpec {
    /// Consumer threads; the topic's partitions are shared out among them.
    pub count: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSpec {
    /// Brokers loadgen starts (ignored with `--bootstrap`).
    pub brokers: u32,
    /// Milliseconds per Raft tick for the brokers it starts.
    pub raft_tick_ms: u64,
    /// Route broker-to-broker traffic through loadgen's TCP proxies, so `isolate`/`heal` can
    /// partition the network (costs a hop on every Raft message).
    pub proxies: bool,
    /// Extra `PUBG1_*` settings for every broker, e.g. a small `PUBG1_RAFT_LOG_KEEP_ENTRIES_MAX`
    /// so that snapshots happen within seconds.
    pub broker_env: BTreeMap<String, String>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            brokers: 3,
            raft_tick_ms: 30,
            proxies: false,
            broker_env: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProducerSpec {
    /// Concurrent producers; each has one request in flight.
    pub count: u32,
    /// Records per second over all producers; 0 = as fast as the cluster takes them.
    #[serde(default)]
    pub rate: u64,
    /// Bytes of each record's value (at least 40: id, sequence and timestamp travel in it).
    #[serde(default = "default_record_bytes")]
    pub record_bytes: usize,
    /// Records per produce request.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// `none` (keyless), `uniform:N` (N distinct keys) or `mixed:N` (even producers keyed, odd
    /// ones keyless). Each request names one partition, in turn; keyed records take keys that
    /// Kafka's default partitioner sends to that partition.
    #[serde(default = "default_keys")]
    pub keys: String,
    /// The topic they write to (default: the first).
    #[serde(default)]
    pub topic: Option<String>,
    /// Produce as idempotent producers (a producer id from `POST /producers`, a sequence per
    /// partition) and resend a failed request until it is answered: after a failover the
    /// broker stores it once. Off: a failed request is abandoned.
    #[serde(default = "default_idempotent")]
    pub idempotent: bool,
    /// Requests each producer keeps in flight over the Kafka protocol (pipelined on its
    /// connections, answered in order; at most 5, Kafka's bound for idempotent producers). Over
    /// HTTP each producer has one.
    #[serde(default = "default_in_flight")]
    pub in_flight: usize,
}

fn default_in_flight() -> usize {
    5
}

fn default_idempotent() -> bool {
    true
}

fn default_record_bytes() -> usize {
    100
}
fn default_batch() -> usize {
    10
}
fn default_keys() -> String {
    "none".into()
}

/// One step of the fault timeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Seconds after load starts.
    pub at_s: f64,
    pub action: Action,
    /// `leader:TOPIC/PARTITION`, `follower:TOPIC/PARTITION`, `broker:N`; for `restart` also
    /// `killed` (every killed broker), for `resume` also `paused`; for topic actions the topic;
    /// for `leave` and `kill-member` `member:N` (empty: the longest-serving member).
    #[serde(default)]
    pub target: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// kill -9.
    Kill,
    /// Start a killed broker again on its data dir.
    Restart,
    /// SIGSTOP.
    Pause,
    /// SIGCONT.
    Resume,
    /// Delete the topic through the admin API (destroys acknowledged records: for proving the
    /// verifier catches loss).
    DeleteTopic,
    /// Create the topic again with the scenario's settings.
    CreateTopic,
    /// Cut a broker off from the other brokers (needs `[cluster] proxies = true`).
    Isolate,
    /// Reconnect every broker (target ignored).
    Heal,
    /// A new member joins the `[group]` (target ignored).
    Join,
    /// A member of the `[group]` leaves it (deletes its instance).
    Leave,
    /// A member of the `[group]` stops polling without leaving or committing its last poll,
    /// as a killed client does: its partitions move after its session times out.
    KillMember,
}

impl Action {
    /// Whether it acts on the consumer group rather than on brokers or topics.
    pub fn is_membership(self) -> bool {
        matches!(self, Action::Join | Action::Leave | Action::KillMember)
    }
}

/// The member a `leave` or `kill-member` names: `member:N`, or None for the longest-serving.
pub fn member_target(text: &str) -> Result<Option<u32>> {
    if text.is_empty() {
        return Ok(None);
    }
    text.strip_prefix("member:")
        .and_then(|n| n.parse().ok())
        .map(Some)
        .with_context(|| format!("'{text}': expected member:N"))
}

/// Who a broker fault hits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Leader {
        topic: String,
        partition: u32,
    },
    Follower {
        topic: String,
        partition: u32,
    },
    Broker(u32),
    /// The broker running a stream job.
    Stream(String),
    Killed,
    Paused,
}

impl Target {
    pub fn parse(text: &str) -> Result<Self> {
        let partition_of = |rest: &str| -> Result<(String, u32)> {
            let (topic, partition) = rest
                .rsplit_once('/')
                .with_context(|| format!("'{text}': expected TOPIC/PARTITION"))?;
            Ok((
                topic.to_owned(),
                partition
                    .parse()
                    .with_context(|| format!("'{text}': bad partition"))?,
            ))
        };
        Ok(match text.split_once(':') {
            Some(("leader", rest)) => {
                let (topic, partition) = partition_of(rest)?;
                Target::Leader { topic, partition }
            }
            Some(("follower", rest)) => {
                let (topic, partition) = partition_of(rest)?;
                Target::Follower { topic, partition }
            }
            Some(("broker", n)) => Target::Broker(n.parse().with_context(|| format!("'{text}': bad broker id"))?),
            Some(("stream", job)) if !job.is_empty() => Target::Stream(job.to_owned()),
            None if text == "killed" => Target::Killed,
            None if text == "paused" => Target::Paused,
            _ => bail!("unknown fault target '{text}' (leader:T/P, follower:T/P, broker:N, stream:JOB, killed, paused)"),
        })
    }
}

impl Scenario {
    pub fn parse(text: &str) -> Result<Self> {
        let scenario: Scenario = toml::from_str(text).context("parsing the scenario")?;
        scenario.validate()?;
        Ok(scenario)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    fn validate(&self) -> Result<()> {
        if !self.duration_s.is_finite() || self.duration_s <= 0.0 {
            bail!("duration_s must be positive");
        }
        if self.topics.is_empty() {
            bail!("at least one [[topics]] is needed");
        }
        if self.producers.count == 0 || self.producers.batch == 0 {
            bail!("producers.count and producers.batch must be at least 1");
        }
        if !(1..=5).contains(&self.producers.in_flight) {
            bail!("producers.in_flight must be 1 to 5");
        }
        if self.producers.batch > i32::MAX as usize / 2 {
            bail!("producers.batch is too large");
        }
        if self
            .group
            .as_ref()
            .is_some_and(|g| g.drain_s <= 0.0 || g.poll_timeout_ms == 0)
        {
            bail!("group.drain_s and group.poll_timeout_ms must be positive");
        }
        if self.consumers.as_ref().is_some_and(|c| c.count == 0) {
            bail!("consumers.count must be at least 1 (or leave out [consumers])");
        }
        if self.producers.record_bytes < 40 {
            bail!("producers.record_bytes must be at least 40");
        }
        self.key_space(0)?;
        let topic = self.producer_topic();
        if !self.topics.iter().any(|t| t.name == topic) {
            bail!("producers.topic '{topic}' is not among the topics");
        }
        for fault in &self.faults {
            match fault.action {
                Action::DeleteTopic | Action::CreateTopic => {
                    if !self.topics.iter().any(|t| t.name == fault.target) {
                        bail!("fault target '{}' is not among the topics", fault.target);
                    }
                }
                Action::Heal => {}
                action if action.is_membership() => {
                    if self.group.is_none() {
                        bail!("{action:?} needs a [group]");
                    }
                    member_target(&fault.target)?;
                }
                Action::Isolate if !self.cluster.proxies => {
                    bail!("isolate needs [cluster] proxies = true");
                }
                _ => {
                    if let Target::Stream(job) = Target::parse(&fault.target)? {
                        if self.stream.as_ref().is_none_or(|s| s.job != job) {
                            bail!("fault target 'stream:{job}' is not the [stream] job");
                        }
                    }
                }
            }
            if fault.at_s < 0.0 || fault.at_s > self.duration_s {
                bail!(
                    "fault at {} s is outside the run's {} s",
                    fault.at_s,
                    self.duration_s
                );
            }
        }
        if let Some(stream) = &self.stream {
            for topic in [&stream.input, &stream.output] {
                if !self.topics.iter().any(|t| &t.name == topic) {
                    bail!("stream topic '{topic}' is not among the topics");
                }
            }
            if stream.input == topic || stream.output == topic || stream.input == stream.output {
                bail!(
                    "[stream] needs input and output topics of its own (not the producers' topic)"
                );
            }
            if stream.events_per_s == 0 || stream.drain_s <= 0.0 {
                bail!("stream.events_per_s and stream.drain_s must be positive");
            }
            if stream.skew_ms < 0 || stream.late_ms < 0 {
                bail!("stream.skew_ms and stream.late_ms must not be negative");
            }
        }
        if self.faults.windows(2).any(|w| w[1].at_s < w[0].at_s) {
            bail!("faults must be listed in time order");
        }
        Ok(())
    }

    /// Distinct keys producer number `producer` uses; None = keyless.
    pub fn key_space(&self, producer: u32) -> Result<Option<u64>> {
        let keys = self.producers.keys.as_str();
        if keys == "none" {
            return Ok(None);
        }
        let (mixed, n) = match (keys.strip_prefix("uniform:"), keys.strip_prefix("mixed:")) {
            (Some(n), _) => (false, n),
            (_, Some(n)) => (true, n),
            _ => return bad_keys(keys),
        };
        match n.parse::<u64>() {
            Ok(n) if n > 0 => Ok((!mixed || producer.is_multiple_of(2)).then_some(n)),
            _ => bad_keys(keys),
        }
    }

    /// The seeded nemesis: replace the fault timeline with `faults` steps drawn from `seed`
    /// (see [`crate::nemesis`]), starting 2 s into the load, and run until 3 s after the last.
    pub fn with_nemesis(mut self, seed: u64, faults: usize) -> Self {
        let brokers = self.cluster.brokers;
        let isolate = self.cluster.proxies;
        self.faults = crate::nemesis::timeline(seed, faults, brokers, isolate, 2.0);
        self.duration_s = self.faults.last().map_or(self.duration_s, |f| f.at_s + 3.0);
        self
    }

    pub fn producer_topic(&self) -> String {
        self.producers
            .topic
            .clone()
            .unwrap_or_else(|| self.topics[0].name.clone())
    }
}

fn bad_keys<T>(keys: &str) -> Result<T> {
    bail!("producers.keys must be 'none', 'uniform:N' or 'mixed:N' with N > 0, not '{keys}'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_scenarios_parse() {
        for text in [
            DEMO,
            include_str!("../scenarios/flat-out.toml"),
            include_str!("../scenarios/delete-topic.toml"),
            include_str!("../scenarios/partition.toml"),
            include_str!("../scenarios/steady.toml"),
            include_str!("../scenarios/leader-kills.toml"),
            include_str!("../scenarios/stalled-follower.toml"),
            include_str!("../scenarios/groups.toml"),
            include_str!("../scenarios/groups-1000.toml"),
            include_str!("../scenarios/group-throughput.toml"),
            CHAOS,
        ] {
            Scenario::parse(text).expect("scenario");
        }
    }

    #[test]
    fn mistakes_are_named() {
        let base = "duration_s = 5\n[[topics]]\nname = \"t\"\npartitions = 1\nreplication_factor = 1\n[producers]\ncount = 1\n";
        for (extra, expected) in [
            (
                "[[faults]]\nat_s = 1\naction = \"kill\"\ntarget = \"leader:t\"\n",
                "TOPIC/PARTITION",
            ),
            (
                "[[faults]]\nat_s = 9\naction = \"kill\"\ntarget = \"broker:1\"\n",
                "outside",
            ),
            ("[[faults]]\nat_s = 1\naction = \"explode\"\n", "explode"),
            (
                "[[faults]]\nat_s = 1\naction = \"kill\"\ntarget = \"someone\"\n",
                "unknown fault target",
            ),
            (
                "[[faults]]\nat_s = 1\naction = \"join\"\n",
                "needs a [group]",
            ),
        ] {
            let error = format!(
                "{:#}",
                Scenario::parse(&format!("{base}{extra}")).expect_err(extra)
            );
            assert!(error.contains(expected), "{extra}: {error}");
        }
        let keys = base.replace("count = 1", "count = 1\nkeys = \"zipf\"");
        let error = format!("{:#}", Scenario::parse(&keys).expect_err("keys"));
        assert!(error.contains("uniform:N"), "{error}");
    }

    #[test]
    fn targets_parse() {
        assert_eq!(
            Target::parse("leader:demo/3").expect("leader"),
            Target::Leader {
                topic: "demo".into(),
                partition: 3
            }
        );
        assert_eq!(
            Target::parse("broker:2").expect("broker"),
            Target::Broker(2)
        );
        assert_eq!(Target::parse("killed").expect("killed"), Target::Killed);
    }
}
