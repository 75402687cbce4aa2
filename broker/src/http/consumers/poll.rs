//! `GET …/instances/{instance}/records`: a long poll over every partition the instance owns.
//!
//! The coordinator fixes the instance's partitions and positions for the poll (`BeginPoll`);
//! nothing is revoked from it until the poll ends (`EndPoll`, sent even if the client hangs
//! up), so no partition is read by two instances at once. Any change of the group's assignment
//! (or a commit resolving that a new owner waits for) ends a waiting poll early, with what it
//! has, so hand-overs wait for at most one read, not a whole long poll. Before records go out,
//! the coordinator confirms the poll (`ConfirmPoll`).

use std::time::{Duration, Instant};

use std::pin::Pin;

use actix::Addr;
use actix_web::body::{BodySize, MessageBody};
use actix_web::http::StatusCode;
use actix_web::{get, web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures::future::{select_all, FutureExt};
use pubg1_actors::groups::coordinator::{
    BeginPoll, ConfirmPoll, EndPoll, GroupCoordinator, PollPlan,
};
use pubg1_actors::groups::offsets_machine::TopicPartition;
use pubg1_actors::log_reader::{self, FetchRequest};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};

use super::super::error::{ApiError, ErrorBody};
use super::super::records::{bounded, render};
use super::super::{EmbeddedFormat, State};
use super::{instance, stopped};

/// `timeout` when the consumer does not say (REST Proxy's `consumer.request.timeout.ms`).
pub(super) const WAIT_DEFAULT_MS: u64 = 1_000;
/// `max_bytes` when the consumer does not say.
const BYTES_DEFAULT: usize = 1024 * 1024;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PollParams {
    /// Milliseconds to wait for records when there are none (default: the instance's
    /// `consumer.request.timeout.ms`, 1000 unless set).
    #[serde(default, deserialize_with = "crate::http::lenient::query::u64")]
    pub timeout: Option<u64>,
    /// Soft cap on key+value bytes returned (default 1 MiB).
    #[serde(default, deserialize_with = "crate::http::lenient::query::usize")]
    pub max_bytes: Option<usize>,
}

/// A record delivered to a consumer instance (REST Proxy v2's shape, plus its timestamp).
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupRecord {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    /// Broker append time, milliseconds since the epoch.
    pub timestamp: i64,
    /// JSON format: the exact JSON stored; binary: base64; null when absent.
    #[schema(value_type = Value)]
    pub key: Box<RawValue>,
    #[schema(value_type = Value)]
    pub value: Box<RawValue>,
}

/// Ends the poll when dropped, whether the handler finished or the client went away. The
/// positions move past what the poll read only if its response body was handed to the
/// connection (`delivered`); a poll whose client left first moves nothing, so those records
/// are delivered again rather than never.
struct PollGuard {
    coordinator: Addr<GroupCoordinator>,
    instance: String,
    poll: u64,
    advanced: Vec<(TopicPartition, u64)>,
    delivered: bool,
}

impl Drop for PollGuard {
    fn drop(&mut self) {
        let advanced = if self.delivered {
            std::mem::take(&mut self.advanced)
        } else {
            Vec::new()
        };
        self.coordinator.do_send(EndPoll {
            instance: std::mem::take(&mut self.instance),
            poll: self.poll,
            advanced,
        });
    }
}

/// A poll's response body: its bytes, and the poll's guard, which ends the poll as delivered
/// when the bytes are taken for writing (and as undelivered if the body is dropped unwritten).
struct PollBody {
    bytes: Option<Bytes>,
    guard: Option<PollGuard>,
}

impl MessageBody for PollBody {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Sized(self.bytes.as_ref().map_or(0, |b| b.len() as u64))
    }

    fn poll_next(
        self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        let bytes = this.bytes.take();
        if let Some(mut guard) = this.guard.take() {
            guard.delivered = bytes.is_some();
        }
        std::task::Poll::Ready(bytes.map(Ok))
    }
}

