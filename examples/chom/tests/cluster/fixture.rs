//! A three-node RabbitMQ cluster of the test's own on loopback ports,
//! removed with everything it wrote when the guard drops (also when the
//! test panics), and swept at the next start when a run was killed.
//!
//! Each node is a `rabbitmq-server -detached` of the machine's RabbitMQ,
//! run as the `rabbitmq` user (so it shares that user's Erlang cookie with
//! the CLI tools), with its own node name (`outboxc<pid>n<i>@localhost`:
//! `<pid>` is this test process, so runs side by side never collide and a
//! sweep can tell a dead run's nodes), AMQP and distribution ports (free
//! ports picked at start), config file (the machine's
//! `/etc/rabbitmq/rabbitmq.conf` pins the listener to 5672), plugins
//! file, data, log and pid files under `/tmp/outbox-cluster/<pid>/`.
//! The machine's own node (`rabbit@localhost`, port 5672) is never
//! stopped, joined or otherwise touched: every process this file signals
//! is a `beam.smp` whose environment names one of our nodes.
//!
//! Waits poll a condition (`rabbitmqctl await_startup`, `cluster_status`)
//! under a deadline; nothing sleeps a fixed time hoping for the best.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Node names of these tests start with this; the sweep looks for it.
const PREFIX: &str = "outboxc";
/// Where every run keeps its nodes' files, one folder per test process.
const BASE: &str = "/tmp/outbox-cluster";
const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";
const RABBITMQ_HOME: &str = "/var/lib/rabbitmq";

/// One node of the cluster.
#[derive(Debug, Clone)]
pub struct Node {
    /// `outboxc<pid>n<i>@localhost`.
    pub name: String,
    /// Its AMQP port on 127.0.0.1.
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
}

impl Node {
    /// guest/guest on this node, vhost `/`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The name without `@localhost`, for messages.
    pub fn short(&self) -> &str {
        self.name.split('@').next().unwrap_or(&self.name)
    }
}

/// The running cluster; dropping it kills every node and removes its
/// folder.
#[derive(Debug)]
pub struct RabbitCluster {
    pub nodes: Vec<Node>,
    dir: PathBuf,
}

