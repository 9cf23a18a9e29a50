"""Gradient caching (``micro_batch``, trainer/gradcache.py): the micro-batched step's gradients are the plain
step's without batch statistics and the micro-batch-BN objective's with them (1 process and 2 gloo
processes), BN running statistics are updated once per step, the grad pass replays the no-grad pass's random
draws bitwise, one DDP gradient reduction per step, bf16 + channels-last, the profiler ranges, the flag and
``auto``'s search."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import subprocess
import sys
import traceback
import types

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import ROOT
from microbatch_steps import (
    GLOBAL_BATCH,
    TINY,
    bn_buffers,
    ghost_bn_reference,
    global_views,
    recorded_step,
)
from torch.nn.modules.batchnorm import _BatchNorm

from simclr_dali.trainer import gradcache
from simclr_dali.trainer.build import build_model, prepare_for_training
from simclr_dali.trainer.config import ConfigError, TrainConfig, parse_args
from simclr_dali.trainer.optim import build_optimizer
from simclr_dali.trainer.step import train_step

DROPOUT = {**TINY.model.timm_kwargs, "drop_path_rate": 0.3, "drop_rate": 0.3}


@pytest.fixture
def make_accelerator():
    """A fresh CPU Accelerator of the given precision (accelerate keeps one global state per process)."""

    def make(precision: str = "no") -> Accelerator:
        AcceleratorState._reset_state(True)
        return Accelerator(cpu=True, mixed_precision=precision)

    yield make
    AcceleratorState._reset_state(True)


def relative_errors(got: dict, expected: dict) -> dict:
    """{name: ||got - expected|| / ||expected||} (0 where both are zero, inf where only expected is)."""
    assert got.keys() == expected.keys()
    errors = {}
    for name, value in expected.items():
        difference, norm = (
            (got[name].double() - value.double()).norm().item(),
            value.double().norm().item(),
        )
        errors[name] = difference / norm if norm > 0 else (0.0 if difference == 0 else math.inf)
    return errors


def assert_close(got: dict, expected: dict, tolerance: float, what: str):
    errors = relative_errors(got, expected)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tolerance, (
        f"{what}: {worst} differs by {errors[worst]:.2e} (relative), > {tolerance:g}"
    )


class Recorder(torch.nn.Module):
    """The model, recording every call's projections and whether autograd was on."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.calls: list[tuple[bool, torch.Tensor]] = []

    def forward(self, x):
        h, z = self.model(x)
        self.calls.append((torch.is_grad_enabled(), z.detach().clone()))
        return h, z


def prepared(cfg: TrainConfig, accelerator, wrap=None, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg, "cpu", 1)
    model = wrap(model) if wrap else model
    optimizer = build_optimizer(model, cfg)
    return prepare_for_training(accelerator, model, optimizer)


# --------------------------------------------------------------------------- splitting


def test_micro_batches_are_near_equal_and_cover_the_batch():
    for num_images in range(1, 70):
        for micro_batch in range(1, 75):
            sizes = gradcache.micro_batch_sizes(num_images, micro_batch)
            assert sum(sizes) == num_images and len(sizes) == math.ceil(num_images / micro_batch)
            assert max(sizes) <= micro_batch and max(sizes) - min(sizes) <= 1
    assert gradcache.micro_batch_sizes(4096, 256) == [256] * 16


# --------------------------------------------------------------------------- one process


@pytest.mark.parametrize("micro_batch", [1, 3, 15])
def test_gradients_equal_the_plain_step_without_batch_statistics(make_accelerator, micro_batch):
    """BN in eval mode, no dropout, float32: the micro-batched step hands the optimiser the plain step's
    gradients (to 1e-5 relative per tensor), the same loss and projections; 3 and 15 split 16 unevenly."""
    accelerator = make_accelerator()
    view1, view2 = global_views()
    plain = recorded_step(TINY, accelerator, view1, view2, bn_eval=True)
    micro = recorded_step(
        dataclasses.replace(TINY, micro_batch=micro_batch), accelerator, view1, view2, bn_eval=True
    )
    assert_close(micro["grads"], plain["grads"], 1e-5, f"micro_batch {micro_batch} vs plain")
    assert micro["loss"] == pytest.approx(plain["loss"], rel=1e-6)


