//! The worker's book of attempts: which attempts it holds, which acks are waiting to be sent or
//! answered, and when each attempt's lease needs its next heartbeat. Pure: no I/O, time is a
//! parameter, and the runtime handle of a running attempt is an opaque `H`.
//!
//! An attempt is held from the moment the server pushes it until the server answers its ack (or
//! the attempt is found lost). Held attempts are what a reconnecting worker re-registers, so an
//! attempt whose handler finished while the server was away is re-adopted and acked, not re-run.
//!
//! **Invariant:** an ack is sent at least once per held attempt and forgotten only when the server
//! answers it (either way: a refused ack is final, since acks are fenced by attempt) or the
//! attempt is lost. Acks sent on a stream that broke before answering are sent again on the next.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::proto::gantry::jobs::v1;

/// One attempt: (job id, attempt number). The attempt number is the fencing token.
pub(crate) type Key = (String, u32);

/// Lease assumed when a pushed job does not say (the server's default timeout).
pub(crate) const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Shortest pause between heartbeats of one attempt.
const MIN_BEAT: Duration = Duration::from_millis(10);
/// After a failed heartbeat call, the longest wait before trying again.
const BEAT_RETRY: Duration = Duration::from_millis(500);

#[derive(Debug)]
enum State<H> {
    /// The handler runs.
    Running(H),
    /// The handler finished; the ack waits to be sent or answered.
    Acking(v1::WorkAck),
    /// The server no longer counts this attempt as ours; the handler is being stopped. Not
    /// re-registered, not heartbeated, not acked.
    Lost(H),
}

#[derive(Debug)]
struct Entry<H> {
    state: State<H>,
    /// Heartbeat period: a third of the lease.
    every: Duration,
    next_beat: Instant,
    beating: bool,
}

/// The attempts a worker holds.
#[derive(Debug)]
pub(crate) struct Ledger<H> {
    entries: HashMap<Key, Entry<H>>,
    /// Acks to send on the current stream, oldest first.
    unsent: VecDeque<Key>,
    /// Batches sent on the current stream and not yet answered, oldest first.
    sent: VecDeque<Vec<Key>>,
    max_batch: usize,
    max_batch_bytes: usize,
}

/// What became of an attempt whose handler finished.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    /// Its ack is queued.
    Queued,
    /// It was lost meanwhile (or unknown): nothing to ack.
    Dropped,
}

impl<H> Ledger<H> {
    /// Batches hold at most `max_batch` acks and, unless one ack alone is larger,
    /// `max_batch_bytes` of results and errors (a batch is one gRPC message, and servers bound
    /// message sizes).
    pub(crate) fn new(max_batch: usize, max_batch_bytes: usize) -> Self {
        Self {
            entries: HashMap::new(),
            unsent: VecDeque::new(),
            sent: VecDeque::new(),
            max_batch: max_batch.max(1),
            max_batch_bytes,
        }
    }

    fn entry(state: State<H>, lease: Duration, now: Instant) -> Entry<H> {
        let every = (lease / 3).max(MIN_BEAT);
        Entry {
            state,
            every,
            next_beat: now + every,
            beating: false,
        }
    }

    /// A pushed attempt starts running. False if the attempt is already held (nothing changes).
    pub(crate) fn start(&mut self, key: Key, lease: Duration, now: Instant, handle: H) -> bool {
        if self.entries.contains_key(&key) {
            return false;
        }
        self.entries
            .insert(key, Self::entry(State::Running(handle), lease, now));
        true
    }

    /// A pushed attempt that ends before it runs (e.g. its arguments do not deserialize).
    pub(crate) fn start_finished(
        &mut self,
        key: Key,
        lease: Duration,
        now: Instant,
        ack: v1::WorkAck,
    ) {
        if self.entries.contains_key(&key) {
            return;
        }
        self.entries
            .insert(key.clone(), Self::entry(State::Acking(ack), lease, now));
        self.unsent.push_back(key);
    }

    /// The handler of `key` finished with `ack`. Returns its handle, if it had one.
    pub(crate) fn finish(&mut self, key: &Key, ack: v1::WorkAck) -> (Finish, Option<H>) {
        let Some(entry) = self.entries.get_mut(key) else {
            return (Finish::Dropped, None);
        };
        match std::mem::replace(&mut entry.state, State::Acking(ack)) {
            State::Running(h) => {
                self.unsent.push_back(key.clone());
                (Finish::Queued, Some(h))
            }
            State::Lost(h) => {
                self.entries.remove(key);
                (Finish::Dropped, Some(h))
            }
            // Finished twice: keep the first ack.
            State::Acking(first) => {
                entry.state = State::Acking(first);
                (Finish::Dropped, None)
            }
        }
    }

