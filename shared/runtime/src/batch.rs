//! Draining a queue in batches: the pattern both the gateway's record shipper and the logger's
//! writer use.

use std::time::Duration;

use tokio::sync::mpsc;

/// The next batch from `receiver`: waits for a first item, then takes more until `max` items
/// or until the first one has waited `wait`. Returns `None` once the queue is closed and empty;
/// the flag says the queue closed while this batch was filling (it is the last).
pub async fn next_batch<T>(
    receiver: &mut mpsc::Receiver<T>,
    max: usize,
    wait: Duration,
) -> Option<(Vec<T>, bool)> {
    next_batch_weighted(receiver, max, wait, |_| 1).await
}

/// Like [`next_batch`], but a batch is full once the `weight` of its items reaches `max` (e.g.
/// items that each carry several records).
pub async fn next_batch_weighted<T>(
    receiver: &mut mpsc::Receiver<T>,
    max: usize,
    wait: Duration,
    weight: impl Fn(&T) -> usize,
) -> Option<(Vec<T>, bool)> {
    let first = receiver.recv().await?;
    let mut total = weight(&first);
    let mut batch = Vec::with_capacity(max.min(1024));
    batch.push(first);
    let flush_at = tokio::time::Instant::now() + wait;
    while total < max {
        // Fill until full, or until the first item has waited long enough.
        tokio::select! {
            next = receiver.recv() => match next {
                Some(item) => {
                    total += weight(&item);
                    batch.push(item);
                }
                None => return Some((batch, true)),
            },
            _ = tokio::time::sleep_until(flush_at) => break,
        }
    }
    Some((batch, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_batch_ends_when_full_when_its_first_item_waited_enough_or_when_closed() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 0..5 {
            tx.send(i).await.expect("send");
        }
        let (full, closed) = next_batch(&mut rx, 3, Duration::from_secs(1))
            .await
            .expect("batch");
        assert_eq!((full, closed), (vec![0, 1, 2], false));
        let (rest, closed) = next_batch(&mut rx, 3, Duration::from_millis(50))
            .await
            .expect("batch");
        assert_eq!(
            (rest, closed),
            (vec![3, 4], false),
            "flushed after the wait"
        );
        tx.send(9).await.expect("send");
        drop(tx);
        assert_eq!(
            next_batch(&mut rx, 3, Duration::from_secs(1)).await,
            Some((vec![9], true))
        );
        assert_eq!(next_batch(&mut rx, 3, Duration::from_secs(1)).await, None);
    }
}
