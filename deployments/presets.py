"""The run form's defaults for each preset deployment, generated from the shipped YAMLs.

`deployments/prefect.yaml` runs `preset` as a build step of `prefect deploy` (what `make deploy`
runs) and templates its output into each deployment's `parameters`, so a deployment's defaults are
its YAML's resolved config at deploy time and cannot drift from it: the same JSON that
`squadtune config --config NAME --json` prints.
"""

from __future__ import annotations

from typing import Any


def preset(config: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """A prefect.yaml build step: {"config": <the resolved config of a shipped YAML>}."""
    from pipeline_config import load_config

    return {"config": load_config(config, overrides or []).model_dump(mode="json")}
