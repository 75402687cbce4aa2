//! Group consumers: members of one consumer group reading the producers' topic through the
//! REST Proxy v2 consumer API, joining, leaving and being killed on the scenario's timeline,
//! and a monitor that watches the group's committed offsets. Everything they saw goes to
//! [`crate::group_verify`].
//!
//! A member polls, then commits exactly what that poll returned before it polls again, so a
//! record is delivered twice only when the poll that first delivered it was never committed.
//! A member that loses its instance (404: its coordinator moved or its session expired; or its
//! coordinator stops answering) joins again as a new incarnation, as a Kafka client would.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::clients::new_histogram;
use crate::group_verify::{
    self, Delivery, End, GroupVerdict, Incarnation, MembershipEvent, Observation, Rebalance,
};
use crate::http::Http;
use crate::run::Percentiles;
use crate::verify::Ack;

const V2: &str = "application/vnd.kafka.v2+json";
/// Pause after a failed request (the member then tries the next broker).
const RETRY: Duration = Duration::from_millis(50);
/// How often the monitor reads the group's committed offsets.
const MONITOR_INTERVAL: Duration = Duration::from_millis(100);

/// `[group]` of a scenario: one consumer group on the producers' topic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// The group's name.
    #[serde(default = "default_name")]
    pub name: String,
    /// Members at the start (more join and some leave on the fault timeline).
    pub members: u32,
    /// `session.timeout.ms` of every member.
    #[serde(default = "default_session_timeout")]
    pub session_timeout_ms: u64,
    /// How long a poll waits for records.
    #[serde(default = "default_poll_timeout")]
    pub poll_timeout_ms: u64,
    /// `max_bytes` of each poll.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// After the load, how long the members may take to read every acknowledged record.
    #[serde(default = "default_drain")]
    pub drain_s: f64,
}

fn default_name() -> String {
    "loadgen".into()
}
fn default_session_timeout() -> u64 {
    3000
}
fn default_poll_timeout() -> u64 {
    200
}
fn default_max_bytes() -> usize {
    1024 * 1024
}
fn default_drain() -> f64 {
    60.0
}

/// What the group's members and monitor measured, and the verdict on it (in result.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupResult {
    pub group: String,
    pub members_joined: u32,
    /// Instances created in all (a member that lost its instance joined again).
    pub incarnations: u32,
    pub verdict: GroupVerdict,
    /// Records polls returned per second of the run (by when they arrived).
    pub delivered_per_second: Vec<u64>,
    /// Records per second through the group while the producers ran.
    pub records_per_second_during_load: f64,
    /// How long the members took, after the load, to read the rest (None: they never did).
    pub drained_after_ms: Option<u64>,
    /// Records delivered over the time from the first delivery to the last: the group's read
    /// rate (on a backlog, what it can read; under load, what it was given).
    pub read_records_per_second: f64,
    pub commit_latency_ms: Percentiles,
    pub commits_ok: u64,
    /// Commits answered with an error, by error code.
    pub commits_refused: BTreeMap<String, u64>,
    pub rebalances: Vec<Rebalance>,
}

impl GroupResult {
    pub fn is_clean(&self) -> bool {
        self.verdict.is_clean() && self.drained_after_ms.is_some()
    }
}

/// What the member threads and the monitor log, shared.
#[derive(Default)]
struct Log {
    deliveries: Vec<Delivery>,
    incarnations: Vec<Incarnation>,
    observations: Vec<Observation>,
    commit_latency: Option<Histogram<u64>>,
    commits_ok: u64,
    commits_refused: BTreeMap<String, u64>,
    /// Per partition, one past the highest offset delivered and committed.
    delivered_to: BTreeMap<u32, u64>,
    /// (asked at, ms since start; whether the coordinator described the group as stable).
    states: Vec<(u64, bool)>,
    /// Per member, when its first instance was subscribed (ms since start).
    subscribed_ms: BTreeMap<u32, u64>,
}

/// What a member is told to do.
const RUN: u8 = 0;
const LEAVE: u8 = 1;
const KILL: u8 = 2;

struct Member {
    control: Arc<AtomicU8>,
    thread: JoinHandle<()>,
}

