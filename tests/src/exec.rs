//! Running commands, optionally inside a network namespace, always bounded in time.

use std::io::Write;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Bound of a command that does not set its own.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A command line run through coreutils' `timeout` (and `ip netns exec` when a namespace
/// is given), so that no helper can hang a test.
#[derive(Debug, Clone)]
pub struct Cmd {
    args: Vec<String>,
    netns: Option<String>,
    timeout: Duration,
    stdin: Option<String>,
    env: Vec<(String, String)>,
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Cmd {
    /// `args[0]` is the program.
    pub fn new<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Cmd {
            args: args.into_iter().map(Into::into).collect(),
            netns: None,
            timeout: DEFAULT_TIMEOUT,
            stdin: None,
            env: Vec::new(),
        }
    }

    /// Runs the command inside network namespace `ns` (`ip netns exec`).
    pub fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_string());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn stdin(mut self, input: impl Into<String>) -> Self {
        self.stdin = Some(input.into());
        self
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_string(), value.into()));
        self
    }

    /// The command as a shell would show it, for error messages.
    pub fn display(&self) -> String {
        let ns = self
            .netns
            .as_ref()
            .map(|ns| format!("ip netns exec {ns} "))
            .unwrap_or_default();
        format!("{ns}{}", self.args.join(" "))
    }

    /// Runs the command and returns its output whatever its exit status.
    pub fn output(&self) -> Result<Output> {
        if self.args.is_empty() {
            bail!("empty command line");
        }
        let mut command = Command::new("timeout");
        // SIGTERM at the bound, SIGKILL one second later if the command ignores it.
        command.args(["-k", "1", &format!("{:.3}", self.timeout.as_secs_f64())]);
        if let Some(ns) = &self.netns {
            command.args(["ip", "netns", "exec", ns]);
        }
        command.args(&self.args);
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start `{}`", self.display()))?;
        if let Some(input) = &self.stdin {
            let mut pipe = child.stdin.take().context("stdin pipe")?;
            pipe.write_all(input.as_bytes())
                .with_context(|| format!("cannot write stdin of `{}`", self.display()))?;
        }
        let out = child
            .wait_with_output()
            .with_context(|| format!("cannot wait for `{}`", self.display()))?;
        Ok(Output {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs the command, fails unless it exits 0, and returns its stdout.
    pub fn run(&self) -> Result<String> {
        let out = self.output()?;
        if !out.status.success() {
            let why = if out.status.code() == Some(124) {
                format!("timed out after {:?}", self.timeout)
            } else {
                format!("failed ({})", out.status)
            };
            bail!(
                "`{}` {why}\nstdout: {}\nstderr: {}",
                self.display(),
                out.stdout.trim(),
                out.stderr.trim()
            );
        }
        Ok(out.stdout)
    }
}

/// Runs `args` (program first) in the root namespace's context, checked, default bound.
/// Only for commands that change nothing there (`ip netns add/delete/list` and readers).
pub fn run(args: &[&str]) -> Result<String> {
    Cmd::new(args.iter().copied()).run()
}

/// Runs `args` inside network namespace `ns`, checked, default bound.
pub fn run_in(ns: &str, args: &[&str]) -> Result<String> {
    Cmd::new(args.iter().copied()).netns(ns).run()
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes. Returns how long
/// it took; the error names `what` and the last error the condition returned.
pub fn wait_until<F>(what: &str, timeout: Duration, mut condition: F) -> Result<Duration>
where
    F: FnMut() -> Result<bool>,
{
    let start = Instant::now();
    let mut last_error = None;
    loop {
        match condition() {
            Ok(true) => return Ok(start.elapsed()),
            Ok(false) => {}
            Err(e) => last_error = Some(e),
        }
        if start.elapsed() >= timeout {
            let detail = last_error
                .map(|e| format!(" (last error: {e:#})"))
                .unwrap_or_default();
            bail!("timed out after {timeout:?} waiting for {what}{detail}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ip -n <ns> <args>`, with `args` one string split on whitespace (no quoting: lab
/// names and addresses have no spaces). `ip -n` only enters the namespace, so nothing
/// is created in the root namespace.
pub fn ip(ns: &str, args: &str) -> Result<String> {
    words_in("ip", ns, args)
}

/// `bridge -n <ns> <args>`, split like [`ip`].
pub fn bridge(ns: &str, args: &str) -> Result<String> {
    words_in("bridge", ns, args)
}

fn words_in(program: &str, ns: &str, args: &str) -> Result<String> {
    let mut line = vec![program, "-n", ns];
    line.extend(args.split_whitespace());
    run(&line)
}
