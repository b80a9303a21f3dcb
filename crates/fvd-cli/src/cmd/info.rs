//! `fvd info` — what an image is, like `qemu-img info`.
//!
//! The image is opened read-only: nothing is written, and a journal left by
//! a crash is replayed in memory only.

use std::path::PathBuf;

use anyhow::Result;
use fvd_core::format::header::{
    self, AUTOCLEAR_NAMES, COMPAT_NAMES, Header, INCOMPAT_NAMES, Region,
};
use fvd_core::{Format, Image, Location, Opener};
use serde::Serialize;

use crate::cmd::snapshot::{SnapshotJson, table};
use crate::common::{open, parse_format, print_json};
use crate::size::human;

/// Output formats of the inspection commands.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    /// Text for people.
    #[default]
    Human,
    /// JSON shaped like qemu-img's.
    Json,
}

/// Arguments of `fvd info`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
    /// Open without taking the shared lock (inspect an image in use).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Image format: fvd (default) or raw.
    #[arg(short = 'f', value_name = "FMT", default_value = "fvd", value_parser = parse_format)]
    pub format: Format,
    /// The image.
    pub image: PathBuf,
}

/// `info --output=json`, in qemu-img's key style.
#[derive(Serialize, Debug)]
struct InfoJson {
    filename: String,
    format: &'static str,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size")]
    actual_size: u64,
    #[serde(rename = "dirty-flag")]
    dirty_flag: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    encrypted: bool,
    #[serde(rename = "cluster-size", skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    #[serde(rename = "backing-filename", skip_serializing_if = "Option::is_none")]
    backing_filename: Option<String>,
    #[serde(
        rename = "backing-filename-format",
        skip_serializing_if = "Option::is_none"
    )]
    backing_filename_format: Option<String>,
    #[serde(
        rename = "full-backing-filename",
        skip_serializing_if = "Option::is_none"
    )]
    full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    snapshots: Vec<SnapshotJson>,
    #[serde(rename = "format-specific", skip_serializing_if = "Option::is_none")]
    format_specific: Option<FormatSpecific>,
}

#[derive(Serialize, Debug)]
struct FormatSpecific {
    #[serde(rename = "type")]
    kind: &'static str,
    data: FvdData,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "kebab-case")]
struct FvdData {
    version: u32,
    block_size: u64,
    chunk_size: u64,
    journal_size: u64,
    metadata_bytes: u64,
    bitmap_bytes: u64,
    table_bytes: u64,
    local_blocks: u64,
    base_blocks: u64,
    local_fraction: f64,
    clean: bool,
    all_local: bool,
    copy_on_read: bool,
    zero_detected: bool,
    incompatible_features: u64,
    compatible_features: u64,
    autoclear_features: u64,
    journal_epoch: u64,
    replayed_journal_blocks: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    compact: Option<CompactData>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encrypt: Option<EncryptData>,
}

/// The LUKS header, in the shape of qemu-img info's `encrypt` object.
#[derive(Serialize, Debug)]
#[serde(rename_all = "kebab-case")]
struct EncryptData {
    format: &'static str,
    cipher_alg: &'static str,
    cipher_mode: &'static str,
    ivgen_alg: &'static str,
    hash_alg: &'static str,
    payload_offset: u64,
    master_key_iters: u32,
    uuid: String,
    slots: Vec<SlotData>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "kebab-case")]
struct SlotData {
    active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    iters: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stripes: Option<u32>,
    key_offset: u64,
}

fn encrypt_data(img: &Image, h: &Header) -> Option<EncryptData> {
    let l = img.luks_header()?;
    Some(EncryptData {
        format: "luks",
        cipher_alg: "aes-256",
        cipher_mode: "xts",
        ivgen_alg: "plain64",
        hash_alg: "sha256",
        payload_offset: h.region(Region::Data).offset,
        master_key_iters: l.mk_digest_iterations,
        uuid: l.uuid.clone(),
        slots: l
            .slots
            .iter()
            .map(|s| SlotData {
                active: s.active,
                iters: s.active.then_some(s.iterations),
                stripes: s.active.then_some(s.stripes),
                key_offset: s.material_sector as u64 * 512,
            })
            .collect(),
    })
}

