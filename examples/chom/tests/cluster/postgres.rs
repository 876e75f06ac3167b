//! A Postgres primary and a streaming standby of the test's own, on free
//! loopback ports, removed with their files when the guard drops (also
//! when the test panics) and swept at the next start when a run was
//! killed.
//!
//! Both run the machine's Postgres binaries as the `postgres` user
//! (Postgres refuses to run as root): `initdb -A trust` into
//! `/tmp/outbox-pg/<pid>-<n>/primary`, then `pg_basebackup -R` into
//! `.../standby`, which streams from the primary asynchronously. The
//! machine's own cluster on 5432 is never touched: every process this
//! file signals is a postmaster whose data folder is one of ours.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::Integer;

use crate::fixture::{free_ports, processes, run_checked};

const BASE: &str = "/tmp/outbox-pg";

/// One Postgres server: its data folder and port.
#[derive(Debug, Clone)]
pub struct Server {
    pub data: PathBuf,
    pub port: u16,
}

impl Server {
    /// A URL to `database` on this server alone.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

/// The primary and its standby; after [`promote`](Self::promote) the
/// standby is the primary.
#[derive(Debug)]
pub struct PgPair {
    pub primary: Server,
    pub standby: Server,
    dir: PathBuf,
    bin: PathBuf,
    /// The primary's WAL sender, while stopped by
    /// [`pause_replication`](Self::pause_replication).
    paused_sender: Option<u32>,
}

impl PgPair {
    /// Sweeps what killed runs left, then starts a primary and a standby
    /// streaming from it.
    pub fn start() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        sweep();
        let dir = Path::new(BASE).join(format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ports = free_ports(2);
        let pair = Self {
            primary: Server {
                data: dir.join("primary"),
                port: ports[0],
            },
            standby: Server {
                data: dir.join("standby"),
                port: ports[1],
            },
            bin: postgres_bin(),
            dir,
            paused_sender: None,
        };
        run_checked(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pair.dir),
        );
        let primary = pair.primary.clone();
        pair.postgres(&format!(
            "initdb -A trust -U postgres -N -D '{}' >/dev/null",
            primary.data.display()
        ));
        let conf = format!(
            "\n# outbox cluster test\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = replica\nmax_wal_senders = 5\nhot_standby = on\nshared_buffers = 32MB\n",
            primary.port,
            pair.dir.display()
        );
        append(&primary.data.join("postgresql.conf"), &conf);
        append(
            &primary.data.join("pg_hba.conf"),
            "\nhost replication all 127.0.0.1/32 trust\n",
        );
        pair.pg_ctl_start(&primary);
        let standby = pair.standby.clone();
        pair.base_backup(&primary, &standby);
        pair.await_streaming(&primary, Duration::from_secs(30));
        pair
    }