impl RabbitCluster {
    /// Sweeps what killed runs left, then starts `count` nodes, waits for
    /// each to boot and joins the others to the first.
    pub fn start(count: usize) -> Self {
        assert!(
            is_root(),
            "the cluster tests start RabbitMQ nodes as the rabbitmq user and must run as root"
        );
        sweep();
        let owner = std::process::id();
        let dir = Path::new(BASE).join(owner.to_string());
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let ports = free_ports(2 * count);
        let nodes: Vec<Node> = (0..count)
            .map(|i| Node {
                name: format!("{PREFIX}{owner}n{}@localhost", i + 1),
                port: ports[2 * i],
                dist_port: ports[2 * i + 1],
                dir: dir.join(format!("n{}", i + 1)),
            })
            .collect();
        // The guard exists before any node starts: a panic from here on
        // removes whatever did start.
        let cluster = Self { nodes, dir };
        for node in &cluster.nodes {
            std::fs::create_dir_all(&node.dir).unwrap();
            std::fs::write(
                node.dir.join("rabbitmq.conf"),
                format!("listeners.tcp.local = 127.0.0.1:{}\n", node.port),
            )
            .unwrap();
            std::fs::write(node.dir.join("enabled_plugins"), "[].\n").unwrap();
        }
        run_checked(
            Command::new("chown")
                .args(["-R", "rabbitmq:rabbitmq"])
                .arg(&cluster.dir),
        );
        let started = Instant::now();
        for node in &cluster.nodes {
            cluster.spawn(node);
        }
        for node in &cluster.nodes {
            cluster.await_startup(node, Duration::from_secs(120));
        }
        let booted = started.elapsed();
        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            cluster.ctl_ok(node, &["stop_app"]);
            cluster.ctl_ok(node, &["join_cluster", &first]);
            cluster.ctl_ok(node, &["start_app"]);
        }
        cluster.await_running(count, Duration::from_secs(60));
        println!(
            "cluster: {count} nodes booted in {:.1} s, joined in {:.1} s (ports {})",
            booted.as_secs_f64(),
            (started.elapsed() - booted).as_secs_f64(),
            cluster
                .nodes
                .iter()
                .map(|n| n.port.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        cluster
    }

    /// Every node's AMQP URL, comma separated, in the order of `order`
    /// (indexes into [`nodes`](Self::nodes)).
    pub fn url_list(&self, order: &[usize]) -> String {
        order
            .iter()
            .map(|&i| self.nodes[i].amqp_url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts `node` (again): its data folder is kept, so a node that was
    /// a member rejoins the cluster by itself.
    pub fn spawn(&self, node: &Node) {
        let d = node.dir.display();
        let script = format!(
            "cd {RABBITMQ_HOME} && export HOME={RABBITMQ_HOME} \
             RABBITMQ_NODENAME='{name}' \
             RABBITMQ_CONFIG_FILE='{d}/rabbitmq.conf' \
             RABBITMQ_ENABLED_PLUGINS_FILE='{d}/enabled_plugins' \
             RABBITMQ_DIST_PORT={dist} \
             RABBITMQ_MNESIA_BASE='{d}/mnesia' \
             RABBITMQ_LOG_BASE='{d}/log' \
             RABBITMQ_PID_FILE='{d}/pid' && \
             exec {RABBITMQ_BIN}/rabbitmq-server -detached",
            name = node.name,
            dist = node.dist_port,
        );
        run_checked(&mut as_rabbitmq(&script));
    }

    /// Waits until `node` has booted (`rabbitmqctl await_startup`, tried
    /// again while the node is not yet registered).
    pub fn await_startup(&self, node: &Node, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let (ok, output) = self.ctl(node, &["await_startup", "--timeout", "30"]);
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not start within {limit:?}: {output}\n{}",
                node.name,
                self.log_tail(node)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Waits until `count` nodes run in the cluster, as the first node
    /// that answers sees it.
    pub fn await_running(&self, count: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let running = self.running_nodes();
            if running.len() == count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{count} nodes not running within {limit:?}: {running:?}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The running nodes, from the first node that answers.
    pub fn running_nodes(&self) -> Vec<String> {
        for node in &self.nodes {
            let (ok, output) = self.ctl(node, &["cluster_status", "--formatter", "json"]);
            if !ok {
                continue;
            }
            if let Some(value) = json_in(&output)
                && let Some(running) = value.get("running_nodes").and_then(|r| r.as_array())
            {
                return running
                    .iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect();
            }
        }
        Vec::new()
    }

    /// SIGKILLs `node` (as a crash would): every `beam.smp` whose
    /// environment names it. Returns when none is left.
    pub fn kill(&self, node: &Node) {
        let pids = node_pids(&node.name);
        assert!(!pids.is_empty(), "{} is not running", node.name);
        for pid in &pids {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        wait_gone(&pids, Duration::from_secs(20));
    }

    /// Stops `node` cleanly (`rabbitmqctl stop`, which waits for it).
    pub fn stop(&self, node: &Node) {
        self.ctl_ok(node, &["stop"]);
        wait_gone(&node_pids(&node.name), Duration::from_secs(30));
    }

    /// Whether stopping `node` now keeps every quorum queue's majority
    /// (`rabbitmq-queues check_if_node_is_quorum_critical`), with what the
    /// check printed.
    pub fn safe_to_stop(&self, node: &Node) -> (bool, String) {
        let script = format!(
            "cd {RABBITMQ_HOME} && HOME={RABBITMQ_HOME} timeout 60 {RABBITMQ_BIN}/rabbitmq-queues -n '{}' check_if_node_is_quorum_critical 2>&1",
            node.name
        );
        match as_rabbitmq(&script).output() {
            Ok(output) => (
                output.status.success(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
            ),
            Err(e) => (false, format!("cannot run rabbitmq-queues: {e}")),
        }
    }

    /// Waits until every quorum queue has `count` members online.
    pub fn await_members(&self, count: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let short: Vec<(String, usize)> = self
                .queue_members()
                .into_iter()
                .filter(|(_, online)| online.len() < count)
                .map(|(name, online)| (name, online.len()))
                .collect();
            if short.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "queues without {count} members online after {limit:?}: {short:?}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Every queue with its online members, as the first node that
    /// answers sees them (empty when none answers).
    pub fn queue_members(&self) -> Vec<(String, Vec<String>)> {
        for node in &self.nodes {
            let (ok, output) = self.ctl(node, &["list_queues", "name", "online", "--formatter", "json"]);
            if !ok {
                continue;
            }
            let Some(rows) = json_in(&output) else {
                continue;
            };
            return rows
                .as_array()
                .map(|rows| {
                    rows.iter()
                        .filter_map(|row| {
                            let name = row.get("name")?.as_str()?.to_owned();
                            Some((name, online_members(row)))
                        })
                        .collect()
                })
                .unwrap_or_default();
        }
        Vec::new()
    }

    /// The leader and the online members of quorum queue `queue`, as a
    /// running node sees them.
    pub fn queue_leader(&self, queue: &str) -> Option<(String, Vec<String>)> {
        for node in &self.nodes {
            let (ok, output) = self.ctl(
                node,
                &["list_queues", "name", "leader", "online", "--formatter", "json"],
            );
            if !ok {
                continue;
            }
            let rows = json_in(&output)?;
            for row in rows.as_array()? {
                if row.get("name").and_then(|n| n.as_str()) == Some(queue) {
                    let leader = row.get("leader")?.as_str()?.to_owned();
                    return Some((leader, online_members(row)));
                }
            }
            return None;
        }
        None
    }

    /// The node serving the client connection whose name (the
    /// `connection_name` client property) starts with `name_prefix`, by
    /// the server port of the connection.
    pub fn node_of_connection(&self, name_prefix: &str) -> Option<&Node> {
        fn connection_name(row: &serde_json::Value) -> Option<&str> {
            row.get("client_properties")?
                .as_array()?
                .iter()
                .find_map(|property| {
                    let property = property.as_array()?;
                    (property.first()?.as_str()? == "connection_name")
                        .then(|| property.get(2)?.as_str())
                        .flatten()
                })
        }
        for node in &self.nodes {
            let (ok, output) = self.ctl(
                node,
                &[
                    "list_connections",
                    "port",
                    "client_properties",
                    "--formatter",
                    "json",
                ],
            );
            if !ok {
                continue;
            }
            let rows = json_in(&output)?;
            let port = rows.as_array()?.iter().find_map(|row| {
                connection_name(row)
                    .is_some_and(|name| name.starts_with(name_prefix))
                    .then(|| row.get("port").and_then(serde_json::Value::as_u64))
                    .flatten()
            })?;
            return self.nodes.iter().find(|n| u64::from(n.port) == port);
        }
        None
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Runs `rabbitmqctl -n <node> args...` as the rabbitmq user (at most
    /// 90 s); returns whether it succeeded and what it printed.
    pub fn ctl(&self, node: &Node, args: &[&str]) -> (bool, String) {
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let script = format!(
            "cd {RABBITMQ_HOME} && HOME={RABBITMQ_HOME} timeout 90 {RABBITMQ_BIN}/rabbitmqctl -q -n '{}' {} 2>&1",
            node.name,
            quoted.join(" ")
        );
        match as_rabbitmq(&script).output() {
            Ok(output) => (
                output.status.success(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
            ),
            Err(e) => (false, format!("cannot run rabbitmqctl: {e}")),
        }
    }

    fn ctl_ok(&self, node: &Node, args: &[&str]) {
        let (ok, output) = self.ctl(node, args);
        assert!(ok, "rabbitmqctl -n {} {args:?} failed: {output}", node.name);
    }

    fn log_tail(&self, node: &Node) -> String {
        let log = node.dir.join("log").join(format!("{}.log", node.name));
        std::fs::read_to_string(&log)
            .map(|text| {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(20)..].join("\n")
            })
            .unwrap_or_else(|e| format!("(no log at {}: {e})", log.display()))
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        let mut pids = Vec::new();
        for node in &self.nodes {
            pids.extend(node_pids(&node.name));
        }
        for pid in &pids {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        wait_gone(&pids, Duration::from_secs(20));
        let _ = std::fs::remove_dir_all(&self.dir);
        // The shared parent too, once no other run uses it (fails if not empty).
        let _ = std::fs::remove_dir(BASE);
    }
}

/// Kills the nodes of runs whose test process is gone and removes their
/// folders. Touches only `beam.smp` processes whose
/// `RABBITMQ_NODENAME` starts with [`PREFIX`].
pub fn sweep() {
    let alive = |owner: u32| Path::new(&format!("/proc/{owner}")).exists();
    let mut killed = Vec::new();
    for (pid, name) in our_beams() {
        let owner = owner_of(&name);
        if owner.is_some_and(|o| o != std::process::id() && !alive(o)) || owner.is_none() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            killed.push(pid);
        }
    }
    wait_gone(&killed, Duration::from_secs(20));
    if let Ok(entries) = std::fs::read_dir(BASE) {
        for entry in entries.flatten() {
            let owner = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok());
            if owner.is_some_and(|o| o != std::process::id() && !alive(o)) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    if !killed.is_empty() {
        println!("cluster: swept {} node(s) of an earlier run", killed.len());
    }
}

/// The test process that started node `name` (`outboxc<pid>n<i>@...`).
fn owner_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Every process of the machine: its pid and its `/proc` folder.
pub(crate) fn processes() -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| Some((entry.file_name().to_str()?.parse().ok()?, entry.path())))
        .collect()
}

/// `(pid, node name)` of every `beam.smp` running one of our nodes.
fn our_beams() -> Vec<(u32, String)> {
    processes()
        .into_iter()
        .filter_map(|(pid, dir)| {
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            if comm.trim() != "beam.smp" {
                return None;
            }
            let environ = std::fs::read(dir.join("environ")).ok()?;
            let name = environ
                .split(|b| *b == 0)
                .filter_map(|var| std::str::from_utf8(var).ok())
                .find_map(|var| var.strip_prefix("RABBITMQ_NODENAME="))?
                .to_owned();
            name.starts_with(PREFIX).then_some((pid, name))
        })
        .collect()
}

fn node_pids(name: &str) -> Vec<u32> {
    our_beams()
        .into_iter()
        .filter(|(_, n)| n == name)
        .map(|(pid, _)| pid)
        .collect()
}

fn wait_gone(pids: &[u32], limit: Duration) {
    let deadline = Instant::now() + limit;
    while pids
        .iter()
        .any(|pid| Path::new(&format!("/proc/{pid}/comm")).exists() && !is_zombie(*pid))
    {
        if Instant::now() > deadline {
            eprintln!("cluster: processes {pids:?} still there after {limit:?}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|s| s == "Z"))
        })
        .unwrap_or(true)
}

/// `count` distinct loopback ports that were free a moment ago.
/// Ports free at the moment (bound, read, released together).
pub(crate) fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

fn as_rabbitmq(script: &str) -> Command {
    let mut command = Command::new("su");
    command.args(["-s", "/bin/bash", "rabbitmq", "-c", script]);
    command
}

/// Runs `command`; panics with its output unless it succeeded.
pub(crate) fn run_checked(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().next().map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

/// The `online` members of a `list_queues` row.
fn online_members(row: &serde_json::Value) -> Vec<String> {
    row.get("online")
        .and_then(|o| o.as_array())
        .map(|members| {
            members
                .iter()
                .filter_map(|m| m.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The JSON document in rabbitmqctl's output (it may print notices
/// around it).
fn json_in(output: &str) -> Option<serde_json::Value> {
    let start = output.find(['[', '{'])?;
    serde_json::from_str(output[start..].trim()).ok()
}
