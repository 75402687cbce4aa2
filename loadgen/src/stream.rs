//! `[stream]` of a scenario: a stream job on the cluster, fed keyed JSON events with event-time
//! skew and late events by a producer of its own, its broker killed on the timeline
//! (`target = "stream:JOB"`), and at the end its output compared, window by window, with an
//! offline recomputation of the input log ([`crate::stream_verify`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use base64::Engine as _;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::http::Http;
use crate::stream_verify::{self, Comparison, Record};

/// `[stream]` of a scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    /// The job's name (the fault target `stream:NAME` is the broker running it).
    pub job: String,
    /// Topics of `[[topics]]`: the events go to `input`, the results to `output`.
    pub input: String,
    pub output: String,
    /// The job's window, as `POST /streams` takes it, e.g. `{ kind = "tumbling", size_ms = 1000 }`.
    pub window: toml::Value,
    pub aggregation: String,
    /// Aggregated field (sum, min, max, avg): events carry `/reading`.
    #[serde(default)]
    pub value_field: Option<String>,
    #[serde(default)]
    pub grace_ms: i64,
    pub events_per_s: u32,
    /// Distinct record keys (`s0`, `s1`, …).
    pub keys: u32,
    /// Event times are the send time ± up to this.
    pub skew_ms: i64,
    /// One event in this many is `late_ms` behind.
    pub late_every: u64,
    pub late_ms: i64,
    /// After the load, how long the job may take to read everything and write its results.
    #[serde(default = "default_drain")]
    pub drain_s: f64,
}

fn default_drain() -> f64 {
    60.0
}

impl StreamSpec {
    /// The `POST /streams` body.
    pub fn job_spec(&self) -> Value {
        let mut spec = json!({
            "name": self.job, "input": self.input, "output": self.output,
            "window": serde_json::to_value(&self.window).unwrap_or(Value::Null),
            "aggregation": self.aggregation, "time_field": "/ts", "grace_ms": self.grace_ms,
        });
        if let Some(field) = &self.value_field {
            spec["value_field"] = json!(field);
        }
        spec
    }
}

/// What the stream part of a run found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamResult {
    pub job: String,
    pub events_acknowledged: u64,
    /// Acknowledged events not in the input log.
    pub events_lost: u64,
    pub windows_recomputed: u64,
    pub windows_written: u64,
    /// Records in the output topic (one per window when nothing is duplicated).
    pub output_records: u64,
    pub missing: u64,
    pub duplicated: u64,
    pub wrong: u64,
    pub unexpected: u64,
    pub examples: Vec<String>,
    pub late_records: u64,
    pub dropped_records: u64,
    /// Per kill of the job's broker: (at ms, broker killed, ms until the job ran elsewhere).
    pub takeovers: Vec<(u64, u32, Option<u64>)>,
    /// Whether the job read everything and wrote its results within `drain_s`.
    pub drained: bool,
    /// Every broker's copy of the output holds the same results.
    pub copies_identical: bool,
    /// The job's late and dropped counts equal the recomputation's.
    pub counts_match: bool,
}

impl StreamResult {
    pub fn is_clean(&self) -> bool {
        self.drained
            && self.copies_identical
            && self.counts_match
            && self.events_acknowledged > 0
            && self.windows_written > 0
            && self.events_lost == 0
            && Comparison {
                missing: self.missing,
                duplicated: self.duplicated,
                wrong: self.wrong,
                unexpected: self.unexpected,
                examples: Vec::new(),
            }
            .is_clean()
    }
}

/// The running stream part: its producer, and a monitor of where the job runs.
pub struct Stream {
    spec: StreamSpec,
    stop: Arc<AtomicBool>,
    producer: Option<JoinHandle<Vec<u64>>>,
    monitor: Option<JoinHandle<()>>,
    /// (ms since start, broker running the job) whenever it reports `running`.
    running: Arc<Mutex<Vec<(u64, u64)>>>,
    kills: Vec<(u64, u32)>,
    urls: Arc<Mutex<Vec<String>>>,
    start: Instant,
}

