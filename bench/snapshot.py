#!/usr/bin/env python3
"""Internal snapshots: FVD vs qcow2, side by side in one run.

Part a — create, apply, delete (`fvd snapshot` vs `qemu-img snapshot`, whole
commands, open and close included) on disks with every cluster/chunk
allocated, at 1 GiB, 16 GiB and 1 TiB virtual size. The data is holes of
sparse files (cheap on disk); only the metadata is real, which is what
these operations touch. Systems:
  fvd-1M    compact FVD image, 1 MiB chunks (the default)
  fvd-64K   compact FVD image, 64 KiB chunks
  qcow2-64K qcow2, 64 KiB clusters (preallocation=metadata)
  qcow2-4K  qcow2, 4 KiB clusters (the many-clusters case; not at 1 TiB
            unless --qcow2-4k-tib: 256 Mi clusters take minutes per command)
Each round: -c s, -a s, -d s; the median of --rounds rounds is reported,
wall time and CPU time (user + system of the command, from getrusage: what
a loaded machine cannot inflate).

Part b — guest write throughput right after a snapshot: a disk full of real
data, a snapshot, then 4 KiB random writes (fio, nbd engine, queue depth
16) each first to a shared chunk/cluster, through `fvd serve` and
`qemu-nbd` (both page cache). The same writes without a snapshot give the
baseline of each system; "copied" is what the image wrote besides the
guest's data.

Usage: bench/snapshot.py [--fvd PATH] [--dir DIR] [--parts ab] [--rounds N]
                         [--sizes 1G,16G,1T] [--writes N] [--disk BYTES]
Needs qemu-img, qemu-nbd, fio (nbd engine). Writes markdown to stdout and
bench/results/snapshot-<stamp>.{md,json}.
"""

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def timed(cmd):
    """Wall seconds and CPU seconds (user + system) of one command."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    run(cmd)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def times(x):
    """A ratio as '3.4x' below 10, '25x' above."""
    return f"{x:.1f}x" if x < 10 else f"{x:.0f}x"


def size_of(s):
    units = {"K": 10, "M": 20, "G": 30, "T": 40}
    return int(s[:-1]) << units[s[-1]] if s[-1] in units else int(s)


def full_fvd(fvd, path, size, chunk):
    """A compact FVD image whose every chunk is allocated (as holes)."""
    run([fvd, "create", "-o", f"compact=on,chunk_size={chunk}", path, str(size)])
    with open(path, "r+b") as f:
        h = f.read(4096)
        regions = [struct.unpack_from("<QQ", h, 128 + 16 * i) for i in range(8)]
        cs = struct.unpack_from("<I", h, 76)[0]
        table = regions[1][0]
        data = regions[7][0]
        n = (size + cs - 1) // cs
        f.seek(table)
        step = 1 << 20
        for i in range(0, n, step):
            k = min(step, n - i)
            f.write(struct.pack(f"<{k}I", *range(i, i + k)))
        f.truncate(data + n * cs)
    run([fvd, "check", path])


def full_qcow2(path, size, cluster):
    run(["qemu-img", "create", "-f", "qcow2", "-o",
         f"cluster_size={cluster},preallocation=metadata", path, str(size)])


def part_a(args, out):
    systems = [("fvd-1M", "fvd", 1 << 20), ("fvd-64K", "fvd", 64 << 10),
               ("qcow2-64K", "qcow2", 64 << 10), ("qcow2-4K", "qcow2", 4 << 10)]
    rows = []
    for size_s in args.sizes.split(","):
        size = size_of(size_s)
        for name, kind, unit in systems:
            if name == "qcow2-4K" and size >= 1 << 40 and not args.qcow2_4k_tib:
                rows.append({"size": size_s, "system": name, "skipped": True})
                continue
            with tempfile.TemporaryDirectory(dir=args.dir) as d:
                path = os.path.join(d, "img")
                t0 = time.perf_counter()
                if kind == "fvd":
                    full_fvd(args.fvd, path, size, unit)
                    tool = [args.fvd, "snapshot"]
                else:
                    full_qcow2(path, size, unit)
                    tool = ["qemu-img", "snapshot"]
                build = time.perf_counter() - t0
                res = {"create": [], "apply": [], "delete": []}
                for _ in range(args.rounds):
                    for k, flag in (("create", "-c"), ("apply", "-a"), ("delete", "-d")):
                        res[k].append(timed(tool + [flag, "s", path]))
                row = {"size": size_s, "system": name,
                       "units": size // unit, "build_s": build,
                       "metadata_bytes": os.stat(path).st_blocks * 512,
                       "samples": res}
                for k, v in res.items():
                    row[k] = statistics.median(w for w, _ in v)
                    row[k + "_cpu"] = statistics.median(c for _, c in v)
                rows.append(row)
                print(f"  {size_s} {name}: " + ", ".join(
                    f"{k} {row[k] * 1000:.0f} ms (cpu {row[k + '_cpu'] * 1000:.0f})"
                    for k in res), file=sys.stderr)
    out["a"] = rows
    md = ["### a. create / apply / delete, every cluster allocated (median of "
          f"{args.rounds}, whole commands; wall ms, CPU ms in brackets)", "",
          "| virtual size | system | clusters/chunks | create ms | apply ms | delete ms | "
          "vs qcow2-64K | vs qcow2-4K |",
          "|---|---|---|---|---|---|---|---|"]
    for size_s in args.sizes.split(","):
        by = {r["system"]: r for r in rows if r["size"] == size_s}
        for name, _, _ in systems:
            r = by[name]
            if r.get("skipped"):
                md.append(f"| {size_s} | {name} | - | skipped | | | | |")
                continue

            def ratio(other):
                o = by.get(other)
                if not o or o.get("skipped") or other == name:
                    return "-"
                return "/".join(times(o[k] / r[k]) for k in ("create", "apply", "delete"))
            def ms(k):
                return f"{r[k] * 1000:.0f} ({r[k + '_cpu'] * 1000:.0f})"
            md.append(f"| {size_s} | {name} | {r['units']:,} | {ms('create')} | "
                      f"{ms('apply')} | {ms('delete')} | "
                      f"{ratio('qcow2-64K') if name.startswith('fvd') else '-'} | "
                      f"{ratio('qcow2-4K') if name.startswith('fvd') else '-'} |")
    md.append("")
    md.append("Ratios are qcow2's wall time / FVD's wall time for create/apply/delete.")
    return md


class Server:
    def __init__(self, cmd, sock):
        self.sock = sock
        self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while not os.path.exists(sock):
            if self.p.poll() is not None or time.time() > deadline:
                raise SystemExit(f"server did not start: {cmd}: {self.p.stderr.read()}")
            time.sleep(0.05)
        time.sleep(0.1)

    def stop(self):
        self.p.terminate()
        self.p.wait(timeout=60)


def fio_write(sock, args, extra):
    cmd = ["fio", "--name=w", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
           "--output-format=json"] + extra
    r = run(cmd)
    # fio's nbd engine prints "fio: connected to NBD server" before the JSON.
    j = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["write"]
    return {"iops": j["iops"], "mib_s": j["bw_bytes"] / (1 << 20)}


def part_b(args, out):
    disk = args.disk
    writes = args.writes
    systems = [("fvd-1M", "fvd", "1M"), ("fvd-256K", "fvd", "256K"),
               ("fvd-64K", "fvd", "64K"), ("qcow2-64K", "qcow2", "64k")]
    rows = []
    for name, kind, unit in systems:
        for snap in (False, True):
            with tempfile.TemporaryDirectory(dir=args.dir) as d:
                img = os.path.join(d, "img")
                sock = os.path.join(d, "nbd.sock")
                if kind == "fvd":
                    run([args.fvd, "create", "-o", f"compact=on,chunk_size={unit}", img, str(disk)])
                    serve = [args.fvd, "serve", "--socket", sock, img]
                else:
                    run(["qemu-img", "create", "-f", "qcow2", "-o", f"cluster_size={unit}", img, str(disk)])
                    serve = ["qemu-nbd", "-f", "qcow2", "--socket", sock, "--cache=writeback", img]
                # Fill the disk with real data (no holes), then snapshot it.
                s = Server(serve, sock)
                fio_write(sock, args, ["--rw=write", "--bs=1M", "--iodepth=4", f"--size={disk}",
                                       "--refill_buffers"])
                s.stop()
                if snap:
                    tool = [args.fvd, "snapshot"] if kind == "fvd" else ["qemu-img", "snapshot"]
                    run(tool + ["-c", "before", img])
                before = os.stat(img).st_blocks * 512
                s = Server(serve, sock)
                r = fio_write(sock, args, ["--rw=randwrite", "--bs=4k", "--iodepth=16",
                                           f"--size={disk}", f"--number_ios={writes}",
                                           "--randrepeat=1", "--norandommap",
                                           "--refill_buffers"])
                s.stop()
                grown = os.stat(img).st_blocks * 512 - before
                row = {"system": name, "snapshot": snap, "grown_bytes": grown, **r}
                rows.append(row)
                print(f"  {name} snapshot={snap}: {r['iops']:.0f} IOPS, grew {grown >> 20} MiB",
                      file=sys.stderr)
    out["b"] = rows
    md = [f"### b. 4 KiB random writes right after a snapshot ({writes:,} writes, QD16, "
          f"{disk >> 30} GiB disk full of data)", "",
          "| system | IOPS without snapshot | IOPS after snapshot | after / without | "
          "after vs qcow2-64K | image grew (after snapshot) |",
          "|---|---|---|---|---|---|"]
    by = {(r["system"], r["snapshot"]): r for r in rows}
    q = by[("qcow2-64K", True)]["iops"]
    for name, _, _ in systems:
        a, b = by[(name, False)], by[(name, True)]
        md.append(f"| {name} | {a['iops']:.0f} | {b['iops']:.0f} | {b['iops'] / a['iops']:.2f} | "
                  f"{b['iops'] / q:.2f} | {b['grown_bytes'] >> 20} MiB |")
    return md


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fvd", default=os.path.join(HERE, "..", "target", "release", "fvd"))
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--parts", default="ab")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", default="1G,16G,1T")
    ap.add_argument("--qcow2-4k-tib", action="store_true")
    ap.add_argument("--writes", type=int, default=20000)
    ap.add_argument("--disk", type=size_of, default=2 << 30)
    args = ap.parse_args()
    for tool in ("qemu-img", "qemu-nbd", "fio"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing")
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "qemu": run(["qemu-img", "--version"]).stdout.splitlines()[0],
           "fvd": run([args.fvd, "--version"]).stdout.strip()}
    md = ["## Internal snapshots (`bench/snapshot.py`)", ""]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    res = os.path.join(HERE, "results")

    def save():
        # After every part: a failure later keeps what was measured.
        with open(os.path.join(res, f"snapshot-{stamp}.md"), "w") as f:
            f.write("\n".join(md) + "\n")
        with open(os.path.join(res, f"snapshot-{stamp}.json"), "w") as f:
            json.dump(out, f, indent=1)
    if "a" in args.parts:
        md += part_a(args, out) + [""]
        save()
    if "b" in args.parts:
        md += part_b(args, out) + [""]
        save()
    print("\n".join(md))

if __name__ == "__main__":
    main()
