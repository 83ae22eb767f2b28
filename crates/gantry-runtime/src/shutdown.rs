//! Graceful shutdown: signals, and an ordered drain of running components within a deadline.
//!
//! A [`Supervisor`] starts each long-running component (a server, a dispatcher) with its own
//! [`CancellationToken`]. When the trigger fires (SIGINT or SIGTERM in the binary, see
//! [`Signals`]) or a component stops on its own, the components are stopped one at a time
//! in reverse start order — the last started is the first stopped, so a server that depends on a
//! store stops before the store — each cancelled and awaited before the next. The whole drain has
//! one deadline; components still running when it passes are aborted and reported.
//!
//! **Invariant:** after [`Supervisor::run`] returns, no component task is left running.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How a component ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It returned `Ok` (after being told to stop, or on its own).
    Stopped,
    /// It returned an error.
    Failed(String),
    /// It panicked.
    Panicked,
    /// The drain deadline passed before it stopped; it was aborted.
    TimedOut,
}

/// Why the drain began and how every component ended, in stop order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainReport {
    /// What started the drain: the trigger, or the name of a component that stopped by itself.
    pub cause: DrainCause,
    /// `(component, outcome)` in the order they were stopped.
    pub outcomes: Vec<(String, Outcome)>,
}

/// What started the drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainCause {
    /// The trigger (a signal) fired.
    Trigger,
    /// A component ended before any signal; a server that stops by itself is a fault.
    ComponentExited(String),
}

impl DrainReport {
    /// True when the drain came from the trigger and every component stopped cleanly in time.
    pub fn is_clean(&self) -> bool {
        self.cause == DrainCause::Trigger
            && self.outcomes.iter().all(|(_, o)| *o == Outcome::Stopped)
    }
}

struct Component {
    name: String,
    token: CancellationToken,
    handle: JoinHandle<Result<(), String>>,
}

/// Owns the running components and stops them in order.
///
/// ```
/// use std::time::Duration;
/// use gantry_runtime::shutdown::{DrainCause, Outcome, Supervisor};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut supervisor = Supervisor::new(Duration::from_secs(5));
/// supervisor.spawn("server", |stop| async move {
///     stop.cancelled().await;
///     Ok::<(), std::io::Error>(())
/// });
/// let report = supervisor.run(async {}).await;
/// assert_eq!(report.cause, DrainCause::Trigger);
/// assert_eq!(report.outcomes, vec![("server".to_owned(), Outcome::Stopped)]);
/// # }
/// ```
pub struct Supervisor {
    deadline: Duration,
    components: Vec<Component>,
    /// Cancelled when any component's task ends, for whatever reason.
    exited: CancellationToken,
    /// The first component to end.
    first_exit: Arc<Mutex<Option<String>>>,
}

impl Supervisor {
    /// A supervisor whose drain may take at most `deadline`.
    pub fn new(deadline: Duration) -> Self {
        Self {
            deadline,
            components: Vec::new(),
            exited: CancellationToken::new(),
            first_exit: Arc::default(),
        }
    }

    /// Starts a component. `start` receives the token that tells it to stop; it should then
    /// finish in-flight work and return.
    pub fn spawn<F, Fut, E>(&mut self, name: &str, start: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let token = CancellationToken::new();
        let fut = start(token.clone());
        let exited = self.exited.clone();
        let first_exit = Arc::clone(&self.first_exit);
        let owned_name = name.to_owned();
        let handle = tokio::spawn(async move {
            // Noted even when the future panics: the guard runs on unwind.
            let _guard = ExitGuard {
                name: owned_name,
                exited,
                first_exit,
            };
            fut.await.map_err(|e| e.to_string())
        });
        self.components.push(Component {
            name: name.to_owned(),
            token,
            handle,
        });
    }

    /// Runs until `trigger` completes or a component ends by itself, then drains every component
    /// in reverse start order within the deadline.
    pub async fn run(mut self, trigger: impl Future<Output = ()>) -> DrainReport {
        tokio::select! {
            () = trigger => {}
            () = self.exited.cancelled() => {}
        }
        let early = self
            .first_exit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let cause = match early {
            Some(name) => DrainCause::ComponentExited(name),
            None => DrainCause::Trigger,
        };
        tracing::info!(?cause, deadline = ?self.deadline, "draining");
        let now = tokio::time::Instant::now();
        // A deadline too large to represent means "no deadline": a far future will do.
        let deadline = now
            .checked_add(self.deadline)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        let mut outcomes = Vec::with_capacity(self.components.len());
        while let Some(mut c) = self.components.pop() {
            c.token.cancel();
            let outcome = match tokio::time::timeout_at(deadline, &mut c.handle).await {
                Ok(Ok(Ok(()))) => Outcome::Stopped,
                Ok(Ok(Err(e))) => Outcome::Failed(e),
                Ok(Err(join)) if join.is_panic() => Outcome::Panicked,
                Ok(Err(_)) => Outcome::TimedOut,
                Err(_) => {
                    c.handle.abort();
                    Outcome::TimedOut
                }
            };
            match &outcome {
                Outcome::Stopped => tracing::info!(component = %c.name, "stopped"),
                Outcome::Failed(e) => tracing::error!(component = %c.name, error = %e, "failed"),
                Outcome::Panicked => tracing::error!(component = %c.name, "panicked"),
                Outcome::TimedOut => {
                    tracing::error!(component = %c.name, "did not stop before the drain deadline; aborted")
                }
            }
            outcomes.push((c.name, outcome));
        }
        DrainReport { cause, outcomes }
    }
}

