"""bench/run: FVD side by side with raw and qcow2, through the same kinds of
export (NBD and FUSE), with block, file-system, space and metadata workloads.

Usage: see `bench/run --help`. The run:

1. builds (or takes) the fvd binary, checks the tools, makes a work
   directory with a raw base full of random data;
2. for every repetition, for every part (block, fs), for every export kind
   (nbd, fuse), for every system in an order rotated each repetition: makes
   a fresh image, exports it, runs the workloads, stops the export, records
   the image's allocated size and checks the image's metadata;
3. measures metadata, create and open of 1 TiB images;
4. writes every measurement (TSV), medians and ratios (JSON), a Markdown
   report, and (full mode) the report into docs/BENCHMARKS.md.

Anything started (servers, FUSE exports, nbdfuse, loop devices, mounts) is
undone on exit; any system failing to start stops the run with a non-zero
exit status and no published table.
"""

import argparse
import ctypes
import datetime
import json
import os
import random
import re
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import report  # noqa: E402
from infra import (  # noqa: E402
    BenchError,
    Cleanup,
    FsMount,
    Loop,
    Process,
    allocated_bytes,
    detach_loop,
    fmt_cmd,
    install_signal_handlers,
    log,
    mounted,
    run,
    socket_ready,
    timed,
    unmount_fuse,
)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

# Sizes and counts of each mode (smoke runs QD32 only: fio spends ~0.25 s
# setting up every job). `runtime` caps every fio job (seconds);
# random first writes write at most 1/`fw_density` of the blocks of their
# region, so that they stay sparse (as a guest's writes are) and each block
# is written once.
MODES = {
    "full": dict(
        base=2 * GiB, disk=8 * GiB, seq=512 * MiB, runtime=2.5, reps=3, fw_density=8,
        files=20000, pm_files=200, pm_tx=400, meta_reps=5, big_base=True, scratch=10 * GiB,
        flush_runtime=3.0,
    ),
    "quick": dict(
        base=256 * MiB, disk=1 * GiB, seq=128 * MiB, runtime=0.3, reps=1, fw_density=8,
        files=1000, pm_files=30, pm_tx=60, meta_reps=3, big_base=False, scratch=2 * GiB,
        flush_runtime=0.5,
    ),
    "smoke": dict(
        base=16 * MiB, disk=64 * MiB, seq=8 * MiB, runtime=0.1, reps=1, fw_density=8,
        files=40, pm_files=5, pm_tx=10, meta_reps=1, big_base=False, qds=(32,),
        scratch=256 * MiB, flush_runtime=0.1,
    ),
}

# The systems. `server` is the program behind both export kinds: fvd
# (`fvd serve` / `fvd mount`) or qsd (qemu-storage-daemon's NBD / FUSE
# export). `opts` go to `fvd create -o` / `qemu-img create -o`.
SYSTEMS = {
    "fvd": dict(label="FVD", server="fvd", fmt="fvd", opts=None),
    "fvd-compact": dict(label="FVD compact", server="fvd", fmt="fvd", opts="compact=on"),
    "raw-fvd": dict(label="raw (fvd)", server="fvd", fmt="raw", opts=None),
    "raw-qsd": dict(label="raw (qsd)", server="qsd", fmt="raw", opts=None),
    # Not in the default set (see DEFAULT_SYSTEMS): the preallocation modes
    # and the fully preallocated raw file, the limit of a flush-bound load.
    "raw-qsd-full": dict(label="raw full prealloc (qsd)", server="qsd", fmt="raw", opts="full"),
    "fvd-falloc": dict(label="FVD falloc", server="fvd", fmt="fvd", opts="preallocation=falloc"),
    "fvd-full": dict(label="FVD full", server="fvd", fmt="fvd", opts="preallocation=full"),
    "fvd-compact-metadata": dict(label="FVD compact metadata", server="fvd", fmt="fvd",
                                 opts="compact=on,preallocation=metadata"),
    "fvd-compact-falloc": dict(label="FVD compact falloc", server="fvd", fmt="fvd",
                               opts="compact=on,preallocation=falloc"),
    "fvd-compact-full": dict(label="FVD compact full", server="fvd", fmt="fvd",
                             opts="compact=on,preallocation=full"),
    "qcow2": dict(label="qcow2", server="qsd", fmt="qcow2", opts=None),
    "qcow2-2m": dict(
        label="qcow2 2M/ext-L2", server="qsd", fmt="qcow2", opts="cluster_size=2M,extended_l2=on"
    ),
}
DEFAULT_SYSTEMS = ["fvd", "fvd-compact", "raw-fvd", "raw-qsd", "qcow2", "qcow2-2m"]
EXPORTS = ["nbd", "fuse"]
PARTS = ["block", "flush", "fs", "meta"]
DEFAULT_PARTS = ["block", "fs", "meta"]

# The flush part: 4 KiB random first writes into base data, each followed
# by a flush (fio fsync=1: NBD_CMD_FLUSH after every write), on a fresh
# image per (system, repetition), through NBD only (fio's nbd engine: the
# format's flush cost with the fewest layers in between). QD1 in region A,
# QD8 in region Bw.
FLUSH_JOBS = [
    ("flushwrite", 1, "randwrite", "4k", "A", "first"),
    ("flushwrite", 8, "randwrite", "4k", "Bw", "first"),
]

