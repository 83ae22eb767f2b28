//! The worker registry: who is connected, what they handle, how much room they have, and which
//! attempts each one holds. Plain data, no I/O: the engine's dispatch loop drives it.
//!
//! A worker is one open `PollJobs` stream (a [`ConnId`]), not a worker id: an SDK that reconnects
//! with the same id while its old stream lingers gets a second, separate entry, and closing the old
//! stream abandons only what the old stream held.
//!
//! **Invariant:** a worker's `in_flight` equals the number of attempts in `holders` that point at
//! it, and never exceeds its concurrency by the registry's doing.

use std::collections::{BTreeMap, HashMap};

use tokio::sync::mpsc;

use crate::model::Job;
use crate::store::ClaimRequest;

/// One open worker stream.
pub type ConnId = u64;

/// A message to a worker.
#[derive(Debug, Clone)]
pub enum ToWorker {
    /// Run this job.
    Job(Box<Job>),
    /// Stop working on this attempt: it was cancelled.
    Cancel {
        /// The job.
        job_id: String,
        /// The attempt.
        attempt: u32,
    },
}

#[derive(Debug)]
struct Worker {
    worker_id: String,
    names: Vec<String>,
    concurrency: usize,
    in_flight: usize,
    /// Asked for no more jobs.
    draining: bool,
    tx: mpsc::Sender<ToWorker>,
}

/// Connected workers and the attempts they hold.
#[derive(Debug, Default)]
pub struct Registry {
    next_conn: ConnId,
    /// Where the next round of claim requests starts, so no worker is always served first.
    rotation: usize,
    workers: BTreeMap<ConnId, Worker>,
    /// Job id → (holder, attempt).
    holders: HashMap<String, (ConnId, u32)>,
}

/// A job handed to a worker's channel, or handed back because the channel would not take it.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// In the worker's channel.
    Sent,
    /// The worker is gone or its channel full: give the attempt up.
    Undeliverable,
}

impl Registry {
    /// Adds a worker stream.
    pub fn connect(
        &mut self,
        worker_id: String,
        names: Vec<String>,
        concurrency: usize,
        tx: mpsc::Sender<ToWorker>,
    ) -> ConnId {
        self.next_conn += 1;
        let conn = self.next_conn;
        self.workers.insert(
            conn,
            Worker {
                worker_id,
                names,
                concurrency,
                in_flight: 0,
                draining: false,
                tx,
            },
        );
        conn
    }

    /// Replaces a worker's names and concurrency (a later message on its stream).
    pub fn update(&mut self, conn: ConnId, names: Vec<String>, concurrency: usize) {
        if let Some(w) = self.workers.get_mut(&conn) {
            w.names = names;
            w.concurrency = concurrency;
        }
    }

    /// Removes a worker stream and returns the attempts it held, to be abandoned.
    pub fn disconnect(&mut self, conn: ConnId) -> Vec<(String, u32)> {
        if self.workers.remove(&conn).is_none() {
            return Vec::new();
        }
        let held: Vec<(String, u32)> = self
            .holders
            .iter()
            .filter(|(_, (c, _))| *c == conn)
            .map(|(id, (_, attempt))| (id.clone(), *attempt))
            .collect();
        for (id, _) in &held {
            self.holders.remove(id);
        }
        held
    }

