//! The LUKS1 header: the master key of an encrypted image, kept in up to
//! eight key slots, each opened by its own passphrase.
//!
//! Written to be read by cryptsetup (`luksDump`, `luksAddKey`, `open
//! --test-passphrase` on the extracted area) and QEMU's `luks` driver (with
//! the area as a detached header), and to read what they write, within one
//! profile: cipher `aes`, mode `xts-plain64`, 64-byte key (AES-256-XTS),
//! hash `sha256`, 4000 anti-forensic stripes (QEMU refuses any other
//! count). Everything else is refused with a message naming the field.
//!
//! The **area** is [`AREA_BYTES`] bytes: the 592-byte header (all integers
//! big-endian) at 0, then each slot's key material at the sector its
//! header entry names — cryptsetup's layout: slot `i` at sector `8 + 504 i`,
//! 500 sectors (64 × 4000 bytes) each, 4 KiB aligned. `payloadOffset` is
//! written as 4040 sectors, the area's own length (as qcow2 does): the
//! payload would follow the area if it were extracted as a standalone LUKS
//! volume.
//!
//! A slot holds the master key split into 4000 stripes (AF-split with
//! SHA-256 diffusion), encrypted with AES-256-XTS-plain64 (sector numbers
//! from 0) under a key derived from the passphrase with PBKDF2-HMAC-SHA256.
//! A candidate master key is accepted when PBKDF2 of it with the header's
//! digest salt and iterations equals the 20-byte `mkDigest`.

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{DataCipher, KEY_BYTES, MasterKey, SECTOR, random_bytes, wrong_key};
use crate::error::{Error, Result};

/// `LUKS\xba\xbe`.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Bytes of the header proper.
pub const PHDR_LEN: usize = 592;
/// Key slots.
pub const SLOTS: usize = 8;
/// Anti-forensic stripes per slot.
pub const STRIPES: u32 = 4000;
/// Bytes of `mkDigest`.
pub const DIGEST_LEN: usize = 20;
/// Bytes of every salt.
pub const SALT_LEN: usize = 32;
/// `active` of a slot in use.
pub const SLOT_ACTIVE: u32 = 0x00AC_71F3;
/// `active` of a free slot.
pub const SLOT_INACTIVE: u32 = 0x0000_DEAD;
/// Sectors of key material per slot (64 × 4000 / 512).
pub const MATERIAL_SECTORS: u32 = (KEY_BYTES as u32 * STRIPES).div_ceil(SECTOR as u32);
/// Bytes of the whole area (header and eight slots' material): 4040 sectors.
pub const AREA_BYTES: u64 = 4040 * SECTOR;
/// Fewest PBKDF2 iterations written or accepted (cryptsetup's minimum).
pub const MIN_ITERATIONS: u32 = 1000;
/// The payload offset written: the area's length in sectors.
const PAYLOAD_SECTORS: u32 = (AREA_BYTES / SECTOR) as u32;

/// First sector of slot `i`'s key material (cryptsetup's 4 KiB-aligned layout).
pub fn material_sector(i: usize) -> u32 {
    8 + i as u32 * MATERIAL_SECTORS.next_multiple_of(8)
}

mod off {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 6;
    pub const CIPHER_NAME: usize = 8;
    pub const CIPHER_MODE: usize = 40;
    pub const HASH_SPEC: usize = 72;
    pub const PAYLOAD_OFFSET: usize = 104;
    pub const KEY_BYTES: usize = 108;
    pub const MK_DIGEST: usize = 112;
    pub const MK_DIGEST_SALT: usize = 132;
    pub const MK_DIGEST_ITER: usize = 164;
    pub const UUID: usize = 168;
    pub const SLOTS: usize = 208;
    pub const SLOT_LEN: usize = 48;
}

/// One key slot entry of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySlot {
    /// In use.
    pub active: bool,
    /// PBKDF2 iterations of the passphrase.
    pub iterations: u32,
    /// PBKDF2 salt of the passphrase.
    pub salt: [u8; SALT_LEN],
    /// First sector of the key material within the area.
    pub material_sector: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