# The block workloads, run in this order on one fresh image per (system,
# export, repetition). Regions (see Bench.regions): A and Bw hold base data
# and get first writes; C holds base data and is only read; E and F lie
# beyond the base: written sequentially, then read back, overwritten and
# read at random.
#   first:  random writes, each block once, at most region/4K/fw_density of
#           them, stopped at the runtime cap
#   sized:  the whole region once, however long it takes (2 min safety cap)
#   timed:  time-based over the region, for the runtime cap
BLOCK_JOBS = [
    ("firstwrite", 32, "randwrite", "4k", "A", "first"),
    ("firstwrite", 1, "randwrite", "4k", "Bw", "first"),
    ("baseread", 32, "randread", "4k", "C", "timed"),
    ("baseread", 1, "randread", "4k", "C", "timed"),
    ("seqwrite", 32, "write", "1M", "E", "sized"),
    ("seqwrite", 1, "write", "1M", "F", "sized"),
    ("seqread", 32, "read", "1M", "E", "sized"),
    ("seqread", 1, "read", "1M", "F", "sized"),
    ("overwrite", 32, "randwrite", "4k", "E", "timed"),
    ("overwrite", 1, "randwrite", "4k", "E", "timed"),
    ("localread", 32, "randread", "4k", "E", "timed"),
    ("localread", 1, "randread", "4k", "E", "timed"),
]

MKFS = ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"]

