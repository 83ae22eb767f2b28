//! A TCP proxy on loopback that delays every chunk of bytes, in each direction, by a fixed
//! latency — the `network-latency` scenario's slow network.
//!
//! Chunks are pipelined, not serialised: each is stamped when read and written once its delay
//! has passed, so the link adds latency without limiting throughput (up to a bounded queue of
//! chunks per direction, which gives backpressure).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Chunks in flight per direction of one connection.
const QUEUE: usize = 1024;
/// Largest chunk read at once.
const CHUNK: usize = 64 * 1024;

/// A running proxy; stops (dropping every connection) when dropped or [`DelayProxy::stop`]ped.
pub struct DelayProxy {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl DelayProxy {
    /// Listens on a free loopback port and forwards to `target`, delaying by `latency` each way.
    pub async fn start(target: SocketAddr, latency: Duration) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind the delay proxy")?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, target, latency, stop.clone()));
        Ok(Self { addr, stop })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and closes every connection.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    latency: Duration,
    stop: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                conns.spawn(relay(client, target, latency, stop.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
}

async fn relay(client: TcpStream, target: SocketAddr, latency: Duration, stop: CancellationToken) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let mut pumps = JoinSet::new();
    pumps.spawn(pump(client_read, server_write, latency));
    pumps.spawn(pump(server_read, client_write, latency));
    tokio::select! {
        () = stop.cancelled() => {}
        // One direction closed: the other side learns of it from its own read.
        _ = async { while pumps.join_next().await.is_some() {} } => {}
    }
}

/// Copies `from` to `to`, each chunk `latency` after it was read.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, latency: Duration) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send((Instant::now() + latency, buf[..n].to_vec()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delays_each_way_and_keeps_bytes_in_order() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        let proxy = DelayProxy::start(target, Duration::from_millis(30))
            .await
            .unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        let started = std::time::Instant::now();
        c.write_all(b"hello ").await.unwrap();
        c.write_all(b"world").await.unwrap();
        let mut got = vec![0u8; 11];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world");
        // There and back: at least twice the latency.
        assert!(started.elapsed() >= Duration::from_millis(60));
        proxy.stop();
    }
}
