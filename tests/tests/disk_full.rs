//! A broker whose disk fills up under load: it refuses writes with a clear error and does not
//! crash or corrupt its data; the partition's other replicas keep it available; once space is
//! freed and it is restarted it rejoins, and nothing acknowledged is lost anywhere.
//!
//! The broker's data dir is a tmpfs of 48 MiB mounted for the test (the suite runs as root, as
//! CI does); its size is raised in place (`mount -o remount,size=`) to free space, which keeps
//! the files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pubg1_tests::cluster::{set, urls, TestCluster};
use pubg1_tests::workload::{fetch_topic, verify, Load};
use pubg1_tests::{metric, wait_until, Client};

/// Small filesystems mounted for a test, unmounted when dropped (after the brokers on them:
/// declare it before the cluster).
#[derive(Default)]
struct Mounts(Mutex<Vec<PathBuf>>);

impl Mounts {
    fn tmpfs(&self, dir: &Path, size: &str) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        run(
            "mount",
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            dir,
        )?;
        self.0
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .push(dir.to_owned());
        Ok(())
    }

    fn resize(&self, dir: &Path, size: &str) -> Result<()> {
        run("mount", &["-o", &format!("remount,size={size}")], dir)
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        if let Ok(dirs) = self.0.lock() {
            for dir in dirs.iter() {
                let _ = Command::new("umount").arg("-l").arg(dir).status();
            }
        }
    }
}

fn run(program: &str, args: &[&str], dir: &Path) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .arg(dir)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {args:?} {} failed: {status}", dir.display());
    }
    Ok(())
}

#[test]
fn a_full_disk_refuses_writes_clearly_and_loses_nothing_once_space_is_freed() -> Result<()> {
    let mounts = Mounts::default();
    let full = 3;
    let mut cluster = TestCluster::start_prepared(3, &[], &|id, dir| {
        if id == full {
            mounts.tmpfs(dir, "48m")
        } else {
            Ok(())
        }
    })?;
    cluster.create_replicated("full", 3)?;
    let data_dir = cluster.broker(full).data_dir.clone();
    // Producers write through brokers 1 and 2 only, so every refusal they see is a real
    // unavailability of the partition, not broker 3's own.
    let targets = urls(vec![
        cluster.broker(1).url("/topics/full"),
        cluster.broker(2).url("/topics/full"),
    ]);
    let load = Load::start(targets.clone(), "f", 4, 100);
    let http = Client::new();
    let errors = "pubg1_storage_write_errors_total";
    wait_until(
        Duration::from_secs(120),
        "broker 3's disk to fill up and a write to fail",
        || {
            metric(cluster.broker(full), errors)
                .ok()
                .filter(|n| *n >= 1.0)
        },
    )?;
    // Refused, clearly: the disk is full and nothing was written.
    let reply = http.post_json(
        &cluster.broker(full).url("/topics/full/partitions/0"),
        &serde_json::json!({"records": [{"value": "too much"}]}),
    )?;
    reply.assert_error(507, 50701, "produce on the broker with a full disk");
    assert!(
        reply.text.contains("No space left on device"),
        "{}",
        reply.text
    );
    let ready = http.get(&cluster.broker(full).url("/ready"))?;
    ready.assert_error(503, 50301, "readiness with a full disk");
    // The other replicas keep every partition available.
    load.wait_for_more(
        20_000,
        "load through the other brokers with broker 3's disk full",
    )?;
    assert!(
        !cluster.broker_mut(full).has_exited(),
        "the broker with a full disk crashed"
    );
    // Free space; a broker that failed a durable write is restarted to recover.
    mounts.resize(&data_dir, "2g")?;
    cluster.broker_mut(full).terminate()?;
    cluster.broker_mut(full).restart()?;
    set(&targets, cluster.topic_urls("full"))?;
    load.wait_for_more(5_000, "load after broker 3 rejoined")?;
    let acked = load.finish()?;
    cluster.wait_converged("full", pubg1_tests::cluster::CONVERGE_DEADLINE)?;
    for (i, broker) in cluster.brokers.iter().enumerate() {
        verify(&acked, &fetch_topic(&http, broker, "full", 3)?)
            .map_err(|e| e.context(format!("broker {}'s replicas", i + 1)))?;
    }
    cluster.assert_replicas_identical("full", 3)?;
    drop(cluster);
    drop(mounts);
    Ok(())
}
