//! A listening port claimed before the broker opens anything, and listened on only once the
//! broker can serve.
//!
//! A port some process listens on stops start-up before storage is opened, while a client that
//! connects during recovery is refused at once (and tries another broker) instead of waiting in
//! an accept queue nobody drains yet. Linux lets two `SO_REUSEADDR` sockets bind one port while
//! neither listens, so of two brokers claiming one port at the same moment the second learns it
//! at [`ClaimedPort::listen`]: still a clear start-up error, after which it closes its storage.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Pending connections a listener queues, as actix-web's own `bind` does.
const BACKLOG: i32 = 1024;

/// A port bound but not yet listening.
#[derive(Debug)]
pub struct ClaimedPort {
    socket: Socket,
}

impl ClaimedPort {
    /// Bind `address` with `SO_REUSEADDR` (as std, tokio and actix-web do: a broker restarted
    /// after kill -9 binds its port although old connections linger in TIME_WAIT). A port a
    /// socket listens on is refused with [`io::ErrorKind::AddrInUse`].
    pub fn claim(address: SocketAddr) -> io::Result<Self> {
        let socket = Socket::new(
            Domain::for_address(address),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.bind(&address.into())?;
        Ok(Self { socket })
    }

    /// The address bound (with the port the kernel chose when claimed as port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an internet socket"))
    }

    /// Start accepting connections: a non-blocking listener for tokio or actix-web.
    pub fn listen(self) -> io::Result<TcpListener> {
        self.socket.listen(BACKLOG)?;
        self.socket.set_nonblocking(true)?;
        Ok(self.socket.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpStream;

    #[test]
    fn a_port_something_listens_on_is_refused() {
        let other = TcpListener::bind("127.0.0.1:0").expect("binds");
        let address = other.local_addr().expect("bound");
        let taken = ClaimedPort::claim(address).expect_err("a listening port is refused");
        assert_eq!(taken.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn two_claims_of_one_port_are_told_apart_when_the_second_listens() {
        let first = ClaimedPort::claim("127.0.0.1:0".parse().expect("address")).expect("claims");
        let second =
            ClaimedPort::claim(first.local_addr().expect("bound")).expect("Linux allows it");
        let _listening = first.listen().expect("the first listens");
        let late = second.listen().expect_err("the second cannot");
        assert_eq!(late.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn a_claimed_port_refuses_connections_until_it_listens_and_is_claimed_again_after_a_kill() {
        let claimed = ClaimedPort::claim("127.0.0.1:0".parse().expect("address")).expect("claims");
        let address = claimed.local_addr().expect("bound");
        assert_ne!(address.port(), 0);
        let early = TcpStream::connect(address).expect_err("nothing listens yet");
        assert_eq!(early.kind(), io::ErrorKind::ConnectionRefused);

        let listener = claimed.listen().expect("listens");
        listener.set_nonblocking(false).expect("blocking");
        let mut client = TcpStream::connect(address).expect("connects once listening");
        let (accepted, _) = listener.accept().expect("accepts");
        let taken = ClaimedPort::claim(address).expect_err("a listening port is held");
        assert_eq!(taken.kind(), io::ErrorKind::AddrInUse);

        // The broker's side closes first (as a killed broker's kernel does), leaving the
        // accepted connection in TIME_WAIT on the port: a restarted broker still claims it.
        drop(accepted);
        assert_eq!(client.read(&mut [0; 1]).expect("reads end of stream"), 0);
        drop(client);
        drop(listener);
        let again = ClaimedPort::claim(address).expect("claims a port its old connections hold");
        assert_eq!(again.local_addr().expect("bound"), address);
    }
}
