//! The second half of `fvd demo`: serve the demo image over NBD with
//! `fvd serve`, drive I/O through the socket with the fvd-nbd client, and
//! print how QEMU, qemu-img and nbdinfo attach it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fvd_core::executor::block_on;
use fvd_nbd::client::{Address, Client, Config, Target};

fn wait_for(path: &Path, child: &mut Child) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if let Some(st) = child.try_wait()? {
            bail!("fvd serve exited early ({st})");
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("fvd serve did not create {} in time", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Serve `image` on a unix socket in `dir`, write and read through it, then
/// let the server close the image cleanly. `expect` gives the byte the demo
/// base holds at an offset (to check reads of base data through the server).
pub fn serve_and_drive(dir: &Path, image: &Path, expect: impl Fn(u64) -> u8) -> Result<()> {
    let sock = dir.join("demo.sock");
    let _ = std::fs::remove_file(&sock);
    let exe = std::env::current_exe().context("cannot find the fvd executable")?;
    let mut child = Command::new(exe)
        .arg("serve")
        .arg("--socket")
        .arg(&sock)
        .arg("--once")
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start fvd serve")?;
    let r = drive(&sock, &mut child, &expect);
    if r.is_err() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    r?;
    if !status.success() {
        bail!("fvd serve exited with {status}");
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    outln!();
    outln!("To serve the image and attach it yourself:");
    outln!(
        "  fvd serve --socket {} {}",
        sock.display(),
        image.display()
    );
    outln!("  qemu-system-x86_64 -m 1G \\");
    outln!(
        "    -blockdev driver=nbd,server.type=unix,server.path={},node-name=disk0 \\",
        sock.display()
    );
    outln!("    -device virtio-blk-pci,drive=disk0");
    outln!("  (or: -drive file={uri},format=raw,if=virtio)");
    outln!("  qemu-img info '{uri}'");
    outln!("  qemu-img map --output=json '{uri}'");
    outln!("  nbdinfo --map '{uri}'");
    Ok(())
}

fn drive(sock: &Path, child: &mut Child, expect: &dyn Fn(u64) -> u8) -> Result<()> {
    wait_for(sock, child)?;
    let target = Target {
        address: Address::Unix(sock.to_path_buf()),
        export: String::new(),
        name: format!("nbd+unix:///?socket={}", sock.display()),
    };
    // The client's futures complete under any executor; the CLI's own.
    let c = block_on(Client::connect(target, Config::default()))?;
    outln!();
    outln!(
        "Served over NBD by 'fvd serve' on {} ({} bytes); through the socket:",
        sock.display(),
        c.info().size
    );
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8 ^ 0x3c).collect();
    let off = 24 << 20;
    block_on(c.write(off, data.clone(), false))?;
    block_on(c.flush())?;
    let back = block_on(c.read(off, data.len()))?;
    if back != data {
        bail!("data read back through NBD differs from what was written");
    }
    outln!("  wrote 64 KiB at offset {off}, flushed, read it back: identical");
    let base_off = 4 << 20;
    let base = block_on(c.read(base_off, 4096))?;
    if base
        .iter()
        .enumerate()
        .any(|(i, &b)| b != expect(base_off + i as u64))
    {
        bail!("base data read through NBD is wrong");
    }
    outln!("  read 4 KiB of base data at offset {base_off}: served from the base");
    // Dropping the client sends NBD_CMD_DISC.
    drop(c);
    outln!("  disconnected; the server flushed and closed the image cleanly");
    Ok(())
}
