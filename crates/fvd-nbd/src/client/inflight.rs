//! The requests in flight on one connection, and their replies as they
//! are assembled from what the server sends.
//!
//! A request enters the table (keyed by its cookie) before its header is
//! written, so that its reply always finds it; the connection's reader
//! takes it out while it reads a chunk into it and puts it back unless the
//! chunk ended the reply. Chunks of different replies may interleave, as
//! the protocol allows. When the connection dies the table is closed: every
//! request in it fails with the reason, and no request enters any more.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::error::Failure;
use crate::proto::request::{Command, Request};

/// One reply, as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reply {
    /// Cookie of the request.
    pub cookie: u64,
    /// A simple reply (else structured or extended chunks).
    pub simple: bool,
    /// The error of a simple reply (0: success); see [`Reply::error`].
    pub simple_error: u32,
    /// The chunks of a structured reply, in the order received.
    pub chunks: Vec<Chunk>,
    /// The data of a read: the whole requested range, holes as zeros
    /// (empty for other commands and failed reads).
    pub data: Vec<u8>,
}

/// One chunk of a structured reply (data itself goes to [`Reply::data`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA` at `offset`, `length` bytes.
    Data {
        /// Offset in the export.
        offset: u64,
        /// Bytes of data.
        length: u64,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    Hole {
        /// Offset in the export.
        offset: u64,
        /// Bytes of zeros.
        length: u64,
    },
    /// Block status descriptors `(length, flags)` of a metadata context
    /// (compact descriptors widened to 64 bits).
    Status {
        /// Metadata context id.
        context_id: u32,
        /// `(extent length, status flags)`.
        descriptors: Vec<(u64, u64)>,
    },
    /// An error chunk.
    Error {
        /// NBD error code.
        error: u32,
        /// The server's message.
        message: String,
        /// Where the error happened (`ERROR_OFFSET`).
        offset: Option<u64>,
    },
}

impl Reply {
    /// The NBD error of the reply: that of a simple reply, or the first
    /// error chunk's; 0 for success.
    pub fn error(&self) -> u32 {
        self.first_error().map_or(0, |(e, _)| e)
    }

    /// The error code and the server's message, if the request failed.
    pub fn first_error(&self) -> Option<(u32, &str)> {
        if self.simple {
            return (self.simple_error != 0).then_some((self.simple_error, ""));
        }
        self.chunks.iter().find_map(|c| match c {
            Chunk::Error { error, message, .. } => Some((*error, message.as_str())),
            _ => None,
        })
    }

    /// The block status descriptors of metadata context `context_id`.
    pub fn status(&self, context_id: u32) -> Option<&[(u64, u64)]> {
        self.chunks.iter().find_map(|c| match c {
            Chunk::Status {
                context_id: id,
                descriptors,
            } if *id == context_id => Some(descriptors.as_slice()),
            _ => None,
        })
    }
}

/// What a request waits on.
pub(crate) type Waiter = oneshot::Receiver<Result<Reply, Failure>>;

/// A request in flight and its reply so far.
pub(crate) struct Pending {
    pub(crate) request: Request,
    pub(crate) reply: Reply,
    /// `(offset, length)` of the data and hole chunks of a read.
    covered: Vec<(u64, u64)>,
    done: oneshot::Sender<Result<Reply, Failure>>,
    _slot: OwnedSemaphorePermit,
}

impl Pending {
    /// The read buffer, allocated (zeroed) on first use.
    pub(crate) fn data(&mut self) -> &mut Vec<u8> {
        if self.reply.data.is_empty() {
            let len = usize::try_from(self.request.length).unwrap_or(0);
            self.reply.data = vec![0u8; len];
        }
        &mut self.reply.data
    }

    /// Note that a data or hole chunk covered `[offset, offset + length)`.
    pub(crate) fn cover(&mut self, offset: u64, length: u64) {
        self.covered.push((offset, length));
    }

    /// The reply is complete: check that a successful read was covered
    /// exactly once, then hand the reply over.
    pub(crate) fn finish(mut self, target: &str) {
        let r = self.request;
        if r.command == Command::Read
            && !self.reply.simple
            && self.reply.error() == 0
            && let Err(msg) = check_coverage(&mut self.covered, r.offset, r.length)
        {
            self.fail(Failure::protocol(
                target,
                format!(
                    "reply to the read of {} bytes at offset {}: {msg}",
                    r.length, r.offset
                ),
            ));
            return;
        }
        let _ = self.done.send(Ok(self.reply));
    }

    /// The request failed.
    pub(crate) fn fail(self, f: Failure) {
        let _ = self.done.send(Err(f));
    }
}

