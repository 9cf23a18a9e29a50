"""Gradient caching (Gao et al. 2021): batches larger than memory, with the exact NT-Xent gradient of the batch.

``cached_forward_backward`` runs every micro-batch of at most M images per view through the model without
autograd (saving the RNG state before each), takes the loss and its gradient with respect to all 2N cached
projections at once (every process's negatives included), then recomputes each micro-batch with autograd from
its saved RNG state and back-propagates its rows' cached gradient (one all-reduce per step under DDP). Peak
memory is one micro-batch's, for a second forward; batch norm is ghost BN per micro-batch, its running
statistics updated once per step (``RunningStatsOnce``). The passes in detail: docs/training.md.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.profiler import record_function

# Share of the GPU memory available to this process that ``auto`` lets a micro-batch's peak use (the rest:
# allocator fragmentation and what the measurement does not see: the BN layers' train-mode statistics).
AUTO_MEMORY_FRACTION = 0.9
AUTO_FIRST_SIZES = (8, 16)  # images per view of the two measurements the memory line is fitted to


# --------------------------------------------------------------------------- micro-batches


def micro_batch_sizes(num_images: int, micro_batch: int) -> list[int]:
    """Sizes of the k = ceil(num_images / micro_batch) near-equal micro-batches (each <= micro_batch, sizes
    differ by at most 1; the larger ones first, as ``torch.tensor_split``)."""
    if num_images < 1 or micro_batch < 1:
        raise ValueError(
            f"need num_images >= 1 and micro_batch >= 1, got {num_images} and {micro_batch}"
        )
    k = math.ceil(num_images / micro_batch)
    return [num_images // k + (i < num_images % k) for i in range(k)]


def _split(tensor: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    return torch.split(tensor, sizes)  # views: no copy, memory format kept


# --------------------------------------------------------------------------- random state


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU generator's state and, for an accelerator, its device generator's (what dropout draws from)."""
    if device.type == "cpu":
        return torch.get_rng_state(), None
    return torch.get_rng_state(), torch.get_device_module(device.type).get_rng_state(device)


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.get_device_module(device.type).set_rng_state(state[1], device)


# --------------------------------------------------------------------------- batch-norm running statistics


