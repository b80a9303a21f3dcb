//! A read-only qcow2 reader: a qcow2 image as a base.
//!
//! Versions 2 and 3; the active L1 table (internal snapshots are ignored),
//! L2 tables through a small cache; unallocated clusters read from the
//! backing image or as zeros, zero clusters (v3) as zeros, compressed
//! clusters are inflated (deflate; zstd is refused at open), and extended
//! L2 entries (32 subclusters per cluster) are followed. Encrypted images,
//! external data files, images marked corrupt and unknown incompatible
//! features are refused at open with a message saying which.
//!
//! The image file itself is any [`Base`] (a local file, an NBD export, an
//! HTTP object), so qcow2 works over every transport. Every structure is
//! validated before use: a malformed image gives an error, never a panic
//! nor an out-of-range read. Opening the backing chain is the caller's job
//! (the backing name and format are in [`Header`]).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex};

use fvd_core::base::Base;
use fvd_core::storage::{AllocRun, IoFuture, coalesce};
use fvd_core::{Error, ErrorKind, IoBuf};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Incompatible feature: the image was not closed cleanly (refcounts may
/// be stale; harmless for reading).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image is marked corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the compression type field is used.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2E_COMPRESSED: u64 = 1 << 62;
const L2E_ZERO: u64 = 1;
/// QEMU's limit on the L1 table.
const MAX_L1_BYTES: u64 = 32 << 20;
/// Longest backing file name QEMU writes.
const MAX_BACKING_NAME: u32 = 1023;
/// Bytes of L2 tables kept in memory.
const L2_CACHE_BYTES: u64 = 16 << 20;
/// Decompressed clusters kept in memory.
const ZCACHE_CLUSTERS: usize = 4;
/// Subclusters per cluster with extended L2 entries.
const SUBCLUSTERS: u64 = 32;

/// The fields of a qcow2 header this reader uses, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Entries in the L1 table.
    pub l1_size: u32,
    /// File offset of the L1 table.
    pub l1_table_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
    /// Backing file format from the header extension, if recorded.
    pub backing_format: Option<String>,
    /// Length of the header (72 for v2).
    pub header_length: u32,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2 { 16 } else { 8 }
    }
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn invalid(name: &str, msg: impl std::fmt::Display) -> Error {
    Error::invalid(format!("{name}: invalid qcow2 image: {msg}"))
}

fn unsupported(name: &str, msg: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Unsupported, format!("{name}: {msg}"))
}

