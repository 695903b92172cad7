//! The buffer between a stream's ingest and its forwarder.
//!
//! Today it is memory, bounded in bytes: when it is full, ingest waits, stops reading the
//! agent's QUIC stream, and QUIC flow control pushes back on the agent. Because this
//! buffer is not durable, the relay acknowledges a record to its source only when the
//! master target has acknowledged it (see `session`).
//!
//! This is the seam where the durable segmented cache goes: it will offer the same
//! `push` (durable append) / `pop` (read cursor) pair, and the relay will then
//! acknowledge sources on cache durability instead.

use std::sync::Arc;

use fbr_protocol::Record;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Producer half: ingest pushes records in sequence order.
#[derive(Debug)]
pub struct QueueWriter {
    tx: mpsc::UnboundedSender<(Record, OwnedSemaphorePermit)>,
    budget: Arc<Semaphore>,
    capacity: u32,
}

/// Consumer half: the forwarder pops them in the same order.
#[derive(Debug)]
pub struct QueueReader {
    rx: mpsc::UnboundedReceiver<(Record, OwnedSemaphorePermit)>,
}

/// A queue holding at most `capacity_bytes` of encoded records.
pub fn stream_queue(capacity_bytes: u32) -> (QueueWriter, QueueReader) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        QueueWriter {
            tx,
            budget: Arc::new(Semaphore::new(capacity_bytes as usize)),
            capacity: capacity_bytes,
        },
        QueueReader { rx },
    )
}

impl QueueWriter {
    /// Appends `record`, waiting while the queue is full. Returns `false` if the reader
    /// is gone.
    pub async fn push(&self, record: Record) -> bool {
        // A record larger than the whole queue still gets through, alone.
        let cost = (record.encoded_len() as u32).min(self.capacity);
        let Ok(permit) = self.budget.clone().acquire_many_owned(cost).await else {
            return false;
        };
        self.tx.send((record, permit)).is_ok()
    }
}

impl QueueReader {
    /// The next record, waiting for one; `None` once the writer is dropped and the queue
    /// is empty.
    pub async fn pop(&mut self) -> Option<Record> {
        self.rx.recv().await.map(|(r, _permit)| r)
    }

    /// The next record if one is already queued.
    pub fn try_pop(&mut self) -> Option<Record> {
        self.rx.try_recv().ok().map(|(r, _permit)| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;

    fn write(seq: u64, len: usize) -> Record {
        Record::Write {
            seq,
            offset: 0,
            data: Bytes::from(vec![0; len]),
        }
    }

    #[tokio::test]
    async fn push_waits_when_full_and_resumes_after_pop() {
        let (w, mut r) = stream_queue(3000);
        assert!(w.push(write(1, 2048)).await);
        // A second 2 KiB record does not fit until the first is popped.
        let blocked = tokio::time::timeout(Duration::from_millis(50), w.push(write(2, 2048))).await;
        assert!(blocked.is_err(), "push should wait while the queue is full");
        assert_eq!(r.pop().await.map(|r| r.seq()), Some(1));
        assert!(w.push(write(2, 2048)).await);
        assert_eq!(r.pop().await.map(|r| r.seq()), Some(2));
        drop(w);
        assert_eq!(r.pop().await, None);
    }
}
