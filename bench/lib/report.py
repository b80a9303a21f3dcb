"""Medians, ratios, TSV and the Markdown report of bench/run, and the
update of docs/BENCHMARKS.md between marker comments."""

import csv
import statistics

BEGIN = "<!-- bench/run: begin (generated; rerun bench/run --full to replace) -->"
END = "<!-- bench/run: end -->"

MiB = 1 << 20

# Block workloads: (workload, metric, label).
BLOCK_ROWS = [
    ("firstwrite", "iops", "4 KiB random first writes, IOPS"),
    ("overwrite", "iops", "4 KiB random overwrites, IOPS"),
    ("baseread", "iops", "4 KiB random reads of base data, IOPS"),
    ("localread", "iops", "4 KiB random reads of local data, IOPS"),
    ("seqwrite", "mib_s", "1 MiB sequential writes, MiB/s"),
    ("seqread", "mib_s", "1 MiB sequential reads, MiB/s"),
]

# Ratios printed next to the figures: (name, numerator, denominator).
RATIOS = [
    ("FVD / raw", "fvd", "raw-fvd"),
    ("compact / raw", "fvd-compact", "raw-fvd"),
    ("FVD / qcow2", "fvd", "qcow2"),
    ("FVD / qcow2 2M", "fvd", "qcow2-2m"),
    ("raw fvd / raw qsd", "raw-fvd", "raw-qsd"),
]

EXPORT_NAMES = {"nbd": "NBD", "fuse": "FUSE"}


