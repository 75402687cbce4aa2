//! The Kafka protocol listener against a real Kafka client (kcat, librdkafka underneath) and
//! against raw sockets: metadata names every broker and the real leaders; what kcat produces
//! in every compression codec is what kcat and the HTTP API read back, at the same offsets;
//! random and truncated frames close only their own connection.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use pubg1_tests::cluster::TestCluster;
use pubg1_tests::{wait_until, Client};

/// Run kcat with `args`, feeding `input` on stdin; its stdout if it succeeded.
fn kcat(args: &[&str], input: Option<&str>) -> Result<String> {
    let mut child = Command::new("kcat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kcat (scripts/ensure-deps installs it)")?;
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    if let Some(input) = input {
        stdin.write_all(input.as_bytes())?;
    }
    drop(stdin);
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "kcat {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

#[test]
fn kcat_sees_the_cluster_produces_in_every_codec_and_reads_back_what_http_reads() -> Result<()> {
    let cluster = TestCluster::start_with_kafka(3)?;
    cluster.create_replicated("k", 3)?;
    let leaders: Vec<u64> = (0..3)
        .map(|p| cluster.leader_of("k", p))
        .collect::<Result<_>>()?;
    let bootstrap = cluster.bootstrap();

    // Metadata: three brokers at their Kafka addresses, each partition led where Raft says.
    let metadata: Value = wait_until(Duration::from_secs(20), "metadata with 3 brokers", || {
        let listed = kcat(&["-L", "-J", "-b", &bootstrap, "-t", "k"], None).ok()?;
        let json: Value = serde_json::from_str(&listed).ok()?;
        (json["brokers"].as_array()?.len() == 3).then_some(json)
    })?;
    let mut advertised: Vec<String> = metadata["brokers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["name"].as_str().map(str::to_owned))
        .collect();
    advertised.sort();
    let mut expected: Vec<String> = cluster
        .brokers
        .iter()
        .filter_map(|b| b.kafka.map(|a| a.to_string()))
        .collect();
    expected.sort();
    assert_eq!(advertised, expected);
    let partitions = metadata["topics"][0]["partitions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(partitions.len(), 3, "{metadata}");
    for p in &partitions {
        let index = p["partition"].as_u64().unwrap_or(99) as usize;
        assert_eq!(p["leader"].as_u64(), Some(leaders[index]), "{p}");
        assert_eq!(p["replicas"].as_array().map(Vec::len), Some(3), "{p}");
    }

    // Produce 200 keyed records per codec (the last producer idempotent), then read back.
    let mut sent = BTreeMap::new();
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let lines: String = (0..200)
            .map(|i| format!("key{}:{codec}-{i}\n", i % 17))
            .collect();
        for i in 0..200 {
            sent.insert(format!("{codec}-{i}"), format!("key{}", i % 17));
        }
        let mut args = vec!["-P", "-b", &bootstrap, "-t", "k", "-K:", "-z", codec];
        if codec == "zstd" {
            args.extend(["-X", "enable.idempotence=true"]);
        }
        kcat(&args, Some(&lines))?;
    }
    let consumed = kcat(
        &[
            "-C",
            "-b",
            &bootstrap,
            "-t",
            "k",
            "-o",
            "beginning",
            "-e",
            "-q",
            "-f",
            "%p %o %k %s\n",
        ],
        None,
    )?;
    let mut got = BTreeMap::new();
    let mut by_offset = BTreeMap::new();
    for line in consumed.lines() {
        let parts: Vec<&str> = line.splitn(4, ' ').collect();
        let [p, o, k, v] = parts[..] else {
            bail!("unexpected line {line:?}");
        };
        assert!(
            got.insert(v.to_owned(), k.to_owned()).is_none(),
            "{v} read twice"
        );
        by_offset.insert((p.parse::<u32>()?, o.parse::<u64>()?), v.to_owned());
    }
    assert_eq!(got, sent, "every record once, with its key");

    // As a consumer group (kcat -G): everything once, then the group's commits are visible.
    let grouped = kcat(
        &[
            "-b",
            &bootstrap,
            "-G",
            "kcat-group",
            "k",
            "-q",
            "-e",
            "-f",
            "%s\n",
            "-X",
            "auto.offset.reset=earliest",
        ],
        None,
    )?;
    let mut in_group: Vec<&str> = grouped.lines().collect();
    in_group.sort_unstable();
    let mut all: Vec<&str> = sent.keys().map(String::as_str).collect();
    all.sort_unstable();
    assert_eq!(in_group, all, "the group read every record once");

    // The HTTP API reads the same records at the same offsets (compressed batches decoded).
    let http = Client::new();
    let broker = cluster.broker(1);
    let mut over_http = BTreeMap::new();
    for p in 0..3u32 {
        let reply = http.get(&broker.url(&format!(
            "/topics/k/partitions/{p}/records?offset=0&max_records=10000&format=binary"
        )))?;
        for record in reply.body["records"].as_array().into_iter().flatten() {
            let value = record["value"].as_str().unwrap_or_default();
            let value = String::from_utf8(base64_decode(value)?)?;
            over_http.insert((p, record["offset"].as_u64().unwrap_or(u64::MAX)), value);
        }
    }
    assert_eq!(over_http, by_offset);
    Ok(())
}

fn base64_decode(text: &str) -> Result<Vec<u8>> {
    use base64::Engine;
    Ok(base64::engine::general_purpose::STANDARD.decode(text)?)
}

/// An ApiVersions v0 request as a frame (length prefix included).
fn api_versions_frame(correlation_id: i32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&18i16.to_be_bytes()); // ApiVersions
    body.extend_from_slice(&0i16.to_be_bytes()); // v0
    body.extend_from_slice(&correlation_id.to_be_bytes());
    body.extend_from_slice(&(-1i16).to_be_bytes()); // no client id
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// Send `frame` and read one answer: its correlation id and error code.
fn ask(stream: &mut TcpStream, frame: &[u8]) -> Result<(i32, i16)> {
    stream.write_all(frame)?;
    let mut length = [0u8; 4];
    stream.read_exact(&mut length)?;
    let mut answer = vec![0u8; i32::from_be_bytes(length) as usize];
    stream.read_exact(&mut answer)?;
    if answer.len() < 6 {
        bail!("short answer");
    }
    Ok((
        i32::from_be_bytes([answer[0], answer[1], answer[2], answer[3]]),
        i16::from_be_bytes([answer[4], answer[5]]),
    ))
}

fn connect(address: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

/// Whether the broker closed `stream` (read returns 0 or an error other than a timeout).
fn closed(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Ok(0) | Err(_))
}

#[test]
fn random_and_truncated_frames_close_only_their_connection() -> Result<()> {
    let cluster = TestCluster::start_with_kafka(1)?;
    let address = cluster
        .broker(1)
        .kafka
        .ok_or_else(|| anyhow!("no Kafka listener"))?;
    let mut good = connect(address)?;
    assert_eq!(ask(&mut good, &api_versions_frame(1))?, (1, 0));
    // ApiVersions of a version from the future: answered in v0 with UNSUPPORTED_VERSION (35).
    let mut future = api_versions_frame(2);
    future[6..8].copy_from_slice(&99i16.to_be_bytes());
    assert_eq!(ask(&mut good, &future)?, (2, 35));

    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    let valid = api_versions_frame(3);
    let mut bad: Vec<Vec<u8>> = Vec::new();
    // Truncated: a length that promises more than comes, then the connection ends.
    for cut in [1, 3, 4, 6, 9, valid.len() - 1] {
        bad.push(valid[..cut].to_vec());
    }
    // Tiny frames claiming huge arrays (found by fuzzing): Metadata v0 with 2^31-1 topics,
    // and ApiVersions v3's compact arrays with a varint length near 2^32. Refused, never
    // allocated.
    for body in [
        &[0, 3, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff][..],
        &[
            0, 18, 0, 3, 0, 0, 0, 1, 0xff, 0xff, 0, 0xff, 0xff, 0xff, 0xff, 0x0f,
        ][..],
    ] {
        let mut frame = (body.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        bad.push(frame);
    }
    // A frame over the size limit, and a negative length.
    bad.push((200 * 1024 * 1024i32).to_be_bytes().to_vec());
    bad.push((-5i32).to_be_bytes().to_vec());
    // Well-framed garbage: random bodies, and real headers with random bodies for each API.
    for len in [0usize, 1, 7, 8, 20, 300, 5000] {
        let body = random(len);
        let mut frame = (len as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        bad.push(frame);
    }
    for api in 0i16..80 {
        for version in [0i16, 3, 9, 12] {
            let mut body = api.to_be_bytes().to_vec();
            body.extend_from_slice(&version.to_be_bytes());
            body.extend_from_slice(&7i32.to_be_bytes());
            body.extend(random(40));
            let mut frame = (body.len() as i32).to_be_bytes().to_vec();
            frame.extend_from_slice(&body);
            bad.push(frame);
        }
    }
    for frame in &bad {
        let mut stream = connect(address)?;
        stream.write_all(frame)?;
        stream.shutdown(std::net::Shutdown::Write)?;
        // Whatever the broker does with it, the connection ends (an answer to a frame that
        // happens to be valid may come first).
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    }
    // The first connection is still served, and the broker is alive and well.
    assert_eq!(ask(&mut good, &api_versions_frame(4))?, (4, 0));
    let mut fresh = connect(address)?;
    assert_eq!(ask(&mut fresh, &api_versions_frame(5))?, (5, 0));
    let reply = Client::new().get(&cluster.broker(1).url("/health"))?;
    assert_eq!(reply.status, 200);
    // An unknown API key closes the connection (as Kafka does).
    let mut unknown = api_versions_frame(6);
    unknown[4..6].copy_from_slice(&999i16.to_be_bytes());
    let mut stream = connect(address)?;
    stream.write_all(&unknown)?;
    assert!(closed(&mut stream));
    Ok(())
}
