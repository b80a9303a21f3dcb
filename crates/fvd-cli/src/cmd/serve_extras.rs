//! Copy-on-read, prefetch and statistics for `fvd serve`.
//!
//! They follow the exported image when an online resize replaces it
//! ([`Extras::reopened`]): the settings are applied to the reopened image
//! and a prefetch that had not finished goes on there (it stops on the
//! closed one); the statistics read the current image.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use fvd_core::image::prefetch::{PrefetchConfig, PrefetchMode, PrefetchStatus, prefetch};
use fvd_core::{Image, LiveImage};
use serde_json::json;

use crate::clock::TokioClock;
use crate::size::parse_size;

/// Prefetch choices.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefetchChoice {
    /// No background prefetch.
    #[default]
    Off,
    /// Copy the base sequentially in the background, yielding to the guest.
    Adaptive,
    /// Copy the ranges of the image's recorded profile first, then the rest.
    Profile,
}

/// Options of `fvd serve` about the base.
#[derive(clap::Args, Debug, Default)]
pub struct BaseArgs {
    /// Copy data read from the base into the image: on|off (default: the image's setting).
    #[arg(long = "copy-on-read", value_name = "on|off", value_parser = parse_on_off)]
    pub copy_on_read: Option<bool>,
    /// Prefetch the base in the background.
    #[arg(long, value_enum, default_value_t = PrefetchChoice::Off)]
    pub prefetch: PrefetchChoice,
    /// Seconds to wait before prefetching.
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    pub prefetch_delay: f64,
    /// Prefetch stops when a guest request arrives and resumes once the
    /// guest has been idle for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 0.02)]
    pub prefetch_quiet: f64,
    /// Prefetch at most this many bytes per second (e.g. 20M).
    #[arg(long, value_name = "BYTES")]
    pub prefetch_rate: Option<String>,
    /// Record the order in which base data is first read into the image's
    /// prefetch profile (saved when the server exits).
    #[arg(long)]
    pub record_profile: bool,
    /// Answer JSON statistics on this unix socket (one object per connection).
    #[arg(long, value_name = "PATH")]
    pub stats_socket: Option<PathBuf>,
    /// Serve the statistics for Prometheus at http://ADDR:PORT/metrics
    /// (text format; `:PORT` listens on 127.0.0.1).
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_metrics_addr)]
    pub metrics: Option<std::net::SocketAddr>,
}

fn parse_metrics_addr(s: &str) -> std::result::Result<std::net::SocketAddr, String> {
    super::serve_metrics::parse_addr(s).map_err(|e| e.to_string())
}

fn parse_on_off(s: &str) -> std::result::Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("expected on or off, got '{s}'")),
    }
}

/// What runs beside the server.
pub struct Extras {
    status: Arc<PrefetchStatus>,
    started: Instant,
    stats_socket: Option<PathBuf>,
    record_profile: bool,
    /// Figures of what serves the export besides the image (the host
    /// cache of `fvd cache serve`), reported under `"cache"`.
    more: Option<super::control::StatsFn>,
    copy_on_read: Option<bool>,
    /// The prefetch asked for (None: off).
    prefetch: Option<PrefetchConfig>,
}

