//! One run: start (or join) a cluster, create the topics, drive producers, play the fault
//! timeline, then read everything back and verify it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::json;

use crate::clients::{new_histogram, start_consumers, start_producers, AckRun, Endpoints, Live};
use crate::cluster::{Cluster, State};
use crate::group::{Group, GroupResult};
use crate::http::{describe, Http, SETTLE_DEADLINE};
use crate::readback::{self, ReplicaCheck};
use crate::scenario::Protocol;
use crate::scenario::{Action, Scenario, Target, TopicSpec};
use crate::verify::{self, Ack, FaultEvent, Outcome, Verdict, Window};

/// Longest a leader cut off from every other broker may go on leading (raft-rs check-quorum
/// steps it down after an election timeout of at most 20 ticks of 30 ms, checked every 10).
const STEP_DOWN_BOUND: Duration = Duration::from_millis(1500);
#[derive(Debug, Clone)]
pub struct Options {
    /// What the scenario is called in the summary (its file name, or "demo").
    pub name: String,
    pub scenario: Scenario,
    /// Where result.json, acks.csv and the brokers' data and logs go.
    pub out: PathBuf,
    /// Use this running cluster (HTTP base URLs) instead of starting one; no faults on it.
    pub bootstrap: Option<Vec<String>>,
    /// That cluster's Kafka listeners (host:port), for a scenario with `protocol = "kafka"`.
    pub kafka_bootstrap: Option<Vec<String>>,
    pub broker_bin: Option<PathBuf>,
    pub progress: bool,
    /// The nemesis seed the scenario's faults were drawn from, if they were.
    pub seed: Option<u64>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |micros: u64| micros as f64 / 1000.0;
        Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// Everything a run measured; written as result.json.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RunResult {
    pub scenario: String,
    /// What the producers and consumers spoke: "http" or "kafka".
    #[serde(default)]
    pub protocol: String,
    pub duration_s: f64,
    pub brokers: usize,
    pub topic: String,
    pub records_acknowledged: u64,
    pub requests_ok: u64,
    pub requests_failed: u64,
    pub records_per_second: f64,
    /// Acknowledged records in each second of the run.
    pub throughput_per_second: Vec<u64>,
    /// Publish latency (request sent → acknowledged), per request.
    pub publish_latency_ms: Percentiles,
    /// Publish latency p50/p99 in each second of the run.
    pub publish_latency_per_second: Vec<(f64, f64)>,
    /// Records the consumers read (each once per consumer pass; 0 without consumers).
    pub records_consumed: u64,
    /// End-to-end latency (produce request sent → consumer has the record), per record.
    pub end_to_end_latency_ms: Option<Percentiles>,
    /// End-to-end latency p50/p99 in each second of the run (by when the record was read).
    pub end_to_end_latency_per_second: Vec<(f64, f64)>,
    pub faults: Vec<Window>,
    /// Invariants checked during faults ("ok: …" or "violation: …").
    #[serde(default)]
    pub checks: Vec<String>,
    /// The verdict on the first broker's copy (`replicas` has every copy's).
    pub verdict: Verdict,
    /// Every broker's copy, verified on its own and compared with the first.
    #[serde(default)]
    pub replicas: Vec<ReplicaCheck>,
    /// The nemesis seed the fault timeline was drawn from (`loadgen chaos`).
    #[serde(default)]
    pub seed: Option<u64>,
    /// (broker id, most resident memory seen during the load, bytes), for the brokers loadgen
    /// started; sampled every 200 ms from /proc.
    #[serde(default)]
    pub rss_max_bytes: Vec<(u32, u64)>,
    /// The consumer group's measurements and verdict, when the scenario has a `[group]`.
    #[serde(default)]
    pub group: Option<GroupResult>,
    /// The stream job's comparison with its recomputation, when the scenario has a `[stream]`.
    #[serde(default)]
    pub stream: Option<crate::stream::StreamResult>,
}

impl RunResult {
    pub fn passed(&self) -> bool {
        self.verdict.is_clean()
            && self.replicas.iter().all(ReplicaCheck::is_clean)
            && !self.checks.iter().any(|c| c.starts_with("violation"))
            && self.group.as_ref().is_none_or(GroupResult::is_clean)
            && self
                .stream
                .as_ref()
                .is_none_or(crate::stream::StreamResult::is_clean)
    }
}