/// The group's members and monitor while a run goes on.
pub struct Group {
    spec: GroupSpec,
    topic: String,
    urls: Vec<String>,
    start: Instant,
    log: Arc<Mutex<Log>>,
    members: Vec<Option<Member>>,
    events: Vec<MembershipEvent>,
    /// (index in `events`, member) of each join: its rebalance is timed from when the member
    /// was subscribed, which on a busy machine can be seconds after the join was asked for.
    joins: Vec<(usize, u32)>,
    monitor: Option<(Arc<AtomicU8>, JoinHandle<()>)>,
    /// Where the coordinator was last found (index into `urls`), shared by the threads.
    coordinator: Arc<AtomicU64>,
}

fn lock(log: &Mutex<Log>) -> MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Group {
    pub fn start(spec: &GroupSpec, topic: &str, urls: &[String], start: Instant) -> Self {
        let mut group = Self {
            spec: spec.clone(),
            topic: topic.to_owned(),
            urls: urls.to_vec(),
            start,
            log: Arc::new(Mutex::new(Log::default())),
            members: Vec::new(),
            events: Vec::new(),
            joins: Vec::new(),
            monitor: None,
            coordinator: Arc::new(AtomicU64::new(0)),
        };
        for _ in 0..spec.members {
            group.spawn_member();
        }
        group.monitor = Some(group.spawn_monitor());
        group
    }

    fn at_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// A new member joins; returns its number.
    pub fn join(&mut self) -> String {
        let n = self.spawn_member();
        let description = format!("member {n} joins");
        self.joins.push((self.events.len(), n));
        self.events.push(MembershipEvent {
            at_ms: self.at_ms(),
            description: description.clone(),
        });
        description
    }

    /// Member `n` (or the oldest one still in the group) leaves, or is killed (`kill`: it
    /// stops polling without leaving or committing its last poll).
    pub fn remove(&mut self, n: Option<u32>, kill: bool) -> Result<String> {
        let n = match n {
            Some(n) => n,
            None => self
                .members
                .iter()
                .position(Option::is_some)
                .map(|i| i as u32)
                .ok_or_else(|| anyhow!("no member left in the group"))?,
        };
        let member = self
            .members
            .get_mut(n as usize)
            .and_then(Option::take)
            .ok_or_else(|| anyhow!("member {n} is not in the group"))?;
        member
            .control
            .store(if kill { KILL } else { LEAVE }, Ordering::Release);
        // A leave is done when the member has deleted its instance (after the poll it was in),
        // a kill when its thread stopped: the event counts from then.
        let _ = member.thread.join();
        let at_ms = self.at_ms();
        let description = if kill {
            format!("member {n} killed")
        } else {
            format!("member {n} leaves")
        };
        self.events.push(MembershipEvent {
            at_ms,
            description: description.clone(),
        });
        Ok(description)
    }

    fn spawn_member(&mut self) -> u32 {
        let n = self.members.len() as u32;
        let control = Arc::new(AtomicU8::new(RUN));
        let context = MemberContext {
            n,
            spec: self.spec.clone(),
            topic: self.topic.clone(),
            urls: self.urls.clone(),
            start: self.start,
            log: self.log.clone(),
            control: control.clone(),
            coordinator: self.coordinator.clone(),
        };
        let thread = std::thread::spawn(move || context.run());
        self.members.push(Some(Member { control, thread }));
        n
    }

    fn spawn_monitor(&self) -> (Arc<AtomicU8>, JoinHandle<()>) {
        let stop = Arc::new(AtomicU8::new(RUN));
        let (stop_flag, log, urls, group, start) = (
            stop.clone(),
            self.log.clone(),
            self.urls.clone(),
            self.spec.name.clone(),
            self.start,
        );
        let coordinator = self.coordinator.clone();
        let thread = std::thread::spawn(move || {
            let http = Http::new(Duration::from_secs(2));
            while stop_flag.load(Ordering::Acquire) == RUN {
                let at = coordinator.load(Ordering::Relaxed) as usize % urls.len();
                let sent_ms = start.elapsed().as_millis() as u64;
                let reply = http.get(&format!("{}/consumer-groups/{group}", urls[at]));
                let received_ms = start.elapsed().as_millis() as u64;
                match reply {
                    Ok(reply) if reply.status == 200 => {
                        let seen = reply.body["partitions"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default();
                        let mut log = lock(&log);
                        log.states.push((sent_ms, reply.body["state"] == "Stable"));
                        for p in seen {
                            if let (Some(partition), Some(offset)) =
                                (p["partition"].as_u64(), p["committed_offset"].as_u64())
                            {
                                log.observations.push(Observation {
                                    partition: partition as u32,
                                    offset,
                                    sent_ms,
                                    received_ms,
                                });
                            }
                        }
                    }
                    Ok(reply) if reply.status == 307 => {
                        if let Some(i) = reply.location.as_deref().and_then(|l| index_of(&urls, l))
                        {
                            coordinator.store(i as u64, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        coordinator.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(MONITOR_INTERVAL);
            }
        });
        (stop, thread)
    }

    /// After the load: wait until the members have read up to `targets` (per partition, one
    /// past the highest acknowledged offset), then every member leaves. Returns how long the
    /// reading took, None if it did not finish within the spec's drain time.
    pub fn drain(&mut self, targets: &BTreeMap<u32, u64>) -> Option<u64> {
        let began = Instant::now();
        let deadline = began + Duration::from_secs_f64(self.spec.drain_s);
        let done = loop {
            let caught_up = {
                let log = lock(&self.log);
                targets
                    .iter()
                    .all(|(p, to)| log.delivered_to.get(p).is_some_and(|d| d >= to))
            };
            if caught_up {
                break Some(began.elapsed().as_millis() as u64);
            }
            if Instant::now() > deadline || self.members.iter().all(Option::is_none) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for member in self.members.iter_mut().filter_map(Option::take) {
            member.control.store(LEAVE, Ordering::Release);
            let _ = member.thread.join();
        }
        if let Some((stop, thread)) = self.monitor.take() {
            stop.store(LEAVE, Ordering::Release);
            let _ = thread.join();
        }
        done
    }

    /// Judge everything the members and the monitor saw.
    pub fn finish(self, acks: &[Ack], load_ms: u64, drained_after_ms: Option<u64>) -> GroupResult {
        let log = lock(&self.log);
        let verdict =
            group_verify::verify(acks, &log.deliveries, &log.incarnations, &log.observations);
        let mut events = self.events.clone();
        for (i, member) in &self.joins {
            if let (Some(event), Some(at)) = (events.get_mut(*i), log.subscribed_ms.get(member)) {
                event.at_ms = event.at_ms.max(*at);
            }
        }
        let mut rebalances = group_verify::rebalances(&events, &log.deliveries, &log.incarnations);
        rebalances.sort_by_key(|r| r.at_ms);
        let ends: Vec<u64> = rebalances
            .iter()
            .skip(1)
            .map(|r| r.at_ms)
            .chain([u64::MAX])
            .collect();
        for (rebalance, until) in rebalances.iter_mut().zip(ends) {
            // Within the event's window (until the next event): the first description that
            // finds the group stable after the first that did not. A join or leave rebalances
            // at once (if no description within 1 s saw it unstable, it ended between two: the
            // first stable one bounds it); a killed member's partitions move only when its
            // session expires, so any later unstable description counts.
            let window: Vec<&(u64, bool)> = log
                .states
                .iter()
                .filter(|(at, _)| *at >= rebalance.at_ms && *at < until)
                .collect();
            let killed = rebalance.event.ends_with("killed");
            let unstable = window
                .iter()
                .position(|(at, stable)| !stable && (killed || *at < rebalance.at_ms + 1000));
            rebalance.stable_after_ms = match unstable {
                Some(i) => window[i..].iter().find(|(_, stable)| *stable),
                None if !killed => window.iter().find(|(_, stable)| *stable),
                None => None,
            }
            .map(|(at, _)| at - rebalance.at_ms);
        }
        let mut per_second: Vec<u64> = Vec::new();
        for d in &log.deliveries {
            let second = (d.received_ms / 1000) as usize;
            if per_second.len() <= second {
                per_second.resize(second + 1, 0);
            }
            per_second[second] += d.last - d.first + 1;
        }
        let during_load: u64 = log
            .deliveries
            .iter()
            .filter(|d| d.received_ms <= load_ms)
            .map(|d| d.last - d.first + 1)
            .sum();
        let first = log
            .deliveries
            .iter()
            .map(|d| d.received_ms)
            .min()
            .unwrap_or(0);
        let last = log
            .deliveries
            .iter()
            .map(|d| d.received_ms)
            .max()
            .unwrap_or(0);
        let delivered: u64 = log.deliveries.iter().map(|d| d.last - d.first + 1).sum();
        let read_records_per_second = delivered as f64 * 1000.0 / (last - first).max(1) as f64;
        let latency = log.commit_latency.clone().unwrap_or_else(new_histogram);
        GroupResult {
            group: self.spec.name.clone(),
            members_joined: self.members.len() as u32,
            incarnations: log.incarnations.len() as u32,
            verdict,
            delivered_per_second: per_second,
            records_per_second_during_load: during_load as f64 * 1000.0 / load_ms.max(1) as f64,
            drained_after_ms,
            read_records_per_second,
            commit_latency_ms: Percentiles::of(&latency),
            commits_ok: log.commits_ok,
            commits_refused: log.commits_refused.clone(),
            rebalances,
        }
    }
}

fn index_of(urls: &[String], location: &str) -> Option<usize> {
    urls.iter().position(|u| location.starts_with(u.as_str()))
}

struct MemberContext {
    n: u32,
    spec: GroupSpec,
    topic: String,
    urls: Vec<String>,
    start: Instant,
    log: Arc<Mutex<Log>>,
    control: Arc<AtomicU8>,
    coordinator: Arc<AtomicU64>,
}

/// A member's instance now.
struct Instance {
    incarnation: u32,
    base: String,
}

impl MemberContext {
    fn at_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn run(self) {
        let http =
            Http::new(Duration::from_millis(self.spec.poll_timeout_ms) + Duration::from_secs(5));
        let mut instance: Option<Instance> = None;
        loop {
            match self.control.load(Ordering::Acquire) {
                RUN => {}
                order => {
                    if let Some(current) = instance.take() {
                        let end = if order == KILL {
                            End::Killed
                        } else {
                            // Leaving: delete the instance (it commits nothing: every poll was).
                            let _ = http.delete(&current.base);
                            End::Left
                        };
                        self.end(&current, end);
                    }
                    return;
                }
            }
            let Some(current) = instance.as_ref() else {
                instance = self.join(&http);
                if instance.is_none() {
                    std::thread::sleep(RETRY);
                }
                continue;
            };
            let url = format!(
                "{}/records?timeout={}&max_bytes={}",
                current.base, self.spec.poll_timeout_ms, self.spec.max_bytes
            );
            let reply = http.get(&url);
            let received_ms = self.at_ms();
            let reply = match reply {
                Ok(reply) if reply.status == 200 => reply,
                // The instance is gone: its coordinator moved (404, or 307 from a broker that
                // took the group over), or its session expired (409 with 40904).
                Ok(reply)
                    if reply.status == 404
                        || reply.status == 307
                        || reply.body["error_code"].as_u64() == Some(40904) =>
                {
                    self.lose(&mut instance, &http);
                    continue;
                }
                Ok(_) => {
                    std::thread::sleep(RETRY);
                    continue;
                }
                Err(_) => {
                    // Its coordinator does not answer: join wherever the group is now.
                    self.lose(&mut instance, &http);
                    continue;
                }
            };
            let runs = runs_of(&reply.body);
            if runs.is_empty() {
                continue;
            }
            if self.control.load(Ordering::Acquire) == KILL {
                // Killed with a poll in hand: it is never processed nor committed.
                self.record(current.incarnation, &runs, received_ms, false, false);
                continue;
            }
            let mut next: BTreeMap<u32, u64> = BTreeMap::new();
            for (partition, _, last) in &runs {
                let to = next.entry(*partition).or_default();
                *to = (*to).max(last + 1);
            }
            let offsets: Vec<Value> = next
                .iter()
                .map(|(p, to)| json!({"topic": self.topic, "partition": p, "offset": to}))
                .collect();
            let sent_ms = self.at_ms();
            let sent = Instant::now();
            let commit = http.post(
                &format!("{}/offsets", current.base),
                V2,
                &json!({ "offsets": offsets }).to_string(),
            );
            let latency = sent.elapsed();
            let committed = matches!(&commit, Ok(r) if r.status == 200);
            self.record(current.incarnation, &runs, received_ms, committed, true);
            let mut log = lock(&self.log);
            if committed {
                log.commits_ok += 1;
                let _ = log
                    .commit_latency
                    .get_or_insert_with(new_histogram)
                    .record(latency.as_micros().max(1) as u64);
                let acked_ms = self.at_ms();
                for (partition, offset) in &next {
                    log.observations.push(Observation {
                        partition: *partition,
                        offset: *offset,
                        sent_ms,
                        received_ms: acked_ms,
                    });
                }
            } else {
                let code = match &commit {
                    Ok(r) => r.body["error_code"]
                        .as_u64()
                        .map_or_else(|| r.status.to_string(), |c| c.to_string()),
                    Err(_) => "no answer".to_owned(),
                };
                *log.commits_refused.entry(code).or_default() += 1;
            }
        }
    }

    fn record(
        &self,
        incarnation: u32,
        runs: &[(u32, u64, u64)],
        received_ms: u64,
        committed: bool,
        processed: bool,
    ) {
        let mut log = lock(&self.log);
        for (partition, first, last) in runs {
            log.deliveries.push(Delivery {
                incarnation,
                partition: *partition,
                first: *first,
                last: *last,
                received_ms,
                committed,
                processed,
            });
            // Read through only once processed: a poll a killed member held is read again.
            if processed {
                let to = log.delivered_to.entry(*partition).or_default();
                *to = (*to).max(last + 1);
            }
        }
    }

    fn end(&self, instance: &Instance, end: End) {
        let at = self.at_ms();
        if let Some(i) = lock(&self.log)
            .incarnations
            .get_mut(instance.incarnation as usize)
        {
            i.end = end;
            i.ended_ms = Some(at);
        }
    }

    fn lose(&self, instance: &mut Option<Instance>, http: &Http) {
        if let Some(lost) = instance.take() {
            // Best effort: an instance that still exists would hold its partitions for a
            // session.
            let _ = http.delete(&lost.base);
            self.end(&lost, End::Lost);
        }
        std::thread::sleep(RETRY);
    }

    /// Create an instance on the group's coordinator (following its redirect) and subscribe it.
    fn join(&self, http: &Http) -> Option<Instance> {
        let incarnation = {
            let log = lock(&self.log);
            log.incarnations.len() as u32
        };
        let body = json!({
            "name": format!("m{}-{incarnation}", self.n),
            "format": "json",
            "auto.offset.reset": "earliest",
            "auto.commit.enable": "false",
            "session.timeout.ms": self.spec.session_timeout_ms,
        })
        .to_string();
        let at = self.coordinator.load(Ordering::Relaxed) as usize % self.urls.len();
        let mut url = format!("{}/consumers/{}", self.urls[at], self.spec.name);
        let mut reply = http.post(&url, V2, &body).ok()?;
        if reply.status == 307 {
            url = reply.location.clone()?;
            if let Some(i) = index_of(&self.urls, &url) {
                self.coordinator.store(i as u64, Ordering::Relaxed);
            }
            reply = http.post(&url, V2, &body).ok()?;
        }
        if reply.status != 200 {
            if reply.status != 409 {
                self.coordinator.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        }
        let base = reply.body["base_uri"].as_str()?.to_owned();
        let incarnation = {
            let mut log = lock(&self.log);
            log.incarnations.push(Incarnation {
                member: self.n,
                end: End::Running,
                ended_ms: None,
            });
            log.incarnations.len() as u32 - 1
        };
        let instance = Instance { incarnation, base };
        let subscribed = http
            .post(
                &format!("{}/subscription", instance.base),
                V2,
                &json!({ "topics": [self.topic] }).to_string(),
            )
            .ok()
            .is_some_and(|r| r.status == 204);
        if !subscribed {
            let _ = http.delete(&instance.base);
            self.end(&instance, End::Lost);
            return None;
        }
        let at = self.start.elapsed().as_millis() as u64;
        lock(&self.log).subscribed_ms.entry(self.n).or_insert(at);
        Some(instance)
    }
}

/// (partition, first offset, last offset) of each contiguous run of a partition's offsets in
/// a poll's records (they come per partition in offset order, without gaps in a dense log).
fn runs_of(records: &Value) -> Vec<(u32, u64, u64)> {
    let mut offsets: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for record in records.as_array().into_iter().flatten() {
        if let (Some(partition), Some(offset)) =
            (record["partition"].as_u64(), record["offset"].as_u64())
        {
            offsets.entry(partition as u32).or_default().push(offset);
        }
    }
    let mut runs = Vec::new();
    for (partition, mut list) in offsets {
        list.sort_unstable();
        let mut first = list[0];
        for pair in list.windows(2) {
            if pair[1] != pair[0] + 1 {
                runs.push((partition, first, pair[0]));
                first = pair[1];
            }
        }
        runs.push((partition, first, list[list.len() - 1]));
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poll_becomes_runs_of_contiguous_offsets_per_partition() {
        let records = json!([
            {"partition": 1, "offset": 7}, {"partition": 0, "offset": 3},
            {"partition": 1, "offset": 8}, {"partition": 1, "offset": 10}
        ]);
        assert_eq!(runs_of(&records), vec![(0, 3, 3), (1, 7, 8), (1, 10, 10)]);
        assert!(runs_of(&json!([])).is_empty());
    }
}
