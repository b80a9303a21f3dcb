#!/usr/bin/env python3
"""One cache per host: N VMs over one remote base, bytes at the base server.

The base (random data) is served by nbdkit with a delay per read (the
stand-in for a remote base, as in bench/prefetch.py) and its stats filter,
which counts the bytes it sends. Every "VM" is an FVD overlay (copy-on-read
on, as for remote bases) exported by its own `fvd serve` and read with fio's
nbd engine replaying the same profile (the same random 4 KiB reads at QD32,
same seed, then a sequential stretch): the boot of one image, N times.

Cases, each on fresh images and a fresh cache:
  one        - 1 VM over `fvd cache serve` (the bytes one boot pulls);
  many-cache - N VMs at once over one `fvd cache serve`;
  many-direct- N VMs at once, each straight over the base (no host cache).
Reported: bytes the base server sent, their ratio to `one`, and the wall
time of the slowest VM. Target (issue #14): many-cache <= 1.1x one.

Usage: bench/cache.py [--quick] [--vms N] [--fvd PATH] [--workdir DIR]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))


def wait_path(p, timeout=20):
    t = time.time()
    while not os.path.exists(p):
        if time.time() - t > timeout:
            raise RuntimeError(f"{p} never appeared")
        time.sleep(0.02)


class Proc:
    def __init__(self, args, ready=None, **kw):
        self.p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
        if ready:
            wait_path(ready)

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
        try:
            _, err = self.p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            _, err = self.p.communicate()
        return err.decode(errors="replace")


def base_server(d, base, delay):
    sock = os.path.join(d, "base.sock")
    stats = os.path.join(d, "base.stats")
    for p in (sock, stats):
        if os.path.exists(p):
            os.unlink(p)
    kit = Proc(
        ["nbdkit", "-f", "-U", sock, "--filter=stats", "--filter=delay", "file", base,
         f"statsfile={stats}", f"rdelay={delay}"],
        ready=sock,
    )
    return kit, f"nbd+unix:///?socket={sock}", stats


def bytes_sent(stats_file):
    """Bytes the stats filter says nbdkit read (it prints them scaled)."""
    text = open(stats_file).read()
    m = re.search(r"^read: [0-9]+ ops, [0-9.]+ s, ([0-9.]+) (bytes|KiB|MiB|GiB|TiB)", text, re.M)
    if not m:
        raise RuntimeError(f"no read line in {stats_file}:\n{text}")
    scale = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    return int(float(m.group(1)) * scale[m.group(2)])


def fio(sock, size, ops, seq_mib, seed):
    job = [
        "fio", "--name=boot", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
        "--rw=randread", "--bs=4k", "--iodepth=32", f"--number_ios={ops}",
        f"--size={size}", f"--randseed={seed}", "--norandommap", "--output-format=terse",
        "--name=seq", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
        "--rw=read", "--bs=1M", "--iodepth=4", f"--size={seq_mib}M", "--offset=0",
        "--stonewall",
    ]
    subprocess.run(job, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_case(fvd, d, base, size, n, cached, args):
    kit, base_url, stats = base_server(d, base, args.delay)
    procs = []
    try:
        lower = base_url
        if cached:
            csock = os.path.join(d, "cache.sock")
            shutil.rmtree(os.path.join(d, "cache"), ignore_errors=True)
            procs.append(Proc([fvd, "cache", "serve", "--dir", os.path.join(d, "cache"),
                               "--socket", csock, base_url], ready=csock))
            lower = f"nbd+unix:///?socket={csock}"
        socks = []
        for i in range(n):
            img = os.path.join(d, f"vm{i}.fvd")
            if os.path.exists(img):
                os.unlink(img)
            subprocess.run([fvd, "create", "-q", "-b", lower, "-F", "raw", img], check=True)
            sock = os.path.join(d, f"vm{i}.sock")
            procs.append(Proc([fvd, "serve", "--socket", sock, "--copy-on-read=on", img],
                              ready=sock))
            socks.append(sock)
        t0 = time.time()
        runners = [subprocess.Popen([sys.executable, __file__, "--fio-one", s, str(size),
                                     str(args.ops), str(args.seq), "1234"]) for s in socks]
        for r in runners:
            if r.wait() != 0:
                raise RuntimeError("fio failed")
        wall = time.time() - t0
    finally:
        for p in reversed(procs):
            p.stop()
        kit.stop()
    return bytes_sent(stats), wall


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--fio-one":
        sock, size, ops, seq, seed = sys.argv[2:7]
        fio(sock, int(size), int(ops), int(seq), int(seed))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--vms", type=int, default=4)
    ap.add_argument("--fvd", default=os.path.join(HERE, "..", "target", "release", "fvd"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--delay", default="2ms")
    args = ap.parse_args()
    size = (256 if args.quick else 1024) * MiB
    args.ops = 2000 if args.quick else 5000
    args.seq = 32 if args.quick else 128
    d = tempfile.mkdtemp(prefix="fvd-cache-bench-", dir=args.workdir)
    try:
        base = os.path.join(d, "base.raw")
        with open(base, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        rows = []
        for name, n, cached in [("one", 1, True), ("many-cache", args.vms, True),
                                ("many-direct", args.vms, False)]:
            sent, wall = run_case(args.fvd, d, base, size, n, cached, args)
            rows.append((name, n, sent, wall))
        one = rows[0][2]
        print(f"| case | VMs | bytes at the base | vs one | slowest VM (s) |")
        print(f"|---|---|---|---|---|")
        for name, n, sent, wall in rows:
            print(f"| {name} | {n} | {sent / MiB:.1f} MiB | {sent / one:.2f}x | {wall:.2f} |")
        print(f"\nprofile: {args.ops} random 4 KiB reads at QD32 (seed 1234) then "
              f"{args.seq} MiB sequential, base {size // MiB} MiB behind nbdkit delay {args.delay}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
