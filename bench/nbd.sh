#!/usr/bin/env bash
# NBD server benchmark: fio's nbd engine (libnbd) over a unix socket against
#   fvd        `fvd serve` on an FVD image over a raw base filled with data
#   fvd-raw    `fvd serve -f raw` on a raw file
#   qsd-raw    qemu-storage-daemon exporting a raw file
#   qsd-qcow2  qemu-storage-daemon exporting a qcow2 image
#   qsd-qcow2b qemu-storage-daemon exporting a qcow2 image over the same raw base
#   fvd-enc    `fvd serve` on an encrypted FVD image (LUKS1, AES-256-XTS) over
#              the base; its 4K random reads read encrypted data in the image
#              (converted from the base), not the plain base
#   qsd-qcow2b-luks  qemu-storage-daemon on a qcow2 image with LUKS encryption
#              (encrypt.format=luks) over the same base
#   (the last two only when named with --systems)
# Workloads: 4 KiB random first writes across the whole disk (fresh image for
# every run), 4 KiB random reads of the base range, 1 MiB sequential writes
# (fresh image), 1 MiB sequential reads (`seqread`, not in the default set:
# fvd reads an FVD image holding the data itself, made by `fvd convert`;
# the others a copy of the base); at queue depth 1 and 32 (seqread: pass
# e.g. --qd "1 8"); cache writeback and none (O_DIRECT;
# qemu-storage-daemon cache.direct=off/on). Runs are interleaved (every
# system once per round, order rotated), medians over the rounds, and
# paired ratios (A/B per round, median over rounds) of fvd, fvd-raw against
# qsd-raw and of each build against the other (FVD_B).
#
# Usage: bench/nbd.sh [--quick] [--runtime S] [--reps N] [--cache writeback|none|both]
#                     [--systems "fvd fvd-raw ..."] [--workloads "randwrite randread seqwrite seqread"]
#                     [--qd "1 32"]
#   --quick: 256 MiB base, 1 GiB disk, 2 s runs, 1 round, writeback only (< 2 min).
#   Default: 2 GiB base, 8 GiB disk, 10 s runs, 3 rounds, both cache modes.
# Environment: FVD=path to a release fvd binary (else built with cargo),
#   FVD_B=path to a second fvd binary (an A/B of two builds: the systems
#   fvd-b and fvd-raw-b run it, on images of their own),
#   BENCH_DIR=scratch directory (default /tmp/fvd-nbd-bench).
# Output: bench/results/nbd-<mode>-<date>.tsv (every run) and .json (medians),
#   and a Markdown table on stdout.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=full
RUNTIME=10
REPS=3
CACHES="writeback none"
QDS="1 32"
SYSTEMS="fvd fvd-raw qsd-raw qsd-qcow2 qsd-qcow2b"
WORKLOADS="randwrite randread seqwrite"
BASE_SIZE=2G
DISK_SIZE=8G
READ_SIZE=2G

while [ $# -gt 0 ]; do
    case "$1" in
        --quick) MODE=quick; RUNTIME=2; REPS=1; CACHES=writeback; BASE_SIZE=256M; DISK_SIZE=1G; READ_SIZE=256M ;;
        --runtime) RUNTIME=$2; shift ;;
        --reps) REPS=$2; shift ;;
        --cache) case "$2" in both) CACHES="writeback none" ;; *) CACHES=$2 ;; esac; shift ;;
        --systems) SYSTEMS=$2; shift ;;
        --workloads) WORKLOADS=$2; shift ;;
        --qd) QDS=$2; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "nbd.sh: unknown argument $1" >&2; exit 1 ;;
    esac
    shift
done

for tool in fio qemu-storage-daemon qemu-img python3; do
    command -v "$tool" >/dev/null || { echo "nbd.sh: $tool is required (apt-get install -y fio qemu-utils)" >&2; exit 1; }
done

if [ -z "${FVD:-}" ]; then
    (cd "$ROOT" && cargo build --release -q -p fvd-cli)
    FVD="${CARGO_TARGET_DIR:-$ROOT/target}/release/fvd"
fi
[ -x "$FVD" ] || { echo "nbd.sh: no fvd binary at $FVD" >&2; exit 1; }

