//! The relay and worker processes of the run, each in a slot that the
//! chaos loop kills (SIGKILL) and restarts, and one relay stopped past its
//! lease (SIGSTOP) and resumed: a zombie.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// How a slot starts its process.
#[derive(Clone)]
pub enum Role {
    /// `outbox relay`, through the proxies.
    Relay {
        database_url: String,
        amqp_url: String,
        exchange: String,
    },
    /// The test binary again, as a worker of both listeners.
    Worker { spec: serde_json::Value },
}

/// One process kept running under a stable slot name; every start gets a
/// fresh id (`<slot>-<generation>`), which is also the relay id.
pub struct Slot {
    pub name: String,
    role: Role,
    generation: u32,
    child: Option<Child>,
    pub id: String,
    logs: PathBuf,
    /// Starts, kills: for the report.
    pub kills: u32,
}

impl Slot {
    pub fn start(name: &str, role: Role, logs: PathBuf) -> Self {
        let mut slot = Self {
            name: name.to_owned(),
            role,
            generation: 0,
            child: None,
            id: String::new(),
            logs,
            kills: 0,
        };
        slot.spawn();
        slot
    }

    fn spawn(&mut self) {
        self.generation += 1;
        self.id = format!("{}-{}", self.name, self.generation);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{}.log", self.name)))
            .expect("log file");
        let mut command = match &self.role {
            Role::Relay {
                database_url,
                amqp_url,
                exchange,
            } => {
                let mut command = Command::new(env!("CARGO_BIN_EXE_outbox"));
                command
                    .args(["relay", "--exchange", exchange, "--metrics-addr", "off"])
                    .args(["--relay-id", &self.id, "--batch-size", "50"])
                    .args(["--lease", "2s", "--confirm-timeout", "1s"])
                    .args([
                        "--poll-max",
                        "20ms",
                        "--backoff-initial",
                        "50ms",
                        "--backoff-max",
                        "500ms",
                    ])
                    .args(["--max-attempts", "1000", "--retention", "1d"])
                    .env("DATABASE_URL", database_url)
                    .env("AMQP_URL", amqp_url);
                command
            }
            Role::Worker { spec } => {
                let mut spec = spec.clone();
                spec["worker_id"] = self.id.clone().into();
                let mut command = Command::new(std::env::current_exe().expect("test binary path"));
                command
                    .args([
                        "worker_process",
                        "--exact",
                        "--ignored",
                        "--nocapture",
                        "--test-threads=1",
                    ])
                    .env(crate::listeners::WORKER_ENV, spec.to_string());
                command
            }
        };
        let child = command
            .env("RUST_LOG", "warn,outbox=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a chaos process");
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and start again.
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.kills += 1;
        self.spawn();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`).
    pub fn freeze(&self, stop: bool) {
        if let Some(pid) = self.pid() {
            signal(pid, if stop { "-STOP" } else { "-CONT" });
        }
    }

    /// A process that exited on its own is a finding, not a kill.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// Resident memory (VmRSS) in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "-CONT");
        }
        self.kill();
    }
}

fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill").args([signal, &pid.to_string()]).status();
}
