//! Following the registry: a task keeps the latest [`RegistryState`] in a `watch` channel.
//!
//! It re-reads the policies when PostgreSQL notifies a change (`LISTEN mesh_registry` on a
//! connection of its own) and every `interval` whatever happens, so a missed notification, a
//! reconnect or a change made by hand in SQL is picked up within one interval. While PostgreSQL
//! is unreachable the last state read stays current: serving goes on with the policy it knew.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::policy::RegistryState;
use crate::schema::CHANNEL;
use crate::store::RegistryStore;

/// A running follower; dropping it stops the task.
pub struct Following {
    /// The latest state read (empty until the first read succeeds).
    pub state: watch::Receiver<Arc<RegistryState>>,
    task: JoinHandle<()>,
}

impl Drop for Following {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Follows the registry in `store`, listening for notifications on a connection to `url` and
/// re-reading at least every `interval`.
pub fn follow(store: RegistryStore, url: String, interval: Duration) -> Following {
    let (sender, state) = watch::channel(Arc::new(RegistryState::default()));
    let task = tokio::spawn(run(store, url, interval, sender));
    Following { state, task }
}

async fn run(
    store: RegistryStore,
    url: String,
    interval: Duration,
    sender: watch::Sender<Arc<RegistryState>>,
) {
    let (notify, mut notified) = mpsc::channel::<()>(1);
    let mut listener: Option<Listener> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if listener.as_ref().is_none_or(|l| l.task.is_finished()) {
            listener = listen(&url, notify.clone()).await;
        }
        match store.read().await {
            Ok(state) => {
                sender.send_if_modified(|current| {
                    if **current == state {
                        return false;
                    }
                    tracing::info!(models = state.policies.len(), "model registry changed");
                    *current = Arc::new(state);
                    true
                });
            }
            Err(error) => {
                tracing::warn!(%error, "model registry unreadable; serving with the last policy read")
            }
        }
        // Re-read on a notification, or after the interval whatever happens.
        tokio::select! {
            _ = notified.recv() => {}
            _ = ticker.tick() => {}
        }
    }
}

/// The `LISTEN` connection: its client (the connection closes when it drops) and the task that
/// forwards its notifications.
struct Listener {
    _client: tokio_postgres::Client,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A connection listening on `mesh_registry`, forwarding each notification to `notify`; `None`
/// if connecting or the `LISTEN` failed (the next round tries again, and the interval re-read
/// covers the gap).
async fn listen(url: &str, notify: mpsc::Sender<()>) -> Option<Listener> {
    let connect = tokio_postgres::connect(url, tokio_postgres::NoTls);
    let (client, mut connection) = match tokio::time::timeout(Duration::from_secs(2), connect).await
    {
        Ok(Ok(pair)) => pair,
        Ok(Err(error)) => {
            tracing::debug!(%error, "registry LISTEN connection failed");
            return None;
        }
        Err(_) => return None,
    };
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let task = tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                    // A full channel already holds a wake-up: one re-read covers both.
                    let _ = notify.try_send(());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    let listener = Listener {
        _client: client,
        task,
    };
    let statement = format!("LISTEN {CHANNEL}");
    let listen = listener._client.batch_execute(&statement);
    match tokio::time::timeout(Duration::from_secs(2), listen).await {
        Ok(Ok(())) => Some(listener),
        _ => None,
    }
}