def test_micro_batch_at_least_the_batch_is_the_plain_step(make_accelerator):
    accelerator = make_accelerator()
    view1, view2 = global_views()
    plain = recorded_step(TINY, accelerator, view1, view2)
    whole = recorded_step(
        dataclasses.replace(TINY, micro_batch=GLOBAL_BATCH), accelerator, view1, view2
    )
    assert all(torch.equal(whole["grads"][k], plain["grads"][k]) for k in plain["grads"])
    assert all(torch.equal(whole["buffers"][k], plain["buffers"][k]) for k in plain["buffers"])


@pytest.mark.parametrize("micro_batch, momentum", [(2, 0.1), (4, None), (8, 0.3)])
def test_ghost_bn_gradients_and_running_statistics_match_the_direct_reference(
    make_accelerator, micro_batch, momentum
):
    """BN in train mode (float64): the gradients are those of the micro-batch-BN objective computed directly
    (each micro-batch normalised alone, the paper's loss over all rows), and the running statistics got ONE
    update with the mean of the micro-batches' statistics (not k updates, not the no-grad pass's too)."""
    accelerator = make_accelerator()
    view1, view2 = global_views()
    cfg = dataclasses.replace(TINY, micro_batch=micro_batch)
    got = recorded_step(cfg, accelerator, view1, view2, dtype=torch.float64, momentum=momentum)
    expected = ghost_bn_reference(TINY, view1, view2, micro_batch, world=1, momentum=momentum)
    # 1e-6: the step computes the loss in float32 (z.float()); the rest of the step is float64
    assert_close(
        got["grads"], expected["grads"], 1e-6, "micro-batched step vs micro-batch-BN objective"
    )
    assert_close(got["buffers"], expected["buffers"], 1e-12, "running statistics")
    assert all(int(v) == 1 for k, v in got["buffers"].items() if k.endswith("num_batches_tracked"))


