//! A real server on 127.0.0.1:0 over a temporary data directory.

use std::net::SocketAddr;
use std::sync::Arc;

use gantry_search::api::{self, AppState};
use gantry_search::metrics::SearchMetrics;
use gantry_search::node::Node;
use tokio_util::sync::CancellationToken;

pub struct TestServer {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestServer {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Self::start_in(dir.path()).await;
        s._dir = Some(dir);
        s
    }

    pub async fn start_in(path: &std::path::Path) -> Self {
        let path = path.to_owned();
        let metrics = SearchMetrics::unregistered().expect("metrics");
        let refresh_seconds = metrics.refresh_seconds.clone();
        let node =
            tokio::task::spawn_blocking(move || Node::open_with(&path, Some(refresh_seconds)))
                .await
                .expect("join")
                .expect("node opens");
        let node = Arc::new(node);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = AppState {
            node: node.clone(),
            metrics,
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(api::serve(listener, state, stop.clone()));
        Self {
            addr,
            node,
            stop,
            task: Some(task),
            _dir: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || node.close())
            .await
            .expect("close");
    }
}
