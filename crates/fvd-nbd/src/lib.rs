//! The NBD (Network Block Device) protocol for FVD: codec, client and
//! server.
//!
//! * [`proto`] — the pure codec: bytes to protocol messages and back, no
//!   I/O. Always built.
//! * [`client`] (feature `client`) — one asynchronous NBD client on tokio:
//!   many requests in flight per connection, several connections where
//!   the server allows it, reconnects and retries.
//! * [`server`] (feature `server`) — a tokio NBD server that exports an
//!   `fvd-core` image over a unix socket or TCP, with optional TLS.
//!
//! The client and the server share only the codec and the byte stream
//! type ([`stream`]); neither imports the other.

#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]

#[cfg(feature = "client")]
pub mod client;
#[cfg(any(feature = "client", feature = "server"))]
mod pem;
pub mod proto;
#[cfg(feature = "server")]
pub mod server;
#[cfg(any(feature = "client", feature = "server"))]
pub mod stream;

#[doc(hidden)]
pub use proto::fuzz_decode;
