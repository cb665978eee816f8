"""One Ray Train worker of the training stage: the Trainer `train_here` builds, on inputs copied
from storage into a scratch folder of its own, reporting each checkpoint to Ray.

A worker may run on a machine that does not see the flow's state dir: every path it reads is
under its scratch folder (in its TMPDIR), copied from `training.ray.storage`. On a restart Ray
hands it the last reported checkpoint, which becomes `checkpoints/checkpoint-N` there, so
`train_here` resumes from it as it resumes from a local one (transformers' Trainer does not
resume by itself: ray-project/ray#46814).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tasks.ray_engine import RAY_RUN

# Testing aid, set through training.ray.env_vars: "RANK:STEP:exit" makes that rank's process exit
# at the end of that step (os._exit: no exception, no cleanup), "RANK:STEP:hold" stops it there
# (until the driver is killed), on an attempt that started from step 0 (a restart from a
# checkpoint runs through). Either waits until Ray holds the checkpoints reported so far.
FAULT_AT_STEP = "SQUADTUNE_FAULT_AT_STEP"


def train_worker(spec: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`."""
    import ray
    import ray.train

    secrets = ray.get(spec["secrets"])
    os.environ.update(secrets)  # before MLflow's client reads them
    from ray.train.huggingface.transformers import RayTrainReportCallback

    from tasks.train import TrainJob, train_here

    scratch = Path(tempfile.mkdtemp(prefix="squadtune-ray-"))
    os.chdir(scratch)  # nothing of this worker lands in a folder another worker uses
    storage = spec["storage"]
    job = local_inputs(TrainJob.model_validate(spec["job"]), storage, spec["inputs"],
                       scratch / "inputs")
    out = scratch / "out"
    resumed = restore(out / "checkpoints")
    callbacks = [RayTrainReportCallback(), *fault_at_step(resumed)]
    train_here(job, out, callbacks)
    context = ray.train.get_context()
    if context.get_world_rank() == 0:
        (out / RAY_RUN).write_text(json.dumps({
            "storage": storage.url(spec["output"]), "workers": context.get_world_size(),
            "run": context.get_experiment_name(), "resumed_from_step": resumed,
            "scratch": str(scratch),
            # Names only: which of the flow's variables reached the workers.
            "environment_from_flow": sorted(
                {*secrets, *(n for n in spec["settings"] if n in os.environ)}),
        }, indent=2))
        storage.put(out, spec["output"], skip=("checkpoints",))
    shutil.rmtree(scratch, ignore_errors=True)


def local_inputs(job, storage, folders: dict[str, str], root: Path):
    """`job` with each stage output it reads copied from storage under `root`."""
    local = {name: str(storage.get(folder, root / name)) for name, folder in folders.items()}
    squad = job.tokenized.squad
    if "squad" in local:
        squad = squad.model_copy(update={"path": local["squad"]})
    return job.model_copy(update={
        "tokenized": job.tokenized.model_copy(update={"path": local["tokenized"],
                                                      "squad": squad}),
        "base": job.base.model_copy(update={"path": local["base"]}),
        "lora": job.lora.model_copy(update={"path": local["lora"]}),
    })


def restore(checkpoints: Path) -> int:
    """Ray's last reported checkpoint as `checkpoints/checkpoint-N`; its step, 0 for none."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    staged = Path(checkpoint.to_directory(str(checkpoints.parent / "restored")))
    trainer_checkpoint = staged / RayTrainReportCallback.CHECKPOINT_NAME
    step = int(json.loads((trainer_checkpoint / "trainer_state.json").read_text())["global_step"])
    checkpoints.mkdir(parents=True, exist_ok=True)
    shutil.move(str(trainer_checkpoint), str(checkpoints / f"checkpoint-{step}"))
    shutil.rmtree(staged, ignore_errors=True)
    print(f"restored Ray's checkpoint {checkpoint.path} (step {step})")
    return step


def fault_at_step(resumed: int) -> list[Any]:
    """The `SQUADTUNE_FAULT_AT_STEP` testing aid's callback, when it is set."""
    value = os.environ.get(FAULT_AT_STEP)
    if not value:
        return []
    from transformers import TrainerCallback

    rank, step, action = value.split(":")

    class FaultAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step != int(step) or args.process_index != int(rank) or resumed:
                return
            import ray.train

            # Ray records a report when its controller next polls the workers: act once it
            # holds the checkpoints reported so far, the state a restart starts from.
            ray.train.get_all_reported_checkpoints()
            print(f"{FAULT_AT_STEP}: rank {rank} {action}s at step {step}", flush=True)
            if action == "exit":
                os._exit(1)
            while True:
                time.sleep(60)

    return [FaultAtStep()]