/// Parse and validate a qcow2 header. `head` holds at least the first 512
/// bytes of the file (the whole first cluster if it is larger: the header
/// extensions and the backing file name live there); `file_size` is the
/// size of the file. `name` is used in messages.
pub fn parse_header(head: &[u8], file_size: u64, name: &str) -> Result<Header, Error> {
    let short = || invalid(name, "file too short for a qcow2 header");
    let magic = be32(head, 0).ok_or_else(short)?;
    if magic != MAGIC {
        return Err(invalid(
            name,
            "no qcow2 magic (is it really a qcow2 image?)",
        ));
    }
    let version = be32(head, 4).ok_or_else(short)?;
    if version != 2 && version != 3 {
        return Err(unsupported(
            name,
            format!("qcow2 version {version} is not supported"),
        ));
    }
    let backing_offset = be64(head, 8).ok_or_else(short)?;
    let backing_size = be32(head, 16).ok_or_else(short)?;
    let cluster_bits = be32(head, 20).ok_or_else(short)?;
    let size = be64(head, 24).ok_or_else(short)?;
    let crypt_method = be32(head, 32).ok_or_else(short)?;
    let l1_size = be32(head, 36).ok_or_else(short)?;
    let l1_table_offset = be64(head, 40).ok_or_else(short)?;
    if !(9..=21).contains(&cluster_bits) {
        return Err(invalid(
            name,
            format!("cluster_bits {cluster_bits} is out of range 9..21"),
        ));
    }
    let cluster_size = 1u64 << cluster_bits;
    let (incompatible, header_length) = if version == 3 {
        let incompatible = be64(head, 72).ok_or_else(short)?;
        let refcount_order = be32(head, 96).ok_or_else(short)?;
        let header_length = be32(head, 100).ok_or_else(short)?;
        if refcount_order > 6 {
            return Err(invalid(
                name,
                format!("refcount_order {refcount_order} is above 6"),
            ));
        }
        if header_length < 104 || header_length % 8 != 0 || u64::from(header_length) > cluster_size
        {
            return Err(invalid(name, format!("bad header length {header_length}")));
        }
        (incompatible, header_length)
    } else {
        (0, 72)
    };
    if (head.len() as u64) < cluster_size.min(file_size).max(u64::from(header_length)) {
        return Err(short());
    }
    if crypt_method != 0 {
        let what = match crypt_method {
            1 => "AES (legacy qcow2 encryption)",
            2 => "LUKS",
            _ => "an unknown method",
        };
        return Err(unsupported(
            name,
            format!("the qcow2 image is encrypted ({what}); encrypted images are not supported"),
        ));
    }
    let unknown = incompatible & !INCOMPAT_KNOWN;
    if unknown != 0 {
        return Err(unsupported(
            name,
            format!("the qcow2 image uses unknown incompatible features (bits {unknown:#x})"),
        ));
    }
    if incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(Error::corrupt(format!(
            "{name}: the qcow2 image is marked corrupt; repair it with 'qemu-img check -r all' first"
        )));
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 {
        return Err(unsupported(
            name,
            "the qcow2 image keeps its data in an external data file, which is not supported",
        ));
    }
    let compression_type = if header_length > 104 {
        head.get(104).copied().ok_or_else(short)?
    } else {
        0
    };
    if incompatible & INCOMPAT_COMPRESSION != 0 {
        match compression_type {
            0 => {
                return Err(invalid(
                    name,
                    "compression type bit set with deflate compression",
                ));
            }
            1 => {
                return Err(unsupported(
                    name,
                    "the qcow2 image uses zstd compression, which is not supported (only deflate); \
                     convert it with 'qemu-img convert -O qcow2 -o compression_type=zlib'",
                ));
            }
            t => {
                return Err(unsupported(
                    name,
                    format!("unknown qcow2 compression type {t}"),
                ));
            }
        }
    } else if compression_type != 0 {
        return Err(invalid(
            name,
            "compression type set without its incompatible feature bit",
        ));
    }
    let extended_l2 = incompatible & INCOMPAT_EXTL2 != 0;
    if extended_l2 && cluster_bits < 14 {
        return Err(invalid(
            name,
            "extended L2 entries need clusters of at least 16 KiB",
        ));
    }

    // L1 table: big enough for the virtual size, inside the file.
    let l2_entries = cluster_size / if extended_l2 { 16 } else { 8 };
    let per_l1 = cluster_size * l2_entries; // at most 2^21 * 2^18 = 2^39
    let needed = size.div_ceil(per_l1);
    if u64::from(l1_size) < needed {
        return Err(invalid(
            name,
            format!("the L1 table ({l1_size} entries) is too small for {size} bytes"),
        ));
    }
    if u64::from(l1_size) * 8 > MAX_L1_BYTES {
        return Err(unsupported(
            name,
            format!("the L1 table ({l1_size} entries) is too large"),
        ));
    }
    if size > i64::MAX as u64 {
        return Err(invalid(name, format!("virtual size {size} is too large")));
    }
    if l1_size > 0 {
        if l1_table_offset == 0 || !l1_table_offset.is_multiple_of(cluster_size) {
            return Err(invalid(
                name,
                format!("L1 table offset {l1_table_offset:#x} is not cluster aligned"),
            ));
        }
        let end = l1_table_offset.checked_add(u64::from(l1_size) * 8);
        if end.is_none_or(|e| e > file_size) {
            return Err(invalid(name, "the L1 table lies past the end of the file"));
        }
    }

    // Backing file name.
    let backing_file = if backing_offset != 0 {
        if backing_size == 0 || backing_size > MAX_BACKING_NAME {
            return Err(invalid(
                name,
                format!("bad backing file name length {backing_size}"),
            ));
        }
        let end = backing_offset
            .checked_add(u64::from(backing_size))
            .filter(|&e| e <= cluster_size && backing_offset >= u64::from(header_length))
            .ok_or_else(|| {
                invalid(
                    name,
                    "the backing file name lies outside the header cluster",
                )
            })?;
        let bytes = head
            .get(backing_offset as usize..end as usize)
            .ok_or_else(short)?;
        let s = std::str::from_utf8(bytes)
            .map_err(|_| invalid(name, "the backing file name is not UTF-8"))?;
        if s.contains('\0') {
            return Err(invalid(name, "the backing file name contains a NUL byte"));
        }
        Some(s.to_string())
    } else {
        None
    };

    // Header extensions, up to the backing file name (or the cluster end).
    let ext_end = if backing_offset != 0 {
        backing_offset
    } else {
        cluster_size
    };
    let ext_end = ext_end.min(head.len() as u64) as usize;
    let mut pos = header_length as usize;
    let mut backing_format = None;
    while pos + 8 <= ext_end {
        let ty = be32(head, pos).ok_or_else(short)?;
        let len = be32(head, pos + 4).ok_or_else(short)? as usize;
        if ty == EXT_END {
            break;
        }
        let data_start = pos + 8;
        let data_end = data_start
            .checked_add(len)
            .filter(|&e| e <= ext_end)
            .ok_or_else(|| invalid(name, format!("header extension {ty:#x} is too long")))?;
        let data = &head[data_start..data_end];
        match ty {
            EXT_BACKING_FORMAT => {
                let f = std::str::from_utf8(data)
                    .ok()
                    .map(|s| s.trim_end_matches('\0'))
                    .filter(|s| {
                        !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_graphic())
                    })
                    .ok_or_else(|| invalid(name, "bad backing format extension"))?;
                backing_format = Some(f.to_string());
            }
            EXT_CRYPTO_HEADER => {
                return Err(unsupported(
                    name,
                    "the qcow2 image is encrypted; encrypted images are not supported",
                ));
            }
            EXT_DATA_FILE => {
                return Err(unsupported(
                    name,
                    "the qcow2 image names an external data file, which is not supported",
                ));
            }
            EXT_FEATURE_TABLE => {}
            _ => {}
        }
        pos = data_start + len.div_ceil(8) * 8;
    }
    Ok(Header {
        version,
        cluster_bits,
        size,
        l1_size,
        l1_table_offset,
        incompatible,
        extended_l2,
        backing_file,
        backing_format,
        header_length,
    })
}

