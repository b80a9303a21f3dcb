//! The truth model: for every 512-byte sector, the values a read may return
//! now and the values a crash may leave.
//!
//! A value is a [`Val`]: zeros, the base's bytes, or the bytes of one write
//! request identified by its unique tag. A tagged sector carries a header
//! (magic, tag, sector number) followed by bytes derived from both, so any
//! sector read back names the request and the place it came from.
//!
//! Per sector the model keeps the writes issued to it since the last crash
//! check, in order (testers never have two writes to one sector in flight).
//! With `D` the issue time of the latest completed flush:
//! * live values: the last completed write, plus every later write that is
//!   in flight or failed (a failed write may or may not have happened);
//! * durable values: the last write that completed before `D` (or with
//!   FUA), plus every later write — completed, in flight or failed. With no
//!   such write, the values the sector had at the last check come first.

use crate::rng::mix64;

/// One possible content of a sector.
pub type Val = u64;
/// All zeros.
pub const ZERO: Val = 0;
/// The base's bytes (zeros past the base's end).
pub const BASE: Val = 1;
/// The first tag a write request may carry.
pub const FIRST_TAG: Val = 2;

/// Sector size of the model.
pub const SECTOR: usize = 512;

const MAGIC: u64 = u64::from_le_bytes(*b"FVDsimWR");

/// Fill `out` (one sector) with the bytes write `tag` puts at `sector`.
pub fn fill_sector(tag: Val, sector: u64, out: &mut [u8]) {
    debug_assert_eq!(out.len(), SECTOR);
    out[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&tag.to_le_bytes());
    out[16..24].copy_from_slice(&sector.to_le_bytes());
    let seed = mix64(tag ^ sector.rotate_left(32));
    for (i, c) in out[24..].chunks_mut(8).enumerate() {
        let v = mix64(seed.wrapping_add(i as u64)).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

/// What a sector's bytes are, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// All zeros.
    Zero,
    /// The base's bytes.
    Base,
    /// Exactly what write `tag` put at `sector`.
    Write {
        /// The request.
        tag: Val,
        /// The sector it was written to (differs from where it was read
        /// when data landed in the wrong place).
        sector: u64,
    },
    /// A write's header with damaged bytes after it.
    Damaged {
        /// The request named by the header.
        tag: Val,
        /// The sector named by the header.
        sector: u64,
    },
    /// Nothing any request wrote.
    Garbage,
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::Zero => write!(f, "zeros"),
            Seen::Base => write!(f, "base data"),
            Seen::Write { tag, sector } => write!(f, "write #{tag} (of sector {sector})"),
            Seen::Damaged { tag, sector } => {
                write!(f, "damaged data of write #{tag} (of sector {sector})")
            }
            Seen::Garbage => write!(f, "garbage"),
        }
    }
}

/// Decode a sector read back from sector `sector`. `base` is the base's
/// bytes of that sector (zero padded).
pub fn identify(bytes: &[u8], sector: u64, base: &[u8]) -> Seen {
    if bytes.len() >= 24 && bytes[0..8] == MAGIC.to_le_bytes() {
        let tag = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let at = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let mut want = [0u8; SECTOR];
        fill_sector(tag, at, &mut want);
        return if bytes == want {
            Seen::Write { tag, sector: at }
        } else {
            Seen::Damaged { tag, sector: at }
        };
    }
    let _ = sector;
    if fvd_core::iobuf::is_zero(bytes) {
        Seen::Zero
    } else if bytes == base {
        Seen::Base
    } else {
        Seen::Garbage
    }
}

