"""Content-addressed stage outputs and the Prefect cache keys that point at them.

Every stage writes `<state_dir>/artifacts/<stage>/<key>/` with a `manifest.json` written last, so a
directory without a readable manifest is an unfinished one. The Prefect cache key of a stage task is
the same `key`; when the cached output has gone missing or is corrupt, the key function returns None
so the task runs again (the existing cache record stays valid once the output is rebuilt).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline_config import stable_hash

MANIFEST = "manifest.json"


class StageOutput(BaseModel):
    """What a stage hands downstream: where its output is and the small facts about it."""

    stage: str
    key: str
    path: str
    manifest: dict[str, Any]

    @property
    def dir(self) -> Path:
        return Path(self.path)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: its name, the version of its meaning, and where its outputs live."""

    name: str
    version: str
    # Files that must exist in a finished output, besides the manifest.
    required: tuple[str, ...] = ()

    def key(self, *parts: Any) -> str:
        return stable_hash([self.name, self.version, *parts])

    def dir(self, state_dir: str | Path, key: str) -> Path:
        return Path(state_dir).resolve() / "artifacts" / self.name / key

    def finished(self, state_dir: str | Path, key: str) -> StageOutput | None:
        """The finished output for `key`, or None if it is missing, unfinished or corrupt."""
        directory = self.dir(state_dir, key)
        manifest = read_manifest(directory)
        if manifest is None or manifest.get("key") != key:
            return None
        if any(not (directory / name).exists() for name in self.required):
            return None
        return StageOutput(stage=self.name, key=key, path=str(directory), manifest=manifest)

    def build(
        self,
        state_dir: str | Path,
        key: str,
        produce: Callable[[Path], dict[str, Any]],
        *,
        in_place: bool = False,
    ) -> StageOutput:
        """Return the finished output for `key`, producing it first if needed.

        `produce(directory)` writes the output and returns the manifest. By default it writes to a
        scratch directory that is renamed into place when done; `in_place` keeps partial work (the
        training stage's checkpoints) where a re-run finds it.
        """
        done = self.finished(state_dir, key)
        if done is not None:
            return done
        final = self.dir(state_dir, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        work = final if in_place else final.with_name(f"{key}.partial-{os.getpid()}")
        if not in_place:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        manifest = {"stage": self.name, "version": self.version, **produce(work), "key": key}
        write_json(work / MANIFEST, manifest)
        if not in_place:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(work, final)
        return StageOutput(stage=self.name, key=key, path=str(final), manifest=manifest)

    def cache_key_fn(
        self,
        key_of: Callable[..., str],
        still_valid: Callable[[StageOutput], bool] | None = None,
    ) -> Callable[[Any, dict[str, Any]], str | None]:
        """A Prefect `cache_key_fn` keyed on the stage key, recomputing when the output is gone."""

        def cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
            key = key_of(**parameters)
            state_dir = parameters["state_dir"]
            # Results hold paths inside state_dir, so another state dir gets its own record.
            where = stable_hash(str(Path(state_dir).resolve()), length=8)
            cache_key = f"{self.name}-{key}-{where}"
            done = self.finished(state_dir, key)
            valid = done is not None and (still_valid is None or still_valid(done))
            if not valid and context.result_store.exists(cache_key):
                return None
            return cache_key

        return cache_key


def upstream_keys(*outputs: StageOutput) -> list[str]:
    return [f"{o.stage}:{o.key}" for o in outputs]
