//! The Grafana dashboards against a real Prometheus scraping a real 3-broker cluster under load:
//! every PromQL expression the dashboards use must return data, and the dashboard JSON and its
//! provisioning must fit together.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pubg1_tests::cluster::{urls, TestCluster};
use pubg1_tests::groups::{coordinator, create_instance, subscribe};
use pubg1_tests::workload::Load;
use pubg1_tests::{free_port, wait_until, Client};
use serde_json::{json, Value};

/// The repository root. `CARGO_MANIFEST_DIR` is read when the test runs (cargo sets it), not
/// baked in at compile time: a target directory shared by checkouts at different paths would
/// point at another one.
fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
        .parent()
        .expect("repo root")
        .to_owned()
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = repo().join("grafana/dashboards");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("grafana/dashboards") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).expect("read");
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            found.push((path.display().to_string(), json));
        }
    }
    assert!(!found.is_empty(), "no dashboards in {}", dir.display());
    found
}

/// Every PromQL expression of every dashboard.
fn expressions() -> Vec<String> {
    dashboards()
        .iter()
        .flat_map(|(_, d)| d["panels"].as_array().cloned().unwrap_or_default())
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn dashboards_are_well_formed_and_use_the_provisioned_datasource() {
    let datasources =
        std::fs::read_to_string(repo().join("grafana/provisioning/datasources/prometheus.yml"))
            .expect("datasource provisioning");
    let uid = datasources
        .lines()
        .find_map(|l| l.trim().strip_prefix("uid:"))
        .map(str::trim)
        .expect("a datasource uid");
    let provider =
        std::fs::read_to_string(repo().join("grafana/provisioning/dashboards/pubg1.yml"))
            .expect("dashboard provisioning");
    assert!(
        provider.contains("path: /var/lib/grafana/dashboards"),
        "{provider}"
    );
    let compose = std::fs::read_to_string(repo().join("compose.yaml")).expect("compose.yaml");
    assert!(
        compose.contains("./grafana/dashboards:/var/lib/grafana/dashboards"),
        "compose mounts the dashboards where the provider looks"
    );
    for (path, dashboard) in dashboards() {
        for key in ["uid", "title", "schemaVersion"] {
            assert!(!dashboard[key].is_null(), "{path}: no {key}");
        }
        let panels = dashboard["panels"].as_array().expect("panels");
        assert!(panels.len() >= 8, "{path}: {} panels", panels.len());
        let mut ids = Vec::new();
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("?");
            ids.push(panel["id"].as_u64().expect("panel id"));
            assert!(panel["type"].is_string(), "{title}: no type");
            for key in ["x", "y", "w", "h"] {
                assert!(panel["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
            }
            assert_eq!(panel["datasource"]["uid"], uid, "{title}: datasource");
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{title}: no targets");
            for target in targets {
                assert!(
                    target["expr"].as_str().is_some_and(|e| !e.is_empty()),
                    "{title}"
                );
                assert!(target["refId"].is_string(), "{title}: refId");
                assert_eq!(
                    target["datasource"]["uid"], uid,
                    "{title}: target datasource"
                );
            }
        }
        let count = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), count, "{path}: panel ids repeat");
        // What the issue asks the dashboards to show.
        let text = dashboard.to_string();
        for metric in [
            "pubg1_produce_records_total",
            "pubg1_produce_latency_seconds_bucket",
            "pubg1_fetch_record_age_seconds_bucket",
            "pubg1_raft_leader",
            "pubg1_raft_elections_total",
            "pubg1_raft_follower_lag_entries",
            "pubg1_fetch_lag_records",
            "pubg1_storage_fsync_seconds_bucket",
            "pubg1_group_lag_records",
            "pubg1_group_rebalances_total",
            "pubg1_group_commit_latency_seconds_bucket",
            "pubg1_stream_records_in_total",
            "pubg1_stream_lag_records",
            "pubg1_stream_checkpoint_seconds_bucket",
        ] {
            assert!(text.contains(metric), "{path} does not use {metric}");
        }
    }
    let status = Command::new("promtool")
        .args(["check", "config"])
        .arg(repo().join("grafana/prometheus.yml"))
        .status()
        .expect("promtool (scripts/ensure-deps installs it)");
    assert!(
        status.success(),
        "grafana/prometheus.yml is not a valid Prometheus config"
    );
}

