//! The byte stream under both the client and the server: a unix socket or
//! a TCP connection, possibly upgraded to TLS by `NBD_OPT_STARTTLS`.
//!
//! Both sides negotiate on a [`Stream`] (which may change from plain to
//! TLS half-way through) and then [`Stream::into_split`] it: the
//! transmission phase reads replies (or requests) on one task and writes on
//! another.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// A connection before any TLS: a unix socket or TCP.
#[derive(Debug)]
pub enum Plain {
    /// A unix domain socket.
    Unix(UnixStream),
    /// A TCP connection.
    Tcp(TcpStream),
}

/// A connection, plain or upgraded to TLS (client or server side).
#[derive(Debug)]
pub enum Stream {
    /// Not encrypted.
    Plain(Plain),
    /// After a successful `STARTTLS`.
    Tls(Box<tokio_rustls::TlsStream<Plain>>),
}

/// The reading half of a split [`Stream`].
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The writing half of a split [`Stream`].
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

impl Stream {
    /// A plain unix socket stream.
    pub fn unix(s: UnixStream) -> Stream {
        Stream::Plain(Plain::Unix(s))
    }

    /// A plain TCP stream (Nagle's algorithm off: requests and replies are
    /// small and latency matters).
    pub fn tcp(s: TcpStream) -> Stream {
        let _ = s.set_nodelay(true);
        Stream::Plain(Plain::Tcp(s))
    }

    /// Whether TLS is up.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Separate halves for a reader task and a writer task. Plain sockets
    /// split without a lock; a TLS stream shares its state behind one.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Plain(Plain::Unix(s)) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Plain(Plain::Tcp(s)) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (Box::new(r), Box::new(w))
            }
        }
    }
}

macro_rules! delegate_plain {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Plain::Unix($s) => $e,
            Plain::Tcp($s) => $e,
        }
    };
}

impl AsyncRead for Plain {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate_plain!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Plain {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate_plain!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_plain!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_plain!(self, s => Pin::new(s).poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate_plain!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
}

macro_rules! delegate_stream {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Tls(t) => {
                let $s = Pin::new(t.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate_stream!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate_stream!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_stream!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_stream!(self, s => s.poll_shutdown(cx))
    }
}

/// Write all of `bufs` with as few vectored writes as the stream allows
/// (one system call for a whole batch of requests or replies).
pub(crate) async fn write_all_vectored<W: AsyncWrite + Unpin + ?Sized, B: AsRef<[u8]>>(
    w: &mut W,
    bufs: &[B],
) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = bufs
        .iter()
        .map(|b| b.as_ref())
        .filter(|b| !b.is_empty())
        .map(io::IoSlice::new)
        .collect();
    let mut rest: &mut [io::IoSlice<'_>] = &mut slices;
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}
