//! The brokers loadgen starts and breaks: real `pubg1-broker` processes on 127.0.0.1, each on
//! its own data dir, killed, paused and resumed by PID. Faults only ever touch these processes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::http::Http;
use crate::ports::free_port;
use crate::proxy::Proxies;
use crate::scenario::ClusterSpec;

/// How long a broker may take to become ready.
const READY_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    Paused,
    Killed,
}

#[derive(Debug)]
pub struct Broker {
    pub id: u32,
    pub http_port: u16,
    pub peer_port: u16,
    /// The broker's Kafka listener.
    pub kafka_port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    pub state: State,
}

impl Broker {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, signal: &str) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("broker {} is not running", self.id))?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }
}

/// A local cluster of brokers, all killed when dropped.
#[derive(Debug)]
pub struct Cluster {
    pub brokers: Vec<Broker>,
    binary: PathBuf,
    /// Each broker's `--seeds`: through the proxies when there are any.
    seeds: HashMap<u32, String>,
    raft_tick_ms: u64,
    /// Extra environment for every broker ([`ClusterSpec::broker_env`]).
    broker_env: BTreeMap<String, String>,
    /// The TCP proxies between brokers, when network faults are wanted.
    proxies: Option<Proxies>,
    /// Brokers cut off from the others right now.
    /// Brokers cut off from the others right now, and since when.
    pub isolated: Vec<(u32, Instant)>,
}

/// The `pubg1-broker` next to this executable (cargo builds them into the same directory).
pub fn default_broker_binary() -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let dir = me
        .parent()
        .ok_or_else(|| anyhow!("no directory for {}", me.display()))?;
    // Test binaries live one level down, in deps/.
    for candidate in [dir.join("pubg1-broker"), dir.join("../pubg1-broker")] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "pubg1-broker not found next to {} (build it: cargo build --release --workspace --bins, or pass --broker-bin)",
        me.display()
    )
}

impl Cluster {
    /// Start `n` brokers under `dir` and wait until all are ready. With `proxies`, brokers reach
    /// each other only through loadgen's TCP proxies, so the network can be partitioned.
    pub fn start(binary: &Path, dir: &Path, spec: &ClusterSpec) -> Result<Self> {
        let (n, proxies) = (spec.brokers, spec.proxies);
        std::fs::create_dir_all(dir)?;
        let mut brokers = Vec::new();
        for id in 1..=n {
            brokers.push(Broker {
                id,
                http_port: free_port()?,
                peer_port: free_port()?,
                kafka_port: free_port()?,
                data_dir: dir.join(format!("broker-{id}")),
                log_path: dir.join(format!("broker-{id}.log")),
                child: None,
                state: State::Killed,
            });
        }
        let peers: HashMap<u32, SocketAddr> = brokers
            .iter()
            .map(|b| (b.id, SocketAddr::from(([127, 0, 0, 1], b.peer_port))))
            .collect();
        let (proxies, ports) = if proxies {
            let (proxies, ports) = Proxies::start(&peers)?;
            (Some(proxies), ports)
        } else {
            (None, HashMap::new())
        };
        let seeds = brokers
            .iter()
            .map(|me| {
                let list = brokers
                    .iter()
                    .map(|b| {
                        let port = ports.get(&(me.id, b.id)).copied().unwrap_or(b.peer_port);
                        format!("{}@127.0.0.1:{port}", b.id)
                    })
                    .collect::<Vec<_>>()
                    .join(",");
                (me.id, list)
            })
            .collect();
        let mut cluster = Self {
            brokers,
            binary: binary.to_owned(),
            seeds,
            raft_tick_ms: spec.raft_tick_ms,
            broker_env: spec.broker_env.clone(),
            proxies,
            isolated: Vec::new(),
        };
        for id in 1..=n {
            cluster.spawn(id)?;
        }
        for id in 1..=n {
            cluster.wait_ready(id)?;
        }
        Ok(cluster)
    }

    pub fn broker(&self, id: u32) -> Result<&Broker> {
        self.brokers
            .iter()
            .find(|b| b.id == id)
            .ok_or_else(|| anyhow!("no broker {id}"))
    }

    fn broker_mut(&mut self, id: u32) -> Result<&mut Broker> {
        self.brokers
            .iter_mut()
            .find(|b| b.id == id)
            .ok_or_else(|| anyhow!("no broker {id}"))
    }

    /// HTTP base URLs of every broker (running or not: producers rotate past dead ones).
    pub fn urls(&self) -> Vec<String> {
        self.brokers.iter().map(|b| b.url("")).collect()
    }

    /// Every broker's Kafka listener (host:port), bootstrap addresses for Kafka clients.
    pub fn kafka_addresses(&self) -> Vec<String> {
        self.brokers
            .iter()
            .map(|b| format!("127.0.0.1:{}", b.kafka_port))
            .collect()
    }

