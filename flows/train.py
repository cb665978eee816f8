"""Training alone, as a flow: deployed on a GPU work pool, and sent a `TrainJob` by `finetune`
when `training.deployment` names it. Stage outputs travel as paths on storage both hosts share."""

from __future__ import annotations

from prefect import flow

from tasks.manifest import all_inputs
from tasks.outputs import Adapter
from tasks.tracking import local_defaults
from tasks.train import TrainJob, train_adapter


@flow(name="train", log_prints=True)
def train(job: TrainJob) -> Adapter:
    """Train the adapter here (cached and resumable as in `finetune`).

    Args:
        job: The run (config, shared state dir, MLflow run to log into) and the stage outputs
            training reads: the initial adapter, the tokenized data and the base model.
    """
    local_defaults(job.run.state_dir)
    return train_adapter(job.run, job.lora, job.tokenized, job.base)


def train_on_pool(job: TrainJob) -> Adapter:
    """Run the `train` flow as `training.deployment` (on its own work pool) and wait for it; its
    output lands in the shared state dir under the key this process computes too."""
    from prefect.deployments import run_deployment

    deployment = job.run.config.training.deployment
    key = train_adapter.key(job.run, job.lora, job.tokenized, job.base)
    inputs = all_inputs([job.lora, job.tokenized, job.base])
    done = train_adapter.spec.finished(job.run.state_dir, key, inputs)
    if done is not None:  # the cache hit the stage itself would take: no job for the pool
        print(f"train_adapter ({key}) is cached: nothing sent to {deployment}")
        return done
    flow_run = run_deployment(
        deployment,
        parameters={"job": job.model_dump(mode="json")},
        flow_run_name=f"train-{key}",
        timeout=None,
        poll_interval=2,
    )
    state = flow_run.state
    if state is None or not state.is_completed():
        name, message = (state.name, state.message) if state else ("unknown", "")
        raise RuntimeError(
            f"training deployment {deployment} ended {name}: {message} (flow run {flow_run.id}); "
            "re-run to resume from its last checkpoint"
        )
    done = train_adapter.spec.finished(job.run.state_dir, key)
    if done is None:
        raise RuntimeError(
            f"training deployment {deployment} finished but "
            f"{train_adapter.spec.dir(job.run.state_dir, key)} holds no finished output: is the "
            "state dir the same shared storage on both hosts?"
        )
    return done
