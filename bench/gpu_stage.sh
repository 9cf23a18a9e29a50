#!/usr/bin/env bash
# bench/gpu_stage.sh — prepare, on this machine, the pieces that bring what the GPU machine lacks for
# `bench.py gpu-check` (bench/GPU_CHECK.md): DALI (CUDA 13) with its codec libraries, webdataset, jsonargparse
# (+ docstring-parser), the timm the tests run with, CIFAR-10 shards and the ImageNet sample.
#
#   bash bench/gpu_stage.sh          (or: make gpu-stage)
#
# Writes .gpu/simclr/p000, p001, ... (git-ignored), each piece < 64 MiB together with the working tree, with
# its own stage.sh (from ../shared/gpu/pack). On the GPU machine, one call per piece, in any order:
#   bash .gpu/simclr/pNNN/stage.sh
# the call with the last piece unpacks the bundle into /tmp/stage/simclr and installs the wheels into /tmp/site.
# Run it in the checkout the device tool sends (the session's own), then follow bench/GPU_CHECK.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3
tools=${GPU_TOOLS:-$root/../shared/gpu}
data=${SHARED_DATA:-$root/../shared/data}
piece_mb=${PIECE_MB:-60}
die() { echo "gpu_stage: $*" >&2; exit 2; }
[ -x "$tools/wheels" ] && [ -x "$tools/pack" ] || die "no wheels/pack scripts in $tools (set GPU_TOOLS)"
[ -d "$data/imagenet-sample" ] || die "no ImageNet sample in $data (set SHARED_DATA)"
git check-ignore -q .gpu/ || die ".gpu/ is not git-ignored here; add /.gpu/ to .gitignore first"

src=$root/.gpu/src
bundle=$src/bundle
rm -rf "$bundle"
mkdir -p "$bundle/wheels"
t0=$SECONDS
# 1. wheels for CPython 3.12 x86-64, CUDA 13 (the GPU machine's), pinned where our CPU tests pin them
if [ ! -f "$src/wheels.done" ]; then
  rm -rf "$src/wheels"
  bash "$tools/wheels" "$src/wheels" "jsonargparse==4.53.0" "docstring-parser==0.18.0" "timm==1.0.31" >/dev/null
  touch "$src/wheels.done"
fi
cp -l "$src"/wheels/*.whl "$bundle/wheels/" 2>/dev/null || cp "$src"/wheels/*.whl "$bundle/wheels/"
# 2. CIFAR-10 shards (written once into data/cifar10 from ../shared/data/cifar10, as bench.py cifar10 does),
#    gzipped: the tar headers and padding of 60,000 small JPEGs shrink 280 MB to ~23 MB
if [ ! -f data/cifar10/test/classes.json ]; then
  "$python" -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; from bench.cifar10 import write_shards
write_shards(Path('data/cifar10'), None)"
fi
tar -C data -czf "$bundle/cifar10-shards.tar.gz" cifar10
# 3. the ImageNet sample (1,000 JPEGs, 105 MB): the GPU machine writes its x5 shards itself
cp -r "$data/imagenet-sample" "$bundle/imagenet-sample"
# 4. pieces
(cd "$bundle" && PIECE_MB=$piece_mb bash "$tools/pack" "$root/.gpu/simclr" wheels cifar10-shards.tar.gz imagenet-sample)
rm -rf "$bundle"

tree_bytes=$( (git ls-files -z; git ls-files -z -o --exclude-standard) | du -cb --files0-from=- 2>/dev/null | tail -1 |
  cut -f1)
echo "gpu_stage: prepared in $((SECONDS - t0)) s; the working tree (travels with each call): $((tree_bytes / 1024)) KiB"
status=0
for piece in .gpu/simclr/p*; do
  bytes=$(du -sb "$piece" | cut -f1)
  total=$((bytes + tree_bytes))
  flag=""
  if [ "$total" -ge $((64 * 1024 * 1024)) ]; then flag="  OVER 64 MiB: lower PIECE_MB"; status=1; fi
  echo "  $piece  $((bytes / 1024 / 1024)) MiB (+ tree = $((total / 1024 / 1024)) MiB)$flag"
done
n=$(ls -d .gpu/simclr/p* | wc -l)
last=$(printf 'p%03d' $((n - 1)))
cat <<EOF
Device calls (bench/GPU_CHECK.md), back to back (the machine is given back after 30 s idle):
  calls 1..$((n - 1)): carry [".gpu/simclr/pNNN"], command: bash .gpu/simclr/pNNN/stage.sh
  call $n:    carry [".gpu/simclr/$last"], command:
    bash .gpu/simclr/$last/stage.sh && mkdir -p /tmp/ns && ln -sfn \$PWD /tmp/ns/simclr_dali && export PYTHONPATH=/tmp/site:/tmp/ns:\$PYTHONPATH && python3 bench.py gpu-check --out \$OUT/gpu-check
EOF
exit $status
