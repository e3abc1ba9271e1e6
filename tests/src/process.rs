//! Long-running processes of the lab (etcd, agents, captures): started in a namespace,
//! stopped by PID, never outliving the lab.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A process started with `ip netns exec` (which execs it: the child's PID is the
/// process itself), its output appended to a log file.
#[derive(Debug)]
pub struct NetnsProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

/// Makes the kernel kill the child when the thread that spawned it ends, so a test
/// process that dies without unwinding leaves no agent or etcd behind.
fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches only the child being started.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl NetnsProcess {
    /// Starts `args` in namespace `ns` with `env`, stdout and stderr appended to `log`.
    /// Spawn from the thread that owns the lab: the process dies with that thread.
    pub fn spawn(
        name: &str,
        ns: &str,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> Result<Self> {
        let open_log = || {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .with_context(|| format!("cannot open log file {}", log.display()))
        };
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", ns])
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(open_log()?)
            .stderr(open_log()?);
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name} in {ns}: {}", args.join(" ")))?;
        Ok(NetnsProcess {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// None while running, else how it ended.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Sends `signal` and waits up to `grace` for the exit, then SIGKILLs and reaps.
    pub fn stop_with(&mut self, signal: libc::c_int, grace: Duration) {
        if self.exit_status().is_some() {
            return;
        }
        // SAFETY: kill(2) on the PID of our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exit_status().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        self.stop_with(libc::SIGTERM, Duration::from_secs(5));
    }

    /// SIGKILL at once, like a crash.
    pub fn kill(&mut self) {
        self.stop_with(libc::SIGKILL, Duration::ZERO);
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for NetnsProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `lines` lines of a log file (empty if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(file) = File::open(path) else {
        return String::new();
    };
    let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A packet capture (tcpdump, tshark) running in a namespace for a bounded time.
pub struct Capture {
    child: Child,
    description: String,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Capture {
    /// Starts `args` in `ns` under `timeout max`, and returns once its stderr printed a
    /// line containing `ready_marker` (the capture is open), at most 15 s.
    pub fn start(ns: &str, args: &[&str], ready_marker: &str, max: Duration) -> Result<Self> {
        let description = format!("ip netns exec {ns} {}", args.join(" "));
        let mut command = Command::new("timeout");
        command
            .args(["-k", "1", &format!("{:.3}", max.as_secs_f64())])
            .args(["ip", "netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start `{description}`"))?;
        let stdout = read_all_in_background(child.stdout.take().context("stdout pipe")?);
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr_pipe = child.stderr.take().context("stderr pipe")?;
        let marker = ready_marker.to_string();
        let (stderr_tx, stderr) = mpsc::channel();
        std::thread::spawn(move || {
            let mut seen = String::new();
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                if line.contains(&marker) {
                    let _ = ready_tx.send(());
                }
                seen.push_str(&line);
                seen.push('\n');
            }
            let _ = stderr_tx.send(seen);
        });
        let mut capture = Capture {
            child,
            description,
            stdout,
            stderr,
        };
        if ready_rx.recv_timeout(Duration::from_secs(15)).is_err() {
            capture.terminate();
            let stderr = capture
                .stderr
                .recv_timeout(Duration::from_secs(2))
                .unwrap_or_default();
            bail!(
                "`{}` did not report '{ready_marker}' within 15 s; stderr: {}",
                capture.description,
                stderr.trim()
            );
        }
        Ok(capture)
    }

    /// Whether the capture has ended (packet count reached or time bound passed).
    pub fn is_finished(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// Runs `trigger` repeatedly (the capture may open a moment after it reports ready)
    /// until the capture ends, then returns what it printed.
    pub fn finish_while(mut self, mut trigger: impl FnMut()) -> Result<String> {
        while !self.is_finished() {
            trigger();
        }
        self.finish()
    }

    /// Waits for the capture to end (its packet count reached or its time bound) and
    /// returns what it printed on stdout.
    pub fn finish(mut self) -> Result<String> {
        self.child
            .wait()
            .with_context(|| format!("waiting for `{}`", self.description))?;
        let out = self
            .stdout
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default();
        Ok(out)
    }

    /// Stops the capture now and returns what it printed so far.
    pub fn stop(mut self) -> String {
        self.terminate();
        self.stdout
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default()
    }

    /// SIGTERM to `timeout`, which passes it on to the capture (SIGKILL would orphan
    /// the capture); SIGKILL only if that does not end it within 3 s.
    fn terminate(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: kill(2) on our own `timeout` child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.terminate();
    }
}

fn read_all_in_background(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = String::new();
        let _ = pipe.read_to_string(&mut out);
        let _ = tx.send(out);
    });
    rx
}
