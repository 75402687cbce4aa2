//! Network partitions, done for real: a TCP proxy on every directed broker-to-broker link.
//!
//! Broker i's `--seeds` name, for each other broker j, a proxy port of loadgen's that forwards to
//! j's real peer port; its own entry stays its real address. All Raft traffic from i to j then
//! crosses that proxy (a broker sends over its own outbound connection, one per peer), so cutting
//! the proxies in both directions between a broker and the rest isolates it: open connections are
//! shut down and new ones are dropped on accept, exactly as a partitioned network looks to the
//! brokers (connect or write fails, reconnect with backoff). Healing lets connections through
//! again. Clients' HTTP traffic does not cross the proxies.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;

/// (from broker, to broker) → the proxy port `from` dials to reach `to`.
pub type LinkPorts = HashMap<(u32, u32), u16>;

/// One directed link, from broker `from` to broker `to`.
#[derive(Debug)]
struct Link {
    from: u32,
    to: u32,
    blocked: Arc<AtomicBool>,
    /// Both ends of every connection through this link, to cut them.
    open: Arc<Mutex<Vec<TcpStream>>>,
}

/// Every proxy of a cluster; dropping it leaves the threads parked on dead sockets, harmless.
#[derive(Debug, Default)]
pub struct Proxies {
    links: Vec<Link>,
}

impl Proxies {
    /// Start a proxy from each broker to each other one. `peers` maps broker id → real peer
    /// address. Returns the proxies and, per broker, the port to use for each other broker.
    pub fn start(peers: &HashMap<u32, SocketAddr>) -> Result<(Self, LinkPorts)> {
        let mut links = Vec::new();
        let mut ports = HashMap::new();
        for (&from, _) in peers.iter() {
            for (&to, &target) in peers.iter() {
                if from == to {
                    continue;
                }
                let listener = TcpListener::bind("127.0.0.1:0")?;
                let port = listener.local_addr()?.port();
                let blocked = Arc::new(AtomicBool::new(false));
                let open = Arc::new(Mutex::new(Vec::new()));
                let (b, o) = (blocked.clone(), open.clone());
                std::thread::spawn(move || accept(listener, target, b, o));
                ports.insert((from, to), port);
                links.push(Link {
                    from,
                    to,
                    blocked,
                    open,
                });
            }
        }
        Ok((Self { links }, ports))
    }

    /// Cut every link to and from `broker`.
    pub fn isolate(&self, broker: u32) {
        for link in self
            .links
            .iter()
            .filter(|l| l.from == broker || l.to == broker)
        {
            link.blocked.store(true, Ordering::Release);
            if let Ok(mut open) = link.open.lock() {
                for stream in open.drain(..) {
                    let _ = stream.shutdown(Shutdown::Both);
                }
            }
        }
    }

    /// Let every link through again.
    pub fn heal(&self) {
        for link in &self.links {
            link.blocked.store(false, Ordering::Release);
        }
    }
}

fn accept(
    listener: TcpListener,
    target: SocketAddr,
    blocked: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
) {
    for incoming in listener.incoming() {
        let Ok(client) = incoming else { continue };
        if blocked.load(Ordering::Acquire) {
            drop(client); // the partition: connection accepted, then closed at once
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(1)) else {
            continue; // the peer is down: the caller sees the connection close
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let clones = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        );
        let (Ok(c1), Ok(s1), Ok(c2), Ok(s2)) = clones else {
            continue;
        };
        if let Ok(mut list) = open.lock() {
            list.retain(|s| s.peer_addr().is_ok());
            list.push(c2);
            list.push(s2);
        }
        std::thread::spawn(move || pipe(client, server));
        std::thread::spawn(move || pipe(s1, c1));
    }
}

/// Copy one direction until either side closes, then close both.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
