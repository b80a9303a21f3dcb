#!/usr/bin/env python3
"""Image lifecycle operations: fvd vs qemu-img on the same data.

For each operation, both tools start from identical files: a raw base of
--base bytes (half data, half holes) and an overlay over it (FVD sparse,
FVD compact, qcow2) into which the same scattered writes were made with
fvd io / qemu-io (--written bytes, 64 KiB writes). Only the operation is
timed (wall clock, page cache warm, after a sync); setup is not. Runs are
interleaved (fvd, qcow2, fvd, qcow2...) and medians are reported with the
fvd/qcow2 ratio.

Operations:
  resize-grow    overlay 1/2 the base, grown to twice the base (the part
                 over the base must read zeros)
  resize-shrink  --shrink to a quarter of the base
  commit         into the raw base (the overlay is emptied)
  rebase         safe rebase onto a second base differing in 1/8 of it
  flatten        rebase -b ''

Usage: bench/lifecycle.py [--fvd PATH] [--base BYTES] [--written BYTES]
                          [--runs N] [--dir DIR] [--quick]
"""
import argparse, os, random, shutil, statistics, subprocess, tempfile, time

def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)

def fill_base(path, size, seed, step=4 << 20):
    """Half data (patterned), half holes, in 4 MiB stripes."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, step * 2):
            f.seek(off)
            f.write(bytes([(seed + off // step) % 251 + 1]) * min(step, size - off))

def writes(size, total, seed):
    rnd = random.Random(seed)
    n = total // (64 << 10)
    offs = rnd.sample(range(size // (64 << 10)), min(n, size // (64 << 10)))
    return [f"write -P 0x{(o % 250) + 1:02x} {o * (64 << 10)} 64k" for o in offs]

def io(args, image, cmds):
    for i in range(0, len(cmds), 2000):
        c = []
        for x in cmds[i:i + 2000]:
            c += ["-c", x]
        run(args + c + [image])

def setup(d, kind, a, op):
    """Fresh files in d; returns the overlay path."""
    for n in os.listdir(d):
        os.unlink(os.path.join(d, n))
    base = os.path.join(d, "base.raw")
    shutil.copyfile(a.pristine, base)
    if op == "rebase":
        shutil.copyfile(a.pristine2, os.path.join(d, "new.raw"))
    size = a.base // 2 if op == "resize-grow" else a.base
    cmds = [c for c in a.cmds if int(c.split()[3]) + (64 << 10) <= size]
    img = os.path.join(d, "img." + ("qcow2" if kind == "qcow2" else "fvd"))
    if kind == "qcow2":
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", img, str(size)])
        io(["qemu-io"], img, cmds)
    else:
        opts = ["-o", "compact=on"] if kind == "fvd-compact" else []
        run([a.fvd, "create", "-q", "-b", "base.raw", "-F", "raw"] + opts + [img, str(size)])
        io([a.fvd, "io"], img, cmds)
    run(["sync"])
    return img

def command(kind, a, op, img):
    tool = ["qemu-img"] if kind == "qcow2" else [a.fvd]
    if op == "resize-grow":
        return tool + ["resize", "-q", img, str(a.base * 2)]
    if op == "resize-shrink":
        return tool + ["resize", "-q", "--shrink", img, str(a.base // 4)]
    if op == "commit":
        return tool + ["commit", "-q", img]
    if op == "rebase":
        return tool + ["rebase", "-b", "new.raw", "-F", "raw", img]
    if op == "flatten":
        return tool + ["rebase", "-b", "", img]
    raise ValueError(op)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fvd", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "fvd"))
    ap.add_argument("--base", type=int, default=2 << 30)
    ap.add_argument("--written", type=int, default=256 << 20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.base, a.written, a.runs = 256 << 20, 32 << 20, 3
    with tempfile.TemporaryDirectory(dir=a.dir) as top:
        a.pristine = os.path.join(top, "pristine.raw")
        a.pristine2 = os.path.join(top, "pristine2.raw")
        fill_base(a.pristine, a.base, 1)
        shutil.copyfile(a.pristine, a.pristine2)
        with open(a.pristine2, "r+b") as f:  # differs in 1/8
            for off in range(0, a.base, 8 << 20):
                f.seek(off)
                f.write(b"\x5a" * (1 << 20))
        a.cmds = writes(a.base, a.written, 7)
        work = os.path.join(top, "w")
        os.mkdir(work)
        print(f"# base {a.base >> 20} MiB (half data), {a.written >> 20} MiB written in 64 KiB writes, {a.runs} runs, medians")
        print("| operation | fvd sparse, s | fvd compact, s | qcow2 (qemu-img), s | sparse/qcow2 | compact/qcow2 |")
        print("|---|---|---|---|---|---|")
        for op in ["resize-grow", "resize-shrink", "commit", "rebase", "flatten"]:
            times = {"fvd-sparse": [], "fvd-compact": [], "qcow2": []}
            for _ in range(a.runs):
                for kind in times:
                    img = setup(work, kind, a, op)
                    t0 = time.perf_counter()
                    run(command(kind, a, op, img), cwd=work)
                    times[kind].append(time.perf_counter() - t0)
            m = {k: statistics.median(v) for k, v in times.items()}
            print(f"| {op} | {m['fvd-sparse']:.3f} | {m['fvd-compact']:.3f} | {m['qcow2']:.3f} | "
                  f"{m['fvd-sparse'] / m['qcow2']:.2f}x | {m['fvd-compact'] / m['qcow2']:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
