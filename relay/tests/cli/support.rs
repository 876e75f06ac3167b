use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::prelude::*;
pub use outbox::testing::{count, eventually};

pub const OUTBOX: &str = env!("CARGO_BIN_EXE_outbox");

/// A relay process whose stderr goes to a file the test can read.
pub struct RelayChild {
    pub child: Child,
    pub log: std::path::PathBuf,
}

impl RelayChild {
    pub fn spawn(database_url: &str, amqp_url: &str, exchange: &str, extra: &[&str]) -> Self {
        Self::spawn_with_env(database_url, amqp_url, exchange, extra, &[])
    }

    /// [`RelayChild::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        database_url: &str,
        amqp_url: &str,
        exchange: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut args = vec!["relay", "--exchange", exchange, "--metrics-addr", "off"];
        args.extend([
            "--poll-max",
            "20ms",
            "--backoff-initial",
            "50ms",
            "--backoff-max",
            "200ms",
        ]);
        args.extend(extra);
        Self::spawn_command(database_url, amqp_url, &args, env)
    }

    /// `outbox` with exactly `args` (no test defaults), logging at info.
    pub fn spawn_command(database_url: &str, amqp_url: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let log = std::env::temp_dir().join(format!("outbox-relay-{}.log", uuid::Uuid::now_v7().simple()));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(OUTBOX)
            .args(args)
            .env("DATABASE_URL", database_url)
            .env("AMQP_URL", amqp_url)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status (waits up to 30 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "relay ignored SIGTERM for 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RelayChild {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Runs `outbox ARGS` to completion: (exit code, stdout, stderr).
pub fn run_outbox(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = Command::new(OUTBOX)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Records ticks `0..per_aggregate` of `aggregates` counters, interleaved.
pub fn record_interleaved(conn: &mut PgConnection, aggregates: usize, per_aggregate: i64) -> usize {
    outbox::testing::record_interleaved(conn, aggregates, 0..per_aggregate).unwrap()
}
