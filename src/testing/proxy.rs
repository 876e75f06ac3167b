//! A fault-injecting TCP proxy in front of a server: connection loss,
//! resets, added latency and a blackhole for one client, without
//! restarting the shared broker or database (there is no toxiproxy here).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// What the proxy does to the bytes of open and new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Forward at once.
    #[default]
    None,
    /// Hold every chunk this long before forwarding it (both directions).
    Latency(Duration),
    /// Forward nothing, in either direction, until the fault changes:
    /// connections stay open and silent, as behind a dropped route. TCP
    /// would deliver the held bytes once the route is back, and so does
    /// the proxy.
    Blackhole,
}

/// Forwards `127.0.0.1:<port>` to an upstream address.
pub struct TcpProxy {
    /// The local port clients connect to.
    pub port: u16,
    refusing: Arc<AtomicBool>,
    fault: watch::Sender<Fault>,
    /// Bumped to reset every open connection.
    resets: watch::Sender<u64>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpProxy")
            .field("port", &self.port)
            .field("fault", &*self.fault.borrow())
            .finish_non_exhaustive()
    }
}

impl TcpProxy {
    /// Starts forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::Config(format!("proxy cannot listen: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::Config(format!("proxy address: {e}")))?
            .port();
        let refusing = Arc::new(AtomicBool::new(false));
        let (fault, _) = watch::channel(Fault::None);
        let (resets, _) = watch::channel(0u64);
        let upstream = upstream.to_owned();
        let accept_refusing = Arc::clone(&refusing);
        let (accept_fault, accept_resets) = (fault.clone(), resets.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if accept_refusing.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                let (fault, resets) = (accept_fault.subscribe(), accept_resets.subscribe());
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(&upstream).await {
                        forward(inbound, outbound, fault, resets).await;
                    }
                });
            }
        });
        Ok(Self {
            port,
            refusing,
            fault,
            resets,
            accept,
        })
    }

    /// Resets every open connection (the client sees a TCP RST); with
    /// `refuse`, new ones are closed at once until [`TcpProxy::heal`].
    pub fn cut(&self, refuse: bool) {
        self.refusing.store(refuse, Ordering::SeqCst);
        self.resets.send_modify(|generation| *generation += 1);
    }

    /// Accepts connections again and forwards without faults.
    pub fn heal(&self) {
        self.refusing.store(false, Ordering::SeqCst);
        self.set_fault(Fault::None);
    }

    /// Applies `fault` to open and new connections until the next call.
    pub fn set_fault(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// An AMQP URL (guest/guest, vhost `/`) through this proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// A Postgres URL (user postgres, database `database`) through this
    /// proxy.
    pub fn postgres_url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut(true);
    }
}

/// Pumps both directions until either side closes (then closes both
/// gracefully) or a reset is asked for (then both sockets are closed with
/// linger 0, which sends a TCP RST).
async fn forward(
    inbound: TcpStream,
    outbound: TcpStream,
    fault: watch::Receiver<Fault>,
    mut resets: watch::Receiver<u64>,
) {
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (mut in_read, mut in_write) = inbound.into_split();
    let (mut out_read, mut out_write) = outbound.into_split();
    let reset = tokio::select! {
        () = pump(&mut in_read, &mut out_write, fault.clone()) => false,
        () = pump(&mut out_read, &mut in_write, fault) => false,
        // A dropped proxy resets its links too.
        _ = resets.changed() => true,
    };
    if reset {
        let _ = in_write.as_ref().set_zero_linger();
        let _ = out_write.as_ref().set_zero_linger();
    } else {
        let _ = in_write.shutdown().await;
        let _ = out_write.shutdown().await;
    }
}

async fn pump(from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf, mut fault: watch::Receiver<Fault>) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        loop {
            let current = *fault.borrow_and_update();
            match current {
                Fault::None => break,
                Fault::Latency(delay) => {
                    tokio::time::sleep(delay).await;
                    break;
                }
                Fault::Blackhole => {
                    if fault.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