def write_tsv(path, rows):
    cols = ["rep", "part", "export", "system", "workload", "qd", "metric", "value", "unit"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([r[c] for c in cols])


def medians(rows):
    groups = {}
    for r in rows:
        key = (r["part"], r["export"], r["system"], r["workload"], r["qd"], r["metric"])
        groups.setdefault(key, (r["unit"], []))[1].append(r["value"])
    out = []
    for (part, export, system, workload, qd, metric), (unit, vals) in groups.items():
        out.append(dict(part=part, export=export, system=system, workload=workload, qd=qd,
                        metric=metric, unit=unit, median=statistics.median(vals), n=len(vals),
                        min=min(vals), max=max(vals)))
    return out


class Medians:
    def __init__(self, doc):
        self.m = {}
        for r in doc["medians"]:
            key = (r["part"], r["export"], r["system"], r["workload"], r["qd"], r["metric"])
            self.m[key] = r["median"]

    def get(self, part, export, system, workload, qd, metric):
        return self.m.get((part, export, system, workload, qd, metric))


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fnum(v, digits=0):
    if v is None:
        return "-"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def fratio(v):
    return "-" if v is None else f"{v:.2f}x"


def fmib(v):
    if v is None:
        return "-"
    return f"{v / MiB:,.0f}" if v >= 10 * MiB else f"{v / MiB:,.1f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)


def present(doc, part):
    systems = [s for s in doc["config"]["systems"]]
    have = {r["system"] for r in doc["medians"] if r["part"] == part}
    return [s for s in systems if s in have]


def ratio_table(doc):
    """Every ratio of the report (of medians, and within each repetition),
    for the JSON."""
    med = Medians(doc)
    idx = rep_values(doc)
    out = []
    for export in doc["config"]["exports"]:
        for wl, metric, _ in BLOCK_ROWS:
            for qd in (1, 32):
                for name, a, b in RATIOS:
                    v = ratio(med.get("block", export, a, wl, qd, metric),
                              med.get("block", export, b, wl, qd, metric))
                    if v is not None:
                        out.append(dict(part="block", export=export, workload=wl, qd=qd,
                                        ratio=name, value=v,
                                        per_rep=per_rep(idx, "block", export, a, b, wl, qd, metric)))
        for wl, metric in (("files", "files_s"), ("postmark", "tps"), ("postmark", "tps_timed")):
            for name, a, b in RATIOS:
                v = ratio(med.get("fs", export, a, wl, 0, metric), med.get("fs", export, b, wl, 0, metric))
                if v is not None:
                    out.append(dict(part="fs", export=export, workload=f"{wl}:{metric}", qd=0,
                                    ratio=name, value=v,
                                    per_rep=per_rep(idx, "fs", export, a, b, wl, 0, metric)))
    return out


def block_section(doc, med, export):
    systems = present(doc, "block")
    labels = doc["labels"]
    ratios = [r for r in RATIOS if r[1] in systems and r[2] in systems]
    header = ["workload", "QD"] + [labels[s] for s in systems] + [r[0] for r in ratios]
    rows = []
    for wl, metric, label in BLOCK_ROWS:
        for qd in (1, 32):
            vals = {s: med.get("block", export, s, wl, qd, metric) for s in systems}
            if all(v is None for v in vals.values()):
                continue
            rows.append([label, str(qd)] + [fnum(vals[s]) for s in systems]
                        + [fratio(ratio(vals[a], vals[b])) for _, a, b in ratios])
    return table(header, rows)


def fs_section(doc, med):
    systems = present(doc, "fs")
    labels = doc["labels"]
    cfg = doc["config"]
    ratios = [r for r in RATIOS if r[1] in systems and r[2] in systems]
    header = ["workload", "export"] + [labels[s] for s in systems] + [r[0] for r in ratios]
    rows = []
    items = [
        ("files", "files_s", f"create {cfg['files']:,} files of 4-64 KiB + syncfs, files/s", 0),
        ("postmark", "tps", "PostMark on `-o sync` ext4, transactions/s (as printed)", 0),
        ("postmark", "tps_timed", "PostMark transactions/s (phase timed by the harness)", 1),
        ("mkfs", "seconds", "mkfs.ext4, seconds (lower is better; no ratio)", 2),
    ]
    for wl, metric, label, digits in items:
        for export in cfg["exports"]:
            vals = {s: med.get("fs", export, s, wl, 0, metric) for s in systems}
            if all(v is None for v in vals.values()):
                continue
            rats = ["" for _ in ratios] if wl == "mkfs" else [fratio(ratio(vals[a], vals[b])) for _, a, b in ratios]
            rows.append([label, EXPORT_NAMES[export]] + [fnum(vals[s], digits) for s in systems] + rats)
    return table(header, rows)


def space_section(doc, med):
    labels = doc["labels"]
    cfg = doc["config"]
    have = set(present(doc, "block")) | set(present(doc, "fs"))
    systems = [s for s in cfg["systems"] if s in have]
    rows = []
    for export in cfg["exports"]:
        e = EXPORT_NAMES[export]

        def row(label, part, wl, metric, fmt):
            vals = [med.get(part, export, s, wl, 0, metric) for s in systems]
            if any(v is not None for v in vals):
                rows.append([f"{e}: {label}"] + [fmt(v) for v in vals])

        row("bytes written by the 4 KiB first writes, MiB", "block", "firstwrite", "written_bytes", fmib)
        row("image growth during the first writes / bytes written", "block", "firstwrite",
            "growth_per_written", fratio)
        row("image file after the first writes, MiB", "block", "firstwrite", "size_after", fmib)
        row("image file after all block workloads, MiB", "block", "all", "size_after", fmib)
        row("image file after creating the files, MiB", "fs", "files", "size_after", fmib)
        row("image file after PostMark, MiB", "fs", "postmark", "size_after", fmib)
    if not rows:
        return ""
    return table(["allocated on the host (st_blocks x 512)"] + [labels[s] for s in systems], rows)


def meta_section(doc, med):
    labels = doc["labels"]
    rows = []
    bases = {"1t-bench": f"{fmib_g(doc['config']['base'])} data base", "1t-1t": "1 TiB sparse base"}
    for wl, base_label in bases.items():
        for s in ("fvd", "fvd-compact", "qcow2", "qcow2-2m"):
            c = med.get("meta", "-", s, wl, 0, "create_s")
            if c is None:
                continue
            o = med.get("meta", "-", s, wl, 0, "open_s")
            mb = med.get("meta", "-", s, wl, 0, "metadata_bytes")
            bs = med.get("meta", "-", s, wl, 0, "block_size")
            fb = med.get("meta", "-", s, wl, 0, "file_bytes")
            meta = (f"{fmib(mb)} MiB (block {int(bs) // 1024} KiB)" if mb is not None
                    else "grows with data (see below)")
            rows.append([labels[s], base_label, meta, fmib(fb), fnum(c * 1000, 1), fnum(o * 1000, 1)])
    for s in ("qcow2", "qcow2-2m"):
        l2 = med.get("meta", "-", s, "1t-full", 0, "l2_bytes")
        full = med.get("meta", "-", s, "1t-full", 0, "metadata_bytes")
        if l2 is None:
            continue
        rows.append([labels[s], "fully allocated", f"L2 {fmib(l2)} MiB; all metadata {fmib(full)} MiB "
                     "(qemu-img measure)", "-", "-", "-"])
    if not rows:
        return ""
    return table(["1 TiB image", "over", "metadata", "file after create, MiB", "create, ms",
                  "open (`info`), ms"], rows)


def fmib_g(n):
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / MiB:g} MiB"


