//! The HTTP API keeps its own contract: schemathesis, with every check it has, generates requests
//! from `/openapi.json` (valid and invalid) against a lone broker, and every response must match
//! the document: no 5xx, statuses and bodies as declared, valid input accepted, invalid input
//! refused, 405 with `Allow` for a method a path does not have. What schemathesis is told beyond
//! its defaults is in `tests/schemathesis/schemathesis.toml`, with the reason for each line.

use std::process::Command;

use pubg1_tests::{create_topic, BrokerProcess, Client};

/// Fixed, so a failure can be rerun exactly (`st run … --seed 1`).
const SEED: &str = "1";
/// Cases per operation and phase: enough to reach every declared status of the 27 operations
/// (about 2,600 cases in all, 14 s here), small enough for the gate on two cores.
const MAX_EXAMPLES: &str = "40";

#[test]
fn schemathesis_finds_every_response_as_the_openapi_document_says() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Long polls may wait up to the broker's `fetch_wait_ms_max`, which the document states;
    // a 1 s bound (instead of 30 s) keeps generated long polls from dominating the run.
    let broker = BrokerProcess::start(
        &dir.path().join("broker"),
        &[("PUBG1_FETCH_WAIT_MS_MAX", "1000")],
    )?;
    let http = Client::new();
    // Something for generated requests to find besides 404s.
    create_topic(&http, &broker, "t", 2)?;
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemathesis/schemathesis.toml"
    );
    let output = Command::new(schemathesis())
        .args(["--config-file", config, "--no-color", "run"])
        .arg(broker.url("/openapi.json"))
        .args([
            "--checks",
            "all",
            "--seed",
            SEED,
            "--max-examples",
            MAX_EXAMPLES,
        ])
        .args(["--generation-database", "none", "--workers", "2"])
        .args(["--request-timeout", "10"])
        .current_dir(dir.path())
        .output()
        .map_err(|e| {
            anyhow::anyhow!("running schemathesis (st; scripts/ensure-deps installs it): {e}")
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis found responses that break the document:\n{stdout}\n{stderr}"
    );
    // A run that tested nothing would also exit 0. Its summary: "2614 generated, 2614 passed".
    let summary = stdout
        .lines()
        .find(|l| l.contains(" generated,"))
        .unwrap_or_default();
    let cases: u64 = summary
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or(0);
    assert!(
        cases >= 1000,
        "schemathesis ran {cases} cases, expected hundreds:\n{stdout}"
    );
    // The broker is still up and serving after everything schemathesis sent.
    assert_eq!(http.get(&broker.url("/ready"))?.status, 200);
    Ok(())
}

/// `st` on the PATH, or where a user's pip put it (scripts/ensure-deps installs it).
fn schemathesis() -> std::path::PathBuf {
    let user =
        std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".local/bin/st"));
    match user {
        Some(path) if path.exists() && !on_path("st") => path,
        _ => "st".into(),
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}
