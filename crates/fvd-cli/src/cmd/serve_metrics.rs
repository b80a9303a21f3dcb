//! `fvd serve --metrics ADDR:PORT`: the figures of the stats socket for
//! Prometheus, as its text exposition format (version 0.0.4) on
//! `GET /metrics` over HTTP/1.1.
//!
//! Every value is read from the engine's counters at scrape time (a
//! `prometheus-client` collector), so serving metrics costs the I/O path
//! nothing beyond the atomic counters it keeps anyway. Names follow
//! Prometheus conventions: `fvd_` prefix, base units (bytes, seconds),
//! `_total` on counters.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use bytes::Bytes;
use fvd_core::LiveImage;
use fvd_core::image::prefetch::{PrefetchState, PrefetchStatus};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Parse `ADDR:PORT` or `:PORT` (127.0.0.1).
pub fn parse_addr(s: &str) -> Result<SocketAddr> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if let Some(port) = s.strip_prefix(':')
        && let Ok(port) = port.parse::<u16>()
    {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    bail!("--metrics {s}: expected ADDR:PORT or :PORT (ADDR an IP address)")
}

/// What a scrape reads.
struct Figures {
    live: Arc<LiveImage>,
    prefetch: Arc<PrefetchStatus>,
    started: Instant,
    /// The host cache's figures (`fvd cache serve`), as its stats JSON.
    cache: Option<super::control::StatsFn>,
}

/// The host cache's counters and gauges: (JSON key, metric, help, counter).
const CACHE_FIGURES: [(&str, &str, &str, bool); 6] = [
    (
        "fetched-bytes",
        "fvd_cache_fetched_bytes",
        "Bytes the cache fetched from the base.",
        true,
    ),
    (
        "hit-bytes",
        "fvd_cache_hit_bytes",
        "Bytes served from the cache.",
        true,
    ),
    (
        "cached-bytes",
        "fvd_cache_cached_bytes",
        "Bytes the cache holds now.",
        false,
    ),
    (
        "uncached-bytes",
        "fvd_cache_uncached_bytes",
        "Bytes served straight from the base without caching them.",
        true,
    ),
    (
        "evicted-blocks",
        "fvd_cache_evicted_blocks",
        "Blocks evicted to keep the cache under its limit.",
        true,
    ),
    (
        "bad-blocks",
        "fvd_cache_bad_blocks",
        "Cached blocks that failed their checksum and were fetched again.",
        true,
    ),
];

/// Encode the host cache's figures from its stats JSON.
fn encode_cache(e: &mut DescriptorEncoder, v: &serde_json::Value) -> std::fmt::Result {
    for (key, name, help, is_counter) in CACHE_FIGURES {
        let n = v[key].as_u64().unwrap_or(0);
        if is_counter {
            counter(e, name, help, n)?;
        } else {
            gauge(e, name, help, n as i64)?;
        }
    }
    Ok(())
}

impl std::fmt::Debug for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Figures").finish_non_exhaustive()
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let m = ConstCounter::new(v);
    m.encode(e.encode_descriptor(name, help, None, m.metric_type())?)
}

