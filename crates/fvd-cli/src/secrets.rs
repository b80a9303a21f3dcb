//! Keys of encrypted images, taken the way qemu-img takes them.
//!
//! * `--object secret,id=ID,file=PATH` (the file's bytes, as QEMU reads
//!   them), `data=TEXT` (visible in the process list: for tests),
//!   `file=-` (a line read from standard input, without its newline, as
//!   cryptsetup reads a passphrase from a pipe); `format=raw|base64`.
//! * An image names its secret with `encrypt.key-secret=ID`: in `-o` of
//!   `create`/`convert` (the new image), or in an `--image-opts` image
//!   argument (`driver=fvd,file.filename=PATH,encrypt.key-secret=ID`).
//! * When no image names one and exactly one secret object was given, that
//!   secret is used for every encrypted image (an FVD convenience).
//!
//! Secrets stay in zeroizing buffers ([`Secret`]); no message repeats an
//! option that may hold one (`data=`), only its ID.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Result, anyhow, bail};
use fvd_core::crypt::Secret;
use fvd_core::{KeyLookup, Opener};
use zeroize::Zeroizing;

/// The secret objects given and which image uses which.
#[derive(Default)]
struct Keyring {
    secrets: HashMap<String, Secret>,
    /// Image path (as given, and canonical) → secret ID.
    assigned: HashMap<PathBuf, String>,
}

fn keyring() -> &'static Mutex<Keyring> {
    static K: OnceLock<Mutex<Keyring>> = OnceLock::new();
    K.get_or_init(Mutex::default)
}

fn lock() -> std::sync::MutexGuard<'static, Keyring> {
    keyring().lock().unwrap_or_else(|p| p.into_inner())
}

/// True if `spec` (an `--object` value) is a secret object.
pub fn is_secret(spec: &str) -> bool {
    spec == "secret" || spec.starts_with("secret,")
}

/// Add a `secret,id=...` object. Errors never quote the values.
pub fn add_object(spec: &str) -> Result<()> {
    let mut id = None;
    let mut data: Option<Zeroizing<Vec<u8>>> = None;
    let mut base64 = false;
    for item in spec.split(',').skip(1).filter(|s| !s.is_empty()) {
        // An item without '=' may be a mistyped secret: never quote it.
        let (k, v) = item.split_once('=').ok_or_else(|| {
            anyhow!("secret: every parameter needs KEY=VALUE (id, data, file, format)")
        })?;
        match k {
            "id" => id = Some(v.to_string()),
            "data" => data = Some(Zeroizing::new(v.as_bytes().to_vec())),
            "file" if v == "-" => data = Some(read_stdin_line()?),
            "file" => {
                let b = std::fs::read(v).map_err(|e| anyhow!("secret: cannot read {v}: {e}"))?;
                data = Some(Zeroizing::new(b));
            }
            "format" => {
                base64 = match v {
                    "raw" => false,
                    "base64" => true,
                    _ => bail!("secret: format must be raw or base64"),
                }
            }
            "keyid" | "iv" => bail!("secret: encrypted secrets (keyid=, iv=) are not supported"),
            other => bail!("secret: unknown parameter '{other}' (id, data, file, format)"),
        }
    }
    let id = id.ok_or_else(|| anyhow!("secret: id= is required"))?;
    let data = data.ok_or_else(|| anyhow!("secret {id}: data= or file= is required"))?;
    let bytes = if base64 {
        decode_base64(&data).ok_or_else(|| anyhow!("secret {id}: not valid base64"))?
    } else {
        data
    };
    if bytes.is_empty() {
        bail!("secret {id}: the passphrase is empty");
    }
    let mut k = lock();
    if k.secrets.contains_key(&id) {
        bail!("secret: id '{id}' is given twice");
    }
    k.secrets.insert(id, Secret::new(bytes.to_vec()));
    Ok(())
}

fn read_stdin_line() -> Result<Zeroizing<Vec<u8>>> {
    // Room for any passphrase line up front: a growing Vec would leave
    // copies of it in freed memory.
    let mut line = Zeroizing::new(Vec::with_capacity(8192));
    std::io::stdin()
        .lock()
        .read_until(b'\n', &mut line)
        .map_err(|e| anyhow!("secret: cannot read standard input: {e}"))?;
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    Ok(line)
}

fn decode_base64(s: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s: Zeroizing<Vec<u8>> = Zeroizing::new(
        s.iter()
            .copied()
            .filter(|c| !c.is_ascii_whitespace())
            .collect(),
    );
    let body = s
        .strip_suffix(b"==")
        .or_else(|| s.strip_suffix(b"="))
        .unwrap_or(&s[..]);
    let mut out = Zeroizing::new(Vec::with_capacity(body.len() * 3 / 4));
    for q in body.chunks(4) {
        if q.len() == 1 {
            return None;
        }
        let mut n = 0u32;
        for (i, &c) in q.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..q.len()]);
    }
    Some(out)
}