def rep_values(doc):
    """(part, export, system, workload, qd, metric) -> {rep: value}."""
    idx = {}
    for r in doc["rows"]:
        key = (r["part"], r["export"], r["system"], r["workload"], r["qd"], r["metric"])
        idx.setdefault(key, {})[r["rep"]] = r["value"]
    return idx


def per_rep(idx, part, export, a, b, wl, qd, metric):
    """Ratios a/b within each repetition (both measured in the same round)."""
    va = idx.get((part, export, a, wl, qd, metric), {})
    vb = idx.get((part, export, b, wl, qd, metric), {})
    return [va[k] / vb[k] for k in sorted(va) if k in vb and vb[k]]


def targets_section(doc, med):
    """Each target with the ratio of medians, the ratio within every
    repetition, and whether a miss holds in every repetition (a consistent
    loss) or only in some (within this machine's noise)."""
    cfg = doc["config"]
    idx = rep_values(doc)
    rows = []

    def reps(rs):
        return "/".join(f"{r:.2f}" for r in rs)

    def verdict(value, need, rs):
        if value >= need:
            return "met"
        if len(rs) < 2:
            return "**not met** (one repetition)"
        if all(r < need for r in rs):
            return "**not met** (every repetition)"
        return "**not met** (median only; repetitions straddle it)"

    systems = present(doc, "block")
    if "fvd" in systems and "raw-fvd" in systems:
        for export in cfg["exports"]:
            items = []
            for wl, metric, label in BLOCK_ROWS:
                for qd in (1, 32):
                    r = ratio(med.get("block", export, "fvd", wl, qd, metric),
                              med.get("block", export, "raw-fvd", wl, qd, metric))
                    if r is not None:
                        rs = per_rep(idx, "block", export, "fvd", "raw-fvd", wl, qd, metric)
                        items.append((r, f"{label.split(',')[0]} QD{qd}", rs))
            if not items:
                continue
            below = sorted(x for x in items if x[0] < 0.95)
            always = [x for x in below if x[2] and all(r < 0.95 for r in x[2])]
            lo = min(items, key=lambda x: x[0])
            text = f"lowest {lo[0]:.2f}x ({lo[1]})"
            if below:
                text += "; below 0.95x (median, then per repetition): " + ", ".join(
                    f"{n} {r:.2f}x ({reps(rs)})" for r, n, rs in below)
            if not below:
                v = "met"
            elif cfg["reps"] < 2:
                v = "**not met** (one repetition)"
            elif always:
                v = ("**not met**; in every repetition: "
                     + ", ".join(n for _, n, _ in always))
            else:
                v = "**not met** (medians only; no workload below in every repetition)"
            rows.append([f"FVD >= 0.95x raw on every block workload, {EXPORT_NAMES[export]}", text, v])
    if "fvd" in systems and "qcow2" in systems:
        for export in cfg["exports"]:
            for qd in (1, 32):
                r = ratio(med.get("block", export, "fvd", "firstwrite", qd, "iops"),
                          med.get("block", export, "qcow2", "firstwrite", qd, "iops"))
                if r is None:
                    continue
                rs = per_rep(idx, "block", export, "fvd", "qcow2", "firstwrite", qd, "iops")
                rows.append([f"FVD >= 2.5x qcow2 on 4 KiB first writes, {EXPORT_NAMES[export]} QD{qd}",
                             f"{r:.2f}x ({reps(rs)})", verdict(r, 2.5, rs)])
    fs_systems = present(doc, "fs")
    for other, need in (("raw-fvd", 0.95), ("qcow2", 1.5)):
        if "fvd" not in fs_systems or other not in fs_systems:
            continue
        for export in cfg["exports"]:
            r1 = ratio(med.get("fs", export, "fvd", "postmark", 0, "tps"),
                       med.get("fs", export, other, "postmark", 0, "tps"))
            r2 = ratio(med.get("fs", export, "fvd", "postmark", 0, "tps_timed"),
                       med.get("fs", export, other, "postmark", 0, "tps_timed"))
            if r1 is None:
                continue
            rs = per_rep(idx, "fs", export, "fvd", other, "postmark", 0, "tps")
            name = "raw" if other == "raw-fvd" else "qcow2"
            rows.append([f"PostMark FVD >= {need}x {name}, {EXPORT_NAMES[export]}",
                         f"{r1:.2f}x ({reps(rs)}); timed phase {r2:.2f}x", verdict(r1, need, rs)])
    for s in ("fvd", "fvd-compact"):
        if s not in systems:
            continue
        for export in cfg["exports"]:
            g = med.get("block", export, s, "firstwrite", 0, "growth_per_written")
            if g is None:
                continue
            gs = [v for _, v in sorted(idx.get(("block", export, s, "firstwrite", 0,
                                                 "growth_per_written"), {}).items())]
            ok = g <= 1.1
            rows.append([f"{doc['labels'][s]}: image growth <= 1.1x bytes written by 4 KiB "
                         f"first writes, {EXPORT_NAMES[export]}", f"{g:.2f}x ({reps(gs)})",
                         "met" if ok else "**not met**"])
    if not rows:
        return ""
    return table(["target", "measured: median ratio (per repetition)", "verdict"], rows)