/// A job's status from any broker that answers (following its redirect to the runner).
pub fn status(http: &Http, urls: &[String], job: &str) -> Option<Value> {
    for url in urls {
        let Ok(reply) = http.get(&format!("{url}/streams/{job}")) else {
            continue;
        };
        let reply = match reply.location {
            Some(location) if reply.status == 307 => match http.get(&location) {
                Ok(r) => r,
                Err(_) => continue,
            },
            _ => reply,
        };
        if reply.status == 200 {
            return Some(reply.body);
        }
    }
    None
}

/// The broker running `job` once it reports `running`.
pub fn runner(http: &Http, urls: &[String], job: &str) -> Result<u32> {
    let deadline = Instant::now() + crate::http::SETTLE_DEADLINE;
    loop {
        if let Some(s) = status(http, urls, job).filter(|s| s["phase"] == "running") {
            if let Some(on) = s["runs_on"].as_u64().filter(|on| *on != 0) {
                return Ok(on as u32);
            }
        }
        if Instant::now() > deadline {
            bail!("stream job {job} is not running anywhere");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Stream {
    /// Create the job (following a redirect to its broker) and start the events.
    pub fn start(spec: &StreamSpec, urls: &[String], start: Instant) -> Result<Self> {
        let http = Http::new(Duration::from_secs(10));
        let body = spec.job_spec().to_string();
        // A new cluster may not have elected the job's offsets partition leader yet (503).
        let deadline = Instant::now() + crate::http::SETTLE_DEADLINE;
        loop {
            let mut created =
                http.post(&format!("{}/streams", urls[0]), "application/json", &body)?;
            if let (307, Some(location)) = (created.status, created.location.clone()) {
                created = http.post(&location, "application/json", &body)?;
            }
            match created.status {
                201 => break,
                503 if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                status => bail!(
                    "creating stream job {}: {status} {}",
                    spec.job,
                    created.text
                ),
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let urls = Arc::new(Mutex::new(urls.to_vec()));
        let running = Arc::new(Mutex::new(Vec::new()));
        let producer = {
            let (spec, stop, urls) = (spec.clone(), stop.clone(), urls.clone());
            std::thread::spawn(move || produce(&spec, &stop, &urls))
        };
        let monitor = {
            let (job, stop, urls, running) = (
                spec.job.clone(),
                stop.clone(),
                urls.clone(),
                running.clone(),
            );
            std::thread::spawn(move || {
                let http = Http::new(Duration::from_secs(2));
                while !stop.load(Ordering::Acquire) {
                    let targets = urls.lock().map(|u| u.clone()).unwrap_or_default();
                    if let Some(s) = status(&http, &targets, &job) {
                        if let (true, Some(on)) = (s["phase"] == "running", s["runs_on"].as_u64()) {
                            if let Ok(mut r) = running.lock() {
                                if r.last().map(|(_, b)| *b) != Some(on) {
                                    r.push((start.elapsed().as_millis() as u64, on));
                                }
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Ok(Self {
            spec: spec.clone(),
            stop,
            producer: Some(producer),
            monitor: Some(monitor),
            running,
            kills: Vec::new(),
            urls,
            start,
        })
    }

    /// The broker a `stream:JOB` fault hits now; a kill is remembered to time the takeover.
    pub fn victim(&mut self, http: &Http, urls: &[String], kill: bool) -> Result<u32> {
        let on = runner(http, urls, &self.spec.job)?;
        if kill {
            self.kills
                .push((self.start.elapsed().as_millis() as u64, on));
        }
        Ok(on)
    }

    /// Brokers the producer and monitor may use (the running ones).
    pub fn set_urls(&self, urls: Vec<String>) {
        if let Ok(mut u) = self.urls.lock() {
            *u = urls;
        }
    }

    /// Stop the events, close every window, wait for the job, and compare its output with
    /// the recomputation of the input log.
    pub fn finish(mut self, urls: &[String], partitions: (u32, u32)) -> Result<StreamResult> {
        self.set_urls(urls.to_vec());
        self.stop.store(true, Ordering::Release);
        let acked = self
            .producer
            .take()
            .map(|p| p.join().map_err(|_| anyhow!("stream producer panicked")))
            .transpose()?
            .unwrap_or_default();
        if let Some(m) = self.monitor.take() {
            let _ = m.join();
        }
        let http = Http::new(Duration::from_secs(10));
        let deadline = Instant::now() + Duration::from_secs_f64(self.spec.drain_s);
        // An event far in the future on every input partition: every window with data closes.
        let mut flushed = Vec::new();
        for p in 0..partitions.0 {
            flushed.push(self.flush(&http, urls, p, deadline)?);
        }
        // Read everything, the closing events included, with nothing pending, as two polls
        // in a row of one runner say.
        let mut seen: Option<u64> = None;
        let drained = loop {
            if let Some(s) = status(&http, urls, &self.spec.job) {
                let read_all = (0..partitions.0 as usize)
                    .all(|p| s["input"][p]["offset"].as_u64().unwrap_or(0) > flushed[p]);
                let done = s["phase"] == "running" && s["pending_results"] == 0 && read_all;
                let epoch = s["epoch"].as_u64();
                if done && seen.is_some() && seen == epoch {
                    break true;
                }
                seen = if done { epoch } else { None };
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        // Longer than a deposed runner's write may still be on its way (an 8 s write timeout,
        // then a takeover hold): a duplicate that arrives late is in the output read below.
        std::thread::sleep(QUIET);
        let last = status(&http, urls, &self.spec.job).unwrap_or(Value::Null);
        let input = read_copies(&http, urls, &self.spec.input, partitions.0)?
            .into_iter()
            .next()
            .unwrap_or_default();
        let mut copies = Vec::new();
        let mut output_records = 0;
        for copy in read_copies(&http, urls, &self.spec.output, partitions.1)? {
            let records: Vec<Record> = copy.into_iter().flatten().collect();
            output_records = records.len() as u64;
            copies.push(stream_verify::written(&records, &self.spec.job)?);
        }
        let copies_identical = copies.windows(2).all(|w| w[0] == w[1]);
        let (got, duplicates) = copies.into_iter().next().unwrap_or_default();
        let ids: std::collections::HashSet<u64> = input
            .iter()
            .flatten()
            .filter_map(|(_, v)| v.as_deref())
            .filter_map(|v| serde_json::from_slice::<Value>(v).ok()?["id"].as_u64())
            .collect();
        let events_lost = acked.iter().filter(|id| !ids.contains(id)).count() as u64;
        let recomputed = stream_verify::recompute(&self.spec.job_spec(), &input)?;
        let counts_match = last["late_records"].as_u64() == Some(recomputed.late)
            && last["dropped_records"].as_u64() == Some(recomputed.dropped);
        let expected = recomputed.results;
        let c = stream_verify::compare(&expected, &got, &duplicates);
        let running = self.running.lock().map(|r| r.clone()).unwrap_or_default();
        let takeovers = self
            .kills
            .iter()
            .map(|(at, victim)| {
                let back = running
                    .iter()
                    .find(|(t, on)| *t > *at && *on != u64::from(*victim))
                    .map(|(t, _)| t - at);
                (*at, *victim, back)
            })
            .collect();
        Ok(StreamResult {
            job: self.spec.job.clone(),
            events_acknowledged: acked.len() as u64,
            events_lost,
            windows_recomputed: expected.len() as u64,
            windows_written: got.len() as u64,
            output_records,
            missing: c.missing,
            duplicated: c.duplicated,
            wrong: c.wrong,
            unexpected: c.unexpected,
            examples: c.examples,
            late_records: last["late_records"].as_u64().unwrap_or(0),
            dropped_records: last["dropped_records"].as_u64().unwrap_or(0),
            takeovers,
            drained,
            copies_identical,
            counts_match,
        })
    }

    /// Write the closing event to input partition `p` (retried until `deadline`: right after
    /// a heal an election may be on); its offset.
    fn flush(&self, http: &Http, urls: &[String], p: u32, deadline: Instant) -> Result<u64> {
        let body = json!({"records": [{"key": "flush", "value": {"id": null, "ts": 4_102_444_800_000_i64, "sensor": "flush", "reading": 0}}]}).to_string();
        loop {
            for u in urls {
                let url = format!("{u}/topics/{}/partitions/{p}", self.spec.input);
                if let Ok(r) = http.post(&url, "application/json", &body) {
                    if let Some(offset) = r.body["offsets"][0]["offset"].as_u64() {
                        return Ok(offset);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "could not write the closing event to {}/{p}",
                    self.spec.input
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// See [`Stream::finish`].
const QUIET: Duration = Duration::from_secs(10);

impl Drop for Stream {
    /// A run that ends early (an error) stops the producer and the monitor too.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Events at `events_per_s` in batches every 50 ms to any running broker; returns the ids
/// acknowledged. Seeded, so a rerun sends the same events.
fn produce(spec: &StreamSpec, stop: &AtomicBool, urls: &Mutex<Vec<String>>) -> Vec<u64> {
    let http = Http::new(Duration::from_secs(10));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let per_batch = (spec.events_per_s / 20).max(1) as u64;
    let mut acked = Vec::new();
    let mut next_id = 0u64;
    let mut turn = 0usize;
    // Batches on a fixed schedule, so a slow answer does not lower the rate (a batch that
    // could not be sent on time goes at once).
    let mut due = Instant::now();
    while !stop.load(Ordering::Acquire) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let records: Vec<Value> = (next_id..next_id + per_batch)
            .map(|id| {
                let skew = rng.gen_range(-spec.skew_ms..=spec.skew_ms);
                let late = if spec.late_every > 0 && id % spec.late_every == 0 {
                    spec.late_ms
                } else {
                    0
                };
                let key = format!("s{}", rng.gen_range(0..spec.keys.max(1)));
                let reading = format!("{}.{:02}", rng.gen_range(0..100), rng.gen_range(0..100));
                json!({"key": key, "value": {"id": id, "ts": now + skew - late, "sensor": key,
                        "reading": serde_json::from_str::<Value>(&reading).unwrap_or(Value::Null)}})
            })
            .collect();
        let body = json!({ "records": records }).to_string();
        // Until acknowledged (a retry after an unknown outcome may store a batch twice: the
        // job reads the log as stored, and so does the recomputation).
        while !stop.load(Ordering::Acquire) {
            let targets = urls.lock().map(|u| u.clone()).unwrap_or_default();
            if targets.is_empty() {
                break;
            }
            turn += 1;
            let url = &targets[turn % targets.len()];
            match http.post(
                &format!("{url}/topics/{}", spec.input),
                "application/json",
                &body,
            ) {
                // 200 with an error per record whose partition failed: only records with an
                // offset are acknowledged.
                Ok(r) if r.status == 200 => {
                    let offsets = r.body["offsets"].as_array().cloned().unwrap_or_default();
                    acked.extend(
                        (next_id..next_id + per_batch)
                            .zip(&offsets)
                            .filter(|(_, o)| o["offset"].is_u64())
                            .map(|(id, _)| id),
                    );
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        next_id += per_batch;
        due += Duration::from_millis(50);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    acked
}

/// Every broker's copy of every partition of `topic`, from its log start, as (key, value)
/// bytes, once every broker agrees where each partition ends.
fn read_copies(
    http: &Http,
    urls: &[String],
    topic: &str,
    partitions: u32,
) -> Result<Vec<Vec<Vec<Record>>>> {
    crate::readback::wait_converged(http, urls, topic, partitions)?;
    urls.iter()
        .map(|url| read_all(http, url, topic, partitions))
        .collect()
}

/// Every partition of `topic` from its log start on the broker at `url`.
fn read_all(http: &Http, url: &str, topic: &str, partitions: u32) -> Result<Vec<Vec<Record>>> {
    let b64 = |v: &Value| -> Option<Vec<u8>> {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str()?)
            .ok()
    };
    let mut all = Vec::new();
    for p in 0..partitions {
        let mut records = Vec::new();
        let mut offset: Option<u64> = None;
        loop {
            let from = offset.map(|o| format!("&offset={o}")).unwrap_or_default();
            let reply = http.get(&format!(
                "{url}/topics/{topic}/partitions/{p}/records?format=binary&max_records=10000{from}"
            ))?;
            if reply.status != 200 {
                bail!(
                    "reading {topic}/{p} from {url}: {} {}",
                    reply.status,
                    reply.text
                );
            }
            for r in reply.body["records"].as_array().into_iter().flatten() {
                records.push((b64(&r["key"]), b64(&r["value"])));
            }
            let next = reply.body["next_offset"].as_u64().unwrap_or(0);
            let end = reply.body["high_watermark"].as_u64().unwrap_or(next);
            if next >= end || Some(next) == offset {
                break;
            }
            offset = Some(next);
        }
        all.push(records);
    }
    Ok(all)
}
