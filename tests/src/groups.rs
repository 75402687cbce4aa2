//! Consumer-group clients for process-level tests: find a group's coordinator, create REST
//! Proxy v2 instances, and run consumers on threads that log every poll (when it ran, what it
//! returned) so a test can check from what members received that no partition was read by
//! two members at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use crate::{wait_until, BrokerProcess, Client};

/// How long a group may take to find its coordinator after a start or a failover.
pub const COORDINATOR_DEADLINE: Duration = Duration::from_secs(20);

/// The broker coordinating `group`, asked of the running brokers.
pub fn coordinator(brokers: &[BrokerProcess], group: &str) -> Result<usize> {
    let http = Client::new();
    wait_until(COORDINATOR_DEADLINE, "a coordinator for the group", || {
        for (i, broker) in brokers.iter().enumerate().filter(|(_, b)| b.is_running()) {
            let reply = http
                .get(&broker.url(&format!("/consumer-groups/{group}")))
                .ok()?;
            // The coordinator describes the group, or says it has none yet (404); any other
            // broker redirects (307) or does not know yet (503).
            if reply.status == 200 || reply.error_code() == Some(40404) {
                return Some(i);
            }
        }
        None
    })
}

/// Create an instance on `broker` (its group's coordinator); returns its base URI.
pub fn create_instance(broker: &BrokerProcess, group: &str, config: Value) -> Result<String> {
    let reply = Client::new().post_v2(&broker.url(&format!("/consumers/{group}")), &config)?;
    if reply.status != 200 {
        bail!(
            "creating an instance of {group}: {} {}",
            reply.status,
            reply.text
        );
    }
    reply.body["base_uri"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no base_uri in {}", reply.text))
}

pub fn subscribe(base: &str, topics: &[&str]) -> Result<()> {
    let reply =
        Client::new().post_v2(&format!("{base}/subscription"), &json!({"topics": topics}))?;
    if reply.status != 204 {
        bail!("subscribing {base}: {} {}", reply.status, reply.text);
    }
    Ok(())
}

/// One poll as a member saw it.
#[derive(Debug, Clone)]
pub struct Poll {
    pub member: String,
    pub started: Instant,
    pub ended: Instant,
    /// (partition, offset) of every record returned.
    pub records: Vec<(u32, u64)>,
}

/// A member polling in a loop on its own thread, committing what each poll returned before
/// the next (so a rebalance that loses no member redelivers nothing).
#[derive(Debug)]
pub struct Consumer {
    pub name: String,
    pub base: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Consumer {
    pub fn start(name: &str, base: String, log: Arc<Mutex<Vec<Poll>>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_stop, thread_base, member) = (stop.clone(), base.clone(), name.to_owned());
        let thread = std::thread::spawn(move || -> Result<()> {
            let http = Client::new();
            while !thread_stop.load(Ordering::Acquire) {
                let started = Instant::now();
                let reply = http.get(&format!("{thread_base}/records?timeout=200"))?;
                let ended = Instant::now();
                if reply.status != 200 {
                    bail!("{member} poll: {} {}", reply.status, reply.text);
                }
                let records: Vec<(u32, u64)> = reply
                    .body
                    .as_array()
                    .ok_or_else(|| anyhow!("records are not an array: {}", reply.text))?
                    .iter()
                    .filter_map(|r| Some((r["partition"].as_u64()? as u32, r["offset"].as_u64()?)))
                    .collect();
                if !records.is_empty() {
                    let mut next: BTreeMap<u32, u64> = BTreeMap::new();
                    for (partition, offset) in &records {
                        let n = next.entry(*partition).or_default();
                        *n = (*n).max(offset + 1);
                    }
                    let offsets: Vec<Value> = next
                        .iter()
                        .map(|(p, o)| json!({"topic": "t", "partition": p, "offset": o}))
                        .collect();
                    let commit = http.post_v2(
                        &format!("{thread_base}/offsets"),
                        &json!({"offsets": offsets}),
                    )?;
                    if commit.status != 200 {
                        bail!("{member} commit: {} {}", commit.status, commit.text);
                    }
                }
                if let Ok(mut log) = log.lock() {
                    log.push(Poll {
                        member: member.clone(),
                        started,
                        ended,
                        records,
                    });
                }
            }
            Ok(())
        });
        Self {
            name: name.to_owned(),
            base,
            stop,
            thread: Some(thread),
        }
    }

    /// Stop polling (the instance stays, as a killed client's would) and report its errors.
    pub fn stop(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("consumer {} panicked", self.name),
            None => Ok(()),
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Members' owned partitions from `GET /consumer-groups/{group}`, once the group is stable
/// with `members` members; fails if any partition is owned twice in any answer seen.
pub fn wait_stable(broker: &BrokerProcess, group: &str, members: usize) -> Result<Vec<Vec<u32>>> {
    let http = Client::new();
    let mut shared = None;
    let owned = wait_until(Duration::from_secs(20), "a stable group", || {
        let reply = http
            .get(&broker.url(&format!("/consumer-groups/{group}")))
            .ok()?;
        let list = reply.body["members"].as_array()?.clone();
        let owned: Vec<Vec<u32>> = list
            .iter()
            .map(|m| {
                m["assignment"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|p| p["partition"].as_u64().map(|p| p as u32))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect();
        let mut seen = BTreeSet::new();
        for partition in owned.iter().flatten() {
            if !seen.insert(*partition) {
                shared = Some(reply.text.clone());
            }
        }
        (reply.body["state"] == "Stable" && list.len() == members).then_some(owned)
    })?;
    if let Some(text) = shared {
        bail!("a partition was owned by two members: {text}");
    }
    Ok(owned)
}

/// From what members received: per partition, the records in offset order form runs of one
/// member each, and every run starts exactly where the previous one ended. Two members
/// owning a partition at once would both read from its committed offset, and their runs would
/// overlap (or, had one not committed, leave a gap in the other's). Needs members that commit
/// each poll before the next, as [`Consumer`] does.
pub fn assert_never_two_owners(log: &[Poll]) {
    let mut by_partition: BTreeMap<u32, Vec<(u64, &str)>> = BTreeMap::new();
    for poll in log {
        for (partition, offset) in &poll.records {
            by_partition
                .entry(*partition)
                .or_default()
                .push((*offset, poll.member.as_str()));
        }
    }
    for (partition, mut deliveries) in by_partition {
        deliveries.sort_unstable();
        for pair in deliveries.windows(2) {
            let ((a, member_a), (b, member_b)) = (pair[0], pair[1]);
            assert!(
                b == a + 1,
                "partition {partition}: offset {a} ({member_a}) is followed by {b} ({member_b}): \
                 two owners read it, or a hand-over skipped records"
            );
        }
    }
}
