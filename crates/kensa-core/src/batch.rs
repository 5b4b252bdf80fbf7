//! The cross-camera batcher: frames from every camera are grouped into batches that flush on
//! `max_size`, on `max_wait` (the timer starts at a batch's first frame), and when the input
//! closes (shutdown), so a partial batch is never lost.

use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Receives items until a batch is ready. Returns `None` once the input is closed and empty.
pub async fn next_batch<T>(rx: &mut mpsc::Receiver<T>, max_size: usize, max_wait: Duration) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    Some(fill_batch(first, rx, max_size, max_wait).await)
}

/// A batch that starts with `first`: whatever is queued, then what arrives within `max_wait`
/// of now, up to `max_size`; it ends early when the input closes.
pub async fn fill_batch<T>(first: T, rx: &mut mpsc::Receiver<T>, max_size: usize, max_wait: Duration) -> Vec<T> {
    let max_size = max_size.max(1);
    let mut batch = Vec::with_capacity(max_size);
    batch.push(first);
    let deadline = Instant::now() + max_wait;
    while batch.len() < max_size {
        // Take whatever is already queued without waiting.
        match rx.try_recv() {
            Ok(item) => {
                batch.push(item);
                continue;
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(item)) => batch.push(item),
            Ok(None) | Err(_) => break,
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn flushes_on_size() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 0..5 {
            tx.send(i).await.unwrap();
        }
        let b = next_batch(&mut rx, 4, Duration::from_secs(10)).await.unwrap();
        assert_eq!(b, vec![0, 1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_on_max_wait_from_first_item() {
        let (tx, mut rx) = mpsc::channel(16);
        tx.send(1).await.unwrap();
        let t0 = Instant::now();
        let h = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            tx.send(2).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send(3).await.unwrap();
            tx
        });
        let b = next_batch(&mut rx, 8, Duration::from_millis(50)).await.unwrap();
        assert_eq!(b, vec![1, 2]);
        assert_eq!(Instant::now() - t0, Duration::from_millis(50));
        let _tx = h.await.unwrap();
        let b = next_batch(&mut rx, 8, Duration::from_millis(50)).await.unwrap();
        assert_eq!(b, vec![3]);
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_partial_batch_on_close_then_ends() {
        let (tx, mut rx) = mpsc::channel(16);
        tx.send(7).await.unwrap();
        tx.send(8).await.unwrap();
        drop(tx);
        assert_eq!(next_batch(&mut rx, 8, Duration::from_secs(60)).await, Some(vec![7, 8]));
        assert_eq!(next_batch(&mut rx, 8, Duration::from_secs(60)).await, None);
    }
}
