//! `loadgen`: run a scenario against a PubG1 cluster and verify nothing acknowledged was lost.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use loadgen::http::Http;
use loadgen::run::{self, Options};
use loadgen::scenario::{Protocol, Scenario};
use loadgen::{summary, verify};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Load generator for PubG1: load, scripted broker faults, and a verifier"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a local 3-broker cluster, run the built-in demo scenario (load, leader kill and
    /// restart, follower kill, pause), verify, stop everything, and write the results.
    Demo {
        /// Where results, broker data and logs go.
        #[arg(long, default_value = "loadgen-out/demo")]
        out: PathBuf,
        /// Seconds of load (default: the scenario's 30).
        #[arg(long)]
        duration: Option<f64>,
        /// Speak this protocol to the brokers instead of the scenario's (`http` or `kafka`).
        #[arg(long, value_enum)]
        protocol: Option<Protocol>,
        #[arg(long)]
        broker_bin: Option<PathBuf>,
        /// No progress bar (for logs and CI).
        #[arg(long)]
        quiet: bool,
    },
    /// Run a scenario file, on a cluster it starts or on a running one (`--bootstrap`).
    Run {
        #[arg(long)]
        scenario: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
        /// HTTP base URLs of a running cluster, comma-separated (faults are then refused).
        #[arg(long, value_delimiter = ',')]
        bootstrap: Option<Vec<String>>,
        /// That cluster's Kafka listeners (host:port, comma-separated), for the Kafka protocol.
        /// Without --bootstrap: a run over Kafka alone (topics created with CreateTopics, the
        /// leaders' copy read back with Fetch), for any broker that speaks it.
        #[arg(long, value_delimiter = ',')]
        kafka_bootstrap: Option<Vec<String>>,
        /// Speak this protocol to the brokers instead of the scenario's (`http` or `kafka`).
        #[arg(long, value_enum)]
        protocol: Option<Protocol>,
        #[arg(long)]
        broker_bin: Option<PathBuf>,
        #[arg(long)]
        quiet: bool,
    },
    /// Run the seeded nemesis: a 3-broker cluster (12 partitions, RF=3, leaders keeping few
    /// Raft entries so snapshots happen), keyed and keyless producers, and a random fault
    /// timeline drawn from the seed (kill -9, restart, SIGSTOP/SIGCONT, isolate/heal, one broker
    /// down at a time); then every broker's copy is verified and compared.
    Chaos {
        /// Seed of the fault timeline: the same seed replays the same faults at the same times.
        #[arg(long)]
        seed: u64,
        /// Fault steps (each break and each repair counts one).
        #[arg(long, default_value_t = 100)]
        faults: usize,
        /// Speak this protocol to the brokers instead of the scenario's (`http` or `kafka`).
        #[arg(long, value_enum)]
        protocol: Option<Protocol>,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        broker_bin: Option<PathBuf>,
        #[arg(long)]
        quiet: bool,
    },
    /// Render report.html again from a finished run's result.json.
    Report {
        /// The run's output directory.
        #[arg(long)]
        run: PathBuf,
    },
    /// Verify a finished run's acknowledgements (its acks.csv) against a running cluster.
    Verify {
        /// The run's output directory.
        #[arg(long)]
        run: PathBuf,
        /// The scenario the run used (for its topics).
        #[arg(long)]
        scenario: PathBuf,
        #[arg(long, value_delimiter = ',', required = true)]
        bootstrap: Vec<String>,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Ok(passed): exit 0 only when nothing acknowledged was lost, duplicated or moved.
fn real_main() -> Result<bool> {
    let cli = Cli::parse();
    let options = match cli.command {
        Command::Demo {
            out,
            duration,
            protocol,
            broker_bin,
            quiet,
        } => {
            let mut scenario = Scenario::parse(loadgen::scenario::DEMO)?;
            if let Some(seconds) = duration {
                // Shorter runs keep the timeline's shape: every fault at the same fraction.
                let scale = seconds / scenario.duration_s;
                for fault in &mut scenario.faults {
                    fault.at_s *= scale;
                }
                scenario.duration_s = seconds;
            }
            scenario.protocol = protocol.unwrap_or(scenario.protocol);
            Options {
                name: "demo (built in)".into(),
                scenario,
                out,
                bootstrap: None,
                kafka_bootstrap: None,
                broker_bin,
                progress: !quiet,
                seed: None,
            }
        }
        Command::Chaos {
            seed,
            faults,
            protocol,
            out,
            broker_bin,
            quiet,
        } => {
            let mut scenario =
                Scenario::parse(loadgen::scenario::CHAOS)?.with_nemesis(seed, faults);
            scenario.protocol = protocol.unwrap_or(scenario.protocol);
            Options {
                name: format!("chaos (seed {seed}, {faults} faults)"),
                scenario,
                out: out.unwrap_or_else(|| PathBuf::from(format!("loadgen-out/chaos-{seed}"))),
                bootstrap: None,
                kafka_bootstrap: None,
                broker_bin,
                progress: !quiet,
                seed: Some(seed),
            }
        }
        Command::Run {
            scenario,
            out,
            bootstrap,
            kafka_bootstrap,
            protocol,
            broker_bin,
            quiet,
        } => {
            let name = scenario
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "scenario".into());
            let mut scenario = Scenario::load(&scenario)?;
            scenario.protocol = protocol.unwrap_or(scenario.protocol);
            Options {
                out: out.unwrap_or_else(|| PathBuf::from("loadgen-out").join(&name)),
                name,
                scenario,
                bootstrap,
                kafka_bootstrap,
                broker_bin,
                progress: !quiet,
                seed: None,
            }
        }
        Command::Report { run } => {
            let text = std::fs::read_to_string(run.join("result.json"))
                .with_context(|| format!("reading {}", run.join("result.json").display()))?;
            let result: run::RunResult = serde_json::from_str(&text)?;
            std::fs::write(run.join("report.html"), loadgen::report::render(&result)?)?;
            print!("{}", summary::render(&result));
            return Ok(result.passed());
        }
        Command::Verify {
            run,
            scenario,
            bootstrap,
        } => {
            let scenario = Scenario::load(&scenario)?;
            let acks = run::load_acks(&run.join("acks.csv"))?;
            let http = Http::new(Duration::from_secs(10));
            let topic = scenario.producer_topic();
            let log = loadgen::readback::read_topic(&http, &bootstrap, &topic, &scenario.topics)
                .context("reading the topic back")?;
            let verdict = verify::verify(&acks, &log);
            print!("{}", summary::verdict(&verdict));
            return Ok(verdict.is_clean());
        }
    };
    let result = run::run(&options)?;
    print!("{}", summary::render(&result));
    println!(
        "written             {} and {}",
        options.out.join("result.json").display(),
        options.out.join("report.html").display()
    );
    Ok(result.passed())
}
