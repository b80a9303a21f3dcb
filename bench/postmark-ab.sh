#!/bin/bash
# bench/postmark-ab.sh FVD_BINARY LABEL [WORKDIR]
#
# One PostMark run on an FVD image over a base, the way issue [commit]
# compared two builds of fvd: a 256 MiB image over a 64 MiB random base,
# `fvd serve --cache=none`, nbdfuse, a loop device, ext4 mounted -o sync,
# PostMark 200 files / 400 transactions. Prints "LABEL postmark S s".
# Alternate two binaries several times and compare medians. Needs root,
# nbdfuse, postmark, losetup, mkfs.ext4.
set -euo pipefail
BIN=$1; LABEL=$2; W=${3:-/var/tmp/fvd-postmark-ab}
mkdir -p "$W" && cd "$W"
[ -f base.raw ] || head -c 64M /dev/urandom > base.raw
rm -f img.fvd sock; mkdir -p nf mnt
"$BIN" create -q -b base.raw -F raw img.fvd 256M
"$BIN" serve -x disk --cache=none --socket "$W/sock" img.fvd >/dev/null 2>&1 &
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
kill "$SERVER"; wait "$SERVER" 2>/dev/null || true
echo "$LABEL postmark $(python3 -c "print(round($T1 - $T0, 2))") s"
