#!/bin/bash
# bench/postmark-ab.sh FVD_BINARY LABEL [WORKDIR]
#
# One PostMark run on an FVD image over a base, the way issue [commit]
# compared two builds of fvd: a 256 MiB image over a 64 MiB random base,
# `fvd serve --cache=none`, nbdfuse, a loop device, ext4 mounted -o sync,
# PostMark 200 files / 400 transactions (bench/postmark-nbd.sh's `fvd`
# system with this binary). Prints "LABEL postmark S s". Alternate two
# binaries several times and compare medians.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
FVD=$1 WORKDIR=${3:-/var/tmp} "$here/postmark-nbd.sh" fvd | sed "s/^fvd /$2 /"
