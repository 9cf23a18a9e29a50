"""Pretrain SimCLR on WebDataset shards with Accelerate, on 1..N GPUs and nodes (or the CPU).

    python train.py --config configs/demo.yaml
    accelerate launch --num_processes 8 train.py --config configs/imagenet.yaml --batch_size 4096 --resume auto
    torchrun --nproc_per_node 2 train.py --config configs/demo.yaml --precision no   # 2 CPU processes (gloo)

Every field of trainer/config.py:TrainConfig is a flag (``python train.py --help`` lists them with their
documentation). Reads top to bottom: checks, the run (identity, resume), data, model, the loop (agree,
step, meters, checkpoint, evaluation), export.

Exit status: 0 done; 2 bad input (config, data, output directory, an incompatible resume: the message
names it); 3 non-finite loss or weights (no checkpoint of them is written); 75 preempted (SIGTERM,
SIGINT or SIGUSR1: a checkpoint was written; rerun the same command with --resume auto); 1 anything else
(a checkpoint that cannot be written, e.g. a full disk, included: the message names it).
"""

from __future__ import annotations

# ruff: noqa: E402 (the imports below come after the early parse on purpose)
import sys

if __name__ == "__main__" and not __package__:  # `python train.py` runs this file as the package's module
    import runpy

    runpy.run_module("simclr_dali.train", run_name="__main__", alter_sys=True)
    sys.exit(0)

if __name__ == "__main__":  # --help, --print_config and config errors answer before torch and DALI are imported
    from .trainer.config import ConfigError, parse_args

    try:
        parse_args(None, __doc__)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(2)

import json
import os
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from .common.files import atomic_write_text
from .model.simclr import feature_dim
from .pipeline.shards.shardset import ShardError
from .trainer.build import build_model, prepare_for_training
from .trainer.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointWriteError,
    TrainingState,
    epoch_start_state,
)
from .trainer.config import ConfigError, parse_args
from .trainer.control import Control
from .trainer.data import build_eval_loaders, build_train_loader, data_device
from .trainer.export import export_backbone
from .trainer.health import NonFiniteWatch
from .trainer.loop import NON_FINITE_EXIT_STATUS, Meters, NonFinite, Probe, StepPlan
from .trainer.online_probe import build_online_probe
from .trainer.optim import build_optimizer, build_scheduler
from .trainer.preemption import PREEMPTED_EXIT_STATUS, Preempted, Preemption
from .trainer.run import (
    RunError,
    RunLog,
    check_model_config,
    claim_run,
    plan_run,
    started_line,
    tracker_init_kwargs,
    tracker_project,
)
from .trainer.step import train_step


def main(argv: list[str] | None = None) -> int:
    # ---- configuration and model arguments, checked before any accelerator or GPU work
    try:
        cfg = parse_args(argv, __doc__)
        cfg.validate(int(os.environ.get("WORLD_SIZE", 1)))
        check_model_config(cfg)
    except (ConfigError, RunError) as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    accelerator = Accelerator(
        mixed_precision=cfg.precision,
        cpu=not torch.cuda.is_available(),
        log_with=None if cfg.tracker == "none" else cfg.tracker,
        project_dir=cfg.output_dir,
    )
    control = Control(accelerator.num_processes, accelerator.process_index)
    preemption, log = Preemption(), RunLog(cfg.output_dir, accelerator.is_main_process)
    try:
        return train(cfg, accelerator, control, preemption, log)
    except CheckpointWriteError as error:
        log.error(f"error: {error}")
        return 1
    except (RunError, ShardError, CheckpointError) as error:
        log.error(f"error: {error}")
        return 2
    finally:
        preemption.restore()
        log.close()
        accelerator.end_training()


