//! `weft-cni`: the flannel-compatible CNI plugin. Install it as `flannel` in the CNI bin
//! directory; it serves `"type": "flannel"` conflist entries (see `weft::cni`).

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let outcome = weft::cni::run(
        |name| std::env::var(name).ok(),
        &mut std::io::stdin().lock(),
    );
    let mut stdout = std::io::stdout().lock();
    // The runtime reads the result (or the error result) from stdout; nothing else goes there.
    let written = stdout
        .write_all(outcome.stdout.as_bytes())
        .and_then(|()| stdout.flush());
    if outcome.success && written.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