fn gauge<N>(e: &mut DescriptorEncoder, name: &str, help: &str, v: N) -> std::fmt::Result
where
    ConstGauge<N>: EncodeMetric,
{
    let m = ConstGauge::new(v);
    m.encode(e.encode_descriptor(name, help, None, m.metric_type())?)
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Collector for Figures {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let img = &self.live.current();
        let s = img.stats();
        let pf = &self.prefetch;
        let e = &mut e;

        counter(
            e,
            "fvd_base_read_bytes",
            "Bytes read from the base image (guest reads, copy-on-read, prefetch).",
            load(&s.base_read_bytes),
        )?;
        counter(
            e,
            "fvd_base_reads",
            "Read requests sent to the base image.",
            load(&s.base_reads),
        )?;
        gauge(
            e,
            "fvd_base_reads_in_flight",
            "Base read requests sent and not yet answered.",
            load(&s.base_reads_in_flight),
        )?;
        let h = s.base_read_latency.snapshot();
        let mut m = e.encode_descriptor(
            "fvd_base_read_duration_seconds",
            "Time from sending a base read to its answer.",
            None,
            MetricType::Histogram,
        )?;
        m.encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.buckets, None)?;

        gauge(
            e,
            "fvd_requests_in_flight",
            "Guest reads, writes, write-zeroes and discards being served.",
            load(&s.requests_in_flight),
        )?;
        counter(
            e,
            "fvd_requests",
            "Guest reads, writes, write-zeroes and discards served.",
            img.foreground_ops(),
        )?;
        let prefetched = load(&s.prefetch_bytes);
        let cor = load(&s.cor_bytes);
        counter(
            e,
            "fvd_write_bytes",
            "Bytes written by the guest.",
            load(&s.data_write_bytes).saturating_sub(prefetched + cor),
        )?;
        counter(
            e,
            "fvd_copy_on_read_bytes",
            "Bytes copied from the base into the image by copy-on-read and NBD_CMD_CACHE.",
            cor,
        )?;
        counter(
            e,
            "fvd_copy_on_read_skipped",
            "Copy-on-read fills skipped because too many bytes were in flight.",
            load(&s.cor_skipped),
        )?;
        gauge(
            e,
            "fvd_copy_on_read_enabled",
            "1 while copy-on-read is on.",
            i64::from(img.copy_on_read()),
        )?;
        let (local, blocks) = img.local_blocks();
        gauge(
            e,
            "fvd_base_range_blocks",
            "Blocks of the virtual disk that were backed by the base.",
            blocks,
        )?;
        gauge(
            e,
            "fvd_local_blocks",
            "Of those, blocks now in the image.",
            local,
        )?;
        gauge(
            e,
            "fvd_block_size_bytes",
            "Bytes per block.",
            img.block_size(),
        )?;

        counter(
            e,
            "fvd_prefetch_bytes",
            "Bytes copied from the base by prefetch.",
            load(&pf.done),
        )?;
        gauge(
            e,
            "fvd_prefetch_total_bytes",
            "Bytes still in the base when prefetch started.",
            load(&pf.total),
        )?;
        counter(
            e,
            "fvd_prefetch_dropped_bytes",
            "Bytes prefetch fetched but dropped because the guest came back meanwhile.",
            load(&s.prefetch_dropped_bytes),
        )?;
        counter(
            e,
            "fvd_prefetch_pauses",
            "Random pauses prefetch took because the base was slow.",
            load(&pf.pauses),
        )?;
        counter(
            e,
            "fvd_prefetch_yields",
            "Times prefetch stopped for guest requests (it resumes once the guest is quiet).",
            load(&pf.yields),
        )?;
        gauge(
            e,
            "fvd_prefetch_throughput_bytes_per_second",
            "Prefetch's estimate of the base's throughput.",
            load(&pf.throughput),
        )?;
        let state = pf.reported_state(img);
        let mut m = e.encode_descriptor(
            "fvd_prefetch_state",
            "1 for the current state of prefetch, 0 for the others.",
            None,
            MetricType::Gauge,
        )?;
        for s in [
            PrefetchState::Off,
            PrefetchState::Waiting,
            PrefetchState::Running,
            PrefetchState::Paused,
            PrefetchState::Done,
            PrefetchState::Failed,
        ] {
            let labels = [("state", s.name())];
            ConstGauge::new(i64::from(s == state)).encode(m.encode_family(&labels)?)?;
        }

        counter(
            e,
            "fvd_storage_flushes",
            "fdatasync calls on the image file.",
            load(&s.storage_flushes),
        )?;
        counter(
            e,
            "fvd_journal_writes",
            "Journal write operations.",
            load(&s.journal_writes),
        )?;
        counter(e, "fvd_checkpoints", "Checkpoints.", load(&s.checkpoints))?;
        if let Some(cache) = &self.cache {
            encode_cache(e, &cache())?;
        }
        gauge(
            e,
            "fvd_uptime_seconds",
            "Seconds since the server started.",
            self.started.elapsed().as_secs_f64(),
        )
    }
}

/// Render the metrics page.
fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; the collector's errors are fmt's.
    let _ = prometheus_text::encode(&mut out, registry);
    out
}

fn respond(registry: &Registry, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => (
            StatusCode::OK,
            prometheus_text::CONTENT_TYPE,
            render(registry),
        ),
        (&Method::GET | &Method::HEAD, _) => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".into(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".into(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    resp
}

/// Bind `addr` and serve the metrics of the image `live` exports on the current runtime
/// until it stops. Returns the address bound (the port when 0 was asked).
pub async fn start(
    addr: SocketAddr,
    live: &Arc<LiveImage>,
    prefetch: &Arc<PrefetchStatus>,
    started: Instant,
    cache: Option<super::control::StatsFn>,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow!("--metrics {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Figures {
        live: live.clone(),
        prefetch: prefetch.clone(),
        started,
        cache,
    }));
    let registry = Arc::new(registry);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors or similar: try again shortly rather
                // than spin.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let registry = registry.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = respond(&registry, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            tokio::spawn(async move {
                // A scraper that hangs up early is no error of ours.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_addr("0.0.0.0:9100").unwrap(),
            "0.0.0.0:9100".parse().unwrap()
        );
        assert_eq!(
            parse_addr(":9100").unwrap(),
            "127.0.0.1:9100".parse().unwrap()
        );
        assert_eq!(
            parse_addr("[::1]:9100").unwrap(),
            "[::1]:9100".parse().unwrap()
        );
        let e = parse_addr("9100").unwrap_err().to_string();
        assert!(e.contains("--metrics 9100"), "{e}");
        assert!(parse_addr("host:port").is_err());
    }
}
