//! A fault-injecting TCP proxy for tests: it forwards a loopback port to a real service and can
//! add latency to every chunk sent toward it, hold every byte in both directions (a paused
//! network: calls hang rather than fail), or refuse (close every connection, accept none).
//! Real components cannot be told to be slow or to hang without dying; this is the one place
//! the tests fake a fault, and tests using it say so.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to traffic, besides the delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    None,
    /// Forward nothing, in either direction, until the fault is cleared; connections stay open
    /// (a blackholed or paused dependency: calls hang until their deadline).
    Hold,
    /// Close every open connection and every new one at once (the dependency is unreachable).
    Refuse,
}

/// A running proxy; stops accepting when dropped.
pub struct DelayProxy {
    addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    fault: watch::Sender<Fault>,
    task: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    /// Forwards a new loopback port to `target`, initially without delay or fault.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (fault, _) = watch::channel(Fault::None);
        let delay = delay_ms.clone();
        let faults = fault.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *faults.borrow() == Fault::Refuse {
                    continue; // dropped: closed at once
                }
                let delay = delay.clone();
                let (up, down) = (faults.subscribe(), faults.subscribe());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pipe(cr, sw, Some(delay), up), pipe(sr, cw, None, down));
                });
            }
        });
        Ok(Self {
            addr,
            delay_ms,
            fault,
            task,
        })
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>` for gRPC clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Latency added to each chunk toward the target from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Starts (or, with [`Fault::None`], ends) a fault.
    pub fn set_fault(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Option<Arc<AtomicU64>>,
    mut fault: watch::Receiver<Fault>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            // Refusing closes open connections too, even idle ones.
            _ = fault.wait_for(|f| *f == Fault::Refuse) => break,
        };
        // While held, the chunk waits; a refusal meanwhile drops it with the connection.
        match fault.wait_for(|f| *f != Fault::Hold).await {
            Ok(f) if *f == Fault::None => {}
            _ => break,
        }
        if let Some(delay) = &delay {
            let ms = delay.load(Ordering::Relaxed);
            if ms > 0 {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
