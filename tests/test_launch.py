"""The cluster launch recipes, rendered for 2 nodes x 8 GPUs without a cluster: docker/slurm.sbatch runs
under bash with SLURM's variables and stub ``scontrol``/``srun``/``accelerate`` commands (srun runs its
command once per node with that node's SLURM_NODEID, as one task per node does); each node's
``accelerate launch`` command line is then resolved by Accelerate's own launcher code against
configs/accelerate/*.yaml, down to the torchrun arguments. No docker, no GPU."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "docker" / "slurm.sbatch"
HOSTS = ["gpu-a01", "gpu-a02"]
TRAIN_ARGS = [
    "--config",
    "configs/imagenet.yaml",
    "--train_shards",
    "/shards/train",
    "--output_dir",
    "/ckpt/run",
]

STUBS = {
    # scontrol show hostnames NODELIST -> one host per line; scontrol requeue JOBID -> logged
    "scontrol": """#!/usr/bin/env bash
if [ "$1" = requeue ]; then
    python3 -c 'import json, sys; print(json.dumps({"scontrol": sys.argv[1:]}))' "$@" >> "$STUB_LOG"
    exit 0
fi
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
    args=()
    for arg in "$@"; do [ "$arg" = /opt/venv/bin/accelerate ] && arg=accelerate; args+=("$arg"); done
    set -- "${args[@]}"
fi
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" || exit $?
done
""",
    # accelerate ARGS: log the arguments with the node that ran them
    "accelerate": """#!/usr/bin/env bash
python3 -c 'import json, os, sys; print(json.dumps({"node": os.environ["SLURM_NODEID"], "argv": sys.argv[1:]}))' \
    "$@" >> "$STUB_LOG"
""",
}


def sbatch_env(tmp_path: Path, stubs: dict, extra_env: dict | None = None) -> dict:
    """The environment SLURM gives the batch script on a 2-node allocation, with ``stubs`` first on PATH."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in stubs.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "STUB_LOG": str(tmp_path / "calls.jsonl"),
        "STUB_HOSTS": " ".join(HOSTS),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-a[01-02]",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "0",  # the batch script itself runs on the first node
        "SLURM_GPUS_ON_NODE": "8",  # as SLURM sets them for #SBATCH --gpus-per-node=8 on 64-CPU nodes
        "SLURM_GPUS_PER_NODE": "8",
        "SLURM_CPUS_ON_NODE": "64",
        "SLURM_SUBMIT_DIR": str(ROOT),
        **(extra_env or {}),
    }


