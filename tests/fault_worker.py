"""train.py under injected faults, for tests/test_faults.py: in one process or one per rank under torchrun.

    python tests/fault_worker.py SPEC_JSON TRAIN_ARGS...
    torchrun --standalone --nproc_per_node 2 tests/fault_worker.py SPEC_JSON TRAIN_ARGS...

SPEC_JSON is a JSON object; every key is optional and names a fault:
  report: a directory; each rank writes rank{R}.json there: its exit status and the checkpoints it loaded
  sigterm_after_step: {"RANK": STEP}: that rank sends itself SIGTERM once its STEP-th step returns
  sigterm_launcher_after_step: {"RANK": STEP}: that rank sends SIGTERM to its parent (torchrun's agent,
      which forwards it to every worker, as a scheduler's signal does)
  ready_after_step: [PATH, STEP]: rank 0 creates PATH once its STEP-th step returns (a test then signals the
      launcher from outside); with report, each rank also writes rank{R}.pid there at start
  hide_newest_checkpoint_on: [RANK, ...]: on those ranks, listing the checkpoint directory omits the newest
      (a stale NFS/Lustre directory cache)
  crash_before_rename: N: the process dies (os._exit, no clean-up) after writing its N-th checkpoint's files,
      before renaming it into place
"""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import simclr_dali.trainer.checkpoint as checkpoint  # noqa: E402
import simclr_dali.trainer.run as run  # noqa: E402
from simclr_dali import train  # noqa: E402

spec, argv = json.loads(sys.argv[1]), sys.argv[2:]
rank = int(os.environ.get("RANK", 0))
loaded = []

original_step = train.train_step
steps_taken = [0]


def injected_step(*args, **kwargs):
    out = original_step(*args, **kwargs)
    steps_taken[0] += 1
    if spec.get("sigterm_after_step", {}).get(str(rank)) == steps_taken[0]:
        os.kill(os.getpid(), signal.SIGTERM)
    if spec.get("sigterm_launcher_after_step", {}).get(str(rank)) == steps_taken[0]:
        os.kill(os.getppid(), signal.SIGTERM)
    if "ready_after_step" in spec and rank == 0 and spec["ready_after_step"][1] == steps_taken[0]:
        Path(spec["ready_after_step"][0]).touch()
    return out


train.train_step = injected_step

if spec.get("report"):  # the test ends stray workers by these ids
    Path(spec["report"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["report"]) / f"rank{rank}.pid").write_text(str(os.getpid()))

if rank in spec.get("hide_newest_checkpoint_on", []):
    listing = checkpoint.list_checkpoints

    def stale_listing(output_dir):
        return listing(output_dir)[:-1]

    checkpoint.list_checkpoints = run.list_checkpoints = stale_listing

original_load = checkpoint.Checkpointer.load


def recorded_load(self, path, *args, **kwargs):
    loaded.append(str(path))
    return original_load(self, path, *args, **kwargs)


checkpoint.Checkpointer.load = recorded_load

if "crash_before_rename" in spec:
    writes = [0]
    original_replace = checkpoint.replace_directory

    def crashing_replace(staging, target):
        writes[0] += 1
        if writes[0] == spec["crash_before_rename"]:
            os._exit(9)  # a node crash: no exception handlers, no clean-up
        return original_replace(staging, target)

    checkpoint.replace_directory = crashing_replace

status = train.main(argv)
if spec.get("report"):
    Path(spec["report"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["report"]) / f"rank{rank}.json").write_text(
        json.dumps({"status": status, "loaded": loaded, "steps": steps_taken[0]})
    )
sys.exit(status)