    /// The running handle of `key`, to signal a cancel.
    pub(crate) fn running_mut(&mut self, key: &Key) -> Option<&mut H> {
        match self.entries.get_mut(key).map(|e| &mut e.state) {
            Some(State::Running(h)) => Some(h),
            _ => None,
        }
    }

    /// Handles of attempts whose handlers still run (running or lost).
    pub(crate) fn handles_mut(&mut self) -> impl Iterator<Item = (&Key, &mut H)> {
        self.entries
            .iter_mut()
            .filter_map(|(k, e)| match &mut e.state {
                State::Running(h) | State::Lost(h) => Some((k, h)),
                State::Acking(_) => None,
            })
    }

    /// The server says `key` is no longer ours. Returns the handle to stop if the handler still
    /// runs; the attempt is forgotten once it finishes.
    pub(crate) fn lose(&mut self, key: &Key) -> Option<&mut H> {
        let mut entry = self.entries.remove(key)?;
        match entry.state {
            State::Acking(_) => None,
            State::Running(h) | State::Lost(h) => {
                entry.state = State::Lost(h);
                match &mut self.entries.entry(key.clone()).or_insert(entry).state {
                    State::Lost(h) => Some(h),
                    State::Running(_) | State::Acking(_) => None,
                }
            }
        }
    }

    /// Attempts to re-register on a new stream: running, or finished with the ack unanswered.
    pub(crate) fn held(&self) -> Vec<v1::Held> {
        let mut held: Vec<v1::Held> = self
            .entries
            .iter()
            .filter(|(_, e)| !matches!(e.state, State::Lost(_)))
            .map(|((job_id, attempt), _)| v1::Held {
                job_id: job_id.clone(),
                attempt: i32::try_from(*attempt).unwrap_or(i32::MAX),
            })
            .collect();
        held.sort_by(|a, b| (&a.job_id, a.attempt).cmp(&(&b.job_id, b.attempt)));
        held
    }

    /// The next batch of acks to send, marked as sent; `None` when nothing waits.
    pub(crate) fn take_batch(&mut self) -> Option<Vec<v1::WorkAck>> {
        let mut keys = Vec::new();
        let mut acks = Vec::new();
        let mut bytes = 0;
        while acks.len() < self.max_batch {
            let Some(key) = self.unsent.pop_front() else {
                break;
            };
            if let Some(Entry {
                state: State::Acking(ack),
                ..
            }) = self.entries.get(&key)
            {
                let size = ack.job_id.len() + ack.result.len() + ack.error.len() + 16;
                if !acks.is_empty() && bytes + size > self.max_batch_bytes {
                    self.unsent.push_front(key);
                    break;
                }
                bytes += size;
                acks.push(ack.clone());
                keys.push(key);
            }
        }
        if acks.is_empty() {
            return None;
        }
        self.sent.push_back(keys);
        Some(acks)
    }

    /// The batch last taken could not be sent: it goes back to the front of the queue.
    pub(crate) fn put_back(&mut self) {
        if let Some(keys) = self.sent.pop_back() {
            for key in keys.into_iter().rev() {
                self.unsent.push_front(key);
            }
        }
    }

    /// The server answered the oldest unanswered batch: those attempts are settled. Returns each
    /// attempt with its answer, or an error when no batch was waiting for one.
    pub(crate) fn answered(
        &mut self,
        results: Vec<v1::AckResult>,
    ) -> Result<Vec<(Key, v1::AckResult)>, String> {
        let keys = self
            .sent
            .pop_front()
            .ok_or_else(|| format!("{} ack results with no batch outstanding", results.len()))?;
        if keys.len() != results.len() {
            // Settle nothing on a malformed answer: the acks go out again on the next stream.
            self.sent.push_front(keys);
            return Err(format!(
                "{} ack results for a batch of {}",
                results.len(),
                self.sent.front().map_or(0, Vec::len)
            ));
        }
        for key in &keys {
            self.entries.remove(key);
        }
        Ok(keys.into_iter().zip(results).collect())
    }

    /// The stream broke: acks sent on it and not answered go out again, in order, on the next.
    pub(crate) fn disconnected(&mut self) {
        while let Some(keys) = self.sent.pop_back() {
            for key in keys.into_iter().rev() {
                self.unsent.push_front(key);
            }
        }
    }