/// Read and validate the header of the qcow2 image in `file`.
pub async fn read_header(file: &dyn Base, name: &str) -> Result<Header, Error> {
    let file_size = file.size();
    let first = file
        .read_at(0, IoBuf::zeroed(512))
        .await
        .map_err(|e| Error::io(format!("{name}: read qcow2 header"), e))?;
    if file_size < 72 {
        return Err(invalid(name, "file too short for a qcow2 header"));
    }
    let cluster_bits = be32(&first, 20).unwrap_or(0);
    if be32(&first, 0) != Some(MAGIC) || !(9..=21).contains(&cluster_bits) {
        // Let parse_header report it.
        return parse_header(&first, file_size, name);
    }
    let want = (1u64 << cluster_bits).min(file_size).max(512) as usize;
    let head = if want > first.len() {
        file.read_at(0, IoBuf::zeroed(want))
            .await
            .map_err(|e| Error::io(format!("{name}: read qcow2 header"), e))?
    } else {
        first
    };
    parse_header(&head, file_size, name)
}

/// Where guest bytes come from, for one run of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Map {
    /// Not allocated here: the backing image (or zeros).
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// At this file offset (for the start of the run).
    Data(u64),
    /// In the compressed cluster at `offset` (`len` bytes of input).
    Compressed { offset: u64, len: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    vaddr: u64,
    len: u64,
    map: Map,
}

struct L2Cache {
    tables: HashMap<u64, (Arc<Vec<u64>>, u64)>,
    tick: u64,
    capacity: usize,
}

/// A qcow2 image used as a base.
pub struct Qcow2Base {
    file: Arc<dyn Base>,
    backing: Option<Arc<dyn Base>>,
    name: String,
    header: Header,
    file_size: u64,
    l1: Vec<u64>,
    l2_cache: Mutex<L2Cache>,
    zcache: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
}

fn corrupt(name: &str, msg: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{name}: corrupt qcow2 image: {msg}"),
    )
}