/// True when `seen` at `sector` is one of `vals`.
pub fn acceptable(seen: Seen, sector: u64, base_is_zero: bool, vals: &[Val]) -> bool {
    match seen {
        Seen::Zero => vals.contains(&ZERO) || (base_is_zero && vals.contains(&BASE)),
        Seen::Base => vals.contains(&BASE),
        Seen::Write { tag, sector: at } => at == sector && vals.contains(&tag),
        Seen::Damaged { .. } | Seen::Garbage => false,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InFlight,
    Done { at: u64, fua: bool },
    Failed,
}

#[derive(Debug, Clone)]
struct Entry {
    val: Val,
    issued: u64,
    state: State,
}

#[derive(Debug, Clone, Default)]
struct Sector {
    /// Values at the last check (usually one).
    start: Vec<Val>,
    hist: Vec<Entry>,
}

/// A write in the model, from issue to completion.
#[derive(Debug, Clone, Copy)]
pub struct WriteToken {
    first: u64,
    count: u64,
    issued: u64,
}

/// The per-sector truth model of one virtual disk.
pub struct Model {
    sectors: Vec<Sector>,
    clock: u64,
    durable_point: u64,
}

impl Model {
    /// A disk of `sectors` sectors that all read as `initial` values
    /// (`initial(s)` for sector `s`).
    pub fn new(sectors: u64, initial: impl Fn(u64) -> Val) -> Self {
        Model {
            sectors: (0..sectors)
                .map(|s| Sector {
                    start: vec![initial(s)],
                    hist: Vec::new(),
                })
                .collect(),
            clock: 0,
            durable_point: 0,
        }
    }

    /// Number of sectors.
    pub fn len(&self) -> u64 {
        self.sectors.len() as u64
    }

    /// True for a disk of no sectors.
    pub fn is_empty(&self) -> bool {
        self.sectors.is_empty()
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// A write of `val` to sectors `[first, first+count)` was issued.
    pub fn begin_write(&mut self, first: u64, count: u64, val: Val) -> WriteToken {
        let issued = self.tick();
        for s in &mut self.sectors[first as usize..(first + count) as usize] {
            s.hist.push(Entry {
                val,
                issued,
                state: State::InFlight,
            });
        }
        WriteToken {
            first,
            count,
            issued,
        }
    }

    /// The write of `t` completed: `ok` says whether it succeeded, `fua`
    /// whether it was durable on completion.
    pub fn end_write(&mut self, t: WriteToken, ok: bool, fua: bool) {
        let at = self.tick();
        let dp = self.durable_point;
        for s in &mut self.sectors[t.first as usize..(t.first + t.count) as usize] {
            if let Some(e) = s.hist.iter_mut().rev().find(|e| e.issued == t.issued) {
                e.state = if ok {
                    State::Done { at, fua }
                } else {
                    State::Failed
                };
            }
            if s.hist.len() > 6 {
                trim(s, dp);
            }
        }
    }

    /// A flush was issued; pass the result to [`Model::flush_done`].
    pub fn flush_issued(&mut self) -> u64 {
        self.tick()
    }

    /// The flush issued at `issued` completed successfully.
    pub fn flush_done(&mut self, issued: u64) {
        self.durable_point = self.durable_point.max(issued);
    }

    /// Values a read of `sector` may return now.
    pub fn live(&self, sector: u64) -> Vec<Val> {
        let s = &self.sectors[sector as usize];
        let j = s
            .hist
            .iter()
            .rposition(|e| matches!(e.state, State::Done { .. }));
        collect(s, j)
    }

    /// Values `sector` may hold after a crash now.
    pub fn durable(&self, sector: u64) -> Vec<Val> {
        let s = &self.sectors[sector as usize];
        collect(s, durable_index(s, self.durable_point))
    }

    /// After a crash check: `sector` now holds `val` for sure.
    pub fn reset(&mut self, sector: u64, val: Val) {
        let s = &mut self.sectors[sector as usize];
        s.start.clear();
        s.start.push(val);
        s.hist.clear();
    }

    /// After a crash check: the durable point restarts.
    pub fn reset_durability(&mut self) {
        self.durable_point = 0;
    }
}

fn durable_index(s: &Sector, dp: u64) -> Option<usize> {
    s.hist.iter().rposition(|e| match e.state {
        State::Done { at, fua } => fua || at < dp,
        _ => false,
    })
}

fn collect(s: &Sector, j: Option<usize>) -> Vec<Val> {
    let mut out: Vec<Val> = match j {
        Some(j) => s.hist[j..].iter().map(|e| e.val).collect(),
        None => s
            .start
            .iter()
            .copied()
            .chain(s.hist.iter().map(|e| e.val))
            .collect(),
    };
    out.sort_unstable();
    out.dedup();
    out
}

/// Drop history no read or crash can see any more.
fn trim(s: &mut Sector, dp: u64) {
    if let Some(j) = durable_index(s, dp)
        && j > 0
    {
        s.hist.drain(..j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_pattern_identifies_itself() {
        let mut b = [0u8; SECTOR];
        fill_sector(77, 5, &mut b);
        let base = [0u8; SECTOR];
        assert_eq!(identify(&b, 5, &base), Seen::Write { tag: 77, sector: 5 });
        b[300] ^= 1;
        assert_eq!(identify(&b, 5, &base), Seen::Damaged { tag: 77, sector: 5 });
        assert_eq!(identify(&base, 5, &base), Seen::Zero);
        let other = [9u8; SECTOR];
        assert_eq!(identify(&other, 5, &other), Seen::Base);
        assert_eq!(identify(&other, 5, &base), Seen::Garbage);
    }

    #[test]
    fn durability_follows_flushes() {
        let mut m = Model::new(4, |_| BASE);
        let w = m.begin_write(0, 2, 10);
        assert_eq!(m.durable(0), vec![BASE, 10]);
        m.end_write(w, true, false);
        assert_eq!(m.live(0), vec![10]);
        assert_eq!(m.durable(0), vec![BASE, 10]);
        let f = m.flush_issued();
        let w2 = m.begin_write(1, 1, 11);
        m.flush_done(f);
        assert_eq!(m.durable(0), vec![10]);
        assert_eq!(m.durable(1), vec![10, 11]);
        m.end_write(w2, false, false);
        assert_eq!(m.live(1), vec![10, 11]);
        let w3 = m.begin_write(1, 1, 12);
        m.end_write(w3, true, true);
        assert_eq!(m.durable(1), vec![12]);
        assert_eq!(m.live(1), vec![12]);
        m.reset(1, 12);
        assert_eq!(m.durable(1), vec![12]);
    }
}