/// A decoded LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `payloadOffset` in sectors (ignored: FVD's data region is the payload).
    pub payload_offset: u32,
    /// PBKDF2 digest of the master key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Its salt.
    pub mk_digest_salt: [u8; SALT_LEN],
    /// Its iterations.
    pub mk_digest_iterations: u32,
    /// The volume UUID, as text.
    pub uuid: String,
    /// The eight key slots.
    pub slots: [KeySlot; SLOTS],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn text(b: &[u8], at: usize, len: usize) -> String {
    let f = &b[at..at + len];
    let end = f.iter().position(|&c| c == 0).unwrap_or(len);
    String::from_utf8_lossy(&f[..end]).into_owned()
}

fn put_text(b: &mut [u8], at: usize, s: &str) {
    b[at..at + s.len()].copy_from_slice(s.as_bytes());
}

fn bad(msg: impl std::fmt::Display) -> Error {
    Error::invalid(format!("LUKS header: {msg}"))
}

impl Header {
    /// Decode and check the header at the start of `area` (which must hold
    /// the whole area: slots are checked to lie inside it).
    pub fn decode(area: &[u8]) -> Result<Header> {
        if area.len() < PHDR_LEN {
            return Err(bad("truncated"));
        }
        let b = area;
        if b[off::MAGIC..off::MAGIC + 6] != MAGIC {
            return Err(bad(
                "no LUKS magic (the key-slot region holds no LUKS header)",
            ));
        }
        let version = u16::from_be_bytes([b[off::VERSION], b[off::VERSION + 1]]);
        if version != 1 {
            return Err(bad(format!(
                "version {version} is not supported (only LUKS1)"
            )));
        }
        let want = [
            ("cipher", off::CIPHER_NAME, "aes"),
            ("cipher mode", off::CIPHER_MODE, "xts-plain64"),
            ("hash", off::HASH_SPEC, "sha256"),
        ];
        for (what, at, expect) in want {
            let got = text(b, at, 32);
            if !got.eq_ignore_ascii_case(expect) {
                return Err(bad(format!(
                    "{what} '{got}' is not supported (only aes-xts-plain64 with sha256)"
                )));
            }
        }
        let key_bytes = be32(b, off::KEY_BYTES);
        if key_bytes as usize != KEY_BYTES {
            return Err(bad(format!(
                "key size {} bits is not supported (only 512-bit aes-xts)",
                key_bytes * 8
            )));
        }
        let mk_digest_iterations = be32(b, off::MK_DIGEST_ITER);
        if mk_digest_iterations == 0 {
            return Err(bad("master key digest iterations are 0"));
        }
        let mut slots = [KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            material_sector: 0,
            stripes: 0,
        }; SLOTS];
        for (i, s) in slots.iter_mut().enumerate() {
            let at = off::SLOTS + i * off::SLOT_LEN;
            let active = match be32(b, at) {
                SLOT_ACTIVE => true,
                SLOT_INACTIVE => false,
                other => {
                    return Err(bad(format!("key slot {i}: bad state {other:#010x}")));
                }
            };
            *s = KeySlot {
                active,
                iterations: be32(b, at + 4),
                salt: b[at + 8..at + 40].try_into().expect("32 bytes"),
                material_sector: be32(b, at + 40),
                stripes: be32(b, at + 44),
            };
            if !active {
                continue;
            }
            if s.stripes != STRIPES {
                return Err(bad(format!(
                    "key slot {i}: {} stripes are not supported (only {STRIPES})",
                    s.stripes
                )));
            }
            if s.iterations == 0 {
                return Err(bad(format!("key slot {i}: 0 iterations")));
            }
            let end = (s.material_sector as u64 + MATERIAL_SECTORS as u64) * SECTOR;
            if s.material_sector == 0 || end > area.len() as u64 {
                return Err(bad(format!(
                    "key slot {i}: key material at sector {} lies outside the {}-byte key-slot area",
                    s.material_sector,
                    area.len()
                )));
            }
        }
        Ok(Header {
            payload_offset: be32(b, off::PAYLOAD_OFFSET),
            mk_digest: b[off::MK_DIGEST..off::MK_DIGEST + DIGEST_LEN]
                .try_into()
                .expect("20 bytes"),
            mk_digest_salt: b[off::MK_DIGEST_SALT..off::MK_DIGEST_SALT + SALT_LEN]
                .try_into()
                .expect("32 bytes"),
            mk_digest_iterations,
            uuid: text(b, off::UUID, 40),
            slots,
        })
    }

    /// The 592 header bytes.
    pub fn encode(&self) -> [u8; PHDR_LEN] {
        let mut b = [0u8; PHDR_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[off::VERSION..off::VERSION + 2].copy_from_slice(&1u16.to_be_bytes());
        put_text(&mut b, off::CIPHER_NAME, "aes");
        put_text(&mut b, off::CIPHER_MODE, "xts-plain64");
        put_text(&mut b, off::HASH_SPEC, "sha256");
        let mut put = |at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        put(off::PAYLOAD_OFFSET, self.payload_offset);
        put(off::KEY_BYTES, KEY_BYTES as u32);
        put(off::MK_DIGEST_ITER, self.mk_digest_iterations);
        b[off::MK_DIGEST..off::MK_DIGEST + DIGEST_LEN].copy_from_slice(&self.mk_digest);
        b[off::MK_DIGEST_SALT..off::MK_DIGEST_SALT + SALT_LEN]
            .copy_from_slice(&self.mk_digest_salt);
        put_text(&mut b, off::UUID, &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let at = off::SLOTS + i * off::SLOT_LEN;
            let state = if s.active { SLOT_ACTIVE } else { SLOT_INACTIVE };
            b[at..at + 4].copy_from_slice(&state.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[at + 8..at + 40].copy_from_slice(&s.salt);
            b[at + 40..at + 44].copy_from_slice(&s.material_sector.to_be_bytes());
            b[at + 44..at + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// Indices of the slots in use.
    pub fn active_slots(&self) -> Vec<usize> {
        (0..SLOTS).filter(|&i| self.slots[i].active).collect()
    }
}

/// PBKDF2-HMAC-SHA256 of `pass` into `out`.
fn pbkdf2(pass: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
    pbkdf2::pbkdf2_hmac::<Sha256>(pass, salt, iterations, out);
}

/// The master key digest.
fn mk_digest(mk: &MasterKey, salt: &[u8], iterations: u32) -> [u8; DIGEST_LEN] {
    let mut d = [0u8; DIGEST_LEN];
    pbkdf2(mk.expose(), salt, iterations, &mut d);
    d
}

/// The anti-forensic diffusion: each 32-byte piece `i` of `buf` becomes
/// SHA-256(be32(i) ‖ piece), cut to the piece's length.
fn diffuse(buf: &mut [u8]) {
    for (i, piece) in buf.chunks_mut(32).enumerate() {
        let mut h = Sha256::new();
        h.update((i as u32).to_be_bytes());
        h.update(&*piece);
        let d = h.finalize();
        piece.copy_from_slice(&d[..piece.len()]);
    }
}

fn xor_into(acc: &mut [u8], x: &[u8]) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a ^= b);
}

/// Split `key` into `stripes` stripes (the last one computed, the others
/// random).
fn af_split(key: &[u8], stripes: usize) -> Result<Zeroizing<Vec<u8>>> {
    let bs = key.len();
    let mut out = Zeroizing::new(vec![0u8; bs * stripes]);
    random_bytes(&mut out[..bs * (stripes - 1)])?;
    let mut d = Zeroizing::new(vec![0u8; bs]);
    for s in out[..bs * (stripes - 1)].chunks(bs) {
        xor_into(&mut d, s);
        diffuse(&mut d);
    }
    xor_into(&mut d, key);
    out[bs * (stripes - 1)..].copy_from_slice(&d);
    Ok(out)
}

/// Merge `stripes` stripes of `bs` bytes back into the key.
fn af_merge(material: &[u8], bs: usize, stripes: usize) -> Zeroizing<Vec<u8>> {
    let mut d = Zeroizing::new(vec![0u8; bs]);
    for s in material[..bs * (stripes - 1)].chunks(bs) {
        xor_into(&mut d, s);
        diffuse(&mut d);
    }
    xor_into(&mut d, &material[bs * (stripes - 1)..bs * stripes]);
    d
}

/// The cipher of a slot's key material for passphrase `pass`.
fn slot_cipher(slot: &KeySlot, pass: &[u8]) -> DataCipher {
    let mut k = Zeroizing::new([0u8; KEY_BYTES]);
    pbkdf2(pass, &slot.salt, slot.iterations, &mut k[..]);
    DataCipher::new(&MasterKey::from_bytes(&k[..]).expect("64 bytes"))
}

fn material_range(slot: &KeySlot) -> std::ops::Range<usize> {
    let start = (slot.material_sector as u64 * SECTOR) as usize;
    start..start + (MATERIAL_SECTORS as u64 * SECTOR) as usize
}

/// Try slot `i` with `pass`: the master key if it opens.
fn try_slot(area: &[u8], h: &Header, i: usize, pass: &[u8]) -> Option<MasterKey> {
    let s = &h.slots[i];
    let mut material = Zeroizing::new(area[material_range(s)].to_vec());
    slot_cipher(s, pass).decrypt_exact(&mut material, 0);
    let key = af_merge(&material, KEY_BYTES, s.stripes as usize);
    let mk = MasterKey::from_bytes(&key).expect("64 bytes");
    (mk_digest(&mk, &h.mk_digest_salt, h.mk_digest_iterations) == h.mk_digest).then_some(mk)
}

/// Open the area with `pass`: the master key and the slot that opened.
/// `what` names the image in the error of a wrong passphrase.
pub fn unlock(area: &[u8], pass: &[u8], what: &str) -> Result<(MasterKey, usize)> {
    let h = Header::decode(area)?;
    for i in h.active_slots() {
        if let Some(mk) = try_slot(area, &h, i, pass) {
            return Ok((mk, i));
        }
    }
    Err(wrong_key(what))
}

/// Check that `mk` is the area's master key.
pub fn verify_master_key(area: &[u8], mk: &MasterKey) -> Result<bool> {
    let h = Header::decode(area)?;
    Ok(mk_digest(mk, &h.mk_digest_salt, h.mk_digest_iterations) == h.mk_digest)
}

/// A random version-4 UUID as text.
fn random_uuid() -> Result<String> {
    let mut u = [0u8; 16];
    random_bytes(&mut u)?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        h[..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..].concat()
    ))
}

