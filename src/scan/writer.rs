//! The index writer of a full walk: the walk's batches written on a thread of their
//! own, in order, while the walk goes on.
//!
//! Writing a batch (RocksDB's memtable inserts, a few per file) took about a third of
//! the walking thread's time on a volume of tiny files, with the other core idle. A
//! walk only reads keys of the directory it lists and of the names in it, which no
//! batch of the same walk has written before (every directory is listed once), so it
//! need not wait for its earlier batches to land. What reads more (hard-link groups,
//! deletes, the tree) runs after [`Writer::settle`]; a checkpoint's tree update after
//! [`Writer::drain`]. Narrow scans (the watcher's:
//! renames read the index entries of other directories, and a start directory's
//! entry is written before its parent is listed) write in line, as before.

use std::thread::Scope;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::store::{Batch, Durability, Store, StoreError};

/// Batches waiting for the writer, besides the one it writes: the walk runs ahead by
/// at most this many (each up to `BATCH_OPS` operations).
const QUEUED: usize = 1;

pub(super) struct Writer<'s> {
    batches: Option<Sender<Batch<'s>>>,
    /// One answer per batch, in order: the first error ends the writer.
    written: Receiver<Result<(), StoreError>>,
    in_flight: usize,
}

impl<'s> Writer<'s> {
    pub(super) fn start<'scope>(scope: &'scope Scope<'scope, '_>, store: &'s Store) -> Self
    where
        's: 'scope,
    {
        let (batches, to_write) = bounded::<Batch<'s>>(QUEUED);
        let (done, written) = bounded(QUEUED + 1);
        scope.spawn(move || {
            for batch in to_write {
                let result = store.write(batch, Durability::Buffered);
                let failed = result.is_err();
                if done.send(result).is_err() || failed {
                    return;
                }
            }
        });
        Writer {
            batches: Some(batches),
            written,
            in_flight: 0,
        }
    }

    /// Hands `batch` to the writer (waiting while [`QUEUED`] others wait); an error of a
    /// batch written before is returned here.
    pub(super) fn write(&mut self, batch: Batch<'s>) -> Result<(), StoreError> {
        while let Ok(result) = self.written.try_recv() {
            self.in_flight -= 1;
            result?;
        }
        let batches = self.batches.as_ref().expect("no batch after settle");
        if let Err(unsent) = batches.send(batch) {
            // The writer stopped at an error, which is waiting to be taken.
            drop(unsent);
            return self.settle();
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Waits until every batch handed over is written; the writer goes on.
    pub(super) fn drain(&mut self) -> Result<(), StoreError> {
        while self.in_flight > 0 {
            match self.written.recv() {
                Ok(result) => {
                    self.in_flight -= 1;
                    result?;
                }
                // The writer is gone: its last answer was an error, taken above.
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Waits until every batch handed over is written, and stops the writer.
    pub(super) fn settle(&mut self) -> Result<(), StoreError> {
        self.batches = None;
        let mut first = Ok(());
        while self.in_flight > 0 {
            match self.written.recv() {
                Ok(result) => {
                    self.in_flight -= 1;
                    if first.is_ok() {
                        first = result;
                    }
                }
                // The writer is gone: its last answer was an error, taken above.
                Err(_) => break,
            }
        }
        first
    }
}
