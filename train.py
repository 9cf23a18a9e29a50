"""Pretrain SimCLR on WebDataset shards with Accelerate, on 1..N GPUs and nodes (or the CPU).

    python train.py --config configs/demo.yaml
    accelerate launch --num_processes 8 train.py --config configs/imagenet.yaml --batch_size 4096
    torchrun --nproc_per_node 2 train.py --config configs/demo.yaml --precision no   # 2 CPU processes (gloo)

Every field of trainer/config.py:TrainConfig is a flag (``python train.py --help`` lists them with their
documentation). Reads top to bottom: setup, resume, the loop (step, meters, evaluation, checkpoints), export.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from model.ntxent import positive_pair_accuracy
from model.simclr import feature_dim
from pipeline.shardset import ShardError
from trainer.build import build_model
from trainer.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from trainer.config import ConfigError, parse_args
from trainer.data import build_eval_loaders, build_train_loader, data_device
from trainer.export import export_backbone
from trainer.meters import StepTimer
from trainer.optim import build_optimizer, build_scheduler
from trainer.step import train_step


class Preempted:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits cleanly at the next check."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def main(argv: list[str] | None = None) -> int:
    # ---- configuration, checked before any accelerator or GPU work
    try:
        cfg = parse_args(argv, __doc__)
        cfg.validate(int(os.environ.get("WORLD_SIZE", 1)))
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    accelerator = Accelerator(mixed_precision=cfg.precision, cpu=not torch.cuda.is_available(),
                              log_with=None if cfg.tracker == "none" else cfg.tracker, project_dir=cfg.output_dir)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    preempted = Preempted()

    # ---- data: the shards are checked here, before any GPU work
    try:
        loader = build_train_loader(cfg, device, rank, world)
        eval_loaders = build_eval_loaders(cfg, device, rank, world)
    except ShardError as error:
        accelerator.print(f"error: {error}")
        return 2
    steps_per_epoch = len(loader)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    last_step = min(total_steps, cfg.max_steps or total_steps)
    eval_interval = max(1, round((cfg.eval_every_epochs or 0) * steps_per_epoch))

    # ---- model (global BN), optimiser (timm's LARS), warm-up + cosine schedule, the same initial weights on every rank
    set_seed(cfg.seed)
    model = build_model(cfg, device.type, world)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    backbone = accelerator.unwrap_model(model).backbone
    forward = torch.compile(model) if cfg.compile else model

    # ---- resume: model, optimiser, scheduler, RNG states, step and data position
    step, train_seconds, history = 0, 0.0, []
    resume_from = resolve_resume(cfg.resume, cfg.output_dir)
    if resume_from is not None:
        state, loader_state = load_checkpoint(accelerator, resume_from)
        step, train_seconds, history = state["step"], state["train_seconds"], state.get("history", [])
        loader.load_state_dict(loader_state)
        accelerator.print(f"resumed from {resume_from} at step {step}")
    scheduler.step_update(step)
    if cfg.tracker != "none":
        accelerator.init_trackers("simclr", config={k: v for k, v in cfg.to_dict().items() if not isinstance(v, dict)})

    def checkpoint():
        state = {"step": step, "epoch": step / steps_per_epoch, "train_seconds": train_seconds, "history": history, "config": cfg.to_dict()}
        return save_checkpoint(accelerator, cfg.output_dir, step, state, loader.state_dict(), cfg.keep_checkpoints)

    def evaluate():
        from evaluation.probe import probe

        result = probe(backbone, *eval_loaders, accelerator, k=cfg.eval_knn_k, knn_temperature=cfg.eval_knn_temperature, progress=False)
        history.append({"step": step, "epoch": step / steps_per_epoch, "train_seconds": round(train_seconds, 2), **result})
        accelerator.print(f"eval @ epoch {step / steps_per_epoch:.2f}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()))
        accelerator.log(result, step=step)
        if cfg.eval_json and accelerator.is_main_process:
            Path(cfg.eval_json).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.eval_json).write_text(json.dumps({"config": cfg.to_dict(), "history": history}, indent=1) + "\n")

    accelerator.print(f"{world} process(es) on {device.type}, data on {data_device(cfg, device)}; {loader.num_samples} images, "
                      f"{steps_per_epoch} steps/epoch of {cfg.batch_size}, {total_steps} steps, lr {cfg.scaled_lr:.4g}")
    if eval_loaders and step == 0:
        evaluate()

    # ---- the loop: a step, then (every log_every steps) meters, the stop flags, evaluation and checkpoints
    timer = StepTimer(images_per_step=cfg.batch_size, device=device)
    progress = tqdm(total=last_step, initial=step, desc="train", unit="step", disable=not accelerator.is_main_process, dynamic_ncols=True)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite loss, checked lazily
    window_start = time.perf_counter()
    batches = iter(loader)
    status = 0
    while step < last_step:
        timer.start_wait()
        try:
            view1, view2 = next(batches)
        except StopIteration:  # end of epoch: the loader moves to the next one
            batches = iter(loader)
            continue
        timer.end_wait()
        out = train_step(forward, optimizer, view1, view2, cfg, accelerator)
        step += 1
        scheduler.step_update(step)
        timer.end_step()
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(out.loss), step, first_bad_step)

        at_log = step % cfg.log_every == 0 or step == last_step
        at_eval = bool(eval_loaders) and (step % eval_interval == 0 or step == last_step)
        at_checkpoint = bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == last_step
        if not (at_log or at_eval or at_checkpoint):
            continue
        train_seconds += time.perf_counter() - window_start
        bad = int(accelerator.reduce(first_bad_step.clone(), "max"))
        if bad >= 0:
            accelerator.print(f"error: non-finite loss at step {bad}; stopping. The last good checkpoint (if any) in "
                              f"{cfg.output_dir}/checkpoints is intact; lower lr or use precision=no to investigate.")
            status = 3
            break
        out_of_time = bool(cfg.max_train_minutes) and train_seconds >= 60 * cfg.max_train_minutes
        stop, out_of_time = accelerator.reduce(torch.tensor([int(preempted.requested), int(out_of_time)], device=device), "max").tolist()
        if out_of_time and step < last_step:  # the time budget ends the run here, as if this were the last step
            accelerator.print(f"time budget of {cfg.max_train_minutes:g} training minutes reached at step {step}")
            last_step, at_log, at_eval, at_checkpoint = step, True, bool(eval_loaders), True
        if at_log:
            meters = {"loss": accelerator.reduce(out.loss, "mean").item(), "lr": optimizer.param_groups[0]["lr"],
                      "pos_acc": positive_pair_accuracy(out.z1, out.z2).item(), "epoch": step / steps_per_epoch, **timer.window()}
            if device.type == "cuda":
                meters["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            accelerator.log(meters, step=step)
            progress.set_postfix(loss=f"{meters['loss']:.4f}", img_s=f"{meters['images_per_s']:.0f}",
                                 wait=f"{meters['data_wait_fraction']:.0%}", lr=f"{meters['lr']:.3g}")
        progress.update(step - progress.n)
        if at_eval:
            evaluate()
        if at_checkpoint or stop:
            path = checkpoint()
            if stop:
                accelerator.print(f"preempted: checkpoint {path} written at step {step}; resume with --resume auto")
                break
        window_start = time.perf_counter()
    progress.close()

    # ---- export and summary
    summary = {"steps": step, "train_seconds": round(train_seconds, 2), **timer.summary()}
    if status == 0 and step >= last_step and accelerator.is_main_process:
        export_backbone(backbone, cfg.output_dir, {"model_name": cfg.backbone, "num_features": feature_dim(backbone),
                                                   "cifar_stem": cfg.cifar_stem, "timm_kwargs": cfg.timm_kwargs,
                                                   "image_size": cfg.image_size})
        (Path(cfg.output_dir) / "train_summary.json").write_text(json.dumps({**summary, "history": history}, indent=1) + "\n")
    accelerator.print(f"done: {step} steps, {summary['mean_images_per_s']:.1f} images/s, data-wait {summary['data_wait_fraction']:.1%}")
    accelerator.end_training()
    return status


if __name__ == "__main__":
    sys.exit(main())
