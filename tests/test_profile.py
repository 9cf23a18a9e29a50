"""Profiling runs (bench/profile.py) and the step timer's clocks (trainer/meters.py).

- The step timer on an asynchronous device, simulated on the CPU (a fake device whose work finishes after
  the host has moved on): images/s and the data-wait fraction are the device's, and a host clock would get
  them wrong; the marks are read with one synchronisation per window.
- The stage table's arithmetic, the trace's GPU utilisation and the range recorder, on constructed inputs.
- ``bench.py profile`` end to end on generated shards with a tiny model: the stages cover >= 90% of the
  independently clocked step; a loader slowed by a known delay is input-bound with the delay in "data
  wait"; a model slowed the same way is compute-bound with the delay in "forward"; 2 gloo ranks give a table
  each with the all-reduce. On CUDA (marked gpu): CUDA events measure device time, and the trace's GPU
  utilisation is read.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, make_shards, tiny
from torch.autograd.profiler import record_function

from simclr_dali.bench.profile import verdict
from simclr_dali.bench.step_marks import (
    StageRecorder,
    gpu_utilisation,
    read_trace,
    stage_table,
    union_length,
)
from simclr_dali.trainer.config import TrainConfig, config_from_dict
from simclr_dali.trainer.meters import HostClock, StepTimer

# --------------------------------------------------------------------------- the step timer on an asynchronous device


class FakeAsyncDevice:
    """Host and device time of an asynchronous accelerator. The host queues work and moves on; the device runs
    it in order. A mark (an event) completes when the device reaches it, never before the host records it."""

    def __init__(self):
        self.host = 0.0
        self.device_free = 0.0
        self.syncs = 0

    def host_work(self, seconds: float) -> None:
        self.host += seconds

    def launch(self, device_seconds: float, host_seconds: float = 0.002) -> None:
        self.device_free = max(self.host, self.device_free) + device_seconds
        self.host += host_seconds

    # the clock interface of trainer.meters
    def mark(self) -> float:
        return max(self.host, self.device_free)

    def seconds(self, start: float, end: float) -> float:
        return end - start

    def synchronize(self) -> None:
        self.syncs += 1
        self.host = max(self.host, self.device_free)


class HostClockOfFakeDevice(FakeAsyncDevice):
    """What a host clock sees on the same device: the host's own time."""

    def mark(self) -> float:
        return self.host


def run_steps(device, timer, steps: int, data_s: float, compute_s: float) -> None:
    for _ in range(steps):
        timer.start_wait()
        device.host_work(data_s)  # the host blocks in next(loader)
        timer.end_wait()
        device.launch(compute_s)  # forward/backward/optimizer queued; the device runs them later
        timer.end_step()


# Ten steps after a window was read (that read synchronised: the first step starts on an idle device).
@pytest.mark.parametrize(
    "data_s,compute_s,steps_total,wait_total",
    [
        # compute-bound: the host's 1 ms waits overlap the device's 20 ms steps, except the first one's
        (0.001, 0.020, 0.001 + 10 * 0.020, 0.001),
        # input-bound: per step the device idles 30 ms wait + 2 ms launch - 10 ms of the last step's work
        (0.030, 0.010, 0.040 + 9 * 0.032, 0.030 + 9 * 0.022),
    ],
)
def test_step_timer_measures_an_asynchronous_device_on_its_own_clock(
    data_s, compute_s, steps_total, wait_total
):
    device = FakeAsyncDevice()
    timer = StepTimer(images_per_step=64, clock=device)
    run_steps(device, timer, 3, data_s, compute_s)
    timer.window()  # warm-up window: the device starts idle
    run_steps(device, timer, 10, data_s, compute_s)
    assert device.syncs == 1  # marks are only read when a window is read
    stats = timer.window()
    assert device.syncs == 2
    assert stats["images_per_s"] == pytest.approx(10 * 64 / steps_total, rel=1e-9)
    assert stats["data_wait_fraction"] == pytest.approx(wait_total / steps_total, rel=1e-9)

    naive = HostClockOfFakeDevice()
    naive_timer = StepTimer(images_per_step=64, clock=naive)
    run_steps(naive, naive_timer, 3, data_s, compute_s)
    naive_timer.window()
    run_steps(naive, naive_timer, 10, data_s, compute_s)
    wrong = (
        naive_timer.window()
    )  # host clocks: launch time for compute, host waits the device never saw
    assert (
        wrong["images_per_s"] > 1.2 * stats["images_per_s"]
        or wrong["data_wait_fraction"] > stats["data_wait_fraction"] + 0.2
    )


