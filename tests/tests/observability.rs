//! /metrics passes `promtool check metrics`; /openapi.json lists exactly the routes the server
//! answers; /health and /ready answer.

use std::io::Write;
use std::process::{Command, Stdio};

use pubg1_tests::workload::{publish_all, Publish};
use pubg1_tests::{create_topic, BrokerProcess, Client};

#[test]
fn metrics_pass_promtool_and_count_traffic() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = BrokerProcess::start(&dir.path().join("broker"), &[])?;
    let http = Client::new();
    create_topic(&http, &broker, "m", 2)?;
    publish_all(
        &broker,
        &Publish {
            topic: "m".into(),
            tag: "m".into(),
            clients: 2,
            records_per_client: 100,
            batch: 10,
        },
    )?;
    let fetched = http.get(&broker.url("/topics/m/partitions/0/records?format=binary"))?;
    assert_eq!(fetched.status, 200);
    let _ = http.get(&broker.url("/topics/absent"))?;

    let metrics = http.get(&broker.url("/metrics"))?;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.content_type.starts_with("text/plain"),
        "{}",
        metrics.content_type
    );
    let text = metrics.text;
    let value = |line_prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sample {line_prefix} in\n{text}"))
    };
    assert_eq!(value("pubg1_produce_records_total{topic=\"m\"}"), 200.0);
    assert!(value("pubg1_storage_fsync_seconds_count") >= 1.0);
    assert!(value("pubg1_storage_group_commit_writes_count") >= 1.0);
    let hw0 = value("pubg1_partition_high_watermark{partition=\"0\",topic=\"m\"}");
    let hw1 = value("pubg1_partition_high_watermark{partition=\"1\",topic=\"m\"}");
    assert_eq!(hw0 + hw1, 200.0);
    assert!(value("pubg1_fetch_records_total{topic=\"m\"}") >= 1.0);
    assert!(
        text.contains("pubg1_http_request_duration_seconds_bucket"),
        "request latency histogram"
    );
    assert!(text.contains("pubg1_produce_latency_seconds_bucket"));

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("promtool is needed (apt-get install prometheus): {e}"))?;
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())?;
    let out = promtool.wait_with_output()?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics:\n{report}"
    );
    Ok(())
}

#[test]
fn openapi_lists_every_route_and_every_listed_route_is_served() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = BrokerProcess::start(&dir.path().join("broker"), &[])?;
    let http = Client::new();
    create_topic(&http, &broker, "doc", 1)?;
    let doc = http.get(&broker.url("/openapi.json"))?;
    assert_eq!(doc.status, 200);
    assert!(
        doc.body["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc.text
    );

    let mut documented = Vec::new();
    for (path, item) in doc.body["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            documented.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    documented.sort();
    // The server's routes (broker/src/http/mod.rs registers each through the documenting `service`).
    let mut served = vec![
        "GET /health",
        "GET /ready",
        "GET /metrics",
        "GET /openapi.json",
        "GET /topics",
        "POST /topics",
        "GET /topics/{topic}",
        "DELETE /topics/{topic}",
        "POST /topics/{topic}",
        "GET /topics/{topic}/partitions",
        "GET /topics/{topic}/partitions/{partition}",
        "POST /topics/{topic}/partitions/{partition}",
        "POST /producers",
        "GET /topics/{topic}/partitions/{partition}/records",
        "POST /consumers/{group}",
        "DELETE /consumers/{group}/instances/{instance}",
        "POST /consumers/{group}/instances/{instance}/subscription",
        "GET /consumers/{group}/instances/{instance}/subscription",
        "DELETE /consumers/{group}/instances/{instance}/subscription",
        "POST /consumers/{group}/instances/{instance}/assignments",
        "GET /consumers/{group}/instances/{instance}/assignments",
        "GET /consumers/{group}/instances/{instance}/records",
        "POST /consumers/{group}/instances/{instance}/offsets",
        "GET /consumers/{group}/instances/{instance}/offsets",
        "POST /consumers/{group}/instances/{instance}/positions",
        "POST /consumers/{group}/instances/{instance}/positions/beginning",
        "POST /consumers/{group}/instances/{instance}/positions/end",
        "GET /consumer-groups",
        "GET /consumer-groups/{group}",
        "POST /topics/{topic}/partitions/{partition}/barrier",
        "POST /streams",
        "GET /streams",
        "GET /streams/{job}",
        "DELETE /streams/{job}",
        "GET /streams/{job}/windows",
    ];
    served.sort_unstable();
    assert_eq!(documented, served);

    // Each documented route really exists: it never answers with the unknown-route 40400 or 405.
    // DELETE last, so the other routes see the topic.
    let (deletes, others): (Vec<&String>, Vec<&String>) =
        documented.iter().partition(|r| r.starts_with("DELETE"));
    for route in others.into_iter().chain(deletes) {
        let (method, path) = route.split_once(' ').expect("method and path");
        let url = broker.url(
            &path
                .replace("{topic}", "doc")
                .replace("{partition}", "0")
                .replace("{group}", "g")
                .replace("{instance}", "i")
                .replace("{job}", "j"),
        );
        let reply = match method {
            "GET" => http.get(&url)?,
            "DELETE" => http.delete(&url)?,
            _ => http.post(&url, Some("application/json"), b"{}")?,
        };
        assert_ne!(
            reply.error_code(),
            Some(40400),
            "{route} is documented but not served: {}",
            reply.text
        );
        assert_ne!(reply.status, 405, "{route}");
    }
    Ok(())
}

#[test]
fn health_and_ready() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = BrokerProcess::start(&dir.path().join("broker"), &[])?;
    let http = Client::new();
    assert_eq!(http.get(&broker.url("/health"))?.status, 200);
    let ready = http.get(&broker.url("/ready"))?;
    assert_eq!(ready.status, 200, "{}", ready.text);
    Ok(())
}
