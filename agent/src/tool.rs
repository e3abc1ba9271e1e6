//! Running the node's firewall tools (iptables, nft, their `-save` variants) with a
//! deadline.
//!
//! A tool can hang: `iptables -w` waits on the xtables lock as long as another process
//! holds it, a wedged nf_tables transaction blocks `nft`. The agent must not hang with it
//! (its event loop, its probes), so every run here has a deadline past which the tool's
//! whole process group is killed and the run fails with an error naming the command and
//! the deadline.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Why a tool did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{program} not found in PATH")]
    NotFound { program: String },
    #[error("starting {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {} s: killed", deadline.as_secs_f64())]
    Timeout { command: String, deadline: Duration },
    #[error("running `{command}`: {source}")]
    Io {
        command: String,
        source: std::io::Error,
    },
}

/// Runs `program` with `args` (and `input` on stdin), and returns its output once it
/// exits; kills it (and every process it started in its process group) past `deadline`.
pub fn run(
    program: &str,
    args: &[&str],
    input: Option<&str>,
    deadline: Duration,
) -> Result<Output, RunError> {
    let command = || {
        format!("{program} {}", args.join(" "))
            .trim_end()
            .to_string()
    };
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a deadline kills what it started too (a shell's children).
        .process_group(0)
        .spawn()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => RunError::NotFound {
                program: program.to_string(),
            },
            _ => RunError::Spawn {
                program: program.to_string(),
                source,
            },
        })?;
    // Threads feed stdin and drain the pipes, so that a tool blocked on a full pipe (or not
    // reading) cannot hold up the deadline.
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        let text = text.to_string();
        thread::spawn(move || {
            let _ = stdin.write_all(text.as_bytes());
        });
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let pid = child.id() as libc::pid_t;
    let timeout = || RunError::Timeout {
        command: command(),
        deadline,
    };
    let status = match wait_until(&mut child, started + deadline) {
        Ok(Some(status)) => status,
        Ok(None) => {
            // SAFETY: kill(2) on the process group this run created (the child is its
            // leader and is not reaped yet, so the id is still ours).
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = child.wait();
            return Err(timeout());
        }
        Err(source) => {
            // SAFETY: as above.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = child.wait();
            return Err(RunError::Io {
                command: command(),
                source,
            });
        }
    };
    // A process the tool left behind may hold the pipes open: bounded by the deadline too.
    let remaining = |now: Instant| (started + deadline).saturating_duration_since(now);
    let stdout = stdout
        .recv_timeout(remaining(Instant::now()))
        .map_err(|_| timeout())?;
    let stderr = stderr
        .recv_timeout(remaining(Instant::now()))
        .map_err(|_| timeout())?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Waits for `child` until `until`: its status, or None when it is still running then.
fn wait_until(
    child: &mut std::process::Child,
    until: Instant,
) -> std::io::Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= until {
            return Ok(None);
        }
        thread::sleep(pause.min(until - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Reads `pipe` to its end on a thread; the bytes arrive on the channel.
fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        let _ = tx.send(bytes);
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_input_pass_through() {
        let out = run("cat", &[], Some("hello"), Duration::from_secs(5)).unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"hello");
    }

    #[test]
    fn a_tool_past_its_deadline_is_killed_with_its_children() {
        let started = Instant::now();
        // The shell's child `sleep` holds stdout: it must die with the group.
        let err = run(
            "sh",
            &["-c", "sleep 30; echo late"],
            None,
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "{err}");
        assert_eq!(
            err.to_string(),
            "`sh -c sleep 30; echo late` did not finish within 0.3 s: killed"
        );
    }

    #[test]
    fn a_missing_tool_is_named() {
        let err = run("weft-no-such-tool", &[], None, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, RunError::NotFound { .. }), "{err}");
        assert_eq!(err.to_string(), "weft-no-such-tool not found in PATH");
    }
}