/// A new area: master key `mk` in slot 0 under `pass` with `iterations`.
pub fn format(mk: &MasterKey, pass: &[u8], iterations: u32) -> Result<Vec<u8>> {
    let iterations = iterations.max(MIN_ITERATIONS);
    let mut salt = [0u8; SALT_LEN];
    random_bytes(&mut salt)?;
    let digest_iterations = (iterations / 8).max(MIN_ITERATIONS);
    let mut h = Header {
        payload_offset: PAYLOAD_SECTORS,
        mk_digest: mk_digest(mk, &salt, digest_iterations),
        mk_digest_salt: salt,
        mk_digest_iterations: digest_iterations,
        uuid: random_uuid()?,
        slots: std::array::from_fn(|i| KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            material_sector: material_sector(i),
            stripes: STRIPES,
        }),
    };
    let mut area = vec![0u8; AREA_BYTES as usize];
    area[..PHDR_LEN].copy_from_slice(&h.encode());
    fill_slot(&mut area, &mut h, 0, mk, pass, iterations)?;
    area[..PHDR_LEN].copy_from_slice(&h.encode());
    Ok(area)
}

/// Write slot `i`'s salt, iterations and key material (and mark it active
/// in `h`; the caller writes the header).
fn fill_slot(
    area: &mut [u8],
    h: &mut Header,
    i: usize,
    mk: &MasterKey,
    pass: &[u8],
    iterations: u32,
) -> Result<()> {
    let s = &mut h.slots[i];
    random_bytes(&mut s.salt)?;
    s.iterations = iterations.max(MIN_ITERATIONS);
    s.stripes = STRIPES;
    s.active = true;
    let mut material = af_split(mk.expose(), STRIPES as usize)?;
    slot_cipher(s, pass).encrypt(&mut material, 0);
    let r = material_range(s);
    if r.end > area.len() {
        return Err(bad(format!(
            "key slot {i}: key material lies outside the area"
        )));
    }
    area[r].copy_from_slice(&material);
    Ok(())
}