def test_step_timer_summary_and_history_cover_every_step():
    device = FakeAsyncDevice()
    timer = StepTimer(images_per_step=8, clock=device, keep_steps=True)
    run_steps(device, timer, 4, 0.001, 0.010)
    timer.window()
    run_steps(device, timer, 6, 0.001, 0.010)
    summary = timer.summary()
    assert summary["steps_timed"] == 10 and len(timer.history) == 10
    assert sum(step for _, step in timer.history) == pytest.approx(
        10 * 8 / summary["mean_images_per_s"]
    )
    assert (
        timer.window()["images_per_s"] > 0
    )  # the six steps after the first window, read by summary()


def test_step_timer_host_clock_on_the_cpu():
    timer = StepTimer(images_per_step=10, device="cpu")
    assert isinstance(timer.clock, HostClock)
    for _ in range(3):
        timer.start_wait()
        time.sleep(0.02)
        timer.end_wait()
        time.sleep(0.03)
        timer.end_step()
    stats = timer.window()
    assert 0.3 < stats["data_wait_fraction"] < 0.5
    assert 120 < stats["images_per_s"] < 205  # 10 images per >= 50 ms


# --------------------------------------------------------------------------- the stage table, trace and recorder


def test_stage_table_attributes_and_leaves_the_rest_unattributed():
    # two steps on one clock: data wait, the micro-batch stages of another step function, a repeated range
    steps = [
        [
            ("data wait", 0.0, 0.1),
            ("forward (no grad)", 0.1, 0.3),
            ("loss", 0.3, 0.35),
            ("forward + backward (micro-batch)", 0.35, 0.55),
            ("forward + backward (micro-batch)", 0.55, 0.75),
            ("optimizer", 0.75, 0.8),
        ],
        [
            ("data wait", 1.0, 1.3),
            ("forward (no grad)", 1.3, 1.5),
            ("loss", 1.5, 1.55),
            ("forward + backward (micro-batch)", 1.55, 1.75),
            ("forward + backward (micro-batch)", 1.75, 1.95),
            ("optimizer", 1.95, 2.0),
        ],
    ]
    allreduce = [[(0.6, 0.7), (0.65, 0.72)], [(1.8, 1.9)]]
    table = stage_table(steps, [0.9, 1.0], allreduce)
    names = [row["name"] for row in table["stages"]]
    assert names == [
        "data wait",
        "loss",
        "optimizer",
        "forward (no grad)",
        "forward + backward (micro-batch)",
    ]  # canonical first
    rows = {row["name"]: row for row in table["stages"]}
    assert rows["data wait"]["mean_ms"] == pytest.approx(200) and rows["data wait"][
        "p90_ms"
    ] == pytest.approx(280)
    assert (
        rows["forward + backward (micro-batch)"]["mean_ms"] == pytest.approx(400)
        and rows["forward + backward (micro-batch)"]["ranges_per_step"] == 2
    )
    assert table["step"]["mean_ms"] == pytest.approx(950)
    assert table["unattributed"]["mean_ms"] == pytest.approx(50)  # (0.9 - 0.8 and 1.0 - 1.0) / 2
    assert table["attributed_share"] == pytest.approx(1.8 / 1.9)
    assert sum(row["share"] for row in table["stages"]) + table["unattributed"][
        "share"
    ] == pytest.approx(1.0)
    assert table["allreduce"]["in_flight"]["mean_ms"] == pytest.approx((120 + 100) / 2)
    # exposed: in flight after the last launch (0.65 -> 0.72, 1.8 -> 1.9), within the stage that launched it
    assert table["allreduce"]["exposed"]["mean_ms"] == pytest.approx((70 + 100) / 2)
    late = stage_table(steps[:1], [0.9], [[(0.6, 0.7), (0.74, 0.78)]])[
        "allreduce"
    ]  # a bucket still running after the stage
    assert late["exposed"]["mean_ms"] == pytest.approx(10) and late["in_flight"][
        "mean_ms"
    ] == pytest.approx(140)
    with pytest.raises(ValueError, match="2 steps of stage marks but 1 clocked"):
        stage_table(steps, [0.9])


