//! Recording the prefetch profile: the order in which base data is first read.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use super::Image;
use crate::error::{Error, Result};
use crate::format::header::{COMPAT_PREFETCH_PROFILE, Region};
use crate::format::profile;
use crate::iobuf::IoBuf;
use crate::meta;

#[derive(Default)]
struct State {
    /// One bit per block already recorded.
    seen: Vec<u64>,
    entries: Vec<(u64, u64)>,
    dirty: bool,
}

/// Records first reads of base blocks while enabled.
#[derive(Default)]
pub(crate) struct Recorder {
    enabled: AtomicBool,
    state: Mutex<State>,
}

impl Image {
    /// Start (or stop) recording the order in which base data is first read.
    pub fn set_profile_recording(&self, on: bool) {
        self.profile.enabled.store(on, Ordering::Release);
    }

    /// The profile recorded so far in this run.
    pub fn recorded_profile(&self) -> Vec<(u64, u64)> {
        self.profile
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .clone()
    }

    fn profile_capacity(&self) -> usize {
        let len = self
            .header
            .as_ref()
            .map(|h| h.region(Region::Profile).length)
            .unwrap_or(0) as usize;
        len.saturating_sub(profile::HEADER) / profile::ENTRY
    }

    pub(crate) fn record_profile(&self, offset: u64, len: u64) {
        if !self.profile.enabled.load(Ordering::Acquire) {
            return;
        }
        let bs = self.map.block_size;
        let cap = self.profile_capacity();
        let blocks = self.map.blocks_of(offset, len);
        let mut st = self.profile.state.lock().unwrap_or_else(|e| e.into_inner());
        let words = self.map.base_blocks.div_ceil(64) as usize;
        if st.seen.len() < words {
            st.seen.resize(words, 0);
        }
        for b in blocks {
            let (w, m) = ((b / 64) as usize, 1u64 << (b % 64));
            if st.seen[w] & m != 0 {
                continue;
            }
            st.seen[w] |= m;
            let (s, e) = (b * bs, ((b + 1) * bs).min(self.base_range()));
            let full = st.entries.len() >= cap;
            match st.entries.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += e - s,
                _ if full => return,
                _ => st.entries.push((s, e - s)),
            }
            st.dirty = true;
        }
    }

    /// The profile stored in the image, if any.
    pub async fn stored_profile(&self) -> Result<Option<Vec<(u64, u64)>>> {
        let Some(meta) = &self.map.meta else {
            return Ok(None);
        };
        // The commit state holds the newest header (a profile may have been
        // stored since open).
        let h = meta.commit.lock().await.header.clone();
        if h.compatible & COMPAT_PREFETCH_PROFILE == 0 {
            return Ok(None);
        }
        let r = h.region(Region::Profile);
        let buf = self
            .storage
            .read_at(r.offset, IoBuf::zeroed(r.length as usize))
            .await
            .map_err(|e| Error::io(format!("{}: read prefetch profile", self.describe()), e))?;
        profile::decode(&buf, profile::base_limit(h.base_size))
            .map(Some)
            .map_err(|e| e.context(self.describe()))
    }

    /// Store `entries` as the image's profile (durably) and set its feature bit.
    pub async fn store_profile(&self, entries: &[(u64, u64)]) -> Result<()> {
        self.check_writable()?;
        let (Some(meta), Some(h)) = (&self.map.meta, &self.header) else {
            return Err(Error::arg("raw images have no prefetch profile"));
        };
        let r = h.region(Region::Profile);
        let bytes = profile::encode(entries);
        if bytes.len() as u64 > r.length {
            return Err(Error::arg(format!(
                "prefetch profile of {} entries does not fit the {}-byte profile region",
                entries.len(),
                r.length
            )));
        }
        self.storage
            .write_at(r.offset, IoBuf::from_slice(&bytes), false)
            .await
            .map_err(|e| Error::io(format!("{}: write prefetch profile", self.describe()), e))?;
        let mut st = meta.commit.lock().await;
        meta.check_poisoned()?;
        let r = async {
            meta::flush_storage(self.storage.as_ref(), &self.stats).await?;
            let mut nh = st.header.clone();
            nh.compatible |= COMPAT_PREFETCH_PROFILE;
            meta::write_header(&mut st, self.storage.as_ref(), &self.stats, nh).await?;
            meta::flush_storage(self.storage.as_ref(), &self.stats).await
        }
        .await;
        // These fdatasyncs also cover guest writes not yet flushed: a failure
        // poisons the image exactly as a failed commit does.
        r.or_else(|e| meta.poison(e))
    }

    /// Store the profile recorded in this run, if it recorded anything new.
    pub async fn save_recorded_profile(&self) -> Result<bool> {
        let entries = {
            let mut st = self.profile.state.lock().unwrap_or_else(|e| e.into_inner());
            if !st.dirty {
                return Ok(false);
            }
            st.dirty = false;
            st.entries.clone()
        };
        self.store_profile(&entries).await?;
        Ok(true)
    }
}
