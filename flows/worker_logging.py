"""Logging of the workers `make up` starts: Prefect's own logging config, with one filter.

A flow run waiting for its deployment's concurrency slot (`finetune-retrain` runs one at a time)
stays SCHEDULED, and a worker tries to submit it at every poll, logging "Aborted submission of
flow run '...': Server returned a non-pending state 'SCHEDULED'" each time: hundreds of lines
while a training run holds the slot. The filter lets the first such line of each flow run
through and drops its repeats. Prefect reads the config from `PREFECT_LOGGING_SETTINGS_PATH`
(`deployments/servers.py` writes it next to the workers' logs and sets it for them).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

ABORTED = "Aborted submission of flow run '"
WORKER_LOGGER = "prefect.flow_runs.worker"  # the flow-run logger a worker logs submissions on


class RepeatedAborts(logging.Filter):
    """Drops a worker's "Aborted submission" lines after the first one of each flow run."""

    def __init__(self, remember: int = 10_000):
        super().__init__()
        self.said: OrderedDict[str, None] = OrderedDict()
        self.remember = remember

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(ABORTED):
            return True
        run = message[len(ABORTED):].split("'", 1)[0]
        if run in self.said:
            return False
        self.said[run] = None
        if len(self.said) > self.remember:
            self.said.popitem(last=False)
        return True


def write_config(path: Path) -> Path:
    """Prefect's default logging config plus the filter on the workers' logger, at `path`."""
    import yaml
    from prefect.logging.configuration import DEFAULT_LOGGING_SETTINGS_PATH

    # Read as text: Prefect fills its ${SETTING} placeholders when it loads the file.
    config = yaml.safe_load(DEFAULT_LOGGING_SETTINGS_PATH.read_text())
    config.setdefault("filters", {})["repeated_aborts"] = {"()": f"{__name__}.RepeatedAborts"}
    config["loggers"][WORKER_LOGGER] = {"level": "NOTSET", "filters": ["repeated_aborts"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
