//! The webhook receiver Alertmanager notifies: a minimal HTTP/1.1 server on a loopback port
//! inside mesh-chaos. It takes `POST /<receiver>` with Alertmanager's webhook JSON (version 4),
//! records every alert in it with its status and the time it arrived, and answers 200. One
//! request per connection (it answers `Connection: close`), which is all Alertmanager needs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// One alert in one notification.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Notice {
    /// When the notification arrived, Unix ms.
    pub at_unix_ms: u64,
    /// Alertmanager's receiver (`page`, `ticket`): the path it posted to.
    pub receiver: String,
    /// `firing` or `resolved`.
    pub status: String,
    /// `alertname`.
    pub alertname: String,
    /// What tells the alert's instances apart in a report: alertname, then the `slo`,
    /// `replica`, `downstream` and `instance` (the service's name) labels it has.
    pub key: String,
    /// Alertmanager's fingerprint of the label set.
    pub fingerprint: String,
    /// The `severity` label.
    pub severity: String,
}

/// Everything received so far, in arrival order.
#[derive(Clone, Default)]
pub struct Notices(Arc<Mutex<Vec<Notice>>>);

impl Notices {
    /// A copy of the notices from index `from` on.
    pub fn since(&self, from: usize) -> Vec<Notice> {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.get(from..).map(<[Notice]>::to_vec).unwrap_or_default()
    }

    /// How many notices have arrived.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn push(&self, notices: Vec<Notice>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(notices);
    }
}

/// Serves on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, notices: Notices) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let notices = notices.clone();
        tokio::spawn(async move {
            // Bounded: a connection that never finishes its request is dropped.
            let _ = tokio::time::timeout(Duration::from_secs(10), handle(stream, notices)).await;
        });
    }
}

async fn handle(mut stream: TcpStream, notices: Notices) -> std::io::Result<()> {
    const MAX: usize = 4 << 20;
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    let (head_end, length) = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, length);
        }
        if buf.len() > MAX {
            return respond(&mut stream, "413 Payload Too Large").await;
        }
    };
    if length > MAX {
        return respond(&mut stream, "413 Payload Too Large").await;
    }
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request_line = String::from_utf8_lossy(&buf[..head_end]);
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let receiver = path.trim_start_matches('/').to_owned();
    match serde_json::from_slice::<serde_json::Value>(&buf[head_end..head_end + length]) {
        Ok(body) => {
            notices.push(parse(&body, &receiver, crate::unix_ms()));
            respond(&mut stream, "200 OK").await
        }
        Err(_) => respond(&mut stream, "400 Bad Request").await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str) -> std::io::Result<()> {
    let reply = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

/// An alert's name and the labels that tell its instances apart in a report (`slo`, `replica`,
/// `downstream`, `instance`), e.g. `MeshServiceDown instance=logger`.
pub fn key_of(labels: &serde_json::Value) -> String {
    let label = |k: &str| labels[k].as_str().unwrap_or_default();
    let mut key = label("alertname").to_owned();
    for extra in ["slo", "replica", "downstream", "instance"] {
        let value = label(extra);
        if !value.is_empty() {
            key.push_str(&format!(" {extra}={value}"));
        }
    }
    key
}

/// The alerts of one webhook notification.
pub fn parse(body: &serde_json::Value, receiver: &str, at_unix_ms: u64) -> Vec<Notice> {
    let Some(alerts) = body["alerts"].as_array() else {
        return Vec::new();
    };
    alerts
        .iter()
        .map(|a| {
            let label = |k: &str| a["labels"][k].as_str().unwrap_or_default().to_owned();
            let alertname = label("alertname");
            let key = key_of(&a["labels"]);
            Notice {
                at_unix_ms,
                receiver: receiver.to_owned(),
                status: a["status"].as_str().unwrap_or_default().to_owned(),
                alertname,
                key,
                fingerprint: a["fingerprint"].as_str().unwrap_or_default().to_owned(),
                severity: label("severity"),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_webhook_post_is_recorded() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("test step");
        let addr = listener.local_addr().expect("test step");
        let notices = Notices::default();
        let server = tokio::spawn(serve(listener, notices.clone()));
        let body = r#"{"version":"4","status":"firing","alerts":[{"status":"firing","labels":{"alertname":"MeshServiceDown","severity":"P2","job":"mesh-logger","instance":"logger"},"fingerprint":"abc"}]}"#;
        let mut stream = TcpStream::connect(addr).await.expect("test step");
        let request = format!(
            "POST /page HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("test step");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.expect("test step");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        let got = notices.since(0);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].receiver, "page");
        assert_eq!(got[0].status, "firing");
        assert_eq!(got[0].alertname, "MeshServiceDown");
        assert_eq!(got[0].key, "MeshServiceDown instance=logger");
        server.abort();
    }
}