/// A Prometheus server, killed (by PID) when dropped.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[String]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pubg1\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )?;
        let address = format!("127.0.0.1:{}", free_port()?);
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Self {
            child,
            url: format!("http://{address}"),
            _dir: dir,
        })
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn every_dashboard_expression_returns_data_from_a_real_prometheus() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3)?;
    let http = Client::new();
    let body = json!({"name": "watched", "partitions": 3, "replication_factor": 3});
    let created = http.post_json(&cluster.broker(1).url("/topics"), &body)?;
    assert_eq!(created.status, 201, "{}", created.text);
    for partition in 0..3 {
        cluster.leader_of("watched", partition)?;
    }
    let load = Load::start(urls(cluster.topic_urls("watched")), "g", 2, 10);
    let targets: Vec<String> = cluster.brokers.iter().map(|b| b.http.to_string()).collect();
    let prometheus = Prometheus::start(&targets)?;
    // A stream job counts the load's records, so the stream series move too.
    let out = json!({"name": "watched-counts", "partitions": 1, "replication_factor": 3});
    assert_eq!(
        http.post_json(&cluster.broker(1).url("/topics"), &out)?
            .status,
        201
    );
    let job = json!({"name": "watching", "input": "watched", "output": "watched-counts",
        "window": {"kind": "tumbling", "size_ms": 1000}, "aggregation": "count"});
    // 503 until the job's offsets partition has a leader.
    wait_until(Duration::from_secs(30), "the stream job created", || {
        let created = http
            .post_json(&cluster.broker(1).url("/streams"), &job)
            .ok()?;
        let created = match created.location {
            Some(location) if created.status == 307 => http.post_json(&location, &job).ok()?,
            _ => created,
        };
        assert_ne!(created.status / 100, 4, "{}", created.text);
        (created.status == 201).then_some(())
    })?;
    // A consumer group member polls and commits, so the group series move too.
    let home = coordinator(&cluster.brokers, "watchers")?;
    let member = create_instance(
        &cluster.brokers[home],
        "watchers",
        json!({"format": "binary", "auto.offset.reset": "earliest"}),
    )?;
    subscribe(&member, &["watched"])?;
    // Consumers keep fetching so fetch metrics (lag, record age) move.
    let consume = |http: &Client| {
        let _ = http.get(&format!("{member}/records?timeout=0"));
        let _ = http.post(&format!("{member}/offsets"), None, b"");
        for broker in &cluster.brokers {
            for partition in 0..3 {
                let _ = http.get(&broker.url(&format!(
                    "/topics/watched/partitions/{partition}/records?max_records=100"
                )));
            }
        }
    };
    wait_until(
        Duration::from_secs(30),
        "Prometheus to scrape all brokers",
        || {
            consume(&http);
            let reply = http
                .get(&format!("{}/api/v1/targets", prometheus.url))
                .ok()?;
            let active = reply.body["data"]["activeTargets"].as_array()?.clone();
            (active.len() == 3 && active.iter().all(|t| t["health"] == "up")).then_some(())
        },
    )?;
    // Grafana fills in $__rate_interval; here it is a window of several 1 s scrapes.
    let expressions: Vec<String> = expressions()
        .into_iter()
        .map(|e| e.replace("$__rate_interval", "10s"))
        .collect();
    assert!(expressions.len() >= 15, "{expressions:?}");
    let mut missing = expressions.clone();
    let answered = wait_until(
        Duration::from_secs(60),
        "every expression to return data",
        || {
            consume(&http);
            missing.retain(|expr| {
                let url = format!("{}/api/v1/query?query={}", prometheus.url, encode(expr));
                let Ok(reply) = http.get(&url) else {
                    return true;
                };
                assert_eq!(reply.body["status"], "success", "{expr}: {}", reply.text);
                // Data: at least one series with a real number (not NaN from empty rates).
                let has_number = reply.body["data"]["result"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r["value"][1].as_str())
                    .any(|v| v.parse::<f64>().is_ok_and(f64::is_finite));
                !has_number
            });
            missing.is_empty().then_some(())
        },
    );
    load.finish()?;
    assert!(answered.is_ok(), "no data for: {missing:#?}");
    Ok(())
}

/// Percent-encode a query string value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