/// Poll records from every partition the instance owns.
#[utoipa::path(
    tag = "consumers",
    params(("group" = String, Path, description = "Consumer group", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), ("instance" = String, Path, description = "Consumer instance", pattern = r"^(?!\.\.?$)[a-zA-Z0-9._-]{1,249}$"), PollParams),
    responses(
        (status = 200, description = "Records, keys and values in the instance's format", content(
            (Vec<GroupRecord> = "application/vnd.kafka.json.v2+json"),
            (Vec<GroupRecord> = "application/vnd.kafka.binary.v2+json")
        )),
        (status = 307, body = ErrorBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 406, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)
    )
)]
#[get("/consumers/{group}/instances/{instance}/records")]
pub async fn records(
    state: State,
    path: web::Path<(String, String)>,
    params: web::Query<PollParams>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let config = &state.config;
    let bytes_max = bounded(
        "max_bytes",
        params.max_bytes.unwrap_or(BYTES_DEFAULT),
        1,
        config.fetch_bytes_max,
    )?;
    if let Some(timeout) = params.timeout {
        bounded(
            "timeout",
            timeout as usize,
            0,
            config.fetch_wait_ms_max as usize,
        )?;
    }
    let coordinator = instance(&state, &req, &path).await?;
    let mut deadline: Option<Instant> = None;
    loop {
        let wait = match deadline {
            None => params.timeout.map(Duration::from_millis),
            Some(at) => Some(at.saturating_duration_since(Instant::now())),
        };
        let plan = coordinator
            .send(BeginPoll {
                instance: path.1.clone(),
                wait,
            })
            .await
            .map_err(|_| stopped())??;
        let deadline = *deadline.get_or_insert_with(|| Instant::now() + plan.poll_wait);
        let format = if plan.format == "binary" {
            EmbeddedFormat::Binary
        } else {
            EmbeddedFormat::Json
        };
        let plan_id = plan.poll;
        let mut guard = PollGuard {
            coordinator: coordinator.clone(),
            instance: path.1.clone(),
            poll: plan.poll,
            advanced: Vec::new(),
            delivered: false,
        };
        let (out, rebalanced) = read(&state, &mut guard, plan, format, bytes_max, deadline).await?;
        // A poll cut short by a rebalance, with nothing read, ends (before the next begins:
        // one mailbox, in order) and begins again with the instance's new partitions while
        // time remains.
        if out.is_empty() && rebalanced && Instant::now() < deadline {
            drop(guard);
            continue;
        }
        if !out.is_empty() {
            let confirmed = coordinator
                .send(ConfirmPoll {
                    instance: path.1.clone(),
                    poll: plan_id,
                })
                .await
                .unwrap_or(false);
            if !confirmed {
                // Nothing of this poll reaches the client: its partitions may have moved.
                guard.advanced.clear();
                return Err(stopped());
            }
        }
        return respond(out, format, guard);
    }
}

