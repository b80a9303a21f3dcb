//! NBD exports as read-only bases, through the fvd-nbd client.
//!
//! URLs follow the NBD URI convention: `nbd://host[:port]/export` (TCP,
//! port 10809 by default) and `nbd+unix:///export?socket=PATH` (a unix
//! socket); an empty export name selects the server's default export. TLS
//! (`nbds://`) is not supported here.
//!
//! The client ([`fvd_nbd::client`]) negotiates extended headers or
//! structured replies and the `base:allocation` context when the server
//! has them, keeps many reads in flight on each connection (replies come
//! back in any order), opens up to [`Policy::connections`] connections
//! when the server advertises `NBD_FLAG_CAN_MULTI_CONN`, and retries a
//! read whose connection failed on a new one as [`Policy`] says. Its tasks
//! run on the remote I/O runtime ([`crate::runtime`], shared with the HTTP
//! and S3 clients), so the futures of [`NbdBase`] complete under any
//! executor.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fvd_core::IoBuf;
use fvd_core::base::Base;
use fvd_core::storage::{AllocRun, IoFuture, coalesce};
use fvd_nbd::client::{self, Address, Client, Target};
use fvd_nbd::proto::consts;

use crate::retry::{Policy, is_transient_io};

pub use fvd_nbd::client::ExportInfo;

/// A parsed `nbd://` or `nbd+unix://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUrl {
    /// Where to connect.
    pub address: Address,
    /// Export name ("" for the default export).
    pub export: String,
    /// The URL as written (for messages).
    pub url: String,
}

/// True if `name` uses one of the NBD URL schemes this client knows
/// (including the refused `nbds` ones, so that they get a clear message).
pub fn is_nbd_url(name: &str) -> bool {
    let Some((scheme, _)) = name.split_once("://") else {
        return false;
    };
    matches!(
        scheme.to_ascii_lowercase().as_str(),
        "nbd" | "nbd+tcp" | "nbd+unix" | "nbds" | "nbds+tcp" | "nbds+unix" | "nbd+vsock"
    )
}

/// Parse an NBD URL.
pub fn parse_url(url: &str) -> Result<NbdUrl, String> {
    let (scheme, authority, path, query) = crate::url::split(url)?;
    let params = crate::url::query_pairs(query)?;
    let export = crate::url::percent_decode(path.strip_prefix('/').unwrap_or(path))?;
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let address = match scheme.as_str() {
        "nbd" | "nbd+tcp" => {
            if param("socket").is_some() {
                return Err(format!(
                    "{url}: 'socket=' needs the nbd+unix:// scheme (nbd+unix:///export?socket=PATH)"
                ));
            }
            let (host, port) =
                crate::url::host_port(authority).map_err(|e| format!("{url}: {e}"))?;
            if host.is_empty() {
                return Err(format!("{url}: no host name"));
            }
            Address::Tcp {
                host,
                port: port.unwrap_or(consts::DEFAULT_PORT),
            }
        }
        "nbd+unix" => {
            if !authority.is_empty() {
                return Err(format!(
                    "{url}: nbd+unix URLs have no host (nbd+unix:///export?socket=PATH)"
                ));
            }
            match param("socket") {
                Some(s) if !s.is_empty() => Address::Unix(PathBuf::from(s)),
                _ => {
                    return Err(format!(
                        "{url}: the socket is missing (nbd+unix:///export?socket=PATH)"
                    ));
                }
            }
        }
        "nbds" | "nbds+tcp" | "nbds+unix" => {
            return Err(format!(
                "{url}: NBD over TLS is not supported by this client"
            ));
        }
        other => return Err(format!("{url}: unsupported NBD URL scheme '{other}'")),
    };
    Ok(NbdUrl {
        address,
        export,
        url: url.to_string(),
    })
}

impl client::RetryPolicy for Policy {
    fn attempts(&self) -> u32 {
        self.attempts
    }
    fn delay(&self, failures: u32) -> Duration {
        Policy::delay(self, failures)
    }
    fn is_transient(&self, e: &io::Error) -> bool {
        is_transient_io(e)
    }
}

