//! loadgen's Kafka client: blocking connections that speak the wire protocol with
//! kafka-protocol's messages, pick each API's version from the broker's ApiVersions answer, and
//! pipeline requests (answers come back in request order on a connection). Works against any
//! broker that speaks these versions, not only PubG1.

pub(crate) mod admin;
pub(crate) mod consumer;
pub(crate) mod producer;

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse,
    RequestHeader, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

/// The APIs loadgen uses and the versions it can speak.
const SPOKEN: [(ApiKey, i16, i16); 6] = [
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::Metadata, 1, 12),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::ListOffsets, 1, 7),
    (ApiKey::CreateTopics, 2, 5),
];

/// How long a connection waits for an answer: longer than the timeout a produce request gives
/// the broker, so the broker's own timeout answer arrives first.
pub(crate) const SOCKET_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest answer loadgen reads (a fetch asks for at most 16 MiB).
const FRAME_MAX: usize = 64 * 1024 * 1024;

/// One connection to one broker.
pub(crate) struct Conn {
    stream: TcpStream,
    next_correlation: i32,
    /// Requests sent and not yet answered: (correlation id, api, version), oldest first.
    in_flight: VecDeque<(i32, ApiKey, i16)>,
    /// The version of each API in [`SPOKEN`] both sides speak.
    versions: HashMap<ApiKey, i16>,
    out: BytesMut,
}

