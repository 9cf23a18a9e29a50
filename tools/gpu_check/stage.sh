#!/usr/bin/env bash
# tools/gpu_check/stage.sh — prepare, on this machine, the pieces that bring what the GPU machine lacks for
# `python -m tools.gpu_check` (bench/GPU_CHECK.md), as few as the 64 MiB a call carries allows:
#   .gpu/simclr/lite   jsonargparse, docstring-parser, webdataset, braceexpand wheels (< 1 MiB): call 1
#   .gpu/simclr/pNNN   equal parts of one xz tar: site/ (DALI 2.4.0, nvimgcodec, nvjpeg, ... unpacked, pinned,
#                      binaries for CPython 3.12 only) + data/imagenet-subset (SUBSET JPEGs + every sample's size)
#   .gpu/simclr/cifar  (WITH_CIFAR=1) the CIFAR-10 shards, for the extra group's cifar10 stage
# Each piece has a MANIFEST.json naming every piece of its set; the check's pieces stage installs whatever pieces a call
# carries (idempotent, any order; the bundle unpacks when its last part lands) and reports which are missing.
#
#   bash tools/gpu_check/stage.sh    (or: make gpu-stage)      REBUILD=1 to repack, SUBSET=N images (default 24)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3
data=${SHARED_DATA:-$root/../shared/data}
subset=${SUBSET:-24}
die() { echo "gpu_stage: $*" >&2; exit 2; }
[ -d "$data/imagenet-sample" ] || die "no ImageNet sample in $data (set SHARED_DATA)"
git check-ignore -q .gpu/ || die ".gpu/ is not git-ignored here; add /.gpu/ to .gitignore first"
command -v xz >/dev/null || die "xz is needed to pack the bundle"

src=$root/.gpu/src
out=$root/.gpu/simclr
mkdir -p "$src/wheels"
t0=$SECONDS
# Pinned: the versions requirements/lock.txt pins for the CPU tests (DALI 2.4.0 and its nvJPEG 13.3.2.43).
lite=(jsonargparse==4.53.0 docstring-parser==0.18.0 webdataset==1.0.2 braceexpand==0.1.7)
bundle=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43
  nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82 nvidia-libnvcomp-cu13==5.3.0.16 astunparse==1.6.3
  gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0)