/// Inflate raw deflate data into exactly `out.len()` bytes (extra input is
/// ignored: compressed clusters are padded to whole sectors).
fn inflate_cluster(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use miniz_oxide::inflate::TINFLStatus;
    use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};
    let mut d = Box::<DecompressorOxide>::default();
    let (status, _, written) = decompress(
        &mut d,
        input,
        out,
        0,
        inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    );
    if written == out.len() {
        return Ok(());
    }
    Err(match status {
        TINFLStatus::Done => format!(
            "compressed cluster holds {written} bytes, not {}",
            out.len()
        ),
        s => format!("bad compressed cluster ({s:?})"),
    })
}

impl Qcow2Base {
    /// A qcow2 image over `file` with the validated `header`, reading
    /// unallocated clusters from `backing` (zeros without one). Loads the
    /// L1 table and checks its entries.
    pub async fn open(
        file: Arc<dyn Base>,
        name: String,
        header: Header,
        backing: Option<Arc<dyn Base>>,
    ) -> Result<Qcow2Base, Error> {
        let file_size = file.size();
        let cs = header.cluster_size();
        let mut l1 = Vec::new();
        if header.l1_size > 0 {
            let bytes = file
                .read_at(
                    header.l1_table_offset,
                    IoBuf::zeroed(header.l1_size as usize * 8),
                )
                .await
                .map_err(|e| Error::io(format!("{name}: read the qcow2 L1 table"), e))?;
            l1 = bytes
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect();
        }
        // Only the entries that cover the virtual size matter.
        let used = header.size.div_ceil(cs * header.l2_entries()) as usize;
        for (i, e) in l1.iter().take(used).enumerate() {
            let off = e & L1E_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) || off.checked_add(cs).is_none_or(|end| end > file_size) {
                return Err(Error::corrupt(format!(
                    "{name}: corrupt qcow2 image: L1 entry {i} points to {off:#x}, \
                     not a cluster inside the file"
                )));
            }
        }
        let capacity = (L2_CACHE_BYTES / cs).max(4) as usize;
        Ok(Qcow2Base {
            file,
            backing,
            name,
            file_size,
            l1,
            l2_cache: Mutex::new(L2Cache {
                tables: HashMap::new(),
                tick: 0,
                capacity,
            }),
            zcache: Mutex::new(VecDeque::new()),
            header,
        })
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    async fn l2_table(&self, offset: u64) -> io::Result<Arc<Vec<u64>>> {
        {
            let mut c = self.l2_cache.lock().unwrap_or_else(|p| p.into_inner());
            c.tick += 1;
            let tick = c.tick;
            if let Some((t, used)) = c.tables.get_mut(&offset) {
                *used = tick;
                return Ok(t.clone());
            }
        }
        let cs = self.header.cluster_size() as usize;
        let bytes = self.file.read_at(offset, IoBuf::zeroed(cs)).await?;
        let table: Arc<Vec<u64>> = Arc::new(
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        );
        let mut c = self.l2_cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.tables.len() >= c.capacity
            && let Some(oldest) = c
                .tables
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
        {
            c.tables.remove(&oldest);
        }
        let tick = c.tick;
        c.tables.insert(offset, (table.clone(), tick));
        Ok(table)
    }

    /// The L2 entry (and extended bitmap) of guest cluster `ci`.
    async fn l2_entry(&self, ci: u64) -> io::Result<(u64, u64)> {
        let per = self.header.l2_entries();
        let l1_index = ci / per;
        let Some(&l1e) = usize::try_from(l1_index).ok().and_then(|i| self.l1.get(i)) else {
            return Ok((0, 0));
        };
        let l2_offset = l1e & L1E_OFFSET_MASK;
        if l2_offset == 0 {
            return Ok((0, 0));
        }
        // L1 entries were checked at open.
        let table = self.l2_table(l2_offset).await?;
        let i = (ci % per) as usize;
        if self.header.extended_l2 {
            Ok((table[2 * i], table[2 * i + 1]))
        } else {
            Ok((table[i], 0))
        }
    }

