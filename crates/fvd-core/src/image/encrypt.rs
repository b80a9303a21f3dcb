//! Encrypted images (feature `ENCRYPTED`) in the access layer.
//!
//! Every data byte of the image passes `read_host` / `write_host` /
//! `zero_host` with its host offset; for an encrypted image those call
//! into this module, and the mapping layer does not change. The transform
//! itself is one pair of functions over a buffer and its host offset,
//! [`Encryption::encrypt`] / [`Encryption::decrypt`]: sector `s` of the
//! data region (host offset `data_offset + 512 s`) is AES-256-XTS with
//! tweak `s` — physical offsets, as qcow2 does, so the same bytes never sit
//! at two places under one tweak, and in the sparse layout the tweak equals
//! the guest sector. Metadata (header, bitmap, table, journal, key slots)
//! stays in clear.
//!
//! * **Zeros**: holes, punched ranges and storage-zeroed ranges read as
//!   zeros (a zero ciphertext block decrypts to zeros, `crypt` module
//!   docs), so discard, write_zeroes, new compact chunks and zero detection
//!   of the base keep their unencrypted mechanics: whole sectors are
//!   punched or zeroed in the storage, never encrypted zeros.
//! * **Partial sectors**: a write or zeroing that starts or ends inside a
//!   sector decrypts the sector, patches it and encrypts it again, holding
//!   the lock of its sector span (`sectors`) from the read to the end of the
//!   write, so two such writes to different bytes of one sector both
//!   survive. Whole-sector writes take no lock (they overlap nothing a
//!   partial write owns unless the guest itself overlaps them). Lock order:
//!   an image range lock (slow paths) before a sector lock; nothing is
//!   taken while a sector lock is held.
//! * **Where the work runs**: whole sectors are encrypted and decrypted on
//!   the storage's I/O thread that writes or reads them
//!   ([`Storage::write_at_after`] / [`Storage::read_at_then`]), not on the
//!   thread of the request's task: `fvd serve` runs every request's task on
//!   one event loop, and the cipher there (about 1 µs per 4 KiB) made that
//!   loop the bottleneck of encrypted 4 KiB writes at queue depth 32
//!   (0.85x the unencrypted image). Storages without I/O threads (memory,
//!   the simulator) and AIO (O_DIRECT) writes run it in the request's task,
//!   as do the rare partial-sector read-modify-writes. The `aes` crate uses
//!   AES-NI (VAES where present).
//!
//! [`Storage::write_at_after`]: crate::storage::Storage::write_at_after
//! [`Storage::read_at_then`]: crate::storage::Storage::read_at_then
//! * **Without the key** an encrypted image opens for metadata work (info,
//!   map, check): every data read or write then fails with
//!   [`ErrorKind::KeyRequired`].

use std::sync::Arc;

use tokio::sync::Mutex;

use super::Image;
use super::rangelock::RangeLocks;
use crate::crypt::{DataCipher, MasterKey, SECTOR, Secret, luks};
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::Extent;
use crate::iobuf::IoBuf;
use crate::storage::Transform;

/// The encryption state of an open encrypted image.
pub(crate) struct Encryption {
    /// The data cipher; `None` when opened without the key. Shared with
    /// the transforms that run on the storage's I/O threads.
    cipher: Option<Arc<DataCipher>>,
    /// The master key (kept for adding key slots).
    master: Option<MasterKey>,
    /// Host offset of sector 0.
    data_offset: u64,
    /// Where the LUKS area lives.
    region: Extent,
    /// The LUKS header as read at open (or last written).
    header: std::sync::Mutex<luks::Header>,
    /// Partial-sector read-modify-writes, by host byte range.
    sectors: RangeLocks,
    /// Serialises key-slot updates.
    slots: Mutex<()>,
}

