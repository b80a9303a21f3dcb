//! `fvd prefetch` — copy everything from the base into the image and detach
//! the base (also known as flatten; like `qemu-img rebase -b ''` or a
//! block-stream job). Progress is journaled, so an interrupted run resumes
//! where it stopped.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Result, anyhow};
use fvd_core::Format;
use fvd_core::Opener;
use fvd_core::image::prefetch::{PrefetchConfig, PrefetchMode, PrefetchStatus, prefetch};

use crate::clock::TokioClock;
use crate::common::{at, open, require_key};
use crate::size::parse_size;

/// Arguments of `fvd prefetch`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Show a progress bar.
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// Fetch the ranges of the image's recorded profile first.
    #[arg(long)]
    pub profile: bool,
    /// Copy at most this many bytes per second (e.g. 50M).
    #[arg(long, value_name = "BYTES")]
    pub rate: Option<String>,
    /// The image.
    pub image: PathBuf,
}

/// Run `fvd prefetch`.
pub async fn run(a: Args, opener: &Opener) -> Result<u8> {
    let img = Arc::new(open(opener, &a.image, Format::Fvd, false, false).await?);
    require_key(&img, &a.image)?;
    if img.base_range() == 0 {
        println!(
            "{}: all data is already in the image; no base to fetch from",
            a.image.display()
        );
        img.close().await.map_err(|e| at(&a.image, e))?;
        return Ok(0);
    }
    let rate = a
        .rate
        .as_deref()
        .map(parse_size)
        .transpose()
        .map_err(|e| anyhow!("--rate: {e}"))?;
    let cfg = PrefetchConfig {
        mode: if a.profile {
            PrefetchMode::Profile
        } else {
            PrefetchMode::Adaptive
        },
        rate_limit: rate,
        step_bytes: 4 << 20,
        hard: true,
        // Offline: nobody to yield to, and no contention pauses.
        min_throughput: 0,
        ..PrefetchConfig::default()
    };
    let status = Arc::new(PrefetchStatus::default());
    let bar = a.progress.then(|| {
        let b = indicatif::ProgressBar::new(100);
        b.set_style(
            indicatif::ProgressStyle::with_template("    ({percent:>3}.00/100%) {wide_bar} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let task = tokio::spawn(prefetch(
        img.clone(),
        cfg,
        Arc::new(TokioClock::default()),
        status.clone(),
    ));
    while !task.is_finished() {
        if let Some(b) = &bar {
            let total = status.total.load(Ordering::Relaxed).max(1);
            let done = status.done.load(Ordering::Relaxed);
            b.set_position((done * 100 / total).min(100));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = task
        .await
        .map_err(|e| anyhow!("prefetch task failed: {e}"))?;
    if let Some(b) = &bar {
        b.set_position(100);
        b.finish();
    }
    r.map_err(|e| at(&a.image, e))?;
    img.close().await.map_err(|e| at(&a.image, e))?;
    println!(
        "{}: copied {} bytes from the base; the image no longer needs it",
        a.image.display(),
        status.done.load(Ordering::Relaxed)
    );
    Ok(0)
}