    /// Segments covering `[offset, offset+len)`, all inside the virtual size.
    async fn plan(&self, offset: u64, len: u64) -> io::Result<Vec<Segment>> {
        let h = &self.header;
        let cb = h.cluster_bits;
        let cs = h.cluster_size();
        let end = offset + len;
        let mut out: Vec<Segment> = Vec::new();
        let push = |out: &mut Vec<Segment>, s: Segment| {
            if let Some(last) = out.last_mut() {
                let joins = match (last.map, s.map) {
                    (Map::Unallocated, Map::Unallocated) | (Map::Zero, Map::Zero) => true,
                    (Map::Data(a), Map::Data(b)) => a + last.len == b,
                    _ => false,
                };
                if joins && last.vaddr + last.len == s.vaddr {
                    last.len += s.len;
                    return;
                }
            }
            out.push(s);
        };
        let mut pos = offset;
        while pos < end {
            let ci = pos >> cb;
            let cstart = ci << cb;
            let cend = (cstart + cs).min(end);
            let (e, bitmap) = self.l2_entry(ci).await?;
            if e & L2E_COMPRESSED != 0 {
                let x = 62 - (cb - 8);
                let coff = e & ((1u64 << x) - 1);
                let sectors = (e >> x) & ((1u64 << (cb - 8)) - 1);
                let clen = (sectors + 1) * 512 - (coff & 511);
                if coff == 0 || coff >= self.file_size {
                    return Err(corrupt(
                        &self.name,
                        format!(
                            "compressed cluster at {cstart:#x} points to {coff:#x}, outside the file"
                        ),
                    ));
                }
                let clen = clen.min(self.file_size - coff);
                push(
                    &mut out,
                    Segment {
                        vaddr: pos,
                        len: cend - pos,
                        map: Map::Compressed {
                            offset: coff,
                            len: clen,
                        },
                    },
                );
                pos = cend;
                continue;
            }
            let host = e & L2E_OFFSET_MASK;
            if host != 0 && (!host.is_multiple_of(cs) || host >= self.file_size) {
                return Err(corrupt(
                    &self.name,
                    format!(
                        "cluster at {cstart:#x} points to {host:#x}, not a cluster inside the file"
                    ),
                ));
            }
            if !h.extended_l2 {
                let map = if e & L2E_ZERO != 0 {
                    Map::Zero
                } else if host == 0 {
                    Map::Unallocated
                } else {
                    Map::Data(host + (pos - cstart))
                };
                push(
                    &mut out,
                    Segment {
                        vaddr: pos,
                        len: cend - pos,
                        map,
                    },
                );
                pos = cend;
                continue;
            }
            let alloc = bitmap & 0xffff_ffff;
            let zero = bitmap >> 32;
            if alloc & zero != 0 || (host == 0 && alloc != 0) {
                return Err(corrupt(
                    &self.name,
                    format!(
                        "invalid subcluster bitmap {bitmap:#018x} for the cluster at {cstart:#x}"
                    ),
                ));
            }
            let sc = cs / SUBCLUSTERS;
            while pos < cend {
                let i = (pos - cstart) / sc;
                let send = (cstart + (i + 1) * sc).min(cend);
                let map = if zero & (1 << i) != 0 {
                    Map::Zero
                } else if alloc & (1 << i) != 0 {
                    Map::Data(host + (pos - cstart))
                } else {
                    Map::Unallocated
                };
                push(
                    &mut out,
                    Segment {
                        vaddr: pos,
                        len: send - pos,
                        map,
                    },
                );
                pos = send;
            }
        }
        Ok(out)
    }

