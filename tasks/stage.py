"""The one shape of a stage, and its one cache: the content-addressed stage directory.

    @stage("tokenized", version="3", reads=("data.max_seq_len", "data.refusal_answer"))
    def format_and_tokenize(run: Run, squad: SquadData, out: Path) -> Tokenized:
        ...

Calling `format_and_tokenize(run, squad)` computes the stage's key once: its name and version,
the config slices it `reads`, the keys of its stage-output inputs, and any `identity` of what
else it reads (file hashes). It then runs the Prefect task, whose cache record points at the
same key. The task returns the finished output when the directory holds one that verifies
(files unchanged, inputs still the content it was built from, manifest parsing as the declared
type); otherwise it builds into a scratch directory under the output's lease (`tasks.lease`) and
renames it into place, so a second run of the same stage waits and then uses the first one's.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic_core import to_jsonable_python

from pipeline_config import PipelineConfig, Section
from squadtune.hashing import stable_hash
from tasks.lease import free, lease
from tasks.manifest import (
    MANIFEST,
    StageOutput,
    all_inputs,
    check_inputs,
    content_hash,
    damage,
    list_files,
    read_output,
    untrusted_inputs,
    write_json,
)

SCRATCH = ".partial-"


class Run(BaseModel):
    """What every stage of one flow run shares."""

    model_config = ConfigDict(frozen=True)

    config: PipelineConfig
    state_dir: str
    mlflow_run_id: str | None = None
    flow_run_id: str | None = None


def config_slice(config: PipelineConfig, path: str) -> Any:
    """The cache-relevant value at a dotted config path: a section without the fields that
    never change results, or a plain value."""
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    return value.cache_dict() if isinstance(value, Section) else to_jsonable_python(value)


@dataclass(frozen=True)
class Stage:
    """A stage's declaration: its name, the version of its meaning, what its key is made of,
    and what a finished output must hold."""

    name: str
    version: str
    output: type[StageOutput]
    reads: tuple[str, ...] = ()
    ignores: tuple[str, ...] = ()  # dotted fields of a section in `reads` that it does not read
    keyed: tuple[str, ...] | None = None  # inputs whose keys count (default: all of them)
    # More of what it reads, as JSON: (run, **inputs) -> file hashes, a hub revision. Computed
    # once per run, and handed to the stage function when it takes an `identity` parameter.
    identity: Callable[..., Any] | None = None
    required: tuple[str, ...] = ()  # files a finished output holds besides the manifest
    content: tuple[str, ...] = ()  # path prefixes that are its identity (default: all files)
    scratch: tuple[str, ...] = ()  # path prefixes of working files (training checkpoints)
    in_place: bool = False  # build in the final directory, keeping partial work for a re-run
    # A check of a finished output against the world outside the state dir (its model version
    # still registered): (output) -> why it no longer holds, or None.
    still_valid: Callable[[Any], str | None] | None = None

    def key(self, run: Run, inputs: dict[str, Any], identity: Any = None) -> str:
        reads = {path: config_slice(run.config, path) for path in self.reads}
        for path in self.ignores:
            section, name = path.rsplit(".", 1)
            reads[section].pop(name, None)
        keys = {
            name: value.key for name, value in inputs.items()
            if isinstance(value, StageOutput) and (self.keyed is None or name in self.keyed)
        }
        return stable_hash([self.name, self.version, reads, keys, identity])

    def dir(self, state_dir: str | Path, key: str) -> Path:
        return Path(state_dir).resolve() / "artifacts" / self.name / key

    def load(self, state_dir: str | Path, key: str, inputs=()) -> StageOutput | str:
        """The finished, verified output for `key`, or why there is none (a string)."""
        directory = self.dir(state_dir, key)
        output = read_output(directory, self.output)
        if isinstance(output, str):
            return output
        if output.key != key:
            return "no finished manifest"
        missing = [name for name in self.required if not (directory / name).exists()]
        if missing:
            return f"{missing[0]} is missing"
        why = damage(directory, output.files) or untrusted_inputs(output, inputs)
        why = why or (self.still_valid(output) if self.still_valid else None)
        return why or output.model_copy(update={"path": str(directory)})

    def finished(self, state_dir: str | Path, key: str, inputs=()) -> StageOutput | None:
        found = self.load(state_dir, key, inputs)
        return None if isinstance(found, str) else found

    def build(self, run: Run, key: str, produce: Callable[[Path], StageOutput], inputs) -> Any:
        """The finished output for `key`, produced first (under the output's lease) if needed."""
        inputs = all_inputs(inputs)
        done = self.finished(run.state_dir, key, inputs)
        if done is not None:
            return done
        with lease(run.state_dir, f"{self.name}-{key}", f"stage {self.name} ({key})",
                   run.flow_run_id):
            found = self.load(run.state_dir, key, inputs)
            if not isinstance(found, str):  # another run built it while this one waited
                return found
            if found != "not built":
                print(f"stage {self.name} ({key}) is rebuilt: {found}")
            return self._build(run.state_dir, key, produce, inputs)

    def _build(self, state_dir, key, produce, inputs) -> StageOutput:
        check_inputs(inputs)
        final = self.dir(state_dir, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f"{key}{SCRATCH}*"):  # a dead build's: we hold the lease
            shutil.rmtree(stale, ignore_errors=True)
        work = final if self.in_place else final.with_name(f"{key}{SCRATCH}{os.getpid()}")
        if self.in_place:
            (final / MANIFEST).unlink(missing_ok=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        try:
            produced = produce(work)
            check_inputs(inputs)  # still the inputs it started from
            files = list_files(work, self.scratch)
            output = self.output.model_validate({
                **produced.model_dump(), "stage": self.name, "stage_version": self.version,
                "key": key, "path": str(final), "files": files,
                "content_hash": content_hash(files, self.content),
                "upstream": {o.ref: o.content_hash for o in inputs},
            })
            write_json(work / MANIFEST, output)
        except BaseException:
            if not self.in_place:
                shutil.rmtree(work, ignore_errors=True)
            raise
        if not self.in_place:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(work, final)
        return output


def stage(name: str, version: str, **declaration: Any) -> Callable[[Callable], StageFunction]:
    """Make `fn(run, *inputs, out) -> Output` a cached pipeline stage (see the module doc).

    Keyword arguments are `Stage`'s fields, plus `task`: options of the Prefect task (e.g.
    `task_run_name`).
    """
    task_options = declaration.pop("task", {})

    def wrap(fn: Callable) -> StageFunction:
        output = inspect.signature(fn).return_annotation
        output = fn.__globals__[output] if isinstance(output, str) else output
        spec = Stage(name, version, output, **declaration)
        return StageFunction(fn, spec, task_options)

    return wrap


class StageFunction:
    """A stage as the flow calls it: `stage_fn(run, *inputs)` returns its typed output."""

    def __init__(self, fn: Callable, spec: Stage, task_options: dict[str, Any]):
        from prefect import task

        functools.update_wrapper(self, fn)
        self.fn, self.spec = fn, spec
        params = list(inspect.signature(fn).parameters.values())
        self.takes_identity = any(p.name == "identity" for p in params)
        inputs = [p for p in params if p.name not in ("out", "identity")]
        self.signature = inspect.Signature(inputs)

        def body(*args: Any, key: str, **kwargs: Any) -> StageOutput:
            bound = self.signature.bind(*args, **{k: v for k, v in kwargs.items()
                                                  if k != "identity"})
            bound.apply_defaults()
            extra = {"identity": kwargs["identity"]} if self.takes_identity else {}
            return spec.build(
                bound.arguments["run"], key,
                lambda out: fn(*bound.args, out=out, **bound.kwargs, **extra),
                [v for v in bound.arguments.values() if isinstance(v, StageOutput)],
            )

        keyword = inspect.Parameter.KEYWORD_ONLY
        body.__signature__ = inspect.Signature(  # Prefect reads the task's parameters from it
            [*inputs, inspect.Parameter("key", keyword, annotation=str)]
            + ([inspect.Parameter("identity", keyword)] if self.takes_identity else [])
        )
        # Prefect keys a task by its function's name and code: each stage's own, not `body`'s.
        body.__name__, body.__qualname__ = fn.__name__, fn.__qualname__
        body.__module__ = fn.__module__
        options = {"log_prints": True, **task_options}
        self.task = task(
            body, name=fn.__name__, description=(fn.__doc__ or "").strip().split("\n")[0],
            cache_key_fn=self.cache_key, persist_result=True, result_serializer="json",
            **options,
        )

    def key(self, *args: Any, **kwargs: Any) -> str:
        """The stage key of a call with these arguments."""
        return self._key(*args, **kwargs)[0]

    def _key(self, *args: Any, **kwargs: Any):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        run, *_ = bound.arguments.values()
        inputs = {k: v for k, v in bound.arguments.items() if k != "run"}
        identity = self.spec.identity(run, **inputs) if self.spec.identity else None
        return self.spec.key(run, inputs, identity), identity, bound, run

    def build(self, *args: Any, **kwargs: Any) -> Any:
        """The stage's output without Prefect: found, or built in this process (tests, tools)."""
        key, identity, bound, run = self._key(*args, **kwargs)
        extra = {"identity": identity} if self.takes_identity else {}
        return self.task.fn(*bound.args, key=key, **bound.kwargs, **extra)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key, identity, bound, run = self._key(*args, **kwargs)
        extra = {"identity": identity} if self.takes_identity else {}
        result = self.task(*bound.args, key=key, **bound.kwargs, **extra)
        # Prefect's record only says where the output is: its directory is the truth.
        return self.spec.finished(run.state_dir, key) or result

    def cache_key(self, context: Any, parameters: dict[str, Any]) -> str | None:
        """Prefect's cache key: the stage key, scoped to the state dir; None (recompute) when
        a record exists but the output it points at is no longer trusted."""
        run, key = parameters["run"], parameters["key"]
        # Results hold paths inside state_dir, so another state dir gets its own record.
        where = stable_hash(str(Path(run.state_dir).resolve()), length=8)
        cache_key = f"{self.spec.name}-{key}-{where}"
        inputs = all_inputs(v for v in parameters.values() if isinstance(v, StageOutput))
        done = self.spec.finished(run.state_dir, key, inputs)
        if done is None and context.result_store.exists(cache_key):
            return None
        return cache_key


def sweep_scratch(state_dir: str | Path) -> list[Path]:
    """Remove scratch directories of builds that died (their lease is free); returns them."""
    removed = []
    for work in (Path(state_dir).resolve() / "artifacts").glob(f"*/*{SCRATCH}*"):
        key = work.name.split(SCRATCH)[0]
        if free(state_dir, f"{work.parent.name}-{key}"):
            shutil.rmtree(work, ignore_errors=True)
            removed.append(work)
    return removed
