//! Relay and worker processes for the scenarios: `outbox relay` of the
//! `outbox` beside this binary (else on PATH), and bench workers of this
//! same binary; their resident memory sampled from /proc.

use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

/// A running child: an `outbox relay` or a bench worker.
pub struct RelayProcess {
    child: Child,
    peak_rss_kib: u64,
}

impl RelayProcess {
    /// Starts `outbox relay` against `database_url` and `exchange`, with
    /// `extra` arguments. Its logs go to stderr only on errors.
    pub fn spawn(database_url: &str, amqp_url: &str, exchange: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let outbox = outbox_relay::executable::beside_or_on_path("outbox").context(
            "the relays measured are `outbox relay` processes, but `outbox` is neither beside this \
             executable nor on PATH; build both with `cargo build --release -p outbox-relay -p outbox-bench`",
        )?;
        let mut args = vec!["relay", "--exchange", exchange, "--metrics-addr", "off"];
        args.extend_from_slice(extra);
        Self::spawn_command(&outbox, &args, database_url, amqp_url, false)
    }

    /// Starts this binary with `args`, keeping its standard output for
    /// [`Self::take_stdout`].
    pub fn spawn_bench(args: &[&str], database_url: &str, amqp_url: &str) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this executable to start a child process")?;
        Self::spawn_command(&exe, args, database_url, amqp_url, true)
    }

    /// Starts `exe` with `args`; with `capture_stdout` its standard output
    /// is kept for [`Self::take_stdout`], otherwise discarded.
    fn spawn_command(
        exe: &Path,
        args: &[&str],
        database_url: &str,
        amqp_url: &str,
        capture_stdout: bool,
    ) -> anyhow::Result<Self> {
        let child = Command::new(exe)
            .args(args)
            .env("DATABASE_URL", database_url)
            .env("AMQP_URL", amqp_url)
            // OUTBOX_BENCH_RELAY_LOG=outbox=trace shows the children's timings.
            .env(
                "RUST_LOG",
                std::env::var("OUTBOX_BENCH_RELAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(if capture_stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start `{} {}`",
                    exe.display(),
                    args.first().copied().unwrap_or_default()
                )
            })?;
        Ok(Self {
            child,
            peak_rss_kib: 0,
        })
    }

    /// The child's standard output, when it was captured (once).
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Reads the current and peak resident set (KiB) and remembers the peak.
    pub fn sample_memory(&mut self) -> u64 {
        let (rss, peak) = memory_kib(&self.child.id().to_string());
        self.peak_rss_kib = self.peak_rss_kib.max(peak).max(rss);
        rss
    }

    /// Peak resident set seen, in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        self.peak_rss_kib as f64 / 1024.0
    }

    /// SIGKILL, as a crash would, and waits for the exit.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().context("cannot kill the child process")?;
        self.child.wait().context("cannot wait for the child process")?;
        Ok(())
    }

    /// Sends SIGTERM and waits (up to 30 s, then SIGKILL) for the exit.
    pub fn stop(mut self) -> anyhow::Result<f64> {
        self.sample_memory();
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self
                .child
                .try_wait()
                .context("cannot wait for the child process")?
                .is_some()
            {
                return Ok(self.peak_rss_mib());
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                anyhow::bail!("child process did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// (current, peak) resident set in KiB of process `pid` (`self` for this
/// one), from /proc; zeros when unreadable.
pub fn memory_kib(pid: &str) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