pub fn run(options: &Options) -> Result<RunResult> {
    let scenario = &options.scenario;
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;
    // Known only by its Kafka listeners: topics, load and read-back all over Kafka.
    let kafka_only = options.bootstrap.is_none() && options.kafka_bootstrap.is_some();
    if kafka_only {
        if scenario.protocol != Protocol::Kafka {
            bail!("--kafka-bootstrap without --bootstrap needs protocol = \"kafka\" (or --protocol kafka)");
        }
        if scenario.group.is_some() || scenario.stream.is_some() {
            bail!("[group] and [stream] use the HTTP API: give --bootstrap too");
        }
    }
    let mut cluster = match &options.bootstrap {
        Some(_) => None,
        None if kafka_only => None,
        None => {
            let binary = match &options.broker_bin {
                Some(path) => path.clone(),
                None => crate::cluster::default_broker_binary()?,
            };
            // The brokers' data of an earlier run into the same directory is loadgen's own:
            // start clean, or its topics would already exist.
            let dir = options.out.join("cluster");
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("clearing {}", dir.display()))?;
            }
            Some(Cluster::start(&binary, &dir, &scenario.cluster)?)
        }
    };
    let urls = match (&options.bootstrap, &cluster) {
        (Some(urls), _) => urls.clone(),
        (None, Some(c)) => c.urls(),
        (None, None) if kafka_only => Vec::new(),
        (None, None) => bail!("no cluster"),
    };
    if cluster.is_none() && !scenario.faults.is_empty() {
        bail!("faults act only on brokers loadgen started: drop --bootstrap or the [[faults]]");
    }
    let http = Http::new(Duration::from_secs(10));
    for topic in &scenario.topics {
        match &options.kafka_bootstrap {
            Some(kafka) if kafka_only => crate::kafka::admin::create_topic(kafka, topic)?,
            _ => {
                create_topic(&http, &urls, topic)?;
                wait_for_leaders(&http, &urls, topic)?;
            }
        }
    }

    let topic = scenario.producer_topic();
    let live = Arc::new(Live::default());
    let start = Instant::now();
    let partitions = scenario
        .topics
        .iter()
        .find(|t| t.name == topic)
        .map_or(1, |t| t.partitions);
    let kafka = match (scenario.protocol, &options.kafka_bootstrap, &cluster) {
        (Protocol::Http, _, _) => Vec::new(),
        (Protocol::Kafka, Some(addresses), _) => addresses.clone(),
        (Protocol::Kafka, None, Some(cluster)) => cluster.kafka_addresses(),
        (Protocol::Kafka, None, None) => {
            bail!("protocol = \"kafka\" on a running cluster needs --kafka-bootstrap")
        }
    };
    let endpoints = match scenario.protocol {
        Protocol::Http => Endpoints::Http(&urls),
        Protocol::Kafka => Endpoints::Kafka(&kafka),
    };
    let producers = start_producers(scenario, &endpoints, &topic, partitions, &live, start)?;
    let consumers = match &scenario.consumers {
        Some(spec) => start_consumers(spec.count, partitions, &endpoints, &topic, &live, start),
        None => Vec::new(),
    };
    let mut group = scenario
        .group
        .as_ref()
        .map(|spec| Group::start(spec, &topic, &urls, start));
    let mut stream = match &scenario.stream {
        Some(spec) => Some(crate::stream::Stream::start(spec, &urls, start)?),
        None => None,
    };

    let bar = progress_bar(options.progress, scenario.duration_s);
    let mut faults = Vec::new();
    let mut checks = Vec::new();
    let end = start + Duration::from_secs_f64(scenario.duration_s);
    let mut timeline = scenario.faults.iter().peekable();
    // Per broker id, the most resident memory seen (sampled with the progress refresh).
    let mut rss_max: std::collections::BTreeMap<u32, u64> = Default::default();
    loop {
        let now = Instant::now();
        if let Some(fault) = timeline.next_if(|f| start + Duration::from_secs_f64(f.at_s) <= now) {
            let at_ms = start.elapsed().as_millis() as u64;
            if fault.action.is_membership() {
                let group = group.as_mut().ok_or_else(|| anyhow!("no [group]"))?;
                let member = crate::scenario::member_target(&fault.target)?;
                let description = match fault.action {
                    Action::Join => group.join(),
                    action => group.remove(member, action == Action::KillMember)?,
                };
                bar.println(format!("{:>6.1} s  {description}", at_ms as f64 / 1000.0));
                continue;
            }
            let stream_victim = match (Target::parse(&fault.target), stream.as_mut()) {
                (Ok(Target::Stream(_)), Some(stream)) => Some(stream.victim(
                    &http,
                    &running_urls(cluster.as_ref(), &urls),
                    fault.action == Action::Kill,
                )?),
                _ => None,
            };
            let (description, affected) = apply_fault(
                cluster.as_mut(),
                &http,
                &urls,
                scenario,
                fault,
                stream_victim,
                &mut checks,
            )
            .with_context(|| format!("fault at {} s", fault.at_s))?;
            if let Some(stream) = &stream {
                stream.set_urls(running_urls(cluster.as_ref(), &urls));
            }
            bar.println(format!("{:>6.1} s  {description}", at_ms as f64 / 1000.0));
            faults.push(FaultEvent {
                at_ms,
                description,
                affected,
            });
            continue;
        }
        if now >= end {
            break;
        }
        if let Some(cluster) = cluster.as_ref() {
            sample_rss(cluster, &mut rss_max);
        }
        let acked = live.acked.load(Ordering::Relaxed);
        let elapsed = start.elapsed().as_secs_f64();
        bar.set_position((elapsed * 1000.0) as u64);
        bar.set_message(format!(
            "{acked} acked, {:.0} rec/s, {} failed requests, {} consumed",
            acked as f64 / elapsed.max(0.001),
            live.failed.load(Ordering::Relaxed),
            live.consumed.load(Ordering::Relaxed)
        ));
        // The next thing to do is a progress refresh or the next fault, whichever is first.
        let next_fault = timeline
            .peek()
            .map(|f| start + Duration::from_secs_f64(f.at_s))
            .unwrap_or(end);
        let wake = next_fault.min(end).min(now + Duration::from_millis(200));
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
    }
    live.stop.store(true, Ordering::Release);
    let reports: Vec<_> = join_all(producers, "producer")?
        .into_iter()
        .flatten()
        .collect();
    let e2e_reports = join_all(consumers, "consumer")?;
    let elapsed = start.elapsed();
    bar.finish_and_clear();

    // Everything back up, so every acknowledged record can be read.
    if let Some(cluster) = cluster.as_mut() {
        cluster.heal()?;
    }
    let acks: Vec<Ack> = reports
        .iter()
        .flat_map(|r| r.acks.iter().flat_map(AckRun::acks))
        .collect();
    // The group reads on until it has every acknowledged record, then its members leave.
    let group = group.map(|mut group| {
        let mut targets: std::collections::BTreeMap<u32, u64> = Default::default();
        for ack in &acks {
            let to = targets.entry(ack.partition).or_default();
            *to = (*to).max(ack.offset + 1);
        }
        let drained = group.drain(&targets);
        group.finish(&acks, elapsed.as_millis() as u64, drained)
    });
    let stream = match (stream, &scenario.stream) {
        (Some(stream), Some(spec)) => {
            let partitions_of = |name: &str| {
                scenario
                    .topics
                    .iter()
                    .find(|t| t.name == name)
                    .map_or(1, |t| t.partitions)
            };
            let partitions = (partitions_of(&spec.input), partitions_of(&spec.output));
            Some(stream.finish(&urls, partitions)?)
        }
        _ => None,
    };
    if acks.is_empty() {
        // A run that stored nothing proves nothing: fail it rather than pass it vacuously.
        checks.push("violation: no record was acknowledged, so nothing was verified".into());
    }
    save_acks(&options.out.join("acks.csv"), &acks)?;
    let (verdict, replicas) = if kafka_only {
        // Over Kafka only the leaders' copy can be read: one copy verified, no replicas.
        let log = crate::kafka::admin::read_topic(&kafka, &topic, partitions)?;
        (verify::verify(&acks, &log), Vec::new())
    } else {
        readback::verify_replicas(&http, &urls, &topic, &scenario.topics, &acks)?
    };
    let mut outcomes: Vec<Outcome> = reports
        .iter()
        .flat_map(|r| r.outcomes.iter().copied())
        .collect();
    outcomes.sort_unstable_by_key(|o| o.at_ms);
    let windows = verify::unavailability(&faults, &outcomes);

    let seconds = elapsed.as_secs() as usize + 1;
    let mut throughput = vec![0u64; seconds];
    let mut overall = new_histogram();
    let mut per_second: Vec<Histogram<u64>> = (0..seconds).map(|_| new_histogram()).collect();
    for report in &reports {
        for (at_ms, micros, _) in &report.latencies {
            let _ = overall.record(*micros);
            if let Some(h) = per_second.get_mut((*at_ms / 1000) as usize) {
                let _ = h.record(*micros);
            }
        }
    }
    for report in &reports {
        // Records per second by acknowledgement time: each request's records count at its answer.
        for (at_ms, _, records) in &report.latencies {
            if let Some(slot) = throughput.get_mut((*at_ms / 1000) as usize) {
                *slot += u64::from(*records);
            }
        }
    }
    let mut e2e = new_histogram();
    let mut e2e_per_second: Vec<Histogram<u64>> = (0..seconds).map(|_| new_histogram()).collect();
    for report in &e2e_reports {
        let _ = e2e.add(&report.overall);
        for (slot, h) in e2e_per_second.iter_mut().zip(&report.per_second) {
            let _ = slot.add(h);
        }
    }
    let result = RunResult {
        scenario: options.name.clone(),
        protocol: scenario.protocol.name().to_owned(),
        duration_s: elapsed.as_secs_f64(),
        brokers: if kafka_only { kafka.len() } else { urls.len() },
        topic,
        records_acknowledged: acks.len() as u64,
        requests_ok: overall.len(),
        requests_failed: reports.iter().map(|r| r.failed).sum(),
        records_per_second: acks.len() as f64 / elapsed.as_secs_f64(),
        throughput_per_second: throughput,
        publish_latency_ms: Percentiles::of(&overall),
        publish_latency_per_second: quantiles_per_second(&per_second),
        records_consumed: live.consumed.load(Ordering::Relaxed),
        end_to_end_latency_ms: (!e2e.is_empty()).then(|| Percentiles::of(&e2e)),
        end_to_end_latency_per_second: quantiles_per_second(&e2e_per_second),
        faults: windows,
        checks,
        verdict,
        replicas,
        seed: options.seed,
        rss_max_bytes: rss_max.into_iter().collect(),
        group,
        stream,
    };
    std::fs::write(
        options.out.join("result.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    std::fs::write(
        options.out.join("report.html"),
        crate::report::render(&result)?,
    )?;
    if let Some(mut cluster) = cluster {
        cluster.stop();
        // A clean run's data is only bulk; a failed one's is kept for a post-mortem.
        if result.passed() {
            cluster.remove_data();
        }
    }
    Ok(result)
}

