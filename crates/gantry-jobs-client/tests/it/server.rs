//! An in-process `gantry-jobs` server on a loopback port, stoppable and restartable on the same
//! port and database.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gantry_jobs::engine::Engine;
use gantry_jobs::metrics::JobsMetrics;
use gantry_jobs::server::{self, ServeError};
use gantry_jobs::store::sqlite::{SqliteOptions, SqliteStore, Sync};
use gantry_jobs_client::{Client, HandlerError, Worker, WorkerBuilder, WorkerError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Server {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<Result<(), ServeError>>,
    dir: PathBuf,
}

impl Server {
    pub async fn start() -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "gantry-jobs-client-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(dir, listener)
    }

    fn serve(dir: PathBuf, listener: tokio::net::TcpListener) -> Self {
        let store = SqliteStore::open(SqliteOptions {
            sync: Sync::Normal,
            ..SqliteOptions::new(dir.join("jobs.db"))
        })
        .unwrap();
        let engine = Engine::new(store, JobsMetrics::unregistered().unwrap());
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server::serve(engine, listener, stop.clone()));
        Self {
            addr,
            stop,
            task,
            dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.url()).await.unwrap()
    }

    pub fn worker(&self) -> WorkerBuilder {
        Worker::builder(&self.url()).drain_timeout(Duration::from_secs(5))
    }

    /// Stops the server (its streams end UNAVAILABLE) and returns its data directory.
    pub async fn shutdown(self) -> (SocketAddr, PathBuf) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
        (self.addr, self.dir)
    }

    /// A new server on the same port and database as a stopped one.
    pub async fn start_again(addr: SocketAddr, dir: PathBuf) -> Self {
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    eprintln!("rebinding {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot rebind {addr}: {e}"),
            }
        };
        Self::serve(dir, listener)
    }

    /// Stops the server and deletes its database.
    pub async fn stop(self) {
        let (_, dir) = self.shutdown().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A worker running in the background until [`Running::stop`].
pub struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), WorkerError>>,
}

pub fn spawn(worker: Worker) -> Running {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(worker.run(async move {
        let _ = stopped.await;
    }));
    Running { stop, task }
}

impl Running {
    /// Triggers the graceful shutdown and waits for `run` to return.
    pub async fn stop(self) -> Result<(), WorkerError> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the worker did not stop within 10 s")
            .unwrap()
    }
}

/// `i64` addition, the usual handler.
pub async fn add(args: (i64, i64)) -> Result<i64, HandlerError> {
    Ok(args.0 + args.1)
}
