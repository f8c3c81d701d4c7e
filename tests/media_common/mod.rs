//! Loopback HTTP servers and inputs for the media-safety tests.
#![allow(dead_code)]

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llava_server::frontend::media::MediaPolicy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Every test finishes within this, whatever the fetcher does.
pub const TEST_LIMIT: Duration = Duration::from_secs(20);

pub fn fixture_png() -> Vec<u8> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/scene_336x336.png");
    std::fs::read(path).expect("fixture image")
}

/// A one-route-per-closure HTTP/1.1 server that counts the connections it accepted.
pub struct TestServer {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TestServer {
    pub async fn start<F, Fut>(ip: &str, handler: F) -> Self
    where
        F: Fn(String, TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0))
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                tokio::spawn(async move {
                    if let Some(path) = read_request_path(&mut stream).await {
                        handler(path, stream).await;
                    }
                });
            }
        });
        Self {
            addr,
            connections,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn read_request_path(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 || head.len() > 16 * 1024 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head).lines().next()?.to_owned();
    line.split_whitespace().nth(1).map(str::to_owned)
}

pub async fn respond(mut stream: TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body).await;
    let _ = stream.shutdown().await;
}

pub async fn image_server(ip: &str, png: Vec<u8>) -> TestServer {
    let png = Arc::new(png);
    TestServer::start(ip, move |_path, stream| {
        let png = png.clone();
        async move {
            respond(
                stream,
                "200 OK",
                &[("Content-Type", "image/png".into())],
                &png,
            )
            .await
        }
    })
    .await
}

/// Answers every request with a redirect to `location(path)`.
pub async fn redirect_server(
    ip: &str,
    location: impl Fn(&str) -> String + Send + Sync + 'static,
) -> TestServer {
    TestServer::start(ip, move |path, stream| {
        let target = location(&path);
        async move { respond(stream, "302 Found", &[("Location", target)], b"").await }
    })
    .await
}

pub async fn bounded<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_LIMIT, future)
        .await
        .expect("test ran past its time limit")
}

pub fn allowlisted(ip: &str) -> MediaPolicy {
    MediaPolicy {
        private_allowlist: vec![ip.parse().unwrap()],
        ..MediaPolicy::default()
    }
}

/// A PNG whose header claims `width`×`height` RGB pixels; the pixel data is a stub.
pub fn png_header(width: u32, height: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
            }
        }
        !crc
    }
    pub fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}