WORK=${BENCH_DIR:-/tmp/fvd-nbd-bench}
mkdir -p "$WORK" "$ROOT/bench/results"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
TSV="$ROOT/bench/results/nbd-$MODE-$STAMP.tsv"
JSON="$ROOT/bench/results/nbd-$MODE-$STAMP.json"
SOCK="$WORK/s.sock"
PW="$WORK/passphrase"
printf 'bench passphrase' > "$PW"
SERVER_PID=

cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

# The base: data everywhere (random bytes, so nothing is detected as zero).
BASE="$WORK/base-$BASE_SIZE.raw"
if [ ! -f "$BASE" ]; then
    echo "# creating $BASE_SIZE base $BASE" >&2
    head -c "$BASE_SIZE" /dev/urandom > "$BASE.tmp" && mv "$BASE.tmp" "$BASE"
fi

is_read() { [ "$1" = randread ] || [ "$1" = seqread ]; }

# Image for (system, workload): fresh for writes, prepared once for reads.
prepare() {
    local sys=$1 wl=$2 img FVD=$FVD wl_tag=
    # The second build writes images of its own; read images are shared.
    case "$sys" in *-b) FVD=$FVD_B; sys=${sys%-b}; is_read "$wl" || wl_tag=-b ;; esac
    case "$sys" in
        fvd) img="$WORK/$wl$wl_tag.fvd" ;;
        fvd-raw|qsd-raw) img="$WORK/$wl-$sys$wl_tag.raw" ;;
        qsd-qcow2|qsd-qcow2b|qsd-qcow2b-luks) img="$WORK/$wl-$sys.qcow2" ;;
        fvd-enc) img="$WORK/$wl-enc$wl_tag.fvd" ;;
    esac
    if is_read "$wl" && [ -f "$img" ]; then echo "$img"; return; fi
    rm -f "$img"
    case "$sys" in
        fvd)
            if [ "$wl" = seqread ]; then
                # The data in the image itself (fully local), READ_SIZE long.
                "$FVD" convert -f raw -O fvd "$BASE" "$img" >/dev/null
            else
                "$FVD" create -q -b "$BASE" -F raw "$img" "$DISK_SIZE"
            fi ;;
        fvd-raw|qsd-raw)
            if is_read "$wl"; then cp --sparse=always "$BASE" "$img"; fi
            truncate -s "$DISK_SIZE" "$img" ;;
        qsd-qcow2)
            if is_read "$wl"; then
                qemu-img convert -q -f raw -O qcow2 "$BASE" "$img" && qemu-img resize -q "$img" "$DISK_SIZE"
            else
                qemu-img create -q -f qcow2 "$img" "$DISK_SIZE"
            fi ;;
        qsd-qcow2b) qemu-img create -q -f qcow2 -b "$BASE" -F raw "$img" "$DISK_SIZE" ;;
        fvd-enc)
            local enc="encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10"
            if [ "$wl" = randread ]; then
                "$FVD" --object "secret,id=k,file=$PW" convert -f raw -O fvd -o "$enc" "$BASE" "$img"
            else
                "$FVD" --object "secret,id=k,file=$PW" create -q -o "$enc" -b "$BASE" -F raw "$img" "$DISK_SIZE"
            fi ;;
        qsd-qcow2b-luks)
            qemu-img create -q -f qcow2 --object "secret,id=k,file=$PW" \
                -o encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10 \
                -b "$BASE" -F raw "$img" "$DISK_SIZE" ;;
    esac
    echo "$img"
}

