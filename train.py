"""Pretrain SimCLR on WebDataset shards with Accelerate, on 1..N GPUs and nodes (or the CPU).

    python train.py --config configs/demo.yaml
    accelerate launch --num_processes 8 train.py --config configs/imagenet.yaml --batch_size 4096
    torchrun --nproc_per_node 2 train.py --config configs/demo.yaml --precision no   # 2 CPU processes (gloo)

Every field of trainer/config.py:TrainConfig is a flag. Reads top to bottom: setup, resume, loop
(step, meters, evaluation, checkpoints), export.
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
from pipeline.augment import AugmentConfig
from pipeline.loader import EvalLoader, PretrainLoader, default_num_threads
from pipeline.shards import ShardError
from pipeline.torchvision_baseline import TorchvisionPretrainLoader
from trainer.build import build_model, build_optimizer, build_scheduler, simclr_loss
from trainer.checkpoint import export_backbone, load_checkpoint, resolve_resume, save_checkpoint
from trainer.config import ConfigError, TrainConfig, parse_args
from trainer.meters import StepTimer


class Preempted:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits cleanly at the next check."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def build_augment(cfg: TrainConfig) -> AugmentConfig:
    preset = AugmentConfig.cifar if cfg.augment == "cifar" else AugmentConfig
    overrides = {"size": cfg.image_size, "crop_area": (cfg.min_crop_area, 1.0)}
    if cfg.jitter_strength >= 0:
        overrides["jitter_strength"] = cfg.jitter_strength
    if cfg.blur_prob >= 0:
        overrides["blur_prob"] = cfg.blur_prob
    return preset(**overrides)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv, __doc__)
        cfg.validate(int(os.environ.get("WORLD_SIZE", 1)))  # before any accelerator or GPU work
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    accelerator = Accelerator(mixed_precision=cfg.precision, cpu=not torch.cuda.is_available(),
                              log_with=None if cfg.tracker == "none" else cfg.tracker, project_dir=cfg.output_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    on_gpu = accelerator.device.type == "cuda"
    data_device = "gpu" if cfg.data_device == "gpu" or (cfg.data_device == "auto" and on_gpu) else "cpu"
    preempted = Preempted()

    # ---- data: shards and config are checked here, before any GPU work
    try:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # set by accelerate launch / torchrun
        if cfg.data_loader == "dali":
            loader = PretrainLoader(cfg.train_shards, cfg.batch_size // world, build_augment(cfg), device=data_device,
                                    device_id=accelerator.device.index if data_device == "gpu" else None, shard_id=rank, num_shards=world,
                                    seed=cfg.seed, num_threads=cfg.data_threads or default_num_threads(local_processes),
                                    prefetch=cfg.prefetch, shuffle_buffer=cfg.shuffle_buffer,
                                    dtype=torch.float16 if data_device == "gpu" else torch.float32)
        else:
            loader = TorchvisionPretrainLoader(cfg.train_shards, cfg.batch_size // world, build_augment(cfg), device=str(accelerator.device),
                                               shard_id=rank, num_shards=world, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                                               num_workers=cfg.data_threads or default_num_threads(local_processes))
        eval_loaders = None
        if cfg.eval_every_epochs:
            eval_size = cfg.eval_size or cfg.image_size
            eval_resize = cfg.eval_resize or (eval_size if eval_size <= 64 else None)
            eval_loaders = [EvalLoader(shards, 256, eval_size, resize_size=eval_resize, device=data_device, shard_id=rank, num_shards=world,
                                       device_id=accelerator.device.index if data_device == "gpu" else None)
                            for shards in (cfg.eval_train_shards, cfg.eval_val_shards)]
    except ShardError as error:
        accelerator.print(f"error: {error}")
        return 2
    steps_per_epoch = len(loader)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    eval_interval = max(1, round(cfg.eval_every_epochs * steps_per_epoch))

    # ---- model (global BN), optimiser (timm's LARS: no decay or adaptation for biases and norms), schedule
    set_seed(cfg.seed)  # the same initial weights on every rank, whichever loader was built (loaders may draw random numbers)
    model = build_model(cfg, accelerator.device.type, world)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps)
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

        result = probe(backbone, *eval_loaders, accelerator, progress=False)
        history.append({"step": step, "epoch": step / steps_per_epoch, "train_seconds": round(train_seconds, 2), **result})
        accelerator.print(f"eval @ epoch {step / steps_per_epoch:.2f}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()))
        accelerator.log(result, step=step)
        if cfg.eval_json and accelerator.is_main_process:
            Path(cfg.eval_json).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.eval_json).write_text(json.dumps({"config": cfg.to_dict(), "history": history}, indent=1) + "\n")

    accelerator.print(f"{world} process(es) on {accelerator.device.type}, data on {data_device}; {loader.num_samples} images, "
                      f"{steps_per_epoch} steps/epoch of {cfg.batch_size}, {total_steps} steps, lr {cfg.scaled_lr:.4g}")
    if eval_loaders and step == 0:
        evaluate()

    # ---- the loop
    timer = StepTimer(images_per_step=cfg.batch_size)
    progress = tqdm(total=last_step, initial=step, desc="train", unit="step", disable=not accelerator.is_main_process, dynamic_ncols=True)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=accelerator.device)  # first non-finite loss, checked lazily
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
        with accelerator.autocast():
            loss, z1, z2 = simclr_loss(forward, view1, view2, cfg)
        accelerator.backward(loss)
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        scheduler.step_update(step)
        timer.end_step()
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss.detach()), step, first_bad_step)

        at_log = step % cfg.log_every == 0 or step == last_step
        at_eval = bool(eval_loaders) and (step % eval_interval == 0 or step == last_step)
        at_checkpoint = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == last_step
        if at_log or at_eval or at_checkpoint:
            train_seconds += time.perf_counter() - window_start
            bad = int(accelerator.reduce(first_bad_step.clone(), "max"))
            if bad >= 0:
                accelerator.print(f"error: non-finite loss at step {bad}; stopping. The last good checkpoint (if any) in "
                                  f"{cfg.output_dir}/checkpoints is intact; lower lr or use precision=no to investigate.")
                status = 3
                break
            flags = torch.tensor([int(preempted.requested), int(bool(cfg.max_train_minutes) and train_seconds >= 60 * cfg.max_train_minutes)],
                                 device=accelerator.device)
            stop, out_of_time = accelerator.reduce(flags, "max").tolist()
            if out_of_time and step < last_step:  # the time budget ends the run here, as if this were the last step
                accelerator.print(f"time budget of {cfg.max_train_minutes:g} training minutes reached at step {step}")
                last_step, at_log, at_eval, at_checkpoint = step, True, bool(eval_loaders), True
            if at_log:
                meters = {"loss": accelerator.reduce(loss.detach(), "mean").item(), "lr": optimizer.param_groups[0]["lr"],
                          "pos_acc": positive_pair_accuracy(z1, z2).item(), "epoch": step / steps_per_epoch, **timer.window()}
                if on_gpu:
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
        export_backbone(backbone, cfg.output_dir, {"model_name": cfg.backbone, "num_features": backbone.num_features,
                                                   "cifar_stem": cfg.cifar_stem, "timm_kwargs": cfg.timm_kwargs,
                                                   "image_size": cfg.image_size})
        (Path(cfg.output_dir) / "train_summary.json").write_text(json.dumps({**summary, "history": history}, indent=1) + "\n")
    accelerator.print(f"done: {step} steps, {summary['mean_images_per_s']:.1f} images/s, data-wait {summary['data_wait_fraction']:.1%}")
    accelerator.end_training()
    return status


if __name__ == "__main__":
    sys.exit(main())
