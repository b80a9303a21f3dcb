//! Engine work of the lifecycle operations (`crate::lifecycle`) that needs
//! the image's internals: moving chunks out of the way of a data region
//! whose start moves; closing a served image for an online operation and
//! carrying its counters over to the image reopened in its place
//! (`crate::live`).

use super::Image;
use super::compact::EMPTY;
use crate::error::{Error, ErrorKind, Result};
use crate::iobuf::IoBuf;

impl Image {
    /// Close the image once every request holding the gate is done
    /// (prefetch and copy-on-read fills included), for an operation that
    /// reopens it afterwards. Requests that enter later find it closed
    /// (writes fail; a prefetch stops).
    pub async fn close_quiesced(&self) -> Result<()> {
        let _gate = self.gate.write().await;
        self.close().await
    }

    /// True once the image is closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Carry the counters of `old` (the image this one was reopened in
    /// place of) on: the statistics keep counting across an online resize.
    pub fn carry_counters_from(&mut self, old: &Image) {
        self.stats = old.stats.clone();
        *self.foreground_ops.get_mut() = old.foreground_ops();
    }

    /// The chunk table as the engine sees it (compact images; else `None`).
    pub(crate) fn chunk_table(&self) -> Option<Vec<u32>> {
        self.map.compact().map(|c| c.table_snapshot())
    }

    /// Move the data of every physical chunk below `k` to a chunk at or
    /// past `k` (compact images), so the data region can start `k` chunks
    /// later. Each move is an ordinary allocation: read the chunk, write it
    /// to a fresh chunk, publish the new entry (a `TABLE` record); a commit
    /// round then makes the moves durable, and the old chunks are punched.
    /// The guest's view never changes. Offline only: the image must have no
    /// other user.
    pub(crate) async fn vacate_low_chunks(&self, k: u64) -> Result<()> {
        let (Some(c), Some(meta)) = (self.map.compact(), &self.map.meta) else {
            return Ok(());
        };
        self.check_writable()?;
        let k32 = u32::try_from(k).map_err(|_| Error::arg("too many chunks to move"))?;
        c.reserve_below(k32);
        let cs = c.chunk_size;
        let mut moved = Vec::new();
        for vc in 0..c.chunks() {
            let p = c.lookup(vc);
            if p == EMPTY || p >= k32 {
                continue;
            }
            let _g = self.locks.lock(vc * cs, (vc + 1) * cs).await;
            let fresh = self
                .map
                .allocate_move(self.storage.as_ref(), vc)
                .await
                .map_err(|e| {
                    if e.kind() == ErrorKind::NoSpace {
                        e.context(format!(
                            "{}: no free chunk to move chunk {p} to",
                            self.describe()
                        ))
                    } else {
                        e
                    }
                })?;
            let r = async {
                let buf = self
                    .storage
                    .read_at(c.host_offset(p, 0), IoBuf::for_overwrite(cs as usize))
                    .await
                    .map_err(self.io_err("read", vc * cs))?;
                super::expect_len(&buf, cs as usize, || format!("{}: read", self.describe()))?;
                let dst = c.host_offset(fresh.chunks()[0].phys, 0);
                self.write_host(dst, vc * cs, buf).await
            }
            .await;
            if let Err(e) = r {
                self.map.release(fresh);
                return Err(e);
            }
            self.map.publish(fresh, 0..0, &[]);
            moved.push(p);
        }
        meta.commit(self.storage.as_ref(), &self.stats).await?;
        // Nothing durable points at the old chunks any more, and they are
        // reserved: give their space back.
        self.punch_chunks(c, &moved, 0).await
    }
}
