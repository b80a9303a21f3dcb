#!/usr/bin/env python3
"""Remote bases: copy-on-read, prefetch and profile-directed prefetch.

One base image (random data, so nothing is a hole) is served by nbdkit over
a unix socket through its `rate` filter (200 Mbit/s) and `delay` filter
(2 ms per read), a stand-in for a base on network storage. nbdkit's `log`
filter, closest to the client, records every request that reaches the
base server: "bytes fetched" below are counted there, at the server, the
same way for every system.

Parts (each on fresh images):
  a  read the base twice through a copy-on-write image — 1 GiB sequentially
     (1 MiB reads) and 5,000 random 4 KiB reads (fio, same seed both passes)
     — with FVD (copy-on-read, 4 KiB blocks), qcow2 + QEMU's copy-on-read
     filter (qemu-storage-daemon, 64 KiB clusters) and nbdkit cow + cache
     filters (cache-on-read): bytes fetched vs unique bytes read, per pass;
  b  idle adaptive prefetch of the whole base: its rate vs the link rate
     (the base read directly with fio, 1 MiB reads, 4 in flight);
  c  4 KiB random reads (QD1) of data already in the image, with prefetch
     off and with adaptive prefetch running: latency percentiles;
  d  replay of a boot-like read trace (qemu-io reads with think time), once
     recording a profile, then on fresh images with prefetch off, adaptive,
     and profile (the recorded profile imported); plus the same trace on a
     local raw copy of the base as the lower bound;
  q  (not in the default set) 5,000 random 4 KiB reads at queue depth 32,
     first pass on fresh images, over a second base server with the delay
     filter only (no rate limit: the base's latency, not its bandwidth, is
     what counts): FVD (copy-on-read) vs a qcow2 overlay served by
     qemu-storage-daemon, with and without QEMU's copy-on-read filter.
     --also-fvd LABEL=PATH adds other fvd binaries (say, an older build) to
     the same interleaved rounds.

Usage: bench/prefetch.py [--quick [--smoke]] [--fvd PATH] [--parts abcd|q] [--workdir DIR]
                         [--out DIR] [--rate 200M] [--delay 2ms] [--also-fvd LABEL=PATH]
Needs nbdkit (file plugin; log, delay, rate, cow, cache filters), fio with
the nbd engine, qemu-io, qemu-img, qemu-storage-daemon. Results go to stdout
(markdown) and bench/results/prefetch-<mode>-<stamp>.{json,md}.
"""

import argparse
import datetime
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))