start_server() {
    local sys=$1 img=$2 cache=$3 direct aio FVD=$FVD
    case "$sys" in *-b) FVD=$FVD_B; sys=${sys%-b} ;; esac
    rm -f "$SOCK"
    if [ "$cache" = none ]; then direct=on; aio=native; else direct=off; aio=threads; fi
    case "$sys" in
        fvd) "$FVD" serve -x disk --cache="$cache" --socket "$SOCK" "$img" 2>>"$WORK/server.log" & ;;
        fvd-raw) "$FVD" serve -f raw -x disk --cache="$cache" --socket "$SOCK" "$img" 2>>"$WORK/server.log" & ;;
        fvd-enc) "$FVD" --object "secret,id=k,file=$PW" serve -x disk --cache="$cache" --socket "$SOCK" "$img" 2>>"$WORK/server.log" & ;;
        qsd-*)
            local fmt=raw extra=""
            case "$sys" in qsd-qcow2*) fmt=qcow2 ;; esac
            case "$sys" in *-luks) extra=",encrypt.format=luks,encrypt.key-secret=k" ;; esac
            qemu-storage-daemon --object "secret,id=k,file=$PW" \
                --blockdev "driver=file,filename=$img,node-name=f,cache.direct=$direct,aio=$aio,discard=unmap" \
                --blockdev "driver=$fmt,file=f,node-name=d,discard=unmap$extra" \
                --nbd-server "addr.type=unix,addr.path=$SOCK" \
                --export type=nbd,id=e,node-name=d,name=disk,writable=on 2>>"$WORK/server.log" & ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 200); do [ -S "$SOCK" ] && return 0; sleep 0.05; done
    echo "nbd.sh: $sys did not start (see $WORK/server.log)" >&2
    exit 1
}

# SIGTERM (clean close, flushes) for images that are kept; SIGKILL for
# images about to be deleted: deleting them drops their dirty pages instead
# of writing them back, which keeps one run's writeback out of the next.
stop_server() {
    kill "-$1" "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}

run_fio() {
    local wl=$1 qd=$2 out=$3 rw bs size
    case "$wl" in
        randwrite) rw=randwrite; bs=4k; size=$DISK_SIZE ;;
        randread) rw=randread; bs=4k; size=$READ_SIZE ;;
        seqwrite) rw=write; bs=1M; size=$DISK_SIZE ;;
        seqread) rw=read; bs=1M; size=$READ_SIZE ;;
    esac
    fio --name=nbd --ioengine=nbd --uri="nbd+unix:///disk?socket=$SOCK" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$size" \
        --time_based --runtime="$RUNTIME" --ramp_time=0 \
        --output-format=json --output="$out" >/dev/null 2>>"$WORK/fio.log"
}

