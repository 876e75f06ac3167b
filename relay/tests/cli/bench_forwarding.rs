//! `outbox bench` runs `outbox-bench` (its own package, so that `outbox`
//! links neither CHOM nor the test fixtures): found beside `outbox`, given
//! the same arguments and database, its exit status passed on; where there
//! is none, the error says how to build it.

use std::path::PathBuf;
use std::process::Command;

use crate::support::{OUTBOX, run_outbox};

/// `outbox-bench` beside `outbox`, where `cargo test --workspace` builds it.
fn bench_beside_outbox() -> PathBuf {
    let bench = std::path::Path::new(OUTBOX).with_file_name("outbox-bench");
    assert!(
        bench.is_file(),
        "{} is missing: build it with `cargo build -p outbox-bench` (or run `cargo test --workspace`)",
        bench.display()
    );
    bench
}

#[test]
fn outbox_bench_runs_the_outbox_bench_beside_it() {
    let bench = bench_beside_outbox();
    let own = Command::new(&bench).arg("--help").output().unwrap();
    assert!(own.status.success(), "{own:?}");
    let (status, stdout, stderr) = run_outbox(&["bench", "--help"], &[]);
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(stdout, String::from_utf8_lossy(&own.stdout));
    assert!(
        stdout.contains("drain") && stdout.contains("Example: outbox bench"),
        "{stdout}"
    );

    // Bad usage is the bench's (2); the global --database-url reaches it.
    let (status, _, stderr) = run_outbox(&["bench", "write", "--duration", "soon"], &[]);
    assert_eq!(status, 2, "{stderr}");
    assert!(stderr.contains("not a duration"), "{stderr}");
    let (status, _, stderr) = run_outbox(
        &[
            "--database-url",
            "postgres://nobody:bench-s3cret@127.0.0.1:5432/nothing",
            "bench",
            "write",
            "--duration",
            "1s",
        ],
        &[],
    );
    assert_eq!(status, 1, "{stderr}");
    assert!(
        stderr.contains("nobody"),
        "the bench did not get --database-url: {stderr}"
    );
    assert!(!stderr.contains("bench-s3cret"), "{stderr}");
}

#[test]
fn without_outbox_bench_the_error_says_how_to_build_it() {
    let dir = std::env::temp_dir().join(format!("outbox-alone-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let alone = dir.join("outbox");
    std::fs::copy(OUTBOX, &alone).unwrap();
    // Nothing beside it, and a PATH holding only its own directory.
    let output = Command::new(&alone)
        .args(["bench", "--help"])
        .env("PATH", &dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("outbox-bench")
            && stderr.contains("cargo build --release -p outbox-relay -p outbox-bench"),
        "{stderr}"
    );
}