    fn spawn(&mut self, id: u32) -> Result<()> {
        let (binary, tick) = (self.binary.clone(), self.raft_tick_ms);
        let env = self.broker_env.clone();
        let seeds = self.seeds.get(&id).cloned().unwrap_or_default();
        let broker = self.broker_mut(id)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&broker.log_path)?;
        let child = Command::new(&binary)
            .args(["--id", &id.to_string()])
            .arg("--data-dir")
            .arg(&broker.data_dir)
            .args(["--http", &format!("127.0.0.1:{}", broker.http_port)])
            .args(["--peer", &format!("127.0.0.1:{}", broker.peer_port)])
            .args(["--kafka", &format!("127.0.0.1:{}", broker.kafka_port)])
            .args(["--seeds", &seeds])
            .env("PUBG1_RAFT_TICK_MS", tick.to_string())
            .envs(&env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        broker.child = Some(child);
        broker.state = State::Running;
        Ok(())
    }

    fn wait_ready(&mut self, id: u32) -> Result<()> {
        let http = Http::new(Duration::from_secs(2));
        let deadline = Instant::now() + READY_DEADLINE;
        let broker = self.broker_mut(id)?;
        let url = broker.url("/ready");
        loop {
            if let Some(child) = broker.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    let log = std::fs::read_to_string(&broker.log_path).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    bail!(
                        "broker {id} exited with {status} during start-up; log tail:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
            if http.get(&url).is_ok_and(|r| r.status == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("broker {id} not ready after {READY_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9, and reap it.
    pub fn kill(&mut self, id: u32) -> Result<()> {
        let broker = self.broker_mut(id)?;
        if let Some(mut child) = broker.child.take() {
            child.kill()?;
            child.wait()?;
        }
        broker.state = State::Killed;
        Ok(())
    }

    /// Start a killed broker again on its data dir and port. Does not wait for readiness: a
    /// broker is ready only with a majority up, and the run goes on meanwhile.
    pub fn restart(&mut self, id: u32) -> Result<()> {
        if self.broker(id)?.state != State::Killed {
            bail!("broker {id} is not killed");
        }
        self.spawn(id)
    }

    pub fn pause(&mut self, id: u32) -> Result<()> {
        let broker = self.broker_mut(id)?;
        broker.signal("STOP")?;
        broker.state = State::Paused;
        Ok(())
    }

    pub fn resume(&mut self, id: u32) -> Result<()> {
        let broker = self.broker_mut(id)?;
        broker.signal("CONT")?;
        broker.state = State::Running;
        Ok(())
    }

    /// Cut broker `id` off from every other broker (both directions).
    pub fn isolate(&mut self, id: u32) -> Result<()> {
        self.broker(id)?;
        let proxies = self
            .proxies
            .as_ref()
            .ok_or_else(|| anyhow!("network faults need [cluster] proxies = true"))?;
        proxies.isolate(id);
        self.isolated.push((id, Instant::now()));
        Ok(())
    }

    /// Reconnect every broker to every other.
    pub fn heal_network(&mut self) {
        if let Some(proxies) = &self.proxies {
            proxies.heal();
        }
        self.isolated.clear();
    }

    pub fn in_state(&self, state: State) -> Vec<u32> {
        self.brokers
            .iter()
            .filter(|b| b.state == state)
            .map(|b| b.id)
            .collect()
    }

    /// Heal the network, resume paused brokers and restart killed ones, then wait until every broker is ready.
    pub fn heal(&mut self) -> Result<()> {
        self.heal_network();
        for id in self.in_state(State::Paused) {
            self.resume(id)?;
        }
        for id in self.in_state(State::Killed) {
            self.spawn(id)?;
        }
        for id in 1..=self.brokers.len() as u32 {
            self.wait_ready(id)?;
        }
        Ok(())
    }

    /// SIGTERM every broker and wait for clean exits (SIGKILL after a grace period).
    pub fn stop(&mut self) {
        for broker in &mut self.brokers {
            if broker.state == State::Paused {
                let _ = broker.signal("CONT");
            }
            if broker.child.is_some() {
                let _ = broker.signal("TERM");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for broker in &mut self.brokers {
            if let Some(mut child) = broker.child.take() {
                loop {
                    match child.try_wait() {
                        Ok(Some(_)) => break,
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        _ => {
                            let _ = child.kill();
                            let _ = child.wait();
                            break;
                        }
                    }
                }
            }
            broker.state = State::Killed;
        }
    }
}

impl Cluster {
    /// Delete the (stopped) brokers' data dirs, keeping their logs.
    pub fn remove_data(&self) {
        for broker in &self.brokers {
            let _ = std::fs::remove_dir_all(&broker.data_dir);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for broker in &mut self.brokers {
            if let Some(mut child) = broker.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