def test_union_length():
    assert union_length([]) == 0
    assert union_length([(0, 1), (0.5, 2), (3, 4), (3.5, 3.6)]) == pytest.approx(3)


def test_gpu_utilisation_is_busy_kernel_time_over_the_window():
    events = [
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#1", "ts": 1000, "dur": 1000},
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#2", "ts": 2000, "dur": 1000},
        {
            "ph": "X",
            "cat": "gpu_user_annotation",
            "name": "ProfilerStep#2",
            "ts": 0,
            "dur": 9000,
        },  # device-side copy: ignored
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 1100, "dur": 400},
        {
            "ph": "X",
            "cat": "kernel",
            "name": "b",
            "ts": 1300,
            "dur": 400,
        },  # overlaps a (two streams): 1100..1700
        {
            "ph": "X",
            "cat": "kernel",
            "name": "c",
            "ts": 2900,
            "dur": 300,
        },  # half outside the window
        {"ph": "X", "cat": "kernel", "name": "d", "ts": 100, "dur": 300},  # before the window
        {"ph": "X", "cat": "gpu_memcpy", "name": "copy", "ts": 2000, "dur": 100},
    ]
    result = gpu_utilisation(events)
    assert result["kernel_busy_fraction"] == pytest.approx((600 + 100) / 2000)
    assert result["kernel_or_copy_busy_fraction"] == pytest.approx((600 + 100 + 100) / 2000)
    assert gpu_utilisation([e for e in events if e["cat"] != "kernel"]) is None  # a CPU trace


def test_stage_recorder_takes_the_top_level_ranges_of_the_training_thread():
    original = record_function.__enter__
    recorder = StageRecorder(HostClock())
    with recorder:
        recorder.begin_step()
        with record_function("ProfilerStep#7"):  # the profiler's own range is transparent
            with record_function("forward"):
                with record_function("inner"):  # nested: part of forward
                    pass
            other = threading.Thread(target=lambda: record_function("other thread").__enter__())
            other.start()
            other.join()

            @record_function("decorated stage")
            def stage():
                time.sleep(0.01)

            stage()
    assert record_function.__enter__ is original  # restored
    names = [name for name, _, _ in recorder.steps[0]]
    assert names == ["forward", "decorated stage"]
    start, end = recorder.steps[0][1][1:]
    assert end - start >= 0.01


def test_verdict():
    assert verdict(256, 1.0, 0.5, 300.0)["bound"] == "input-bound"  # half the step waiting
    assert (
        verdict(256, 1.0, 0.0, 100.0)["bound"] == "input-bound"
    )  # the pipeline cannot deliver 256 img/s
    line = verdict(256, 1.0, 0.01, 5000.0)
    assert line["bound"] == "compute-bound" and line["line"].startswith(
        "compute-bound: the step consumes 259 img/s, the pipeline delivers 5000 img/s"
    )
    assert verdict(256, 1.0, 0.3, None)["line"].startswith(
        "input-bound: the pipeline delivers (not measured), the step consumes 366 img/s"
    )


# --------------------------------------------------------------------------- bench.py profile end to end