    /// The libpq multi-host URL of `database` over both servers, primary
    /// first, connecting only to the one that accepts writes.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{database}?target_session_attrs=read-write",
            self.primary.port, self.standby.port
        )
    }

    /// Stops the primary's WAL sender (SIGSTOP): the primary goes on
    /// committing, and none of it reaches the standby, as behind a
    /// network that stopped carrying replication traffic.
    pub fn pause_replication(&mut self) {
        let mut conn = PgConnection::establish(&self.primary.url("postgres")).unwrap();
        #[derive(QueryableByName)]
        struct Pid {
            #[diesel(sql_type = Integer)]
            pid: i32,
        }
        let pid = diesel::sql_query("SELECT pid FROM pg_stat_replication")
            .get_result::<Pid>(&mut conn)
            .unwrap()
            .pid as u32;
        signal("STOP", pid);
        self.paused_sender = Some(pid);
    }

    /// Crashes the primary as a dying machine would: SIGKILL to its
    /// postmaster and every one of its processes (the stopped WAL sender
    /// too, so what it never sent is never sent).
    pub fn crash_primary(&mut self) {
        let Some(postmaster) = postmaster_of(&self.primary.data) else {
            panic!("no postmaster in {}", self.primary.data.display());
        };
        // The postmaster first: a postmaster that sees a child die
        // restarts the others.
        let children = children_of(postmaster);
        signal("KILL", postmaster);
        for pid in &children {
            signal("KILL", *pid);
        }
        self.paused_sender = None;
        let mut pids = children;
        pids.push(postmaster);
        let deadline = Instant::now() + Duration::from_secs(20);
        while pids.iter().any(|pid| alive(*pid)) {
            assert!(
                Instant::now() < deadline,
                "the primary's processes outlived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Its socket lock names a pid that may linger as a zombie (this
        // machine's init does not reap every orphan), which would keep a
        // new server from taking the port.
        for name in [
            format!(".s.PGSQL.{}", self.primary.port),
            format!(".s.PGSQL.{}.lock", self.primary.port),
        ] {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }

    /// Promotes the standby (`pg_ctl promote -w`): from now on it is the
    /// primary.
    pub fn promote(&mut self) {
        let standby = self.standby.clone();
        self.postgres(&format!(
            "pg_ctl -D '{}' -w promote >/dev/null",
            standby.data.display()
        ));
        std::mem::swap(&mut self.primary, &mut self.standby);
    }

    /// Replaces the dead old primary (now [`standby`](Self::standby)) by
    /// a fresh standby of the new primary, on the same port.
    pub fn rebuild_standby(&mut self) {
        let (primary, old) = (self.primary.clone(), self.standby.clone());
        std::fs::remove_dir_all(&old.data).unwrap();
        self.base_backup(&primary, &old);
        self.await_streaming(&primary, Duration::from_secs(30));
    }

    fn base_backup(&self, from: &Server, to: &Server) {
        self.postgres(&format!(
            "pg_basebackup -h 127.0.0.1 -p {} -U postgres -D '{}' -R -X stream -c fast",
            from.port,
            to.data.display()
        ));
        append(
            &to.data.join("postgresql.conf"),
            &format!("\nport = {}\n", to.port),
        );
        self.pg_ctl_start(to);
    }

    fn pg_ctl_start(&self, server: &Server) {
        let d = server.data.display();
        let script = format!(
            "cd /tmp && '{bin}/pg_ctl' -D '{d}' -l '{d}.log' -w -t 60 start >/dev/null",
            bin = self.bin.display()
        );
        let output = Command::new("su")
            .args(["-s", "/bin/bash", "postgres", "-c", &script])
            .output()
            .unwrap();
        if !output.status.success() {
            let log = std::fs::read_to_string(format!("{d}.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!(
                "pg_ctl start of {d} failed: {}\n{}",
                String::from_utf8_lossy(&output.stderr),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    /// Waits until `primary` streams to a standby.
    fn await_streaming(&self, primary: &Server, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut conn = PgConnection::establish(&primary.url("postgres")).unwrap();
        loop {
            let streaming = outbox::testing::count(
                &mut conn,
                "SELECT count(*) AS n FROM pg_stat_replication WHERE state = 'streaming'",
            );
            if streaming > 0 {
                return;
            }
            assert!(Instant::now() < deadline, "no standby streaming within {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a Postgres program (from the machine's `bin` folder) as the
    /// postgres user; panics with its output when it fails.
    fn postgres(&self, command: &str) {
        let script = format!("cd /tmp && PATH='{}':$PATH {command}", self.bin.display());
        run_checked(Command::new("su").args(["-s", "/bin/bash", "postgres", "-c", &script]));
    }
}

impl Drop for PgPair {
    fn drop(&mut self) {
        if let Some(pid) = self.paused_sender.take() {
            signal("CONT", pid);
        }
        for server in [&self.primary, &self.standby] {
            kill_postmaster(&server.data);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // The shared parent too, once no other pair uses it (fails if not empty).
        let _ = std::fs::remove_dir(BASE);
    }
}

/// SIGKILLs the postmaster of `data` (its children exit when it is gone)
/// and waits for it, when one runs there.
fn kill_postmaster(data: &Path) {
    let Some(pid) = postmaster_of(data) else {
        return;
    };
    let mut pids = children_of(pid);
    pids.push(pid);
    for pid in &pids {
        signal("CONT", *pid);
        signal("KILL", *pid);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids.iter().any(|pid| alive(*pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    processes()
        .into_iter()
        .filter_map(|(pid, dir)| {
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// The live postmaster whose data folder is `data`: the first line of its
/// `postmaster.pid`, checked against the process's command line.
fn postmaster_of(data: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let pid: u32 = text.lines().next()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    cmdline.contains(&*data.to_string_lossy()).then_some(pid)
}

/// Kills the servers of runs whose test process is gone, and removes
/// their folders.
fn sweep() {
    let Ok(entries) = std::fs::read_dir(BASE) else {
        return;
    };
    for entry in entries.flatten() {
        let owner = entry
            .file_name()
            .to_str()
            .and_then(|name| name.split('-').next().and_then(|pid| pid.parse::<u32>().ok()));
        let alive =
            owner.is_some_and(|o| o == std::process::id() || Path::new(&format!("/proc/{o}")).exists());
        if !alive {
            for server in ["primary", "standby"] {
                kill_postmaster(&entry.path().join(server));
            }
            let _ = std::fs::remove_dir_all(entry.path());
            println!("postgres: swept {}", entry.path().display());
        }
    }
}

fn postgres_bin() -> PathBuf {
    let versions =
        std::fs::read_dir("/usr/lib/postgresql").expect("Postgres binaries in /usr/lib/postgresql");
    let mut found: Vec<PathBuf> = versions
        .flatten()
        .map(|v| v.path().join("bin"))
        .filter(|bin| bin.join("pg_ctl").exists())
        .collect();
    found.sort();
    found.pop().expect("a Postgres version with pg_ctl")
}

fn signal(name: &str, pid: u32) {
    let _ = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status();
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}