    /// Whether acks wait to be sent.
    pub(crate) fn has_unsent(&self) -> bool {
        self.unsent.iter().any(|k| {
            matches!(
                self.entries.get(k),
                Some(Entry {
                    state: State::Acking(_),
                    ..
                })
            )
        })
    }

    /// When the next heartbeat is due, if any attempt needs one and none is in flight for it.
    pub(crate) fn next_beat_at(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter(|e| !e.beating && !matches!(e.state, State::Lost(_)))
            .map(|e| e.next_beat)
            .min()
    }

    /// Attempts to heartbeat now: those due, plus those due within half their period (so one call
    /// covers attempts that would otherwise need their own a moment later). Marked in flight.
    pub(crate) fn due_beats(&mut self, now: Instant, max: usize) -> Vec<Key> {
        let mut due: Vec<(Instant, Key)> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.beating && !matches!(e.state, State::Lost(_)))
            .filter(|(_, e)| e.next_beat <= now + e.every / 2)
            .map(|(k, e)| (e.next_beat, k.clone()))
            .collect();
        due.sort();
        due.truncate(max);
        due.into_iter()
            .map(|(_, key)| {
                if let Some(e) = self.entries.get_mut(&key) {
                    e.beating = true;
                }
                key
            })
            .collect()
    }

    /// A heartbeat for `key` was answered ok: the next one is a period from now.
    pub(crate) fn beat_ok(&mut self, key: &Key, now: Instant) {
        if let Some(e) = self.entries.get_mut(key) {
            e.beating = false;
            e.next_beat = now + e.every;
        }
    }

    /// A heartbeat call failed (the server is unreachable): try again soon.
    pub(crate) fn beat_failed(&mut self, key: &Key, now: Instant) {
        if let Some(e) = self.entries.get_mut(key) {
            e.beating = false;
            e.next_beat = now + e.every.min(BEAT_RETRY);
        }
    }

    /// Whether `key` is held at all.
    pub(crate) fn contains(&self, key: &Key) -> bool {
        self.entries.contains_key(key)
    }

    /// Whether the handler of `key` runs and the attempt is not lost.
    pub(crate) fn is_running(&self, key: &Key) -> bool {
        matches!(
            self.entries.get(key),
            Some(Entry {
                state: State::Running(_),
                ..
            })
        )
    }

    /// Nothing held at all (not even lost attempts still stopping).
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Attempts held, lost ones included.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, attempt: u32) -> Key {
        (id.to_owned(), attempt)
    }

    fn ok(k: &Key) -> v1::WorkAck {
        v1::WorkAck {
            job_id: k.0.clone(),
            attempt: i32::try_from(k.1).unwrap(),
            success: true,
            ..Default::default()
        }
    }

    fn answer(k: &Key, ok: bool) -> v1::AckResult {
        v1::AckResult {
            job_id: k.0.clone(),
            attempt: i32::try_from(k.1).unwrap(),
            ok,
            ..Default::default()
        }
    }

    fn held_ids(l: &Ledger<()>) -> Vec<String> {
        l.held().into_iter().map(|h| h.job_id).collect()
    }

    #[test]
    fn an_attempt_is_held_until_its_ack_is_answered() {
        let now = Instant::now();
        let mut l = Ledger::new(10, usize::MAX);
        let a = key("a", 1);
        assert!(l.start(a.clone(), DEFAULT_LEASE, now, ()));
        assert!(!l.start(a.clone(), DEFAULT_LEASE, now, ()), "pushed twice");
        assert_eq!(held_ids(&l), ["a"]);
        assert_eq!(l.finish(&a, ok(&a)), (Finish::Queued, Some(())));
        assert_eq!(held_ids(&l), ["a"], "finished but unanswered is still held");
        let batch = l.take_batch().unwrap();
        assert_eq!(batch.len(), 1);
        assert!(l.take_batch().is_none());
        let settled = l.answered(vec![answer(&a, true)]).unwrap();
        assert_eq!(settled[0].0, a);
        assert!(l.is_empty());
        assert!(l.answered(vec![]).is_err(), "no batch outstanding");
    }

    #[test]
    fn unanswered_acks_are_resent_in_order_after_a_disconnect() {
        let now = Instant::now();
        let mut l = Ledger::new(2, usize::MAX);
        let keys: Vec<Key> = (1..=5).map(|i| key(&format!("j{i}"), 1)).collect();
        for k in &keys {
            l.start(k.clone(), DEFAULT_LEASE, now, ());
            l.finish(k, ok(k));
        }
        let first = l.take_batch().unwrap();
        let second = l.take_batch().unwrap();
        assert_eq!((first.len(), second.len()), (2, 2));
        l.answered(vec![answer(&keys[0], true), answer(&keys[1], false)])
            .unwrap();
        l.disconnected();
        assert_eq!(held_ids(&l), ["j3", "j4", "j5"]);
        let again: Vec<String> = std::iter::from_fn(|| l.take_batch())
            .flatten()
            .map(|a| a.job_id)
            .collect();
        assert_eq!(again, ["j3", "j4", "j5"]);
    }

    #[test]
    fn put_back_restores_the_queue_front() {
        let now = Instant::now();
        let mut l = Ledger::new(1, usize::MAX);
        for k in [key("a", 1), key("b", 1)] {
            l.start(k.clone(), DEFAULT_LEASE, now, ());
            l.finish(&k, ok(&k));
        }
        assert_eq!(l.take_batch().unwrap()[0].job_id, "a");
        l.put_back();
        assert!(l.has_unsent());
        assert_eq!(l.take_batch().unwrap()[0].job_id, "a");
        assert_eq!(l.take_batch().unwrap()[0].job_id, "b");
        assert!(!l.has_unsent());
    }

    #[test]
    fn batches_are_bounded_in_bytes_but_always_carry_one_ack() {
        let now = Instant::now();
        let mut l = Ledger::new(100, 1_000);
        for (id, size) in [("a", 400), ("b", 400), ("c", 5_000), ("d", 10)] {
            let k = key(id, 1);
            l.start(k.clone(), DEFAULT_LEASE, now, ());
            let mut ack = ok(&k);
            ack.result = vec![b'1'; size];
            l.finish(&k, ack);
        }
        let sizes: Vec<Vec<String>> = std::iter::from_fn(|| l.take_batch())
            .map(|b| b.into_iter().map(|a| a.job_id).collect())
            .collect();
        assert_eq!(sizes, [vec!["a", "b"], vec!["c"], vec!["d"]]);
    }

    #[test]
    fn lost_attempts_are_neither_held_nor_acked() {
        let now = Instant::now();
        let mut l = Ledger::new(10, usize::MAX);
        let (a, b) = (key("a", 1), key("b", 2));
        l.start(a.clone(), DEFAULT_LEASE, now, ());
        l.start(b.clone(), DEFAULT_LEASE, now, ());
        l.finish(&b, ok(&b));
        assert!(l.lose(&a).is_some(), "a still runs: stop it");
        assert!(l.lose(&b).is_none(), "b finished: just forget it");
        assert!(l.held().is_empty());
        assert!(l.take_batch().is_none(), "b's ack would be refused");
        assert_eq!(l.len(), 1, "a is kept until its handler stops");
        assert_eq!(l.finish(&a, ok(&a)), (Finish::Dropped, Some(())));
        assert!(l.is_empty());
        assert_eq!(l.finish(&key("x", 1), ok(&key("x", 1))).0, Finish::Dropped);
    }

    #[test]
    fn heartbeats_come_every_third_of_the_lease_and_batch_together() {
        let t0 = Instant::now();
        let mut l = Ledger::new(10, usize::MAX);
        let (a, b) = (key("a", 1), key("b", 1));
        l.start(a.clone(), Duration::from_millis(300), t0, ());
        l.start(
            b.clone(),
            Duration::from_millis(300),
            t0 + Duration::from_millis(40),
            (),
        );
        assert_eq!(l.next_beat_at(), Some(t0 + Duration::from_millis(100)));
        assert!(l.due_beats(t0, 10).is_empty());
        // At 100 ms `a` is due and `b` (due at 140 ms) is close enough to join it.
        let due = l.due_beats(t0 + Duration::from_millis(100), 10);
        assert_eq!(due, [a.clone(), b.clone()]);
        assert_eq!(l.next_beat_at(), None, "both in flight");
        l.beat_ok(&a, t0 + Duration::from_millis(110));
        l.beat_failed(&b, t0 + Duration::from_millis(110));
        assert_eq!(l.next_beat_at(), Some(t0 + Duration::from_millis(210)));
        l.lose(&a);
        assert_eq!(l.next_beat_at(), Some(t0 + Duration::from_millis(210)));
        assert_eq!(l.due_beats(t0 + Duration::from_millis(210), 10), [b]);
    }
}