from infra import (  # noqa: E402
    BenchError,
    Cleanup,
    Process,
    fmt_cmd,
    install_signal_handlers,
    log,
    run,
    socket_ready,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

READ_LINE = re.compile(r" Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+) ")


def unique_bytes(reads):
    """Bytes covered by (offset, length) reads, counted in 4 KiB blocks."""
    blocks = set()
    for off, n in reads:
        blocks.update(range(off // (4 * KiB), (off + n + 4 * KiB - 1) // (4 * KiB)))
    return len(blocks) * 4 * KiB


def human(n):
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class BaseServer:
    """nbdkit serving the base file through rate (unless `rate` is None) +
    delay, logging requests."""

    def __init__(self, bench, rate="", name="base"):
        rate = bench.args.rate if rate == "" else rate
        self.sock = bench.path(f"{name}.sock")
        self.logfile = bench.path(f"{name}-requests.log")
        self.uri = f"nbd+unix:///?socket={self.sock}"
        args = ["nbdkit", "-f", "-r", "--exit-with-parent", "-U", self.sock,
                "--filter=log", "--filter=delay"] + (["--filter=rate"] if rate else []) + [
                "file", bench.base, f"logfile={self.logfile}", f"delay-read={bench.args.delay}"]
        if rate:
            args.append(f"rate={rate}")
        bench.note(f"{name} server", args)
        self.proc = Process(bench.cleanup, args, bench.path(f"nbdkit-{name}.log"), f"nbdkit ({name})")
        self.proc.wait_until(lambda: socket_ready(self.sock), "base socket")

    def mark(self):
        """A position in the request log; `fetched` counts from there."""
        try:
            return os.path.getsize(self.logfile)
        except OSError:
            return 0

    def fetched(self, mark):
        """(bytes, requests) read from the base since `mark`."""
        total = reqs = 0
        with open(self.logfile, "rb") as f:
            f.seek(mark)
            for line in f.read().decode(errors="replace").splitlines():
                m = READ_LINE.search(line)
                if m:
                    total += int(m.group(2), 16)
                    reqs += 1
        return total, reqs


class Bench:
    def __init__(self, args):
        self.args = args
        self.cleanup = Cleanup()
        self.dir = tempfile.mkdtemp(prefix="fvd-prefetch.", dir=args.workdir)
        self.cleanup.push("remove workdir", lambda: shutil.rmtree(self.dir, ignore_errors=True))
        self.commands = {}
        self.results = {}
        self.size = args.size
        self.rand_ios = args.rand_ios
        self.fvd = args.fvd
        self.base = self.path("base.raw")
        self.seq = 0

    def path(self, name):
        return os.path.join(self.dir, name)

    def fresh(self, name):
        self.seq += 1
        return self.path(f"{self.seq:02d}-{name}")

    def note(self, what, args):
        self.commands.setdefault(what, fmt_cmd(args).replace(self.dir, "$W"))

    # ---------- setup

    def write_base(self):
        log(f"writing a {human(self.size)} base of random data")
        rng = random.Random(1)
        with open(self.base, "wb") as f:
            left = self.size
            while left:
                n = min(left, 8 * MiB)
                f.write(rng.randbytes(n))
                left -= n
            os.fsync(f.fileno())

    def fvd_image(self, name, extra_opts=None, server=None, fvd=None):
        img = self.fresh(name + ".fvd")
        args = [fvd or self.fvd, "create", "-q", "-b", (server or self.server).uri, "-F", "raw"]
        if extra_opts:
            args += ["-o", extra_opts]
        args.append(img)
        self.note("create fvd", args)
        run(args)
        return img

    def serve_fvd(self, img, extra=(), fvd=None):
        sock = img + ".sock"
        stats = img + ".stats"
        args = [fvd or self.fvd, "serve", img, "-k", sock, "--stats-socket", stats] + list(extra)
        self.note("serve fvd " + " ".join(extra), args)
        p = Process(self.cleanup, args, self.path("fvd-serve.log"), f"fvd serve {os.path.basename(img)}")
        p.wait_until(lambda: socket_ready(sock) and socket_ready(stats), "NBD and stats sockets")
        p.uri = f"nbd+unix:///?socket={sock}"
        p.stats_path = stats
        return p

    def serve_qcow2_cor(self, name):
        return self.serve_qcow2(name, self.server, cor=True)

    def serve_qcow2(self, name, server, cor):
        """A qcow2 overlay over the base served by qemu-storage-daemon,
        through QEMU's copy-on-read filter when `cor`."""
        img = self.fresh(name + ".qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", img, str(self.size)])
        sock = img + ".sock"
        node = "cor" if cor else "ov"
        args = ["qemu-storage-daemon",
                "--blockdev", f"driver=nbd,node-name=base,server.type=unix,server.path={server.sock},read-only=on",
                "--blockdev", f"driver=file,node-name=ovf,filename={img}",
                "--blockdev", "driver=qcow2,node-name=ov,file=ovf,backing=base"]
        if cor:
            args += ["--blockdev", "driver=copy-on-read,node-name=cor,file=ov"]
        args += ["--nbd-server", f"addr.type=unix,addr.path={sock}",
                 "--export", f"type=nbd,id=exp,node-name={node},name={node},writable=on"]
        what = "qcow2 + copy-on-read" if cor else "qcow2 overlay"
        self.note(f"serve {what} (qemu-storage-daemon)", args)
        p = Process(self.cleanup, args, self.path("qsd.log"), f"qemu-storage-daemon ({what})")
        p.wait_until(lambda: socket_ready(sock), "NBD socket")
        p.uri = f"nbd+unix:///{node}?socket={sock}"
        return p

    def serve_nbdkit_cow_cache(self, name):
        sock = self.fresh(name + ".sock")
        args = ["nbdkit", "-f", "--exit-with-parent", "-U", sock, "--filter=cow", "--filter=cache",
                "nbd", f"socket={self.server.sock}", "cache-on-read=true"]
        self.note("serve nbdkit cow + cache", args)
        p = Process(self.cleanup, args, self.path("nbdkit-cow.log"), "nbdkit (cow + cache)")
        p.wait_until(lambda: socket_ready(sock), "NBD socket")
        p.uri = f"nbd+unix:///?socket={sock}"
        return p

    # ---------- clients

    def fio(self, uri, job, label, plus=False):
        """Run one fio job against an NBD URI; return its read-side result
        (with `plus`, its latency histogram too: clat_ns.bins)."""
        jobfile = self.path("fio.job")
        out = self.path("fio.json")
        lines = ["[global]", "ioengine=nbd", f"uri={uri}", "randrepeat=1", "", f"[{label}]"]
        lines += [f"{k}={v}" for k, v in job.items()]
        with open(jobfile, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.commands.setdefault(f"fio-jobfile {label}", "\n".join(lines).replace(self.dir, "$W"))
        if os.path.exists(out):
            os.unlink(out)
        fmt = "json+" if plus else "json"
        run(["fio", f"--output-format={fmt}", f"--output={out}", jobfile], timeout=1800)
        with open(out) as f:
            data = f.read()
        res = json.loads(data[data.index("{"):])["jobs"][0]
        if res.get("error"):
            raise BenchError(f"fio {label} failed with error {res['error']}")
        return res["read"]

    def fio_jobs(self, jobs, common):
        """Run named jobs one after the other (stonewall) in one fio process;
        return each job's read-side result with its latency histogram, and
        under "times" each request's (ms since the job started, latency ns)
        from fio's per-request completion-latency log."""
        jobfile = self.path("fio-jobs.job")
        out = self.path("fio-jobs.json")
        for old in os.listdir(self.dir):
            if old.startswith("lat_clat."):
                os.unlink(self.path(old))
        lines = ["[global]", "ioengine=nbd", "randrepeat=1", "write_lat_log=lat", "log_avg_msec=0"]
        lines += [f"{k}={v}" for k, v in common.items()]
        for name, job in jobs:
            lines += ["", f"[{name}]"] + [f"{k}={v}" for k, v in job.items()]
        with open(jobfile, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.commands.setdefault("fio-jobfile c (first two slices)",
                                 "\n".join(lines[:lines.index(f"[{jobs[2][0]}]") - 1]).replace(self.dir, "$W"))
        if os.path.exists(out):
            os.unlink(out)
        # In the work directory: fio writes each job's exec_prerun/postrun
        # output (NAME.prerun.txt) into its current directory.
        run(["fio", "--output-format=json+", f"--output={out}", jobfile], timeout=1800, cwd=self.dir)
        with open(out) as f:
            data = f.read()
        res = {}
        for j in json.loads(data[data.index("{"):])["jobs"]:
            if j.get("error"):
                raise BenchError(f"fio {j['jobname']} failed with error {j['error']}")
            res[j["jobname"]] = j["read"]
        # fio numbers the per-job logs from 1 in job order.
        for i, (name, _) in enumerate(jobs, 1):
            times = []
            with open(self.path(f"lat_clat.{i}.log")) as f:
                for line in f:
                    ms, ns = line.split(",")[:2]
                    times.append((int(ms), int(ns)))
            os.unlink(self.path(f"lat_clat.{i}.log"))
            res[name]["times"] = times
        return res

    def stats(self, proc):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(proc.stats_path)
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        s.close()
        return json.loads(buf)

    # ---------- part a: bytes fetched, copy-on-read

    def part_a(self):
        log("part a: bytes fetched from the base, two passes")
        seq_job = dict(rw="read", bs="1m", iodepth=1, size=str(self.size))
        rand_job = dict(rw="randread", bs="4k", iodepth=1, size=str(self.size),
                        number_ios=str(self.rand_ios), randseed="4242")
        systems = [
            ("FVD (copy-on-read, 4 KiB blocks)", self.start_fvd_cor),
            ("qcow2 + copy-on-read filter (64 KiB clusters)", self.serve_qcow2_cor),
            ("nbdkit cow + cache (cache-on-read)", self.serve_nbdkit_cow_cache),
        ]
        rows = []
        for case, job, kind in (("sequential 1 MiB reads", seq_job, "seq"),
                                (f"{self.rand_ios} random 4 KiB reads", rand_job, "rand")):
            for system, start in systems:
                proc = start("a")
                passes = []
                for p in (1, 2):
                    iolog = self.path(f"iolog-{p}")
                    if os.path.exists(iolog):
                        os.unlink(iolog)  # fio appends
                    j = dict(job, write_iolog=iolog)
                    mark = self.server.mark()
                    r = self.fio(proc.uri, j, f"a-{kind}-pass{p}")
                    fetched, reqs = self.server.fetched(mark)
                    offsets = self.iolog_reads(iolog)
                    passes.append(dict(fetched=fetched, requests=reqs, seconds=r["runtime"] / 1000,
                                       read=r["io_bytes"], offsets=offsets))
                if passes[0]["offsets"] != passes[1]["offsets"]:
                    raise BenchError(f"{system}: the two passes of {case} read different offsets")
                uniq = unique_bytes(passes[0]["offsets"])
                row = dict(case=case, system=system, unique=uniq)
                for i, p in enumerate(passes, 1):
                    row[f"pass{i}"] = dict(fetched=p["fetched"], requests=p["requests"],
                                           seconds=p["seconds"], ratio=p["fetched"] / uniq)
                if hasattr(proc, "stats_path"):
                    row["fvd-stats"] = self.stats(proc)
                proc.stop()
                log(f"  {case} / {system}: pass 1 fetched {human(row['pass1']['fetched'])} "
                    f"({row['pass1']['ratio']:.2f}x unique) in {row['pass1']['seconds']:.1f} s; "
                    f"pass 2 fetched {human(row['pass2']['fetched'])}")
                rows.append(row)
        self.results["a"] = rows

    def iolog_reads(self, path):
        offs = []
        with open(path) as f:
            for line in f:
                # "file read off len" (v2) or "usec file read off len" (v3).
                parts = line.split()
                if len(parts) >= 4 and parts[-3] == "read":
                    offs.append((int(parts[-2]), int(parts[-1])))
        if not offs:
            raise BenchError(f"fio wrote no reads into {path}")
        return offs

    def start_fvd_cor(self, name, server=None, fvd=None):
        img = self.fvd_image(name, server=server, fvd=fvd)
        return self.serve_fvd(img, ["--prefetch", "off", "--copy-on-read", "on"], fvd=fvd)

    # ---------- part b: idle prefetch vs link rate

    def link_rate(self):
        if "link" not in self.results:
            log("measuring the link: the base read directly, 1 MiB reads, 4 in flight")
            r = self.fio(self.server.uri, dict(rw="read", bs="1m", iodepth=4, size=str(self.size)),
                         "link-rate")
            # nbdkit reads "200M" as 200 * 2^20 bits/s. Its token bucket
            # lets about a second's worth through at full speed after an
            # idle time, so a direct read can beat the nominal rate.
            nominal = parse_size(self.args.rate) / 8
            self.results["link"] = dict(bytes=r["io_bytes"], seconds=r["runtime"] / 1000,
                                        measured=r["io_bytes"] / (r["runtime"] / 1000),
                                        rate=nominal)
            log(f"  link: nominal {nominal / MiB:.1f} MiB/s, direct read "
                f"{self.results['link']['measured'] / MiB:.1f} MiB/s")
        return self.results["link"]["rate"]

    def part_b(self):
        link = self.link_rate()
        log("part b: idle adaptive prefetch")
        img = self.fvd_image("b")
        mark = self.server.mark()
        t0 = time.monotonic()
        proc = self.serve_fvd(img, ["--prefetch", "adaptive"])
        st = self.wait_prefetch(proc, timeout=max(600, 4 * self.size / link))
        secs = time.monotonic() - t0
        fetched, reqs = self.server.fetched(mark)
        proc.stop()
        info = json.loads(run([self.fvd, "info", "--output=json", img])[0])
        rate = self.size / secs
        self.results["b"] = dict(seconds=secs, fetched=fetched, requests=reqs, rate=rate,
                                 link_rate=link, ratio=rate / link, pauses=st["prefetch"]["pauses"],
                                 all_local=info["format-specific"]["data"]["all-local"])
        log(f"  prefetch: {human(self.size)} in {secs:.1f} s = {rate / MiB:.1f} MiB/s "
            f"({rate / link:.2f}x the link), fetched {human(fetched)} in {reqs} requests")

    def wait_prefetch(self, proc, timeout):
        deadline = time.monotonic() + timeout
        while True:
            proc.check_alive()
            st = self.stats(proc)
            state = st["prefetch"]["state"]
            if state == "done":
                return st
            if state == "failed":
                raise BenchError(f"prefetch failed:\n{proc.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"prefetch not done after {timeout:.0f} s: {st}")
            time.sleep(0.05)

    # ---------- part c: local reads while prefetch runs

    def part_c(self):
        log("part c: 4 KiB random reads of local data, prefetch off vs running (interleaved slices)")
        local = self.size // 4
        template = self.fvd_image("c-template")
        proc = self.serve_fvd(template, ["--prefetch", "off"])
        mark = self.server.mark()
        self.fio(proc.uri, dict(rw="write", bs="1m", iodepth=4, size=str(local)), "c-fill")
        proc.stop()
        if self.server.fetched(mark)[0]:
            raise BenchError("whole-block writes fetched base data")
        slices = self.args.c_slices
        slice_secs = max(1, round(self.args.c_runtime / slices))
        runs = []
        for rep in range(self.args.reps):
            # Both servers run side by side; fio reads one of them at a time,
            # in alternating slices, and the prefetching server is stopped
            # (SIGSTOP) during the slices of the other, so machine noise hits
            # both modes alike and prefetch only runs beside its own guest.
            procs = {}
            for mode in ("off", "adaptive"):
                img = self.fresh(f"c-{mode}.fvd")
                run(["cp", "--sparse=always", template, img])
                extra = ["--prefetch", mode]
                if mode == "adaptive":
                    # Cap so that prefetch outlasts the measurement on any link.
                    # The cap is an average since the start: a prefetcher that
                    # stops for the guest catches up in the guest's idle
                    # moments (between slices, and during the other server's
                    # slices), so the budget covers half of it over the slices
                    # of both modes.
                    cap = self.args.c_rate or int((self.size - local) / (self.args.c_runtime * 4))
                    extra += ["--prefetch-rate", str(cap)]
                procs[mode] = self.serve_fvd(img, extra)
            pf_proc = procs["adaptive"]
            st0 = self.stats(pf_proc)["prefetch"]
            done0, yields0 = st0["done-bytes"], st0["yields"]
            dropped0 = st0.get("dropped-bytes", 0)
            pid = pf_proc.proc.pid
            modes = [m for k in range(slices) for m in (("off", "adaptive") if k % 2 == 0 else ("adaptive", "off"))]
            jobs = []
            for i, mode in enumerate(modes):
                # fio connects to a job's server before the job's prerun
                # command, so each slice sets the prefetching server's state
                # for the next one when it ends (it runs while fio starts).
                job = dict(uri=procs[mode].uri, stonewall=1)
                if i == 0 and mode == "off":
                    job["exec_prerun"] = f"kill -STOP {pid}"
                if i + 1 < len(modes):
                    job["exec_postrun"] = f"kill -{'CONT' if modes[i + 1] == 'adaptive' else 'STOP'} {pid}"
                jobs.append((f"c-{mode}-{i // 2}", job))
            try:
                results = self.fio_jobs(jobs, dict(rw="randread", bs="4k", iodepth=1, size=str(local),
                                                   time_based=1, runtime=str(slice_secs)))
            finally:
                os.kill(pid, signal.SIGCONT)
            bins = {"off": {}, "adaptive": {}}
            # Latencies in the first 0.1 s of each slice and after it: where a
            # prefetch round under way when the guest comes back would show.
            early = {"off": [], "adaptive": []}
            late = {"off": [], "adaptive": []}
            ios = {"off": 0, "adaptive": 0}
            secs = {"off": 0.0, "adaptive": 0.0}
            for name, r in results.items():
                mode = name.split("-")[1]
                ios[mode] += r["total_ios"]
                secs[mode] += r["runtime"] / 1000
                for ns, n in r["clat_ns"]["bins"].items():
                    bins[mode][int(ns)] = bins[mode].get(int(ns), 0) + n
                for ms, ns in r["times"]:
                    (early if ms < 100 else late)[mode].append(ns)
            st = self.stats(pf_proc)
            pf = st["prefetch"]
            # The machine's load while the slices ran (other jobs decide much
            # of these figures on a shared machine).
            load = os.getloadavg()[0]
            # Prefetch stops whenever the guest sends a request and resumes
            # once it is quiet: it must still have had work to do, and have
            # stopped for the guest, in this repetition.
            if not (pf["state"] in ("running", "paused") and pf["yields"] > yields0):
                raise BenchError(f"prefetch was not active throughout the measurement: {pf}")
            # The guest goes idle: prefetch must finish.
            t0 = time.monotonic()
            done = self.wait_prefetch(pf_proc, timeout=max(600, 8 * self.size / parse_size(self.args.rate)))
            finish = time.monotonic() - t0
            for mode in ("off", "adaptive"):
                procs[mode].stop()
                b = bins[mode]
                runs.append(dict(mode=mode, rep=rep, iops=ios[mode] / secs[mode],
                                 p50_us=percentile(b, 50) / 1000, p99_us=percentile(b, 99) / 1000,
                                 p999_us=percentile(b, 99.9) / 1000,
                                 first_p99_us=sample_percentile(early[mode], 99) / 1000,
                                 rest_p99_us=sample_percentile(late[mode], 99) / 1000,
                                 first_iops=len(early[mode]) / (0.1 * slices),
                                 mean_us=sum(ns * n for ns, n in b.items()) / max(1, sum(b.values())) / 1000,
                                 prefetched=pf["done-bytes"] - done0 if mode == "adaptive" else 0,
                                 yields=pf["yields"] - yields0 if mode == "adaptive" else 0,
                                 dropped=pf.get("dropped-bytes", 0) - dropped0 if mode == "adaptive" else 0,
                                 load=load,
                                 finish_seconds=finish if mode == "adaptive" else None,
                                 done_state=done["prefetch"]["state"] if mode == "adaptive" else None))
            off, ad = runs[-2], runs[-1]
            log(f"  rep {rep}: off {off['iops']:.0f} IOPS p99 {off['p99_us']:.1f} us; adaptive "
                f"{ad['iops']:.0f} IOPS p99 {ad['p99_us']:.1f} us ({ad['iops'] / off['iops']:.2f}x IOPS, "
                f"{ad['p99_us'] / off['p99_us']:.2f}x p99); prefetched {human(ad['prefetched'])} meanwhile, "
                f"the rest in {finish:.1f} s once idle; load {load:.1f}; p99 in the slices' first 0.1 s "
                f"off {off['first_p99_us']:.1f} us, adaptive {ad['first_p99_us']:.1f} us")

        reps = [(a, b) for a, b in zip(runs[::2], runs[1::2])]
        self.results["c"] = dict(runs=runs, slices=slices, slice_seconds=slice_secs,
                                 iops_ratios=[b["iops"] / a["iops"] for a, b in reps],
                                 p99_ratios=[b["p99_us"] / a["p99_us"] for a, b in reps],
                                 p99_ratio=max(b["p99_us"] / a["p99_us"] for a, b in reps),
                                 iops_ratio=min(b["iops"] / a["iops"] for a, b in reps),
                                 p50_ratio=max(b["p50_us"] / a["p50_us"] for a, b in reps))

    # ---------- part d: boot-like trace

    def boot_trace(self):
        """Reads as a booting guest issues them: files read in runs of 64-128
        KiB requests, scattered small reads, think time between them."""
        rng = random.Random(7)
        ops = []
        blocks = self.size // (4 * KiB)
        for _ in range(self.args.trace_ops):
            if rng.random() < 0.35:
                off = rng.randrange(blocks) * 4 * KiB
                for _ in range(rng.randint(2, 8)):
                    n = rng.choice((64, 128)) * KiB
                    if off + n > self.size:
                        break
                    ops.append(f"read {off} {n}")
                    off += n
            else:
                n = rng.choice((4, 4, 8, 16, 32)) * KiB
                off = rng.randrange(blocks - 8) * 4 * KiB
                ops.append(f"read {off} {n}")
            think = int(rng.expovariate(1 / self.args.think_ms))
            if think:
                ops.append(f"sleep {think}")
        return ops

    def replay(self, uri, trace_file):
        args = ["qemu-io", "-r", "-f", "raw", uri]
        self.note("replay trace", args + ["<", "$W/trace.qemu-io"])
        with open(trace_file) as f:
            t = time.monotonic()
            p = subprocess.run(args, stdin=f, capture_output=True, text=True, timeout=1800)
            secs = time.monotonic() - t
        if p.returncode != 0 or "error" in p.stdout.lower() or "error" in p.stderr.lower():
            raise BenchError(f"trace replay failed: {(p.stdout + p.stderr)[-1500:]}")
        return secs

    def part_d(self):
        log("part d: boot-like trace replay")
        ops = self.boot_trace()
        trace = self.path("trace.qemu-io")
        with open(trace, "w") as f:
            f.write("\n".join(ops + ["quit"]) + "\n")
        reads = [o for o in ops if o.startswith("read")]
        uniq = unique_bytes([(int(o.split()[1]), int(o.split()[2])) for o in reads])
        think = sum(int(o.split()[1]) for o in ops if o.startswith("sleep")) / 1000
        info = dict(reads=len(reads), unique=uniq, think_seconds=think)
        log(f"  trace: {len(reads)} reads, {human(info['unique'])} unique, {think:.1f} s think time")

        # Lower bound: the same trace on a local copy of the base.
        proc = self.serve_fvd_raw()
        local = self.replay(proc.uri, trace)
        proc.stop()

        # Record the profile on a first "boot".
        rec = self.fvd_image("d-record")
        proc = self.serve_fvd(rec, ["--prefetch", "off", "--record-profile"])
        mark = self.server.mark()
        recorded = self.replay(proc.uri, trace)
        fetched_rec = self.server.fetched(mark)[0]
        proc.stop()
        profile = self.path("boot.profile")
        run([self.fvd, "profile", "export", rec, profile])
        self.note("profile export", [self.fvd, "profile", "export", rec, profile])

        runs = []
        for rep in range(self.args.reps):
            for mode in ("off", "adaptive", "profile"):
                img = self.fvd_image(f"d-{mode}")
                if mode == "profile":
                    args = [self.fvd, "profile", "import", img, profile]
                    self.note("profile import", args)
                    run(args)
                proc = self.serve_fvd(img, ["--prefetch", mode])
                mark = self.server.mark()
                secs = self.replay(proc.uri, trace)
                st = self.stats(proc)
                proc.stop()
                fetched, reqs = self.server.fetched(mark)
                runs.append(dict(mode=mode, rep=rep, seconds=secs, prefetched=st["prefetch"]["done-bytes"],
                                 guest_fetch_bytes=st["copy-on-read-bytes"]))
                log(f"  prefetch {mode} rep {rep}: {secs:.2f} s (local copy {local:.2f} s); "
                    f"prefetched {human(st['prefetch']['done-bytes'])}")
        self.results["d"] = dict(trace=info, local_seconds=local, record_seconds=recorded,
                                 record_fetched=fetched_rec, runs=runs)

    # ---------- part q: random reads at queue depth 32

    def part_q(self):
        log(f"part q: {self.rand_ios} random 4 KiB reads at QD32, first pass, base with delay only")
        base = BaseServer(self, rate=None, name="base-q")
        systems = [(f"{label} (copy-on-read)", "fvd", binary)
                   for label, binary in [("FVD", self.fvd)] + self.args.also_fvd]
        systems += [("qcow2 overlay (qemu-storage-daemon)", "qsd", False),
                    ("qcow2 + copy-on-read filter", "qsd", True)]
        job = dict(rw="randread", bs="4k", iodepth=32, size=str(self.size),
                   number_ios=str(self.rand_ios), randseed="4242")
        runs = []
        for rep in range(self.args.reps):
            k = rep % len(systems)
            for system, kind, opt in systems[k:] + systems[:k]:
                if kind == "fvd":
                    proc = self.start_fvd_cor("q", server=base, fvd=opt)
                else:
                    proc = self.serve_qcow2("q", base, cor=opt)
                iolog = self.path("iolog-q")
                if os.path.exists(iolog):
                    os.unlink(iolog)
                mark = base.mark()
                r = self.fio(proc.uri, dict(job, write_iolog=iolog), "q-randread-qd32")
                fetched, reqs = base.fetched(mark)
                proc.stop()
                uniq = unique_bytes(self.iolog_reads(iolog))
                runs.append(dict(system=system, rep=rep, seconds=r["runtime"] / 1000, iops=r["iops"],
                                 fetched=fetched, requests=reqs, unique=uniq))
                log(f"  {system} rep {rep}: {runs[-1]['seconds']:.3f} s, {r['iops']:.0f} IOPS, "
                    f"fetched {human(fetched)} ({fetched / uniq:.2f}x unique)")
        base.proc.stop()

        def median(v):
            v = sorted(v)
            return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

        summary = []
        for system, _, _ in systems:
            mine = [x for x in runs if x["system"] == system]
            summary.append(dict(system=system, seconds=median([x["seconds"] for x in mine]),
                                iops=median([x["iops"] for x in mine]),
                                fetched=median([x["fetched"] for x in mine]),
                                unique=mine[0]["unique"]))
        ref = next(x["seconds"] for x in summary if x["system"].startswith("qcow2 overlay"))
        for x in summary:
            x["vs_qcow2"] = x["seconds"] / ref
        self.results["q"] = dict(runs=runs, summary=summary)

    def serve_fvd_raw(self):
        sock = self.fresh("raw.sock")
        args = [self.fvd, "serve", "-f", "raw", "-r", self.base, "-k", sock]
        p = Process(self.cleanup, args, self.path("fvd-serve.log"), "fvd serve (raw base)")
        p.wait_until(lambda: socket_ready(sock), "NBD socket")
        p.uri = f"nbd+unix:///?socket={sock}"
        return p

    # ---------- report

    def report(self):
        r = self.results
        out = []
        out.append(f"Base: {human(self.size)} of random data behind nbdkit `rate={self.args.rate}` "
                   f"(bits/s) + `delay-read={self.args.delay}` (part q: the delay only); bytes fetched "
                   "counted by nbdkit's log filter at the base server.")
        if "link" in r:
            out.append(f"Link rate: nominal {r['link']['rate'] / MiB:.1f} MiB/s; the whole base read "
                       f"directly (1 MiB x 4 in flight) ran at {r['link']['measured'] / MiB:.1f} MiB/s "
                       "(nbdkit's token bucket lets a burst through after idle time).")
        if "a" in r:
            out += ["", "#### (a) Bytes fetched from the base, read twice", "",
                    "| case | system | unique bytes | pass 1 fetched | x unique | requests | pass 1 s "
                    "| pass 2 fetched | pass 2 s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
            for row in r["a"]:
                p1, p2 = row["pass1"], row["pass2"]
                out.append(f"| {row['case']} | {row['system']} | {human(row['unique'])} | "
                           f"{human(p1['fetched'])} | {p1['ratio']:.2f}x | {p1['requests']} | "
                           f"{p1['seconds']:.1f} | {human(p2['fetched'])} | {p2['seconds']:.1f} |")
        if "b" in r:
            b = r["b"]
            out += ["", "#### (b) Idle adaptive prefetch", "",
                    f"{human(self.size)} prefetched in {b['seconds']:.1f} s = {b['rate'] / MiB:.1f} MiB/s, "
                    f"**{b['ratio']:.2f}x the nominal link rate** (target >= 0.80), "
                    f"{b['rate'] / r['link']['measured']:.2f}x the direct read; fetched {human(b['fetched'])} "
                    f"in {b['requests']} requests, {b['pauses']} pauses; image all-local afterwards: "
                    f"{b['all_local']}."]
        if "c" in r:
            c = r["c"]
            out += ["", "#### (c) 4 KiB random reads of local data (QD1) while prefetch runs", "",
                    f"Each repetition: {c['slices']} slices of {c['slice_seconds']} s per mode, alternating "
                    "between a server without prefetch and one with adaptive prefetch (stopped with SIGSTOP "
                    "during the other's slices); figures over all slices of a mode.", "",
                    "| rep | prefetch | IOPS | x off | p50 us | p99 us | x off | p99.9 us | prefetched meanwhile "
                    "| fetched but dropped for the guest | stops for the guest | rest done once idle | load "
                    "| first 0.1 s of the slices: IOPS, p99 us | after it: p99 us |",
                    "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for a, b in zip(c["runs"][::2], c["runs"][1::2]):
                for x in (a, b):
                    extra = (f"{human(x['prefetched'])} | {human(x['dropped'])} | {x['yields']} | "
                             f"{x['finish_seconds']:.1f} s" if x["mode"] == "adaptive" else "- | - | - | -")
                    out.append(f"| {x['rep']} | {x['mode']} | {x['iops']:.0f} | {x['iops'] / a['iops']:.2f}x | "
                               f"{x['p50_us']:.1f} | {x['p99_us']:.1f} | {x['p99_us'] / a['p99_us']:.2f}x | "
                               f"{x['p999_us']:.1f} | {extra} | {x['load']:.1f} | "
                               f"{x['first_iops']:.0f}, {x['first_p99_us']:.1f} | {x['rest_p99_us']:.1f} |")
            out += ["", f"Worst repetition: IOPS with prefetch running / without **{c['iops_ratio']:.2f}x** "
                    f"(target >= 0.90), p99 **{c['p99_ratio']:.2f}x** (target <= 1.10); p50 {c['p50_ratio']:.2f}x."]
        if "d" in r:
            d = r["d"]
            t = d["trace"]
            out += ["", "#### (d) Boot-like trace replay", "",
                    f"Trace: {t['reads']} reads, {human(t['unique'])} unique, {t['think_seconds']:.1f} s of "
                    f"think time. Local raw copy of the base (lower bound): {d['local_seconds']:.2f} s; "
                    f"recording run: {d['record_seconds']:.2f} s.", "",
                    "| prefetch | rep | seconds | x local | prefetched during the run |",
                    "|---|---:|---:|---:|---:|"]
            for x in d["runs"]:
                out.append(f"| {x['mode']} | {x['rep']} | {x['seconds']:.2f} | "
                           f"{x['seconds'] / d['local_seconds']:.2f}x | {human(x['prefetched'])} |")
        if "q" in r:
            out += ["", f"#### (q) {self.rand_ios} random 4 KiB reads at QD32, first pass "
                    f"(base: delay-read={self.args.delay}, no rate limit)", "",
                    "| system | seconds (median) | IOPS | fetched | x unique | time vs qcow2 overlay |",
                    "|---|---:|---:|---:|---:|---:|"]
            for x in r["q"]["summary"]:
                out.append(f"| {x['system']} | {x['seconds']:.3f} | {x['iops']:.0f} | {human(x['fetched'])} | "
                           f"{x['fetched'] / x['unique']:.2f}x | {x['vs_qcow2']:.2f}x |")
            out += ["", "Every run: " + "; ".join(f"{x['system']} rep {x['rep']} {x['seconds']:.3f} s"
                                                   for x in r["q"]["runs"]) + "."]
        out += ["", "Commands ($W = the work directory):", "", "```"]
        for k, v in self.commands.items():
            out.append(f"# {k}")
            out.append(v)
        out.append("```")
        return "\n".join(out) + "\n"


def percentile(bins, pct):
    """The `pct` percentile of a fio latency histogram {ns: count}."""
    total = sum(bins.values())
    want = total * pct / 100
    seen = 0
    for ns in sorted(bins):
        seen += bins[ns]
        if seen >= want:
            return ns
    return 0


def sample_percentile(values, pct):
    """The `pct` percentile of a list of latencies."""
    if not values:
        return 0
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * pct / 100))]


def parse_size(s):
    s = s.strip().upper()
    mult = {"K": KiB, "M": MiB, "G": GiB}.get(s[-1:], 1)
    return int(float(s.rstrip("KMG")) * mult)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="256 MiB base, 1,000 random reads, short runs")
    p.add_argument("--fvd", default=None, help="the fvd binary (default: build it with cargo)")
    p.add_argument("--parts", default="abcd")
    p.add_argument("--workdir", default="/var/tmp")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--rate", default="200M", help="nbdkit rate filter, bits per second")
    p.add_argument("--delay", default="2ms", help="nbdkit delay filter, per read")
    p.add_argument("--c-rate", type=int, default=None,
                   help="part c: prefetch rate cap in bytes/s (default: outlast the measurement)")
    p.add_argument("--c-runtime", type=int, default=None, help="part c: seconds per mode and repetition")
    p.add_argument("--c-slices", type=int, default=None,
                   help="part c: alternating slices per mode and repetition (default 5 quick, 10 full)")
    p.add_argument("--reps", type=int, default=None, help="repetitions of parts c, d and q")
    p.add_argument("--also-fvd", action="append", default=[], metavar="LABEL=PATH",
                   help="part q: another fvd binary to measure in the same rounds")
    p.add_argument("--smoke", action="store_true",
                   help="with --quick: a 32 MiB base and tiny runs, to test the harness (~30 s)")
    args = p.parse_args()
    try:
        args.also_fvd = [tuple(x.split("=", 1)) for x in args.also_fvd]
        assert all(len(x) == 2 for x in args.also_fvd)
    except AssertionError:
        sys.exit("bench/prefetch.py: --also-fvd takes LABEL=PATH")
    args.size = 256 * MiB if args.quick else GiB
    args.rand_ios = 1000 if args.quick else 5000
    args.c_runtime = args.c_runtime or (5 if args.quick else 20)
    args.c_slices = args.c_slices or (5 if args.quick else 10)
    args.reps = args.reps or (1 if args.quick else 2)
    args.trace_ops = 300 if args.quick else 1200
    args.think_ms = 12
    if args.smoke:
        args.quick, args.reps = True, 1
        args.size, args.rand_ios, args.c_runtime, args.trace_ops, args.think_ms = 32 * MiB, 200, 2, 60, 2
        args.c_slices = 2
    if args.fvd is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        run(["cargo", "build", "--release", "-q", "-p", "fvd-cli"], timeout=3600)
        args.fvd = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target")),
                                "release", "fvd")
    for tool in ("nbdkit", "fio", "qemu-io", "qemu-img", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/prefetch.py: {tool} is not installed")
    install_signal_handlers()
    bench = Bench(args)
    # Temporary files of every child (nbdkit's cow overlay and cache) go
    # into the work directory, removed at the end.
    os.environ["TMPDIR"] = bench.dir
    try:
        bench.write_base()
        bench.server = BaseServer(bench)
        started = time.monotonic()
        for part in args.parts:
            getattr(bench, f"part_{part}")()
        text = bench.report()
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        mode = "smoke" if args.smoke else "quick" if args.quick else "full"
        os.makedirs(args.out, exist_ok=True)
        base = os.path.join(args.out, f"prefetch-{mode}-{stamp}")
        with open(base + ".json", "w") as f:
            json.dump(dict(args={k: v for k, v in vars(args).items()}, results=bench.results,
                           seconds=time.monotonic() - started), f, indent=1, default=str)
        with open(base + ".md", "w") as f:
            f.write(text)
        print(text)
        log(f"results: {base}.{{json,md}}")
    except BenchError as e:
        log(f"FAILED: {e}")
        sys.exit(1)
    finally:
        bench.cleanup.run_all()


if __name__ == "__main__":
    main()