    /// A claim request for every worker with room, keyed by its stream. Each call starts one
    /// worker further along, so when fewer jobs are due than there is room, successive rounds
    /// hand them to different workers.
    pub fn claim_requests(&mut self) -> Vec<(ConnId, ClaimRequest)> {
        let mut requests: Vec<(ConnId, ClaimRequest)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.in_flight < w.concurrency && !w.draining && !w.tx.is_closed())
            .map(|(conn, w)| {
                (
                    *conn,
                    ClaimRequest {
                        worker_id: w.worker_id.clone(),
                        names: w.names.clone(),
                        limit: w.concurrency - w.in_flight,
                    },
                )
            })
            .collect();
        if !requests.is_empty() {
            self.rotation = self.rotation.wrapping_add(1);
            let start = self.rotation % requests.len();
            requests.rotate_left(start);
        }
        requests
    }

    /// Hands a claimed job to its worker's channel.
    pub fn deliver(&mut self, conn: ConnId, job: Job) -> Delivery {
        let Some(w) = self.workers.get_mut(&conn) else {
            return Delivery::Undeliverable;
        };
        let (id, attempt) = (job.id.clone(), job.attempt);
        match w.tx.try_send(ToWorker::Job(Box::new(job))) {
            Ok(()) => {
                w.in_flight += 1;
                self.holders.insert(id, (conn, attempt));
                Delivery::Sent
            }
            Err(_) => Delivery::Undeliverable,
        }
    }

    /// The attempt of `job_id` ended (acked, expired, abandoned): frees its worker's slot.
    /// `attempt: None` releases whatever attempt is held. Returns true if a slot was freed.
    pub fn release(&mut self, job_id: &str, attempt: Option<u32>) -> bool {
        let Some(&(conn, held)) = self.holders.get(job_id) else {
            return false;
        };
        if attempt.is_some_and(|a| a != held) {
            return false;
        }
        self.holders.remove(job_id);
        if let Some(w) = self.workers.get_mut(&conn) {
            w.in_flight = w.in_flight.saturating_sub(1);
        }
        true
    }

    /// Tells the holder of a running attempt that it was cancelled. False if nobody holds it.
    pub fn notify_cancel(&self, job_id: &str) -> bool {
        let Some(&(conn, attempt)) = self.holders.get(job_id) else {
            return false;
        };
        self.workers.get(&conn).is_some_and(|w| {
            w.tx.try_send(ToWorker::Cancel {
                job_id: job_id.to_owned(),
                attempt,
            })
            .is_ok()
        })
    }

    /// Counts a running attempt (re-adopted after a reconnect) against `conn`, taking it from
    /// any other stream that held it.
    pub fn adopt(&mut self, conn: ConnId, job_id: String, attempt: u32) {
        if !self.workers.contains_key(&conn) {
            return;
        }
        self.release(&job_id, None);
        if let Some(w) = self.workers.get_mut(&conn) {
            w.in_flight += 1;
        }
        self.holders.insert(job_id, (conn, attempt));
    }

    /// Stops sending jobs to `conn`.
    pub fn drain(&mut self, conn: ConnId) {
        if let Some(w) = self.workers.get_mut(&conn) {
            w.draining = true;
        }
    }

    /// Attempts `conn` holds now (0 for an unknown stream).
    pub fn in_flight(&self, conn: ConnId) -> usize {
        self.workers.get(&conn).map_or(0, |w| w.in_flight)
    }

    /// Number of connected worker streams.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// True when no worker is connected.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Every held attempt, for the shutdown path.
    pub fn held(&self) -> usize {
        self.holders.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobOptions, NewJob};

    fn job(id: &str, attempt: u32) -> Job {
        let mut j = Job::create(
            id.into(),
            NewJob {
                name: "n".into(),
                queue: "default".into(),
                priority: 0,
                args: vec![],
                options: JobOptions::default(),
                idempotency_key: None,
                run_at: 0,
            },
            0,
        );
        j.attempt = attempt;
        j
    }

    #[test]
    fn capacity_follows_deliveries_and_releases() {
        let mut r = Registry::default();
        let (tx, mut rx) = mpsc::channel(8);
        let c = r.connect("w".into(), vec!["n".into()], 2, tx);
        assert_eq!(r.claim_requests()[0].1.limit, 2);
        assert_eq!(r.deliver(c, job("a", 1)), Delivery::Sent);
        assert_eq!(r.claim_requests()[0].1.limit, 1);
        assert_eq!(r.deliver(c, job("b", 1)), Delivery::Sent);
        assert!(r.claim_requests().is_empty());
        assert!(!r.release("a", Some(2)), "a stale attempt frees nothing");
        assert!(r.release("a", Some(1)));
        assert!(!r.release("a", None), "released twice");
        assert_eq!(r.claim_requests()[0].1.limit, 1);
        assert!(matches!(rx.try_recv(), Ok(ToWorker::Job(j)) if j.id == "a"));
    }

    #[test]
    fn disconnect_returns_only_that_streams_attempts() {
        let mut r = Registry::default();
        let (tx1, _rx1) = mpsc::channel(8);
        let (tx2, _rx2) = mpsc::channel(8);
        let old = r.connect("same-id".into(), vec![], 5, tx1);
        let new = r.connect("same-id".into(), vec![], 5, tx2);
        r.deliver(old, job("a", 3));
        r.deliver(new, job("b", 1));
        assert_eq!(r.disconnect(old), vec![("a".to_owned(), 3)]);
        assert_eq!(r.held(), 1);
        assert_eq!(r.len(), 1);
        assert!(r.disconnect(old).is_empty());
    }

    #[test]
    fn draining_workers_get_no_claims_and_adoption_moves_attempts() {
        let mut r = Registry::default();
        let (tx1, _rx1) = mpsc::channel(8);
        let (tx2, _rx2) = mpsc::channel(8);
        let old = r.connect("w".into(), vec![], 2, tx1);
        let new = r.connect("w".into(), vec![], 2, tx2);
        r.deliver(old, job("a", 4));
        r.adopt(new, "a".into(), 4);
        assert_eq!((r.in_flight(old), r.in_flight(new)), (0, 1));
        assert!(
            r.disconnect(old).is_empty(),
            "the old stream no longer holds it"
        );
        r.drain(new);
        assert!(r.claim_requests().is_empty());
        assert!(r.release("a", Some(4)));
        assert_eq!(r.in_flight(new), 0);
    }

    #[test]
    fn closed_or_full_channels_are_undeliverable() {
        let mut r = Registry::default();
        let (tx, rx) = mpsc::channel(1);
        let c = r.connect("w".into(), vec![], 10, tx);
        assert_eq!(r.deliver(c, job("a", 1)), Delivery::Sent);
        assert_eq!(r.deliver(c, job("b", 1)), Delivery::Undeliverable);
        drop(rx);
        assert!(r.claim_requests().is_empty());
        assert_eq!(r.deliver(99, job("c", 1)), Delivery::Undeliverable);
    }
}
