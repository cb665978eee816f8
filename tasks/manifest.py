"""What a stage output is on disk: its directory, its files' checksums, its typed manifest.

`<state_dir>/artifacts/<stage>/<key>/manifest.json` is written last and is the output itself,
serialised: a `StageOutput` subclass whose fields downstream code reads as attributes. It lists
the output's files (size, mtime, sha256), the hash of the files that are its content, and the
content hashes of the outputs it was built from. An output is trusted only while its files are
there and unchanged and its inputs still hold what it was built from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from squadtune.hashing import sha256_file, stable_hash

MANIFEST = "manifest.json"
T = TypeVar("T", bound="StageOutput")


class StageOutput(BaseModel):
    """Where a stage's output is and what it holds; subclasses add the stage's own facts.

    The fields below are filled in by the stage mechanism (`tasks.stage`), not by the stage.
    """

    # NaN/inf losses (a diverged run) are written as JSON's NaN/Infinity and read back as floats.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    stage: str = ""
    stage_version: str = ""
    key: str = ""
    path: str = ""
    files: dict[str, dict[str, Any]] = {}
    content_hash: str = ""
    upstream: dict[str, str] = {}

    @property
    def dir(self) -> Path:
        return Path(self.path)

    @property
    def ref(self) -> str:
        return f"{self.stage}:{self.key}"

    def inputs(self) -> Iterator[StageOutput]:
        """The stage outputs this one carries as fields (what it was built from)."""
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, StageOutput):
                yield value


class StaleInput(RuntimeError):
    """An input changed on disk after it was handed to this stage: building on it would mix runs."""


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    text = obj.model_dump_json(indent=2) if isinstance(obj, BaseModel) else json.dumps(
        obj, indent=2, sort_keys=True, default=str
    )
    tmp.write_text(text)
    os.replace(tmp, path)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def read_output(directory: Path, output: type[T]) -> T | str:
    """The output a directory holds, or why it holds none (a string)."""
    manifest = read_manifest(directory)
    if manifest is None:
        return "not built" if not directory.exists() else "no finished manifest"
    try:
        return output.model_validate(manifest)
    except ValidationError as exc:
        return f"its manifest is not a {output.__name__} ({exc.error_count()} errors)"


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


def all_inputs(outputs: Iterable[StageOutput | None]) -> list[StageOutput]:
    """The outputs given and, recursively, those they carry, each once."""
    seen: dict[str, StageOutput] = {}
    todo = [o for o in outputs if o is not None]
    while todo:
        output = todo.pop()
        if output.ref not in seen:
            seen[output.ref] = output
            todo.extend(output.inputs())
    return list(seen.values())


def untrusted_inputs(output: StageOutput, inputs: Sequence[StageOutput]) -> str | None:
    """Why `output`'s recorded inputs disagree with `inputs` now, or None.

    Only inputs the output names are compared: an output keyed without an input's key (the base
    model reads only the tokenizer's size) does not depend on which one it is given.
    """
    for given in inputs:
        built_from = output.upstream.get(given.ref)
        if built_from is not None and built_from != given.content_hash:
            return f"its input {given.ref} holds other content than it was built from"
    return None


def check_inputs(inputs: Sequence[StageOutput]) -> None:
    """Refuse to build on inputs that changed since they were handed over, or that disagree on
    what they were built from (an evaluation of one adapter, another adapter on disk)."""
    for given in inputs:
        on_disk = read_manifest(given.dir) or {}
        wrong = damage(given.dir, on_disk.get("files", {})) if on_disk else "its manifest is gone"
        if on_disk.get("content_hash") != given.content_hash:
            wrong = wrong or "it was rebuilt with other content"
        wrong = wrong or untrusted_inputs(given, inputs)
        if wrong:
            raise StaleInput(
                f"input {given.ref} ({given.dir}) cannot be used: {wrong}. Another run "
                "changed it while this one ran; re-run to rebuild what depends on it"
            )