/// Whether `ranges` cover `[offset, offset + length)` exactly, without
/// overlap.
fn check_coverage(ranges: &mut [(u64, u64)], offset: u64, length: u64) -> Result<(), String> {
    ranges.sort_unstable();
    let mut pos = offset;
    for &(at, n) in ranges.iter() {
        if at != pos {
            return Err(if at < pos {
                format!("chunks overlap at offset {at}")
            } else {
                format!("no data for offset {pos}")
            });
        }
        pos = pos.saturating_add(n);
    }
    let end = offset.saturating_add(length);
    if pos != end {
        return Err(format!("no data for offset {pos}"));
    }
    Ok(())
}

struct State {
    pending: HashMap<u64, Pending>,
    closed: Option<Failure>,
    next_cookie: u64,
}

/// The table of requests in flight on one connection.
pub(crate) struct Table {
    state: Mutex<State>,
    /// One permit per request in flight (held by its [`Pending`]).
    slots: Arc<Semaphore>,
    max_inflight: usize,
}

impl Table {
    /// A table for at most `max_inflight` requests at once.
    pub(crate) fn new(max_inflight: usize) -> Table {
        let max_inflight = max_inflight.max(1);
        Table {
            state: Mutex::new(State {
                pending: HashMap::new(),
                closed: None,
                next_cookie: 1,
            }),
            slots: Arc::new(Semaphore::new(max_inflight)),
            max_inflight,
        }
    }

    /// Wait for room for one more request.
    pub(crate) async fn slot(&self) -> Result<OwnedSemaphorePermit, Failure> {
        // The semaphore is never closed; the error cannot happen.
        self.slots.clone().acquire_owned().await.map_err(|_| {
            Failure::permanent(io::ErrorKind::Other, "request slots closed".to_string())
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests in flight (entered, reply not yet complete).
    pub(crate) fn inflight(&self) -> usize {
        self.max_inflight
            .saturating_sub(self.slots.available_permits())
    }

    /// Why the connection died, once it has.
    pub(crate) fn closed(&self) -> Option<Failure> {
        self.lock().closed.clone()
    }

    /// Enter `request` (its cookie assigned here unless `keep_cookie`);
    /// returns the request as entered and what its caller waits on.
    pub(crate) fn enter(
        &self,
        mut request: Request,
        keep_cookie: bool,
        slot: OwnedSemaphorePermit,
    ) -> Result<(Request, Waiter), Failure> {
        let mut st = self.lock();
        if let Some(f) = &st.closed {
            return Err(f.clone());
        }
        if !keep_cookie {
            request.cookie = st.next_cookie;
            st.next_cookie = st.next_cookie.wrapping_add(1).max(1);
        }
        if st.pending.contains_key(&request.cookie) {
            return Err(Failure::permanent(
                io::ErrorKind::InvalidInput,
                format!("cookie {} is already in flight", request.cookie),
            ));
        }
        let (done, waiter) = oneshot::channel();
        let reply = Reply {
            cookie: request.cookie,
            ..Reply::default()
        };
        st.pending.insert(
            request.cookie,
            Pending {
                request,
                reply,
                covered: Vec::new(),
                done,
                _slot: slot,
            },
        );
        Ok((request, waiter))
    }

    /// Take the request with `cookie` out (to read a reply into it).
    pub(crate) fn take(&self, cookie: u64) -> Option<Pending> {
        self.lock().pending.remove(&cookie)
    }

    /// Put back a request whose reply goes on; fails it if the connection
    /// died meanwhile.
    pub(crate) fn put_back(&self, p: Pending) {
        let mut st = self.lock();
        match &st.closed {
            Some(f) => {
                let f = f.clone();
                drop(st);
                p.fail(f);
            }
            None => {
                st.pending.insert(p.request.cookie, p);
            }
        }
    }

    /// The connection died: fail every request with `f`, refuse new ones.
    /// Returns false if it was already closed.
    pub(crate) fn close(&self, f: &Failure) -> bool {
        let drained: Vec<Pending> = {
            let mut st = self.lock();
            if st.closed.is_some() {
                return false;
            }
            st.closed = Some(f.clone());
            st.pending.drain().map(|(_, p)| p).collect()
        };
        for p in drained {
            p.fail(f.clone());
        }
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn coverage() {
        assert!(check_coverage(&mut [(0, 10)], 0, 10).is_ok());
        assert!(check_coverage(&mut [(5, 5), (0, 5)], 0, 10).is_ok());
        assert!(check_coverage(&mut [], 0, 0).is_ok());
        assert!(
            check_coverage(&mut [(0, 5)], 0, 10)
                .unwrap_err()
                .contains("offset 5")
        );
        assert!(
            check_coverage(&mut [(0, 6), (5, 5)], 0, 10)
                .unwrap_err()
                .contains("overlap")
        );
        assert!(check_coverage(&mut [(1, 9)], 0, 10).is_err());
        assert!(check_coverage(&mut [(0, 5), (5, 5), (10, 1)], 0, 10).is_err());
    }
}