def test_running_statistics_decay_per_step_as_a_plain_step(make_accelerator):
    """Two micro-batched steps on a batch whose micro-batches are identical copies: the running statistics
    are exactly what two plain steps on one copy give (per-step decay unchanged by the number of micro-batches)."""
    accelerator = make_accelerator()
    view1, view2 = global_views(batch=4)
    tiled1, tiled2 = view1.repeat(4, 1, 1, 1), view2.repeat(4, 1, 1, 1)
    states = []
    for cfg, v1, v2 in [
        (TINY, view1, view2),
        (dataclasses.replace(TINY, micro_batch=4), tiled1, tiled2),
    ]:
        model, optimizer = prepared(
            dataclasses.replace(cfg, lr=0.0), accelerator
        )  # weights stay: only BN moves
        model = model.double()
        for _ in range(2):
            train_step(model, optimizer, v1.double(), v2.double(), cfg, accelerator)
        states.append(bn_buffers(model))
    assert_close(states[1], states[0], 1e-12, "running statistics after two steps")
    assert all(int(v) == 2 for k, v in states[1].items() if k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("fail_at", ["no-grad pass", "grad pass"])
def test_a_failing_pass_leaves_running_statistics_and_momentum_unchanged(make_accelerator, fail_at):
    accelerator = make_accelerator()
    cfg = dataclasses.replace(TINY, micro_batch=4)
    model, optimizer = prepared(cfg, accelerator)
    before = bn_buffers(model)
    momenta = [m.momentum for m in model.modules() if isinstance(m, _BatchNorm)]
    calls = [0]
    failing_call = 2 if fail_at == "no-grad pass" else 4 + 2  # 4 micro-batches in each pass

    def fail(module, inputs):
        calls[0] += 1
        if calls[0] == failing_call:
            raise RuntimeError("injected failure")

    model.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        train_step(model, optimizer, *global_views(), cfg, accelerator)
    assert all(torch.equal(v, before[k]) for k, v in bn_buffers(model).items())
    assert [m.momentum for m in model.modules() if isinstance(m, _BatchNorm)] == momenta


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_grad_pass_replays_the_no_grad_pass_bitwise_with_drop_path_and_dropout(
    make_accelerator, precision
):
    """Stochastic depth and dropout on, channels-last, float32 or bf16 autocast: every micro-batch's
    projections in the grad pass are bitwise those of its no-grad pass (and the draws do differ between
    two plain forwards, so the equality is the replay's doing)."""
    accelerator = make_accelerator(precision)
    cfg = dataclasses.replace(
        TINY,
        micro_batch=4,
        precision=precision,
        model=dataclasses.replace(TINY.model, timm_kwargs=DROPOUT),
    )
    model, optimizer = prepared(cfg, accelerator, wrap=Recorder)
    view1, view2 = global_views()
    train_step(model, optimizer, view1, view2, cfg, accelerator)
    k = GLOBAL_BATCH // 4
    assert [grad for grad, _ in model.calls] == [False] * k + [True] * k
    for j in range(k):
        assert torch.equal(model.calls[j][1], model.calls[k + j][1]), (
            f"micro-batch {j}: other random draws"
        )
    assert model.calls[0][1].dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    with torch.no_grad(), accelerator.autocast():
        x = torch.cat([view1[:4], view2[:4]])
        assert not torch.equal(model(x)[1], model(x)[1]), (
            "dropout is not active: this test would prove nothing"
        )


def test_the_random_stream_continues_as_after_one_forward(make_accelerator):
    """After a micro-batched step the global RNG is where the no-grad pass left it (the replay is forked)."""
    accelerator = make_accelerator()
    cfg = dataclasses.replace(
        TINY, micro_batch=4, model=dataclasses.replace(TINY.model, timm_kwargs=DROPOUT)
    )
    model, optimizer = prepared(cfg, accelerator, wrap=Recorder)
    view1, view2 = global_views()
    torch.manual_seed(5)
    train_step(model, optimizer, view1, view2, cfg, accelerator)
    after_step = torch.rand(3)
    torch.manual_seed(5)
    with torch.no_grad():
        for j in range(4):
            model(torch.cat([view1[4 * j : 4 * j + 4], view2[4 * j : 4 * j + 4]]))
    assert torch.equal(after_step, torch.rand(3))


def test_bf16_autocast_channels_last_step_is_close_to_the_plain_step(make_accelerator):
    """bf16 autocast: projections are bf16, the loss's gradient goes back in the projections' dtype; the
    gradients are the plain bf16 step's to bf16 accuracy (BN in eval mode: no batch statistics)."""
    accelerator = make_accelerator("bf16")
    cfg = dataclasses.replace(TINY, precision="bf16")
    view1, view2 = global_views()
    plain = recorded_step(cfg, accelerator, view1, view2, bn_eval=True)
    micro = recorded_step(
        dataclasses.replace(cfg, micro_batch=4), accelerator, view1, view2, bn_eval=True
    )
    assert all(g.dtype == torch.float32 for g in micro["grads"].values())
    assert_close(micro["grads"], plain["grads"], 3e-2, "bf16 micro-batched vs plain")
    assert micro["loss"] == pytest.approx(plain["loss"], rel=1e-2)


def test_profiler_shows_the_two_passes_once_per_micro_batch(make_accelerator):
    accelerator = make_accelerator()
    cfg = dataclasses.replace(TINY, micro_batch=4)
    model, optimizer = prepared(cfg, accelerator)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        train_step(model, optimizer, *global_views(), cfg, accelerator)
    counts = {}
    for event in profiler.events():
        counts[event.name] = counts.get(event.name, 0) + 1
    assert (
        counts.get("forward (no grad)") == 4 and counts.get("forward + backward (micro-batch)") == 4
    )
    assert counts.get("loss") == 1 and counts.get("optimizer") == 1
    assert "forward" not in counts and "backward" not in counts


# --------------------------------------------------------------------------- two gloo processes


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("microbatch") / "two.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "tests" / "microbatch_steps.py"),
            str(out),
        ],
        cwd=ROOT,
        env=env,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
def test_two_processes_micro_batched_gradients_equal_the_plain_step(
    two_processes, make_accelerator
):
    """2 ranks x 8 images, micro-batches of 2 (and of 3: 3+3+2), BN in eval mode, float32: the gradients after
    DDP's averaging equal the 2-process plain step's and the 1-process plain step's on the global batch."""
    assert two_processes["world"] == 2
    accelerator = make_accelerator()
    one_process = recorded_step(TINY, accelerator, *global_views(), bn_eval=True)
    for key in ("eval_micro", "eval_micro_uneven"):
        assert_close(
            two_processes[key]["grads"],
            two_processes["eval_plain"]["grads"],
            1e-5,
            f"{key} vs 2 plain",
        )
        assert_close(
            two_processes[key]["grads"], one_process["grads"], 1e-5, f"{key} vs 1-process plain"
        )