/// Apply the options to the image of `live` and start prefetch and the
/// stats socket. `started` is when the server started (its uptime counts
/// from there); `more` adds the figures of a host cache to every stats
/// answer.
pub async fn start(
    live: &Arc<LiveImage>,
    a: &BaseArgs,
    started: Instant,
    more: Option<super::control::StatsFn>,
) -> Result<Extras> {
    let image = live.current();
    let status = Arc::new(PrefetchStatus::default());
    let mut prefetch = None;
    if a.prefetch != PrefetchChoice::Off {
        let rate = a
            .prefetch_rate
            .as_deref()
            .map(parse_size)
            .transpose()
            .map_err(|e| anyhow!("--prefetch-rate: {e}"))?;
        let cfg = PrefetchConfig {
            mode: if a.prefetch == PrefetchChoice::Profile {
                PrefetchMode::Profile
            } else {
                PrefetchMode::Adaptive
            },
            start_delay: Duration::from_secs_f64(a.prefetch_delay.max(0.0)),
            quiet: Duration::try_from_secs_f64(a.prefetch_quiet.max(0.0))
                .map_err(|e| anyhow!("--prefetch-quiet: {e}"))?,
            rate_limit: rate,
            ..PrefetchConfig::default()
        };
        prefetch = Some(cfg);
    }
    let extras = Extras {
        status,
        started,
        stats_socket: a.stats_socket.clone(),
        record_profile: a.record_profile,
        more,
        copy_on_read: a.copy_on_read,
        prefetch,
    };
    extras.apply(&image)?;
    if let Some(addr) = a.metrics {
        let bound = super::serve_metrics::start(
            addr,
            live,
            &extras.status,
            extras.started,
            extras.more.clone(),
        )
        .await?;
        eprintln!("fvd serve: metrics at http://{bound}/metrics");
    }
    if let Some(path) = &a.stats_socket {
        let _ = std::fs::remove_file(path);
        let listener =
            tokio::net::UnixListener::bind(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let stats = extras.stats_fn(live);
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let body = stats().to_string() + "\n";
                use tokio::io::AsyncWriteExt;
                let _ = sock.write_all(body.as_bytes()).await;
            }
        });
    }
    Ok(extras)
}

/// Run the prefetch on a thread of its own, at a lower CPU priority than
/// the threads serving the guest.
///
/// On the server's event loop the prefetcher's work between its awaits
/// (copying steps of up to 1 MiB, mapping, locking) would sit in front of
/// guest requests that arrive meanwhile; on a thread of its own, at nice
/// [`PREFETCH_NICE`], the kernel runs a woken guest thread first whenever
/// the two compete for a core. Its own runtime has only a timer driver: the
/// engine's storage and base I/O complete on their own threads.
fn spawn_prefetch(img: Arc<Image>, cfg: PrefetchConfig, st: Arc<PrefetchStatus>) -> Result<()> {
    std::thread::Builder::new()
        .name("fvd-prefetch".into())
        .spawn(move || {
            lower_thread_priority(PREFETCH_NICE);
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("fvd serve: prefetch not started: {e}");
                    return;
                }
            };
            let clock = Arc::new(TokioClock::default());
            if let Err(e) = rt.block_on(prefetch(img, cfg, clock, st)) {
                eprintln!("fvd serve: prefetch stopped: {e}");
            }
        })
        .map_err(|e| anyhow!("cannot start the prefetch thread: {e}"))?;
    Ok(())
}

/// Nice value of the prefetch thread: a tenth of a guest thread's CPU
/// weight when both are runnable, still a fair share of an idle machine.
const PREFETCH_NICE: i32 = 10;

/// Lower the calling thread's CPU priority (Linux: nice applies per thread).
fn lower_thread_priority(nice: i32) {
    // SAFETY: plain syscalls on the calling thread's own id.
    unsafe {
        let tid = libc::gettid();
        // Failure (a sandbox refusing it) only costs the priority.
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice);
    }
}

