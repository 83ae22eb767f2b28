//! Servers the harness runs itself (a child process on a free loopback port with a fresh
//! database), killing and restarting them, and reading a process's memory from `/proc`.
//!
//! It does not know any server's protocol: readiness is a probe the caller passes in.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::stats::{Clock, Micros};

/// Which server binary a [`Server`] runs, and so how it is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerKind {
    /// `gantry jobs serve --listen ADDR --db PATH` (admin server on a free port).
    Gantry,
    /// Reseolio's core: `RESEOLIO_ADDR=ADDR RESEOLIO_DB=PATH reseolio`.
    Reseolio,
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The kind of binary.
    pub kind: ServerKind,
    /// Its path.
    pub bin: PathBuf,
    /// The address it listens on (the same after every restart).
    pub addr: SocketAddr,
    /// Its SQLite database file (the same after every restart).
    pub db: PathBuf,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

/// A server child process. Killed when dropped.
#[derive(Debug)]
pub struct Server {
    spec: Spec,
    child: Option<Child>,
    pid: Arc<AtomicU32>,
    /// Peak RSS (VmHWM) of the processes already gone.
    past_peak: u64,
}

impl Server {
    /// Starts the server (without waiting for it to listen).
    pub fn start(spec: Spec) -> anyhow::Result<Self> {
        let mut server = Self {
            spec,
            child: None,
            pid: Arc::new(AtomicU32::new(0)),
            past_peak: 0,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let s = &self.spec;
        let log = File::options()
            .create(true)
            .append(true)
            .open(&s.log)
            .with_context(|| format!("cannot open the server log {}", s.log.display()))?;
        let mut cmd = Command::new(&s.bin);
        match s.kind {
            ServerKind::Gantry => {
                cmd.args(["jobs", "serve", "--listen", &s.addr.to_string(), "--db"])
                    .arg(&s.db)
                    .env("GANTRY_ADMIN_LISTEN", "127.0.0.1:0");
            }
            ServerKind::Reseolio => {
                cmd.env("RESEOLIO_ADDR", s.addr.to_string())
                    .env("RESEOLIO_DB", &s.db);
            }
        }
        cmd.envs(s.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start the server {}", s.bin.display()))?;
        self.pid.store(child.id(), Ordering::Relaxed);
        self.child = Some(child);
        Ok(())
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.spec.addr
    }

    /// The current process id (0 while none runs), shared so samplers follow restarts.
    pub fn pid(&self) -> Arc<AtomicU32> {
        Arc::clone(&self.pid)
    }

    /// Waits until `probe` answers true, failing if the process exits first or `limit` passes.
    pub async fn wait_ready<F, Fut>(&mut self, limit: Duration, mut probe: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "the server exited ({status}) before it was ready; its log ends:\n{}",
                        log_tail(&self.spec.log)
                    );
                }
            }
            if probe().await {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the server at {} was not ready within {limit:?}; its log ends:\n{}",
                    self.spec.addr,
                    log_tail(&self.spec.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            if let Some(m) = memory(child.id()) {
                self.past_peak = self.past_peak.max(m.hwm);
            }
            self.pid.store(0, Ordering::Relaxed);
            // An already exited child makes kill fail; wait reaps it either way.
            let _ = child.kill();
            child.wait().context("cannot reap the killed server")?;
        }
        Ok(())
    }

    /// Starts the process again on the same address and database.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        self.spawn()
    }

    /// Peak resident memory (VmHWM) over every process this server has been, so far.
    pub fn peak_rss(&self) -> u64 {
        let current = self
            .child
            .as_ref()
            .and_then(|c| memory(c.id()))
            .map_or(0, |m| m.hwm.max(m.rss));
        self.past_peak.max(current)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// The last 2 KiB of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(2048)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    read().unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

/// A free loopback address (bound and released; another process could take it in between).
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?)
}

/// A fresh directory for one run's databases and logs.
pub fn work_dir(label: &str) -> anyhow::Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "gantry-bench-{label}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the work directory {}", dir.display()))?;
    Ok(dir)
}

/// Resident memory of a process, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Now (VmRSS).
    pub rss: u64,
    /// Peak since it started (VmHWM).
    pub hwm: u64,
}

/// Reads `/proc/PID/status`; `None` when the process is gone (or this is not Linux).
pub fn memory(pid: u32) -> Option<Memory> {
    if pid == 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status(&text)
}

/// VmRSS and VmHWM from the text of `/proc/PID/status`.
pub fn parse_status(text: &str) -> Option<Memory> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some(Memory {
        rss: field("VmRSS:")?,
        hwm: field("VmHWM:")?,
    })
}

/// CPU time (user + system) a process has used, in seconds; `None` when it is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    if pid == 0 {
        return None;
    }
    parse_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime from the text of `/proc/PID/stat`, at Linux's 100 clock ticks per second.
pub fn parse_cpu(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces; fields after its closing parenthesis start at
    // field 3, so utime (14) and stime (15) are the 12th and 13th of them.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Samples a process's RSS at a fixed interval, following restarts through the shared pid.
pub struct Sampler {
    samples: Arc<Mutex<Vec<(Micros, u64)>>>,
    peak: Arc<AtomicU64>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Sampler {
    /// Starts sampling `pid` every `every`.
    pub fn start(pid: Arc<AtomicU32>, every: Duration, clock: Clock) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let peak = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (samples, peak, stop) = (Arc::clone(&samples), Arc::clone(&peak), stop.clone());
            async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    if let Some(m) = memory(pid.load(Ordering::Relaxed)) {
                        peak.fetch_max(m.hwm.max(m.rss), Ordering::Relaxed);
                        samples
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push((clock.now(), m.rss));
                    }
                }
            }
        });
        Self {
            samples,
            peak,
            stop,
            task,
        }
    }

    /// Stops sampling; returns the samples (time, RSS bytes) and the peak seen.
    pub async fn finish(self) -> (Vec<(Micros, u64)>, u64) {
        self.stop.cancel();
        let _ = self.task.await;
        let samples =
            std::mem::take(&mut *self.samples.lock().unwrap_or_else(PoisonError::into_inner));
        (samples, self.peak.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status() {
        let text = "Name:\tgantry\nVmPeak:\t  900 kB\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\n";
        assert_eq!(
            parse_status(text),
            Some(Memory {
                rss: 1024 * 1024,
                hwm: 2048 * 1024
            })
        );
        assert_eq!(parse_status("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn parses_proc_stat_cpu() {
        let stat = "42 (tokio rt) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1 2 3";
        assert_eq!(parse_cpu(stat), Some(3.0));
        assert_eq!(parse_cpu("42 (x"), None);
        assert!(cpu_seconds(std::process::id()).is_some());
    }

    #[test]
    fn reads_its_own_memory() {
        let m = memory(std::process::id()).expect("this test runs on Linux");
        assert!(m.rss > 0 && m.hwm >= m.rss);
        assert_eq!(memory(0), None);
    }
}