/// Add `pass` in a free slot (the lowest, or `slot`); returns the slot.
pub fn add_key(
    area: &mut [u8],
    mk: &MasterKey,
    pass: &[u8],
    iterations: u32,
    slot: Option<usize>,
) -> Result<usize> {
    let mut h = Header::decode(area)?;
    let i = match slot {
        Some(i) if i >= SLOTS => {
            return Err(Error::arg(format!("key slot {i} does not exist (0..7)")));
        }
        Some(i) if h.slots[i].active => {
            return Err(Error::arg(format!("key slot {i} is in use")));
        }
        Some(i) => i,
        None => (0..SLOTS)
            .find(|&i| !h.slots[i].active)
            .ok_or_else(|| Error::arg("all 8 key slots are in use"))?,
    };
    h.slots[i].material_sector = material_sector(i);
    fill_slot(area, &mut h, i, mk, pass, iterations)?;
    area[..PHDR_LEN].copy_from_slice(&h.encode());
    Ok(i)
}

/// Disable slot `i` and overwrite its key material with random bytes. The
/// last active slot cannot be removed (the data would be lost with it).
pub fn remove_key(area: &mut [u8], i: usize) -> Result<()> {
    let mut h = Header::decode(area)?;
    if i >= SLOTS || !h.slots[i].active {
        return Err(Error::arg(format!("key slot {i} is not in use")));
    }
    if h.active_slots().len() == 1 {
        return Err(Error::arg(format!(
            "key slot {i} is the last one in use; removing it would make the data unreadable"
        )));
    }
    let r = material_range(&h.slots[i]);
    random_bytes(&mut area[r])?;
    h.slots[i].active = false;
    h.slots[i].iterations = 0;
    h.slots[i].salt = [0; SALT_LEN];
    area[..PHDR_LEN].copy_from_slice(&h.encode());
    Ok(())
}

