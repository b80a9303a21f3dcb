//! Reading the journal back: which header is in force, and replay.
//!
//! Replay applies the records of the valid blocks of the header's epoch in
//! order. A `SET_BITS_CHECKED` record in a block that no replayed block
//! confirms (its round may not have completed: the journal and the data
//! shared one fdatasync) sets a block's bit only if the block's content —
//! where the record's place in the journal maps it — has the record's
//! CRC-32C; otherwise the block keeps reading from the base, the value it
//! had before that never-acknowledged write. Checking is done in two
//! passes: the first finds where each checked block lived when its record
//! applied (compact images move chunks), the second applies the records
//! with the verdicts, in order.
//!
//! Header in force (docs/FORMAT.md §2, §5.3): the newest valid slot, unless
//! the other slot is damaged and the journal proves that the damaged one was
//! newer: valid blocks of the chosen slot's epoch under a clean header (the
//! damaged header differed only in `CLEAN`: replay), or a first journal
//! block of a newer epoch (a lost checkpoint header: refused, `fvd check
//! -r all` rebuilds it).

use super::Durable;
use crate::error::{Error, Result};
use crate::format::header::{
    self, FLAG_CLEAN, HEADER_AREA, HEADER_SLOT_SIZE, Header, INCOMPAT_CHECKSUMMED_JOURNAL,
    INCOMPAT_COMPACT, Region,
};
use crate::format::journal::{self, Block, Record};
use crate::iobuf::IoBuf;
use crate::storage::Storage;

/// Read the valid prefix of the journal of `header`'s epoch.
pub(crate) async fn read_journal(storage: &dyn Storage, header: &Header) -> Result<Vec<Block>> {
    let region = header.region(Region::Journal);
    let total = region.length / journal::BLOCK_SIZE as u64;
    let mut out = Vec::new();
    let mut seq = 0u64;
    const BATCH: u64 = 256;
    'outer: while seq < total {
        let n = BATCH.min(total - seq);
        let buf = IoBuf::zeroed((n as usize) * journal::BLOCK_SIZE);
        let buf = storage
            .read_at(region.offset + seq * journal::BLOCK_SIZE as u64, buf)
            .await
            .map_err(|e| Error::io("journal read", e))?;
        for k in 0..n as usize {
            let bytes = &buf[k * journal::BLOCK_SIZE..(k + 1) * journal::BLOCK_SIZE];
            match journal::decode_block(bytes, header.journal_epoch, seq)? {
                Some(b) => out.push(b),
                None => break 'outer,
            }
            seq += 1;
        }
    }
    Ok(out)
}

/// What a replay did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Replayed {
    /// Valid journal blocks.
    pub blocks: u64,
    /// Records applied.
    pub records: u64,
    /// Checked bits not set because their data did not match.
    pub dropped: u64,
}

/// An unallocated chunk-table entry (docs/FORMAT.md §4.2).
const EMPTY: u32 = u32::MAX;

/// One checked block to verify: where its bytes are (None: unallocated,
/// reads zeros), how many, and the CRC its record promises.
struct Check {
    host: Option<u64>,
    len: u64,
    crc: u32,
}

/// Apply the journal of `h`'s epoch to `durable` (the in-place bitmap and
/// table as read from disk).
pub(crate) async fn replay(
    storage: &dyn Storage,
    h: &Header,
    durable: &mut Durable,
) -> Result<Replayed> {
    let blocks = read_journal(storage, h).await?;
    let confirmed = blocks.iter().map(|b| b.confirmed as u64).max().unwrap_or(0);
    let checks = locate_checks(h, durable, &blocks, confirmed)?;
    let verdicts = verify(storage, &checks).await?;
    let mut next = verdicts.iter();
    let mut out = Replayed {
        blocks: blocks.len() as u64,
        ..Replayed::default()
    };
    for blk in &blocks {
        let unconfirmed = blk.seq >= confirmed;
        for r in &blk.records {
            out.records += 1;
            if let (Record::SetBitsChecked { .. }, true) = (r, unconfirmed) {
                durable.apply_with(r, |_| {
                    let ok = *next.next().expect("one verdict per checked block");
                    out.dropped += u64::from(!ok);
                    ok
                })?;
            } else {
                durable.apply(r)?;
            }
        }
    }
    Ok(out)
}

