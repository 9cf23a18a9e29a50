"""The non-finite check: the first step whose loss or updated parameters (or BN statistics) are not finite.

Every step adds one fused max-norm over the model's floating tensors (a read of the weights, as cheap as
the optimiser's own pass) and a compare, on the device, without a host sync; the loop reads the result at
its boundaries, and always before a checkpoint, so that a checkpoint never holds non-finite weights."""

from __future__ import annotations

import torch

from ..common.errors import ExitStatus, SimclrError


class NonFinite(SimclrError):
    """The loss or the weights became non-finite at ``step`` (nothing of them is checkpointed)."""

    exit_status = ExitStatus.NON_FINITE

    def __init__(self, step: int):
        super().__init__(f"non-finite loss or parameters at step {step}")
        self.step = step


class NonFiniteWatch:
    """The first non-finite step, tracked on the device; read (one collective) by ``raise_if_bad``."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, step: int, loss: torch.Tensor) -> None:
        """After step ``step``: its loss (scalar) and the parameters the update produced."""
        largest = torch.stack(
            [n.to(self.first_bad.device) for n in torch._foreach_norm(self.tensors, float("inf"))]
        ).max()
        bad = ~(torch.isfinite(loss) & torch.isfinite(largest))
        self.first_bad = torch.where((self.first_bad < 0) & bad, step, self.first_bad)

    def first_bad_step(self, accelerator) -> int:
        """The first non-finite step on any rank, or -1 (a collective: every rank calls it)."""
        return int(accelerator.reduce(self.first_bad.clone(), "max"))

    def raise_if_bad(self, accelerator) -> None:
        """``NonFinite`` on every rank when any rank saw a non-finite step (a collective)."""
        if (first_bad := self.first_bad_step(accelerator)) >= 0:
            raise NonFinite(first_bad)
