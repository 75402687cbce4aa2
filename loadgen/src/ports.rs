//! Ports for local brokers, picked where the kernel never hands one out by itself.
//!
//! `bind(0)` and outgoing connections take their ports from `ip_local_port_range` (32768–60999 by
//! default). A port found free there and released for a broker to bind can meanwhile go to any
//! process's `bind(0)` or `connect()`: another test's probe, a proxy, an HTTP client. And a killed
//! broker's ports stay free until it restarts on them. Below that range only explicit binds
//! compete, so a port is picked at random from 10000 up to the range's start, checked free by
//! binding it, and never handed out twice by one process.

use std::collections::BTreeSet;
use std::hash::{BuildHasher, RandomState};
use std::net::{Ipv4Addr, TcpListener};
use std::ops::Range;
use std::sync::Mutex;

use anyhow::{anyhow, bail, Result};

/// The lowest port picked: below it live well-known and registered services.
const FIRST: u16 = 10_000;
/// The kernel's default first ephemeral port, when /proc cannot be read.
const EPHEMERAL_START: u16 = 32_768;

/// Ports [`free_port`] has handed out in this process.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// The ports picked from: `FIRST` up to the first ephemeral port (at least 1,000 of them; with
/// an unusually low ephemeral range they overlap it, and the checks below still hold).
fn candidates() -> Range<u16> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(EPHEMERAL_START);
    FIRST..ephemeral_start.max(FIRST + 1_000)
}

/// A port on 127.0.0.1 that was free a moment ago, outside the kernel's ephemeral range, and not
/// handed out before by this process.
pub fn free_port() -> Result<u16> {
    let mut handed_out = HANDED_OUT
        .lock()
        .map_err(|_| anyhow!("the port registry is poisoned"))?;
    let Range { start, end } = candidates();
    let random = RandomState::new();
    for attempt in 0..10_000_u64 {
        let offset = random.hash_one(attempt) % u64::from(end - start);
        let port = start + u16::try_from(offset)?;
        if !handed_out.contains(&port) && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            handed_out.insert(port);
            return Ok(port);
        }
    }
    bail!("no free port in {start}..{end} after 10,000 tries")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_outside_the_ephemeral_range() {
        let range = candidates();
        let ports: Vec<u16> = (0..200)
            .map(|_| free_port().expect("a free port"))
            .collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "no port handed out twice");
        for port in ports {
            assert!(range.contains(&port), "{port} is in {range:?}");
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("still free");
        }
    }
}