def train(cfg, accelerator, control, preemption, log) -> int:
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    # ---- the run: output directory checked, identity, the checkpoint to resume (rank 0 chooses), its compatibility
    run = plan_run(cfg, control, log)

    # ---- data: the shards are checked here, before any GPU work; then the run claims its output directory
    loader = build_train_loader(cfg, device, rank, world)
    eval_loaders = build_eval_loaders(cfg, device, rank, world)
    claim_run(run, cfg, control, log)
    log.info(started_line(run, world))
    plan = StepPlan.of(cfg, len(loader))

    # ---- model (global BN), optimiser (timm's LARS), warm-up + cosine schedule: a pure function of (config, step)
    set_seed(cfg.seed)
    model = build_model(cfg, device.type, world)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, plan.total_steps, plan.warmup_steps)
    model, optimizer = prepare_for_training(accelerator, model, optimizer)
    backbone = accelerator.unwrap_model(model).backbone
    forward = torch.compile(model) if cfg.compile else model

    # ---- resume: weights, optimiser state, every rank's RNG and data position, each file verified; same tracker run
    checkpointer = Checkpointer(
        accelerator, control, run.run_id, cfg.output_dir, cfg.keep_checkpoints, cfg.checkpoint_every_minutes
    )
    state = TrainingState()
    if run.resume_from is not None:
        saved, loader_state = checkpointer.load(run.resume_from, model, optimizer, run.world_size_changed)
        state = TrainingState(saved["step"], saved["train_seconds"], saved.get("history", []))
        loader.load_state_dict(loader_state)
        log.info(
            f"resumed from {run.resume_from} at step {state.step}"
            + (f" ({saved['data_position']})" if "data_position" in saved else "")
        )
    scheduler.step_update(state.step)
    if cfg.tracker != "none":
        accelerator.init_trackers(
            tracker_project(cfg),
            config={k: v for k, v in cfg.to_dict().items() if not isinstance(v, (dict, list))},
            init_kwargs=tracker_init_kwargs(cfg, run, state.step),
        )
    health, probe = (
        NonFiniteWatch(model, device),
        Probe(cfg, backbone, eval_loaders, accelerator, log, preemption, plan),
    )
    meters = Meters(cfg, accelerator, log, plan, state.step)
    online_probe = meters.attach_probe(build_online_probe(cfg, accelerator.unwrap_model(model), device, log))

    def checkpoint(loader_state=None, **extra):  # never of non-finite weights
        if (first_bad := health.first_bad_step(accelerator)) >= 0:
            raise NonFinite(first_bad)
        data = {
            "step": state.step,
            "epoch": plan.epoch(state.step),
            "steps_per_epoch": plan.steps_per_epoch,
            "train_seconds": state.train_seconds,
            "history": state.history,
            "config": cfg.to_dict(),
            **extra,
        }
        saved = checkpointer.save(model, optimizer, data, loader_state or loader.state_dict())
        log.info(f"checkpoint {saved.path} written in {saved.seconds:.2f} s ({saved.bytes / 2**20:.1f} MiB)")

    log.info(
        f"{world} process(es) on {device.type}, data on {data_device(cfg, device)}; {loader.num_samples} images, "
        f"{plan.steps_per_epoch} steps/epoch of {cfg.batch_size}, {plan.total_steps} steps, lr {cfg.scaled_lr:.4g}"
    )

    # ---- the loop: every rank fetches its batch, all agree to go on (preemption, bad data, the clock), one step;
    # then at boundaries the non-finite check, meters, a checkpoint and, after it, evaluation
    batches, stop, data_errors, last_step = iter(loader), None, [], plan.last_step
    window_start = time.perf_counter()
    try:
        if probe.missing(state):  # at step 0, or the evaluation a preemption skipped
            if control.any([preemption.requested])[0]:
                raise Preempted(preemption.signal_name)
            probe(state)
        while state.step < last_step:
            meters.start_wait()
            try:
                (view1, view2, *labels), data_error = next(batches), None
            except StopIteration:  # end of epoch: the loader moves to the next one
                batches = iter(loader)
                continue
            except ShardError as error:  # an image this rank cannot decode
                data_error = str(error)
            meters.end_wait()
            elapsed = state.train_seconds + time.perf_counter() - window_start
            preempted, bad_data, clock_due, out_of_time = control.any(
                [
                    preemption.requested,
                    data_error is not None,
                    checkpointer.due_by_clock(),
                    bool(cfg.max_train_minutes) and elapsed >= 60 * cfg.max_train_minutes,
                ]
            )
            if bad_data:  # no rank steps: the checkpoint below holds the last good step
                stop, data_errors = "bad data", control.all_gather_json(data_error)
                break
            if out_of_time and state.step + 1 < last_step:  # the time budget makes this step the last one
                log.info(f"time budget of {cfg.max_train_minutes:g} training minutes reached at step {state.step + 1}")
                last_step = state.step + 1

            out = train_step(forward, optimizer, view1, view2, cfg, accelerator, *labels, probe=online_probe)
            state.step += 1
            scheduler.step_update(state.step)
            meters.end_step()
            health.update(state.step, out.loss)

            step, stop = (
                state.step,
                "preempted" if preempted and state.step < last_step else None,
            )  # the batch was used: exact data position
            at_log = step % cfg.log_every == 0 or step == last_step
            at_eval = (probe.due(step) or step == last_step and bool(eval_loaders)) and not preempted
            at_checkpoint = (
                at_eval
                or preempted
                or clock_due
                or step == last_step
                or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            )
            if not (at_log or at_checkpoint):
                continue
            state.train_seconds += time.perf_counter() - window_start
            if at_log:
                if (first_bad := health.first_bad_step(accelerator)) >= 0:
                    raise NonFinite(first_bad)
                meters.log_step(step, out, optimizer)
            meters.advance(step)
            if at_checkpoint:
                checkpoint()
            if stop or (
                at_eval and control.any([preemption.requested])[0]
            ):  # a signal that reached any rank skips it on every rank
                stop = stop or "preempted"
                break
            if at_eval:
                probe(state)
            window_start = time.perf_counter()
    except Preempted:  # during an evaluation, which always follows a checkpoint of its step
        stop = "preempted"
    except NonFinite as bad:
        meters.close()
        log.error(
            f"error: non-finite loss or parameters at step {bad.step}; stopping without a checkpoint of them. "
            "This run's good "
            f"checkpoints in {cfg.output_dir}/checkpoints are intact; lower lr or use precision=no to investigate."
        )
        return NON_FINITE_EXIT_STATUS
    finally:
        meters.close()

    # ---- a stop asked for by a signal or bad data: a checkpoint of the last good step, then the exit status
    if stop is not None:
        return stopped(stop, state, checkpoint, checkpointer, loader, data_errors, run, preemption, log, rank, world)

    # ---- export and summary
    summary = {"steps": state.step, "train_seconds": round(state.train_seconds, 2), **meters.summary()}
    if accelerator.is_main_process:
        export_backbone(
            backbone,
            cfg.output_dir,
            {
                "model_name": cfg.backbone,
                "num_features": feature_dim(backbone),
                "cifar_stem": cfg.cifar_stem,
                "timm_kwargs": cfg.timm_kwargs,
                "image_size": cfg.image_size,
            },
            head=accelerator.unwrap_model(model).head,
        )
        atomic_write_text(
            os.path.join(cfg.output_dir, "train_summary.json"),
            json.dumps({**summary, "history": state.history}, indent=1) + "\n",
        )
    log.info(
        f"done: {state.step} steps, {summary['mean_images_per_s']:.1f} images/s, "
        f"data-wait {summary['data_wait_fraction']:.1%}"
    )
    return 0