@pytest.mark.parametrize("key, momentum", [("ghost_micro", 0.1), ("ghost_micro_cumulative", None)])
@pytest.mark.slow
def test_two_processes_global_ghost_bn_matches_the_direct_reference(two_processes, key, momentum):
    """Global BN over each micro-batch across ranks (float64): gradients and running statistics are the
    micro-batch-BN objective's, micro-batch j's BN batch being both ranks' j-th micro-batches."""
    expected = ghost_bn_reference(TINY, *global_views(), micro_batch=2, world=2, momentum=momentum)
    assert_close(
        two_processes[key]["grads"], expected["grads"], 1e-6, "2-process micro-batched vs reference"
    )
    assert_close(two_processes[key]["buffers"], expected["buffers"], 1e-12, "running statistics")


def test_one_ddp_gradient_reduction_per_step(two_processes):
    """A communication hook records the forward call after which each DDP bucket is reduced: with 4
    micro-batches (8 forwards: 4 without grad, 4 with), every reduction follows the last one, and there are
    as many as in a plain step (one per bucket)."""
    micro, plain = two_processes["train_micro"], two_processes["train_plain"]
    assert micro["forwards"] == 8 and plain["forwards"] == 1
    assert plain["reductions"] and set(plain["reductions"]) == {1}
    assert set(micro["reductions"]) == {8} and len(micro["reductions"]) == len(plain["reductions"])


# --------------------------------------------------------------------------- the flag and auto


def test_micro_batch_flag_values():
    assert parse_args(["--train_shards", "x", "--micro_batch", "256"]).micro_batch == 256
    assert parse_args(["--train_shards", "x", "--micro-batch", "0"]).micro_batch == 0
    assert parse_args(["--train_shards", "x", "--micro_batch", "null"]).micro_batch is None
    assert parse_args(["--train_shards", "x", "--micro_batch", "auto"]).micro_batch == "auto"
    for bad in ["-1", "many", "2.5"]:
        with pytest.raises(ConfigError, match="micro_batch"):
            parse_args(["--train_shards", "x", "--micro_batch", bad]).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's answer to auto")
def test_auto_without_cuda_is_a_clear_error(make_accelerator):
    with pytest.raises(ConfigError, match="micro_batch auto probes GPU memory and needs CUDA"):
        TrainConfig(train_shards="x", micro_batch="auto").validate()
    accelerator = make_accelerator()
    cfg = dataclasses.replace(TINY, micro_batch="auto")
    model, optimizer = prepared(cfg, accelerator)
    with pytest.raises(ValueError, match="micro_batch auto measures GPU memory and needs CUDA"):
        train_step(model, optimizer, *global_views(), cfg, accelerator)


def memory_model(
    base: int,
    per_image: int,
    limit: int | None = None,
    curve: float = 0.0,
    calls: list | None = None,
):
    """A GPU's answer to a probe: base + per_image x m (+ curve x m^2), out of memory past ``limit`` bytes."""

    def peak(m: int):
        if calls is not None:
            calls.append(m)
        value = int(base + per_image * m + curve * m * m)
        return None if limit is not None and value > limit else value

    return peak


