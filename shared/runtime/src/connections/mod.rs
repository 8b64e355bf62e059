//! Bounded client connections: what a server accepts, and how long a quiet connection may stay.
//!
//! Without bounds, anyone who can reach a port can open connections until the process runs out
//! of file descriptors and memory (an outside review held 24,000 open with the HTTP/2 preface
//! and nothing after). So:
//! - at most `max_total` connections are open, and at most `max_per_peer` from one IP address;
//!   a connection beyond either is closed at once and counted, and those already open keep
//!   being served;
//! - a connection that has started no call within `first_request_timeout` of opening, or that
//!   has had no call in flight for `idle_timeout`, is closed ([`GuardedIo`] fails its read; a
//!   streaming response counts as in flight until its body ends);
//! - the server pings every `keepalive` and closes a peer that does not answer within the same
//!   time, and allows `max_streams` concurrent calls per connection (set on the tonic server).
//!
//! Whether a call is in flight is known from inside the service stack: [`GuardedIo`] hands an
//! [`Activity`] to tonic as its connect info, tonic puts it in every request's extensions, and
//! [`ActivityLayer`] holds a [`CallGuard`] from the request until the response body is done.

mod activity;

pub use activity::{ActivityLayer, ActivityService};

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// How many connections a server keeps, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections in all.
    pub max_total: usize,
    /// Open connections from one IP address.
    pub max_per_peer: usize,
    /// A connection must start its first call within this.
    pub first_request_timeout: Duration,
    /// A connection with no call in flight is closed after this.
    pub idle_timeout: Duration,
    /// HTTP/2 ping interval, and the wait for the answer.
    pub keepalive: Duration,
    /// Concurrent calls (HTTP/2 streams) on one connection.
    pub max_streams: u32,
}

/// Connection counts: `mesh_connections_open`, `mesh_connections_refused_total{reason}`
/// (`total`, `per_peer`) and `mesh_connections_closed_total{reason}` (`no_request`, `idle`).
#[derive(Clone)]
pub struct ConnectionMetrics {
    open: IntGauge,
    refused: IntCounterVec,
    closed: IntCounterVec,
}

impl ConnectionMetrics {
    /// Registers the connection metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let open = IntGauge::new("mesh_connections_open", "Client connections open")?;
        let refused = IntCounterVec::new(
            Opts::new(
                "mesh_connections_refused_total",
                "Connections closed on arrival because a limit was reached (total or per_peer)",
            ),
            &["reason"],
        )?;
        let closed = IntCounterVec::new(
            Opts::new(
                "mesh_connections_closed_total",
                "Connections closed by the server for being quiet: no_request (no call \
                 started in time) or idle (no call in flight for the idle timeout)",
            ),
            &["reason"],
        )?;
        for reason in ["total", "per_peer"] {
            refused.with_label_values(&[reason]);
        }
        for reason in ["no_request", "idle"] {
            closed.with_label_values(&[reason]);
        }
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(closed.clone()))?;
        Ok(Self {
            open,
            refused,
            closed,
        })
    }
}

/// Who is connected: counts in all and per peer address.
struct Admission {
    limits: ConnectionLimits,
    per_peer: Mutex<HashMap<IpAddr, usize>>,
    total: AtomicUsize,
    metrics: ConnectionMetrics,
}

impl Admission {
    /// A permit for a connection from `peer`, or the limit that refuses it.
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<ConnectionPermit, &'static str> {
        let mut per_peer = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.limits.max_total {
            return Err("total");
        }
        let count = per_peer.entry(peer).or_insert(0);
        if *count >= self.limits.max_per_peer {
            return Err("per_peer");
        }
        *count += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        self.metrics.open.inc();
        Ok(ConnectionPermit {
            admission: self.clone(),
            peer,
        })
    }
}

/// One admitted connection's place; dropping it (the connection closed) frees the place.
struct ConnectionPermit {
    admission: Arc<Admission>,
    peer: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut per_peer = self
            .admission
            .per_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_peer.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                per_peer.remove(&self.peer);
            }
        }
        self.admission.total.fetch_sub(1, Ordering::Relaxed);
        self.admission.metrics.open.dec();
    }
}

