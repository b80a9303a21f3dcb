//! Timeouts and retries with exponential backoff and jitter.
//!
//! Every remote operation runs through [`Policy::run`]: a failure is either
//! transient (the connection dropped or timed out, the server is busy or
//! restarting) and worth another try after a pause, or permanent (the export
//! or object does not exist, access is denied, the server broke the
//! protocol), which is reported at once. The pause doubles after each try,
//! up to a ceiling, and a random part spreads clients that failed together.
//!
//! The defaults can be changed through environment variables, read once per
//! opened base:
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `FVD_REMOTE_CONNECT_TIMEOUT` | seconds to establish a connection | 10 |
//! | `FVD_REMOTE_TIMEOUT` | seconds a read or write may block (NBD: a connection with requests in flight may go without a byte from the server) | 30 |
//! | `FVD_REMOTE_RETRIES` | tries of one operation before giving up | 5 |
//! | `FVD_REMOTE_RETRY_DELAY_MS` | first pause between tries, milliseconds | 200 |
//! | `FVD_REMOTE_CONNECTIONS` | most connections per NBD base (used only when the server offers multi-conn) | 4 |
//! | `FVD_REMOTE_IN_FLIGHT` | most requests in flight per HTTP(S) or S3 base | 32 |

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Timeouts, retry counts and pool size for one remote base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Time allowed to establish a connection (TCP connect, handshake).
    pub connect_timeout: Duration,
    /// Time a single socket read or write may block.
    pub io_timeout: Duration,
    /// Tries of one operation, the first included (at least 1).
    pub attempts: u32,
    /// Pause after the first failed try; doubled after each further one.
    pub base_delay: Duration,
    /// Longest pause between two tries.
    pub max_delay: Duration,
    /// Most connections (each served by its own thread) to one server.
    pub connections: usize,
    /// Most requests in flight at once to an HTTP(S) or S3 base: HTTP/1.1
    /// connections (one request each), or streams on one HTTP/2 connection.
    pub in_flight: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            attempts: 5,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            connections: 4,
            in_flight: 32,
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

impl Policy {
    /// The defaults, adjusted by the `FVD_REMOTE_*` environment variables
    /// (unparsable values are ignored).
    pub fn from_env() -> Self {
        let mut p = Policy::default();
        if let Some(s) = env_u64("FVD_REMOTE_CONNECT_TIMEOUT").filter(|&s| s > 0) {
            p.connect_timeout = Duration::from_secs(s);
        }
        if let Some(s) = env_u64("FVD_REMOTE_TIMEOUT").filter(|&s| s > 0) {
            p.io_timeout = Duration::from_secs(s);
        }
        if let Some(n) = env_u64("FVD_REMOTE_RETRIES") {
            p.attempts = u32::try_from(n).unwrap_or(u32::MAX).clamp(1, 100);
        }
        if let Some(ms) = env_u64("FVD_REMOTE_RETRY_DELAY_MS") {
            p.base_delay = Duration::from_millis(ms.min(60_000));
        }
        if let Some(n) = env_u64("FVD_REMOTE_CONNECTIONS") {
            p.connections = usize::try_from(n).unwrap_or(1).clamp(1, 64);
        }
        if let Some(n) = env_u64("FVD_REMOTE_IN_FLIGHT") {
            p.in_flight = usize::try_from(n).unwrap_or(1).clamp(1, 256);
        }
        p
    }

    /// The pause before try number `attempt + 1` (after `attempt` failures,
    /// `attempt >= 1`): half of the exponential delay plus a random part of
    /// up to the other half.
    pub fn delay(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(20);
        let full = self
            .base_delay
            .saturating_mul(1u32 << shift)
            .min(self.max_delay);
        let half = full / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let jitter = if nanos == 0 {
            0
        } else {
            random_u64() % (nanos + 1)
        };
        half + Duration::from_nanos(jitter)
    }

    /// Run `op` until it succeeds, fails permanently, or has failed
    /// transiently [`Policy::attempts`] times; pauses between tries with
    /// [`Policy::delay`]. `op` receives the number of the try (0 first).
    /// Blocks the calling thread while pausing: call it on a worker thread.
    pub fn run<T>(&self, mut op: impl FnMut(u32) -> Result<T, Failure>) -> io::Result<T> {
        let mut tried = 0u32;
        loop {
            match op(tried) {
                Ok(v) => return Ok(v),
                Err(f) => std::thread::sleep(self.backoff(&mut tried, f)?),
            }
        }
    }

    /// What to do after a failed try: the pause before the next one, or
    /// the error to report (a permanent failure, or the last transient one
    /// once [`Policy::attempts`] tries have failed). `tried` counts the
    /// failed tries so far and is advanced. Async callers sleep the pause
    /// on their own timer.
    pub fn backoff(&self, tried: &mut u32, failure: Failure) -> io::Result<Duration> {
        let e = match failure {
            Failure::Permanent(e) => return Err(e),
            Failure::Transient(e) => e,
        };
        let attempts = self.attempts.max(1);
        *tried += 1;
        if *tried < attempts {
            return Ok(self.delay(*tried));
        }
        let msg = if attempts > 1 {
            format!("{e} (gave up after {tried} tries)")
        } else {
            e.to_string()
        };
        Err(io::Error::new(e.kind(), msg))
    }
}