def test_auto_search_finds_the_largest_fitting_micro_batch():
    """Over linear memory lines (the exact answer), convex curves and out-of-memory cliffs: the answer always
    fits, is within 2% of the largest that fits, and takes few probes."""
    mib = 2**20
    for base in (300 * mib, 2000 * mib):
        for per_image in (3 * mib, 55 * mib, 300 * mib):
            for num_images in (1, 7, 64, 512, 4096):
                for budget in (base + 10 * per_image, base + 333 * per_image + 1, 79 * 2**30):
                    for curve, limit in (
                        (0.0, None),
                        (0.02 * per_image, None),
                        (0.0, base + 100 * per_image),
                    ):
                        calls = []
                        peak = memory_model(base, per_image, limit, curve, calls)
                        fits = lambda m, peak=peak, budget=budget: (
                            peak(m) is not None and peak(m) <= budget
                        )
                        if not fits(1):
                            continue
                        calls.clear()
                        best = gradcache.fit_micro_batch(peak, num_images, budget)
                        probes = list(calls)
                        largest = (
                            max(m for m in range(1, num_images + 1) if fits(m))
                            if num_images < 600
                            else None
                        )
                        assert fits(best), (base, per_image, num_images, budget, curve, limit, best)
                        if largest is not None:
                            assert best >= 0.98 * largest - 1, (
                                per_image,
                                num_images,
                                budget,
                                curve,
                                limit,
                                largest,
                            )
                        if curve == 0 and limit is None:
                            exact = min(num_images, (budget - base) // per_image)
                            assert best == exact and len(probes) <= 4, (best, exact, probes)
                        assert len(probes) <= 14, probes


def test_auto_search_says_when_nothing_fits():
    with pytest.raises(RuntimeError, match="one image per view"):
        gradcache.fit_micro_batch(memory_model(10 * 2**30, 2**30), 256, 2**30)
    with pytest.raises(RuntimeError, match="one image per view"):
        gradcache.fit_micro_batch(memory_model(0, 2**30, limit=2**29), 256, 2**31)


@pytest.mark.gpu
def test_auto_probe_on_cuda_picks_a_micro_batch_that_fits():
    """On a GPU: auto probes once, the chosen micro-batch's step peaks within the memory available, and a
    second step does not probe again."""
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(mixed_precision="bf16")
    cfg = dataclasses.replace(TINY, micro_batch="auto", precision="bf16", batch_size=4096)
    torch.manual_seed(0)
    model = build_model(cfg, "cuda", 1).cuda()
    model, optimizer = prepare_for_training(accelerator, model, build_optimizer(model, cfg))
    views = [v.cuda() for v in global_views(batch=4096, size=32)]
    train_step(model, optimizer, *views, cfg, accelerator)
    key = (4096, tuple(views[0].shape[1:]), views[0].dtype)
    chosen = gradcache._MEASURED[model][key]
    assert 1 <= chosen <= 4096
    probes = []
    original = gradcache.measure_micro_batch
    gradcache.measure_micro_batch = lambda *args: probes.append(args) or 1
    try:
        train_step(model, optimizer, *views, cfg, accelerator)
    finally:
        gradcache.measure_micro_batch = original
    assert not probes
    AcceleratorState._reset_state(True)


# --------------------------------------------------------------------------- train.py


def test_train_py_runs_with_micro_batches(tmp_path, small_shards):
    import json

    from simclr_dali import train

    directory, _ = small_shards
    AcceleratorState._reset_state(True)
    status = train.main(
        [
            "--train_shards",
            str(directory),
            "--image_size",
            "32",
            "--augment",
            "cifar",
            "--backbone",
            "resnet18",
            "--cifar_stem",
            "true",
            "--timm_kwargs",
            json.dumps({"channels": [8, 16, 32, 64]}),
            "--proj_hidden",
            "32",
            "--proj_dim",
            "16",
            "--batch_size",
            "16",
            "--micro_batch",
            "4",
            "--epochs",
            "2",
            "--warmup_epochs",
            "1",
            "--lr",
            "0.5",
            "--temperature",
            "0.2",
            "--precision",
            "no",
            "--tracker",
            "none",
            "--max_steps",
            "3",
            "--checkpoint_every",
            "null",
            "--data_threads",
            "1",
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    AcceleratorState._reset_state(True)
    assert status == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 3 and list((tmp_path / "run").rglob("*.safetensors"))


# --------------------------------------------------------------------------- no host sync in the step

# Tensor methods that read a value back to the host: on CUDA each one waits for the device (a sync).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


@contextlib.contextmanager
def counting_host_reads():
    """Records (method, caller file:line) for every host read of a tensor while inside. On the CPU these cost
    nothing, but each is a device sync when the same code runs on CUDA tensors."""
    calls, originals = [], {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def spy(name, original):
        def wrapper(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            calls.append((name, f"{caller.filename}:{caller.lineno}"))
            return original(self, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, spy(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize(
    "micro_batch,momentum",
    # momentum=None only with micro-batches: in a plain step PyTorch's own BN reads num_batches_tracked then
    [(None, 0.1), (4, 0.1), (4, None)],
)
def test_no_host_sync_in_the_plain_and_micro_batched_step(make_accelerator, micro_batch, momentum):
    """A whole train_step (forward, loss, backward, gradient clipping, optimiser; with micro-batches both passes
    and the once-per-step BN update) reads no tensor back to the host: the GPU never waits for the CPU
    mid-step. (The micro-batched step used to read num_batches_tracked of every BN layer: 23 reads here at
    momentum 0.1, 230 at momentum=None, counted before the fix.)"""
    accelerator = make_accelerator()
    cfg = dataclasses.replace(TINY, micro_batch=micro_batch, grad_clip=1.0)
    model, optimizer = prepared(cfg, accelerator)
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.momentum = momentum
    view1, view2 = global_views()
    train_step(
        model, optimizer, view1, view2, cfg, accelerator
    )  # the first step creates the optimiser state
    with counting_host_reads() as calls:
        train_step(model, optimizer, view1, view2, cfg, accelerator)
    assert not calls, f"{len(calls)} host reads in the step, e.g. {calls[:5]}"


@pytest.mark.gpu
@pytest.mark.parametrize("micro_batch", [None, 4])
def test_no_host_sync_in_the_step_on_cuda(micro_batch):
    """The same step on CUDA (the fused loss included) under torch.cuda.set_sync_debug_mode("error"): any
    synchronising CUDA call raises."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(mixed_precision="bf16")
    cfg = dataclasses.replace(TINY, micro_batch=micro_batch, grad_clip=1.0, precision="bf16")
    torch.manual_seed(0)
    model = build_model(cfg, "cuda", 1)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = prepare_for_training(accelerator, model, optimizer)
    view1, view2 = (view.cuda() for view in global_views())
    try:
        train_step(
            model, optimizer, view1, view2, cfg, accelerator
        )  # warm-up: optimiser state, kernels compiled
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            train_step(model, optimizer, view1, view2, cfg, accelerator)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    finally:
        AcceleratorState._reset_state(True)


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_prepare_for_training_sets_cudnn_benchmark_on_cuda(monkeypatch, device_type):
    """Training shapes are fixed: cuDNN may time its algorithms once per shape (set where the run is prepared)."""

    class Prepared:  # what prepare_for_training uses of an Accelerator, on a device we may not have
        device = torch.device(device_type)

        def prepare(self, *objects):
            return objects

        def unwrap_model(self, model, keep_fp32_wrapper=True):
            return model

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    model = torch.nn.Linear(2, 2)
    prepare_for_training(Prepared(), model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert torch.backends.cudnn.benchmark == (device_type == "cuda")


def test_auto_budget_counts_what_dali_holds_and_frees_nothing(monkeypatch):
    """The budget of ``micro_batch auto`` from mocked memory queries: this process's tensors (allocated) plus
    the fraction of the device's free memory, less the optimiser state; PyTorch's cached, unallocated blocks
    (e.g. the DALI stream's colour-stage blocks) are not counted; nothing calls ``empty_cache``; and the whole
    measurement, run with mocked CUDA queries on a CPU model, stays inside that budget."""
    from simclr_dali.trainer import gradcache

    gib = 2**30
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * gib)
    monkeypatch.setattr(
        torch.cuda, "memory_reserved", lambda device=None: 15 * gib
    )  # 12 GiB cached: not counted
    monkeypatch.setattr(
        torch.cuda, "empty_cache", lambda: pytest.fail("empty_cache frees DALI's cached blocks")
    )
    budget = gradcache.micro_batch_budget(torch.device("cuda", 0), optimizer_state=1 * gib)
    assert budget == 3 * gib + int(gradcache.AUTO_MEMORY_FRACTION * 20 * gib) - 1 * gib
    assert "sync" in calls  # the free memory is read after the device's queued work

    # the measurement loop: peak = allocated + 0.1 GiB per image; 20 GiB free, 0.9 of it -> 180 images fit
    sizes = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(
        torch.cuda, "max_memory_allocated", lambda device=None: 3 * gib + sizes[-1] * gib // 10
    )
    monkeypatch.setattr(torch.random, "fork_rng", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    accelerator = types.SimpleNamespace(
        unwrap_model=lambda m: m, autocast=contextlib.nullcontext, print=lambda *a: None
    )

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            sizes.append(x.shape[0] // 2)
            z = self.linear(x.flatten(1)[:, :4])
            return z, z

    views = torch.zeros(400, 3, 2, 2), torch.zeros(400, 3, 2, 2)
    optimizer = types.SimpleNamespace(state={"step": 1})  # state exists: no optimiser room reserved
    best = gradcache.measure_micro_batch(Recording(), *views, optimizer, accelerator)
    assert best == 180 and max(sizes) <= 400