/// Raise `max` to each running broker's resident memory now (Linux /proc; elsewhere nothing).
fn sample_rss(cluster: &Cluster, max: &mut std::collections::BTreeMap<u32, u64>) {
    for broker in &cluster.brokers {
        let Some(pid) = broker.pid() else { continue };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
        if let Some(kib) = kib {
            let slot = max.entry(broker.id).or_default();
            *slot = (*slot).max(kib * 1024);
        }
    }
}

/// Wait for every thread and collect what each returned.
fn join_all<T>(threads: Vec<std::thread::JoinHandle<T>>, what: &str) -> Result<Vec<T>> {
    threads
        .into_iter()
        .map(|t| t.join().map_err(|_| anyhow!("a {what} thread panicked")))
        .collect()
}

/// (p50, p99) in milliseconds of each histogram; (0, 0) for empty ones.
fn quantiles_per_second(histograms: &[Histogram<u64>]) -> Vec<(f64, f64)> {
    histograms
        .iter()
        .map(|h| {
            if h.is_empty() {
                (0.0, 0.0)
            } else {
                (
                    h.value_at_quantile(0.5) as f64 / 1000.0,
                    h.value_at_quantile(0.99) as f64 / 1000.0,
                )
            }
        })
        .collect()
}

fn progress_bar(visible: bool, duration_s: f64) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new((duration_s * 1000.0) as u64);
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Create a topic, retrying while the cluster elects its metadata leader.
fn create_topic(http: &Http, urls: &[String], topic: &TopicSpec) -> Result<()> {
    let body = json!({
        "name": topic.name,
        "partitions": topic.partitions,
        "replication_factor": topic.replication_factor,
    })
    .to_string();
    let deadline = Instant::now() + SETTLE_DEADLINE;
    let mut attempt = 0usize;
    loop {
        let url = format!("{}/topics", urls[attempt % urls.len()]);
        match http.post(&url, "application/json", &body) {
            Ok(reply) if reply.status == 201 => return Ok(()),
            Ok(reply) if reply.status == 409 => {
                bail!("topic '{}' already exists: {}", topic.name, reply.text)
            }
            Ok(reply) if reply.status < 500 && reply.status != 421 => {
                bail!(
                    "creating topic '{}': {} {}",
                    topic.name,
                    reply.status,
                    reply.text
                )
            }
            _ if Instant::now() > deadline => bail!("could not create topic '{}'", topic.name),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
        attempt += 1;
    }
}

fn wait_for_leaders(http: &Http, urls: &[String], topic: &TopicSpec) -> Result<()> {
    for partition in 0..topic.partitions {
        leader_of(http, urls, &topic.name, partition)?;
    }
    Ok(())
}

/// The partition's leader, once one is known and answering.
/// The HTTP URLs of the brokers running now (all of `urls` without a cluster loadgen started).
fn running_urls(cluster: Option<&Cluster>, urls: &[String]) -> Vec<String> {
    match cluster {
        Some(cluster) => cluster
            .brokers
            .iter()
            .filter(|b| b.state == State::Running)
            .map(|b| b.url(""))
            .collect(),
        None => urls.to_vec(),
    }
}

fn leader_of(http: &Http, urls: &[String], topic: &str, partition: u32) -> Result<u32> {
    let deadline = Instant::now() + SETTLE_DEADLINE;
    loop {
        for url in urls {
            if let Some(leader) = describe(http, url, topic, partition)
                .and_then(|d| d["leader"].as_u64())
                .filter(|l| *l != 0)
            {
                return Ok(leader as u32);
            }
        }
        if Instant::now() > deadline {
            bail!("no leader for {topic}/{partition}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Carry out one fault; what it did comes back for the timeline. Invariant checks made along the
/// way (an isolated leader stepped down) are appended to `checks`.
fn apply_fault(
    cluster: Option<&mut Cluster>,
    http: &Http,
    urls: &[String],
    scenario: &Scenario,
    fault: &crate::scenario::Fault,
    stream_victim: Option<u32>,
    checks: &mut Vec<String>,
) -> Result<(String, Vec<u32>)> {
    match fault.action {
        Action::DeleteTopic => {
            let reply = http.delete(&format!("{}/topics/{}", urls[0], fault.target))?;
            if reply.status != 200 && reply.status != 204 {
                bail!("deleting {}: {} {}", fault.target, reply.status, reply.text);
            }
            return Ok((format!("deleted topic {}", fault.target), Vec::new()));
        }
        Action::CreateTopic => {
            let spec = scenario
                .topics
                .iter()
                .find(|t| t.name == fault.target)
                .ok_or_else(|| anyhow!("no topic {}", fault.target))?;
            create_topic(http, urls, spec)?;
            return Ok((format!("created topic {}", fault.target), Vec::new()));
        }
        _ => {}
    }
    let cluster = cluster.ok_or_else(|| anyhow!("broker faults need a cluster loadgen started"))?;
    if fault.action == Action::Heal {
        // Before healing: an isolated broker must have stepped down everywhere (Raft
        // check-quorum), or it could be acknowledging writes no majority holds.
        let mut still_leading = Vec::new();
        for (id, since) in cluster.isolated.clone() {
            // Check-quorum makes a cut-off leader step down within about two election
            // timeouts; a shorter isolation (the nemesis heals after as little as 0.2 s) proves
            // nothing either way.
            if since.elapsed() < STEP_DOWN_BOUND {
                continue;
            }
            let url = cluster.broker(id)?.url("");
            for topic in &scenario.topics {
                for partition in 0..topic.partitions {
                    let view = describe(http, &url, &topic.name, partition);
                    if view.and_then(|d| d["leader"].as_u64()) == Some(u64::from(id)) {
                        still_leading.push(format!("{}/{partition}", topic.name));
                    }
                }
            }
            checks.push(if still_leading.is_empty() {
                format!("ok: isolated broker {id} led no partition when the network healed")
            } else {
                format!("violation: isolated broker {id} still led {still_leading:?} when the network healed")
            });
        }
        cluster.heal_network();
        return Ok(("heal the network".to_owned(), Vec::new()));
    }
    let running: Vec<String> = cluster
        .brokers
        .iter()
        .filter(|b| b.state == State::Running)
        .map(|b| b.url(""))
        .collect();
    let targets: Vec<u32> = match Target::parse(&fault.target)? {
        Target::Broker(id) => vec![id],
        Target::Stream(job) => vec![stream_victim.ok_or_else(|| anyhow!("no [stream] job {job}"))?],
        Target::Leader { topic, partition } => vec![leader_of(http, &running, &topic, partition)?],
        Target::Follower { topic, partition } => {
            let leader = leader_of(http, &running, &topic, partition)?;
            let described = describe(http, &running[0], &topic, partition)
                .ok_or_else(|| anyhow!("cannot describe {topic}/{partition}"))?;
            let follower = described["replicas"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["broker"].as_u64())
                .map(|b| b as u32)
                .find(|b| {
                    *b != leader && cluster.broker(*b).is_ok_and(|b| b.state == State::Running)
                })
                .ok_or_else(|| anyhow!("{topic}/{partition} has no running follower"))?;
            vec![follower]
        }
        Target::Killed => cluster.in_state(State::Killed),
        Target::Paused => cluster.in_state(State::Paused),
    };
    // The producers' partitions these brokers lead now: the ones a kill, pause or isolation
    // makes unavailable. (A restart or resume affects none in particular.)
    let mut affected = Vec::new();
    if matches!(fault.action, Action::Kill | Action::Pause | Action::Isolate) {
        let topic = scenario.producer_topic();
        let partitions = scenario
            .topics
            .iter()
            .find(|t| t.name == topic)
            .map_or(0, |t| t.partitions);
        for partition in 0..partitions {
            let leader = running
                .iter()
                .find_map(|url| describe(http, url, &topic, partition))
                .and_then(|d| d["leader"].as_u64());
            if leader.is_some_and(|l| targets.contains(&(l as u32))) {
                affected.push(partition);
            }
        }
    }
    for id in &targets {
        match fault.action {
            Action::Kill => cluster.kill(*id)?,
            Action::Restart => cluster.restart(*id)?,
            Action::Pause => cluster.pause(*id)?,
            Action::Resume => cluster.resume(*id)?,
            Action::Isolate => cluster.isolate(*id)?,
            Action::DeleteTopic | Action::CreateTopic | Action::Heal => {}
            Action::Join | Action::Leave | Action::KillMember => {}
        }
    }
    let verb = match fault.action {
        Action::Kill => "kill -9",
        Action::Restart => "restart",
        Action::Pause => "pause (SIGSTOP)",
        Action::Resume => "resume (SIGCONT)",
        Action::Isolate => "isolate from the other brokers:",
        Action::DeleteTopic
        | Action::CreateTopic
        | Action::Heal
        | Action::Join
        | Action::Leave
        | Action::KillMember => "",
    };
    Ok((
        format!("{verb} broker {targets:?} ({})", fault.target),
        affected,
    ))
}

/// Wait until every reachable broker reports the same high watermarks, then read every
/// partition of `topic` from the start.
fn save_acks(path: &Path, acks: &[Ack]) -> Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "producer,sequence,partition,offset")?;
    for a in acks {
        writeln!(
            out,
            "{},{},{},{}",
            a.producer, a.sequence, a.partition, a.offset
        )?;
    }
    out.flush()?;
    Ok(())
}

pub fn load_acks(path: &Path) -> Result<Vec<Ack>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .skip(1)
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            let field = |i: usize| -> Result<u64> {
                fields
                    .get(i)
                    .ok_or_else(|| anyhow!("short line '{line}'"))?
                    .parse()
                    .with_context(|| format!("bad line '{line}'"))
            };
            Ok(Ack {
                producer: field(0)? as u32,
                sequence: field(1)?,
                partition: field(2)? as u32,
                offset: field(3)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_round_trip_through_the_csv() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("acks.csv");
        let acks = vec![Ack {
            producer: 1,
            sequence: 2,
            partition: 3,
            offset: 4,
        }];
        save_acks(&path, &acks).expect("save");
        assert_eq!(load_acks(&path).expect("load"), acks);
    }
}