/// Why an operation failed, and whether trying again may help.
#[derive(Debug)]
pub enum Failure {
    /// Worth another try: the connection dropped or timed out, the server is
    /// overloaded or restarting.
    Transient(io::Error),
    /// Trying again will not help: reported at once.
    Permanent(io::Error),
}

impl Failure {
    /// A transient failure with `msg`.
    pub fn transient(msg: impl Into<String>) -> Self {
        Failure::Transient(io::Error::other(msg.into()))
    }

    /// A permanent failure with `msg` (reported as an I/O error, EIO).
    pub fn permanent(msg: impl Into<String>) -> Self {
        Failure::Permanent(io::Error::other(msg.into()))
    }

    /// A permanent failure of the given kind (`NotFound` for a missing
    /// object, `PermissionDenied`...).
    pub fn permanent_kind(kind: io::ErrorKind, msg: impl Into<String>) -> Self {
        Failure::Permanent(io::Error::new(kind, msg.into()))
    }

    /// Classify a socket error: connection-level problems and timeouts are
    /// transient, anything else is permanent. `what` prefixes the message
    /// (it names the URL and the operation).
    pub fn from_io(what: &str, e: io::Error) -> Self {
        let msg = format!("{what}: {}", describe_io(&e));
        if is_transient_io(&e) {
            Failure::Transient(io::Error::new(e.kind(), msg))
        } else {
            Failure::Permanent(io::Error::new(e.kind(), msg))
        }
    }

    /// True for [`Failure::Transient`].
    pub fn is_transient(&self) -> bool {
        matches!(self, Failure::Transient(_))
    }

    /// The underlying error.
    pub fn error(&self) -> &io::Error {
        match self {
            Failure::Transient(e) | Failure::Permanent(e) => e,
        }
    }

    /// The underlying error, consuming the failure.
    pub fn into_error(self) -> io::Error {
        match self {
            Failure::Transient(e) | Failure::Permanent(e) => e,
        }
    }
}

/// A message for a socket error that says "timed out" for both of the ways
/// a socket timeout shows up.
fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timed out".to_string(),
        io::ErrorKind::UnexpectedEof => "connection closed by the server".to_string(),
        _ => e.to_string(),
    }
}

/// Whether a socket error is worth a retry on a new connection.
pub fn is_transient_io(e: &io::Error) -> bool {
    use io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::NotConnected
            | K::BrokenPipe
            | K::TimedOut
            | K::WouldBlock
            | K::UnexpectedEof
            | K::Interrupted
            | K::AddrNotAvailable
            | K::NetworkUnreachable
            | K::HostUnreachable
            | K::NetworkDown
            | K::ResourceBusy
    ) || matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::ECONNRESET | libc::EPIPE | libc::ETIMEDOUT | libc::EAGAIN)
    )
}

/// A cheap random number for jitter (splitmix64 over a counter seeded from
/// the clock); not for anything that needs real randomness.
fn random_u64() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut z = STATE
        .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
        .wrapping_add(seed);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_bounded() {
        let p = Policy {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            ..Policy::default()
        };
        for attempt in 1..40 {
            let d = p.delay(attempt);
            let full = Duration::from_millis(100)
                .saturating_mul(1 << (attempt - 1).min(20))
                .min(Duration::from_millis(1000));
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn retries_transient_then_gives_up() {
        let p = Policy {
            attempts: 3,
            base_delay: Duration::from_millis(1),
            ..Policy::default()
        };
        let mut calls = 0;
        let r: io::Result<()> = p.run(|_| {
            calls += 1;
            Err(Failure::transient("nbd://x: connection reset"))
        });
        assert_eq!(calls, 3);
        let e = r.unwrap_err();
        assert!(e.to_string().contains("gave up after 3 tries"), "{e}");

        let mut calls = 0;
        let r: io::Result<()> = p.run(|_| {
            calls += 1;
            Err(Failure::permanent("http://x: 404 Not Found"))
        });
        assert_eq!(calls, 1);
        assert!(r.unwrap_err().to_string().contains("404"));

        let mut calls = 0;
        let r = p.run(|n| {
            calls += 1;
            if n < 2 {
                Err(Failure::transient("flaky"))
            } else {
                Ok(n)
            }
        });
        assert_eq!(r.unwrap(), 2);
        assert_eq!(calls, 3);
    }

    #[test]
    fn classification() {
        let t = Failure::from_io("u", io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(t.is_transient());
        let t = Failure::from_io("u", io::Error::from(io::ErrorKind::WouldBlock));
        assert!(t.is_transient());
        assert!(t.error().to_string().contains("timed out"));
        let p = Failure::from_io("u", io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(!p.is_transient());
    }
}
