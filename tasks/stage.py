"""Content-addressed stage outputs and the Prefect cache keys that point at them.

Every stage writes `<state_dir>/artifacts/<stage>/<key>/` with a `manifest.json` written last. The
manifest lists the output's files (size, sha256), the hash of the files that are its content, and
the content hashes of the stage outputs it was built from. An output is trusted only when its
files are all there and unchanged and its inputs still hold what it was built from; anything else
is rebuilt, and a rebuild with identical content leaves its dependants cached.

A build holds the output's lease (`tasks.lease`), so a second run of the same stage waits and then
uses the first one's output. The Prefect cache key of a stage task is the same `key`; Prefect's
record only points at the directory, whose manifest is re-read whenever a record is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, model_validator

from pipeline_config import stable_hash
from tasks.lease import free, lease
from tasks.squad_io import sha256_file

MANIFEST = "manifest.json"
SCRATCH = ".partial-"


class StageOutput(BaseModel):
    """What a stage hands downstream: where its output is and the small facts about it."""

    stage: str
    key: str
    path: str
    manifest: dict[str, Any]

    @property
    def dir(self) -> Path:
        return Path(self.path)

    @model_validator(mode="after")
    def _current_manifest(self) -> StageOutput:
        # A Prefect cache record may predate a rebuild of the same key: the directory's manifest
        # is the truth, the record only says where it is.
        on_disk = read_manifest(self.dir)
        if on_disk is not None and on_disk.get("key") == self.key:
            self.manifest = on_disk
        return self


class StaleInput(RuntimeError):
    """An input changed on disk after it was handed to this stage: building on it would mix runs."""


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


def list_files(directory: Path, skip: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """relative path -> size, mtime and sha256 of every file of an output (not the manifest)."""
    skip = tuple(skip)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST or rel.startswith(skip):
            continue
        st = path.stat()
        files[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}
    return files


def damage(directory: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """What is wrong with the listed files, or None. A file whose size and mtime are as listed is
    taken as unchanged (the cheap check, as git's index does); any other is hashed again."""
    for rel, meta in files.items():
        path = directory / rel
        try:
            st = path.stat()
        except OSError:
            return f"{rel} is missing"
        if st.st_size != meta["size"]:
            return f"{rel} has {st.st_size} bytes, not {meta['size']}"
        if st.st_mtime_ns != meta["mtime_ns"] and sha256_file(path) != meta["sha256"]:
            return f"{rel} changed content"
    return None


def content_hash(files: dict[str, dict[str, Any]], content: Sequence[str]) -> str:
    """Identity of an output's content: the hashes of its content files (all files by default)."""
    chosen = {
        r: m["sha256"] for r, m in files.items() if not content or r.startswith(tuple(content))
    }
    return stable_hash(chosen)


def ref(output: StageOutput) -> str:
    return f"{output.stage}:{output.key}"


def task_inputs() -> list[StageOutput]:
    """The stage outputs the running Prefect task was called with: a stage's inputs."""
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    return inputs_of(context.parameters) if context is not None else []


def inputs_of(parameters: dict[str, Any]) -> list[StageOutput]:
    return [v for v in parameters.values() if isinstance(v, StageOutput)]


def untrusted_inputs(manifest: dict[str, Any], inputs: Sequence[StageOutput]) -> str | None:
    """Why `manifest`'s recorded inputs disagree with `inputs` now, or None.

    Only inputs the manifest names by key are compared: an output keyed without an input's key
    (the base model reads only the tokenizer's size) does not depend on which one it is given.
    """
    recorded = manifest.get("upstream", {})
    for output in inputs:
        built_from = recorded.get(ref(output))
        if built_from is not None and built_from != output.manifest.get("content_hash"):
            return f"its input {ref(output)} holds other content than it was built from"
    return None


def check_inputs(inputs: Sequence[StageOutput]) -> None:
    """Refuse to build on inputs that changed since they were handed over, or that disagree on
    what they were built from (an evaluation of one adapter, another adapter on disk)."""
    for output in inputs:
        on_disk = read_manifest(output.dir) or {}
        wrong = damage(output.dir, on_disk.get("files", {})) if on_disk else "its manifest is gone"
        if on_disk.get("content_hash") != output.manifest.get("content_hash"):
            wrong = wrong or "it was rebuilt with other content"
        wrong = wrong or untrusted_inputs(output.manifest, inputs)
        if wrong:
            raise StaleInput(
                f"input {ref(output)} ({output.dir}) cannot be used: {wrong}. Another run "
                "changed it while this one ran; re-run to rebuild what depends on it"
            )


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: its name, the version of its meaning, and where its outputs live."""

    name: str
    version: str
    # Files that must exist in a finished output, besides the manifest.
    required: tuple[str, ...] = ()
    # Path prefixes whose files are the output's identity for dependants (default: all files).
    content: tuple[str, ...] = ()
    # Path prefixes of working files that are not part of the output (training checkpoints).
    scratch: tuple[str, ...] = ()

    def key(self, *parts: Any) -> str:
        return stable_hash([self.name, self.version, *parts])

    def dir(self, state_dir: str | Path, key: str) -> Path:
        return Path(state_dir).resolve() / "artifacts" / self.name / key

    def why_not_finished(
        self, state_dir: str | Path, key: str, inputs: Sequence[StageOutput] = ()
    ) -> str | None:
        directory = self.dir(state_dir, key)
        manifest = read_manifest(directory)
        if manifest is None or manifest.get("key") != key:
            return "not built" if not directory.exists() else "no finished manifest"
        if "files" not in manifest or "content_hash" not in manifest:
            return "its manifest lists no files to verify (built by an older version)"
        missing = [name for name in self.required if not (directory / name).exists()]
        if missing:
            return f"{missing[0]} is missing"
        return damage(directory, manifest["files"]) or untrusted_inputs(manifest, inputs)

    def finished(
        self, state_dir: str | Path, key: str, inputs: Sequence[StageOutput] = ()
    ) -> StageOutput | None:
        """The finished output for `key`, or None if it is missing, unfinished, damaged, or was
        built from inputs whose content has changed since."""
        if self.why_not_finished(state_dir, key, inputs) is not None:
            return None
        directory = self.dir(state_dir, key)
        return StageOutput(
            stage=self.name, key=key, path=str(directory), manifest=read_manifest(directory)
        )

    def build(
        self,
        state_dir: str | Path,
        key: str,
        produce: Callable[[Path], dict[str, Any]],
        *,
        in_place: bool = False,
        inputs: Sequence[StageOutput] | None = None,
    ) -> StageOutput:
        """Return the finished output for `key`, producing it first if needed.

        `produce(directory)` writes the output and returns the manifest. By default it writes to a
        scratch directory that is renamed into place when done (and removed if it fails);
        `in_place` keeps partial work (the training stage's checkpoints) where a re-run finds it.
        `inputs` are the stage outputs it reads (default: those the Prefect task was called with).
        """
        inputs = task_inputs() if inputs is None else list(inputs)
        done = self.finished(state_dir, key, inputs)
        if done is not None:
            return done
        with lease(state_dir, f"{self.name}-{key}", f"stage {self.name} ({key})", _flow_run()):
            why = self.why_not_finished(state_dir, key, inputs)
            if why is None:  # another run built it while this one waited
                return self.finished(state_dir, key, inputs)
            if why != "not built":
                print(f"stage {self.name} ({key}) is rebuilt: {why}")
            return self._build(state_dir, key, produce, in_place, inputs)

    def _build(self, state_dir, key, produce, in_place, inputs) -> StageOutput:
        check_inputs(inputs)
        final = self.dir(state_dir, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f"{key}{SCRATCH}*"):  # a dead build's: we hold the lease
            shutil.rmtree(stale, ignore_errors=True)
        work = final if in_place else final.with_name(f"{key}{SCRATCH}{os.getpid()}")
        if in_place:
            (final / MANIFEST).unlink(missing_ok=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        try:
            produced = produce(work)
            check_inputs(inputs)  # still the inputs it started from
            files = list_files(work, self.scratch)
            manifest = {
                "stage": self.name, "version": self.version, **produced, "key": key,
                "files": files, "content_hash": content_hash(files, self.content),
                "upstream": {ref(o): o.manifest.get("content_hash") for o in inputs},
            }
            write_json(work / MANIFEST, manifest)
        except BaseException:
            if not in_place:
                shutil.rmtree(work, ignore_errors=True)
            raise
        if not in_place:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(work, final)
        return StageOutput(stage=self.name, key=key, path=str(final), manifest=manifest)

    def cache_key_fn(
        self,
        key_of: Callable[..., str],
        still_valid: Callable[[StageOutput], bool] | None = None,
    ) -> Callable[[Any, dict[str, Any]], str | None]:
        """A Prefect `cache_key_fn` keyed on the stage key, recomputing when the output is not
        trusted any more."""

        def cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
            key = key_of(**parameters)
            state_dir = parameters["state_dir"]
            # Results hold paths inside state_dir, so another state dir gets its own record.
            where = stable_hash(str(Path(state_dir).resolve()), length=8)
            cache_key = f"{self.name}-{key}-{where}"
            done = self.finished(state_dir, key, inputs_of(parameters))
            valid = done is not None and (still_valid is None or still_valid(done))
            if not valid and context.result_store.exists(cache_key):
                return None
            return cache_key

        return cache_key


def _flow_run() -> str | None:
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    return str(context.task_run.flow_run_id) if context is not None else None


def sweep_scratch(state_dir: str | Path) -> list[Path]:
    """Remove scratch directories of builds that died (their lease is free); returns them."""
    removed = []
    for work in (Path(state_dir).resolve() / "artifacts").glob(f"*/*{SCRATCH}*"):
        key = work.name.split(SCRATCH)[0]
        if free(state_dir, f"{work.parent.name}-{key}"):
            shutil.rmtree(work, ignore_errors=True)
            removed.append(work)
    return removed


def upstream_keys(*outputs: StageOutput) -> list[str]:
    return [f"{o.stage}:{o.key}" for o in outputs]
