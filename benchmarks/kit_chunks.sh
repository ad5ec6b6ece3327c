#!/usr/bin/env bash
# Cut the kit's model (.kit/smollm2-a/part + .kit/smollm2-b/part, from ../shared/gpu/make-kit) into chunks that fit the
# device tool's 64 MiB carry limit beside the working tree (about 18 MiB in session 12, where a 47 MB half no longer
# fitted): KIT/zc1/part, KIT/zc2/part, ... of CHUNK bytes (default 40M; three chunks).
#   bash benchmarks/kit_chunks.sh [KIT]        (default KIT: .kit)
# Carry one chunk a call, each copied to /tmp/zcN.part (`cp .kit/zc1/part /tmp/zc1.part`), the last with
# benchmarks/sst2_gpu_runs.sh, which copies any it was carried with and joins them in order.
set -euo pipefail
K=${1:-.kit}
CHUNK=${CHUNK:-40M}
for half in smollm2-a smollm2-b; do
  [ -s "$K/$half/part" ] || { echo "kit_chunks: $K/$half/part is missing; fix: run ../shared/gpu/make-kit $K" >&2; exit 1; }
done
tmp=$(mktemp -d)
cat "$K/smollm2-a/part" "$K/smollm2-b/part" | split -b "$CHUNK" -d -a 1 - "$tmp/zc"
rm -rf "$K"/zc[0-9]
i=1
for f in "$tmp"/zc*; do mkdir -p "$K/zc$i"; mv "$f" "$K/zc$i/part"; i=$((i + 1)); done
rmdir "$tmp"
du -sh "$K"/zc[0-9]