def render_sbatch(
    tmp_path: Path, extra_env: dict | None = None, args=TRAIN_ARGS, unset=()
) -> tuple[list[list[str]], list[list[str]], str]:
    """Run docker/slurm.sbatch as SLURM would on a 2-node allocation (less the variables ``unset``); returns
    (srun option lists, accelerate argv per node in node order, stdout)."""
    env = sbatch_env(tmp_path, STUBS, extra_env)
    for name in unset:
        del env[name]
    log = Path(env["STUB_LOG"])
    done = subprocess.run(
        ["bash", str(SBATCH), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert not [call for call in calls if "scontrol" in call], "requeued without a signal"
    sruns = [call["srun"] for call in calls if "srun" in call]
    launches = sorted(
        (call for call in calls if "argv" in call), key=lambda call: int(call["node"])
    )
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
    monkeypatch.setattr(
        accelerate_launch, "is_port_in_use", lambda port: False
    )  # rank 0 checks this machine's port
    args = launch_command_parser().parse_args(argv[1:])
    args, _, _ = _validate_launch_command(args)
    launch_args = argparse.Namespace(**vars(args))
    accelerate_launch.prepare_multi_gpu_env(args)
    torchrun = accelerate_launch._filter_args(
        args,
        distrib_run.get_args_parser(),
        [
            "--training_script",
            args.training_script,
            "--training_script_args",
            args.training_script_args,
        ],
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
        tmp_path,
        {
            "SIMCLR_IMAGE": "/shared/simclr.sqsh",
            "SHARDS_DIR": "/lustre/shards",
            "CKPT_DIR": "/lustre/ckpt",
            "GPUS_PER_NODE": "4",
        },
    )
    options = sruns[0]
    assert "--container-image=/shared/simclr.sqsh" in options
    assert "--container-mounts=/lustre/shards:/shards,/lustre/ckpt:/ckpt" in options
    assert "--container-workdir=/opt/simclr" in options
    assert [int(argv[argv.index("--machine_rank") + 1]) for argv in launches] == [0, 1]
    for argv in launches:
        assert argv[argv.index("--num_processes") + 1] == "8", "2 nodes x GPUS_PER_NODE=4"


@pytest.mark.parametrize(
    "slurm, processes",
    [
        ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8"}, 8),  # the GPUs this node has
        (
            {"SLURM_GPUS_ON_NODE": None, "SLURM_GPUS_PER_NODE": "a100:2"},
            4,
        ),  # else the typed request
        ({"SLURM_GPUS_ON_NODE": None, "SLURM_GPUS_PER_NODE": "2"}, 4),
    ],
)
def test_sbatch_takes_the_gpus_per_node_from_slurm(tmp_path, slurm, processes):
    env = {key: value for key, value in slurm.items() if value is not None}
    sruns, launches, stdout = render_sbatch(
        tmp_path, env, unset=[k for k, v in slurm.items() if v is None]
    )
    gpus = processes // 2
    assert f"2 nodes x {gpus} GPUs = {processes} processes" in stdout
    for argv in launches:
        assert argv[argv.index("--num_processes") + 1] == str(processes)


def test_sbatch_without_a_gpu_count_is_refused(tmp_path):
    env = sbatch_env(tmp_path, STUBS)
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        del env[name]
    done = subprocess.run(
        ["bash", str(SBATCH), *TRAIN_ARGS], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and "--gpus-per-node" in done.stderr
    assert not Path(env["STUB_LOG"]).exists(), "nothing was started"


@pytest.mark.parametrize(
    "slurm, cpus",
    [({"SLURM_CPUS_PER_TASK": "32"}, "32"), ({}, "64"), ({"CPUS_PER_TASK": "16"}, "16")],
)
def test_sbatch_asks_srun_for_slurms_cpus_per_task(tmp_path, slurm, cpus):
    """--cpus-per-task of sbatch (else every CPU of the node) again on srun, which does not inherit it everywhere."""
    assert "#SBATCH --cpus-per-task" not in SBATCH.read_text(), "no fixed CPU count"
    sruns, _, _ = render_sbatch(tmp_path, slurm)
    assert f"--cpus-per-task={cpus}" in sruns[0]


@pytest.mark.parametrize(
    "args, accepted",
    [
        (TRAIN_ARGS, True),
        (["--config", "configs/imagenet.yaml", "--output_dir=/ckpt/run"], True),
        (
            ["--config", "configs/imagenet.yaml"],
            False,
        ),  # the config's runs/imagenet: inside the container
        (["--output_dir", "/lustre/ckpt/run"], False),  # a host path the container does not mount
        (
            ["--output_dir", "/ckpt/run", "--output_dir", "runs/x"],
            False,
        ),  # the last one wins, as in train.py
    ],
)
def test_container_mode_refuses_an_output_dir_outside_the_mount(tmp_path, args, accepted):
    env = sbatch_env(
        tmp_path, STUBS, {"SIMCLR_IMAGE": "/shared/simclr.sqsh", "CKPT_DIR": "/lustre/ckpt"}
    )
    done = subprocess.run(
        ["bash", str(SBATCH), *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if accepted:
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 2 and "--output_dir /ckpt/" in done.stderr, done.stderr
        assert not Path(env["STUB_LOG"]).exists(), "no job step was started"


def test_accelerate_configs(monkeypatch):
    single = yaml.safe_load((ROOT / "configs/accelerate/1x8.yaml").read_text())
    assert single["distributed_type"] == "MULTI_GPU" and single["mixed_precision"] == "bf16"
    assert single["num_machines"] == 1 and single["num_processes"] == 8

    multi = yaml.safe_load((ROOT / "configs/accelerate/multinode.yaml").read_text())
    assert multi["distributed_type"] == "MULTI_GPU" and multi["mixed_precision"] == "bf16"
    # the command line (as docker/slurm.sbatch writes it for node 1 of 2) overrides the placeholders
    argv = [
        "launch",
        "--machine_rank",
        "1",
        "--config_file",
        "configs/accelerate/multinode.yaml",
        "--num_machines",
        "2",
        "--num_processes",
        "16",
        "--main_process_ip",
        "gpu-a01",
        "train.py",
        "--config",
        "configs/imagenet.yaml",
    ]
    args, torchrun = resolve_launch(argv, monkeypatch)
    assert (args.num_machines, args.num_processes, args.machine_rank, args.main_process_ip) == (
        2,
        16,
        1,
        "gpu-a01",
    )
    assert args.main_process_port == multi["main_process_port"]
    assert (int(torchrun.nnodes), int(torchrun.nproc_per_node), int(torchrun.node_rank)) == (
        2,
        8,
        1,
    )

    # the single-node config: 8 processes on this machine, no rendezvous host needed
    args, torchrun = resolve_launch(
        ["launch", "--config_file", "configs/accelerate/1x8.yaml", "train.py"], monkeypatch
    )
    assert args.multi_gpu and args.num_processes == 8 and args.num_machines == 1
    assert int(torchrun.nproc_per_node) == 8


# --------------------------------------------------------------------------- preemption and requeue

WAITING_SRUN = """#!/usr/bin/env bash
# a job step that runs until a signal reaches it, as training does: log the signal and the environment it
# runs with, then exit as torchrun does when its workers stop (1)
python3 -c 'import json, os; print(json.dumps({"step_env": {k: os.environ.get(k) for k in
    ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "PET_SIGNALS_TO_HANDLE")}}))' >> "$STUB_LOG"
trap 'echo "{\\"srun_got\\": \\"$sig\\"}" >> "$STUB_LOG"; exit 1' USR1 TERM
sig=USR1
touch "$STUB_READY"
while true; do sleep 0.05; done
"""


def test_sbatch_signals_the_workers_and_requeues_before_the_time_limit(tmp_path):
    """SLURM's warning signal (SIGUSR1 to the batch script, 5 minutes before the limit) reaches the job step, and once
    it has stopped (the workers checkpoint and exit 75) the script requeues the job."""
    text = SBATCH.read_text()
    assert "#SBATCH --signal=B:USR1@300" in text and "#SBATCH --requeue" in text
    env = sbatch_env(
        tmp_path, {**STUBS, "srun": WAITING_SRUN}, {"STUB_READY": str(tmp_path / "ready")}
    )
    script = subprocess.Popen(
        ["bash", str(SBATCH), *TRAIN_ARGS],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and script.poll() is None, script.communicate()
        time.sleep(0.05)
    script.send_signal(signal.SIGUSR1)
    stdout, stderr = script.communicate(timeout=30)
    assert script.returncode == 0, stderr
    calls = [json.loads(line) for line in Path(env["STUB_LOG"]).read_text().splitlines()]
    assert {"srun_got": "USR1"} in calls, "the signal did not reach the job step"
    assert {"scontrol": ["requeue", "4242"]} in calls and "requeueing job 4242" in stdout
    step_env = next(call["step_env"] for call in calls if "step_env" in call)
    assert (
        int(step_env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) >= 120
    )  # torchrun's agent waits for the checkpoint, not 30 s
    # ... and forwards SIGUSR1 to its workers: torchrun's --signals_to_handle, read from the environment (the
    # TORCHELASTIC_ variable is the launcher's output, overwritten from that flag)
    assert "SIGUSR1" in step_env["PET_SIGNALS_TO_HANDLE"].split(",")


def test_sbatch_forwards_sigterm_without_requeueing(tmp_path):
    """scancel (SIGTERM): the workers still checkpoint, and the job is not requeued by the script."""
    env = sbatch_env(
        tmp_path,
        {**STUBS, "srun": WAITING_SRUN.replace("sig=USR1", "sig=TERM")},
        {"STUB_READY": str(tmp_path / "ready")},
    )
    script = subprocess.Popen(
        ["bash", str(SBATCH), *TRAIN_ARGS],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and script.poll() is None, script.communicate()
        time.sleep(0.05)
    script.send_signal(signal.SIGTERM)
    script.communicate(timeout=30)
    calls = [json.loads(line) for line in Path(env["STUB_LOG"]).read_text().splitlines()]
    assert {"srun_got": "TERM"} in calls and not [call for call in calls if "scontrol" in call]
    assert script.returncode == 1  # the step's status


def test_a_requeued_job_resumes_its_run(tmp_path):
    _, launches, _ = render_sbatch(tmp_path, {"SLURM_RESTART_COUNT": "1"})
    for argv in launches:
        assert argv[argv.index("train.py") + 1 :] == [*TRAIN_ARGS, "--resume", "auto"]
    _, launches, _ = render_sbatch(
        tmp_path / "again", {"SLURM_RESTART_COUNT": "2"}, args=[*TRAIN_ARGS, "--resume", "auto"]
    )
    assert all(argv.count("--resume") == 1 for argv in launches)


# --------------------------------------------------------------------------- signals under the real launchers

WORKER = ROOT / "tests" / "fault_worker.py"
# the default temperature; max_steps: a lost signal lets the run end by itself (status 0), never hang
TINY_RUN = tiny("temperature", epochs=100, max_steps=60, shuffle_buffer=64)
# One node, 2 processes, through torchrun's launcher (Accelerate's multi-GPU path); on a machine without CUDA
# each worker trains on the CPU over gloo. (--cpu would take Accelerate's one-process launcher instead.)
CPU_ACCELERATE_CONFIG = {
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "MULTI_GPU",
    "mixed_precision": "no",
    "num_machines": 1,
    "num_processes": 2,
    "machine_rank": 0,
    "main_process_port": 29517,
    "rdzv_backend": "static",
    "use_cpu": False,
    "gpu_ids": "all",
    "debug": False,
}
# What README ("Reliability") tells a user of plain `accelerate launch` / torchrun to export, as
# docker/entrypoint.sh and docker/slurm.sbatch do.
SIGNALS_TO_HANDLE = {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}

LOCAL_SRUN = """#!/usr/bin/env bash
# srun on a 1-node allocation: honour --chdir, run the task, forward USR1/TERM to it as srun does
opts=()
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do opts+=("$1"); shift; done
python3 -c 'import json, sys; print(json.dumps({"srun": sys.argv[1:]}))' "${opts[@]}" >> "$STUB_LOG"
for opt in "${opts[@]}"; do [ "${opt%%=*}" = --chdir ] && cd "${opt#*=}"; done
SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0 "$@" &
task=$!
trap 'kill -USR1 $task' USR1
trap 'kill -TERM $task' TERM
while true; do
    wait $task && status=0 || status=$?
    kill -0 $task 2>/dev/null || exit $status
done
"""


@pytest.fixture(scope="module")
def launch_shards(tmp_path_factory):
    from conftest import make_shards

    directory, _ = make_shards(tmp_path_factory.mktemp("launch"), 70, num_classes=12, per_shard=30)
    return directory


def launch_command(how: str, tmp_path: Path, spec: dict, config: Path) -> tuple[list[str], dict]:
    """The command line and environment of a 2-process CPU launch of tests/fault_worker.py, ``how``: plain
    `accelerate launch` (with SIGNALS_TO_HANDLE), docker/entrypoint.sh's `train`, or docker/slurm.sbatch on a
    1-node allocation whose srun runs the task here (and forwards signals to it, as srun does)."""
    accelerate_config = tmp_path / "accelerate.yaml"
    accelerate_config.write_text(yaml.safe_dump(CPU_ACCELERATE_CONFIG))
    worker_args = [json.dumps(spec), "--config", str(config)]
    venv_bin = str(Path(sys.executable).parent)  # accelerate, as an activated venv has it
    env = {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
        "CUDA_VISIBLE_DEVICES": "",  # CPU workers over gloo, on a GPU machine too
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PET_SIGNALS_TO_HANDLE", None)
    if how == "accelerate":
        env.update(
            SIGNALS_TO_HANDLE, TORCH_ELASTIC_SHUTDOWN_TIMEOUT="120"
        )  # a loaded machine: more than 30 s
        return [
            "accelerate",
            "launch",
            "--config_file",
            str(accelerate_config),
            str(WORKER),
            *worker_args,
        ], env
    home = tmp_path / "home"  # SIMCLR_HOME: its train.py is the fault worker
    home.mkdir()
    (home / "train.py").symlink_to(WORKER)
    env["SIMCLR_HOME"] = str(home)
    if how == "entrypoint":
        entrypoint = ROOT / "docker" / "entrypoint.sh"
        return [
            "bash",
            str(entrypoint),
            "train",
            "--config_file",
            str(accelerate_config),
            "--",
            *worker_args,
        ], env
    assert how == "sbatch"
    slurm = sbatch_env(tmp_path, {"scontrol": STUBS["scontrol"], "srun": LOCAL_SRUN})
    env.update(
        slurm,
        PATH=f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}",
        STUB_HOSTS="127.0.0.1",
        SLURM_JOB_NODELIST="gpu-a01",
        SLURM_NNODES="1",
        SLURM_GPUS_ON_NODE="2",
        ACCELERATE_CONFIG=str(accelerate_config),
        MAIN_PROCESS_PORT=str(CPU_ACCELERATE_CONFIG["main_process_port"]),
    )
    return ["bash", str(SBATCH), *worker_args], env


@pytest.mark.parametrize(
    "how, sig",
    [
        ("accelerate", "SIGUSR1"),
        ("accelerate", "SIGTERM"),
        ("entrypoint", "SIGUSR1"),
        ("sbatch", "SIGUSR1"),
    ],
)
@pytest.mark.slow
def test_a_signal_to_the_launcher_checkpoints_every_worker_and_exits_75(
    how, sig, launch_shards, tmp_path
):
    """SIGUSR1 (SLURM's time-limit warning) or SIGTERM (scancel, docker stop) sent to the launcher only, as srun
    and tini deliver it: torchrun's agent (under `accelerate launch`) forwards it to both workers, each stops
    after the same step with a checkpoint of it and exits 75. A signal the agent does not handle kills it and
    leaves the workers training: they then end at max_steps with status 0 and the test fails."""
    out, report, ready = tmp_path / "run", tmp_path / "report", tmp_path / "ready"
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({**TINY_RUN, "train_shards": str(launch_shards), "output_dir": str(out)})
    )
    command, env = launch_command(
        how, tmp_path, {"report": str(report), "ready_after_step": [str(ready), 2]}, config
    )
    launcher = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert time.monotonic() < deadline and launcher.poll() is None, launcher.communicate()[
                0
            ][-4000:]
            time.sleep(0.1)
        launcher.send_signal(getattr(signal, sig))
        output = launcher.communicate(timeout=300)[0]
    finally:
        for pid_file in report.glob(
            "rank*.pid"
        ):  # workers run in sessions of their own: end strays by id
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
    tail = output[-4000:]
    ranks = [json.loads((report / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["status"] for r in ranks] == [75, 75], tail
    assert ranks[0]["steps"] == ranks[1]["steps"] < TINY_RUN["max_steps"], tail
    from simclr_dali.trainer.checkpoint import list_checkpoints

    state = json.loads((list_checkpoints(out)[-1] / "trainer_state.json").read_text())
    assert state["step"] == ranks[0]["steps"], tail
    assert f"preempted at step {state['step']}" in output, tail
    if how == "sbatch":  # the time limit is near: the job is requeued to continue the run
        calls = [json.loads(line) for line in Path(env["STUB_LOG"]).read_text().splitlines()]
        assert {"scontrol": ["requeue", "4242"]} in calls, tail
