//! A run against a cluster known only by its Kafka listeners (`--kafka-bootstrap` without
//! `--bootstrap`): the scenario's topics created with CreateTopics, and the topic read back for
//! the verifier with Fetch from each partition's leader. Over Kafka only the leader's copy can
//! be read, so such a run verifies one copy, not every replica.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::{ApiKey, CreateTopicsRequest, CreateTopicsResponse};

use super::consumer::{earliest, fetch_once};
use super::{topic_name, Client, Conn, SOCKET_TIMEOUT};
use crate::clients::parse_value;
use crate::scenario::TopicSpec;
use crate::verify::Stored;

/// How long topics and leaders may take to settle.
const SETTLE_DEADLINE: Duration = Duration::from_secs(60);

/// Create `topic` through any of `bootstrap`, then wait until every partition has a leader.
pub(crate) fn create_topic(bootstrap: &[String], topic: &TopicSpec) -> Result<()> {
    let request = CreateTopicsRequest::default()
        // Shorter than the connection's read timeout, so the broker's own answer comes first.
        .with_timeout_ms(2_000)
        .with_topics(vec![CreatableTopic::default()
            .with_name(topic_name(&topic.name))
            .with_num_partitions(i32::try_from(topic.partitions)?)
            .with_replication_factor(i16::try_from(topic.replication_factor)?)]);
    let deadline = Instant::now() + SETTLE_DEADLINE;
    let mut last = anyhow!("no bootstrap address");
    'create: for attempt in 0usize.. {
        if Instant::now() > deadline {
            return Err(last.context(format!("creating topic '{}'", topic.name)));
        }
        let address = &bootstrap[attempt % bootstrap.len()];
        let answer = Conn::connect(address, SOCKET_TIMEOUT)
            .and_then(|mut c| c.call::<_, CreateTopicsResponse>(ApiKey::CreateTopics, &request));
        match answer {
            Ok(answer) => {
                let result = answer
                    .topics
                    .iter()
                    .find(|t| t.name.0.as_str() == topic.name);
                match result.map(|r| (r.error_code, &r.error_message)) {
                    Some((0, _)) => break 'create,
                    // On a retry it may be this run's own first try that created it.
                    Some((TOPIC_ALREADY_EXISTS, _)) if attempt > 0 => break 'create,
                    Some((TOPIC_ALREADY_EXISTS, _)) => {
                        bail!("topic '{}' already exists", topic.name)
                    }
                    Some((code, message)) => {
                        last = anyhow!("CreateTopics answered error {code}: {message:?}")
                    }
                    None => last = anyhow!("CreateTopics answered without the topic"),
                }
            }
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut client = Client::new(bootstrap, &topic.name, topic.partitions);
    loop {
        if client.refresh().is_ok() && (0..topic.partitions).all(|p| client.leader(p).is_some()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("topic '{}' has partitions without a leader", topic.name);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

const TOPIC_ALREADY_EXISTS: i16 = 36;

/// Every record of `topic` from each partition's log start up to its high watermark, read from
/// the leaders.
pub(crate) fn read_topic(
    bootstrap: &[String],
    topic: &str,
    partitions: u32,
) -> Result<Vec<Stored>> {
    let mut client = Client::new(bootstrap, topic, partitions);
    let mut log = Vec::new();
    for partition in 0..partitions {
        // A deadline for progress, not for the whole partition: long runs leave gigabytes.
        let mut deadline = Instant::now() + SETTLE_DEADLINE;
        let mut offset: Option<i64> = None;
        loop {
            if Instant::now() > deadline {
                bail!("could not read {topic}/{partition} to its end");
            }
            let Some(node) = client.leader(partition) else {
                let _ = client.refresh();
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            let from = match offset {
                Some(offset) => offset,
                None => match earliest(&mut client, node, topic, partition) {
                    Ok(start) => start,
                    Err(_) => {
                        client.drop_conn(node);
                        client.forget(partition);
                        continue;
                    }
                },
            };
            let page = fetch_once(&mut client, node, topic, partition, from, |at, value| {
                if let Some((producer, sequence)) = parse_value(value) {
                    log.push(Stored {
                        partition,
                        offset: at as u64,
                        producer,
                        sequence,
                    });
                }
            });
            match page {
                Ok((next, high_watermark)) => {
                    if offset.is_none_or(|at| next > at) {
                        deadline = Instant::now() + SETTLE_DEADLINE;
                    }
                    offset = Some(next);
                    if next >= high_watermark {
                        break;
                    }
                }
                Err(_) => {
                    client.drop_conn(node);
                    client.forget(partition);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
    Ok(log)
}
