//! New TCP connections per second, the load source NAT pays for per flow: a server that
//! answers one line per connection and waits for the client to close first (so the server
//! keeps no TIME_WAIT), and a client that opens, asks, reads and closes connections
//! back to back from several threads for a fixed time. Both are threads that joined the
//! namespaces (setns); every wait is bounded.

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::echo::set_accept_timeout;
use crate::icmp::{in_netns, join_netns_thread, spawn_in_netns};

/// How long any one connect, read or write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// A server in a namespace: each connection gets `ok\n` for its line.
pub struct ConnServer {
    pub addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl ConnServer {
    /// Binds `addr` in `ns` and serves with `workers` threads.
    pub fn start(ns: &str, addr: SocketAddrV4, workers: usize) -> Result<ConnServer> {
        let listener = in_netns(ns, move || Ok(TcpListener::bind(addr)?))
            .with_context(|| format!("binding {addr} in {ns}"))?;
        // Accepts wake up now and then to look at the stop flag.
        set_accept_timeout(&listener, Duration::from_millis(100))?;
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers)
            .map(|_| {
                let listener = listener.try_clone().expect("a listener clone");
                let stop = stop.clone();
                std::thread::spawn(move || serve(&listener, &stop))
            })
            .collect();
        Ok(ConnServer {
            addr,
            stop,
            workers,
        })
    }
}

impl Drop for ConnServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

fn serve(listener: &TcpListener, stop: &AtomicBool) {
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut stream, _)) = listener.accept() else {
            continue;
        };
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        if matches!(stream.read(&mut buf), Ok(n) if n > 0) {
            let _ = stream.write_all(b"ok\n");
            // The client closes first: wait for its FIN.
            let _ = stream.read(&mut buf);
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnRate {
    /// Completed connections (connect, line, answer, close) per second.
    pub per_second: f64,
    pub completed: u64,
    /// Connections that failed (refused, timed out, reset).
    pub failed: u64,
    /// The first few failures: when (since the start), at which step, and why.
    pub failures: Vec<String>,
}

/// Failures described per client thread.
const DESCRIBED_FAILURES: usize = 2;

/// Opens connections from `ns` to `dst` for `seconds` from `parallel` threads.
pub fn connection_rate(
    ns: &str,
    dst: SocketAddrV4,
    seconds: u32,
    parallel: usize,
) -> Result<ConnRate> {
    let duration = Duration::from_secs(u64::from(seconds));
    let started = Instant::now();
    let handles: Vec<_> = (0..parallel)
        .map(|_| {
            spawn_in_netns(ns, move || {
                let (mut completed, mut failed, mut failures) = (0u64, 0u64, Vec::new());
                let deadline = Instant::now() + duration;
                let mut buf = [0u8; 16];
                while Instant::now() < deadline {
                    let done = (|| -> std::result::Result<(), (&str, std::io::Error)> {
                        let mut stream = TcpStream::connect_timeout(&dst.into(), IO_TIMEOUT)
                            .map_err(|e| ("connect", e))?;
                        stream
                            .set_read_timeout(Some(IO_TIMEOUT))
                            .map_err(|e| ("setsockopt", e))?;
                        stream.write_all(b"hi\n").map_err(|e| ("write", e))?;
                        match stream.read(&mut buf) {
                            Ok(0) => Err(("read", std::io::ErrorKind::UnexpectedEof.into())),
                            Ok(_) => Ok(()),
                            Err(e) => Err(("read", e)),
                        }
                    })();
                    match done {
                        Ok(()) => completed += 1,
                        Err((step, e)) => {
                            failed += 1;
                            if failures.len() < DESCRIBED_FAILURES {
                                let at = started.elapsed().as_secs_f64();
                                failures.push(format!("{step} at {at:.2} s: {e}"));
                            }
                        }
                    }
                }
                Ok((completed, failed, failures))
            })
        })
        .collect();
    let mut completed = 0;
    let mut failed = 0;
    let mut failures = Vec::new();
    for handle in handles {
        let (c, f, described) = join_netns_thread(ns, handle)?;
        completed += c;
        failed += f;
        failures.extend(described);
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(ConnRate {
        per_second: completed as f64 / elapsed,
        completed,
        failed,
        failures,
    })
}
