//! The second half of `fvd demo`: serve the demo image over NBD with
//! `fvd serve`, drive I/O through the socket with a minimal client built on
//! the fvd-nbd codec, and print how QEMU, qemu-img and nbdinfo attach it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use fvd_nbd::consts;
use fvd_nbd::handshake::{
    ClientOption, decode_export_name_reply, decode_greeting, encode_client_flags, encode_option,
};
use fvd_nbd::reply::{ReplyHeader, decode_reply_header};
use fvd_nbd::request::{Command as NbdCommand, Request, encode_request};

/// A blocking NBD client that speaks the oldest common dialect: fixed
/// newstyle, NBD_OPT_EXPORT_NAME, simple replies.
struct Client {
    sock: UnixStream,
    cookie: u64,
    size: u64,
}

impl Client {
    fn connect(path: &Path) -> Result<Client> {
        let mut sock =
            UnixStream::connect(path).with_context(|| format!("connect to {}", path.display()))?;
        sock.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut greeting = [0u8; consts::GREETING_LEN];
        sock.read_exact(&mut greeting)?;
        let flags = decode_greeting(&greeting).map_err(|e| anyhow!("greeting: {e}"))?;
        let no_zeroes = flags & consts::FLAG_NO_ZEROES != 0;
        let mut client_flags = consts::FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            client_flags |= consts::FLAG_C_NO_ZEROES;
        }
        sock.write_all(&encode_client_flags(client_flags))?;
        sock.write_all(
            &encode_option(&ClientOption::ExportName(String::new())).map_err(|e| anyhow!("{e}"))?,
        )?;
        let mut reply = vec![0u8; if no_zeroes { 10 } else { 134 }];
        sock.read_exact(&mut reply)?;
        let (size, _flags) =
            decode_export_name_reply(&reply, no_zeroes).map_err(|e| anyhow!("export: {e}"))?;
        Ok(Client {
            sock,
            cookie: 0,
            size,
        })
    }

    fn request(
        &mut self,
        command: NbdCommand,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<Vec<u8>> {
        self.cookie += 1;
        let req = Request {
            flags: 0,
            command,
            cookie: self.cookie,
            offset,
            length,
        };
        self.sock
            .write_all(&encode_request(&req, false).map_err(|e| anyhow!("{e}"))?)?;
        self.sock.write_all(payload)?;
        let mut hdr = [0u8; consts::SIMPLE_REPLY_LEN];
        self.sock.read_exact(&mut hdr)?;
        match decode_reply_header(&hdr, false).map_err(|e| anyhow!("reply: {e}"))? {
            ReplyHeader::Simple(r) if r.cookie == self.cookie && r.error == 0 => {}
            ReplyHeader::Simple(r) => bail!("{} failed with NBD error {}", command.name(), r.error),
            other => bail!("unexpected reply {other:?}"),
        }
        let mut data = vec![
            0u8;
            if command == NbdCommand::Read {
                length as usize
            } else {
                0
            }
        ];
        self.sock.read_exact(&mut data)?;
        Ok(data)
    }

    fn disconnect(mut self) -> Result<()> {
        let req = Request {
            flags: 0,
            command: NbdCommand::Disc,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        self.sock
            .write_all(&encode_request(&req, false).map_err(|e| anyhow!("{e}"))?)?;
        Ok(())
    }
}

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
    let mut c = Client::connect(sock)?;
    outln!();
    outln!(
        "Served over NBD by 'fvd serve' on {} ({} bytes); through the socket:",
        sock.display(),
        c.size
    );
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8 ^ 0x3c).collect();
    let off = 24 << 20;
    c.request(NbdCommand::Write, off, data.len() as u64, &data)?;
    c.request(NbdCommand::Flush, 0, 0, &[])?;
    let back = c.request(NbdCommand::Read, off, data.len() as u64, &[])?;
    if back != data {
        bail!("data read back through NBD differs from what was written");
    }
    outln!("  wrote 64 KiB at offset {off}, flushed, read it back: identical");
    let base_off = 4 << 20;
    let base = c.request(NbdCommand::Read, base_off, 4096, &[])?;
    if base
        .iter()
        .enumerate()
        .any(|(i, &b)| b != expect(base_off + i as u64))
    {
        bail!("base data read through NBD is wrong");
    }
    outln!("  read 4 KiB of base data at offset {base_off}: served from the base");
    c.disconnect()?;
    outln!("  disconnected; the server flushed and closed the image cleanly");
    Ok(())
}