/// The connections `listener` accepts within `limits`: those over a limit are closed at once;
/// accept errors (e.g. out of file descriptors) are logged and retried after a pause instead of
/// spinning.
pub fn accept(
    listener: TcpListener,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
) -> impl Stream<Item = io::Result<GuardedIo>> {
    let admission = Arc::new(Admission {
        limits,
        per_peer: Mutex::new(HashMap::new()),
        total: AtomicUsize::new(0),
        metrics,
    });
    futures::stream::unfold((listener, admission), |(listener, admission)| async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed; pausing");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match admission.admit(peer.ip()) {
                Ok(permit) => {
                    // Small unary messages: do not let Nagle hold them back.
                    let _ = stream.set_nodelay(true);
                    let io = GuardedIo::new(stream, peer, permit, &admission);
                    return Some((Ok(io), (listener, admission)));
                }
                Err(limit) => {
                    admission.metrics.refused.with_label_values(&[limit]).inc();
                    tracing::debug!(%peer, limit, "connection refused: limit reached");
                    drop(stream);
                }
            }
        }
    })
}

/// What one connection is doing: calls in flight, and since when it has been quiet.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    calls: AtomicUsize,
    called: AtomicBool,
    /// Milliseconds after `opened` when the last call ended.
    quiet_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            calls: AtomicUsize::new(0),
            called: AtomicBool::new(false),
            quiet_since_ms: AtomicU64::new(0),
        }
    }

    /// Marks a call in flight until the guard drops.
    pub fn begin(self: &Arc<Self>) -> CallGuard {
        self.called.store(true, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.clone())
    }

    /// When the connection is due to be closed and why; `None` while a call is in flight.
    fn due(&self, limits: &ConnectionLimits) -> Option<(Instant, &'static str)> {
        if self.calls.load(Ordering::Acquire) > 0 {
            return None;
        }
        if !self.called.load(Ordering::Relaxed) {
            return Some((self.opened + limits.first_request_timeout, "no_request"));
        }
        let quiet_since =
            self.opened + Duration::from_millis(self.quiet_since_ms.load(Ordering::Relaxed));
        Some((quiet_since + limits.idle_timeout, "idle"))
    }
}

/// A call in flight on a connection (see [`Activity::begin`]).
#[derive(Debug)]
pub struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let elapsed = self.0.opened.elapsed().as_millis() as u64;
        self.0.quiet_since_ms.fetch_max(elapsed, Ordering::Relaxed);
        self.0.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connect info tonic puts in every request of a [`GuardedIo`] connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The peer.
    pub remote_addr: SocketAddr,
    /// The connection's calls.
    pub activity: Arc<Activity>,
}

/// An admitted TCP connection that holds its place until dropped and fails its reads once it
/// has been quiet too long (see the module docs).
pub struct GuardedIo {
    stream: TcpStream,
    info: ConnectionInfo,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
    timer: Pin<Box<Sleep>>,
    _permit: ConnectionPermit,
}

impl GuardedIo {
    fn new(
        stream: TcpStream,
        remote_addr: SocketAddr,
        permit: ConnectionPermit,
        admission: &Admission,
    ) -> Self {
        let limits = admission.limits;
        Self {
            stream,
            info: ConnectionInfo {
                remote_addr,
                activity: Arc::new(Activity::new()),
            },
            limits,
            metrics: admission.metrics.clone(),
            timer: Box::pin(tokio::time::sleep(limits.first_request_timeout)),
            _permit: permit,
        }
    }

    /// Whether the connection has been quiet too long: the reason to close it, if so. Keeps
    /// the timer armed for the next check otherwise.
    fn overdue(&mut self, cx: &mut Context<'_>) -> Option<&'static str> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return None;
            }
            let now = Instant::now();
            match self.info.activity.due(&self.limits) {
                Some((due, reason)) if due <= now => return Some(reason),
                Some((due, _)) => self.timer.as_mut().reset(due),
                None => self.timer.as_mut().reset(now + self.limits.idle_timeout),
            }
        }
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Poll::Ready(result) = Pin::new(&mut this.stream).poll_read(cx, buf) {
            return Poll::Ready(result);
        }
        match this.overdue(cx) {
            None => Poll::Pending,
            Some(reason) => {
                this.metrics.closed.with_label_values(&[reason]).inc();
                tracing::debug!(peer = %this.info.remote_addr, reason, "closing a quiet connection");
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connection quiet too long ({reason})"),
                )))
            }
        }
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for GuardedIo {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}
