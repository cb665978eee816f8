"""The workers `make up` starts say once per flow run, not at every poll, that they could not
submit a run still waiting for its deployment's concurrency slot: Prefect's own logging setup
reads the config `servers.py` writes, in a fresh process, as a worker's does."""

import os
import subprocess
import sys

from flows.worker_logging import write_config

# What a worker does at each poll while a run waits (prefect/workers/base.py,
# `_propose_pending_state`): the same logger, the same message.
POLLS = """
import sys
from uuid import UUID
from prefect.client.schemas.objects import FlowRun
from prefect.logging.configuration import setup_logging
from prefect.logging.loggers import flow_run_logger

setup_logging()  # as `prefect worker start` does (prefect/cli/_app.py)

runs = [FlowRun(id=UUID(i), name=f"run-{n}", flow_id=UUID(int=1))
        for n, i in enumerate(sys.argv[1:])]
for _ in range(3):
    for run in runs:
        logger = flow_run_logger(flow_run=run).getChild("worker", extra={"worker_name": "w"})
        logger.info(f"Aborted submission of flow run '{run.id}': Server returned a "
                    "non-pending state 'SCHEDULED'")
logger.info("Opening process...")
"""
RUNS = ["00000000-0000-0000-0000-00000000000a", "00000000-0000-0000-0000-00000000000b"]


def worker_lines(env: dict) -> str:
    env = {**os.environ, "PREFECT_LOGGING_TO_API_ENABLED": "false", **env}
    done = subprocess.run([sys.executable, "-c", POLLS, *RUNS], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return done.stderr


def test_a_worker_says_once_that_a_run_waits_for_its_slot(tmp_path):
    path = write_config(tmp_path / "worker-logging.yml")
    said = worker_lines({"PREFECT_LOGGING_SETTINGS_PATH": str(path)})
    for run in RUNS:
        assert said.count(f"Aborted submission of flow run '{run}'") == 1, said
    assert "Opening process..." in said, "the worker's other lines pass"
