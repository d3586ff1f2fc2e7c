//! A bounded pool of worker threads: jobs go in through a bounded queue and results
//! come back through another, so whoever feeds the pool holds at most a queue's worth
//! of work in flight, whatever the size of the volume. The scanner hashes files with
//! it, `verify` re-hashes them.

use std::thread::Scope;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

pub struct Pool<J, R> {
    /// Dropped by [`Pool::close`]: the workers finish what is queued and stop.
    jobs: Option<Sender<J>>,
    results: Receiver<R>,
    /// Jobs queued whose results have not been taken yet.
    in_flight: usize,
}

impl<J: Send, R: Send> Pool<J, R> {
    /// Starts `threads` workers in `scope`, each doing every job it takes with a
    /// worker function of its own from `worker` (so each can keep its own buffers);
    /// `depth` jobs (and as many results) wait at most.
    pub fn start<'scope, W>(
        scope: &'scope Scope<'scope, '_>,
        threads: usize,
        depth: usize,
        worker: impl Fn() -> W,
    ) -> Self
    where
        W: FnMut(J) -> R + Send + 'scope,
        J: 'scope,
        R: 'scope,
    {
        let (job_tx, job_rx) = bounded::<J>(depth);
        let (result_tx, result_rx) = bounded::<R>(depth);
        for _ in 0..threads.max(1) {
            let (job_rx, result_tx) = (job_rx.clone(), result_tx.clone());
            let mut work = worker();
            scope.spawn(move || {
                for job in job_rx {
                    if result_tx.send(work(job)).is_err() {
                        return;
                    }
                }
            });
        }
        Pool {
            jobs: Some(job_tx),
            results: result_rx,
            in_flight: 0,
        }
    }

    /// Queues `job`, and returns a result for the caller to handle if one is ready. A
    /// result is taken as soon as there is one, so that a worker seldom finds the result
    /// queue full: crossbeam's `send` spins and yields before it sleeps, which took a
    /// tenth of a node's CPU in its first scan, where the caller is the slower side. When
    /// the job queue is full, a result is waited for first, so that the workers go on.
    pub fn submit(&mut self, job: J) -> Option<R> {
        let jobs = self.jobs.as_ref().expect("no job is submitted after close");
        let mut result = self.results.try_recv().ok();
        if result.is_some() {
            self.in_flight -= 1;
        }
        match jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                // The queue is full, so a worker is busy and will answer; once its result
                // is taken it takes another job, and this one finds room.
                if result.is_none() {
                    result = Some(self.results.recv().expect("workers answer every job"));
                    self.in_flight -= 1;
                }
                jobs.send(job).expect("workers live as long as the pool");
            }
            Err(TrySendError::Disconnected(_)) => unreachable!("workers live as long as the pool"),
        }
        self.in_flight += 1;
        result
    }

    /// Closes the queue: the workers stop once it is empty.
    pub fn close(&mut self) {
        self.jobs = None;
    }

    /// The next result of a queued job, waiting for it; `None` once every job queued has
    /// been answered.
    pub fn next_result(&mut self) -> Option<R> {
        if self.in_flight == 0 {
            return None;
        }
        let result = self.results.recv().expect("workers answer every job");
        self.in_flight -= 1;
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_job_is_answered_once_with_a_small_queue() {
        let mut answers = Vec::new();
        std::thread::scope(|scope| {
            let mut pool = Pool::start(scope, 3, 2, || |n: u64| n * 2);
            for n in 0..1000 {
                answers.extend(pool.submit(n));
            }
            pool.close();
            while let Some(answer) = pool.next_result() {
                answers.push(answer);
            }
        });
        answers.sort_unstable();
        assert_eq!(answers, (0..1000).map(|n| n * 2).collect::<Vec<_>>());
    }
}