/// Pass 1: the checks of the unconfirmed checked records, in journal order,
/// each block located through the table as it stands at its record.
fn locate_checks(
    h: &Header,
    durable: &Durable,
    blocks: &[Block],
    confirmed: u64,
) -> Result<Vec<Check>> {
    let compact = h.incompatible & INCOMPAT_COMPACT != 0;
    let mut table = if compact {
        durable.table.clone()
    } else {
        Vec::new()
    };
    let bs = h.block_size as u64;
    let cs = h.chunk_size as u64;
    let base_range = h.base_range();
    let data = h.region(Region::Data).offset;
    let mut out = Vec::new();
    for blk in blocks {
        for r in &blk.records {
            match r {
                Record::Table { first, entries } => {
                    let end = first
                        .checked_add(entries.len() as u64)
                        .filter(|&e| e <= table.len() as u64);
                    if let Some(end) = end {
                        table[*first as usize..end as usize].copy_from_slice(entries);
                    }
                }
                Record::SetBitsChecked { first, crcs } if blk.seq >= confirmed => {
                    for (i, &crc) in crcs.iter().enumerate() {
                        let b = first.saturating_add(i as u64);
                        let v = b.saturating_mul(bs);
                        if v >= base_range {
                            return Err(Error::corrupt(format!(
                                "journal block {}: checked record for block {b} lies outside the base range",
                                blk.seq
                            )));
                        }
                        let len = bs.min(base_range - v);
                        let host = if compact {
                            match table.get((v / cs) as usize) {
                                Some(&p) if p != EMPTY => Some(data + p as u64 * cs + v % cs),
                                _ => None,
                            }
                        } else {
                            Some(data + v)
                        };
                        out.push(Check { host, len, crc });
                    }
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Read the checked blocks (coalescing adjacent ones) and compare CRCs.
async fn verify(storage: &dyn Storage, checks: &[Check]) -> Result<Vec<bool>> {
    const MAX_READ: u64 = 4 << 20;
    let mut ok = Vec::with_capacity(checks.len());
    let mut i = 0;
    while i < checks.len() {
        let Some(start) = checks[i].host else {
            ok.push(checks[i].crc == super::zeros_crc(checks[i].len));
            i += 1;
            continue;
        };
        // A run of checks whose bytes follow each other on the storage.
        let mut j = i + 1;
        let mut end = start + checks[i].len;
        while j < checks.len()
            && checks[j].host == Some(end)
            && end + checks[j].len - start <= MAX_READ
        {
            end += checks[j].len;
            j += 1;
        }
        let buf = storage
            .read_at(start, IoBuf::zeroed((end - start) as usize))
            .await
            .map_err(|e| Error::io("journal replay: read checked data", e))?;
        let mut pos = 0usize;
        for c in &checks[i..j] {
            let n = c.len as usize;
            let bytes = buf.get(pos..pos + n).unwrap_or(&[]);
            ok.push(bytes.len() == n && super::block_crc(bytes) == c.crc);
            pos += n;
        }
        i = j;
    }
    Ok(ok)
}

/// What the header slots and the journal say about the header in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SlotDamage {
    /// The other slot is valid or all zeros.
    None,
    /// The other slot is damaged and nothing says it was newer (a torn
    /// header update): the chosen header is right.
    Torn,
    /// The other slot was newer: the chosen header with `CLEAN` cleared
    /// (journal blocks of its epoch exist). The journal is replayed.
    CleanCleared,
    /// The other slot was newer and started a journal epoch of its own,
    /// whose first block is valid: the header in force is lost. `rebuilt`
    /// is the chosen header moved to that epoch, dirty.
    Lost {
        /// The journal's epoch.
        epoch: u64,
        /// The header to write back (`fvd check -r all`).
        rebuilt: Box<Header>,
    },
}

/// The header an open must use.
#[derive(Debug)]
pub(crate) struct HeaderInForce {
    /// The header (with `CLEAN` cleared when the journal proved it stale).
    pub header: Header,
    /// Its slot.
    pub slot: usize,
    /// What was wrong with the other slot.
    pub damage: SlotDamage,
    /// A sentence for messages when the other slot is damaged.
    pub note: Option<String>,
}

/// Read both header slots and decide which header is in force. The image
/// is refused when the newest header is lost ([`SlotDamage::Lost`]).
pub(crate) async fn header_in_force(storage: &dyn Storage) -> Result<HeaderInForce> {
    let hf = inspect_header(storage).await?;
    if let SlotDamage::Lost { .. } = hf.damage {
        return Err(Error::corrupt(format!(
            "{}: {}",
            storage.describe(),
            hf.note.unwrap_or_default()
        )));
    }
    Ok(hf)
}

/// [`header_in_force`] without refusing a lost header (for `check`).
pub(crate) async fn inspect_header(storage: &dyn Storage) -> Result<HeaderInForce> {
    let desc = storage.describe();
    let len = storage
        .len()
        .map_err(|e| Error::io(format!("{desc}: size"), e))?;
    if len < HEADER_SLOT_SIZE as u64 {
        return Err(Error::invalid(format!(
            "{desc}: not an FVD image (file is only {len} bytes)"
        )));
    }
    let buf = storage
        .read_at(0, IoBuf::zeroed(HEADER_AREA as usize))
        .await
        .map_err(|e| Error::io(format!("{desc}: read header"), e))?;
    let slots = header::decode_both(&buf).map_err(|e| e.context(&desc))?;
    let mut h = slots.header;
    let (slot, other) = (slots.slot, 1 - slots.slot);
    let Some(why) = slots.other_damaged else {
        return Ok(HeaderInForce {
            header: h,
            slot,
            damage: SlotDamage::None,
            note: None,
        });
    };
    // The other slot is damaged: a header update torn by a crash (the older
    // header is right), or a newer header damaged afterwards. The journal
    // tells them apart: blocks are written only after the header that
    // allows them is durable.
    let e = h.journal_epoch;
    if let Some(newer) = first_block_epoch(storage, &h).await?
        && newer != e
        && (1..=1u64 << 32).contains(&newer.wrapping_sub(e))
    {
        let mut rebuilt = h.clone();
        rebuilt.journal_epoch = newer;
        rebuilt.flags &= !FLAG_CLEAN;
        rebuilt.incompatible |= INCOMPAT_CHECKSUMMED_JOURNAL;
        return Ok(HeaderInForce {
            header: h,
            slot,
            damage: SlotDamage::Lost {
                epoch: newer,
                rebuilt: Box::new(rebuilt),
            },
            note: Some(format!(
                "header slot {other} is damaged ({why}) and the journal holds blocks of epoch {newer}, newer than slot {slot}'s epoch {e}: the newest header is lost, and using the older one would roll back flushed writes; `fvd check -r all` rebuilds it from slot {slot} and the journal"
            )),
        });
    }
    let mut note = format!("header slot {other} is damaged ({why}); slot {slot} is used");
    let mut damage = SlotDamage::Torn;
    if h.is_clean() && !read_journal(storage, &h).await?.is_empty() {
        // The damaged header cleared CLEAN for this epoch (and was made
        // durable before these blocks): it equalled this one otherwise.
        h.flags &= !FLAG_CLEAN;
        damage = SlotDamage::CleanCleared;
        note.push_str(&format!(
            "; the journal holds blocks of its epoch {e}, so the damaged slot was the newest header (this one with the clean flag cleared): its journal is replayed"
        ));
    }
    Ok(HeaderInForce {
        header: h,
        slot,
        damage,
        note: Some(note),
    })
}

/// The epoch of journal block 0 if its magic, CRC and position check out.
async fn first_block_epoch(storage: &dyn Storage, h: &Header) -> Result<Option<u64>> {
    let region = h.region(Region::Journal);
    if region.length < journal::BLOCK_SIZE as u64 {
        return Ok(None);
    }
    let buf = storage
        .read_at(region.offset, IoBuf::zeroed(journal::BLOCK_SIZE))
        .await
        .map_err(|e| Error::io("journal read", e))?;
    Ok(journal::block_epoch(&buf, 0))
}