printf 'round\tcache\tworkload\tqd\tsystem\tiops\tmib_s\n' > "$TSV"
echo "# mode=$MODE runtime=${RUNTIME}s rounds=$REPS caches=[$CACHES] qd=[$QDS] results: $TSV" >&2
read -r -a SYS_ARR <<< "$SYSTEMS"
nsys=${#SYS_ARR[@]}
for rep in $(seq "$REPS"); do
    for cache in $CACHES; do
        for wl in $WORKLOADS; do
            for qd in $QDS; do
                # Rotate the order of the systems every round.
                shift_by=$(( (rep - 1) % nsys ))
                order=("${SYS_ARR[@]:shift_by}" "${SYS_ARR[@]:0:shift_by}")
                for sys in "${order[@]}"; do
                    img=$(prepare "$sys" "$wl")
                    sync
                    start_server "$sys" "$img" "$cache"
                    out="$WORK/fio.json"
                    run_fio "$wl" "$qd" "$out"
                    if is_read "$wl"; then stop_server TERM; else stop_server KILL; fi
                    read -r iops mibs < <(python3 - "$out" "$wl" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["read"] if sys.argv[2] in ("randread", "seqread") else j["write"]
print(f'{side["iops"]:.0f} {side["bw"] / 1024:.1f}')
PY
)
                    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$cache" "$wl" "$qd" "$sys" "$iops" "$mibs" >> "$TSV"
                    echo "# round $rep $cache $wl qd$qd $sys: $iops IOPS, $mibs MiB/s" >&2
                    if ! is_read "$wl"; then rm -f "$img"; sync; fi
                done
            done
        done
    done
done

python3 - "$TSV" "$JSON" "$MODE" "$RUNTIME" "$REPS" <<'PY'
import csv, json, statistics, sys
tsv, out, mode, runtime, reps = sys.argv[1:6]
rows = list(csv.DictReader(open(tsv), delimiter="\t"))
groups = {}
for r in rows:
    key = (r["cache"], r["workload"], int(r["qd"]), r["system"])
    groups.setdefault(key, []).append((float(r["iops"]), float(r["mib_s"])))
med = {k: (statistics.median(v[0] for v in vs), statistics.median(v[1] for v in vs), len(vs))
       for k, vs in groups.items()}
systems = []
for r in rows:
    if r["system"] not in systems:
        systems.append(r["system"])
labels = {"randwrite": "4K rand first write", "randread": "4K rand read", "seqwrite": "1M seq write",
          "seqread": "1M seq read"}
results = []
print(f"\n### NBD through fio's nbd engine ({mode}: {runtime} s runs, median of {reps})\n")
pairs = [("fvd", "fvd-raw"), ("fvd-raw", "qsd-raw"), ("fvd", "qsd-qcow2"), ("fvd", "qsd-qcow2b"),
         ("fvd-enc", "fvd"), ("fvd-enc", "qsd-qcow2b-luks")]
pairs = [p for p in pairs if p[0] in systems and p[1] in systems]
head = "| cache | workload | QD | " + " | ".join(systems) + " | " + " | ".join(f"{a}/{b}" for a, b in pairs) + " |"
print(head)
print("|" + "---|" * (head.count("|") - 1))
cases = sorted({(k[0], k[1], k[2]) for k in med}, key=lambda c: (c[0] != "writeback", list(labels).index(c[1]), c[2]))
for cache, wl, qd in cases:
    unit = 1 if wl.startswith("seq") else 0  # MiB/s for sequential, IOPS otherwise
    vals = {s: med[(cache, wl, qd, s)][unit] for s in systems if (cache, wl, qd, s) in med}
    def ratio(a, b):
        return f"{vals[a] / vals[b]:.2f}x" if a in vals and b in vals and vals[b] > 0 else "-"
    cells = [f"{vals[s]:,.0f}" if s in vals else "-" for s in systems]
    name = labels[wl] + (" MiB/s" if unit else " IOPS")
    print(f"| {cache} | {name} | {qd} | " + " | ".join(cells) + " | " + " | ".join(ratio(a, b) for a, b in pairs) + " |")
    for s in systems:
        if (cache, wl, qd, s) in med:
            i, m, n = med[(cache, wl, qd, s)]
            results.append({"cache": cache, "workload": wl, "qd": qd, "system": s,
                            "iops_median": i, "mib_s_median": m, "runs": n})
json.dump({"mode": mode, "runtime_s": int(runtime), "rounds": int(reps), "results": results},
          open(out, "w"), indent=1)
# Paired ratios: A/B within each round (the two ran minutes apart at most),
# then the median over rounds; steadier than a ratio of medians when the
# machine's speed drifts between rounds.
pairs = [("fvd", "qsd-raw"), ("fvd-raw", "qsd-raw"), ("fvd", "fvd-b"), ("fvd-raw", "fvd-raw-b"),
         ("fvd", "qsd-qcow2"), ("fvd", "qsd-qcow2b")]
pairs = [p for p in pairs if p[0] in systems and p[1] in systems]
paired = []
if pairs:
    per = {}
    for r in rows:
        unit = "mib_s" if r["workload"].startswith("seq") else "iops"
        per[(r["round"], r["cache"], r["workload"], int(r["qd"]), r["system"])] = float(r[unit])
    print(f"\n### Paired ratios (median of the per-round ratios; min-max in brackets)\n")
    head = "| cache | workload | QD | " + " | ".join(f"{a}/{b}" for a, b in pairs) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for cache, wl, qd in cases:
        cells = []
        for a, b in pairs:
            rs = [per[(rd, cache, wl, qd, a)] / per[(rd, cache, wl, qd, b)]
                  for rd in sorted({r["round"] for r in rows})
                  if (rd, cache, wl, qd, a) in per and per.get((rd, cache, wl, qd, b), 0) > 0]
            if rs:
                cells.append(f"{statistics.median(rs):.2f}x [{min(rs):.2f}-{max(rs):.2f}]")
                paired.append({"cache": cache, "workload": wl, "qd": qd, "a": a, "b": b,
                               "ratio_median": statistics.median(rs), "ratios": rs})
            else:
                cells.append("-")
        print(f"| {cache} | {labels[wl]} | {qd} | " + " | ".join(cells) + " |")
    j = json.load(open(out))
    j["paired_ratios"] = paired
    json.dump(j, open(out, "w"), indent=1)
print(f"\nper-run figures: {tsv}\nmedians: {out}")
PY