FLUSH_REFS = [("qcow2", "qcow2"), ("raw-qsd-full", "raw full"), ("raw-qsd", "raw sparse")]


def flush_section(doc, med):
    """First writes each followed by a flush: IOPS and ratios per system."""
    systems = present(doc, "flush")
    labels = doc["labels"]
    refs = [(s, n) for s, n in FLUSH_REFS if s in systems]
    idx = rep_values(doc)
    header = ["system", "QD1 IOPS", "QD8 IOPS"]
    for qd in (1, 8):
        header += [f"QD{qd} / {n}" for _, n in refs]
    rows = []
    for s in systems:
        v = {qd: med.get("flush", "nbd", s, "flushwrite", qd, "iops") for qd in (1, 8)}
        row = [labels[s], fnum(v[1]), fnum(v[8])]
        for qd in (1, 8):
            for ref, _ in refs:
                r = ratio(v[qd], med.get("flush", "nbd", ref, "flushwrite", qd, "iops"))
                rs = per_rep(idx, "flush", "nbd", s, ref, "flushwrite", qd, "iops")
                row.append("-" if r is None or s == ref else
                           f"{r:.2f}x ({'/'.join(f'{x:.2f}' for x in rs)})")
        rows.append(row)
    return table(header, rows)


def flush_targets(doc, med):
    """Issue 11's targets: flush-per-write first writes >= 2.5x qcow2 and
    >= 0.8x the preallocated raw file (best FVD configuration), the sparse
    layout without preallocation >= 1.0x the raw sparse file; PostMark >=
    1.0x qcow2 and >= 0.95x the preallocated raw file (speed = inverse of
    the run time)."""
    idx = rep_values(doc)
    rows = []

    def verdict(value, need, rs):
        if value >= need:
            return "met"
        if rs and all(r < need for r in rs):
            return "**not met** (every repetition)"
        return "**not met** (median only; repetitions straddle it)"

    def reps(rs):
        return "/".join(f"{r:.2f}" for r in rs)

    fsys = present(doc, "flush")
    fvds = [s for s in fsys if s.startswith("fvd")]
    checks = [("qcow2", 2.5, fvds), ("raw-qsd-full", 0.8, fvds), ("raw-qsd", 1.0, ["fvd"])]
    for ref, need, mine in checks:
        if ref not in fsys:
            continue
        for s in mine:
            if s not in fsys:
                continue
            for qd in (1, 8):
                r = ratio(med.get("flush", "nbd", s, "flushwrite", qd, "iops"),
                          med.get("flush", "nbd", ref, "flushwrite", qd, "iops"))
                if r is None:
                    continue
                rs = per_rep(idx, "flush", "nbd", s, ref, "flushwrite", qd, "iops")
                rows.append([f"flush per write, {doc['labels'][s]} >= {need}x {doc['labels'][ref]}, QD{qd}",
                             f"{r:.2f}x ({reps(rs)})", verdict(r, need, rs)])
    fs = present(doc, "fs")
    for ref, need in (("qcow2", 1.0), ("raw-qsd-full", 0.95)):
        if ref not in fs:
            continue
        for s in [x for x in fs if x.startswith("fvd")]:
            for export in doc["config"]["exports"]:
                a = med.get("fs", export, s, "postmark", 0, "seconds")
                b = med.get("fs", export, ref, "postmark", 0, "seconds")
                if a is None or b is None:
                    continue
                va = idx.get(("fs", export, s, "postmark", 0, "seconds"), {})
                vb = idx.get(("fs", export, ref, "postmark", 0, "seconds"), {})
                rs = [vb[k] / va[k] for k in sorted(va) if k in vb and va[k]]
                r = b / a
                rows.append([f"PostMark speed {doc['labels'][s]} >= {need}x {doc['labels'][ref]}, "
                             f"{EXPORT_NAMES[export]}", f"{r:.2f}x ({reps(rs)})", verdict(r, need, rs)])
    if not rows:
        return ""
    return table(["target (issue 11)", "measured: median ratio (per repetition)", "verdict"], rows)