/// Chunk usage of a compact image.
#[derive(Serialize, Debug)]
#[serde(rename_all = "kebab-case")]
struct CompactData {
    chunks: u64,
    allocated_chunks: u64,
    allocated_bytes: u64,
    /// Share of virtually adjacent allocated chunk pairs that are not
    /// physically adjacent.
    fragmentation: f64,
}

/// Names of the set bits of a feature word.
fn feature_names(bits: u64, known: &[(u64, &'static str)]) -> String {
    if bits == 0 {
        return "none".into();
    }
    let (names, unknown) = header::feature_names(bits, known);
    let mut names: Vec<String> = names.into_iter().map(String::from).collect();
    if unknown != 0 {
        names.push(format!("unknown {unknown:#x}"));
    }
    names.join(", ")
}

/// The fraction of the base range held by the image (1 when there is none).
fn fraction(local: u64, total: u64) -> f64 {
    if total == 0 {
        1.0
    } else {
        local as f64 / total as f64
    }
}

fn fvd_data(img: &Image, h: &Header) -> FvdData {
    let (local, total) = img.local_blocks();
    let bitmap = h.region(Region::Bitmap).length;
    let table = h.region(Region::Table).length;
    FvdData {
        version: header::VERSION,
        block_size: h.block_size as u64,
        chunk_size: h.chunk_size as u64,
        journal_size: h.region(Region::Journal).length,
        metadata_bytes: bitmap + table,
        bitmap_bytes: bitmap,
        table_bytes: table,
        local_blocks: local,
        base_blocks: total,
        local_fraction: fraction(local, total),
        clean: h.is_clean(),
        all_local: h.is_all_local(),
        copy_on_read: h.copy_on_read(),
        zero_detected: h.zero_detected(),
        incompatible_features: h.incompatible,
        compatible_features: h.compatible,
        autoclear_features: h.autoclear,
        journal_epoch: h.journal_epoch,
        replayed_journal_blocks: img.replayed_blocks(),
        encrypt: encrypt_data(img, h),
        compact: img.chunk_usage().map(|u| CompactData {
            chunks: u.chunks,
            allocated_chunks: u.allocated,
            allocated_bytes: u.allocated * u.chunk_size,
            fragmentation: if u.adjacent_pairs == 0 {
                0.0
            } else {
                u.fragmented_pairs as f64 / u.adjacent_pairs as f64
            },
        }),
    }
}

/// Run `fvd info`.
pub async fn run(a: Args, opener: &Opener) -> Result<u8> {
    let img = open(opener, &a.image, a.format, true, a.force_share).await?;
    let path = a.image.display().to_string();
    let actual = img
        .storage()
        .allocated_bytes()
        .map_err(|e| anyhow::anyhow!("{path}: disk size: {e}"))?;
    let h = img.header().cloned();
    let here = Location::Path(a.image.clone());
    let backing = h.as_ref().and_then(|h| h.base()).map(|(name, format)| {
        let full = opener
            .resolve(&here, name)
            .map_or_else(|_| name.to_string(), |l| l.display());
        (name.to_string(), format.name().to_string(), full)
    });
    let data = h.as_ref().map(|h| fvd_data(&img, h));
    let snapshots: Vec<SnapshotJson> = img.snapshots().iter().map(SnapshotJson::from).collect();
    match a.output {
        Output::Json => {
            let j = InfoJson {
                filename: path,
                format: a.format.name(),
                virtual_size: img.virtual_size(),
                actual_size: actual,
                dirty_flag: h.as_ref().is_some_and(|h| !h.is_clean()),
                encrypted: img.is_encrypted(),
                cluster_size: h.as_ref().map(|h| h.block_size as u64),
                backing_filename: backing.as_ref().map(|b| b.0.clone()),
                backing_filename_format: backing.as_ref().map(|b| b.1.clone()),
                full_backing_filename: backing.as_ref().map(|b| b.2.clone()),
                snapshots,
                format_specific: data.map(|data| FormatSpecific { kind: "fvd", data }),
            };
            print_json(&j)?;
        }
        Output::Human => {
            println!("image: {path}");
            println!("file format: {}", a.format.name());
            println!(
                "virtual size: {} ({} bytes)",
                human(img.virtual_size()),
                img.virtual_size()
            );
            println!("disk size: {}", human(actual));
            if img.is_encrypted() {
                println!("encrypted: yes");
            }
            if let (Some(h), Some(d)) = (&h, &data) {
                println!("block size: {}", h.block_size);
                if let Some((name, fmt, full)) = &backing {
                    if *full != *name {
                        println!("backing file: {name} (actual path: {full})");
                    } else {
                        println!("backing file: {name}");
                    }
                    println!("backing file format: {fmt}");
                }
                print!("{}", table(&snapshots));
                println!("Format specific information:");
                println!("    version: {}", d.version);
                if d.base_blocks == 0 {
                    let why = if d.all_local {
                        "all data is in the image; the base is no longer read"
                    } else {
                        "no base range"
                    };
                    println!("    local: 100% ({why})");
                } else {
                    println!(
                        "    local: {}% of base range ({} of {} blocks)",
                        percent(d.local_fraction),
                        d.local_blocks,
                        d.base_blocks
                    );
                }
                println!(
                    "    metadata bytes: {} (bitmap {}, chunk table {})",
                    d.metadata_bytes, d.bitmap_bytes, d.table_bytes
                );
                if let Some(c) = &d.compact {
                    println!(
                        "    chunks: {} allocated of {} ({}, chunk size {}), fragmentation {}%",
                        c.allocated_chunks,
                        c.chunks,
                        human(c.allocated_bytes),
                        human(d.chunk_size),
                        percent(c.fragmentation)
                    );
                }
                println!(
                    "    journal size: {} ({} bytes)",
                    human(d.journal_size),
                    d.journal_size
                );
                println!("    journal epoch: {}", d.journal_epoch);
                if d.clean {
                    println!("    clean: true");
                } else {
                    println!(
                        "    clean: false (journal replayed in memory: {} blocks)",
                        d.replayed_journal_blocks
                    );
                }
                if let Some(e) = &d.encrypt {
                    println!("    encrypt:");
                    println!("        format: {}", e.format);
                    println!(
                        "        cipher: {}-{}-{}, hash {}",
                        e.cipher_alg, e.cipher_mode, e.ivgen_alg, e.hash_alg
                    );
                    println!("        uuid: {}", e.uuid);
                    println!("        master key iters: {}", e.master_key_iters);
                    for (i, s) in e.slots.iter().enumerate().filter(|(_, s)| s.active) {
                        println!(
                            "        key slot {i}: active, iters {}, key offset {}",
                            s.iters.unwrap_or(0),
                            s.key_offset
                        );
                    }
                }
                println!("    copy-on-read: {}", d.copy_on_read);
                println!("    zero detected: {}", d.zero_detected);
                println!("    all local: {}", d.all_local);
                println!(
                    "    incompatible features: {:#x} ({})",
                    h.incompatible,
                    feature_names(h.incompatible, &INCOMPAT_NAMES)
                );
                println!(
                    "    compatible features: {:#x} ({})",
                    h.compatible,
                    feature_names(h.compatible, &COMPAT_NAMES)
                );
                println!(
                    "    autoclear features: {:#x} ({})",
                    h.autoclear,
                    feature_names(h.autoclear, &AUTOCLEAR_NAMES)
                );
            }
        }
    }
    Ok(0)
}

/// A fraction as a percentage with at most two decimals (`12.5`, `100`,
/// `0.01`); a non-zero fraction never shows as 0.
fn percent(f: f64) -> String {
    let p = f * 100.0;
    if p > 0.0 && p < 0.01 {
        return "<0.01".to_string();
    }
    let s = format!("{p:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}
