//! Harness for PubG1's process-level tests: real `pubg1-broker` processes on 127.0.0.1, real
//! RocksDB data dirs, real `kill -9`.
//!
//! - [`BrokerProcess`] starts a broker on a free port with its own data dir, waits for `/ready`
//!   with a deadline, and kills it by PID when dropped, so a failing test never leaves one behind.
//! - [`Client`] is a small blocking HTTP client that never treats an error status as a transport
//!   error: tests assert on statuses and JSON bodies.
//! - [`wait_until`] is the only way tests wait: a condition polled until a deadline.
//! - [`workload`] holds the publish-then-verify job more than one test runs.

pub mod cluster;
pub mod groups;
pub mod streams;
pub mod workload;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// How long a broker may take from spawn to `/ready`; a cold RocksDB open is well under a second.
pub const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a broker may take to exit after SIGTERM.
pub const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// Interval between checks of a [`wait_until`] condition.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Poll `check` until it returns `Some`, failing with `what` once `deadline` has passed.
pub fn wait_until<T>(
    deadline: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T> {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if started.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The `pubg1-broker` binary: `PUBG1_BROKER_BIN`, else the one cargo built beside this test.
pub fn broker_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("PUBG1_BROKER_BIN") {
        return Ok(PathBuf::from(path));
    }
    workspace_binary("pubg1-broker")
}

/// A binary of this workspace that cargo built beside this test (`cargo build --release
/// --workspace --bins` first, as scripts/test does).
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    // Test executables live in target/<profile>/deps; binaries in target/<profile>.
    let exe = std::env::current_exe().context("locating the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test path {}", exe.display()))?;
    let binary = profile_dir.join(name);
    if !binary.exists() {
        bail!(
            "{} is missing: build it first (cargo build --release --workspace --bins)",
            binary.display()
        );
    }
    Ok(binary)
}

/// A port on 127.0.0.1 that was free a moment ago, outside the kernel's ephemeral range (so no
/// `bind(0)` or outgoing connection takes it meanwhile) and never handed out twice by this
/// process (see `loadgen::ports`). A broker that still finds its port taken fails with
/// [`StartError::address_in_use`]: [`BrokerProcess::start`] then retries on a new HTTP port and
/// [`cluster::TestCluster::start`] on new ports altogether.
pub use loadgen::ports::free_port;

/// Why a broker did not become ready, with the log it wrote since it was spawned.
#[derive(Debug)]
pub struct StartError {
    /// The broker found its HTTP or peer address taken: another process won the race for a
    /// port [`free_port`] picked, and a retry on new ports is fair. Any other start-up failure is
    /// a defect and is never retried.
    pub address_in_use: bool,
    reason: String,
    log_tail: String,
}

impl StartError {
    /// Whether `error` is a start-up that failed only because a picked port was taken.
    pub fn lost_port_race(error: &anyhow::Error) -> bool {
        error
            .downcast_ref::<Self>()
            .is_some_and(|e| e.address_in_use)
    }

    /// Run `start` again (three attempts in all) while it fails only because a picked port was
    /// taken; return anything else it does at once.
    pub fn retry_port_races<T>(mut start: impl FnMut() -> Result<T>) -> Result<T> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match start() {
                Err(e) if Self::lost_port_race(&e) && attempts < 3 => continue,
                result => return result,
            }
        }
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; broker log tail:\n{}", self.reason, self.log_tail)
    }
}

impl std::error::Error for StartError {}

/// One running `pubg1-broker` process.
#[derive(Debug)]
pub struct BrokerProcess {
    child: Option<Child>,
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    /// The broker's stderr, appended across restarts, shown when start-up fails.
    log_path: PathBuf,
    /// Where in the log the current process's output starts.
    log_start: usize,
    env: Vec<(String, String)>,
    /// Extra command-line arguments (cluster flags), kept for restarts.
    args: Vec<String>,
    /// SIGSTOPped: alive but not answering.
    paused: bool,
    /// The Kafka listener's address, when the broker runs one (a new port at every start).
    pub kafka: Option<SocketAddr>,
    /// Whether to start it with a Kafka listener.
    with_kafka: bool,
}

impl BrokerProcess {
    /// Start a broker on `data_dir` with extra `PUBG1_*` environment settings, and wait for it to
    /// be ready.
    pub fn start(data_dir: &Path, env: &[(&str, &str)]) -> Result<Self> {
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let log_path = data_dir.with_extension("log");
        let mut broker = Self {
            child: None,
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.to_owned(),
            log_path,
            log_start: 0,
            env,
            args: Vec::new(),
            paused: false,
            kafka: None,
            with_kafka: false,
        };
        broker.restart()?;
        Ok(broker)
    }

