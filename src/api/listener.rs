//! The server's listener and its accept loop: at most `max_connections` connections are open at
//! once (further clients wait in the kernel's accept queue); a client that sends its request head too
//! slowly — or leaves a keep-alive connection idle — is cut after `header_read_timeout`; and a
//! connection whose client stops reading — a write that makes no progress for `write_timeout` —
//! fails its write, so hyper closes it and the request behind it is aborted instead of holding
//! buffers and KV blocks for as long as the client likes. Each connection's kernel send buffer is
//! fixed too (`SEND_BUFFER_BYTES`).
//!
//! The loop is ours rather than `axum::serve` because that one gives hyper no timer, and without a
//! timer hyper cannot time out a request head (one byte a minute would hold a connection forever).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::serve::Listener;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

pub struct BoundedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    write_timeout: Duration,
}

impl BoundedListener {
    pub fn new(inner: TcpListener, max_connections: usize, write_timeout: Duration) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(max_connections.max(1))),
            write_timeout,
        }
    }
}

impl Listener for BoundedListener {
    type Io = BoundedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (BoundedStream, SocketAddr) {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed");
        let (io, addr) = Listener::accept(&mut self.inner).await;
        limit_send_buffer(&io);
        let stream = BoundedStream {
            io,
            _permit: permit,
            write_timeout: self.write_timeout,
            stalled: None,
        };
        (stream, addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Serves `app` on `listener` (HTTP/1.1) until `shutdown` resolves; then stops accepting (new
/// connections are refused), lets every open connection finish its request in flight, and returns
/// once all are closed.
pub async fn serve_connections(
    mut listener: BoundedListener,
    app: axum::Router,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let connections = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // Clients that hang up, stall or send garbage end here; none of it is the server's fault.
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.shutdown().await;
}

/// Kernel memory a connection's unsent bytes may take. Linux grows send buffers up to 4 MiB each
/// on its own; a fixed 256 KiB bounds what stalled clients pin in the kernel (1 GiB at 4096
/// connections) and is far more than a token stream needs in flight.
const SEND_BUFFER_BYTES: libc::c_int = 256 << 10;

fn limit_send_buffer(io: &TcpStream) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket descriptor and a c_int option value of the stated size.
    let result = unsafe {
        libc::setsockopt(
            io.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&SEND_BUFFER_BYTES as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "cannot set the send buffer size");
    }
}

/// A connection that holds one permit while open and times out writes that stall.
pub struct BoundedStream {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    write_timeout: Duration,
    /// Armed when a write first returns pending; cleared when one makes progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl BoundedStream {
    /// A pending write: pending still, or an error once it has been pending for `write_timeout`.
    fn poll_stall<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.write_timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed<T>(
        &mut self,
        result: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.poll_stall(cx),
        }
    }
}

impl AsyncRead for BoundedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for BoundedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        this.progressed(result, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.progressed(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_flush(cx);
        this.progressed(result, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
