use std::path::Path;
use std::process::Command;

pub const BENCH: &str = env!("CARGO_BIN_EXE_outbox-bench");

/// Runs `outbox-bench ARGS` to completion: (exit code, stdout, stderr).
/// The relays it measures are the `outbox` beside it, which `cargo test
/// --workspace` builds into the same directory.
pub fn run_bench(args: &[&str]) -> (i32, String, String) {
    let outbox = Path::new(BENCH).with_file_name("outbox");
    assert!(
        outbox.is_file(),
        "{} is missing: build it with `cargo build -p outbox-relay` (or run `cargo test --workspace`)",
        outbox.display()
    );
    let output = Command::new(BENCH).args(args).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