def _tracking_batch_norms(model: nn.Module) -> list[_BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    ]


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Batch-norm layers in train mode normalise with batch statistics as usual, but their running
    statistics (and ``num_batches_tracked``) are left as they were on exit (restored in place). Momentum 1
    meanwhile: with ``momentum=None`` BN would read ``num_batches_tracked`` to the host at every call."""
    layers = _tracking_batch_norms(model)
    saved = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in layers
    ]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 1.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count), momentum in zip(layers, saved, momenta):
                m.momentum = momentum
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


@contextlib.contextmanager
def running_stats_once(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Inside: every train-mode BN layer keeps only its latest batch statistics (momentum 1), and the yielded
    ``record()``, called after each micro-batch's forward and backward, adds them to a per-layer sum.
    On exit: one update of the saved running statistics with their mean (the plain mean of the batch
    statistics, each image counted once), with the layer's momentum (or 1 / (updates + 1) for
    ``momentum=None``), and ``num_batches_tracked`` + 1, as one plain step would; a layer that saw no batch
    keeps its statistics. On an exception, the saved statistics are restored unchanged.
    Tensor ops only (how many batches a layer saw stays on the device, in ``num_batches_tracked``): no host
    sync, where BN's own cumulative mode (``momentum=None``) reads ``num_batches_tracked`` to the host in
    every layer at every call; momentum 1 is also one constant for torch.compile. Meant for layers called
    once per forward (every timm backbone, the projection head)."""
    layers = _tracking_batch_norms(model)
    saved = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
        for m in layers
    ]
    # _tracking_batch_norms keeps only layers that track running statistics: neither is None
    means = [cast(torch.Tensor, m.running_mean) for m in layers]
    variances = [cast(torch.Tensor, m.running_var) for m in layers]
    mean_sums, var_sums = (
        [torch.zeros_like(t) for t in means],
        [torch.zeros_like(t) for t in variances],
    )
    with torch.no_grad():
        for m in layers:
            m.num_batches_tracked.zero_()
            m.momentum = 1.0
        if layers:  # a layer not called in a micro-batch then adds 0
            torch._foreach_zero_(means)
            torch._foreach_zero_(variances)

    def record() -> None:
        if layers:
            with torch.no_grad():  # a few foreach kernels per micro-batch, not a few per layer
                torch._foreach_add_(mean_sums, means)
                torch._foreach_add_(var_sums, variances)
                torch._foreach_zero_(means)
                torch._foreach_zero_(variances)

    completed = False
    try:
        yield record
        completed = True
    finally:
        with torch.no_grad():
            for m, (mean, var, count, momentum), mean_sum, var_sum in zip(
                layers, saved, mean_sums, var_sums
            ):
                m.momentum = momentum
                if completed:
                    batches = m.num_batches_tracked
                    seen = batches > 0
                    if momentum is not None:
                        factor = momentum
                    else:  # the cumulative average's 1 / (updates + 1), on the device
                        factor = (count + 1).to(mean.dtype).reciprocal()
                    divisor = batches.clamp_min(1).to(mean_sum.dtype)
                    batch_mean, batch_var = (
                        (mean_sum / divisor).to(mean.dtype),
                        (var_sum / divisor).to(var.dtype),
                    )
                    m.running_mean.copy_(torch.where(seen, mean.lerp(batch_mean, factor), mean))
                    m.running_var.copy_(torch.where(seen, var.lerp(batch_var, factor), var))
                    m.num_batches_tracked.copy_(count + seen.to(count.dtype))
                else:  # the pass failed: nothing happened
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(count)


# --------------------------------------------------------------------------- the two passes


def _scaled_for_backward(loss: torch.Tensor, accelerator) -> torch.Tensor:
    """What ``accelerator.backward(loss)`` back-propagates: the loss over the accumulation steps, scaled
    by the fp16 gradient scaler when there is one."""
    loss = loss / getattr(accelerator, "gradient_accumulation_steps", 1)
    scaler = getattr(accelerator, "scaler", None)
    return scaler.scale(loss) if scaler is not None else loss