fn stats_json(img: &Image, st: &PrefetchStatus, started: Instant) -> serde_json::Value {
    let s = img.stats();
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    let state = st.reported_state(img).name();
    let prefetch_bytes = s.prefetch_bytes.load(Ordering::Relaxed);
    let (local, blocks) = img.local_blocks();
    json!({
        "base-bytes-read": s.base_read_bytes.load(Ordering::Relaxed),
        "base-reads": s.base_reads.load(Ordering::Relaxed),
        "base-reads-in-flight": s.base_reads_in_flight.load(Ordering::Relaxed),
        "requests-in-flight": s.requests_in_flight.load(Ordering::Relaxed),
        "copy-on-read-bytes": s.cor_bytes.load(Ordering::Relaxed),
        "copy-on-read-pending-hits": s.cor_pending_hits.load(Ordering::Relaxed),
        "copy-on-read": img.copy_on_read(),
        "prefetch": {
            "state": state,
            "done-bytes": st.done.load(Ordering::Relaxed),
            "total-bytes": st.total.load(Ordering::Relaxed),
            "pauses": st.pauses.load(Ordering::Relaxed),
            "yields": st.yields.load(Ordering::Relaxed),
            "dropped-bytes": s.prefetch_dropped_bytes.load(Ordering::Relaxed),
            "throughput": prefetch_bytes as f64 / secs,
        },
        "virtual-size": img.virtual_size(),
        "local-blocks": local,
        "snapshot-chunks-copied": s.chunks_copied.load(Ordering::Relaxed),
        "base-blocks": blocks,
        "foreground-ops": img.foreground_ops(),
        "foreground-write-bytes": s.data_write_bytes.load(Ordering::Relaxed).saturating_sub(prefetch_bytes + s.cor_bytes.load(Ordering::Relaxed)),
        "uptime-seconds": secs,
    })
}

/// `v` with the host cache's figures added under `"cache"`.
fn with_more(
    mut v: serde_json::Value,
    more: &Option<super::control::StatsFn>,
) -> serde_json::Value {
    if let Some(f) = more {
        v["cache"] = f();
    }
    v
}

impl Extras {
    /// Apply the options to `image` (at start, and to the image an online
    /// resize reopened): background fills on the current runtime,
    /// copy-on-read, profile recording, and the prefetch if the image
    /// still needs its base.
    fn apply(&self, image: &Arc<Image>) -> Result<()> {
        let h = tokio::runtime::Handle::current();
        image.enable_background(Arc::new(move |f| {
            h.spawn(f);
        }));
        if let Some(on) = self.copy_on_read {
            image.set_copy_on_read(on);
        }
        image.set_profile_recording(self.record_profile);
        if let Some(cfg) = &self.prefetch
            && image.base_range() > 0
        {
            spawn_prefetch(image.clone(), cfg.clone(), self.status.clone())?;
        }
        Ok(())
    }

    /// What the control socket calls with the image an online resize
    /// reopened: the options apply to it, and an unfinished prefetch goes
    /// on there (at once: its start delay has passed).
    pub fn reopened_fn(&self) -> super::control::ReopenedFn {
        let mut again = Extras {
            status: self.status.clone(),
            started: self.started,
            stats_socket: None,
            record_profile: self.record_profile,
            more: self.more.clone(),
            copy_on_read: self.copy_on_read,
            prefetch: self.prefetch.clone(),
        };
        if let Some(cfg) = &mut again.prefetch {
            cfg.start_delay = Duration::ZERO;
        }
        Arc::new(move |image: &Arc<Image>| {
            if let Err(e) = again.apply(image) {
                eprintln!("fvd serve: after the resize: {e}");
            }
        })
    }

    /// What answers `query-stats` on the control socket.
    pub fn stats_fn(&self, live: &Arc<LiveImage>) -> super::control::StatsFn {
        let (live, st, started) = (live.clone(), self.status.clone(), self.started);
        let more = self.more.clone();
        Arc::new(move || with_more(stats_json(&live.current(), &st, started), &more))
    }

    /// After the server stopped (the image is closed, and a recorded profile
    /// stored in it): log the figures and remove the stats socket.
    pub fn finish(&self, image: &Image) {
        if self.record_profile {
            eprintln!(
                "fvd serve: recorded a prefetch profile of {} ranges",
                image.recorded_profile().len()
            );
        }
        eprintln!(
            "fvd serve: stats {}",
            with_more(stats_json(image, &self.status, self.started), &self.more)
        );
        if let Some(p) = &self.stats_socket {
            let _ = std::fs::remove_file(p);
        }
    }
}