    /// Spawn a broker with extra arguments without waiting for readiness (a cluster member is
    /// ready only once a majority runs); call [`BrokerProcess::wait_ready`] after starting all.
    pub fn spawn_with_args(data_dir: &Path, args: Vec<String>) -> Result<Self> {
        Self::spawn_with(data_dir, args, &[])
    }

    /// [`BrokerProcess::spawn_with_args`] with extra `PUBG1_*` environment settings too.
    pub fn spawn_with(data_dir: &Path, args: Vec<String>, env: &[(&str, &str)]) -> Result<Self> {
        Self::spawn_configured(data_dir, args, env, false)
    }

    /// [`BrokerProcess::spawn_with`], with a Kafka listener if `kafka`.
    pub fn spawn_configured(
        data_dir: &Path,
        args: Vec<String>,
        env: &[(&str, &str)],
        kafka: bool,
    ) -> Result<Self> {
        let mut broker = Self {
            child: None,
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.to_owned(),
            log_path: data_dir.with_extension("log"),
            log_start: 0,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            args,
            paused: false,
            kafka: None,
            with_kafka: kafka,
        };
        broker.spawn()?;
        Ok(broker)
    }

    /// Start the (stopped) broker again on the same data dir, on a new port.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("broker pid {} is still running", self.pid());
        }
        StartError::retry_port_races(|| self.spawn_once())
    }

    fn spawn_once(&mut self) -> Result<()> {
        self.spawn()?;
        self.wait_ready()
    }

    /// Start the process on a fresh HTTP port, keeping data dir, environment and arguments.
    pub fn spawn(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("broker pid {} is still running", self.pid());
        }
        let port = free_port()?;
        self.http = SocketAddr::from(([127, 0, 0, 1], port));
        self.kafka = if self.with_kafka {
            Some(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
        } else {
            None
        };
        let kafka: Vec<String> = self
            .kafka
            .iter()
            .flat_map(|address| ["--kafka".to_owned(), address.to_string()])
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        self.log_start = usize::try_from(log.metadata()?.len())?;
        let child = Command::new(broker_binary()?)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--http")
            .arg(self.http.to_string())
            .args(&self.args)
            .args(&kafka)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            // The harness's own setting, not the broker's (which reads every PUBG1_* variable).
            .env_remove("PUBG1_BROKER_BIN")
            .env("RUST_LOG", "info")
            // An error that stops start-up is printed whole, not buried under its backtrace
            // (panics keep theirs when RUST_BACKTRACE is set).
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning pubg1-broker")?;
        self.child = Some(child);
        Ok(())
    }

    /// Wait for `/ready` with a deadline; on failure the process is killed and its log shown.
    pub fn wait_ready(&mut self) -> Result<()> {
        let client = Client::new();
        let url = self.url("/ready");
        let ready = wait_until(START_DEADLINE, "the broker to become ready", || {
            if let Ok(Some(status)) = self.child.as_mut().map_or(Ok(None), Child::try_wait) {
                return Some(Err(anyhow!("broker exited during start-up with {status}")));
            }
            match client.get(&url) {
                Ok(reply) if reply.status == 200 => Some(Ok(())),
                _ => None,
            }
        });
        match ready.and_then(|r| r) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.kill9();
                let log = std::fs::read(&self.log_path).unwrap_or_default();
                let log = String::from_utf8_lossy(log.get(self.log_start..).unwrap_or_default());
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
                Err(anyhow::Error::new(StartError {
                    address_in_use: tail.contains("Address already in use"),
                    reason: format!("{e:#}"),
                    log_tail: tail,
                }))
            }
        }
    }

    /// Whether the process was started and has exited on its own (crashed, or stopped).
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(Some(_))))
    }

    /// Whether the process is running and not paused.
    pub fn is_running(&self) -> bool {
        self.child.is_some() && !self.paused
    }

    /// SIGSTOP: the process stays alive but stops answering anyone.
    pub fn pause(&mut self) -> Result<()> {
        self.signal("-STOP")?;
        self.paused = true;
        Ok(())
    }

    /// SIGCONT after [`BrokerProcess::pause`].
    pub fn resume(&mut self) -> Result<()> {
        self.signal("-CONT")?;
        self.paused = false;
        Ok(())
    }

    fn signal(&self, signal: &str) -> Result<()> {
        let pid = self
            .child
            .as_ref()
            .ok_or_else(|| anyhow!("broker is not running"))?
            .id();
        let status = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill {signal} {pid} failed");
        }
        Ok(())
    }

    /// PID of the running process (0 when stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// SIGKILL, then reap. No flush, no goodbye: what was acknowledged must already be on disk.
    pub fn kill9(&mut self) {
        self.paused = false;
        if let Some(mut child) = self.child.take() {
            // std's Child::kill sends SIGKILL on Unix.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for the process to exit on its own.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("broker is not running"))?;
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()?;
        if !sent.success() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("kill -TERM {} failed", child.id());
        }
        let status = wait_until(STOP_DEADLINE, "the broker to exit after SIGTERM", || {
            child.try_wait().ok().flatten()
        });
        if status.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A response: status, JSON body (Null when the body is empty or not JSON), raw text and headers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub text: String,
    pub content_type: String,
    pub retry_after: Option<String>,
    pub location: Option<String>,
}