impl Conn {
    /// Connect and agree on versions (ApiVersions v0, which every broker answers).
    pub(crate) fn connect(address: &str, timeout: Duration) -> Result<Self> {
        let socket = address
            .to_socket_addrs()
            .with_context(|| format!("resolving {address}"))?
            .next()
            .ok_or_else(|| anyhow!("{address} resolves to nothing"))?;
        let stream = TcpStream::connect_timeout(&socket, timeout)
            .with_context(|| format!("connecting to {address}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut conn = Self {
            stream,
            next_correlation: 0,
            in_flight: VecDeque::new(),
            versions: HashMap::new(),
            out: BytesMut::new(),
        };
        conn.versions.insert(ApiKey::ApiVersions, 0);
        let answer: ApiVersionsResponse =
            conn.call(ApiKey::ApiVersions, &ApiVersionsRequest::default())?;
        if answer.error_code != 0 {
            bail!(
                "{address}: ApiVersions answered error {}",
                answer.error_code
            );
        }
        for (api, ours_min, ours_max) in SPOKEN {
            let theirs = answer.api_keys.iter().find(|v| v.api_key == api as i16);
            if let Some(theirs) = theirs {
                let version = ours_max.min(theirs.max_version);
                if version >= ours_min.max(theirs.min_version) {
                    conn.versions.insert(api, version);
                }
            }
        }
        Ok(conn)
    }

    fn version(&self, api: ApiKey) -> Result<i16> {
        self.versions
            .get(&api)
            .copied()
            .ok_or_else(|| anyhow!("the broker speaks no version of {api:?} loadgen speaks"))
    }

    /// Send a request; its answer is read by [`Conn::receive`] after those sent before it.
    pub(crate) fn send<R: Encodable>(&mut self, api: ApiKey, request: &R) -> Result<()> {
        let version = self.version(api)?;
        let correlation = self.next_correlation;
        self.next_correlation = self.next_correlation.wrapping_add(1);
        self.out.clear();
        self.out.extend_from_slice(&[0; 4]);
        RequestHeader::default()
            .with_request_api_key(api as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation)
            .with_client_id(Some(StrBytes::from_static_str("loadgen")))
            .encode(&mut self.out, api.request_header_version(version))?;
        request.encode(&mut self.out, version)?;
        let length = (self.out.len() - 4) as i32;
        self.out[..4].copy_from_slice(&length.to_be_bytes());
        self.stream.write_all(&self.out)?;
        self.in_flight.push_back((correlation, api, version));
        Ok(())
    }

    /// The answer to the oldest request not yet answered.
    pub(crate) fn receive<T: Decodable>(&mut self) -> Result<T> {
        let (correlation, api, version) = self
            .in_flight
            .pop_front()
            .ok_or_else(|| anyhow!("no request in flight"))?;
        let mut length = [0u8; 4];
        self.stream.read_exact(&mut length)?;
        let length = i32::from_be_bytes(length);
        if !(4..=FRAME_MAX as i32).contains(&length) {
            bail!("answer frame of {length} bytes");
        }
        let mut frame = vec![0u8; length as usize];
        self.stream.read_exact(&mut frame)?;
        let mut frame = Bytes::from(frame);
        let header = ResponseHeader::decode(&mut frame, api.response_header_version(version))?;
        if header.correlation_id != correlation {
            bail!(
                "answer for correlation id {} where {correlation} was next",
                header.correlation_id
            );
        }
        T::decode(&mut frame, version)
            .with_context(|| format!("decoding a {api:?} v{version} answer"))
    }

    pub(crate) fn call<R: Encodable, T: Decodable>(
        &mut self,
        api: ApiKey,
        request: &R,
    ) -> Result<T> {
        self.send(api, request)?;
        self.receive()
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

pub(crate) fn topic_name(topic: &str) -> TopicName {
    TopicName(StrBytes::from_string(topic.to_owned()))
}

/// Connections to a cluster's brokers and where one topic's partitions are led.
pub(crate) struct Client {
    bootstrap: Vec<String>,
    topic: String,
    /// Broker id → "host:port", from the last metadata.
    addresses: HashMap<i32, String>,
    /// Per partition, its leader's broker id in the last metadata (None: none known).
    leaders: Vec<Option<i32>>,
    conns: HashMap<i32, Conn>,
    /// Which bootstrap address to ask next, so a dead one is not asked every time.
    next_bootstrap: usize,
}

impl Client {
    pub(crate) fn new(bootstrap: &[String], topic: &str, partitions: u32) -> Self {
        Self {
            bootstrap: bootstrap.to_vec(),
            topic: topic.to_owned(),
            addresses: HashMap::new(),
            leaders: vec![None; partitions as usize],
            conns: HashMap::new(),
            next_bootstrap: 0,
        }
    }

    /// Ask the cluster (a connected broker, else each bootstrap address in turn) where the
    /// partitions are led.
    pub(crate) fn refresh(&mut self) -> Result<()> {
        let request = MetadataRequest::default()
            .with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(topic_name(&self.topic)))
            ]))
            .with_allow_auto_topic_creation(false);
        let mut last_error = anyhow!("no bootstrap address");
        let known: Vec<i32> = self.conns.keys().copied().collect();
        for node in known {
            let Some(conn) = self.conns.get_mut(&node) else {
                continue;
            };
            if conn.in_flight() > 0 {
                continue;
            }
            match conn.call::<_, MetadataResponse>(ApiKey::Metadata, &request) {
                Ok(answer) => return self.learn(&answer),
                Err(e) => {
                    self.conns.remove(&node);
                    last_error = e;
                }
            }
        }
        for _ in 0..self.bootstrap.len() {
            let address = self.bootstrap[self.next_bootstrap % self.bootstrap.len()].clone();
            self.next_bootstrap += 1;
            let answer = Conn::connect(&address, SOCKET_TIMEOUT)
                .and_then(|mut conn| conn.call::<_, MetadataResponse>(ApiKey::Metadata, &request));
            match answer {
                Ok(answer) => return self.learn(&answer),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    fn learn(&mut self, answer: &MetadataResponse) -> Result<()> {
        self.addresses = answer
            .brokers
            .iter()
            .map(|b| (b.node_id.0, format!("{}:{}", b.host.as_str(), b.port)))
            .collect();
        self.leaders.iter_mut().for_each(|l| *l = None);
        let topic = answer
            .topics
            .iter()
            .find(|t| t.name.as_ref().is_some_and(|n| n.0.as_str() == self.topic))
            .ok_or_else(|| anyhow!("metadata without topic {}", self.topic))?;
        for partition in &topic.partitions {
            let slot = usize::try_from(partition.partition_index)
                .ok()
                .and_then(|i| self.leaders.get_mut(i));
            if let Some(slot) = slot {
                *slot = (partition.error_code == 0 && partition.leader_id.0 >= 0)
                    .then_some(partition.leader_id.0);
            }
        }
        Ok(())
    }

    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    pub(crate) fn leader(&self, partition: u32) -> Option<i32> {
        self.leaders.get(partition as usize).copied().flatten()
    }

    /// Forget where `partition` is led (an answer said it moved).
    pub(crate) fn forget(&mut self, partition: u32) {
        if let Some(slot) = self.leaders.get_mut(partition as usize) {
            *slot = None;
        }
    }

    /// The connection to broker `node`, opened if there is none.
    pub(crate) fn conn(&mut self, node: i32) -> Result<&mut Conn> {
        if !self.conns.contains_key(&node) {
            let address = self
                .addresses
                .get(&node)
                .ok_or_else(|| anyhow!("no address for broker {node}"))?;
            let conn = Conn::connect(address, SOCKET_TIMEOUT)?;
            self.conns.insert(node, conn);
        }
        self.conns
            .get_mut(&node)
            .ok_or_else(|| anyhow!("no connection to broker {node}"))
    }

    /// Drop the connection to `node` (it failed: what was in flight on it is unknown).
    pub(crate) fn drop_conn(&mut self, node: i32) {
        self.conns.remove(&node);
    }

    pub(crate) fn drop_all(&mut self) {
        self.conns.clear();
    }

    /// Any connected broker, or a bootstrap one (for requests any broker answers).
    pub(crate) fn any_conn(&mut self) -> Result<&mut Conn> {
        if let Some(node) = self
            .conns
            .iter()
            .find(|(_, c)| c.in_flight() == 0)
            .map(|(n, _)| *n)
        {
            return self.conn(node);
        }
        self.refresh()?;
        let node = self
            .leaders
            .iter()
            .flatten()
            .next()
            .copied()
            .or_else(|| self.addresses.keys().next().copied())
            .ok_or_else(|| anyhow!("no broker known"))?;
        self.conn(node)
    }
}
