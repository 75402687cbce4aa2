//! A broker that cannot claim its ports stops at start-up with an error naming the address, having
//! opened and written nothing, and exits cleanly (no crash on the way out).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pubg1_tests::{broker_binary, free_port, wait_until, BrokerProcess, StartError};

/// Kills the process by PID when dropped, so a failing test leaves nothing running.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_taken_http_port_stops_start_up_before_anything_is_written() -> anyhow::Result<()> {
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let http = taken.local_addr()?;
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("broker");
    let log = std::fs::File::create(dir.path().join("broker.log"))?;
    let mut broker = Reaped(
        Command::new(broker_binary()?)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--http")
            .arg(http.to_string())
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?,
    );
    let status = wait_until(Duration::from_secs(30), "the broker to exit", || {
        broker.0.try_wait().ok().flatten()
    })?;
    let output = std::fs::read_to_string(dir.path().join("broker.log"))?;
    assert_eq!(
        status.code(),
        Some(1),
        "exits with an error, no signal: {output}"
    );
    assert!(
        output.contains(&format!("binding HTTP to {http}"))
            && output.contains("Address already in use"),
        "names the address and the reason: {output}"
    );
    assert!(!data_dir.exists(), "nothing was opened or written");
    Ok(())
}

#[test]
fn a_taken_peer_port_stops_start_up_naming_the_address() -> anyhow::Result<()> {
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let peer = taken.local_addr()?;
    let (two, three) = (free_port()?, free_port()?);
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("broker-1");
    let args = vec![
        "--id".to_owned(),
        "1".to_owned(),
        "--peer".to_owned(),
        peer.to_string(),
        "--seeds".to_owned(),
        format!("1@{peer},2@127.0.0.1:{two},3@127.0.0.1:{three}"),
    ];
    let mut broker = BrokerProcess::spawn_with_args(&data_dir, args)?;
    let error = broker
        .wait_ready()
        .expect_err("a taken peer port stops start-up");
    let message = format!("{error:#}");
    assert!(StartError::lost_port_race(&error), "{message}");
    assert!(
        message.contains(&format!("binding the peer (Raft) listener to {peer}")),
        "names the address: {message}"
    );
    assert!(
        message.contains("exited during start-up with exit status: 1"),
        "exits with an error, no signal: {message}"
    );
    assert!(!data_dir.exists(), "nothing was opened or written");
    Ok(())
}
