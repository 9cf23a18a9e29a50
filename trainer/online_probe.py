"""The online linear probe: a linear classifier on the detached backbone features, trained in every training
step with its own optimiser (the official SimCLR code's ``lineareval_while_pretraining``; solo-learn's and
lightly's online classifiers), so that pretraining reports a running accuracy between its evaluations.

It sees the features h of both augmented views of the step (2N rows, the labels twice), detached: the
backbone learns nothing from it. Its running top-1 is the share of those rows it classified right *before*
its own update (a training accuracy on augmented views with a moving classifier, hence below the offline
linear protocol's top-1 on centre crops with a converged classifier). The counts stay on the device, summed
over the steps of a log window, and are read once per window with the other meters: no host sync per step.
Its weights and SGD state are not checkpointed (it is a meter): a resumed run starts a fresh probe.

On for labelled training shards (every sample a ``.cls``, which ``LabelledTwoViews`` loads), off (said once)
for unlabelled shards, under micro-batches (gradient caching does not keep the features) and with the
torchvision baseline loader (no labels)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..pipeline.shards.location import count_classes
from ..pipeline.shards.shardset import is_labelled, shard_paths
from .config import TrainConfig


def wants_labels(cfg: TrainConfig) -> bool:
    """Whether the training loader must yield labels: SupCon always (unlabelled shards then fail with the
    loader's ShardError naming the shard), the online probe where the shards are labelled."""
    return cfg.loss == "supcon" or probe_enabled(cfg)[0]


def probe_enabled(cfg: TrainConfig) -> tuple[bool, str]:
    """(on, why not): the online probe runs where asked, the shards are labelled and there are no micro-batches."""
    if not cfg.online_probe:
        return False, "online probe off (--online_probe false)"
    if cfg.micro_batch:
        return (
            False,
            "online probe off: micro-batches (gradient caching) do not keep the backbone features",
        )
    if cfg.loader.kind != "dali":
        return False, "online probe off: the torchvision baseline loader yields no labels"
    if not shards_are_labelled(cfg.train_shards):
        return False, f"online probe off: the training shards {cfg.train_shards} carry no labels"
    return True, ""


class OnlineProbe:
    """``update(h, labels)`` once per step (h: (2N, feature_dim) features of both views, any dtype; labels (N,));
    ``read()`` -> running top-1 (%) since the last read, or None before any step. Parameters are averaged over
    processes by one all-reduce of their gradients per step (no host sync)."""

    def __init__(self, feature_dim: int, num_classes: int, lr: float, device: torch.device):
        self.classifier = nn.Linear(feature_dim, num_classes).to(device)
        self.optimizer = torch.optim.SGD(self.classifier.parameters(), lr=lr, momentum=0.9)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, h: torch.Tensor, labels: torch.Tensor) -> None:
        targets = torch.cat([labels, labels])
        with torch.autocast(h.device.type, enabled=False):
            logits = self.classifier(h.detach().float())
            loss = F.cross_entropy(logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for parameter in self.classifier.parameters():
                dist.all_reduce(parameter.grad, op=dist.ReduceOp.AVG)
        self.optimizer.step()
        self.correct += (logits.detach().argmax(1) == targets).sum()
        self.seen += targets.numel()

    def read(self, accelerator=None) -> float | None:
        """Top-1 (%) over the rows seen since the last read (all processes'), then reset; one host read."""
        counts = torch.stack([self.correct, self.seen])
        if accelerator is not None:
            counts = accelerator.reduce(counts, "sum")
        correct, seen = counts.tolist()
        self.correct.zero_()
        self.seen.zero_()
        return 100.0 * correct / seen if seen else None


def build_online_probe(
    cfg: TrainConfig, model: nn.Module, device: torch.device, log
) -> OnlineProbe | None:
    """The run's online probe, or None with the reason logged once."""
    on, why_not = probe_enabled(cfg)
    if not on:
        log.info(why_not)
        return None
    num_classes = class_count(cfg.train_shards)
    if num_classes is None:
        log.info(
            f"online probe off: the s3:// shards {cfg.train_shards} have no classes.json to count classes from"
        )
        return None
    log.info(
        f"online probe: linear {model.feature_dim} -> {num_classes} classes on detached features, SGD lr "
        f"{cfg.online_probe_lr:g}"
    )
    return OnlineProbe(model.feature_dim, num_classes, cfg.online_probe_lr, device)


def shards_are_labelled(spec: str) -> bool:
    """Whether the set ``spec`` names (a local location or ``s3://bucket/prefix/``) carries labels."""
    from ..pipeline.shards.s3 import is_s3, remote_is_labelled

    return remote_is_labelled(spec) if is_s3(spec) else is_labelled(shard_paths(spec))


def class_count(spec: str) -> int | None:
    """The set's number of classes (``count_classes``; for ``s3://`` shards, from the bucket's ``classes.json``)."""
    from ..pipeline.shards.s3 import is_s3, remote_class_count

    return remote_class_count(spec) if is_s3(spec) else count_classes(spec)