def stopped(
    stop: str, state, checkpoint, checkpointer, loader, data_errors, run, preemption, log, rank: int, world: int
) -> int:
    """The end of a run stopped by a signal (status 75) or bad data (status 2): a checkpoint of the last good step
    (after bad data, positioned at the start of the epoch), then the message that says how to continue."""
    restart = epoch_start_state(getattr(loader, "epoch", 0), rank, world) if stop == "bad data" else None
    extra = {"data_position": "the epoch restarts from its beginning (the run stopped on bad data)"} if restart else {}
    try:
        if state.step > (checkpointer.last_step or 0):  # bad data (a preempted step was checkpointed in the loop)
            checkpoint(restart, **extra)
    except NonFinite as bad:
        log.error(f"error: non-finite loss or parameters at step {bad.step}; nothing checkpointed")
        return NON_FINITE_EXIT_STATUS
    where = f"checkpoint {checkpointer.last_path}" if state.step else "nothing to checkpoint (no step was taken)"
    if stop == "bad data":
        for failing_rank, message in enumerate(data_errors):
            if message:
                log.error(f"error: bad data on rank {failing_rank}: {message}")
        log.error(
            f"stopped after step {state.step} on bad data ({where} holds the last good step); "
            "remove or rewrite that sample "
            "(simclr-shards verify names every bad one), then rerun with --resume auto"
        )
        return 2
    since = (
        f", {time.monotonic() - preemption.received_at:.1f} s after {preemption.signal_name}"
        if preemption.received_at
        else ""
    )
    log.info(
        f"preempted at step {state.step}: {where}{since}; exiting with status {PREEMPTED_EXIT_STATUS}. "
        f"Rerun the same command with --resume auto to continue run {run.run_id}"
    )
    return PREEMPTED_EXIT_STATUS


if __name__ == "__main__":
    sys.exit(main())
