"""Run identity: an output directory belongs to one run.

``OUTPUT_DIR/run.json`` holds the run's id (written once, exclusively: of two runs started at once in one
directory, one is refused) and ``OUTPUT_DIR/config.yaml`` the resolved config of its latest start. Every
checkpoint's manifest carries the run id: ``--resume auto`` picks only this run's, rotation deletes only
this run's, temporaries are named by it. A fresh start into a directory that holds another run is refused
(naming ``--resume auto`` and ``--overwrite``); a resume whose config changes what the checkpoint means is
refused before any heavy work, naming the fields. ``OUTPUT_DIR/train.log`` keeps what the run prints.

Rank 0 makes every decision here (it alone lists the directory: NFS/Lustre caches may show other ranks
another listing) and broadcasts it; the other ranks only read the checkpoint it chose."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..common.errors import SimclrError
from ..common.files import atomic_write_text, check_writable, fsync_directory
from .checkpoint import (
    STATE_FILE,
    CheckpointError,
    checkpoint_dir,
    checkpoint_step,
    choose_checkpoint,
    clean_temporaries,
    list_checkpoints,
    manifest_run_id,
    read_verified_json,
    remove_checkpoint,
    verify_checkpoint,
)
from .config import TrainConfig, resume_changes

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
_held_locks: dict[Path, int] = {}  # output directory -> the open lock file this process holds


class RunError(SimclrError, ValueError):
    """The run cannot start as asked (output directory, resume, compatibility); the message says what to do."""


class RunLog:
    """What the run prints, on rank 0: to the terminal and appended to ``OUTPUT_DIR/train.log``."""

    def __init__(self, output_dir: str | Path, is_main: bool):
        self.is_main, self.path, self.file = is_main, Path(output_dir) / "train.log", None

    def _write(self, text: str) -> None:
        if (
            self.file is None and self.path.parent.is_dir()
        ):  # False: writing failed once, not tried again
            try:
                self.file = open(self.path, "a", buffering=1)
            except OSError:  # an unwritable output_dir is reported by the start-up checks
                return
        if self.file:
            stamp = datetime.now().isoformat(sep=" ", timespec="seconds")
            try:
                self.file.write("".join(f"{stamp} {line}\n" for line in text.splitlines()))
            except OSError as error:  # a full disk must not kill the run (its checkpoint says whether it can go on)
                self.file = False
                print(
                    f"warning: cannot write the log {self.path} ({error.strerror or error}); "
                    "what follows is on the terminal only",
                    file=sys.stderr,
                    flush=True,
                )

    def info(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)
            self._write(text)

    def error(self, text: str) -> None:
        if self.is_main:
            print(text, file=sys.stderr, flush=True)
            self._write(text)

    def file_only(self, text: str) -> None:
        if self.is_main:
            self._write(text)

    def close(self) -> None:
        if self.file:
            try:
                self.file.close()
            except OSError:  # the buffered tail of a log on a full disk
                pass
        self.file = None


def check_model_config(cfg: TrainConfig) -> None:
    """The backbone name and its timm arguments, checked by building the model on the meta device (no memory,
    no weights): raises ``RunError`` naming the field."""
    import timm
    import torch

    from ..model.simclr import SimCLR

    if not timm.is_model(cfg.model.backbone):
        close = timm.list_models(f"*{cfg.model.backbone}*")[:5]
        raise RunError(
            f"backbone {cfg.model.backbone!r} is not a timm model"
            + (
                f" (did you mean {', '.join(close)}?)"
                if close
                else " (timm.list_models() lists them)"
            )
        )
    try:
        with torch.device("meta"):
            SimCLR(
                cfg.model.backbone,
                cfg.model.proj_hidden,
                cfg.model.proj_dim,
                pretrained=False,
                cifar_stem=cfg.model.cifar_stem,
                proj_layers=cfg.model.proj_layers,
                **cfg.model.timm_kwargs,
            )
    except (TypeError, ValueError, KeyError, AssertionError) as error:
        raise RunError(
            f"backbone {cfg.model.backbone!r} with cifar_stem={cfg.model.cifar_stem}, "
            f"timm_kwargs={cfg.model.timm_kwargs}: "
            f"{type(error).__name__}: {error}"
        ) from None
    except (
        Exception
    ):  # a model whose constructor needs real tensors: the real build names any problem
        pass


@dataclass
class Run:
    run_id: str
    output_dir: Path
    resume_from: Path | None = None
    saved: dict | None = None  # the chosen checkpoint's trainer state
    world_size_changed: bool = False
    notes: list[str] = field(default_factory=list)
    new: bool = True  # no run.json of this run yet
    replace_previous: bool = False  # --overwrite: the previous run's checkpoints go


def _read_run_file(output_dir: Path) -> dict | None:
    path = output_dir / RUN_FILE
    if not path.exists():
        return None
    try:
        run = json.loads(path.read_text())
        if not isinstance(run, dict) or not isinstance(run.get("run_id"), str):
            raise ValueError("no run_id")
        return run
    except (OSError, ValueError) as error:
        raise RunError(
            f"{path} cannot be read ({error}); move it away, or pass --overwrite to start a new run in {output_dir}"
        ) from None


def _claim(output_dir: Path, run_id: str, cfg: TrainConfig, world_size: int) -> None:
    """Write run.json for a new run, failing if another run wrote one first (an exclusive link)."""
    record = {
        "run_id": run_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "world_size": world_size,
        "command": sys.argv,
    }
    staging = output_dir / f".{RUN_FILE}.{run_id}.tmp"
    atomic_write_text(staging, json.dumps(record, indent=1) + "\n")
    try:
        os.link(staging, output_dir / RUN_FILE)
    except FileExistsError:
        other = _read_run_file(output_dir)
        raise RunError(
            f"output_dir {output_dir} was just claimed by run {other and other['run_id']}; choose another --output_dir"
        ) from None
    finally:
        staging.unlink(missing_ok=True)
    fsync_directory(output_dir)


def acquire_run_lock(output_dir: Path) -> None:
    """Hold ``OUTPUT_DIR/run.lock`` (an exclusive ``flock``) until ``release_run_lock`` or the process ends, a
    crash or SIGKILL included (the kernel drops the lock with the process: a lock is never stale). Fresh start
    and resume alike: a second process on the same directory is refused naming the holder's PID and host,
    before it reads or changes anything. The file records the holder for that message."""
    output_dir = Path(output_dir).resolve()
    if output_dir in _held_locks:
        return
    path = output_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunError(
            f"output_dir {output_dir} is in use by {holder} ({path} is locked): two processes would write the "
            "same checkpoints; wait for it to end, or choose another --output_dir"
        ) from None
    except OSError:
        os.close(fd)
        raise
    since = datetime.now().isoformat(timespec="seconds")
    record = f"process {os.getpid()} on host {socket.gethostname()} since {since}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, (record + "\n").encode(), 0)
    _held_locks[output_dir] = fd


def release_run_lock(output_dir: str | Path) -> None:
    """Let another process use ``output_dir`` (the end of ``train.main``); a no-op where this process holds none."""
    fd = _held_locks.pop(Path(output_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing drops the flock


def _refuse_other_run(output_dir: Path, what: str) -> RunError:
    found = list_checkpoints(output_dir)
    held = (
        f" ({len(found)} checkpoints, the newest step {checkpoint_step(found[-1])})"
        if found
        else ""
    )
    return RunError(
        f"output_dir {output_dir} holds {what}{held}: pass --resume auto to continue it, --overwrite to delete its "
        "checkpoints and start a new run there, or choose a new --output_dir"
    )


def _decide(cfg: TrainConfig, world_size: int, say) -> dict:
    """Rank 0: the run id, the checkpoint to resume and what it changes, or a RunError."""
    output_dir = Path(cfg.output_dir)
    try:
        check_writable(output_dir, "output_dir")
        check_writable(checkpoint_dir(output_dir), "checkpoint directory")
        if cfg.eval_json:
            check_writable(Path(cfg.eval_json).parent or Path("."), "eval_json's directory")
    except OSError as error:
        raise RunError(str(error)) from None
    acquire_run_lock(
        output_dir
    )  # before anything is read or changed: a concurrent resume is refused here
    existing = _read_run_file(output_dir)
    foreign = [
        p
        for p in list_checkpoints(output_dir)
        if existing is None or manifest_run_id(p) != existing["run_id"]
    ]
    explicit = Path(cfg.resume) if cfg.resume and cfg.resume != "auto" else None
    if explicit is not None:  # found before building anything
        if not explicit.is_dir():
            raise RunError(f"resume={cfg.resume}: no such checkpoint directory")
        try:
            explicit_manifest = verify_checkpoint(explicit)
        except CheckpointError as error:
            raise RunError(f"resume={cfg.resume}: {error}") from None
        run_id = explicit_manifest["run_id"]
        if existing and existing["run_id"] != run_id and not cfg.overwrite:
            raise RunError(
                f"resume={cfg.resume} belongs to run {run_id}, "
                f"but output_dir {output_dir} holds run {existing['run_id']}: "
                "pass --overwrite to continue the checkpoint's run there, or choose a new --output_dir"
            )
    elif cfg.resume == "auto" and existing:
        run_id = existing["run_id"]
    elif (existing or foreign) and not cfg.overwrite:
        raise _refuse_other_run(
            output_dir, f"run {existing['run_id']}" if existing else "checkpoints of another run"
        )
    else:
        run_id = uuid.uuid4().hex
    replace_previous = bool(
        cfg.overwrite and (existing or foreign) and (existing or {}).get("run_id") != run_id
    )
    if explicit is not None:
        resume_from = explicit
    elif cfg.resume == "auto":
        resume_from, unusable = choose_checkpoint(output_dir, run_id, say)
        if resume_from is None and unusable:
            raise RunError(
                f"no checkpoint of run {run_id} in {checkpoint_dir(output_dir)} verifies "
                f"(set aside: {', '.join(unusable)}); "
                "resume one by path, or pass --overwrite to start a new run"
            )
    else:
        resume_from = None
    decision = {
        "run_id": run_id,
        "resume_from": str(resume_from) if resume_from else None,
        "notes": [],
        "world_size_changed": False,
        "new": existing is None or replace_previous,
        "replace_previous": replace_previous,
    }
    if resume_from is not None:
        manifest = (
            explicit_manifest
            if resume_from == explicit
            else json.loads((resume_from / "manifest.json").read_text())
        )  # verified
        saved = read_verified_json(resume_from, STATE_FILE, manifest)
        decision.update(saved=saved, **_compatibility(saved, cfg, world_size, resume_from))
    return decision


def _commit(run: Run, cfg: TrainConfig, world_size: int, say) -> None:
    """Rank 0, once the data checks passed: replace the previous run (--overwrite), remove this run's stale
    temporaries, claim the directory (run.json) and write the resolved config.yaml."""
    output_dir = run.output_dir
    if run.replace_previous:
        for path in list_checkpoints(output_dir):
            if run.resume_from is None or path.resolve() != run.resume_from.resolve():
                remove_checkpoint(path)
        clean_temporaries(output_dir, None)
        (output_dir / RUN_FILE).unlink(missing_ok=True)
        say(f"--overwrite: deleted the previous run's checkpoints in {output_dir}")
    stale = clean_temporaries(
        output_dir, None
    )  # the directory is this run's: any temporary is a crash's leftover
    if stale:
        say(
            f"removed {len(stale)} temporary checkpoint(s) a crash left: {', '.join(p.name for p in stale)}"
        )
    if run.new:
        _claim(output_dir, run.run_id, cfg, world_size)
    atomic_write_text(output_dir / "config.yaml", cfg.to_yaml())


def _compatibility(saved: dict, cfg: TrainConfig, world_size: int, path: Path) -> dict:
    applied, refused = resume_changes(saved.get("config", {}), cfg)
    saved_world = saved.get("world_size", world_size)
    notes = []
    if saved_world != world_size:
        if not cfg.allow_world_size_change:
            refused.append(
                f"world size: {saved_world} -> {world_size} processes (pass --allow_world_size_change to accept it)"
            )
        else:
            notes.append(
                f"world size {saved_world} -> {world_size}: the data order restarts at the "
                "beginning of the current epoch "
                "and ranks without a saved RNG state keep their fresh seeds"
            )
    steps_per_epoch, step = saved.get("steps_per_epoch") or 1, saved["step"]
    if round(cfg.epochs * steps_per_epoch) < step:
        applied = [change for change in applied if not change.startswith("epochs:")]
        refused.append(
            f"epochs: {saved.get('config', {}).get('epochs')} -> {cfg.epochs} ends the schedule at step "
            f"{round(cfg.epochs * steps_per_epoch)}, before step {step} where the checkpoint is"
        )
    if refused:
        raise RunError(
            f"cannot resume {path} with {'; '.join(refused)}. These change what the saved state means: resume with the "
            "checkpoint's values, or start a new run (--overwrite, or a new --output_dir)"
        )
    if applied:
        notes.append("resume applies the changed " + "; ".join(applied))
    return {"notes": notes, "world_size_changed": saved_world != world_size}


def plan_run(cfg: TrainConfig, control, log: RunLog) -> Run:
    """Every rank: rank 0 checks the output directory and decides the run id, the checkpoint to resume and
    what its config changes (``_decide``), and broadcasts; raises ``RunError`` on every rank. Nothing is
    claimed or deleted until ``claim_run``."""
    decision = None
    if control.is_main:
        try:
            decision = _decide(cfg, control.world_size, log.info)
        except (RunError, CheckpointError, OSError) as error:
            decision = {"error": str(error)}
    decision = control.broadcast_json(decision)
    if "error" in decision:
        raise RunError(decision["error"])
    run = Run(
        decision["run_id"],
        Path(cfg.output_dir),
        Path(decision["resume_from"]) if decision["resume_from"] else None,
        decision.get("saved"),
        decision["world_size_changed"],
        decision["notes"],
        decision["new"],
        decision["replace_previous"],
    )
    for note in run.notes:
        log.info(note)
    return run


def claim_run(run: Run, cfg: TrainConfig, control, log: RunLog) -> None:
    """Every rank, after the data checks: rank 0 commits the plan (``_commit``); raises ``RunError`` everywhere."""
    error = None
    if control.is_main:
        try:
            _commit(run, cfg, control.world_size, log.info)
        except (RunError, OSError) as failure:
            error = str(failure)
    error = control.first_error(error)
    if error:
        raise RunError(error)


def tracker_project(cfg: TrainConfig) -> str:
    """The project the tracker logs to: the configured one, else W&B's $WANDB_PROJECT (which Accelerate's
    ``init_trackers(project)`` would override), else simclr."""
    if cfg.tracker_project:
        return cfg.tracker_project
    return (os.environ.get("WANDB_PROJECT") if cfg.tracker == "wandb" else None) or "simclr"


def tracker_init_kwargs(cfg: TrainConfig, run: Run, step: int) -> dict:
    """The tracker continues the same run on resume: TensorBoard writes to the same directory and drops the
    events after the resumed step; W&B resumes the run whose id is this run's id. Name, tags, entity and
    ``tracker_init_kwargs`` from the config (the last override the others)."""
    if cfg.tracker == "wandb":
        kwargs = {"id": run.run_id, "resume": "allow", "dir": str(run.output_dir)}
        named = {
            "name": cfg.tracker_run_name,
            "tags": cfg.tracker_tags or None,
            "entity": cfg.tracker_entity,
        }
        kwargs.update({key: value for key, value in named.items() if value is not None})
        return {"wandb": {**kwargs, **cfg.tracker_init_kwargs}}
    if cfg.tracker == "tensorboard":
        kwargs = (
            {"purge_step": step + 1} if step else {}
        )  # events logged after the checkpoint was written
        kwargs.update(cfg.tracker_init_kwargs)
        return {"tensorboard": kwargs} if kwargs else {}
    return {}


def started_line(run: Run, world_size: int) -> str:
    how = f"resumed from {run.resume_from}" if run.resume_from else "started"
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"run {run.run_id} {how} with {world_size} process(es) at {when}: {' '.join(sys.argv)}"