    async fn decompressed(&self, offset: u64, len: u64) -> io::Result<Arc<Vec<u8>>> {
        {
            let z = self.zcache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, c)) = z.iter().find(|(k, _)| *k == offset) {
                return Ok(c.clone());
            }
        }
        let input = self
            .file
            .read_at(offset, IoBuf::zeroed(len as usize))
            .await?;
        let mut out = vec![0u8; self.header.cluster_size() as usize];
        inflate_cluster(&input, &mut out)
            .map_err(|m| corrupt(&self.name, format!("at {offset:#x}: {m}")))?;
        let out = Arc::new(out);
        let mut z = self.zcache.lock().unwrap_or_else(|p| p.into_inner());
        if z.len() >= ZCACHE_CLUSTERS {
            z.pop_front();
        }
        z.push_back((offset, out.clone()));
        Ok(out)
    }

    async fn fill(&self, seg: &Segment, dst: &mut [u8]) -> io::Result<()> {
        match seg.map {
            Map::Zero => dst.fill(0),
            Map::Unallocated => match &self.backing {
                None => dst.fill(0),
                Some(b) => {
                    let got = b.read_at(seg.vaddr, IoBuf::zeroed(dst.len())).await?;
                    dst.copy_from_slice(&got);
                }
            },
            Map::Data(host) => {
                let got = self.file.read_at(host, IoBuf::zeroed(dst.len())).await?;
                dst.copy_from_slice(&got);
            }
            Map::Compressed { offset, len } => {
                let cluster = self.decompressed(offset, len).await?;
                let within = (seg.vaddr & (self.header.cluster_size() - 1)) as usize;
                dst.copy_from_slice(&cluster[within..within + dst.len()]);
            }
        }
        Ok(())
    }

    async fn read(&self, offset: u64, mut buf: IoBuf) -> io::Result<IoBuf> {
        let inside = self
            .header
            .size
            .saturating_sub(offset)
            .min(buf.len() as u64);
        buf[inside as usize..].fill(0);
        if inside == 0 {
            return Ok(buf);
        }
        let plan = self.plan(offset, inside).await?;
        // One run straight from the file or the backing image: no copy.
        if let [seg] = plan.as_slice()
            && seg.len == buf.len() as u64
        {
            match (seg.map, &self.backing) {
                (Map::Data(host), _) => return self.file.read_at(host, buf).await,
                (Map::Unallocated, Some(b)) => return b.read_at(offset, buf).await,
                _ => {}
            }
        }
        for seg in &plan {
            let from = (seg.vaddr - offset) as usize;
            self.fill(seg, &mut buf[from..from + seg.len as usize])
                .await?;
        }
        Ok(buf)
    }

    async fn alloc_map(&self, offset: u64, len: u64) -> io::Result<Vec<AllocRun>> {
        let inside = self.header.size.saturating_sub(offset).min(len);
        let mut runs = Vec::new();
        if inside > 0 {
            for seg in self.plan(offset, inside).await? {
                match seg.map {
                    Map::Data(_) | Map::Compressed { .. } => runs.push(AllocRun {
                        length: seg.len,
                        data: true,
                    }),
                    Map::Zero => runs.push(AllocRun {
                        length: seg.len,
                        data: false,
                    }),
                    Map::Unallocated => match &self.backing {
                        None => runs.push(AllocRun {
                            length: seg.len,
                            data: false,
                        }),
                        Some(b) => {
                            let got = b.allocation(seg.vaddr, seg.len).await?;
                            let total: u64 = got.iter().map(|r| r.length).sum();
                            if total != seg.len {
                                return Err(io::Error::other(format!(
                                    "{}: the backing image mapped {total} bytes of {}",
                                    self.name, seg.len
                                )));
                            }
                            runs.extend(got);
                        }
                    },
                }
            }
        }
        runs.push(AllocRun {
            length: len - inside,
            data: false,
        });
        Ok(coalesce(runs))
    }
}

impl Base for Qcow2Base {
    fn size(&self) -> u64 {
        self.header.size
    }