def cached_forward_backward(
    model: nn.Module,
    view1: torch.Tensor,
    view2: torch.Tensor,
    micro_batch: int,
    loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    accelerator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``loss_fn`` over the whole batch in ``.grad`` of the model's parameters, with at most
    ``micro_batch`` images per view under autograd at a time (see the module docstring).

    view1, view2: (N, 3, S, S). ``model(x) -> (h, z)`` with z (B, d). ``loss_fn(z) -> (loss, z1, z2)``
    takes z (2N, d) = [view1's projections; view2's] and returns the scalar loss and the two (N, d) halves
    it used (what the step's meters get). Returns ``(loss, z1, z2)``, detached."""
    device = view1.device
    sizes = micro_batch_sizes(view1.shape[0], micro_batch)
    pairs = list(zip(_split(view1, sizes), _split(view2, sizes)))
    states, first_halves, second_halves = [], [], []
    with torch.no_grad(), frozen_running_stats(model):
        for part1, part2 in pairs:
            with record_function("forward (no grad)"):
                states.append(_rng_state(device))
                with accelerator.autocast():
                    _, z = model(torch.cat([part1, part2]))
                first, second = z.chunk(2)
                first_halves.append(first)
                second_halves.append(second)
    with record_function("loss"):
        cached = torch.cat(
            first_halves + second_halves
        ).requires_grad_()  # (2N, d), the model's output dtype
        del first_halves, second_halves
        with torch.enable_grad():
            loss, z1, z2 = loss_fn(cached)
            (grad,) = torch.autograd.grad(_scaled_for_backward(loss, accelerator), cached)
        grad1, grad2 = (_split(half, sizes) for half in grad.chunk(2))
    after_pass1 = _rng_state(device)
    last = len(pairs) - 1
    try:
        with running_stats_once(model) as record_batch_statistics:
            for index, ((part1, part2), state) in enumerate(zip(pairs, states)):
                sync = contextlib.nullcontext() if index == last else accelerator.no_sync(model)
                with sync, record_function("forward + backward (micro-batch)"):
                    _set_rng_state(device, state)
                    with accelerator.autocast():
                        _, z = model(torch.cat([part1, part2]))
                    z.backward(torch.cat([grad1[index], grad2[index]]).to(z.dtype))
                    del z
                    record_batch_statistics()  # after the backward: BN's saves the running statistics it zeroes
    finally:
        _set_rng_state(
            device, after_pass1
        )  # the random stream continues as after one forward of the batch
    return loss.detach(), z1.detach(), z2.detach()


# --------------------------------------------------------------------------- micro_batch = auto


def fit_micro_batch(
    peak_bytes: Callable[[int], int | None],
    num_images: int,
    budget_bytes: int,
    first_sizes: tuple[int, int] = AUTO_FIRST_SIZES,
    max_measurements: int = 10,
) -> int:
    """The largest micro-batch (images per view, <= num_images) whose measured peak fits ``budget_bytes``,
    to within 2%.

    ``peak_bytes(m)``: the peak memory of one micro-batch's forward + backward at m images per view, or None
    when it ran out of memory. Two small measurements fit the line peak = base + slope x m (activations grow
    linearly with m); its answer is tried, then the line through the two largest measurements (or, after
    an out-of-memory, the midpoint of the gap) until that line crosses the budget at the best size found,
    or the best is within 2% of the smallest size known not to fit: 3-4 measurements on a straight line, never
    more than ``max_measurements`` after the first. Raises RuntimeError when one image does not fit."""
    fits = lambda peak: peak is not None and peak <= budget_bytes  # noqa: E731
    size = min(first_sizes[0], num_images)
    while not fits(peak := peak_bytes(size)):
        if size == 1:
            raise RuntimeError(
                "micro_batch auto: one image per view needs "
                + (
                    f"{_gib(peak)} at peak, more than the {_gib(budget_bytes)} available"
                    if peak
                    else "more GPU memory than there is"
                )
            )
        size = max(1, size // 2)
    best, too_big, measured = size, None, {size: peak}
    guess = min(max(first_sizes[1], 2 * size), num_images)
    for _ in range(max_measurements):
        if guess <= best or (too_big is not None and guess >= too_big):
            break
        peak = peak_bytes(guess)
        if peak is not None:
            measured[guess] = peak
        if fits(peak):
            best = guess
        else:
            too_big = guess
        if best == num_images or (too_big is not None and too_big - best <= max(1, best // 50)):
            break
        line = None
        if len(measured) > 1:
            (m1, p1), (m2, p2) = sorted(measured.items())[-2:]
            if p2 > p1:
                line = int(m1 + (budget_bytes - p1) * (m2 - m1) / (p2 - p1))
        if too_big is None:
            guess = line if line is not None and line > best else num_images
        elif (
            line is not None and line <= best
        ):  # the measured line crosses the budget here: converged
            break
        else:
            guess = line if line is not None and line < too_big else (best + too_big) // 2
        guess = min(guess, num_images)
    return best


def _gib(value: float | None) -> str:
    return "?" if value is None else f"{value / 2**30:.1f} GiB"


_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve_micro_batch(
    setting, model: nn.Module, view1: torch.Tensor, view2: torch.Tensor, optimizer, accelerator
) -> int:
    """The micro-batch of this step in images per view, 0 for a plain step: ``setting`` (cfg.micro_batch:
    None/0 = off, an int, or "auto") against the local batch N; M >= N is a plain step. "auto" measures the
    GPU once per (model, batch shape) and remembers the answer (``measure_micro_batch``); it needs CUDA."""
    num_images = view1.shape[0]
    if setting == "auto":
        if view1.device.type != "cuda":
            raise ValueError(
                f"micro_batch auto measures GPU memory and needs CUDA tensors (these are on "
                f"{view1.device.type}); give a number of images per view instead (e.g. --micro_batch "
                "256) or 0 for off"
            )
        key = (num_images, tuple(view1.shape[1:]), view1.dtype)
        known = _MEASURED.setdefault(model, {})
        if key not in known:
            known[key] = measure_micro_batch(model, view1, view2, optimizer, accelerator)
        setting = known[key]
    micro_batch = int(setting or 0)
    if micro_batch < 0:
        raise ValueError(f"micro_batch must be >= 0 (0 = off) or 'auto', got {setting}")
    return micro_batch if 0 < micro_batch < num_images else 0


def micro_batch_budget(device: torch.device, optimizer_state: int) -> int:
    """The bytes a micro-batch's forward + backward peak (``torch.cuda.max_memory_allocated``: this process's
    live tensors included) may reach: what this process's tensors hold now, plus ``AUTO_MEMORY_FRACTION`` of the
    device memory free now (``torch.cuda.mem_get_info``), less the optimiser state still to come. PyTorch's
    cached but unallocated blocks are not counted: with a DALI loader on this GPU some of them are the colour
    stage's, on DALI's stream, which a training-stream tensor cannot reuse; and DALI's own pools (decoded
    batches, the prefetch queue) are outside PyTorch, already missing from the free memory. So it is called
    after the loader has produced its first batches (in the first step), when those pools exist."""
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    return torch.cuda.memory_allocated(device) + int(AUTO_MEMORY_FRACTION * free) - optimizer_state


def measure_micro_batch(
    model: nn.Module, view1: torch.Tensor, view2: torch.Tensor, optimizer, accelerator
) -> int:
    """micro_batch auto on CUDA: the largest micro-batch whose forward + backward peak fits
    ``micro_batch_budget``, after room for the optimiser state not yet allocated (two parameter-sized buffers
    per parameter before the first optimiser step). The measurements run the unwrapped model with every layer
    in eval mode (no cross-process BN statistics, so one that runs out of memory on one process cannot hang
    the others; no running-statistics updates), in a forked RNG; gradients are dropped afterwards. Nothing is
    handed back to the driver (no ``empty_cache``: it would free the DALI stream's cached blocks, which DALI's
    next batch would then allocate again, a device sync each). Every process takes the smallest answer of all
    processes (micro-batch counts must agree for global BN and DDP)."""
    module = accelerator.unwrap_model(model) if hasattr(accelerator, "unwrap_model") else model
    device = view1.device
    parameters = [p for p in module.parameters() if p.requires_grad]
    parameter_bytes = sum(p.numel() * p.element_size() for p in parameters)
    optimizer_state = 0 if optimizer is not None and len(optimizer.state) else 2 * parameter_bytes
    budget = micro_batch_budget(device, optimizer_state)
    modes = {m: m.training for m in module.modules()}

    def peak_bytes(m: int) -> int | None:
        for p in parameters:
            p.grad = None
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with accelerator.autocast():
                _, z = module(torch.cat([view1[:m], view2[:m]]))
            z.float().square().mean().backward()
            del z
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device)
        except torch.cuda.OutOfMemoryError:
            return None
        finally:
            for p in parameters:
                p.grad = None

    module.eval()
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type=device.type):
            best = fit_micro_batch(peak_bytes, view1.shape[0], budget)
    finally:
        for layer, training in modes.items():
            layer.training = training
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        agreed = torch.tensor([best], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        best = int(agreed)
    accelerator.print(
        f"micro_batch auto: {best} images per view per micro-batch (of {view1.shape[0]} per process; "
        f"peak budget {_gib(budget)})"
    )
    return best