def fs_seconds_section(doc, med):
    """PostMark and the file create as run times (what issue 11 quotes)."""
    systems = present(doc, "fs")
    labels = doc["labels"]
    cfg = doc["config"]
    rows = []
    for wl, label in (("files", f"create {cfg['files']:,} files + syncfs, s"),
                      ("postmark", "PostMark on `-o sync` ext4, whole run, s")):
        for export in cfg["exports"]:
            vals = [med.get("fs", export, s, wl, 0, "seconds") for s in systems]
            if all(v is None for v in vals):
                continue
            rows.append([label, EXPORT_NAMES[export]] + [fnum(v, 2) for v in vals])
    if not rows:
        return ""
    return table(["workload (medians, lower is better)", "export"] + [labels[s] for s in systems], rows)


def markdown(doc):
    med = Medians(doc)
    cfg = doc["config"]
    m = doc["machine"]
    mode = doc["mode"]
    out = [BEGIN, ""]
    out.append(
        f"Generated by `{doc.get('argv') or 'bench/run --' + mode}` on {doc['date']} "
        f"({doc['elapsed_s'] / 60:.1f} min). Results: `bench/results/bench-{mode}-{doc['date']}.json` "
        f"(medians, ratios, every command) and `.tsv` (every measurement)."
    )
    out.append("")
    out.append(
        f"Machine: {m['nproc']} vCPUs ({m['cpu']}), {m['mem_gib']} GiB, kernel {m['kernel']}, "
        f"images on {m['work_fs']}. Versions: fvd {m['fvd_rev']}, {m['qemu_img']}, {m['fio']}, "
        f"{m['nbdfuse'] or 'nbdfuse'}, {m['postmark']}. Other work on the machine: at the start "
        f"{m.get('load_before', '?')}; at the end {m.get('load_after', '?')}."
    )
    out.append("")
    regions = cfg["regions"]
    out.append(
        f"Setup: a {fmib_g(cfg['base'])} raw base of random data under a {fmib_g(cfg['disk'])} virtual "
        f"disk; cache mode `{cfg['cache']}` in every server"
        + (" (O_DIRECT on the image and base files)" if cfg["cache"] == "none" else "")
        + f"; {cfg['reps']} repetition(s), systems interleaved (order rotated every repetition), "
        f"medians. fio jobs are capped at {cfg['runtime']:g} s. First writes: random 4 KiB writes, "
        f"each block once, at most 1/{cfg['fw_density']} of the blocks of a base-data region "
        f"({fmib_g(regions['A'][1])} at QD32, {fmib_g(regions['Bw'][1])} at QD1), fresh image every "
        f"repetition. Base reads: a {fmib_g(regions['C'][1])} region never written. Sequential "
        f"writes: up to {fmib_g(cfg['seq'])} beyond the base, then read back; overwrites and local "
        f"reads: random 4 KiB over what the QD32 sequential write wrote."
    )
    out.append("")
    out.append(
        "Systems: FVD (sparse layout) and FVD compact over the raw base; raw served by fvd and by "
        "qemu-storage-daemon (a sparse file holding the base's data only in the region the "
        "base reads read, so that first writes allocate in the host file system as for the "
        "others); qcow2 (64 KiB clusters) and qcow2 `cluster_size=2M,extended_l2=on`, both with "
        "the raw base as backing file, served by qemu-storage-daemon. NBD: `fvd serve` or "
        "qemu-storage-daemon's NBD export on a unix socket, fio's nbd engine. FUSE: `fvd mount` "
        "or qemu-storage-daemon's FUSE export, fio libaio with O_DIRECT on the exported file. "
        "**FVD / raw compares the same server** (fvd serves both); FVD / qcow2 also compares "
        "two servers (see raw fvd / raw qsd)."
    )
    for export in cfg["exports"]:
        if present(doc, "block"):
            out += ["", f"#### Block I/O through {EXPORT_NAMES[export]}", "", block_section(doc, med, export)]
    if present(doc, "flush"):
        out += ["", "#### Flush per write: 4 KiB random first writes into base data, each followed by a "
                "flush (fio `fsync=1`, nbd engine), IOPS (medians; ratios of medians, then per repetition)",
                "", flush_section(doc, med)]
    if present(doc, "fs"):
        out += ["", "#### File systems (loop device + ext4 on the exported file; NBD via `nbdfuse`)", "",
                fs_section(doc, med)]
        s = fs_seconds_section(doc, med)
        if s:
            out += ["", s]
    s = space_section(doc, med)
    if s:
        out += ["", "#### Space", "", s]
    s = meta_section(doc, med)
    if s:
        out += ["", "#### Metadata, create and open of a 1 TiB image (medians)", "", s]
    s = targets_section(doc, med)
    if s:
        out += ["", "#### Targets", "", s]
    s = flush_targets(doc, med)
    if s:
        out += ["", "#### Targets of flush-bound work (issue 11)", "", s]
    notes = []
    if "fuse" in cfg["exports"] and {"raw-qsd", "qcow2", "qcow2-2m"} & set(cfg["systems"]):
        notes.append(
            "qemu-storage-daemon 10.0.2's FUSE export corrupts data under concurrent O_DIRECT "
            "writes (shared/lab notes: bad blocks at QD16); its FUSE QD32 write figures are "
            "speeds of an export that is not correct under that load. The file-system workloads "
            "use a buffered loop device (for every system), with which it is correct."
        )
    if doc.get("problems"):
        notes.append("Image checks failed: " + "; ".join(doc["problems"]))
    if notes:
        out += [""] + [f"Note: {n}" for n in notes]
    out += ["", "<details><summary>Exact commands ($W = the directory holding the images; $T = its parent, see the scratch commands)</summary>", "", "```"]
    for c in doc["commands"]:
        key = " ".join(str(k) for k in c["key"])
        if c["key"][0] == "postmark-config":
            out.append(f"# {key} (stdin of `stdbuf -o0 postmark`)")
            out += c["command"].rstrip("\n").split("\n")
        elif "\n" in c["command"]:
            out.append(f"# {key}")
            out += c["command"].rstrip("\n").split("\n")
        else:
            out.append(f"# {key}")
            out.append(c["command"])
    out += ["```", "", "</details>", "", END, ""]
    return "\n".join(out)


def update_docs(path, md):
    """Replace the generated block of docs/BENCHMARKS.md (or append it)."""
    with open(path) as f:
        text = f.read()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + md.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n## Side by side (bench/run)\n\n" + md
    with open(path, "w") as f:
        f.write(text)