struct ExitGuard {
    name: String,
    exited: CancellationToken,
    first_exit: Arc<Mutex<Option<String>>>,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if !self.exited.is_cancelled() {
            let mut first = self
                .first_exit
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            first.get_or_insert_with(|| std::mem::take(&mut self.name));
        }
        self.exited.cancel();
    }
}

/// SIGINT and SIGTERM, listened for from the moment this is made.
pub struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (which also stops the signals' default action of killing the
    /// process). Needs a tokio runtime.
    pub fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for the first SIGINT or SIGTERM. From then on, a second signal of either kind exits
    /// the process at once with status 130, whatever the drain is doing.
    pub async fn first(mut self) -> &'static str {
        let first = self.next().await;
        tracing::info!(
            signal = first,
            "shutdown requested; a second signal exits at once"
        );
        tokio::spawn(async move {
            let second = self.next().await;
            tracing::warn!(
                signal = second,
                "second signal; exiting without finishing the drain"
            );
            std::process::exit(130);
        });
        first
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    type Log = Arc<StdMutex<Vec<String>>>;

    /// A component that records when it is told to stop, then takes `linger` to finish.
    fn component(
        log: &Log,
        name: &'static str,
        linger: Duration,
    ) -> impl FnOnce(
        CancellationToken,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>> {
        let log = Arc::clone(log);
        move |stop| {
            Box::pin(async move {
                stop.cancelled().await;
                log.lock().unwrap().push(format!("stop {name}"));
                tokio::time::sleep(linger).await;
                log.lock().unwrap().push(format!("done {name}"));
                Ok(())
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn drains_in_reverse_start_order_one_at_a_time() {
        let log = Log::default();
        let mut s = Supervisor::new(Duration::from_secs(10));
        s.spawn("store", component(&log, "store", Duration::from_millis(10)));
        s.spawn(
            "server",
            component(&log, "server", Duration::from_millis(50)),
        );
        let report = s.run(tokio::time::sleep(Duration::from_secs(1))).await;
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(
            *log.lock().unwrap(),
            ["stop server", "done server", "stop store", "done store"]
        );
        assert_eq!(
            report.outcomes,
            [
                ("server".to_owned(), Outcome::Stopped),
                ("store".to_owned(), Outcome::Stopped)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn components_past_the_deadline_are_aborted() {
        let log = Log::default();
        let mut s = Supervisor::new(Duration::from_secs(2));
        s.spawn("store", component(&log, "store", Duration::from_millis(10)));
        s.spawn("slow", component(&log, "slow", Duration::from_secs(3600)));
        let started = tokio::time::Instant::now();
        let report = s.run(async {}).await;
        assert_eq!(
            report.outcomes,
            [
                ("slow".to_owned(), Outcome::TimedOut),
                ("store".to_owned(), Outcome::TimedOut)
            ]
        );
        assert!(!report.is_clean());
        // The whole drain shares one deadline.
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        // Past the deadline the store is cancelled and aborted at once, without waiting on it.
        assert_eq!(*log.lock().unwrap(), ["stop slow"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_component_ending_by_itself_drains_the_rest() {
        let log = Log::default();
        let mut s = Supervisor::new(Duration::from_secs(10));
        s.spawn("store", component(&log, "store", Duration::ZERO));
        s.spawn("server", |_stop| async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Err::<(), _>("address in use")
        });
        let report = s.run(std::future::pending()).await;
        assert_eq!(
            report.cause,
            DrainCause::ComponentExited("server".to_owned())
        );
        assert_eq!(
            report.outcomes,
            [
                (
                    "server".to_owned(),
                    Outcome::Failed("address in use".to_owned())
                ),
                ("store".to_owned(), Outcome::Stopped)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_component_is_reported() {
        let mut s = Supervisor::new(Duration::from_secs(10));
        s.spawn("bad", |_stop| async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            panic!("boom");
            #[allow(unreachable_code)]
            Ok::<(), String>(())
        });
        let report = s.run(std::future::pending()).await;
        assert_eq!(report.cause, DrainCause::ComponentExited("bad".to_owned()));
        assert_eq!(report.outcomes, [("bad".to_owned(), Outcome::Panicked)]);
    }

    #[tokio::test(start_paused = true)]
    async fn huge_deadline_does_not_overflow() {
        let mut s = Supervisor::new(Duration::MAX);
        s.spawn("c", |stop| async move {
            stop.cancelled().await;
            Ok::<(), String>(())
        });
        assert!(s.run(async {}).await.is_clean());
    }
}