/// The secret named `id`.
pub fn secret(id: &str) -> Result<Secret> {
    lock().secrets.get(id).cloned().ok_or_else(|| {
        anyhow!("no secret object with id '{id}' (give --object secret,id={id},file=PATH)")
    })
}

/// Record that the image at `path` uses secret `id` (checked to exist).
pub fn assign(path: &Path, id: &str) -> Result<()> {
    secret(id)?;
    let mut k = lock();
    k.assigned.insert(path.to_path_buf(), id.to_string());
    if let Ok(c) = path.canonicalize() {
        k.assigned.insert(c, id.to_string());
    }
    Ok(())
}

/// The passphrase for the image at `path`: the one assigned to it, else
/// the only secret object given.
fn key_for(path: &Path) -> Option<Secret> {
    let k = lock();
    let id = k
        .assigned
        .get(path)
        .or_else(|| path.canonicalize().ok().and_then(|c| k.assigned.get(&c)));
    match id {
        Some(id) => k.secrets.get(id).cloned(),
        None if k.secrets.len() == 1 => k.secrets.values().next().cloned(),
        None => None,
    }
}

/// `opener` asking this keyring for the keys of encrypted images.
pub fn with_keys(opener: Opener) -> Opener {
    let lookup: KeyLookup = Arc::new(|p: &Path| key_for(p));
    opener.with_keys(lookup)
}

/// An image path and the ID of the secret an `--image-opts` argument named.
pub type ImageKey = (PathBuf, String);

/// Rewrite `--image-opts` image arguments (`driver=fvd,file.filename=PATH,
/// encrypt.key-secret=ID`, qemu-img's form) into their path, remembering
/// their key. Arguments that are not option lists stay as they are. The
/// `--image-opts` flag itself is dropped; clap never sees it.
pub fn rewrite_image_opts(args: Vec<String>) -> Result<(Vec<String>, Vec<ImageKey>)> {
    if !args.iter().any(|a| a == "--image-opts") {
        return Ok((args, Vec::new()));
    }
    let mut out = Vec::with_capacity(args.len());
    let mut keys = Vec::new();
    for a in args {
        if a == "--image-opts" {
            continue;
        }
        if !a.contains("file.filename=") || a.starts_with('-') {
            out.push(a);
            continue;
        }
        let mut path = None;
        let mut key = None;
        for item in a.split(',') {
            match item.split_once('=') {
                Some(("file.filename", v)) => path = Some(v.to_string()),
                Some(("encrypt.key-secret", v)) => key = Some(v.to_string()),
                Some(("driver", "fvd" | "raw")) | Some(("file.driver", "file")) => {}
                Some(("driver", d)) => {
                    bail!("--image-opts: driver '{d}' is not supported (fvd or raw)")
                }
                _ => bail!(
                    "--image-opts: unknown option '{}' (driver, file.filename, encrypt.key-secret)",
                    item.split('=').next().unwrap_or(item)
                ),
            }
        }
        let path = path.ok_or_else(|| anyhow!("--image-opts: file.filename= is missing"))?;
        if let Some(k) = key {
            keys.push((PathBuf::from(&path), k));
        }
        out.push(path);
    }
    Ok((out, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_image_opts() {
        assert_eq!(&decode_base64(b"aHVudGVyMg==").unwrap()[..], b"hunter2");
        assert_eq!(&decode_base64(b"YWJj").unwrap()[..], b"abc");
        assert!(decode_base64(b"a").is_none());
        let (args, keys) = rewrite_image_opts(
            [
                "fvd",
                "info",
                "--image-opts",
                "driver=fvd,file.filename=a.fvd,encrypt.key-secret=s0",
            ]
            .map(String::from)
            .to_vec(),
        )
        .unwrap();
        assert_eq!(args, ["fvd", "info", "a.fvd"]);
        assert_eq!(keys, vec![(PathBuf::from("a.fvd"), "s0".to_string())]);
    }

    #[test]
    fn errors_never_quote_values() {
        for spec in [
            "secret,id=x,hunter2",
            "secret,id=x,data=hunter2,format=hunter2",
            "secret,id=x,data=hunter2!,format=base64",
        ] {
            let e = format!("{:#}", add_object(spec).unwrap_err());
            assert!(!e.contains("hunter2"), "{spec}: {e}");
        }
    }
}