TINY = tiny("tracker", "log_every", "checkpoint_every", batch_size=32, epochs=10, shuffle_buffer=64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory, _ = make_shards(tmp_path_factory.mktemp("profile"), 480, per_shard=160)
    return directory


def tiny_config(shards, **overrides) -> TrainConfig:
    return config_from_dict(
        {"train_shards": str(shards), **TINY, **overrides}
    )  # TINY: the flat spelling


class SlowLoader:
    """A loader whose every batch arrives ``delay`` seconds late (a slow filesystem, say)."""

    def __init__(self, loader, delay: float):
        self.loader, self.delay = loader, delay

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch


def profile(cfg, tmp_path, **factories):
    from simclr_dali.bench.profile import run

    return run(
        cfg,
        warmup_steps=1,
        profile_steps=4,
        pipeline_seconds=1.0,
        trace_dir=tmp_path,
        quiet=True,
        **factories,
    )


@pytest.fixture(scope="module")
def baseline(shards, tmp_path_factory):
    """The tiny model's profile with nothing slowed."""
    return profile(tiny_config(shards), tmp_path_factory.mktemp("baseline"))


@pytest.fixture(scope="module")
def delay_s(baseline) -> float:
    """A known delay three times the step's own compute (on a busy shared CPU that can be long), >= 0.2 s."""
    compute_ms = (
        baseline["table"]["step"]["mean_ms"]
        - next(r for r in baseline["table"]["stages"] if r["name"] == "data wait")["mean_ms"]
    )
    return min(5.0, max(0.2, 3 * compute_ms / 1000))


def test_profile_stages_cover_the_independently_clocked_step(baseline):
    table = baseline["table"]
    assert [row["name"] for row in table["stages"]] == [
        "data wait",
        "forward",
        "loss",
        "backward",
        "optimizer",
    ]
    assert table["attributed_share"] >= 0.9
    assert (
        table["unattributed"]["mean_ms"] >= -0.5
    )  # the stages lie inside the step: nothing counted twice
    assert (
        baseline["steps"] == 4
        and baseline["images_per_s"] > 0
        and baseline["table"]["allreduce"] is None
    )
    events = read_trace(baseline["trace"])
    names = {e.get("name") for e in events}
    assert {"data wait", "forward", "loss", "backward", "optimizer"} <= names
    assert sum(1 for e in events if str(e.get("name")).startswith("ProfilerStep#")) == 4
    assert baseline["memory"]["peak_rss_gib"] > 0 and baseline["gpu_utilisation"] is None
    assert baseline["pipeline_alone"]["images_per_s"] > 0


def test_slow_loader_is_input_bound_with_the_delay_in_data_wait(shards, tmp_path, delay_s):
    from simclr_dali.trainer.data import build_train_loader

    result = profile(
        tiny_config(shards),
        tmp_path,
        loader_factory=lambda *a: SlowLoader(build_train_loader(*a), delay_s),
    )
    rows = {row["name"]: row for row in result["table"]["stages"]}
    assert (
        delay_s * 1000 <= rows["data wait"]["mean_ms"] < delay_s * 1500 + 50
    )  # the delay, and little else
    assert result["verdict"]["bound"] == "input-bound", result["verdict"]["line"]
    assert result["verdict"]["line"].startswith("input-bound: the pipeline delivers")
    assert result["pipeline_alone"]["images_per_s"] <= 32 / delay_s
    # The meter's data-wait fraction agrees with the stage table of the same run (the delay's share of the step
    # depends on how busy the shared CPU is, so it is compared with this run's own step, not a fixed number).
    share = rows["data wait"]["mean_ms"] / result["table"]["step"]["mean_ms"]
    assert abs(result["data_wait_fraction"] - share) < 0.05, (result["data_wait_fraction"], share)
    assert result["table"]["attributed_share"] >= 0.9


def test_slow_model_is_compute_bound_with_the_delay_in_forward(shards, tmp_path, delay_s):
    from simclr_dali.trainer.build import build_model

    def slow_model(*args):
        model = build_model(*args)
        model.register_forward_pre_hook(lambda module, inputs: time.sleep(delay_s))
        return model

    result = profile(tiny_config(shards), tmp_path, model_factory=slow_model)
    rows = {row["name"]: row for row in result["table"]["stages"]}
    assert rows["forward"]["mean_ms"] >= delay_s * 1000
    assert rows["data wait"]["mean_ms"] < delay_s * 1000 / 2
    assert result["verdict"]["bound"] == "compute-bound", result["verdict"]["line"]
    assert result["table"]["attributed_share"] >= 0.9


def test_profile_command_writes_table_trace_and_json(shards, tmp_path, capsys):
    from simclr_dali.bench.profile import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "train_shards": str(shards)}))
    out = tmp_path / "result.json"
    payload = main(
        [
            "--config",
            str(config),
            "--warmup_steps",
            "1",
            "--profile_steps",
            "2",
            "--pipeline_seconds",
            "0.5",
            "--trace_dir",
            str(tmp_path / "trace"),
            "--json",
            str(out),
            "--batch_size",
            "16",
        ]
    )
    printed = capsys.readouterr().out
    assert "unattributed (step - stages)" in printed and "step (independent clock)" in printed
    assert printed.count("-bound: ") == 1
    saved = json.loads(out.read_text())
    assert (
        saved["benchmark"] == "profile_tiny"
        and saved["per_rank"][0]["local_batch"] == 16 == saved["config"]["batch_size"]
    )
    assert saved["verdict"]["line"] == payload["verdict"]["line"] and "environment" in saved
    with gzip.open(tmp_path / "trace" / "rank0.pt.trace.json.gz", "rt") as handle:
        assert json.load(handle)["traceEvents"]


