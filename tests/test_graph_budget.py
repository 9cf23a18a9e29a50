"""The per-sample CPU operator budget of the loaders' DALI graphs, for every preset, on both backends (issue 29).

DALI runs a CPU operator sample by sample with a fixed cost of about a microsecond per sample however little it
computes, so a GPU-decoding graph whose views are made of ~80 small CPU operators spends the host's cores on
bookkeeping. The views' per-sample decisions come from one compiled operator per view (``pipeline/view_plan.py``);
these tests hold that: the graphs are defined (``Pipeline._build_graph``: no GPU, no shards needed) and their
operators counted. On the GPU graph every CPU operator counts and none may read decoded pixels (no edge copies
them back to the CPU); on the CPU graph the operators that do not touch pixels (the bookkeeping) count.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from simclr_dali.pipeline.augment import AugmentConfig
from simclr_dali.pipeline.loader import (
    _DALI_DTYPES,
    AugmentedView,
    TwoViews,
    _pipeline,
    classifier_augment,
)
from simclr_dali.trainer.config import load_config
from simclr_dali.trainer.data import augment_config

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
GPU_GRAPH_CPU_OPS = 12  # every CPU operator of a GPU graph, the reader included
CPU_GRAPH_BOOKKEEPING_PER_VIEW = (
    12  # CPU operators of a CPU graph that do not touch pixels, per view
)
DECODERS = {"Image", "ImageSlice", "ImageRandomCrop"}


def _views(preset: str) -> dict[str, object]:
    """The views a preset's runs build: its pretraining views, with ROI decode too, and the classifier's."""
    augment = augment_config(load_config(ROOT / "configs" / preset))
    roi = AugmentConfig(**{**augment.__dict__, "roi_decode": True})
    return {
        "two_views": TwoViews(augment),
        "two_views_roi": TwoViews(roi),
        "classifier": AugmentedView(classifier_augment(augment.size)),
    }


def _operators(view, device: str) -> list:
    """The operators of the loader's pipeline for ``view`` on ``device`` ('gpu': its graph only, no GPU used)."""
    dtype = torch.float16 if device == "gpu" else torch.float32
    pipe = _pipeline(
        [Path("/nonexistent/train-000000.tar")],
        [Path("/nonexistent/train-000000.idx")],
        view,
        device,
        0,
        1,
        True,
        16,
        1,
        _DALI_DTYPES[dtype],
        batch_size=4,
        num_threads=1,
        device_id=0 if device == "gpu" else None,
        seed=1,
    )
    pipe._build_graph()
    return pipe._ops


def _name(op) -> str:
    return type(op._op).__name__


def _inputs(op):
    for edge in op.inputs:
        yield from edge if isinstance(edge, list) else [edge]


def _pixel_ops(ops) -> set[int]:
    """ids of the operators downstream of a decoder (the decoder included): those that carry pixels."""
    pixels: set[int] = set()
    for op in ops:  # topologically sorted
        if _name(op) in DECODERS or any(id(edge.source) in pixels for edge in _inputs(op)):
            pixels.add(id(op))
    return pixels


def _census(ops) -> str:
    return str(sorted(collections.Counter((op._op.device, _name(op)) for op in ops).items()))


@pytest.mark.parametrize("preset", PRESETS)
def test_gpu_graphs_spend_a_dozen_cpu_operators_and_never_copy_pixels_back(preset):
    for name, view in _views(preset).items():
        ops = _operators(view, "gpu")
        cpu = [op for op in ops if op._op.device == "cpu"]
        assert len(cpu) <= GPU_GRAPH_CPU_OPS, (
            f"{preset} {name}: {len(cpu)} CPU operators: {_census(cpu)}"
        )
        pixels = _pixel_ops(ops)
        back = [op for op in cpu if id(op) in pixels]
        assert not back, f"{preset} {name}: CPU operators read decoded pixels: {_census(back)}"
        assert any(_name(op) in DECODERS and op._op.device == "mixed" for op in ops), (
            name
        )  # decoded on the GPU


@pytest.mark.parametrize("preset", PRESETS)
def test_cpu_graphs_keep_their_bookkeeping_to_a_dozen_operators_a_view(preset):
    for name, view in _views(preset).items():
        ops = _operators(view, "cpu")
        pixels = _pixel_ops(ops)
        bookkeeping = [op for op in ops if id(op) not in pixels]
        budget = CPU_GRAPH_BOOKKEEPING_PER_VIEW * len(view.outputs)
        assert len(bookkeeping) <= budget, (
            f"{preset} {name}: {len(bookkeeping)}: {_census(bookkeeping)}"
        )
        assert all(op._op.device == "cpu" for op in ops)


def test_the_census_sees_what_it_counts():
    """The counting itself: a GPU graph's plan operators are found (one per view), and a graph that crops on the
    decoded images' shape (``images.shape()`` after a GPU decoder) is caught copying from the decoder's side."""
    from nvidia.dali import fn, pipeline_def, types

    from simclr_dali.pipeline.augment import decode, simclr_view

    ops = _operators(TwoViews(AugmentConfig()), "gpu")
    assert sum(_name(op) == "NumbaFunction" and op._op.device == "cpu" for op in ops) == 2

    @pipeline_def(enable_conditionals=True, batch_size=2, num_threads=1, device_id=0)
    def shape_after_decoder():
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
        return simclr_view(decode(jpegs, "gpu"), AugmentConfig())

    pipe = shape_after_decoder()
    pipe._build_graph()
    cpu = [op for op in pipe._ops if op._op.device == "cpu"]
    assert any(id(op) in _pixel_ops(pipe._ops) for op in cpu)  # the shape is read after the decoder
