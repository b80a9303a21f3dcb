//! Linux guests under QEMU's TCG for the tests: the kit built by
//! `guest/kit.sh` (a Debian cloud kernel and busybox-static), disks the guest
//! boots from, and boots over NBD or vhost-user-blk.
//!
//! Disk layout (an MBR with two partitions): partition 1 at 1 MiB holds a
//! 32 MiB ext4 root file system (busybox, the kit's `/sbin/fvd-init` and the
//! test's `/test.sh`), mounted read-only; partition 2 from 64 MiB to the end
//! is the test's scratch area. The guest's console lines starting with
//! `FVD-` tell the host what happened. Test crates using it also declare
//! `mod common;` (for `have_tools`).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One MiB.
pub const MIB: u64 = 1 << 20;
/// Where the root partition starts.
pub const ROOT_START: u64 = MIB;
/// Size of the root file system.
pub const ROOT_SIZE: u64 = 32 * MIB;
/// Where the scratch partition (`/dev/vda2`) starts; also the size of the
/// base images the tests build.
pub const DATA_START: u64 = 64 * MIB;
/// Guest RAM.
pub const GUEST_MEM: &str = "256M";

const FVD: &str = env!("CARGO_BIN_EXE_fvd");

/// The built kit.
#[derive(Debug)]
pub struct Kit {
    /// Its directory.
    pub dir: PathBuf,
}

impl Kit {
    /// The kit, built on first use by this process (`None`, with a SKIP
    /// line, when QEMU's system emulator is not installed).
    pub fn get() -> Option<&'static Kit> {
        static KIT: OnceLock<Option<Kit>> = OnceLock::new();
        KIT.get_or_init(|| {
            if !fvd_testkit::have_tools(&["qemu-system-x86_64"]) {
                return None;
            }
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/kit.sh");
            let out = Command::new(&script)
                .stdin(Stdio::null())
                .output()
                .expect("run kit.sh");
            assert!(
                out.status.success(),
                "guest/kit.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            Some(Kit { dir })
        })
        .as_ref()
    }

    /// The kernel.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The initramfs.
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }
}

fn mbr(disk_size: u64) -> [u8; 512] {
    let mut m = [0u8; 512];
    let parts = [
        (ROOT_START, ROOT_SIZE),
        (DATA_START, disk_size - DATA_START),
    ];
    for (i, (start, len)) in parts.into_iter().enumerate() {
        let e = &mut m[446 + 16 * i..446 + 16 * (i + 1)];
        e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[4] = 0x83; // Linux
        e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[8..12].copy_from_slice(&((start / 512) as u32).to_le_bytes());
        e[12..16].copy_from_slice(&((len / 512) as u32).to_le_bytes());
    }
    m[510] = 0x55;
    m[511] = 0xaa;
    m
}

/// Build `dir/base.raw` (`DATA_START` bytes): the partition table of a
/// `disk_size` disk and the root file system with `script` as `/test.sh`.
pub fn build_base(kit: &Kit, dir: &Path, script: &str, disk_size: u64) -> PathBuf {
    let tree = dir.join("rootfs");
    let _ = std::fs::remove_dir_all(&tree);
    let st = Command::new("cp")
        .arg("-a")
        .arg(kit.dir.join("rootfs"))
        .arg(&tree)
        .status()
        .unwrap();
    assert!(st.success(), "copy the rootfs template");
    std::fs::write(tree.join("test.sh"), script).unwrap();
    let fs = dir.join("root.ext4");
    let f = std::fs::File::create(&fs).unwrap();
    f.set_len(ROOT_SIZE).unwrap();
    drop(f);
    let out = Command::new("mke2fs")
        .args([
            "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "fvdroot", "-E",
        ])
        .arg("nodiscard,lazy_itable_init=0,lazy_journal_init=0")
        .arg("-d")
        .arg(&tree)
        .arg(&fs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mke2fs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base = dir.join("base.raw");
    let mut f = std::fs::File::create(&base).unwrap();
    f.set_len(DATA_START).unwrap();
    f.write_all(&mbr(disk_size)).unwrap();
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(ROOT_START)).unwrap();
    f.write_all(&std::fs::read(&fs).unwrap()).unwrap();
    std::fs::remove_file(&fs).unwrap();
    std::fs::remove_dir_all(&tree).unwrap();
    base
}

