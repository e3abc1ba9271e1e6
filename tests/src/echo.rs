//! Request/reply over TCP and UDP between lab namespaces, reporting the addresses each side
//! saw: an [`EchoServer`] answers every request with the source address it came from, and
//! [`call`] checks the answer came back on the socket that sent the request (a connected
//! socket only accepts the address it connected to, so a reply whose source NAT was not
//! undone never arrives). Both run as threads that entered the namespace (setns), with
//! sockets bound there; every wait is bounded.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::icmp::in_netns;
use crate::kube_proxy::Protocol;

/// How long an echo server serves at most, whatever the test does.
const SERVER_LIFETIME: Duration = Duration::from_secs(300);
/// How often a server looks at its stop flag (the bound of each blocking accept or receive).
const STOP_CHECK: Duration = Duration::from_millis(50);

/// A server in a namespace answering `seen <ip>:<port>` (the request's source).
pub struct EchoServer {
    pub addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

enum Socket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl EchoServer {
    /// Binds `addr` (`0.0.0.0` for any address) inside namespace `ns` and serves.
    pub fn start(ns: &str, addr: SocketAddrV4, protocol: Protocol) -> Result<EchoServer> {
        let socket = in_netns(ns, move || {
            Ok(match protocol {
                Protocol::Tcp => {
                    let listener = TcpListener::bind(addr)?;
                    set_accept_timeout(&listener, STOP_CHECK)?;
                    Socket::Tcp(listener)
                }
                Protocol::Udp => {
                    let socket = UdpSocket::bind(addr)?;
                    socket.set_read_timeout(Some(STOP_CHECK))?;
                    Socket::Udp(socket)
                }
            })
        })
        .with_context(|| format!("binding {} {addr} in {ns}", protocol.name()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || serve(socket, &flag));
        Ok(EchoServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

/// SO_RCVTIMEO on a listening socket bounds a blocking accept(2) (std has no setter).
pub(crate) fn set_accept_timeout(listener: &TcpListener, timeout: Duration) -> Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    set_socket_option(listener, libc::SO_RCVTIMEO, &tv).context("setting the accept timeout")
}

/// A SOL_SOCKET option std has no setter for.
fn set_socket_option<T>(
    socket: &impl std::os::fd::AsRawFd,
    option: libc::c_int,
    value: &T,
) -> Result<()> {
    // SAFETY: setsockopt on a socket the caller owns, with a value of the option's type.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::from_ref(value).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

fn serve(socket: Socket, stop: &AtomicBool) {
    let started = Instant::now();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) && started.elapsed() < SERVER_LIFETIME {
        match &socket {
            // An accept that times out (SO_RCVTIMEO) is the moment to look at the stop flag.
            Socket::Tcp(listener) => {
                if let Ok((mut stream, peer)) = listener.accept() {
                    // Long enough for a held connection that idles while a test waits.
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
                    // Echo line by line until the client closes, each answer naming the peer.
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 2048];
                        while let Ok(n) = stream.read(&mut buf) {
                            if n == 0
                                || stream
                                    .write_all(format!("seen {peer}\n").as_bytes())
                                    .is_err()
                            {
                                break;
                            }
                        }
                    });
                }
            }
            Socket::Udp(socket) => {
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(format!("seen {peer}\n").as_bytes(), peer);
                }
            }
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What a request saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The client socket's own address.
    pub local: SocketAddrV4,
    /// The request's source as the server saw it.
    pub seen_by_server: SocketAddrV4,
}

/// Sends one request from namespace `ns` to `dst` and waits for the reply, within
/// `timeout` (UDP: the request is repeated every 300 ms until then).
pub fn call(ns: &str, dst: SocketAddrV4, protocol: Protocol, timeout: Duration) -> Result<Reply> {
    call_from(ns, Ipv4Addr::UNSPECIFIED, dst, protocol, timeout)
}

/// Like [`call`], from source address `src` (an address of `ns`; unspecified: the route's).
pub fn call_from(
    ns: &str,
    src: Ipv4Addr,
    dst: SocketAddrV4,
    protocol: Protocol,
    timeout: Duration,
) -> Result<Reply> {
    call_bound(ns, SocketAddrV4::new(src, 0), dst, protocol, timeout)
}

/// Like [`call`], from source port `port` (the route's address).
pub fn call_from_port(
    ns: &str,
    port: u16,
    dst: SocketAddrV4,
    protocol: Protocol,
    timeout: Duration,
) -> Result<Reply> {
    call_bound(
        ns,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
        dst,
        protocol,
        timeout,
    )
}

/// One request from the socket bound to `src` (port 0: any).
fn call_bound(
    ns: &str,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    protocol: Protocol,
    timeout: Duration,
) -> Result<Reply> {
    let ns_name = ns.to_string();
    in_netns(ns, move || match protocol {
        Protocol::Tcp => HeldConnection::connect(src, dst, timeout)
            .with_context(|| format!("in {ns_name}"))?
            .request(),
        Protocol::Udp => {
            let socket = UdpSocket::bind(src)?;
            // Connected: a datagram from any other source is not delivered to it.
            socket.connect(dst)?;
            socket.set_read_timeout(Some(Duration::from_millis(300)))?;
            let deadline = Instant::now() + timeout;
            let mut buf = [0u8; 256];
            loop {
                socket.send(b"hello\n")?;
                match socket.recv(&mut buf) {
                    Ok(n) => return reply(&buf[..n], socket.local_addr()?),
                    Err(e) if Instant::now() >= deadline => {
                        return Err(e)
                            .with_context(|| format!("no UDP reply from {dst} in {ns_name}"))
                    }
                    Err(_) => {}
                }
            }
        }
    })
}

/// A TCP connection to an [`EchoServer`] kept open, for requests at the test's pace.
pub struct HeldConnection {
    stream: TcpStream,
    dst: SocketAddrV4,
}

impl HeldConnection {
    /// Connects from namespace `ns`, source port `port` (0: any), within `timeout` (which
    /// also bounds each request's answer).
    pub fn open(
        ns: &str,
        port: u16,
        dst: SocketAddrV4,
        timeout: Duration,
    ) -> Result<HeldConnection> {
        let src = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
        in_netns(ns, move || HeldConnection::connect(src, dst, timeout))
            .with_context(|| format!("in {ns}"))
    }