impl Reply {
    /// The `error_code` of an error body.
    pub fn error_code(&self) -> Option<u64> {
        self.body.get("error_code").and_then(Value::as_u64)
    }

    /// Assert this is a PubG1 JSON error with `status` and `error_code`, and a real message.
    pub fn assert_error(&self, status: u16, error_code: u64, context: &str) {
        assert_eq!(self.status, status, "{context}: status; body {}", self.text);
        assert!(
            self.content_type.starts_with("application/json"),
            "{context}: content type {}",
            self.content_type
        );
        assert_eq!(
            self.error_code(),
            Some(error_code),
            "{context}: error_code; body {}",
            self.text
        );
        let message = self
            .body
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default();
        assert!(
            message.len() > 5,
            "{context}: error message should explain: {}",
            self.text
        );
    }
}

/// A blocking HTTP client that returns every status as a [`Reply`].
#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Redirects (a group's coordinator elsewhere) are for tests to see, not follow.
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(60)))
            .build();
        Self {
            agent: config.into(),
        }
    }

    pub fn get(&self, url: &str) -> Result<Reply> {
        reply(self.agent.get(url).call())
    }

    pub fn get_with_accept(&self, url: &str, accept: &str) -> Result<Reply> {
        reply(self.agent.get(url).header("Accept", accept).call())
    }

    pub fn delete(&self, url: &str) -> Result<Reply> {
        reply(self.agent.delete(url).call())
    }

    /// POST `body` with `content_type` (None: no Content-Type header at all).
    pub fn post(&self, url: &str, content_type: Option<&str>, body: &[u8]) -> Result<Reply> {
        let mut request = self.agent.post(url);
        if let Some(content_type) = content_type {
            request = request.header("Content-Type", content_type);
        }
        reply(request.send(body))
    }

    /// GET with a JSON body (REST Proxy v2 reads committed offsets that way).
    pub fn get_json(&self, url: &str, body: &Value) -> Result<Reply> {
        reply(
            self.agent
                .get(url)
                .header("Content-Type", "application/vnd.kafka.v2+json")
                .force_send_body()
                .send(body.to_string().as_bytes()),
        )
    }

    /// POST a JSON body as REST Proxy v2 clients do.
    pub fn post_v2(&self, url: &str, body: &Value) -> Result<Reply> {
        self.post(
            url,
            Some("application/vnd.kafka.v2+json"),
            body.to_string().as_bytes(),
        )
    }

    pub fn post_json(&self, url: &str, body: &Value) -> Result<Reply> {
        self.post(url, Some("application/json"), body.to_string().as_bytes())
    }
}

fn reply(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Reply> {
    let mut response = result?;
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header("content-type").unwrap_or_default();
    let retry_after = header("retry-after");
    let location = header("location");
    let text = response
        .body_mut()
        .with_config()
        .limit(256 * 1024 * 1024)
        .read_to_string()?;
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(Reply {
        status,
        body,
        text,
        content_type,
        retry_after,
        location,
    })
}

/// The value of a Prometheus sample (name and labels, as printed) on `broker`'s /metrics; 0 if
/// absent.
pub fn metric(broker: &BrokerProcess, sample: &str) -> Result<f64> {
    let text = Client::new().get(&broker.url("/metrics"))?.text;
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0))
}

/// Create a topic and assert it was created.
pub fn create_topic(
    client: &Client,
    broker: &BrokerProcess,
    name: &str,
    partitions: u32,
) -> Result<()> {
    let reply = client.post_json(
        &broker.url("/topics"),
        &serde_json::json!({"name": name, "partitions": partitions}),
    )?;
    if reply.status != 201 {
        bail!("creating topic {name}: {} {}", reply.status, reply.text);
    }
    Ok(())
}

/// High watermark of every partition of `topic`, from `GET /topics/{topic}`.
pub fn high_watermarks(client: &Client, broker: &BrokerProcess, topic: &str) -> Result<Vec<u64>> {
    let reply = client.get(&broker.url(&format!("/topics/{topic}")))?;
    if reply.status != 200 {
        bail!("describing {topic}: {} {}", reply.status, reply.text);
    }
    let partitions = reply.body["partitions"]
        .as_array()
        .ok_or_else(|| anyhow!("no partitions in {}", reply.text))?;
    partitions
        .iter()
        .map(|p| {
            p["high_watermark"]
                .as_u64()
                .ok_or_else(|| anyhow!("no high_watermark in {p}"))
        })
        .collect()
}
