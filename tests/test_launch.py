"""The cluster launch recipes, rendered for 2 nodes x 8 GPUs without a cluster: docker/slurm.sbatch runs
under bash with SLURM's variables and stub ``scontrol``/``srun``/``accelerate`` commands (srun runs its
command once per node with that node's SLURM_NODEID, as one task per node does); each node's
``accelerate launch`` command line is then resolved by Accelerate's own launcher code against
configs/accelerate/*.yaml, down to the torchrun arguments. No docker, no GPU."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "docker" / "slurm.sbatch"
HOSTS = ["gpu-a01", "gpu-a02"]
TRAIN_ARGS = ["--config", "configs/imagenet.yaml", "--train_shards", "/shards/train", "--output_dir", "/ckpt/run"]

STUBS = {
    # scontrol show hostnames NODELIST -> one host per line
    "scontrol": """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] || exit 2
[ "$3" = "$SLURM_JOB_NODELIST" ] || exit 3
printf '%s\\n' $STUB_HOSTS
""",
    # srun [--opt=value ...] CMD ARGS: log the options, run CMD once per node with that node's variables
    "srun": """#!/usr/bin/env bash
opts=()
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do opts+=("$1"); shift; done
python3 -c 'import json, sys; print(json.dumps({"srun": sys.argv[1:]}))' "${opts[@]}" >> "$STUB_LOG"
if [[ " ${opts[*]}" == *" --container-image="* ]]; then  # "inside the image": its venv's accelerate is the stub
    args=(); for arg in "$@"; do [ "$arg" = /opt/venv/bin/accelerate ] && arg=accelerate; args+=("$arg"); done; set -- "${args[@]}"
fi
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" || exit $?
done
""",
    # accelerate ARGS: log the arguments with the node that ran them
    "accelerate": """#!/usr/bin/env bash
