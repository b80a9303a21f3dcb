//! Copy-on-read and prefetch through `fvd serve`, with the base behind a
//! real, slow NBD server (nbdkit with its delay filter).

use fvd_testkit::wait_path;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

const FVD: &str = env!("CARGO_BIN_EXE_fvd");

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill with a pid we own.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn nbdkit(dir: &Path, base: &Path) -> (Proc, PathBuf) {
    let sock = dir.join("base.sock");
    let child = Command::new("nbdkit")
        .args(["-f", "-U"])
        .arg(&sock)
        .args(["--filter=delay", "file"])
        .arg(base)
        .arg("rdelay=1ms")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_path(&sock);
    (Proc(child), sock)
}

fn serve(image: &Path, sock: &Path, stats: &Path, extra: &[&str]) -> Proc {
    let child = Command::new(FVD)
        .arg("serve")
        .arg("--socket")
        .arg(sock)
        .arg("--stats-socket")
        .arg(stats)
        .args(extra)
        .arg(image)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_path(sock);
    wait_path(stats);
    Proc(child)
}

fn stats(path: &Path) -> serde_json::Value {
    use std::io::Read;
    let mut s = String::new();
    std::os::unix::net::UnixStream::connect(path)
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    serde_json::from_str(&s).unwrap()
}

fn qemu_io(sock: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("fail"),
        "qemu-io: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    let data: Vec<u8> = (0..(16u32 << 20))
        .map(|i| ((i / 65536) as u8) | 1)
        .collect();
    std::fs::write(&base, data).unwrap();
    (base, dir.join("img.fvd"))
}

#[test]
fn copy_on_read_fetches_nothing_twice_and_prefetch_detaches_the_base() {
    if !fvd_testkit::have_tools(&["nbdkit", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, img) = setup(dir.path());
    let (kit, base_sock) = nbdkit(dir.path(), &base);
    let uri = format!("nbd+unix:///?socket={}", base_sock.display());
    let out = Command::new(FVD)
        .args(["create", "-q", "-b", &uri, "-F", "raw"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sock = dir.path().join("img.sock");
    let st = dir.path().join("stats.sock");
    {
        let _srv = serve(&img, &sock, &st, &[]);
        let reads = [
            "read -P 0x01 0 64k",
            "read -P 0x21 2M 128k",
            "read -P 0x81 8M 4k",
        ];
        qemu_io(&sock, &reads);
        let first = stats(&st);
        assert_eq!(first["copy-on-read"], true, "{first}");
        let fetched = first["base-bytes-read"].as_u64().unwrap();
        assert!(
            ((64 + 128 + 4) << 10..=256 << 10).contains(&fetched),
            "{first}"
        );
        // Let the background fills land, then read the same again.
        std::thread::sleep(Duration::from_millis(300));
        qemu_io(&sock, &reads);
        let second = stats(&st);
        assert_eq!(
            second["base-bytes-read"].as_u64().unwrap(),
            fetched,
            "the second pass fetched from the base: {second}"
        );
    }
    {
        let _srv = serve(&img, &sock, &st, &["--prefetch", "adaptive"]);
        let t = Instant::now();
        loop {
            let s = stats(&st);
            if s["prefetch"]["state"] == "done" {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "prefetch did not finish: {s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    drop(kit); // the base server is gone
    let out = Command::new(FVD)
        .args([
            "io",
            "-c",
            "read -P 0x01 0 64k",
            "-c",
            "read -P 0xf1 15M 64k",
        ])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(FVD)
        .args(["info", "--output=json"])
        .arg(&img)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["format-specific"]["data"]["all-local"], true);
    // And it serves without its base.
    let _srv = serve(&img, &sock, &st, &[]);
    qemu_io(&sock, &["read -P 0x81 8M 64k"]);
}