    fn connect(src: SocketAddrV4, dst: SocketAddrV4, timeout: Duration) -> Result<Self> {
        let stream = connect(src, dst, timeout)
            .with_context(|| format!("TCP connect from {src} to {dst}"))?;
        stream.set_read_timeout(Some(timeout))?;
        Ok(HeldConnection { stream, dst })
    }

    /// One line out, its answer back.
    pub fn request(&mut self) -> Result<Reply> {
        self.stream.write_all(b"hello\n")?;
        let mut buf = [0u8; 256];
        let n = self
            .stream
            .read(&mut buf)
            .with_context(|| format!("TCP reply from {}", self.dst))?;
        reply(&buf[..n], self.stream.local_addr()?)
    }

    /// Closes with a reset (SO_LINGER 0): no TIME_WAIT, so the source port can be bound
    /// again at once, as a client reusing its ports would.
    pub fn reset(self) -> Result<()> {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        set_socket_option(&self.stream, libc::SO_LINGER, &linger).context("setting SO_LINGER")
    }
}

/// A TCP connection from `src` (port 0: any), bounded by `timeout`.
fn connect(src: SocketAddrV4, dst: SocketAddrV4, timeout: Duration) -> Result<TcpStream> {
    if src == SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0) {
        return Ok(TcpStream::connect_timeout(&dst.into(), timeout)?);
    }
    // std has no bind-before-connect: a socket from libc, handed to std once connected.
    // SAFETY: plain socket calls on a descriptor this function owns until into TcpStream.
    unsafe {
        use std::os::fd::FromRawFd;
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let sockaddr = |addr: SocketAddrV4| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sockaddr(src);
        if libc::bind(fd, std::ptr::from_ref(&local).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error()).context(format!("binding {src}"));
        }
        // Bounded: SO_SNDTIMEO limits a blocking connect.
        stream.set_write_timeout(Some(timeout))?;
        let remote = sockaddr(dst);
        if libc::connect(fd, std::ptr::from_ref(&remote).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        stream.set_write_timeout(None)?;
        Ok(stream)
    }
}

fn reply(data: &[u8], local: std::net::SocketAddr) -> Result<Reply> {
    let text = String::from_utf8_lossy(data);
    let Some(seen) = text.trim().strip_prefix("seen ") else {
        bail!("unexpected reply {text:?}");
    };
    let std::net::SocketAddr::V4(local) = local else {
        bail!("an IPv6 socket");
    };
    Ok(Reply {
        local,
        seen_by_server: seen.parse().with_context(|| format!("reply {text:?}"))?,
    })
}

/// Connects from `ns` to `dst` (an [`EchoServer`]) and exchanges `lines` lines on that one
/// connection, one every `every`; every line must be answered (a reset or a lost answer
/// fails it). Returns how many were exchanged; bounded by `max`.
pub fn converse(
    ns: &str,
    dst: SocketAddrV4,
    lines: u64,
    every: Duration,
    max: Duration,
) -> Result<u64> {
    in_netns(ns, move || {
        let mut stream = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5))
            .with_context(|| format!("connecting to {dst}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let started = Instant::now();
        let mut buf = [0u8; 256];
        for exchanged in 0..lines {
            if started.elapsed() >= max {
                bail!("only {exchanged} of {lines} exchanges in {max:?}");
            }
            stream
                .write_all(b"ping\n")
                .with_context(|| format!("write after {exchanged} exchanges"))?;
            let n = stream
                .read(&mut buf)
                .with_context(|| format!("read after {exchanged} exchanges"))?;
            if n == 0 {
                bail!("the server closed the connection after {exchanged} exchanges");
            }
            // Paces the conversation, so that it spans the moment the endpoint is learned.
            std::thread::sleep(every);
        }
        Ok(lines)
    })
}

/// Asks `dst` (a UDP [`EchoServer`]) once from each source port of `ports`, from namespace
/// `ns`, waiting up to a second for each answer on the socket that asked: a burst of new
/// flows, as a stub resolver asking from a fresh port per query makes. Returns how many
/// were answered (an answer whose translation was not undone never reaches the socket).
pub fn udp_queries(ns: &str, dst: SocketAddrV4, ports: std::ops::Range<u16>) -> Result<usize> {
    in_netns(ns, move || {
        let mut answered = 0;
        for port in ports {
            if ask_once(port, dst, Duration::from_secs(1))?.is_some() {
                answered += 1;
            }
        }
        Ok(answered)
    })
    .with_context(|| format!("in {ns}"))
}

/// What a [`dns_like_load`] saw.
#[derive(Clone, Debug, Default)]
pub struct QueryLoad {
    pub sent: u64,
    pub answered: u64,
    /// Queries sent per second, as achieved.
    pub per_second: f64,
    /// The source addresses the server saw.
    pub seen: std::collections::BTreeSet<Ipv4Addr>,
}

impl QueryLoad {
    pub fn answered_percent(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        100.0 * self.answered as f64 / self.sent as f64
    }
}

/// A DNS-like load from namespace `ns`: `rate` queries a second for `seconds`, each from a
/// fresh socket (a new source port the kernel picks, so a new flow each), each answer
/// awaited up to half a second on the socket that asked, as a stub resolver or a
/// forwarding cache miss does. Queries go out on schedule whether or not earlier ones were
/// answered. Bounded: at most `rate * seconds` queries, in `seconds` plus half a second.
pub fn dns_like_load(ns: &str, dst: SocketAddrV4, rate: u32, seconds: u32) -> Result<QueryLoad> {
    const ANSWER_WAIT: Duration = Duration::from_millis(500);
    in_netns(ns, move || {
        let total = u64::from(rate) * u64::from(seconds);
        let every = Duration::from_secs(1) / rate.max(1);
        let started = Instant::now();
        let mut load = QueryLoad::default();
        let mut waiting: std::collections::VecDeque<(UdpSocket, Instant)> = Default::default();
        let mut buf = [0u8; 256];
        let mut sending_took = None;
        while load.sent < total || !waiting.is_empty() {
            while load.sent < total && every * load.sent as u32 <= started.elapsed() {
                let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
                socket.connect(dst)?;
                socket.set_nonblocking(true)?;
                socket
                    .send(b"query\n")
                    .with_context(|| format!("sending to {dst}"))?;
                load.sent += 1;
                waiting.push_back((socket, Instant::now()));
                if load.sent == total {
                    sending_took = Some(started.elapsed());
                }
            }
            waiting.retain(|(socket, asked)| match socket.recv(&mut buf) {
                Ok(n) => {
                    if let Ok(r) = reply(&buf[..n], socket.local_addr().expect("bound")) {
                        load.answered += 1;
                        load.seen.insert(*r.seen_by_server.ip());
                    }
                    false
                }
                Err(_) => asked.elapsed() < ANSWER_WAIT,
            });
            std::thread::sleep(Duration::from_micros(200));
        }
        // The rate the queries went out at: `sent` over the time to the last one, one
        // interval counted for the first.
        let took = sending_took.unwrap_or_else(|| started.elapsed()) + every;
        load.per_second = load.sent as f64 / took.as_secs_f64();
        Ok(load)
    })
    .with_context(|| format!("in {ns}"))
}

/// One query from source port `port` (0: any) to `dst`; the address the server saw, if an
/// answer came within `timeout`.
fn ask_once(port: u16, dst: SocketAddrV4, timeout: Duration) -> Result<Option<SocketAddrV4>> {
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("binding UDP port {port}"))?;
    socket.connect(dst)?;
    socket.set_read_timeout(Some(timeout))?;
    socket
        .send(b"query\n")
        .with_context(|| format!("sending to {dst} from port {port}"))?;
    let mut buf = [0u8; 256];
    match socket.recv(&mut buf) {
        Ok(n) => Ok(reply(&buf[..n], socket.local_addr()?)
            .ok()
            .map(|r| r.seen_by_server)),
        Err(_) => Ok(None),
    }
}
