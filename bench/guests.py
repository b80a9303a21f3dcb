#!/usr/bin/env python3
"""Linux guests (QEMU 10, TCG) on FVD and on qemu-storage-daemon's exports.

Every guest boots the same way: the test kit's cloud kernel and initramfs
(crates/fvd-cli/tests/guest/kit.sh) mount the disk's first partition (an
ext4 root file system on the shared base image) and run a script from it;
the disk's second partition (64 MiB to the end) is scratch space. Systems,
all over the same base (a raw file: partition table + root file system),
all with the host page cache off (cache=none / cache.direct=on):

  fvd-vhost    `fvd serve --vhost-user-blk` on an FVD image over the base
  fvd-nbd      `fvd serve --socket` (NBD) on an FVD image over the base;
               QEMU's NBD client behind virtio-blk-pci
  raw-vhost    qemu-storage-daemon vhost-user-blk export of a raw copy
  raw-nbd      qemu-storage-daemon NBD export of a raw copy
  qcow2-vhost  qemu-storage-daemon vhost-user-blk export of qcow2 over the base
  qcow2-nbd    qemu-storage-daemon NBD export of qcow2 over the base

Workloads in one boot (fresh images every boot, so writes are first
writes): host time from QEMU's start to the root file system's init (the
boot reads the base); dd 256 MiB of 1 MiB O_DIRECT writes, then reads; dd
32 MiB of 4 KiB O_DIRECT writes and reads (one request at a time: latency).
Guest-side times come from /proc/uptime (10 ms resolution; TCG keeps guest
time in step with the host). fio is not in the kit (busybox only).

Systems are interleaved (every system once per round, order rotated);
medians over the rounds. Usage:

  bench/guests.py [--rounds N] [--systems a,b,...] [--fvd PATH] [--out DIR]

Needs qemu-system-x86_64 10 (bookworm-backports), qemu-img,
qemu-storage-daemon, mke2fs. Results: bench/results/guests-<stamp>.{json,md}.
"""

import argparse
import datetime
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))

from infra import BenchError, Cleanup, Process, install_signal_handlers, log, run  # noqa: E402

MiB = 1 << 20
ROOT_START = MiB
ROOT_SIZE = 32 * MiB
DATA_START = 64 * MiB
DISK = 512 * MiB
GUEST_MEM = "512M"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIT_SH = os.path.join(ROOT, "crates/fvd-cli/tests/guest/kit.sh")
SYSTEMS = ["fvd-vhost", "fvd-nbd", "raw-vhost", "raw-nbd", "qcow2-vhost", "qcow2-nbd"]

GUEST_SCRIPT = r"""
D=/dev/vda2
t() { cut -d' ' -f1 /proc/uptime; }
yes fvd-bench-pattern-0123456789 | head -c 16777216 > /tmp/p
a=$(t)
i=0
while [ $i -lt 16 ]; do
  dd if=/tmp/p of=$D bs=1M count=16 seek=$((i * 16)) oflag=direct 2>/dev/null
  i=$((i + 1))
done
b=$(t)
dd if=$D of=/dev/null bs=1M count=256 iflag=direct 2>/dev/null
c=$(t)
dd if=/tmp/p of=$D bs=4k count=8192 seek=$((300 * 256)) oflag=direct 2>/dev/null
d=$(t)
dd if=$D of=/dev/null bs=4k count=8192 skip=$((300 * 256)) iflag=direct 2>/dev/null
e=$(t)
echo "FVD-BENCH $a $b $c $d $e"
"""

WORKLOADS = [
    ("boot", "boot to init, s"),
    ("write-1m", "dd write 256 MiB, 1 MiB O_DIRECT, s"),
    ("read-1m", "dd read 256 MiB, 1 MiB O_DIRECT, s"),
    ("write-4k", "dd write 32 MiB, 4 KiB O_DIRECT (QD1), s"),
    ("read-4k", "dd read 32 MiB, 4 KiB O_DIRECT (QD1), s"),
]


def kit():
    out, _ = run([KIT_SH], timeout=900)
    return out.strip()


def mbr(disk_size):
    m = bytearray(512)
    for i, (start, length) in enumerate([(ROOT_START, ROOT_SIZE), (DATA_START, disk_size - DATA_START)]):
        e = 446 + 16 * i
        m[e + 1:e + 4] = b"\xfe\xff\xff"
        m[e + 4] = 0x83
        m[e + 5:e + 8] = b"\xfe\xff\xff"
        m[e + 8:e + 16] = struct.pack("<II", start // 512, length // 512)
    m[510:512] = b"\x55\xaa"
    return bytes(m)


def build_base(kitdir, work):
    tree = os.path.join(work, "rootfs")
    shutil.copytree(os.path.join(kitdir, "rootfs"), tree, symlinks=True)
    with open(os.path.join(tree, "test.sh"), "w") as f:
        f.write(GUEST_SCRIPT)
    fs = os.path.join(work, "root.ext4")
    with open(fs, "wb") as f:
        f.truncate(ROOT_SIZE)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "fvdroot", "-E",
         "nodiscard,lazy_itable_init=0,lazy_journal_init=0", "-d", tree, fs])
    base = os.path.join(work, "base.raw")
    with open(base, "wb") as f:
        f.truncate(DATA_START)
        f.write(mbr(DISK))
        f.seek(ROOT_START)
        with open(fs, "rb") as r:
            shutil.copyfileobj(r, f)
    os.remove(fs)
    shutil.rmtree(tree)
    return base