    fn read_at(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(self.read(offset, buf))
    }

    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        Box::pin(self.alloc_map(offset, len))
    }

    fn format(&self) -> fvd_core::Format {
        fvd_core::Format::Qcow2
    }

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn validator(&self) -> String {
        let v = format!("size={};file:{}", self.header.size, self.file.validator());
        if v.len() <= 256 {
            v
        } else {
            format!("size={};file-size={}", self.header.size, self.file_size)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fvd_core::base::RawBase;
    use fvd_core::executor::block_on;
    use fvd_core::storage::MemStorage;

    /// A v3 image by hand: 64 KiB clusters, 1 MiB virtual, cluster 0 data
    /// (0xaa), cluster 1 zero flag, cluster 2 compressed (0x5b), rest
    /// unallocated.
    fn tiny_image() -> Vec<u8> {
        let cs = 65536usize;
        let mut f = vec![0u8; 6 * cs];
        let put32 =
            |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut f, 0, MAGIC);
        put32(&mut f, 4, 3);
        put32(&mut f, 20, 16);
        put64(&mut f, 24, 1 << 20);
        put32(&mut f, 36, 1);
        put64(&mut f, 40, cs as u64); // L1 at cluster 1
        put32(&mut f, 96, 4);
        put32(&mut f, 100, 104);
        put64(&mut f, cs, 2 * cs as u64); // L2 at cluster 2
        put64(&mut f, 2 * cs, 3 * cs as u64); // data at cluster 3
        put64(&mut f, 2 * cs + 8, 1); // zero
        f[3 * cs..4 * cs].fill(0xaa);
        let data = vec![0x5bu8; cs];
        let comp = miniz_oxide::deflate::compress_to_vec(&data, 6);
        let coff = 4 * cs as u64 + 100;
        f[coff as usize..coff as usize + comp.len()].copy_from_slice(&comp);
        let sectors = ((coff & 511) + comp.len() as u64).div_ceil(512) - 1;
        let x = 62 - (16 - 8);
        put64(&mut f, 2 * cs + 16, L2E_COMPRESSED | (sectors << x) | coff);
        f
    }

    fn open_mem(bytes: &[u8]) -> Result<Qcow2Base, Error> {
        let file: Arc<dyn Base> =
            Arc::new(RawBase::new(Arc::new(MemStorage::from_bytes("t", bytes))).unwrap());
        block_on(async {
            let h = read_header(file.as_ref(), "t").await?;
            Qcow2Base::open(file, "t".into(), h, None).await
        })
    }

    #[test]
    fn reads_data_zero_compressed_and_holes() {
        let q = open_mem(&tiny_image()).unwrap();
        let buf = block_on(q.read_at(0, IoBuf::zeroed(4 << 16))).unwrap();
        assert!(buf[..65536].iter().all(|&b| b == 0xaa));
        assert!(buf[65536..131072].iter().all(|&b| b == 0));
        assert!(buf[131072..196608].iter().all(|&b| b == 0x5b));
        assert!(buf[196608..].iter().all(|&b| b == 0));
        // Unaligned read across clusters and past the end.
        let buf = block_on(q.read_at(65536 - 10, IoBuf::zeroed(20))).unwrap();
        assert_eq!(&buf[..10], &[0xaa; 10]);
        assert_eq!(&buf[10..], &[0; 10]);
        let buf = block_on(q.read_at((1 << 20) - 4, IoBuf::zeroed(8))).unwrap();
        assert_eq!(&buf[..], &[0; 8]);
        let map = block_on(q.allocation(0, 2 << 20)).unwrap();
        assert_eq!(
            map,
            vec![
                AllocRun {
                    length: 65536,
                    data: true
                },
                AllocRun {
                    length: 65536,
                    data: false
                },
                AllocRun {
                    length: 65536,
                    data: true
                },
                AllocRun {
                    length: (2 << 20) - 3 * 65536,
                    data: false
                },
            ]
        );
    }

    #[test]
    fn refuses_features_clearly() {
        let img = tiny_image();
        let with = |at: usize, bytes: &[u8]| {
            let mut f = img.clone();
            f[at..at + bytes.len()].copy_from_slice(bytes);
            open_mem(&f)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(with(32, &2u32.to_be_bytes()).contains("encrypted"));
        assert!(with(72, &(INCOMPAT_DATA_FILE).to_be_bytes()).contains("external data file"));
        assert!(with(72, &(INCOMPAT_CORRUPT).to_be_bytes()).contains("corrupt"));
        assert!(with(72, &(1u64 << 40).to_be_bytes()).contains("unknown incompatible"));
        let mut f = img.clone();
        f[100..104].copy_from_slice(&112u32.to_be_bytes());
        f[72..80].copy_from_slice(&INCOMPAT_COMPRESSION.to_be_bytes());
        f[104] = 1;
        assert!(open_mem(&f).err().unwrap().to_string().contains("zstd"));
        assert!(with(0, b"QFI\0").contains("magic"));
        assert!(with(4, &1u32.to_be_bytes()).contains("version"));
        assert!(with(36, &0u32.to_be_bytes()).contains("too small"));
    }

    #[test]
    fn mutated_headers_never_panic() {
        let img = tiny_image();
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..3000 {
            let mut f = img.clone();
            for _ in 0..(next() % 4 + 1) {
                // Mostly the header, sometimes the L1/L2 tables.
                let region = match next() % 4 {
                    0 => 65536 + (next() % 16) as usize,
                    1 => 2 * 65536 + (next() % 32) as usize,
                    _ => (next() % 112) as usize,
                };
                f[region] = next() as u8;
            }
            if let Ok(q) = open_mem(&f) {
                let _ = block_on(q.read_at(0, IoBuf::zeroed(1 << 20)));
                let _ = block_on(q.allocation(0, 1 << 20));
            }
        }
    }
}
