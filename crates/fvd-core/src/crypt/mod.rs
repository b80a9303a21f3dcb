//! Encryption of data sectors and the LUKS1 key slots that guard the key.
//!
//! Pure transforms, no I/O (the image engine reads and writes the bytes):
//! * [`DataCipher`] — AES-256-XTS with the `plain64` sector tweak over
//!   512-byte sectors: the one function every encrypted data byte goes
//!   through ([`DataCipher::encrypt`] / [`DataCipher::decrypt`], a buffer and
//!   its first sector number);
//! * [`luks`] — the standard LUKS1 header that holds the master key in eight
//!   PBKDF2-protected key slots (the format cryptsetup and QEMU read);
//! * [`Secret`] — a passphrase or key file's bytes, wiped on drop.
//!
//! Holes: an encrypted image still leaves never-written space as holes (and
//! discard still punches them), so the decryption side keeps one rule: a
//! 16-byte ciphertext block that is all zeros reads as 16 zero bytes. A real
//! ciphertext block is all zeros with probability 2^-128. The rule works per
//! XTS block, not per sector, so a sector torn by a crash (old and new XTS
//! blocks side by side, each decrypting on its own) reads as old and new
//! bytes even where the old sector was a hole.
//!
//! Crates: RustCrypto's `aes` (AES-NI picked at run time), `xts-mode`,
//! `pbkdf2`/`hmac`/`sha2`; no cipher code is written here. Data sectors go
//! through the `aes` crate's many-block calls (AES-NI pipelines 8 blocks at
//! once: about 10x its one-block call, which `xts-mode` makes per block);
//! the XTS chaining around them (tweak times alpha, XOR) is checked byte
//! for byte against `xts-mode`, which also does the key-slot material, and
//! against the IEEE 1619 vectors.

use aes::Aes256;
use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use xts_mode::{Xts128, get_tweak_default};
use zeroize::Zeroizing;

use crate::error::{Error, ErrorKind, Result};

pub mod luks;

/// Bytes per encrypted sector (the tweak counts these).
pub const SECTOR: u64 = 512;

/// Bytes of an AES-256-XTS key (two AES-256 keys).
pub const KEY_BYTES: usize = 64;

/// Secret bytes (a passphrase, a key file's content): never printed, wiped
/// from memory when dropped.
#[derive(Clone)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// Take ownership of `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(Zeroizing::new(bytes))
    }

    /// The bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A master (volume) key: the XTS key of the data. Wiped on drop.