if [ ! -f "$src/wheels.done" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$src/wheels" "${lite[@]}" "${bundle[@]}"
  touch "$src/wheels.done"
fi
wheel_of() { ls "$src/wheels/$(echo "${1%%==*}" | tr - _)"-"${1##*==}"-*.whl 2>/dev/null | head -1 || true; }
for req in "${lite[@]}" "${bundle[@]}"; do [ -n "$(wheel_of "$req")" ] || die "no wheel for $req in $src/wheels"; done

rm -rf "$out"; mkdir -p "$out/lite"
for req in "${lite[@]}"; do cp "$(wheel_of "$req")" "$out/lite/"; done

# The bundle: wheels unpacked as pip --target would (binaries of other Pythons dropped), the ImageNet subset.
if [ "${REBUILD:-0}" = 1 ] || [ ! -f "$src/bundle.tar.xz" ] || [ "$(cat "$src/bundle.key" 2>/dev/null)" != "${bundle[*]} $subset" ]; then
  tree=$src/tree; rm -rf "$tree"; mkdir -p "$tree/site" "$tree/data/imagenet-subset"
  for req in "${bundle[@]}"; do unzip -q -o "$(wheel_of "$req")" -d "$tree/site"; done
  find "$tree/site" -name '*.cpython-3*-x86_64-linux-gnu.so' ! -name '*.cpython-312-x86_64-linux-gnu.so' -delete
  for d in "$tree"/site/*.data; do [ -d "$d" ] && { cp -r "$d"/*lib/. "$tree/site/" 2>/dev/null || true; rm -rf "$d"; }; done
  "$python" - "$data/imagenet-sample" "$tree/data/imagenet-subset" "$subset" <<'EOF'
import json, shutil, sys
from pathlib import Path
from PIL import Image
source, target, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
files = sorted(source.glob("*.JPEG"))
meta = [[f.stem.split("_", 1)[0], *Image.open(f).size, f.stat().st_size] for f in files]
(target / "sizes.json").write_text(json.dumps(meta))
# the subset: evenly spaced in file size (small to large sources)
for f in sorted(files, key=lambda f: f.stat().st_size)[:: max(1, len(files) // count)][:count]:
    shutil.copy(f, target / f.name)
EOF
  tar -C "$tree" -cf - site data | xz -T2 -6 >"$src/bundle.tar.xz.tmp"
  mv "$src/bundle.tar.xz.tmp" "$src/bundle.tar.xz"
  echo "${bundle[*]} $subset" >"$src/bundle.key"
  rm -rf "$tree"
fi

tree_bytes=$( (git ls-files -z; git ls-files -z -o --exclude-standard) | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
limit=$((64 * 1024 * 1024 - tree_bytes - 1024 * 1024)) # one call: the working tree + a part + a MiB of slack
size=$(stat -c %s "$src/bundle.tar.xz")
parts=$(((size + limit - 1) / limit))
part_bytes=$(((size + parts - 1) / parts))
split -b "$part_bytes" -d -a 3 "$src/bundle.tar.xz" "$src/part-"
i=0
for p in "$src"/part-*; do
  mkdir -p "$(printf '%s/p%03d' "$out" "$i")"
  mv "$p" "$(printf '%s/p%03d/bundle.part%03d' "$out" "$i" "$i")"
  i=$((i + 1))
done
if [ "${WITH_CIFAR:-0}" = 1 ]; then
  [ -f data/cifar10/test/classes.json ] || "$python" -c "import sys; sys.path.insert(0, '.'); from pathlib import Path
from simclr_dali.bench.cifar10 import write_shards; write_shards(Path('data/cifar10'), None)"
  mkdir -p "$out/cifar/data"
  tar -C data -czf "$out/cifar/data/cifar10-shards.tar.gz" cifar10
fi
"$python" - "$out" "$src/bundle.tar.xz" <<'EOF'
import hashlib, json, sys
from pathlib import Path
out, bundle = Path(sys.argv[1]), Path(sys.argv[2])
sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
lite = sorted((out / "lite").glob("*.whl"))
manifest = {"set": "lite", "kind": "wheels", "piece": "lite", "sha256": hashlib.sha256(b"".join(sha(p).encode() for p in lite)).hexdigest(), "wheels": [p.name for p in lite]}
(out / "lite" / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
parts = [{"piece": p.parent.name, "file": p.name, "bytes": p.stat().st_size, "sha256": sha(p)} for p in sorted(out.glob("p*/bundle.part*"))]
for i, part in enumerate(parts):
    manifest = {"set": "bundle", "kind": "parts", "sha256": sha(bundle), "parts": parts, "index": i}
    (out / part["piece"] / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
cifar = out / "cifar" / "data" / "cifar10-shards.tar.gz"
if cifar.exists():  # a one-part set that unpacks data/cifar10-shards.tar.gz into /tmp/stage/data
    import io, lzma, tarfile
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(cifar, arcname="data/cifar10-shards.tar.gz")
    packed = out / "cifar" / "cifar.part000"
    packed.write_bytes(lzma.compress(buffer.getvalue(), preset=0))
    cifar.unlink(); cifar.parent.rmdir()
    part = {"piece": "cifar", "file": packed.name, "bytes": packed.stat().st_size, "sha256": sha(packed)}
    manifest = {"set": "cifar", "kind": "parts", "sha256": part["sha256"], "parts": [part], "index": 0}
    (out / "cifar" / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
EOF

echo "gpu_stage: prepared in $((SECONDS - t0)) s; the working tree (travels with each call): $((tree_bytes / 1024)) KiB"
status=0
for piece in "$out"/*; do
  bytes=$(du -sb "$piece" | cut -f1)
  total=$((bytes + tree_bytes))
  flag=""
  if [ "$total" -ge $((64 * 1024 * 1024)) ]; then flag="  OVER 64 MiB"; status=1; fi
  echo "  ${piece#"$root"/}  $((bytes / 1024)) KiB (+ tree = $((total / 1024 / 1024)) MiB)$flag"
done
last=$(printf 'p%03d' $((parts - 1)))
# The checkout runs uninstalled there: each command first puts a simclr_dali symlink to it on PYTHONPATH.
ns='mkdir -p /tmp/ns && ln -sfn $PWD /tmp/ns/simclr_dali && export PYTHONPATH=/tmp/site:/tmp/ns:$PYTHONPATH &&'
echo "Device calls (bench/GPU_CHECK.md; back to back: the machine is given back after 30 s idle); the data path first:"
for k in $(seq 0 $((parts - 2))); do
  extra=""; [ "$k" = 0 ] && extra=', ".gpu/simclr/lite"'
  printf '  %d: carry [".gpu/simclr/p%03d"%s]   %s python3 -m tools.gpu_check --stage_only --out $OUT/gc\n' $((k + 1)) "$k" "$extra" "$ns"
done
echo "  $parts: carry [\".gpu/simclr/$last\"]   $ns python3 -m tools.gpu_check --group data --out \$OUT/gc"
echo "  $((parts + 1)): (nothing carried)   $ns python3 -m tools.gpu_check --group torch --out \$OUT/gc"
echo "plan: $(cd "$root" && "$python" -m tools.gpu_check --plan | grep '^total')"
exit $status
