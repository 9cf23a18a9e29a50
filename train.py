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
# `duplicates` pair kept (shape only): the same prologue as evaluate.py's (script -> module, then the early
# parse). It runs before any relative import can (a script has no package), so no shared helper can hold it.
import sys

if (
    __name__ == "__main__" and not __package__
):  # `python train.py` runs this file as the package's module
    import runpy

    runpy.run_module("simclr_dali.train", run_name="__main__", alter_sys=True)
    sys.exit(0)

if (
    __name__ == "__main__"
):  # --help, --print_config and config errors answer before torch and DALI are imported
    from .common.errors import SimclrError
    from .trainer.config import parse_args

    try:
        parse_args(None, __doc__)
    except SimclrError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(error.exit_status)

import json
import os

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from .common.errors import ExitStatus, SimclrError
from .model.simclr import feature_dim
from .trainer.build import build_model, prepare_for_training
from .trainer.checkpoint import Checkpointer, TrainingState
from .trainer.config import parse_args
from .trainer.consensus import RankConsensus
from .trainer.data import build_eval_loaders, build_train_loader, data_device
from .trainer.export import export_backbone, write_result
from .trainer.health import NonFiniteWatch
from .trainer.meters import Meters
from .trainer.monitor import EvalMonitor
from .trainer.online_probe import build_online_probe
from .trainer.optim import build_optimizer, build_scheduler
from .trainer.plan import StepPlan
from .trainer.preemption import Preempted, Preemption
from .trainer.run import (
    RunLog,
    check_model_config,
    claim_run,
    plan_run,
    release_run_lock,
    started_line,
)
from .trainer.session import STOPS, BadData, Session, stopped
from .trainer.step import train_step
from .trainer.trackers import end_trackers, start_trackers


def main(argv: list[str] | None = None) -> int:
    # ---- configuration and model arguments, checked before any accelerator or GPU work
    try:
        cfg = parse_args(argv, __doc__)
        cfg.validate(int(os.environ.get("WORLD_SIZE", 1)))
        check_model_config(cfg)
    except SimclrError as error:
        print(f"config error: {error}", file=sys.stderr)
        return error.exit_status
    accelerator = Accelerator(
        mixed_precision=cfg.precision,
        cpu=not torch.cuda.is_available(),
        log_with=None if cfg.tracker == "none" else cfg.tracker,
        project_dir=cfg.output_dir,
    )
    consensus = RankConsensus(accelerator.num_processes, accelerator.process_index)
    preemption, log = Preemption(), RunLog(cfg.output_dir, accelerator.is_main_process)
    session = None
    try:
        session = setup(cfg, accelerator, consensus, preemption, log)
        stop = train(session)
        return stopped(stop, session) if stop else finish(session)
    except SimclrError as error:  # bad input (status 2) or a checkpoint that cannot be written (1)
        log.error(f"error: {error}")
        return error.exit_status
    finally:
        if session is not None:
            session.close()  # the DALI pipelines' threads and buffers go now (DaliLoader.close)
        release_run_lock(cfg.output_dir)
        preemption.restore()
        log.close()
        end_trackers(accelerator)  # closes the trackers' files; a failure is a warning naming them


def setup(cfg, accelerator, consensus, preemption, log) -> Session:
    """The run (identity, resume), its data, model, optimiser and schedule, the resumed state, the trackers."""
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    # ---- the run: output directory checked, identity, the checkpoint to resume (rank 0 chooses), its compatibility
    run = plan_run(cfg, consensus, log)
    # ---- data: the shards are checked here, before any GPU work; then the run claims its output directory
    loader = build_train_loader(cfg, device, rank, world)
    eval_loaders = build_eval_loaders(cfg, device, rank, world)
    claim_run(run, cfg, consensus, log)
    log.info(started_line(run, world))
    plan = StepPlan.of(cfg, len(loader))
    # ---- model (global BN), optimiser (timm's LARS), warm-up + cosine schedule: a pure function of (config, step)
    set_seed(cfg.seed)
    model = build_model(cfg, device.type, world)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, plan.total_steps, plan.warmup_steps)
    model, optimizer = prepare_for_training(accelerator, model, optimizer)
    backbone = accelerator.unwrap_model(model).backbone
    # ---- resume: weights, optimiser state, every rank's RNG and data position, each file verified; same tracker run
    checkpointer = Checkpointer(
        accelerator,
        consensus,
        run.run_id,
        cfg.output_dir,
        cfg.keep_checkpoints,
        cfg.checkpoint_every_minutes,
    )
    state = TrainingState()
    if run.resume_from is not None:
        saved, loader_state = checkpointer.load(
            run.resume_from, model, optimizer, run.world_size_changed
        )
        state = TrainingState(saved["step"], saved["train_seconds"], saved.get("history", []))
        loader.load_state_dict(loader_state)
        position = f" ({saved['data_position']})" if "data_position" in saved else ""
        log.info(f"resumed from {run.resume_from} at step {state.step}{position}")
    scheduler.step_update(state.step)
    start_trackers(
        accelerator, cfg, run, state.step
    )  # a write failure: exit 1 naming its directory
    log.info(
        f"{world} process(es) on {device.type}, data on {data_device(cfg, device)}; {loader.num_samples} images, "
        f"{plan.steps_per_epoch} steps/epoch of {cfg.batch_size}, {plan.total_steps} steps, lr {cfg.scaled_lr:.4g}"
    )
    session = Session(
        cfg, accelerator, consensus, preemption, log, run, loader, model,
        torch.compile(model) if cfg.compile else model, optimizer, scheduler, state, plan,
        NonFiniteWatch(model, device), Meters(cfg, accelerator, log, plan, state.step),
        EvalMonitor(cfg, backbone, eval_loaders, accelerator, log, preemption, consensus),
    )  # fmt: skip
    session.attach_checkpointer(checkpointer)
    session.online_probe = session.meters.attach_probe(
        build_online_probe(cfg, accelerator.unwrap_model(model), device, log)
    )
    return session