def make_image(system, base, work):
    """A fresh disk for `system`; returns (path, format)."""
    kind = system.split("-")[0]
    if kind == "fvd":
        img = os.path.join(work, "disk.fvd")
        run([FVD, "create", "-q", "-F", "raw", "-b", base, img, str(DISK)])
        return img, "fvd"
    if kind == "raw":
        img = os.path.join(work, "disk.raw")
        shutil.copyfile(base, img)
        with open(img, "r+b") as f:
            f.truncate(DISK)
        return img, "raw"
    img = os.path.join(work, "disk.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, img, str(DISK)])
    return img, "qcow2"


def start_server(cleanup, system, img, fmt, sock, logfile):
    vhost = system.endswith("vhost")
    if fmt == "fvd":
        flag = "--vhost-user-blk" if vhost else "--socket"
        p = Process(cleanup, [FVD, "serve", flag, sock, "--cache", "none", img], logfile, system)
    else:
        blockdev = [
            "--blockdev",
            f"driver=file,node-name=f0,filename={img},cache.direct=on,aio=native,discard=unmap",
        ]
        node = "f0"
        if fmt == "qcow2":
            blockdev += ["--blockdev", "driver=qcow2,node-name=d0,file=f0,discard=unmap"]
            node = "d0"
        if vhost:
            export = ["--export", f"type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,"
                      f"addr.path={sock},writable=on,num-queues=1"]
        else:
            export = ["--nbd-server", f"addr.type=unix,addr.path={sock}",
                      "--export", f"type=nbd,id=e0,node-name={node},name=,writable=on"]
        p = Process(cleanup, ["qemu-storage-daemon"] + blockdev + export, logfile, system)
    # Wait for the socket to exist; connecting to probe it would count as a
    # vhost-user front end.
    p.wait_until(lambda: os.path.exists(sock), "socket")
    return p


def qemu_args(kitdir, system, sock):
    a = ["qemu-system-x86_64", "-accel", "tcg", "-m", GUEST_MEM, "-smp", "1", "-nodefaults",
         "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
         "-object", f"memory-backend-memfd,id=mem,size={GUEST_MEM},share=on",
         "-machine", "q35,memory-backend=mem",
         "-kernel", os.path.join(kitdir, "vmlinuz"), "-initrd", os.path.join(kitdir, "initrd.img"),
         "-append", "console=ttyS0 quiet panic=-1"]
    if system.endswith("vhost"):
        a += ["-chardev", f"socket,id=c0,path={sock}",
              "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]
    else:
        a += ["-blockdev", f"driver=nbd,node-name=d0,server.type=unix,server.path={sock},discard=unmap",
              "-device", "virtio-blk-pci,drive=d0"]
    return a


def boot(kitdir, system, sock):
    t0 = time.monotonic()
    p = subprocess.Popen(qemu_args(kitdir, system, sock), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    init = None
    lines = []
    try:
        for line in p.stdout:
            lines.append(line)
            if init is None and "FVD-GUEST-INIT" in line:
                init = time.monotonic() - t0
            if time.monotonic() - t0 > 300:
                break
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    console = "".join(lines)
    res = next((ln.split()[1:] for ln in lines if ln.startswith("FVD-BENCH ")), None)
    if init is None or res is None or "FVD-GUEST-RESULT ok" not in console:
        raise BenchError(f"{system}: the guest run failed:\n{console[-3000:]}")
    a, b, c, d, e = (float(x) for x in res)
    return {"boot": init, "write-1m": b - a, "read-1m": c - b, "write-4k": d - c, "read-4k": e - d}


def main():
    global FVD
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--fvd", default=os.environ.get("FVD"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results"))
    args = ap.parse_args()
    install_signal_handlers()
    if not args.fvd:
        run(["cargo", "build", "--release", "-q", "-p", "fvd-cli"], timeout=3600)
        args.fvd = os.path.join(ROOT, "target/release/fvd")
    FVD = args.fvd
    systems = args.systems.split(",")
    kitdir = kit()
    work = tempfile.mkdtemp(prefix="fvd-guests-")
    cleanup = Cleanup()
    results = {s: [] for s in systems}
    try:
        base = build_base(kitdir, work)
        for r in range(args.rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            for s in order:
                img, fmt = make_image(s, base, work)
                sock = os.path.join(work, f"{s}.sock")
                server = start_server(cleanup, s, img, fmt, sock, os.path.join(work, f"{s}.log"))
                try:
                    res = boot(kitdir, s, sock)
                finally:
                    server.stop()
                log(f"round {r + 1} {s}: " + " ".join(f"{k}={v:.2f}" for k, v in res.items()))
                results[s].append(res)
                os.remove(img)
                if os.path.exists(sock):
                    os.remove(sock)
    finally:
        cleanup.run_all()
        shutil.rmtree(work, ignore_errors=True)
    med = {s: {w: statistics.median(x[w] for x in results[s]) for w, _ in WORKLOADS} for s in systems}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    md = render(med, systems, args.rounds)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"guests-{stamp}.json"), "w") as f:
        json.dump({"rounds": args.rounds, "runs": results, "medians": med}, f, indent=1)
    with open(os.path.join(args.out, f"guests-{stamp}.md"), "w") as f:
        f.write(md)
    print(md)


def render(med, systems, rounds):
    out = [f"Medians of {rounds} rounds (seconds; lower is better).", "",
           "| workload | " + " | ".join(systems) + " | raw-vhost / fvd-vhost | fvd-nbd / fvd-vhost |",
           "|---|" + "---|" * (len(systems) + 2)]
    for w, label in WORKLOADS:
        row = [label] + [f"{med[s][w]:.2f}" for s in systems]

        def ratio(a, b):
            if a in med and b in med and med[b][w] > 0:
                return f"{med[a][w] / med[b][w]:.2f}x"
            return "-"
        row += [ratio("raw-vhost", "fvd-vhost"), ratio("fvd-nbd", "fvd-vhost")]
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        print(f"bench/guests.py: {e}", file=sys.stderr)
        sys.exit(1)
