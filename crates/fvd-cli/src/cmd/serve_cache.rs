//! What `fvd serve` needs to export a base through the host's cache of it
//! (`fvd cache serve`): opening the cache and the read-only image over it,
//! and its figures. Below both `serve` and `cache` (the command).

use std::sync::Arc;

use anyhow::{Result, anyhow};
use fvd_core::base::{Base, BaseStorage};
use fvd_core::{Format, Image, Location, OpenOptions, Opener};
use fvd_remote::cache::{CacheOptions, CachedBase};
use serde_json::json;

use crate::size::human;

/// Open the base at `url` (raw bytes), through the opener's providers.
pub async fn open_base(url: &str, opener: &Opener) -> Result<Arc<dyn Base>> {
    opener
        .open_base(&Location::parse(url), Format::Raw, 0)
        .await
        .map_err(|e| {
            let msg = e.to_string();
            if msg.contains(url) {
                anyhow!(msg)
            } else {
                anyhow!("{url}: {msg}")
            }
        })
}

/// Open the cache of the base at `url` and the read-only image serving it.
pub async fn open_cached(
    url: &str,
    opts: &CacheOptions,
    opener: &Opener,
) -> Result<(Arc<CachedBase>, Image)> {
    let base = open_base(url, opener).await?;
    let cached = Arc::new(
        CachedBase::open(base, url, opts)
            .await
            .map_err(|e| anyhow!("cache of {url}: {e}"))?,
    );
    let storage = Arc::new(BaseStorage::new(cached.clone()));
    let image = Image::open_raw(storage, OpenOptions { read_only: true })
        .map_err(|e| anyhow!("{url}: {e}"))?;
    Ok((cached, image))
}

/// The cache's figures for the stats socket and the control socket
/// (`"cache"` in their answers).
pub fn stats_fn(c: &Arc<CachedBase>) -> super::control::StatsFn {
    use std::sync::atomic::Ordering::Relaxed;
    let c = c.clone();
    Arc::new(move || {
        let s = c.stats();
        json!({
            "fetched-bytes": s.fetched_bytes.load(Relaxed),
            "hit-bytes": s.hit_bytes.load(Relaxed),
            "cached-bytes": c.used_bytes(),
            "uncached-bytes": s.uncached_bytes.load(Relaxed),
            "evicted-blocks": s.evicted_blocks.load(Relaxed),
            "bad-blocks": s.bad_blocks.load(Relaxed),
            "block-size": c.block_size(),
            "data-file": c.data_path(),
        })
    })
}

/// One line of the cache's counters.
pub fn summary(c: &CachedBase) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let s = c.stats();
    format!(
        "fvd cache: {} fetched from the base, {} served from the cache, {} cached, \
         {} blocks evicted, {} blocks failed their checksum",
        human(s.fetched_bytes.load(Relaxed)),
        human(s.hit_bytes.load(Relaxed)),
        human(c.used_bytes()),
        s.evicted_blocks.load(Relaxed),
        s.bad_blocks.load(Relaxed)
    )
}