/// Read the plan's partitions until something is read, the assignment changes (true), or the
/// deadline passes.
async fn read(
    state: &State,
    guard: &mut PollGuard,
    mut plan: PollPlan,
    format: EmbeddedFormat,
    bytes_max: usize,
    deadline: Instant,
) -> Result<(Vec<GroupRecord>, bool), ApiError> {
    let config = &state.config;
    let registry = &state.broker.registry;
    // Partitions this broker holds no replica of are read from their leader over HTTP; their
    // high watermark here is what the leader last reported (every 10 ticks while active).
    let readable: Vec<_> = plan
        .partitions
        .iter()
        .filter_map(|(tp, offset)| {
            let shared = registry.get(&tp.topic)?.partition(tp.partition)?.clone();
            Some((tp.clone(), *offset, shared))
        })
        .collect();
    let mut out: Vec<GroupRecord> = Vec::new();
    let mut bytes = 0usize;
    // Partitions whose read failed sit out the rest of this poll (waiting on them would spin).
    let mut failed = vec![false; readable.len()];
    // Remote partitions are asked once per poll even when no report says they have more (a
    // quiesced leader reports nothing to a broker that started after it quiesced); after that,
    // only when a report or an answer moved their high watermark here.
    let mut probed = vec![false; readable.len()];
    plan.assignment_changed.borrow_and_update();
    // Partitions in a different order each poll, so none is always last under the byte cap.
    let rotate = (guard.poll as usize) % readable.len().max(1);
    let order: Vec<usize> = (0..readable.len())
        .map(|k| (k + rotate) % readable.len())
        .collect();
    let alive_window = Duration::from_millis(1500);
    loop {
        // Every partition with something new, read in one trip to the blocking pool.
        let mut asked: Vec<usize> = Vec::new();
        let mut requests = Vec::new();
        let mut remote: Vec<(usize, String, u64)> = Vec::new();
        for &i in &order {
            let (tp, offset, shared) = &readable[i];
            let next = guard
                .advanced
                .iter()
                .find(|(p, _)| p == tp)
                .map_or(*offset, |(_, n)| *n);
            let probe = !shared.hosted && !probed[i];
            if failed[i] || (next >= shared.high_watermark() && !probe) {
                continue;
            }
            if !shared.hosted {
                probed[i] = true;
                // Its leader, else any replica this broker has heard from lately.
                let cluster = &state.broker.cluster;
                let source = std::iter::once(shared.leader())
                    .chain(shared.replicas.iter().copied())
                    .filter(|id| *id != 0 && cluster.is_alive(*id, alive_window))
                    .find_map(|id| cluster.http_of(id));
                match source {
                    Some(source) => remote.push((i, source, next)),
                    None => failed[i] = true,
                }
                continue;
            }
            asked.push(i);
            requests.push((
                shared.clone(),
                FetchRequest {
                    offset: next,
                    records_max: config.fetch_records_max,
                    bytes_max: bytes_max.saturating_sub(bytes).max(1),
                    wait: Duration::ZERO,
                },
            ));
        }
        let results = if requests.is_empty() {
            Vec::new()
        } else {
            log_reader::fetch_many(&state.broker.storage, &state.broker.metrics, requests).await
        };
        let remote_budget = bytes_max.saturating_sub(bytes).max(1);
        let fetched_remotely = if remote.is_empty() {
            Vec::new()
        } else {
            let asks: Vec<(usize, String, String, u32, u64)> = remote
                .into_iter()
                .map(|(i, leader, next)| {
                    let tp = &readable[i].0;
                    (i, leader, tp.topic.clone(), tp.partition, next)
                })
                .collect();
            let records_max = config.fetch_records_max;
            // No remote read may outlast the poll (a hung leader costs at most what is left).
            let left = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(100), REMOTE_TIMEOUT);
            actix_web::rt::task::spawn_blocking(move || {
                asks.into_iter()
                    .map(|(i, leader, topic, partition, next)| {
                        let at = (leader.as_str(), topic.as_str(), partition, next);
                        (
                            i,
                            fetch_remote(at, remote_budget, records_max, format, left),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default()
        };
        for (i, fetched) in fetched_remotely {
            let tp = readable[i].0.clone();
            let fetched = fetched.map(|(got, high_watermark, log_start)| {
                readable[i].2.observe_remote_read(high_watermark, log_start);
                got
            });
            match fetched {
                Ok(got) if !got.is_empty() => {
                    let last = got.last().map(|r| r.offset);
                    for record in got {
                        bytes += record.key.get().len() + record.value.get().len();
                        out.push(GroupRecord {
                            topic: tp.topic.clone(),
                            ..record
                        });
                    }
                    if let Some(last) = last {
                        match guard.advanced.iter_mut().find(|(p, _)| *p == tp) {
                            Some((_, n)) => *n = last + 1,
                            None => guard.advanced.push((tp.clone(), last + 1)),
                        }
                    }
                }
                // Nothing new: it waits for a report or the next poll, not another read now.
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, topic = %tp.topic, partition = tp.partition, "group fetch from the leader failed; the partition sits out this poll");
                    failed[i] = true;
                }
            }
        }
        for (i, fetched) in asked.into_iter().zip(results) {
            let tp = &readable[i].0;
            let fetched = match fetched {
                Ok(fetched) => fetched,
                // Retention passed this position (the next poll's plan resets it), or the replica
                // is restarting: the other partitions are still read.
                Err(e) => {
                    tracing::debug!(error = %e, topic = %tp.topic, "group fetch failed");
                    failed[i] = true;
                    continue;
                }
            };
            // Soft cap over the whole poll: records past it wait for the next poll.
            let mut last = None;
            for record in fetched.records {
                if bytes >= bytes_max && !out.is_empty() {
                    break;
                }
                bytes += record.key.as_ref().map_or(0, |k| k.len())
                    + record.value.as_ref().map_or(0, |v| v.len());
                let offset = record.offset;
                let rendered = match render(record, tp.partition, format) {
                    Ok(rendered) => rendered,
                    Err(e) => {
                        // Nothing of this poll reaches the client: positions stay put.
                        guard.advanced.clear();
                        return Err(e);
                    }
                };
                out.push(GroupRecord {
                    topic: tp.topic.clone(),
                    partition: rendered.partition,
                    offset: rendered.offset,
                    timestamp: rendered.timestamp,
                    key: rendered.key,
                    value: rendered.value,
                });
                last = Some(offset);
            }
            if let Some(last) = last {
                match guard.advanced.iter_mut().find(|(p, _)| p == tp) {
                    Some((_, n)) => *n = last + 1,
                    None => guard.advanced.push((tp.clone(), last + 1)),
                }
            }
        }
        let now = Instant::now();
        if !out.is_empty() || now >= deadline {
            return Ok((out, false));
        }
        // Wait for any partition to grow, the assignment to change, or the deadline.
        let mut waits: Vec<futures::future::BoxFuture<'_, ()>> = readable
            .iter()
            .zip(&failed)
            .filter(|(_, failed)| !**failed)
            .map(|((_, offset, shared), _)| {
                let mut watermark = shared.subscribe_high_watermark();
                let offset = *offset;
                async move {
                    let _ = watermark.wait_for(|hw| *hw > offset).await;
                }
                .boxed()
            })
            .collect();
        let mut changed = plan.assignment_changed.clone();
        waits.push(
            async move {
                let _ = changed.changed().await;
            }
            .boxed(),
        );
        let _ = tokio::time::timeout(deadline - now, select_all(waits)).await;
        if plan.assignment_changed.has_changed().unwrap_or(true) {
            // A rebalance may be waiting for this poll to end.
            return Ok((out, true));
        }
    }
}

fn respond(
    out: Vec<GroupRecord>,
    format: EmbeddedFormat,
    guard: PollGuard,
) -> Result<HttpResponse, ApiError> {
    let content_type = match format {
        EmbeddedFormat::Binary => "application/vnd.kafka.binary.v2+json",
        EmbeddedFormat::Json => "application/vnd.kafka.json.v2+json",
    };
    let bytes = serde_json::to_vec(&out)
        .map_err(|e| ApiError::Internal(format!("encoding records: {e}")))?;
    Ok(HttpResponse::build(StatusCode::OK)
        .insert_header((actix_web::http::header::CONTENT_TYPE, content_type))
        .body(PollBody {
            bytes: Some(Bytes::from(bytes)),
            guard: Some(guard),
        }))
}

/// One record as another broker's fetch answers it (its key and value already in the format
/// asked for).
#[derive(Debug, Deserialize)]
struct RemoteRecord {
    partition: u32,
    offset: u64,
    timestamp: i64,
    key: Box<RawValue>,
    value: Box<RawValue>,
}

#[derive(Debug, Deserialize)]
struct RemoteFetch {
    records: Vec<RemoteRecord>,
    high_watermark: u64,
    log_start_offset: u64,
}

/// Longest a read from another broker may take.
const REMOTE_TIMEOUT: Duration = Duration::from_secs(2);

/// Committed records of a partition this broker holds no replica of, read from its leader's
/// fetch endpoint as any client would (blocking: run it on the blocking pool).
fn fetch_remote(
    (leader, topic, partition, offset): (&str, &str, u32, u64),
    bytes_max: usize,
    records_max: usize,
    format: EmbeddedFormat,
    timeout: Duration,
) -> Result<(Vec<GroupRecord>, u64, u64), String> {
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    let agent = AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REMOTE_TIMEOUT))
            .build()
            .into()
    });
    let format = match format {
        EmbeddedFormat::Binary => "binary",
        EmbeddedFormat::Json => "json",
    };
    let url = format!(
        "http://{leader}/topics/{topic}/partitions/{partition}/records?offset={offset}&max_bytes={bytes_max}&max_records={records_max}&timeout_ms=0&format={format}"
    );
    let mut response = agent
        .get(&url)
        .config()
        .timeout_global(Some(timeout))
        .build()
        .call()
        .map_err(|e| e.to_string())?;
    if response.status() != 200 {
        return Err(format!("{url}: status {}", response.status()));
    }
    let text = response
        .body_mut()
        .with_config()
        .limit(256 * 1024 * 1024)
        .read_to_string()
        .map_err(|e| e.to_string())?;
    let fetched: RemoteFetch = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    // Dense from the offset asked for, as a local read is checked to be.
    if let Some((i, r)) = fetched
        .records
        .iter()
        .enumerate()
        .find(|(i, r)| r.offset != offset + *i as u64 || r.partition != partition)
    {
        return Err(format!(
            "{url}: record {i} is offset {} of partition {}",
            r.offset, r.partition
        ));
    }
    let (high_watermark, log_start) = (fetched.high_watermark, fetched.log_start_offset);
    let got: Vec<GroupRecord> = fetched
        .records
        .into_iter()
        .map(|r| GroupRecord {
            topic: String::new(),
            partition: r.partition,
            offset: r.offset,
            timestamp: r.timestamp,
            key: r.key,
            value: r.value,
        })
        .collect();
    Ok((got, high_watermark, log_start))
}
