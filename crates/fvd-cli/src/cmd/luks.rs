//! `fvd luks add-key|remove-key|change-key|kill-slot` — the key slots of an
//! encrypted image, as cryptsetup's luksAddKey, luksRemoveKey,
//! luksChangeKey and luksKillSlot. Passphrases come from `--object secret`
//! objects, named by ID; the image is opened with `--key-secret` (or the
//! only secret given, or `--image-opts`).

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use fvd_core::{Format, KeySlotChange, Opener};

use crate::common::{at, open, require_key};
use crate::secrets;

/// Arguments of `fvd luks`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

/// How a new passphrase is protected.
#[derive(clap::Args, Debug)]
pub struct Kdf {
    /// Milliseconds of PBKDF2 work to open the new slot (as qemu-img's
    /// encrypt.iter-time).
    #[arg(long = "iter-time", value_name = "MS", default_value_t = 2000)]
    pub iter_time: u64,
    /// Exact PBKDF2 iterations instead (at least 1000), as cryptsetup's
    /// --pbkdf-force-iterations.
    #[arg(long = "pbkdf-force-iterations", value_name = "N")]
    pub iterations: Option<u32>,
}

impl Kdf {
    fn iterations(&self) -> u32 {
        self.iterations
            .unwrap_or_else(|| fvd_core::crypt::luks::iterations_for(self.iter_time))
    }
}

/// A key slot operation.
#[derive(clap::Subcommand, Debug)]
pub enum Action {
    /// Add a passphrase in a free key slot.
    AddKey {
        /// Secret that opens the image now.
        #[arg(long = "key-secret", value_name = "ID")]
        key_secret: Option<String>,
        /// Secret holding the passphrase to add.
        #[arg(long = "new-secret", value_name = "ID")]
        new_secret: String,
        /// Use this slot (0-7) rather than the lowest free one.
        #[arg(long = "key-slot", short = 'S', value_name = "N")]
        slot: Option<usize>,
        #[command(flatten)]
        kdf: Kdf,
        /// The image.
        image: PathBuf,
    },
    /// Remove the key slot that a passphrase opens.
    RemoveKey {
        /// Secret holding the passphrase to remove.
        #[arg(long = "key-secret", value_name = "ID")]
        key_secret: Option<String>,
        /// The image.
        image: PathBuf,
    },
    /// Replace a passphrase by a new one (added in a free slot first).
    ChangeKey {
        /// Secret holding the passphrase to replace.
        #[arg(long = "key-secret", value_name = "ID")]
        key_secret: Option<String>,
        /// Secret holding the new passphrase.
        #[arg(long = "new-secret", value_name = "ID")]
        new_secret: String,
        #[command(flatten)]
        kdf: Kdf,
        /// The image.
        image: PathBuf,
    },
    /// Remove a key slot by number (the image opened with another key).
    KillSlot {
        /// Secret that opens the image.
        #[arg(long = "key-secret", value_name = "ID")]
        key_secret: Option<String>,
        /// The image.
        image: PathBuf,
        /// The slot (0-7).
        slot: usize,
    },
}

/// Run `fvd luks`.
pub async fn run(a: Args, opener: &Opener) -> Result<u8> {
    let (image, key_id) = match &a.action {
        Action::AddKey {
            image, key_secret, ..
        }
        | Action::RemoveKey { image, key_secret }
        | Action::ChangeKey {
            image, key_secret, ..
        }
        | Action::KillSlot {
            image, key_secret, ..
        } => (image.clone(), key_secret.clone()),
    };
    if let Some(id) = &key_id {
        secrets::assign(&image, id).map_err(|e| anyhow!("{}: {e}", image.display()))?;
    }
    let current = || -> Result<fvd_core::crypt::Secret> {
        let k = opener.key_for(&image).ok_or_else(|| {
            anyhow!(
                "{}: --key-secret ID is required (the passphrase that opens the image)",
                image.display()
            )
        })?;
        Ok(k)
    };
    let change = match &a.action {
        Action::AddKey {
            new_secret,
            slot,
            kdf,
            ..
        } => KeySlotChange::Add {
            secret: secrets::secret(new_secret)?,
            iterations: kdf.iterations(),
            slot: *slot,
        },
        Action::RemoveKey { .. } => KeySlotChange::RemovePassphrase(current()?),
        Action::ChangeKey {
            new_secret, kdf, ..
        } => KeySlotChange::Change {
            old: current()?,
            new: secrets::secret(new_secret)?,
            iterations: kdf.iterations(),
        },
        Action::KillSlot { slot, .. } => KeySlotChange::RemoveSlot(*slot),
    };
    let img = open(opener, &image, Format::Fvd, false, false).await?;
    if !img.is_encrypted() {
        let _ = img.close().await;
        return Err(anyhow!("{}: the image is not encrypted", image.display()));
    }
    require_key(&img, &image)?;
    let r = img.change_key_slots(change).await;
    img.close().await.map_err(|e| at(&image, e))?;
    let slot = r.map_err(|e| at(&image, e))?;
    let what = match a.action {
        Action::AddKey { .. } => "added",
        Action::ChangeKey { .. } => "now holds the new passphrase",
        Action::RemoveKey { .. } | Action::KillSlot { .. } => "removed",
    };
    eprintln!("key slot {slot} {what}");
    Ok(0)
}