impl Encryption {
    /// Read and open the key slots of an encrypted image at `region`; with
    /// `key`, unlock them (a wrong key is an error; nothing is written).
    pub async fn open(
        storage: &dyn crate::storage::Storage,
        region: Extent,
        data_offset: u64,
        key: Option<&Secret>,
        what: &str,
    ) -> Result<Self> {
        let area = read_area(storage, region, what).await?;
        let header = luks::Header::decode(&area).map_err(|e| e.context(what))?;
        let master = match key {
            Some(k) => Some(luks::unlock(&area, k.expose(), what)?.0),
            None => None,
        };
        Ok(Encryption {
            cipher: master.as_ref().map(|k| Arc::new(DataCipher::new(k))),
            master,
            data_offset,
            region,
            header: std::sync::Mutex::new(header),
            sectors: RangeLocks::default(),
            slots: Mutex::new(()),
        })
    }

    fn cipher(&self, what: &str) -> Result<&Arc<DataCipher>> {
        self.cipher_or(|| what.to_string())
    }

    /// The cipher, or the error naming `what` (built only then).
    fn cipher_or(&self, what: impl FnOnce() -> String) -> Result<&Arc<DataCipher>> {
        self.cipher.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::KeyRequired,
                format!(
                    "{}: the image is encrypted and was opened without its key (give it with --object secret,id=ID,file=PATH and encrypt.key-secret=ID)",
                    what()
                ),
            )
        })
    }

    /// The transform that encrypts (`encrypt`) or decrypts whole sectors
    /// starting at host offset `host`, for the storage to run next to the
    /// I/O.
    fn transform(
        &self,
        host: u64,
        encrypt: bool,
        what: impl FnOnce() -> String,
    ) -> Result<Transform> {
        let c = self.cipher_or(what)?.clone();
        let sector = self.sector(host);
        // Whole sectors only: a storage that gave back a short buffer gets
        // its short-transfer error after the transform, not a panic in it.
        fn whole(b: &mut [u8]) -> &mut [u8] {
            let n = b.len() / SECTOR as usize * SECTOR as usize;
            &mut b[..n]
        }
        Ok(if encrypt {
            Box::new(move |b: &mut [u8]| c.encrypt(whole(b), sector))
        } else {
            Box::new(move |b: &mut [u8]| c.decrypt(whole(b), sector))
        })
    }

    fn sector(&self, host: u64) -> u64 {
        debug_assert!(host >= self.data_offset && host.is_multiple_of(SECTOR));
        (host - self.data_offset) / SECTOR
    }

    /// Encrypt whole sectors starting at host offset `host`, in place.
    pub fn encrypt(&self, buf: &mut [u8], host: u64, what: &str) -> Result<()> {
        self.cipher(what)?.encrypt(buf, self.sector(host));
        Ok(())
    }

    /// Decrypt whole sectors starting at host offset `host`, in place.
    pub fn decrypt(&self, buf: &mut [u8], host: u64, what: &str) -> Result<()> {
        self.cipher(what)?.decrypt(buf, self.sector(host));
        Ok(())
    }

    /// The LUKS header.
    pub fn header(&self) -> luks::Header {
        self.header
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The sector span `[s, e)` around `[host, host+len)`.
fn span(host: u64, len: u64) -> (u64, u64) {
    (
        host / SECTOR * SECTOR,
        (host + len).div_ceil(SECTOR) * SECTOR,
    )
}

async fn read_area(
    storage: &dyn crate::storage::Storage,
    region: Extent,
    what: &str,
) -> Result<Vec<u8>> {
    let n = luks::AREA_BYTES as usize;
    if region.length < n as u64 {
        return Err(Error::corrupt(format!(
            "{what}: key-slot region is {} bytes, an encrypted image needs {n}",
            region.length
        )));
    }
    let buf = storage
        .read_at(region.offset, IoBuf::zeroed(n))
        .await
        .map_err(|e| Error::io(format!("{what}: read key slots"), e))?;
    if buf.len() != n {
        return Err(Error::new(
            ErrorKind::Io,
            format!("{what}: short read of the key slots"),
        ));
    }
    Ok(buf.to_vec())
}

/// What a key-slot command changes.
#[derive(Debug, Clone)]
pub enum KeySlotChange {
    /// Add a passphrase in a free slot (the lowest, or the one given).
    Add {
        /// The new passphrase.
        secret: Secret,
        /// Its PBKDF2 iterations.
        iterations: u32,
        /// The slot to use.
        slot: Option<usize>,
    },
    /// Remove the slot this passphrase opens.
    RemovePassphrase(Secret),
    /// Remove a slot by number.
    RemoveSlot(usize),
    /// Replace the slot `old` opens by a new passphrase (added first, so a
    /// crash leaves one of the two working).
    Change {
        /// The passphrase to replace.
        old: Secret,
        /// The new one.
        new: Secret,
        /// Its PBKDF2 iterations.
        iterations: u32,
    },
}

impl Image {
    /// True for images with the `ENCRYPTED` feature.
    pub fn is_encrypted(&self) -> bool {
        self.crypt.is_some()
    }

    /// True if the image can read and write data: not encrypted, or opened
    /// with its key.
    pub fn has_key(&self) -> bool {
        self.crypt.as_ref().is_none_or(|c| c.cipher.is_some())
    }

    /// The LUKS header of an encrypted image.
    pub fn luks_header(&self) -> Option<luks::Header> {
        self.crypt.as_ref().map(Encryption::header)
    }

    /// Read encrypted image bytes at host offset `host` into `buf`: whole
    /// sectors are read into it and decrypted in place; a request with
    /// partial sectors reads its sectors into a buffer of their own.
    pub(super) async fn read_encrypted(
        &self,
        c: &Encryption,
        host: u64,
        virt: u64,
        mut buf: IoBuf,
    ) -> Result<IoBuf> {
        let (s, e) = span(host, buf.len() as u64);
        if s == host && e == host + buf.len() as u64 {
            let decrypt = c.transform(host, false, || self.describe())?;
            return self.read_storage_then(host, virt, buf, Some(decrypt)).await;
        }
        let what = self.describe();
        let mut sectors = self
            .read_storage(s, virt, IoBuf::for_overwrite((e - s) as usize))
            .await?;
        c.decrypt(&mut sectors, s, &what)?;
        let skip = (host - s) as usize;
        let n = buf.len();
        buf.copy_from_slice(&sectors[skip..skip + n]);
        Ok(buf)
    }

    /// Write `buf` (plaintext) at host offset `host` of an encrypted image:
    /// whole sectors are encrypted in place and written (the buffer given
    /// back holds ciphertext); partial ones are decrypted, patched and
    /// encrypted again under their sector lock (the buffer is unchanged).
    pub(super) async fn write_encrypted(
        &self,
        c: &Encryption,
        host: u64,
        virt: u64,
        buf: IoBuf,
    ) -> Result<IoBuf> {
        let len = buf.len() as u64;
        let (s, e) = span(host, len);
        if s == host && e == host + len {
            let encrypt = c.transform(host, true, || self.describe())?;
            return self
                .write_storage_after(host, virt, buf, Some(encrypt))
                .await;
        }
        let what = self.describe();
        let _g = c.sectors.lock(s, e).await;
        let mut whole = IoBuf::zeroed((e - s) as usize);
        let head_partial = host > s;
        let tail_partial = host + len < e;
        if head_partial {
            let mut sec = self
                .read_storage(s, virt, IoBuf::for_overwrite(SECTOR as usize))
                .await?;
            c.decrypt(&mut sec, s, &what)?;
            whole[..SECTOR as usize].copy_from_slice(&sec);
        }
        let last = e - SECTOR;
        if tail_partial && !(head_partial && last == s) {
            let mut sec = self
                .read_storage(last, virt, IoBuf::for_overwrite(SECTOR as usize))
                .await?;
            c.decrypt(&mut sec, last, &what)?;
            whole[(last - s) as usize..].copy_from_slice(&sec);
        }
        let at = (host - s) as usize;
        whole[at..at + buf.len()].copy_from_slice(&buf);
        c.encrypt(&mut whole, s, &what)?;
        self.write_storage(s, virt, whole).await?;
        Ok(buf)
    }

    /// Zero `[host, host+len)` of an encrypted image: whole sectors through
    /// the storage (punched with `unmap`), partial ones by a patched write.
    pub(super) async fn zero_encrypted(
        &self,
        c: &Encryption,
        host: u64,
        virt: u64,
        len: u64,
        unmap: bool,
    ) -> Result<()> {
        c.cipher(&self.describe())?;
        let end = host + len;
        let (a, b) = (host.div_ceil(SECTOR) * SECTOR, end / SECTOR * SECTOR);
        if a >= b {
            // Within one sector, or straddling one boundary.
            return self
                .write_encrypted(c, host, virt, IoBuf::zeroed(len as usize))
                .await
                .map(drop);
        }
        if host < a {
            self.write_encrypted(c, host, virt, IoBuf::zeroed((a - host) as usize))
                .await?;
        }
        self.zero_storage(a, virt + (a - host), b - a, unmap)
            .await?;
        if b < end {
            self.write_encrypted(c, b, virt + (b - host), IoBuf::zeroed((end - b) as usize))
                .await?;
        }
        Ok(())
    }

    /// Change the key slots of an encrypted image opened read-write with
    /// its key; returns the slot added or removed. The key material is
    /// written and made durable before the header that activates it
    /// (removal: the header first, then the material is overwritten).
    pub async fn change_key_slots(&self, change: KeySlotChange) -> Result<usize> {
        self.check_writable()?;
        let what = self.describe();
        let Some(c) = &self.crypt else {
            return Err(Error::arg(format!("{what}: the image is not encrypted")));
        };
        let mk = c.master.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::KeyRequired,
                format!("{what}: the image was opened without its key"),
            )
        })?;
        let _g = c.slots.lock().await;
        let old = read_area(self.storage.as_ref(), c.region, &what).await?;
        let mut area = old.clone();
        let slot = match &change {
            KeySlotChange::Add {
                secret,
                iterations,
                slot,
            } => luks::add_key(&mut area, mk, secret.expose(), *iterations, *slot)?,
            KeySlotChange::RemovePassphrase(p) => {
                let i = luks::find_slot(&area, p.expose(), &what)?;
                luks::remove_key(&mut area, i)?;
                i
            }
            KeySlotChange::RemoveSlot(i) => {
                luks::remove_key(&mut area, *i)?;
                *i
            }
            KeySlotChange::Change {
                old: o,
                new,
                iterations,
            } => {
                let i = luks::find_slot(&area, o.expose(), &what)?;
                let added = luks::add_key(&mut area, mk, new.expose(), *iterations, None)?;
                self.write_area(c, &area, &old, &what).await?;
                let before = area.clone();
                luks::remove_key(&mut area, i)?;
                self.write_area(c, &area, &before, &what).await?;
                *c.header.lock().unwrap_or_else(|p| p.into_inner()) = luks::Header::decode(&area)?;
                return Ok(added);
            }
        };
        self.write_area(c, &area, &old, &what).await?;
        *c.header.lock().unwrap_or_else(|p| p.into_inner()) = luks::Header::decode(&area)?;
        Ok(slot)
    }

    /// Write the changed parts of the LUKS area: when slots are activated,
    /// the key material (made durable) before the header sector; when they
    /// are removed, the header first, then the material.
    async fn write_area(&self, c: &Encryption, new: &[u8], old: &[u8], what: &str) -> Result<()> {
        let hdr = 4096usize;
        let activated = luks::Header::decode(new)?.active_slots().len()
            > luks::Header::decode(old)?.active_slots().len();
        let write = |from: usize, to: usize| {
            let buf = IoBuf::from_slice(&new[from..to]);
            async move {
                self.storage
                    .write_at(c.region.offset + from as u64, buf, false)
                    .await
                    .map_err(|e| Error::io(format!("{what}: write key slots"), e))?;
                self.storage
                    .flush()
                    .await
                    .map_err(|e| Error::io(format!("{what}: flush key slots"), e))
            }
        };
        if new[hdr..] != old[hdr..] && activated {
            write(hdr, new.len()).await?;
        }
        write(0, hdr).await?;
        if new[hdr..] != old[hdr..] && !activated {
            write(hdr, new.len()).await?;
        }
        Ok(())
    }
}