/// The slot `pass` opens, without returning the key.
pub fn find_slot(area: &[u8], pass: &[u8], what: &str) -> Result<usize> {
    unlock(area, pass, what).map(|(_, i)| i)
}

/// PBKDF2-HMAC-SHA256 iterations that take about `ms` milliseconds here
/// (at least [`MIN_ITERATIONS`]), as cryptsetup and QEMU's `iter-time`.
pub fn iterations_for(ms: u64) -> u32 {
    let probe = 20_000u32;
    let t = std::time::Instant::now();
    let mut out = [0u8; KEY_BYTES];
    pbkdf2(b"fvd iteration probe", &[0u8; SALT_LEN], probe, &mut out);
    // A 64-byte output costs two PBKDF2 blocks.
    let per_ms = probe as f64 * 2.0 / (t.elapsed().as_secs_f64() * 1000.0).max(1e-3);
    ((per_ms * ms as f64) as u64).clamp(MIN_ITERATIONS as u64, u32::MAX as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_unlock_add_remove() {
        let mk = MasterKey::generate().unwrap();
        let mut area = format(&mk, b"first", 1000).unwrap();
        let h = Header::decode(&area).unwrap();
        assert_eq!(h.active_slots(), vec![0]);
        assert_eq!(h.payload_offset, 4040);
        assert_eq!(h.slots[7].material_sector, 3536);
        let (got, slot) = unlock(&area, b"first", "img").unwrap();
        assert_eq!((got.expose(), slot), (mk.expose(), 0));
        let e = unlock(&area, b"wrong", "img").unwrap_err();
        assert!(e.to_string().contains("invalid key"), "{e}");
        assert!(!e.to_string().contains("wrong"));
        assert_eq!(add_key(&mut area, &mk, b"second", 1000, None).unwrap(), 1);
        assert_eq!(unlock(&area, b"second", "img").unwrap().1, 1);
        remove_key(&mut area, 0).unwrap();
        assert!(unlock(&area, b"first", "img").is_err());
        assert_eq!(
            unlock(&area, b"second", "img").unwrap().0.expose(),
            mk.expose()
        );
        assert!(remove_key(&mut area, 1).is_err(), "the last slot stays");
    }

    #[test]
    fn af_split_merge_round_trip() {
        let key: Vec<u8> = (0..64).collect();
        let m = af_split(&key, 10).unwrap();
        assert_eq!(&af_merge(&m, 64, 10)[..], &key[..]);
    }

    #[test]
    fn refuses_other_profiles() {
        let mk = MasterKey::generate().unwrap();
        let area = format(&mk, b"p", 1000).unwrap();
        let mut a = area.clone();
        a[off::HASH_SPEC..off::HASH_SPEC + 6].copy_from_slice(b"sha1\0\0");
        let e = Header::decode(&a).unwrap_err();
        assert!(e.to_string().contains("hash 'sha1'"), "{e}");
        let mut a = area.clone();
        let at = off::SLOTS + 44;
        a[at..at + 4].copy_from_slice(&10u32.to_be_bytes());
        assert!(
            Header::decode(&a)
                .unwrap_err()
                .to_string()
                .contains("stripes")
        );
        let mut a = area;
        a[6] = 0;
        a[7] = 2;
        assert!(
            Header::decode(&a)
                .unwrap_err()
                .to_string()
                .contains("version 2")
        );
    }
}