_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path):
    """syncfs(2) on the file system holding `path` (not a global sync, so
    other file systems on the machine do not add their writeback)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise BenchError(f"syncfs {path}: {os.strerror(e)}")
    finally:
        os.close(fd)


def load_info():
    """Load average and CPU pressure: the machines are shared and noisy."""
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    try:
        with open("/proc/pressure/cpu") as f:
            psi = f.readline().split()[3].split("=")[1]  # some avg300
    except (OSError, IndexError):
        psi = "?"
    return f"load average {load}, CPU pressure (some, 5 min) {psi}%"


def mount_options(path):
    """Mount options of the file system holding `path`."""
    out, _ = run(["findmnt", "-n", "-o", "OPTIONS", "-T", path])
    return set(out.strip().split(","))


def fs_name(path):
    out, _ = run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", path])
    return " on ".join(out.split())


def human(n):
    for unit, size in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


class Target:
    """What a workload talks to: an NBD URI or a file (FUSE export)."""

    def __init__(self, kind, uri=None, file=None):
        self.kind, self.uri, self.file = kind, uri, file


class Bench:
    def __init__(self, args, cfg, cleanup):
        self.args = args
        self.cfg = cfg
        self.cleanup = cleanup
        self.root = args.root
        self.cache = args.cache
        self.rows = []  # every measurement
        self.commands = {}  # key -> command line (paths templated)
        self.problems = []  # failed checks: the run then exits non-zero
        self.work = None
        self.fvd = None
        B, S = cfg["base"], cfg["seq"]
        self.regions = {
            "A": (0, B // 2),
            "Bw": (B // 2, B // 4),
            "C": (3 * B // 4, B // 4),
            "E": (B, S),
            "F": (B + S, S),
        }
        if B + 2 * S > cfg["disk"]:
            raise BenchError("disk too small for the regions (base + 2 * seq)")

    # ---------- paths and records

    def tpl(self, args):
        """A command line with the work directory and binary templated."""
        s = fmt_cmd(args)
        s = s.replace(self.fvd, "fvd")
        return s.replace(self.work, "$W")

    def note_cmd(self, key, args):
        self.commands.setdefault(key, self.tpl(args))

    def record(self, rep, part, export, system, workload, qd, metric, value, unit):
        self.rows.append(
            dict(rep=rep, part=part, export=export, system=system, workload=workload,
                 qd=qd, metric=metric, value=value, unit=unit)
        )

    def path(self, name):
        return os.path.join(self.work, name)

    # ---------- setup

    def prepare(self):
        cfg = self.cfg
        parent = self.args.workdir or "/var/tmp"
        os.makedirs(parent, exist_ok=True)
        top = tempfile.mkdtemp(prefix="fvd-bench.", dir=parent)
        self.cleanup.push(f"remove {top}", lambda: shutil.rmtree(top, ignore_errors=True))
        self.fvd = self.args.fvd
        opts = mount_options(top)
        scratch = self.args.scratch
        if scratch == "auto":
            scratch = "loop" if "discard" in opts else "dir"
        self.scratch = scratch
        if scratch == "dir":
            self.work = top
            self.scratch_note = f"{fs_name(top)} ({','.join(sorted(opts))})"
        else:
            self.work = self.scratch_fs(top, opts)
        log(f"work directory {self.work}")
        # The base: random data (nothing in it is detected as zero).
        self.base = self.path("base.raw")
        log(f"writing a {human(cfg['base'])} base of random data")
        rng = random.Random(12345)
        with open(self.base, "wb") as f:
            left = cfg["base"]
            block = rng.randbytes(4 * MiB)
            while left:
                # Vary every 4 MiB piece so no two blocks are equal.
                f.write(block[: min(left, len(block))])
                block = block[1:] + block[:1]
                left -= min(left, len(block))
            f.flush()
            os.fsync(f.fileno())
        # The raw template: the base's data only in region C (the one the
        # base-read workloads read); everything else a hole, so that first
        # writes allocate in the host file system as they do for FVD and
        # qcow2.
        self.raw_template = self.path("raw-template.raw")
        off, length = self.regions["C"]
        with open(self.base, "rb") as src, open(self.raw_template, "wb") as dst:
            src.seek(off)
            dst.seek(off)
            left = length
            while left:
                chunk = src.read(min(left, 8 * MiB))
                dst.write(chunk)
                left -= len(chunk)
            dst.truncate(cfg["disk"])
            os.fsync(dst.fileno())

    def scratch_fs(self, top, outer_opts):
        """A scratch ext4 without online discard, on a loop device (direct
        I/O) over a file written full of zeros in `top`.

        Why: with `-o discard` on the host file system (as on the lab
        machines), freeing the blocks of a fragmented image (unlink after
        every run) issues discards that take 10-30 s per image and stall
        the journal of every fsync meanwhile. The scratch file is written
        in full once, so writes through the loop device overwrite allocated
        blocks (no metadata change outside) and deleting it at the end
        frees a few large extents."""
        size = self.cfg["scratch"]
        backing = os.path.join(top, "scratch.img")
        log(f"writing a {human(size)} scratch file system image (the host fs has online discard)")
        zero = bytes(8 * MiB)
        fd = os.open(backing, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for _ in range(size // len(zero)):
                os.write(fd, zero)
            os.fsync(fd)
        finally:
            os.close(fd)
        # Drop the zeros from the page cache (the loop device does direct I/O).
        fd = os.open(backing, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        def note(key, args):
            self.commands.setdefault(("scratch", key), fmt_cmd(args).replace(top, "$T"))

        note("file", ["dd", "if=/dev/zero", f"of={backing}", "bs=8M", f"count={size // (8 * MiB)}",
                      "conv=fsync"])
        note("losetup", ["losetup", "-f", "--show", "--direct-io=on", backing])
        out, _ = run(["losetup", "-f", "--show", "--direct-io=on", backing], timeout=60)
        dev = out.strip()
        self.cleanup.push(f"detach {dev}", lambda: detach_loop(dev))
        name = os.path.basename(dev)
        with open(f"/sys/block/{name}/loop/dio") as f:
            if f.read().strip() != "1":
                raise BenchError(f"{dev}: the kernel refused direct I/O for the scratch loop device")
        note("mkfs", MKFS + ["$LOOP"])
        run(MKFS + [dev], timeout=600)
        work = os.path.join(top, "fs")
        note("mount (then $W = $T/fs)", ["mount", "-o", "nodiscard", "$LOOP", work])
        os.mkdir(work)
        run(["mount", "-o", "nodiscard", dev, work], timeout=120)
        self.cleanup.push(f"umount {work}", lambda: run(["umount", work], check=False, timeout=600))
        self.scratch_note = (
            f"a {human(size)} ext4 (no discard) on a direct-I/O loop device over a zero-filled file "
            f"on the host's {fs_name(top)} ({','.join(sorted(outer_opts))})"
        )
        return work

    # ---------- images and exports

    def image_path(self, system):
        return self.path({"fvd": "disk.fvd", "raw": "disk.raw", "qcow2": "disk.qcow2"}[SYSTEMS[system]["fmt"]])

    def make_image(self, system, size=None):
        spec = SYSTEMS[system]
        img = self.image_path(system)
        if os.path.exists(img):
            os.unlink(img)
        size = size or self.cfg["disk"]
        if spec["fmt"] == "fvd":
            args = [self.fvd, "create", "-q", "-b", self.base, "-F", "raw"]
            if spec["opts"]:
                args += ["-o", spec["opts"]]
            args += [img, str(size)]
        elif spec["fmt"] == "qcow2":
            args = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", self.base, "-F", "raw"]
            if spec["opts"]:
                args += ["-o", spec["opts"]]
            args += [img, str(size)]
        elif spec["opts"] == "full":
            # Every byte written: a write never allocates in the host fs.
            args = ["cp", "--sparse=never", self.raw_template, img]
        else:
            args = ["cp", "--sparse=always", self.raw_template, img]
        self.note_cmd(("create", system), args)
        run(args, timeout=600)
        if spec["opts"] == "full" and spec["fmt"] == "raw":
            os.truncate(img, size)
            fd = os.open(img, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return img

    def qsd_blockdevs(self, system, img):
        direct, aio = ("on", "native") if self.cache == "none" else ("off", "threads")
        fileopts = f"cache.direct={direct},aio={aio}"
        if SYSTEMS[system]["fmt"] == "raw":
            return [
                "--blockdev", f"driver=file,filename={img},node-name=f,{fileopts},discard=unmap",
                "--blockdev", "driver=raw,file=f,node-name=d,discard=unmap",
            ]
        return [
            "--blockdev", f"driver=file,filename={self.base},node-name=bf,{fileopts},read-only=on",
            "--blockdev", "driver=raw,file=bf,node-name=b,read-only=on",
            "--blockdev", f"driver=file,filename={img},node-name=f,{fileopts},discard=unmap",
            "--blockdev", "driver=qcow2,file=f,backing=b,node-name=d,discard=unmap",
        ]

    def start_export(self, system, export, img):
        """Start the export; return (process, Target)."""
        spec = SYSTEMS[system]
        server_log = self.path("servers.log")
        fmt = ["-f", "raw"] if spec["fmt"] == "raw" else []
        label = f"{system} {export} export"
        if export == "nbd":
            sock = self.path("nbd.sock")
            if os.path.exists(sock):
                os.unlink(sock)
            if spec["server"] == "fvd":
                args = [self.fvd, "serve", "-x", "disk", f"--cache={self.cache}", "--socket", sock] + fmt + [img]
            else:
                args = ["qemu-storage-daemon"] + self.qsd_blockdevs(system, img) + [
                    "--nbd-server", f"addr.type=unix,addr.path={sock}",
                    "--export", "type=nbd,id=e,node-name=d,name=disk,writable=on",
                ]
            self.note_cmd(("export", export, system), args)
            p = Process(self.cleanup, args, server_log, label)
            p.wait_until(lambda: socket_ready(sock), f"socket {sock}")
            return p, Target("nbd", uri=f"nbd+unix:///disk?socket={sock}")
        mp = self.path("disk.export")
        if mounted(mp):
            raise BenchError(f"{mp} is still mounted")
        with open(mp, "wb"):
            pass
        if spec["server"] == "fvd":
            args = [self.fvd, "mount", f"--cache={self.cache}"] + fmt + [img, mp]
            self.note_cmd(("export", export, system), args)
            p = Process(self.cleanup, args, server_log, label, stdout_pipe=True)
            line = p.read_line(timeout=60)
            if line != mp:
                raise BenchError(f"fvd mount printed {line!r}, expected {mp!r}")
        else:
            args = ["qemu-storage-daemon"] + self.qsd_blockdevs(system, img) + [
                "--export", f"type=fuse,id=e,node-name=d,mountpoint={mp},writable=on",
            ]
            self.note_cmd(("export", export, system), args)
            p = Process(self.cleanup, args, server_log, label)
        p.wait_until(lambda: mounted(mp), f"FUSE mount on {mp}")
        p.unmount_token = self.cleanup.push(f"unmount {mp}", lambda: unmount_fuse(mp))
        size = os.stat(mp).st_size
        if size != self.cfg["disk"]:
            raise BenchError(f"{label}: exported file has {size} bytes, expected {self.cfg['disk']}")
        return p, Target("fuse", file=mp)

    def stop_export(self, proc, target, system):
        status = proc.stop()
        if target.kind == "fuse":
            still = mounted(target.file)
            self.cleanup.pop(proc.unmount_token)
            if still:
                raise BenchError(f"{proc.label}: still mounted after the server stopped")
        if status not in (0, -15, 143):
            raise BenchError(f"{proc.label} exited with status {status}\n{proc.log_tail()}")

    def check_image(self, system, img, rep, part, export):
        fmt = SYSTEMS[system]["fmt"]
        if fmt == "raw":
            return
        args = [self.fvd, "check", img] if fmt == "fvd" else ["qemu-img", "check", img]
        self.note_cmd(("check", fmt), args)
        p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            msg = (f"{system} after {part}/{export} rep {rep}: {self.tpl(args)} exited "
                   f"{p.returncode}: {(p.stdout + p.stderr).strip()[-1500:]}")
            self.problems.append(msg)
            log(f"CHECK FAILED: {msg}")

    # ---------- block workloads

    def fio_jobs(self, target, jobs):
        """Run `jobs` (dicts of fio options, each with a "name") one after
        the other (stonewall) in one fio process; return a result per job."""
        out = self.path("fio.json")
        jobfile = self.path("fio.job")
        for f in (out, jobfile):
            if os.path.exists(f):
                os.unlink(f)
        lines = ["[global]"]
        if target.kind == "nbd":
            lines += ["ioengine=nbd", f"uri={target.uri}"]
        else:
            lines += ["ioengine=libaio", "direct=1", f"filename={target.file}", "allow_file_create=0"]
        lines += ["randrepeat=1", "stonewall", ""]
        for job in jobs:
            lines.append(f"[{job['name']}]")
            lines += [f"{k}={v}" if v is not True else k for k, v in job.items() if k != "name"]
            lines.append("")
        text = "\n".join(lines)
        with open(jobfile, "w") as f:
            f.write(text)
        run(["fio", "--output-format=json", f"--output={out}", jobfile], timeout=300 + 130 * len(jobs))
        with open(out) as f:
            data = f.read()
        # fio may print notes before the JSON document.
        results = json.loads(data[data.index("{"):])["jobs"]
        if len(results) != len(jobs):
            raise BenchError(f"fio reported {len(results)} jobs of {len(jobs)}:\n{text}")
        outs = []
        for job, res in zip(jobs, results):
            if res.get("error"):
                raise BenchError(f"fio job {job['name']} failed with error {res['error']}:\n{text}")
            side = res["write" if "write" in job["rw"] else "read"]
            if side["io_bytes"] <= 0:
                raise BenchError(f"fio job {job['name']} moved no data:\n{text}")
            outs.append(dict(iops=side["iops"], mib_s=side["bw_bytes"] / MiB, bytes=side["io_bytes"],
                             ms=side["runtime"]))
        return text, outs

    def block_job(self, wl, qd, rw, bs, region, kind):
        off, length = self.regions[region]
        ms = max(100, int(self.cfg["runtime"] * 1000))
        job = dict(name=f"{wl}-qd{qd}", rw=rw, bs=bs, iodepth=qd, offset=off, size=length)
        if kind == "first":
            job["number_ios"] = length // 4096 // self.cfg["fw_density"]
            job["runtime"] = f"{ms}ms"
        elif kind == "timed":
            job["runtime"] = f"{ms}ms"
            job["time_based"] = True
        else:  # "sized": the whole region, however long it takes (up to a safety cap)
            job["runtime"] = "120s"
        if wl == "flushwrite":
            job["fsync"] = 1
            job["runtime"] = f"{max(ms, int(self.cfg['flush_runtime'] * 1000))}ms"
        elif "write" in rw:
            job["end_fsync"] = 1
        return job

    def block_run(self, rep, export, system):
        img = self.make_image(system)
        proc, target = self.start_export(system, export, img)
        size0 = allocated_bytes(img)
        # First writes in one fio process, the image's size, then the rest.
        qds = self.cfg.get("qds", (1, 32))
        todo = [j for j in BLOCK_JOBS if j[1] in qds]
        batches = [[j for j in todo if j[0] == "firstwrite"], [j for j in todo if j[0] != "firstwrite"]]
        for batch in batches:
            jobs = [self.block_job(*j) for j in batch]
            text, results = self.fio_jobs(target, jobs)
            self.note_cmd(("fio", export, batch[0][0]), ["fio", "--output-format=json", "--output=$W/fio.json",
                                                         "$W/fio.job"])
            self.commands.setdefault(("fio-jobfile", export, batch[0][0]), text.replace(self.work, "$W"))
            fw_bytes = 0
            for (wl, qd, rw, bs, region, kind), job, r in zip(batch, jobs, results):
                if kind == "sized" and r["bytes"] != job["size"]:
                    raise BenchError(f"{system}/{export}: {job['name']} wrote {r['bytes']} of "
                                     f"{job['size']} bytes within its safety cap")
                fw_bytes += r["bytes"] if wl == "firstwrite" else 0
                self.record(rep, "block", export, system, wl, qd, "iops", r["iops"], "IOPS")
                self.record(rep, "block", export, system, wl, qd, "mib_s", r["mib_s"], "MiB/s")
                unit = f"{r['mib_s']:.0f} MiB/s" if bs == "1M" else f"{r['iops']:.0f} IOPS"
                log(f"  {export} {system} {wl} qd{qd}: {unit}")
            if batch[0][0] == "firstwrite":
                size1 = allocated_bytes(img)
                self.record(rep, "block", export, system, "firstwrite", 0, "written_bytes", fw_bytes, "B")
                self.record(rep, "block", export, system, "firstwrite", 0, "size_after", size1, "B")
                self.record(rep, "block", export, system, "firstwrite", 0, "growth", size1 - size0, "B")
                self.record(rep, "block", export, system, "firstwrite", 0, "growth_per_written",
                            (size1 - size0) / fw_bytes, "x")
        t = time.monotonic()
        self.stop_export(proc, target, system)
        t_stop = time.monotonic() - t
        self.record(rep, "block", export, system, "all", 0, "size_after", allocated_bytes(img), "B")
        t = time.monotonic()
        self.check_image(system, img, rep, "block", export)
        t_check = time.monotonic() - t
        t = time.monotonic()
        os.unlink(img)
        log(f"  stopped in {t_stop:.2f} s, checked in {t_check:.2f} s, removed in {time.monotonic() - t:.2f} s")

    def flush_run(self, rep, system):
        """First writes each followed by a flush, through NBD, fresh image."""
        img = self.make_image(system)
        proc, target = self.start_export(system, "nbd", img)
        jobs = [self.block_job(*j) for j in FLUSH_JOBS]
        text, results = self.fio_jobs(target, jobs)
        self.note_cmd(("fio", "nbd", "flushwrite"), ["fio", "--output-format=json", "--output=$W/fio.json",
                                                     "$W/fio.job"])
        self.commands.setdefault(("fio-jobfile", "nbd", "flushwrite"), text.replace(self.work, "$W"))
        for (wl, qd, *_), r in zip(FLUSH_JOBS, results):
            self.record(rep, "flush", "nbd", system, wl, qd, "iops", r["iops"], "IOPS")
            log(f"  nbd {system} {wl} qd{qd}: {r['iops']:.0f} IOPS")
        self.stop_export(proc, target, system)
        self.record(rep, "flush", "nbd", system, "flushwrite", 0, "size_after", allocated_bytes(img), "B")
        self.check_image(system, img, rep, "flush", "nbd")
        os.unlink(img)

    # ---------- file-system workloads

    def nbdfuse_file(self, uri):
        """Expose an NBD export as a file with nbdfuse; return (proc, file)."""
        d = self.path("nbdfuse")
        os.makedirs(d, exist_ok=True)
        pidfile = self.path("nbdfuse.pid")
        if os.path.exists(pidfile):
            os.unlink(pidfile)
        # One connection for every server (fvd serve offers multi-conn,
        # qemu-storage-daemon does not for a writable export).
        args = ["nbdfuse", "-C", "1", "-P", pidfile, d, uri]
        self.note_cmd(("nbdfuse",), args)
        p = Process(self.cleanup, args, self.path("servers.log"), "nbdfuse")
        p.wait_until(lambda: os.path.exists(pidfile) and mounted(d), "nbdfuse mount")
        p.unmount_token = self.cleanup.push(f"unmount {d}", lambda: unmount_fuse(d))
        return p, d, os.path.join(d, "nbd")

    def stop_nbdfuse(self, proc, d):
        # nbdfuse exits when its mount point is unmounted.
        run(["fusermount3", "-u", d], check=False, timeout=120)
        try:
            proc.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass  # stop() below sends SIGTERM
        proc.stop()
        still = mounted(d)
        self.cleanup.pop(proc.unmount_token)
        if still:
            raise BenchError("nbdfuse: still mounted after unmount")

    def make_files(self, root, n):
        """Create n files of 4-64 KiB in directories of 1000, then syncfs;
        return the seconds taken."""
        rng = random.Random(1)
        data = rng.randbytes(64 * KiB)
        sizes = [rng.randrange(4 * KiB, 64 * KiB + 1) for _ in range(n)]
        t = time.monotonic()
        os.makedirs(root)
        for d in range((n + 999) // 1000):
            os.mkdir(os.path.join(root, f"d{d:02}"))
        for i, size in enumerate(sizes):
            fd = os.open(os.path.join(root, f"d{i // 1000:02}", f"f{i:05}"),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data[:size])
            finally:
                os.close(fd)
        syncfs(root)
        return time.monotonic() - t, sum(sizes)

    def postmark_config(self, location):
        cfg = self.cfg
        return (
            f"set location {location}\n"
            f"set number {cfg['pm_files']}\n"
            f"set transactions {cfg['pm_tx']}\n"
            "set size 4096 65536\n"
            "set read 4096\n"
            "set write 4096\n"
            "set buffering false\n"
            "set bias read 5\n"
            "set bias create 5\n"
            "set seed 42\n"
            "run\n"
            "quit\n"
        )

    def postmark(self, location):
        """Run PostMark; return (printed tx/s, timed transaction-phase s,
        total s, output). Its stdout is unbuffered (stdbuf) so the harness
        can time the transaction phase itself, to better than PostMark's
        whole seconds."""
        conf = self.postmark_config(location)
        self.commands.setdefault(("postmark-config",), conf.replace(self.work, "$W"))
        p = subprocess.Popen(
            ["stdbuf", "-o0", "postmark"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        token = self.cleanup.push("stop postmark", lambda: (p.kill(), p.wait()))
        t0 = time.monotonic()
        p.stdin.write(conf.encode())
        p.stdin.close()
        out = b""
        t_tx = t_del = None
        deadline = t0 + max(600, 100 * self.cfg["pm_tx"])
        fd = p.stdout.fileno()
        while True:
            ready, _, _ = select.select([fd], [], [], 1.0)
            now = time.monotonic()
            if now > deadline:
                raise BenchError(f"postmark ran longer than {deadline - t0:.0f} s:\n{out.decode()[-2000:]}")
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            out += chunk
            if t_tx is None and b"Performing transactions" in out:
                t_tx = now
            if t_del is None and b"Deleting files" in out:
                t_del = now
        rc = p.wait()
        total = time.monotonic() - t0
        self.cleanup.pop(token)
        text = out.decode(errors="replace")
        m = re.search(r"(\d+) seconds of transactions \((\d+) per second\)", text)
        if rc != 0 or not m or t_tx is None or t_del is None:
            raise BenchError(f"postmark failed (exit {rc}):\n{text[-2000:]}")
        return int(m.group(2)), t_del - t_tx, total, text

    def fs_run(self, rep, export, system):
        cfg = self.cfg
        img = self.make_image(system)
        proc, target = self.start_export(system, export, img)
        nbdfuse = None
        if export == "nbd":
            nbdfuse, nbd_dir, file = self.nbdfuse_file(target.uri)
        else:
            file = target.file
        loop = Loop(self.cleanup, file)
        self.note_cmd(("losetup",), ["losetup", "-f", "--show", file])
        mkfs = MKFS + [loop.dev]
        self.note_cmd(("mkfs",), mkfs)
        t_mkfs = timed(mkfs, timeout=900)
        where = self.path("ext4")
        fs = FsMount(self.cleanup, loop.dev, where)
        secs, nbytes = self.make_files(os.path.join(where, "files"), cfg["files"])
        self.record(rep, "fs", export, system, "mkfs", 0, "seconds", t_mkfs, "s")
        self.record(rep, "fs", export, system, "files", 0, "seconds", secs, "s")
        self.record(rep, "fs", export, system, "files", 0, "files_s", cfg["files"] / secs, "files/s")
        self.record(rep, "fs", export, system, "files", 0, "file_bytes", nbytes, "B")
        self.record(rep, "fs", export, system, "files", 0, "size_after", allocated_bytes(img), "B")
        run(["mount", "-o", "remount,sync", where], timeout=120)
        self.note_cmd(("remount",), ["mount", "-o", "remount,sync", where])
        pm_dir = os.path.join(where, "postmark")
        os.mkdir(pm_dir)
        tps, tx_secs, total, _ = self.postmark(pm_dir)
        self.record(rep, "fs", export, system, "postmark", 0, "tps", tps, "tx/s")
        self.record(rep, "fs", export, system, "postmark", 0, "tps_timed", cfg["pm_tx"] / tx_secs, "tx/s")
        self.record(rep, "fs", export, system, "postmark", 0, "seconds", total, "s")
        log(f"  {export} {system}: mkfs {t_mkfs:.2f} s, {cfg['files']} files + sync {secs:.2f} s, "
            f"PostMark {tps} tx/s (timed {cfg['pm_tx'] / tx_secs:.1f}), {total:.1f} s")
        fs.umount()
        loop.detach()
        if nbdfuse:
            self.stop_nbdfuse(nbdfuse, nbd_dir)
        self.stop_export(proc, target, system)
        self.record(rep, "fs", export, system, "postmark", 0, "size_after", allocated_bytes(img), "B")
        self.check_image(system, img, rep, "fs", export)
        os.unlink(img)

    # ---------- metadata, create and open of 1 TiB images

    def median_time(self, args, reps, before=None):
        times = []
        for _ in range(reps):
            if before:
                before()
            times.append(timed(args, timeout=900))
        times.sort()
        return times[len(times) // 2]

    def meta_part(self):
        reps = self.cfg["meta_reps"]
        bases = [("bench", self.base)]
        if self.cfg["big_base"]:
            big = self.path("base-1t.raw")
            with open(big, "wb") as f:
                f.truncate(TiB)
            bases.append(("1t", big))
        img = self.path("meta.img")

        def rm():
            if os.path.exists(img):
                os.unlink(img)

        for base_name, base in bases:
            for system in ("fvd", "fvd-compact", "qcow2", "qcow2-2m"):
                spec = SYSTEMS[system]
                if spec["fmt"] == "fvd":
                    create = [self.fvd, "create", "-q", "-b", base, "-F", "raw"]
                    info = [self.fvd, "info", img]
                else:
                    create = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw"]
                    info = ["qemu-img", "info", img]
                if spec["opts"]:
                    create += ["-o", spec["opts"]]
                create += [img, "1T"]
                self.note_cmd(("meta-create", base_name, system), create)
                t_create = self.median_time(create, reps, before=rm)
                t_open = self.median_time(info, max(reps, 3))
                self.note_cmd(("meta-open", system), info)
                w = f"1t-{base_name}"
                self.record(0, "meta", "-", system, w, 0, "create_s", t_create, "s")
                self.record(0, "meta", "-", system, w, 0, "open_s", t_open, "s")
                self.record(0, "meta", "-", system, w, 0, "file_bytes", allocated_bytes(img), "B")
                if spec["fmt"] == "fvd":
                    out, _ = run([self.fvd, "info", "--output=json", img])
                    data = json.loads(out)["format-specific"]["data"]
                    self.record(0, "meta", "-", system, w, 0, "metadata_bytes", data["metadata-bytes"], "B")
                    self.record(0, "meta", "-", system, w, 0, "block_size", data["block-size"], "B")
                log(f"  1 TiB {system} over the {base_name} base: create {t_create * 1000:.1f} ms, "
                    f"open {t_open * 1000:.1f} ms")
                rm()
        # qcow2 metadata of a fully allocated 1 TiB image: computed L2 and
        # qemu-img measure (L1 + L2 + refcounts).
        for system, cluster, entry in (("qcow2", 64 * KiB, 8), ("qcow2-2m", 2 * MiB, 16)):
            args = ["qemu-img", "measure", "--output=json", "--size", "1T", "-O", "qcow2"]
            if SYSTEMS[system]["opts"]:
                args += ["-o", SYSTEMS[system]["opts"]]
            self.note_cmd(("measure", system), args)
            out, _ = run(args)
            m = json.loads(out)
            self.record(0, "meta", "-", system, "1t-full", 0, "l2_bytes", TiB // cluster * entry, "B")
            self.record(0, "meta", "-", system, "1t-full", 0, "metadata_bytes",
                        m["fully-allocated"] - TiB, "B")
            self.record(0, "meta", "-", system, "1t-full", 0, "empty_bytes", m["required"], "B")

    # ---------- the run

    def machine(self):
        def first(args):
            try:
                out, _ = run(args, check=False, timeout=30)
                return out.strip().splitlines()[0] if out.strip() else ""
            except BenchError:
                return ""

        cpu = ""
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            mem_kib = int(f.readline().split()[1])
        rev, _ = run(["git", "-C", self.root, "rev-parse", "--short=12", "HEAD"], check=False)
        dirty, _ = run(["git", "-C", self.root, "status", "--porcelain", "--untracked-files=no"], check=False)
        pm, _ = run(["postmark"], input="quit\n", check=False)
        return dict(
            nproc=os.cpu_count(),
            mem_gib=round(mem_kib / (1 << 20), 1),
            kernel=os.uname().release,
            cpu=cpu,
            work_fs=self.scratch_note,
            load_before=self.load_before,
            load_after=load_info(),
            # FVD_REV names the revision the binary was built from, when FVD
            # points at a build of another tree (e.g. a clean `git archive HEAD`).
            fvd_rev=os.environ.get("FVD_REV") or (rev.strip() + ("-dirty" if dirty.strip() else "")),
            fvd_version=first([self.fvd, "--version"]),
            qemu_img=first(["qemu-img", "--version"]),
            qsd=first(["qemu-storage-daemon", "--version"]),
            fio=first(["fio", "--version"]),
            nbdfuse=first(["nbdfuse", "--version"]),
            postmark=pm.strip().splitlines()[0] if pm.strip() else "",
        )

    def execute(self):
        args, cfg = self.args, self.cfg
        started = time.monotonic()
        self.load_before = load_info()
        self.prepare()
        systems, exports, parts = args.systems, args.exports, args.parts
        for rep in range(1, cfg["reps"] + 1):
            for part in ("block", "flush", "fs"):
                if part not in parts:
                    continue
                for export in (["nbd"] if part == "flush" else exports):
                    k = (rep - 1) % len(systems)
                    order = systems[k:] + systems[:k]
                    for system in order:
                        log(f"rep {rep}/{cfg['reps']} {part} {export} {system} "
                            f"({time.monotonic() - started:.0f} s)")
                        if part == "block":
                            self.block_run(rep, export, system)
                        elif part == "flush":
                            self.flush_run(rep, system)
                        else:
                            self.fs_run(rep, export, system)
        if "meta" in parts:
            log("metadata, create and open of 1 TiB images")
            self.meta_part()
        return time.monotonic() - started


def parse_args(argv):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = argparse.ArgumentParser(
        prog="bench/run",
        description="FVD side by side with raw and qcow2 through NBD and FUSE exports.",
        epilog="Environment: FVD=path of a built fvd binary (default: cargo build --release "
               "-p fvd-cli into $CARGO_TARGET_DIR or target/). Needs root (FUSE, loop devices).",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="published figures: 2 GiB base, 8 GiB disk, 3 repetitions (default)")
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="development run: 256 MiB base, 1 GiB disk, 1 repetition (< 3 min)")
    p.add_argument("--smoke", action="store_true",
                   help="with --quick: a tiny disk, every system and workload once (the test suite's check)")
    p.add_argument("--out", help="directory for the results (default bench/results)")
    p.add_argument("--reps", type=int, help="repetitions (default 3 full, 1 quick)")
    p.add_argument("--runtime", type=float, help="seconds per fio job (cap)")
    p.add_argument("--cache", choices=["none", "writeback"], default="none",
                   help="host cache mode of every server (default none: O_DIRECT)")
    p.add_argument("--systems", help="comma-separated subset of " + ",".join(SYSTEMS))
    p.add_argument("--exports", help="comma-separated subset of nbd,fuse")
    p.add_argument("--parts", help="comma-separated subset of block,fs,meta")
    p.add_argument("--base-size", help="size of the base (e.g. 1G; default of the mode)")
    p.add_argument("--disk-size", help="virtual disk size (e.g. 2G; default of the mode)")
    p.add_argument("--scratch-size", help="size of the scratch file system (e.g. 6G)")
    p.add_argument("--workdir", help="parent of the scratch directory (default /var/tmp)")
    p.add_argument("--scratch", choices=["auto", "loop", "dir"], default="auto",
                   help="where images live: a scratch ext4 on a loop device (loop), the work "
                        "directory itself (dir), or loop when the host fs has online discard (auto)")
    p.add_argument("--docs", dest="docs", action="store_true", default=None,
                   help="write the report into docs/BENCHMARKS.md (default: only in full mode)")
    p.add_argument("--no-docs", dest="docs", action="store_false")
    p.add_argument("--render", metavar="JSON",
                   help="only rebuild the Markdown (and docs with --docs) from a results JSON")
    a = p.parse_args(argv)
    a.root = root
    a.mode = a.mode or "full"
    if a.smoke and a.mode != "quick":
        p.error("--smoke goes with --quick")

    def subset(value, allowed, name):
        if not value:
            return list(allowed)
        items = [x.strip() for x in value.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad:
            p.error(f"unknown {name}: {', '.join(bad)}")
        return items

    a.systems = subset(a.systems, SYSTEMS, "system") if a.systems else list(DEFAULT_SYSTEMS)
    a.exports = subset(a.exports, EXPORTS, "export")
    a.parts = subset(a.parts, PARTS, "part") if a.parts else list(DEFAULT_PARTS)
    for name in ("base_size", "disk_size", "scratch_size"):
        v = getattr(a, name)
        if v is not None:
            m = re.fullmatch(r"(\d+)([KMGT]?)", v.strip().upper())
            if not m:
                p.error(f"--{name.replace('_', '-')}: not a size: {v}")
            setattr(a, name, int(m.group(1)) * {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}[m.group(2)])
    return a


def preflight(args):
    if os.geteuid() != 0:
        raise BenchError("bench/run needs root (FUSE mounts over files, loop devices, mount)")
    if not os.path.exists("/dev/fuse"):
        raise BenchError("/dev/fuse is missing")
    tools = ["fio", "qemu-img", "qemu-storage-daemon", "nbdfuse", "postmark", "losetup",
             "mkfs.ext4", "mount", "umount", "fusermount3", "stdbuf", "setpriv", "cp", "findmnt"]
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        raise BenchError(
            f"missing tools: {' '.join(missing)} "
            "(apt-get install -y fio postmark nbdkit libnbd-bin fuse3; qemu-utils 10 must be present)"
        )
    out, _ = run(["fio", "--enghelp=nbd"], check=False)
    if "uri" not in out:
        raise BenchError("this fio has no nbd ioengine")


def find_fvd(args):
    fvd = os.environ.get("FVD")
    if not fvd:
        target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(args.root, "target")
        log("building fvd (cargo build --release -p fvd-cli)")
        run(["cargo", "build", "--release", "-q", "-p", "fvd-cli"], timeout=3600,
            env=dict(os.environ, CARGO_TARGET_DIR=target))
        fvd = os.path.join(target, "release", "fvd")
    fvd = os.path.abspath(fvd)
    if not os.access(fvd, os.X_OK):
        raise BenchError(f"no fvd binary at {fvd}")
    return fvd


def main(argv):
    install_signal_handlers()
    args = parse_args(argv)
    out_dir = os.path.abspath(args.out or os.path.join(args.root, "bench", "results"))
    docs = os.path.join(args.root, "docs", "BENCHMARKS.md")
    if args.render:
        with open(args.render) as f:
            doc = json.load(f)
        md = report.markdown(doc)
        sys.stdout.write(md)
        if args.docs:
            report.update_docs(docs, md)
            log(f"updated {docs}")
        return 0

    mode = "smoke" if args.smoke else args.mode
    cfg = dict(MODES[mode])
    if args.reps:
        cfg["reps"] = args.reps
    if args.runtime:
        cfg["runtime"] = args.runtime
        cfg["flush_runtime"] = max(cfg["flush_runtime"], args.runtime)
    if args.base_size:
        cfg["base"] = args.base_size
        cfg["seq"] = min(cfg["seq"], args.base_size // 2)
    if args.disk_size:
        cfg["disk"] = args.disk_size
    if args.scratch_size:
        cfg["scratch"] = args.scratch_size
    cleanup = Cleanup()
    try:
        preflight(args)
        args.fvd = find_fvd(args)
        bench = Bench(args, cfg, cleanup)
        log(f"mode {mode}: base {human(cfg['base'])}, disk {human(cfg['disk'])}, "
            f"{cfg['reps']} repetition(s), fio runtime cap {cfg['runtime']} s, cache={args.cache}, "
            f"systems {','.join(args.systems)}, exports {','.join(args.exports)}, "
            f"parts {','.join(args.parts)}")
        elapsed = bench.execute()
        machine = bench.machine()
    finally:
        errors = cleanup.run_all()
    if errors:
        raise BenchError("cleanup failed: " + "; ".join(errors))

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    doc = dict(
        argv=" ".join(["bench/run"] + [shlex.quote(a) for a in argv]),
        mode=mode,
        date=stamp,
        elapsed_s=round(elapsed, 1),
        config=dict(cfg, cache=args.cache, systems=args.systems, exports=args.exports,
                    parts=args.parts, regions={k: list(v) for k, v in bench.regions.items()}),
        labels={k: v["label"] for k, v in SYSTEMS.items()},
        machine=machine,
        commands=[dict(key=list(k), command=v) for k, v in bench.commands.items()],
        problems=bench.problems,
        rows=bench.rows,
    )
    doc["medians"] = report.medians(bench.rows)
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"bench-{mode}-{stamp}")
    report.write_tsv(base + ".tsv", bench.rows)
    md = report.markdown(doc)
    doc["ratios"] = report.ratio_table(doc)
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(md)
    sys.stdout.write(md)
    log(f"results: {base}.tsv, {base}.json, {base}.md ({elapsed:.0f} s)")
    if bench.problems:
        log("image checks failed; docs/BENCHMARKS.md not updated:")
        for p in bench.problems:
            log(f"  {p}")
        return 1
    complete = (set(DEFAULT_SYSTEMS) <= set(args.systems) and args.exports == EXPORTS
                and set(DEFAULT_PARTS) <= set(args.parts))
    write_docs = args.docs if args.docs is not None else (mode == "full" and complete)
    if mode == "smoke":
        write_docs = False
    if write_docs:
        report.update_docs(docs, md)
        log(f"updated {docs}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        print(f"bench/run: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench/run: interrupted", file=sys.stderr)
        sys.exit(130)
