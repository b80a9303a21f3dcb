#!/bin/bash
# bench/postmark-nbd.sh SYSTEM   (SYSTEM: fvd | qcow2 | raw)
#
# One PostMark run through an NBD server, nbdfuse, a loop device and ext4
# mounted -o sync, on the host's file system (no scratch file system):
# fvd = `fvd serve --cache=none` on an FVD image over a random base; qcow2 =
# `qemu-nbd --cache=none --aio=threads` on a qcow2 overlay of the same base;
# raw = `qemu-nbd --cache=none` on a raw copy of the base. PostMark 200 files
# / 400 transactions. Prints "SYSTEM postmark S s". Alternate systems several
# times and compare medians. Environment: FVD (default target/release/fvd),
# BASE (default 64M), DISK (default 256M), WORKDIR (default /var/tmp).
# Needs root, nbdfuse, postmark, losetup, mkfs.ext4, qemu-nbd.
set -euo pipefail
SYS=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FVD=${FVD:-$ROOT/target/release/fvd}
W=${WORKDIR:-/var/tmp}/fvd-postmark-$SYS-${BASE:-64M}
mkdir -p "$W" && cd "$W"
[ -f base.raw ] || head -c "${BASE:-64M}" /dev/urandom > base.raw
rm -f img sock; mkdir -p nf mnt
case $SYS in
  fvd) "$FVD" create -q -b base.raw -F raw img "${DISK:-256M}"
       "$FVD" serve -x disk --cache=none --socket "$W/sock" img >/dev/null 2>&1 & ;;
  qcow2) qemu-img create -q -f qcow2 -b base.raw -F raw img "${DISK:-256M}"
         qemu-nbd -x disk --cache=none --aio=threads -k "$W/sock" -f qcow2 img & ;;
  raw) cp --sparse=always base.raw img; truncate -s "${DISK:-256M}" img
       qemu-nbd -x disk --cache=none -k "$W/sock" -f raw img & ;;
  *) echo "unknown system $SYS (fvd, qcow2, raw)" >&2; exit 2 ;;
esac
SERVER=$!
for _ in $(seq 50); do [ -S sock ] && break; sleep 0.1; done
nbdfuse -C 1 -P "$W/nf.pid" "$W/nf" "nbd+unix:///disk?socket=$W/sock" &
for _ in $(seq 50); do mountpoint -q nf && break; sleep 0.1; done
LOOP=$(losetup -f --show nf/nbd)
mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$LOOP"
mount -o sync "$LOOP" mnt
mkdir mnt/pm
T0=$(date +%s.%N)
printf 'set location %s\nset number 200\nset transactions 400\nset size 4096 65536\nset read 4096\nset write 4096\nset buffering false\nset bias read 5\nset bias create 5\nset seed 42\nrun\nquit\n' \
  "$W/mnt/pm" | postmark >/dev/null
T1=$(date +%s.%N)
umount mnt; losetup -d "$LOOP"; fusermount3 -u nf; sleep 0.5
kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true
echo "$SYS postmark $(python3 -c "print(round($T1 - $T0, 2))") s"