python3 -c 'import json, os, sys; print(json.dumps({"node": os.environ["SLURM_NODEID"], "argv": sys.argv[1:]}))' "$@" >> "$STUB_LOG"
""",
}


def render_sbatch(tmp_path: Path, extra_env: dict | None = None) -> tuple[list[list[str]], list[list[str]], str]:
    """Run docker/slurm.sbatch as SLURM would on a 2-node allocation; returns (srun option lists,
    accelerate argv per node in node order, stdout)."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.jsonl"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "STUB_LOG": str(log),
        "STUB_HOSTS": " ".join(HOSTS),
        "SLURM_JOB_NODELIST": "gpu-a[01-02]",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "0",  # the batch script itself runs on the first node
        "SLURM_SUBMIT_DIR": str(ROOT),
        **(extra_env or {}),
    }
    done = subprocess.run(["bash", str(SBATCH), *TRAIN_ARGS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    sruns = [call["srun"] for call in calls if "srun" in call]
    launches = sorted((call for call in calls if "argv" in call), key=lambda call: int(call["node"]))
    for node, call in enumerate(launches):
        assert call["node"] == str(node)
    return sruns, [call["argv"] for call in launches], done.stdout


def resolve_launch(argv: list[str], monkeypatch):
    """What `accelerate launch ARGV`, run in the repo root, would do: (merged launch args, torchrun args),
    worked out by Accelerate's own launcher code."""
    import torch.distributed.run as distrib_run
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import launch as accelerate_launch

    assert argv[0] == "launch"
    monkeypatch.chdir(ROOT)  # config paths are relative to the checkout, as in the sbatch script
    monkeypatch.setattr(accelerate_launch, "is_port_in_use", lambda port: False)  # rank 0 checks this machine's port
    args = launch_command_parser().parse_args(argv[1:])
    args, _, _ = _validate_launch_command(args)
    launch_args = argparse.Namespace(**vars(args))
    accelerate_launch.prepare_multi_gpu_env(args)
    torchrun = accelerate_launch._filter_args(
        args, distrib_run.get_args_parser(), ["--training_script", args.training_script, "--training_script_args", args.training_script_args]
    )
    return launch_args, torchrun


def rendezvous(torchrun) -> str:
    endpoint = getattr(torchrun, "rdzv_endpoint", "")
    return endpoint or f"{torchrun.master_addr}:{torchrun.master_port}"


def test_sbatch_plain_two_nodes(tmp_path, monkeypatch):
    sruns, launches, stdout = render_sbatch(tmp_path)
    assert "2 nodes x 8 GPUs = 16 processes" in stdout
    assert len(sruns) == 1 and "--ntasks-per-node=1" in sruns[0]
    assert f"--chdir={ROOT}" in sruns[0]
    assert len(launches) == 2, "one accelerate launch per node"
    for node, argv in enumerate(launches):
        assert argv[0] == "launch"
        script_at = argv.index("train.py")
        assert argv[script_at + 1 :] == TRAIN_ARGS, "the sbatch arguments go to train.py, unchanged"

        args, torchrun = resolve_launch(argv, monkeypatch)
        assert args.multi_gpu and not args.cpu
        assert args.num_machines == 2
        assert args.num_processes == 16
        assert args.machine_rank == node
        assert args.main_process_ip == HOSTS[0]
        assert args.main_process_port == 29500
        assert args.mixed_precision == "bf16"
        assert args.training_script == "train.py" and args.training_script_args == TRAIN_ARGS
        # what torchrun gets on this node: world = nnodes x nproc_per_node, this node's rank, one rendezvous
        assert int(torchrun.nnodes) == 2 and int(torchrun.nproc_per_node) == 8
        assert int(torchrun.node_rank) == node
        assert rendezvous(torchrun) == f"{HOSTS[0]}:29500"


def test_sbatch_container_mode(tmp_path):
    sruns, launches, _ = render_sbatch(
        tmp_path, {"SIMCLR_IMAGE": "/shared/simclr.sqsh", "SHARDS_DIR": "/lustre/shards", "CKPT_DIR": "/lustre/ckpt", "GPUS_PER_NODE": "4"}
    )
    options = sruns[0]
    assert "--container-image=/shared/simclr.sqsh" in options
    assert "--container-mounts=/lustre/shards:/shards,/lustre/ckpt:/ckpt" in options
    assert "--container-workdir=/opt/simclr" in options
    assert [int(argv[argv.index("--machine_rank") + 1]) for argv in launches] == [0, 1]
    for argv in launches:
        assert argv[argv.index("--num_processes") + 1] == "8", "2 nodes x GPUS_PER_NODE=4"


def test_accelerate_configs(monkeypatch):
    single = yaml.safe_load((ROOT / "configs/accelerate/1x8.yaml").read_text())
    assert single["distributed_type"] == "MULTI_GPU" and single["mixed_precision"] == "bf16"
    assert single["num_machines"] == 1 and single["num_processes"] == 8

    multi = yaml.safe_load((ROOT / "configs/accelerate/multinode.yaml").read_text())
    assert multi["distributed_type"] == "MULTI_GPU" and multi["mixed_precision"] == "bf16"
    # the command line (as docker/slurm.sbatch writes it for node 1 of 2) overrides the placeholders
    argv = ["launch", "--machine_rank", "1", "--config_file", "configs/accelerate/multinode.yaml", "--num_machines", "2", "--num_processes", "16",
            "--main_process_ip", "gpu-a01", "train.py", "--config", "configs/imagenet.yaml"]
    args, torchrun = resolve_launch(argv, monkeypatch)
    assert (args.num_machines, args.num_processes, args.machine_rank, args.main_process_ip) == (2, 16, 1, "gpu-a01")
    assert args.main_process_port == multi["main_process_port"]
    assert (int(torchrun.nnodes), int(torchrun.nproc_per_node), int(torchrun.node_rank)) == (2, 8, 1)

    # the single-node config: 8 processes on this machine, no rendezvous host needed
    args, torchrun = resolve_launch(["launch", "--config_file", "configs/accelerate/1x8.yaml", "train.py"], monkeypatch)
    assert args.multi_gpu and args.num_processes == 8 and args.num_machines == 1
    assert int(torchrun.nproc_per_node) == 8