/// The client configuration `policy` describes, on the remote I/O runtime.
fn client_config(policy: Policy) -> io::Result<client::Config> {
    Ok(client::Config {
        connect_timeout: policy.connect_timeout,
        io_timeout: policy.io_timeout,
        connections: policy.connections,
        retry: Arc::new(policy),
        runtime: Some(crate::runtime::handle()?),
        ..client::Config::default()
    })
}

/// An NBD export used as a base (content read as raw).
pub struct NbdBase {
    client: Client,
    url: String,
}

impl NbdBase {
    /// Connect to `url` (retrying transient failures as `policy` says) and
    /// learn the export's size and capabilities.
    pub async fn open(url: &str, policy: Policy) -> io::Result<NbdBase> {
        let parsed = parse_url(url).map_err(|m| io::Error::new(io::ErrorKind::InvalidInput, m))?;
        let target = Target {
            address: parsed.address,
            export: parsed.export,
            name: parsed.url.clone(),
        };
        let client = Client::connect(target, client_config(policy)?).await?;
        Ok(NbdBase {
            client,
            url: parsed.url,
        })
    }

    /// What the server said about the export at open.
    pub fn info(&self) -> &ExportInfo {
        self.client.info()
    }

    /// The client (for its connection count and the like).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// The part of `[offset, offset + len)` inside an export of `size` bytes.
fn inside(size: u64, offset: u64, len: usize) -> usize {
    usize::try_from(size.saturating_sub(offset))
        .unwrap_or(usize::MAX)
        .min(len)
}

impl Base for NbdBase {
    fn size(&self) -> u64 {
        self.client.info().size
    }

    fn read_at(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        // Bytes past the end of the export read as zeros.
        let n = inside(self.size(), offset, buf.len());
        buf[n..].fill(0);
        if n == 0 {
            return Box::pin(std::future::ready(Ok(buf)));
        }
        let read = self.client.read(offset, n);
        Box::pin(async move {
            let data = read.await?;
            buf[..n].copy_from_slice(&data);
            Ok(buf)
        })
    }

    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        let n = self.size().saturating_sub(offset).min(len);
        let outside = AllocRun {
            length: len - n,
            data: false,
        };
        if n == 0 {
            return Box::pin(std::future::ready(Ok(coalesce(vec![outside]))));
        }
        let runs = self.client.allocation(offset, n);
        Box::pin(async move {
            let mut out: Vec<AllocRun> = runs
                .await?
                .into_iter()
                .map(|r| AllocRun {
                    length: r.length,
                    data: r.data,
                })
                .collect();
            out.push(outside);
            Ok(coalesce(out))
        })
    }

    fn format(&self) -> fvd_core::Format {
        fvd_core::Format::Raw
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("nbd://example.com/disk").unwrap();
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "example.com".into(),
                port: 10809
            }
        );
        assert_eq!(u.export, "disk");
        let u = parse_url("nbd://127.0.0.1:1234").unwrap();
        assert_eq!(u.export, "");
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 1234
            }
        );
        let u = parse_url("nbd://[::1]:99/a%20b").unwrap();
        assert_eq!(u.export, "a b");
        let u = parse_url("nbd+unix:///?socket=/tmp/x.sock").unwrap();
        assert_eq!(u.address, Address::Unix("/tmp/x.sock".into()));
        assert_eq!(u.export, "");
        let u = parse_url("nbd+unix:///exp?socket=/tmp/x.sock").unwrap();
        assert_eq!(u.export, "exp");
        assert!(parse_url("nbd+unix:///exp").is_err());
        assert!(parse_url("nbd+unix://host/exp?socket=/s").is_err());
        assert!(parse_url("nbds://host/exp").unwrap_err().contains("TLS"));
        assert!(parse_url("nbd:///exp").is_err());
        assert!(parse_url("nbd://h/e?socket=/s").is_err());
        assert!(is_nbd_url("NBD+UNIX:///x"));
        assert!(!is_nbd_url("http://x"));
    }
}