def train(t: Session) -> Exception | None:
    """The loop: every rank fetches its batch, all agree to go on (preemption, bad data, the clock), one step;
    then whatever is due (meters, a checkpoint, an evaluation after it). Returns why it stopped early, if it did."""
    cfg, state, plan, consensus, preemption = t.cfg, t.state, t.plan, t.consensus, t.preemption
    try:
        t.monitor.catch_up(state, plan)  # at step 0, or the evaluation a preemption skipped
        t.clock.restart()
        while state.step < plan.last_step:
            views, data_error = t.next_batch()
            agreed = consensus.agree(
                preempted=preemption.requested,
                bad_data=data_error is not None,
                clock_due=t.checkpointer.due_by_clock(),
                out_of_time=t.out_of_time(),
            )
            if agreed.bad_data:  # no rank steps: the checkpoint of the last good step follows
                raise BadData(consensus.all_gather_json(data_error))
            if agreed.out_of_time:
                t.end_early(state.step + 1)
            view1, view2, *labels = views  # labels: from labelled shards (SupCon, the online probe)
            out = train_step(
                t.forward,
                t.optimizer,
                view1,
                view2,
                cfg,
                t.accelerator,
                *labels,
                probe=t.online_probe,
            )
            step = t.after_step(out)
            if t.meters.due(step):
                t.health.raise_if_bad(t.accelerator)
                t.meters.log_step(step, out, t.optimizer)
            t.meters.advance(step)
            evaluate = t.monitor.due(step, plan) and not agreed.preempted
            t.checkpointer.maybe_save(step, force=evaluate or agreed.preempted or agreed.clock_due)
            if (
                agreed.preempted and step < plan.last_step
            ):  # the batch was used: the checkpoint is exact
                raise Preempted(preemption.signal_name)
            if evaluate:
                t.monitor.evaluate(state, plan)
            t.clock.restart()
    except STOPS as stop:
        return stop
    finally:
        t.meters.close()  # before any message, so that it starts on a line of its own
    return None


def finish(t: Session) -> int:
    """The end of a complete run: the exported backbone and head, train_summary.json, the summary line."""
    cfg, state, accelerator = t.cfg, t.state, t.accelerator
    summary = {
        "steps": state.step,
        "train_seconds": round(state.train_seconds, 2),
        **t.meters.summary(),
    }
    if accelerator.is_main_process:
        backbone = accelerator.unwrap_model(t.model).backbone
        meta = {
            "model_name": cfg.model.backbone,
            "num_features": feature_dim(backbone),
            "cifar_stem": cfg.model.cifar_stem,
            "timm_kwargs": cfg.model.timm_kwargs,
            "image_size": cfg.augment.size,
        }
        export_backbone(backbone, cfg.output_dir, meta, head=accelerator.unwrap_model(t.model).head)
        write_result(
            os.path.join(cfg.output_dir, "train_summary.json"),
            json.dumps({**summary, "history": state.history}, indent=1) + "\n",
        )
    t.log.info(
        f"done: {state.step} steps, {summary['mean_images_per_s']:.1f} images/s, "
        f"data-wait {summary['data_wait_fraction']:.1%}"
    )
    return ExitStatus.DONE


if __name__ == "__main__":
    sys.exit(main())