/// How the disk reaches the guest.
#[derive(Debug, Clone, Copy)]
pub enum Attach<'a> {
    /// QEMU's NBD client behind a virtio-blk device (unix socket).
    Nbd(&'a Path),
    /// A vhost-user-blk device (unix socket).
    VhostUser(&'a Path),
    /// A vhost-user-blk device whose QEMU side reconnects (every 200 ms)
    /// when the backend goes away.
    VhostUserReconnect(&'a Path),
}

/// What a boot printed and how long it took.
#[derive(Debug)]
pub struct Guest {
    /// Everything on the console.
    pub console: String,
    /// Host time from QEMU's start to the root file system's init.
    pub init: Option<Duration>,
    /// Host time from QEMU's start to its exit.
    pub total: Duration,
    /// QEMU exited by itself (the guest powered off).
    pub exited: bool,
}

impl Guest {
    /// The test script ran to its end.
    pub fn ok(&self) -> bool {
        self.console.contains("FVD-GUEST-RESULT ok")
    }

    /// Panic with the console unless the test script succeeded.
    pub fn assert_ok(&self, what: &str) {
        assert!(
            self.exited && self.ok(),
            "{what}: the guest test failed (exited: {}):\n{}",
            self.exited,
            self.console
        );
    }

    /// The rest of the first console line starting with `marker`.
    pub fn value(&self, marker: &str) -> Option<String> {
        self.console
            .lines()
            .find_map(|l| l.trim().strip_prefix(marker).map(|v| v.trim().to_string()))
    }
}

/// QEMU's arguments for a guest booting from `attach`.
pub fn qemu_args(kit: &Kit, attach: Attach<'_>) -> Vec<String> {
    let mut a: Vec<String> = [
        "-accel",
        "tcg",
        "-m",
        GUEST_MEM,
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-object",
        &format!("memory-backend-memfd,id=mem,size={GUEST_MEM},share=on"),
        "-machine",
        "q35,memory-backend=mem",
        "-append",
        "console=ttyS0 quiet panic=-1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push("-kernel".into());
    a.push(kit.kernel().display().to_string());
    a.push("-initrd".into());
    a.push(kit.initrd().display().to_string());
    match attach {
        Attach::Nbd(sock) => {
            a.push("-blockdev".into());
            a.push(format!(
                "driver=nbd,node-name=d0,server.type=unix,server.path={},discard=unmap",
                sock.display()
            ));
            a.push("-device".into());
            a.push("virtio-blk-pci,drive=d0".into());
        }
        Attach::VhostUser(sock) | Attach::VhostUserReconnect(sock) => {
            let reconnect = if matches!(attach, Attach::VhostUserReconnect(_)) {
                ",reconnect-ms=200"
            } else {
                ""
            };
            a.push("-chardev".into());
            a.push(format!("socket,id=c0,path={}{reconnect}", sock.display()));
            a.push("-device".into());
            // num-queues: one per vCPU (QEMU's default for PCI).
            a.push("vhost-user-blk-pci,chardev=c0".into());
        }
    }
    a
}

/// Boot a guest from `attach`; `extra` QEMU arguments are appended. QEMU is
/// killed after `timeout`.
pub fn boot(kit: &Kit, attach: Attach<'_>, extra: &[&str], timeout: Duration) -> Guest {
    boot_watching(kit, attach, extra, timeout, &mut |_| {})
}

/// [`boot`], calling `on_line` with every console line as it arrives.
pub fn boot_watching(
    kit: &Kit,
    attach: Attach<'_>,
    extra: &[&str],
    timeout: Duration,
    on_line: &mut dyn FnMut(&str),
) -> Guest {
    let t0 = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(qemu_args(kit, attach))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut console = String::new();
    let mut init = None;
    let mut exited = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((at, line)) => {
                if init.is_none() && line.contains("FVD-GUEST-INIT") {
                    init = Some(at - t0);
                }
                on_line(&line);
                console.push_str(&line);
                console.push('\n');
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                exited = child.wait().map(|s| s.success()).unwrap_or(false);
                break;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if t0.elapsed() > timeout {
                    let _ = child.kill();
                    let _ = child.wait();
                    console.push_str("[killed by the test: timeout]\n");
                    break;
                }
            }
        }
    }
    let total = t0.elapsed();
    let err = err_reader.join().unwrap_or_default();
    if !err.trim().is_empty() {
        console.push_str("[qemu stderr] ");
        console.push_str(&err);
    }
    Guest {
        console,
        init,
        total,
        exited,
    }
}

/// Wait until `p` exists.
pub fn wait_path(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A server process (fvd serve, nbdkit, qemu-storage-daemon) with its
/// standard error in a file; SIGTERM on drop.
pub struct Server {
    child: Option<Child>,
    log: PathBuf,
}

impl Server {
    /// Start `prog args`, wait for `sock` to appear.
    pub fn start(prog: &str, args: &[&str], sock: &Path, log: &Path) -> Server {
        let err = std::fs::File::create(log).unwrap();
        let child = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {prog}: {e}"));
        wait_path(sock);
        Server {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    /// `fvd serve --once -v EXTRA IMAGE` listening on `sock` (NBD or
    /// vhost-user-blk as `attach` says).
    pub fn fvd(image: &Path, attach: Attach<'_>, extra: &[&str]) -> Server {
        Server::fvd_with(image, attach, &[&["--once"], extra].concat())
    }

    /// `fvd serve -v EXTRA IMAGE` listening on `sock`.
    pub fn fvd_with(image: &Path, attach: Attach<'_>, extra: &[&str]) -> Server {
        let (flag, sock) = match attach {
            Attach::Nbd(s) => ("--socket", s),
            Attach::VhostUser(s) | Attach::VhostUserReconnect(s) => ("--vhost-user-blk", s),
        };
        let sock_s = sock.display().to_string();
        let img = image.display().to_string();
        let mut args = vec!["serve", flag, &sock_s, "-v"];
        args.extend_from_slice(extra);
        args.push(&img);
        let log = sock.with_extension("log");
        Server::start(FVD, &args, sock, &log)
    }

    /// What the server printed on standard error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait up to `timeout` for the server to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let t = Instant::now();
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            if t.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill with a pid we own.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// The guest script's data pattern: `yes fvd-guest-pattern-0123456789`.
pub fn pattern(len: usize) -> Vec<u8> {
    b"fvd-guest-pattern-0123456789\n"
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

/// The whole content of an image, as `fvd convert -O raw` writes it.
pub fn content(image: &Path, format: &str) -> Vec<u8> {
    let out = image.with_extension("content.raw");
    let r = Command::new(FVD)
        .args(["convert", "-f", format, "-O", "raw"])
        .arg(image)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "fvd convert: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// `fvd check IMAGE` must find no errors.
pub fn assert_check_clean(image: &Path) {
    let r = Command::new(FVD).arg("check").arg(image).output().unwrap();
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success() && text.contains("No errors"),
        "fvd check {}: {text}{}",
        image.display(),
        String::from_utf8_lossy(&r.stderr)
    );
}