#[derive(Clone)]
pub struct MasterKey(Zeroizing<[u8; KEY_BYTES]>);

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self> {
        let mut k = Zeroizing::new([0u8; KEY_BYTES]);
        random_bytes(&mut k[..])?;
        Ok(MasterKey(k))
    }

    /// A key from its bytes (which the caller wipes).
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let mut k = Zeroizing::new([0u8; KEY_BYTES]);
        if b.len() != KEY_BYTES {
            return Err(Error::invalid(format!(
                "a master key has {KEY_BYTES} bytes, not {}",
                b.len()
            )));
        }
        k.copy_from_slice(b);
        Ok(MasterKey(k))
    }

    /// The key's bytes.
    pub fn expose(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// AES-256-XTS-plain64 over 512-byte sectors (the `aes` round keys are
/// wiped on drop).
pub struct DataCipher {
    /// The reference XTS (key slots, tests).
    xts: Xts128<Aes256>,
    /// The data key and the tweak key, for the many-block path.
    data: Aes256,
    tweak: Aes256,
}

/// 16-byte blocks per sector.
const BLOCKS: usize = SECTOR as usize / 16;

/// The tweak of the next block: multiplication by alpha in GF(2^128),
/// little-endian (IEEE 1619 §5.2).
#[inline]
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

impl DataCipher {
    /// The cipher for `key` (first half: data key, second half: tweak key).
    pub fn new(key: &MasterKey) -> Self {
        let k = key.expose();
        let c1 = Aes256::new_from_slice(&k[..32]).expect("32-byte AES key");
        let c2 = Aes256::new_from_slice(&k[32..]).expect("32-byte AES key");
        DataCipher {
            xts: Xts128::new(c1.clone(), c2.clone()),
            data: c1,
            tweak: c2,
        }
    }

    /// Encrypt whole sectors in place; `buf[0..512]` is sector `sector`.
    pub fn encrypt(&self, buf: &mut [u8], sector: u64) {
        debug_assert_eq!(buf.len() as u64 % SECTOR, 0);
        self.transform(buf, sector, |b| self.data.encrypt_blocks(b));
    }

    /// XTS over whole sectors: XOR every block with its tweak, run `f` (the
    /// block cipher) over many sectors' blocks at once — the AES-NI/VAES
    /// backends pipeline up to 64 blocks, which a 32-block sector at a time
    /// would not fill — and XOR again.
    #[inline]
    fn transform(
        &self,
        buf: &mut [u8],
        sector: u64,
        f: impl Fn(&mut [Array<u8, aes::cipher::consts::U16>]),
    ) {
        const GROUP: usize = 16;
        let mut tweaks = [0u128; GROUP * BLOCKS];
        let mut starts = [Array([0u8; 16]); GROUP];
        for (g, piece) in buf.chunks_mut(GROUP * SECTOR as usize).enumerate() {
            let first = sector + (g * GROUP) as u64;
            let n = piece.len() / SECTOR as usize;
            // Each sector's first tweak is E_K2(sector number): one
            // many-block call for the group (a one-block call costs as much
            // as several blocks of data).
            for (k, t) in starts[..n].iter_mut().enumerate() {
                *t = Array(((first + k as u64) as u128).to_le_bytes());
            }
            self.tweak.encrypt_blocks(&mut starts[..n]);
            for (k, t) in starts[..n].iter().enumerate() {
                let mut v = u128::from_le_bytes(t.0);
                for slot in &mut tweaks[k * BLOCKS..(k + 1) * BLOCKS] {
                    *slot = v;
                    v = mul_alpha(v);
                }
            }
            let (blocks, _) = Array::slice_as_chunks_mut(piece);
            xor_tweaks(blocks, &tweaks);
            f(blocks);
            xor_tweaks(blocks, &tweaks);
        }
    }

    /// Decrypt whole sectors in place; `buf[0..512]` is sector `sector`.
    /// All-zero ciphertext blocks read as zeros (module docs).
    pub fn decrypt(&self, buf: &mut [u8], sector: u64) {
        debug_assert_eq!(buf.len() as u64 % SECTOR, 0);
        // Runs of sectors with no zero block decrypt together; a sector
        // with zero blocks is decrypted alone and its holes put back.
        let sectors = buf.len() / SECTOR as usize;
        let mut i = 0;
        while i < sectors {
            let holes = zero_blocks(&buf[i * SECTOR as usize..(i + 1) * SECTOR as usize]);
            if holes != 0 {
                let s = &mut buf[i * SECTOR as usize..(i + 1) * SECTOR as usize];
                if holes != u32::MAX {
                    self.transform(s, sector + i as u64, |b| self.data.decrypt_blocks(b));
                    for (j, b) in s.chunks_exact_mut(16).enumerate() {
                        if holes & (1 << j) != 0 {
                            b.fill(0);
                        }
                    }
                }
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < sectors
                && zero_blocks(&buf[j * SECTOR as usize..(j + 1) * SECTOR as usize]) == 0
            {
                j += 1;
            }
            let run = &mut buf[i * SECTOR as usize..j * SECTOR as usize];
            self.transform(run, sector + i as u64, |b| self.data.decrypt_blocks(b));
            i = j;
        }
    }

    /// Decrypt without the hole rule (key material of LUKS slots).
    pub(crate) fn decrypt_exact(&self, buf: &mut [u8], sector: u64) {
        self.xts
            .decrypt_area(buf, SECTOR as usize, sector as u128, get_tweak_default);
    }
}

/// XOR each 16-byte block with its tweak.
#[inline]
fn xor_tweaks(blocks: &mut [Array<u8, aes::cipher::consts::U16>], t: &[u128]) {
    for (b, t) in blocks.iter_mut().zip(t) {
        let v = u128::from_le_bytes(b.0) ^ t;
        b.0 = v.to_le_bytes();
    }
}

/// Bit `j` set: 16-byte block `j` of the 512-byte sector `s` is all zeros.
#[inline]
fn zero_blocks(s: &[u8]) -> u32 {
    let mut mask = 0u32;
    for (j, b) in s.chunks_exact(16).enumerate() {
        let v = u128::from_ne_bytes(b.try_into().expect("16 bytes"));
        mask |= ((v == 0) as u32) << j;
    }
    mask
}

/// Fill `out` from the kernel's random source (getrandom(2)).
pub fn random_bytes(out: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < out.len() {
        let rest = &mut out[done..];
        // SAFETY: the pointer and length describe writable memory we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io("random number source", e));
        }
        done += n as usize;
    }
    Ok(())
}

/// The error of a passphrase that opens no key slot.
pub fn wrong_key(what: &str) -> Error {
    Error::new(
        ErrorKind::KeyRequired,
        format!("{what}: invalid key: no key slot opens with the passphrase given"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// IEEE 1619-2007 Annex B, vectors 10 and 11 (XTS-AES-256, 512-byte
    /// data units, data unit sequence numbers 0xff and 0xffff): the
    /// plaintext is bytes 0..255 twice.
    #[test]
    fn ieee_1619_xts_aes_256_vectors() {
        let key = hex(
            "2718281828459045235360287471352662497757247093699959574966967627
             3141592653589793238462643383279502884197169399375105820974944592",
        );
        let pt: Vec<u8> = (0..512).map(|i| (i % 256) as u8).collect();
        let c = DataCipher::new(&MasterKey::from_bytes(&key).unwrap());
        // Vector 10: sequence number 0xff. First and last 32 bytes of the
        // published ciphertext.
        let mut buf = pt.clone();
        c.encrypt(&mut buf, 0xff);
        assert_eq!(
            buf[..32],
            hex("1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b")[..]
        );
        assert_eq!(
            buf[480..],
            hex("773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151")[..]
        );
        c.decrypt(&mut buf, 0xff);
        assert_eq!(buf, pt);
        // Vector 11: sequence number 0xffff.
        let mut buf = pt.clone();
        c.encrypt(&mut buf, 0xffff);
        assert_eq!(
            buf[..32],
            hex("77a31251618a15e6b92d1d66dffe7b50b50bad552305ba0217a610688eff7e11")[..]
        );
        assert_eq!(
            buf[480..],
            hex("54fbff89eeaeea791f4a7ab1f9868294a4f9e27b42af8100cb9d59cef9645803")[..]
        );
        c.decrypt(&mut buf, 0xffff);
        assert_eq!(buf, pt);
    }

    /// The many-block path equals xts-mode's reference byte for byte.
    #[test]
    fn fast_path_matches_xts_mode() {
        let mut key = [0u8; 64];
        random_bytes(&mut key).unwrap();
        let c = DataCipher::new(&MasterKey::from_bytes(&key).unwrap());
        let mut data = vec![0u8; 8 * 512];
        random_bytes(&mut data).unwrap();
        for sector in [0u64, 1, 0xff, 1 << 40, u64::MAX - 8] {
            let mut fast = data.clone();
            c.encrypt(&mut fast, sector);
            let mut reference = data.clone();
            c.xts
                .encrypt_area(&mut reference, 512, sector as u128, get_tweak_default);
            assert!(fast == reference, "sector {sector}");
            c.decrypt(&mut fast, sector);
            assert!(fast == data, "sector {sector}");
        }
    }

    /// Many-block path against xts-mode on random keys, data and sector
    /// numbers, for every length around the 16-sector groups (one sector,
    /// a partial group, group edges, several groups); decryption splits
    /// its runs at sectors with zero ciphertext blocks and must still give
    /// back every other byte.
    #[test]
    fn fast_path_matches_xts_mode_on_random_input() {
        let mut seed = [0u8; 8];
        random_bytes(&mut seed).unwrap();
        let mut x = u64::from_le_bytes(seed) | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..40 {
            let mut key = [0u8; 64];
            random_bytes(&mut key).unwrap();
            let c = DataCipher::new(&MasterKey::from_bytes(&key).unwrap());
            let sectors = [1usize, 2, 7, 15, 16, 17, 31, 32, 33, 47][round % 10];
            let sector = match round % 4 {
                0 => next() % 1024,
                1 => next() >> 9,
                2 => u64::MAX - 64 - next() % 64,
                _ => next() % (1 << 40),
            };
            let mut data = vec![0u8; sectors * 512];
            random_bytes(&mut data).unwrap();
            let mut fast = data.clone();
            c.encrypt(&mut fast, sector);
            let mut reference = data.clone();
            c.xts
                .encrypt_area(&mut reference, 512, sector as u128, get_tweak_default);
            assert!(fast == reference, "{sectors} sectors at {sector}");
            // A hole block in a random sector: it reads as zeros, the rest
            // decrypts.
            let hole = (next() as usize % sectors) * 512 + (next() as usize % 32) * 16;
            fast[hole..hole + 16].fill(0);
            c.decrypt(&mut fast, sector);
            assert!(fast[hole..hole + 16].iter().all(|&b| b == 0));
            fast[hole..hole + 16].copy_from_slice(&data[hole..hole + 16]);
            assert!(fast == data, "{sectors} sectors at {sector}: decrypt");
        }
    }

    #[test]
    fn zero_ciphertext_blocks_read_as_zeros() {
        let c = DataCipher::new(&MasterKey::from_bytes(&[7u8; 64]).unwrap());
        let mut hole = vec![0u8; 1024];
        c.decrypt(&mut hole, 3);
        assert!(hole.iter().all(|&b| b == 0));
        // A sector torn between a hole and new data: the written blocks
        // decrypt, the rest reads as zeros.
        let new = vec![0x5au8; 512];
        let mut ct = new.clone();
        c.encrypt(&mut ct, 9);
        ct[256..].fill(0);
        c.decrypt(&mut ct, 9);
        assert_eq!(ct[..256], new[..256]);
        assert!(ct[256..].iter().all(|&b| b == 0));
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new(b"hunter2".to_vec());
        assert!(!format!("{s:?}").contains("hunter2"));
        let k = MasterKey::from_bytes(&[0x41; 64]).unwrap();
        assert!(!format!("{k:?}").contains("AAAA"));
    }
}