def test_profile_bad_input_exits_2_naming_it(shards, tmp_path, capsys):
    from simclr_dali.bench.profile import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "train_shards": str(shards)}))
    for flags, named in [
        (["--train_shards", str(tmp_path / "nowhere")], "nowhere"),
        (["--batch_size", "0"], "batch_size"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", str(config), *flags])
        assert exit_info.value.code == 2
        assert named in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_profile_each_rank_and_the_allreduce(shards, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "train_shards": str(shards)}))
    out = tmp_path / "ddp.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "bench.py",
        "profile",
        "--config",
        str(config),
        "--warmup_steps",
        "1",
        "--profile_steps",
        "3",
        "--pipeline_seconds",
        "0.5",
        "--trace_dir",
        str(tmp_path / "trace"),
        "--json",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        "rank 0 (cpu" in result.stdout
        and "rank 1 (cpu" in result.stdout
        and "all-reduce in flight" in result.stdout
    ), result.stdout
    saved = json.loads(out.read_text())
    assert saved["world_size"] == 2 and [r["rank"] for r in saved["per_rank"]] == [0, 1]
    for rank in saved["per_rank"]:
        allreduce = rank["table"]["allreduce"]
        backward = next(row for row in rank["table"]["stages"] if row["name"] == "backward")
        assert allreduce["buckets_per_step"] >= 1 and allreduce["in_flight"]["mean_ms"] > 0
        assert 0 <= allreduce["exposed"]["mean_ms"] <= backward["mean_ms"]
        assert rank["table"]["attributed_share"] >= 0.9
    names = {e.get("name") for e in read_trace(tmp_path / "trace" / "rank1.pt.trace.json.gz")}
    assert any(str(n).startswith("all-reduce (bucket") for n in names)


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_cuda_events_measure_device_time_not_launch_time():
    device = torch.device("cuda")
    torch.cuda._sleep(1000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    torch.cuda.synchronize()
    spin_s = start.elapsed_time(end) / 1000  # what one spin costs on this GPU
    timer = StepTimer(images_per_step=8, device=device)
    host_start = time.perf_counter()
    for _ in range(5):
        timer.start_wait()
        timer.end_wait()
        torch.cuda._sleep(50_000_000)  # returns at once; the device spins
        timer.end_step()
    host_s = time.perf_counter() - host_start
    stats = timer.window()
    assert host_s < 5 * spin_s / 2  # the host did not wait for the device
    assert stats["images_per_s"] == pytest.approx(8 / spin_s, rel=0.1)
    assert stats["data_wait_fraction"] < 0.05


@pytest.mark.gpu
def test_profile_on_cuda_reads_gpu_utilisation(shards, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {**TINY, "train_shards": str(shards), "precision": "bf16", "data_device": "gpu"}
        )
    )
    command = [
        sys.executable,
        "bench.py",
        "profile",
        "--config",
        str(config),
        "--warmup_steps",
        "2",
        "--profile_steps",
        "4",
        "--pipeline_seconds",
        "1",
        "--trace_dir",
        str(tmp_path / "trace"),
        "--json",
        str(tmp_path / "cuda.json"),
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600
    )  # its own process: bf16 Accelerate state
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads((tmp_path / "cuda.json").read_text())
    rank = saved["per_rank"][0]
    assert saved["clock"].startswith("CUDA events") and rank["device"].startswith("cuda")
    utilisation = rank["gpu_utilisation"]
    assert (
        utilisation and utilisation["kernels"] > 0 and 0 < utilisation["kernel_busy_fraction"] <= 1
    )
    assert rank["table"]["attributed_share"] >= 0.9 and rank["memory"]["peak_allocated_gib"] > 0
    assert np.isfinite(rank["images_per_s"]) and "GPU utilisation" in result.stdout
