"""Local data files as a run reads them, and what a person does about a bad one.

Each file's bytes are read once, hashed and parsed from the same bytes, so the data stage trains
on exactly what its cache key names: a file that changed after the key was computed (a copy still
being written) stops the run with a line that says so. A watched folder (a directory in
`data.train_files`) grows one file at a time, so its newest file must be clean: one bad record in
it refuses the run, naming the file and the record, instead of hiding under
`data.max_bad_fraction`, a share that loosens as the folder grows. Two files with the same bytes
are named together. Errors about a folder's files say what to do with those files.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from squadtune.squad_io import (
    DataError,
    check_share,
    data_files,
    example,
    file_bytes,
    read_file,
    validate,
)


@dataclass(frozen=True)
class Source:
    """One data file: where it is, the folder it came from (None for a named file), its
    content's sha256, its modification time and how many records it holds."""

    path: Path
    folder: Path | None
    sha256: str
    mtime: float
    records: int

    @property
    def label(self) -> str:
        """How messages name it: by name inside its folder, by path otherwise."""
        return self.path.name if self.folder else str(self.path)


def located(paths: list[str], field: str) -> list[tuple[Path, Path | None]]:
    """Each data file the field names, with the directory it was found in (None when named)."""
    found = []
    for path in paths:
        resolved = Path(path).expanduser().resolve()
        folder = resolved if resolved.is_dir() else None
        found += [(file, folder) for file in data_files([path], field)]
    return found


def read_sources(paths: list[str], field: str, expected: list[str] | None = None
                 ) -> tuple[list[dict[str, Any]], bool, list[Source]]:
    """Rows of every file (each tagged with its file), whether any file is v2.0, and the files.

    `expected`: the sha256 of each file when the run's cache key was computed; a file whose bytes
    differ now stops the run (DataError)."""
    rows, v2, sources = [], False, []
    files = located(paths, field)
    if expected is not None and len(expected) != len(files):
        raise DataError(
            f"{field}: {len(files)} data files now, {len(expected)} when this run computed its "
            "cache key: files were added or removed while it started. The run stops rather than "
            "read other data than its key names; the next run reads them")
    for n, (path, folder) in enumerate(files):
        data = file_bytes(path)
        digest = hashlib.sha256(data).hexdigest()
        if expected is not None and digest != expected[n]:
            raise DataError(
                f"{path} changed after this run hashed it (was it still being written?): the "
                "run stops rather than train on bytes its cache key does not name. Copy a file "
                "in under a hidden or .part name and rename it when complete; the watcher "
                "announces the finished file")
        file_rows, file_v2 = read_file(path, data)
        source = Source(path, folder, digest, path.stat().st_mtime, len(file_rows))
        for row in file_rows:
            row["_file"], row["_folder"] = source.label, str(folder) if folder else None
        rows += file_rows
        v2 = v2 or file_v2
        sources.append(source)
    same_bytes(sources)
    return rows, v2, sources


def same_bytes(sources: list[Source]) -> None:
    """Refuse two files with the same content: every question would be there twice."""
    first: dict[str, Source] = {}
    for source in sources:
        earlier = first.setdefault(source.sha256, source)
        if earlier is not source:
            where = source.folder or earlier.folder
            fix = (f"remove one of them from {where}" if where
                   else "name only one of them in the config")
            raise DataError(f"{source.path} has the same bytes as {earlier.path}: the same "
                            f"questions twice (every id a duplicate); {fix}")


def bad_by_file(bad: list[dict[str, Any]]) -> dict[str, int]:
    """Rejected records per file, most first."""
    return dict(Counter(b.get("file", "") for b in bad).most_common())


def check_newest(sources: list[Source], bad: list[dict[str, Any]], squad_v2: bool) -> None:
    """Refuse a run whose newest file in a watched folder holds any bad record: the file just
    dropped in is the one a person can still fix."""
    folders = {s.folder for s in sources if s.folder}
    for folder in sorted(folders):
        newest = max((s for s in sources if s.folder == folder),
                     key=lambda s: (s.mtime, s.path.name))
        rejected = [b for b in bad if b.get("file") == newest.label]
        if not rejected:
            continue
        examples = "; ".join(example(b) for b in rejected[:3])
        # Unanswerable questions in a file that says v1.1 are v2.0 data, not bad data.
        fix = ("set data.squad_v2=true (the file holds unanswerable, SQuAD v2.0 questions)"
               if not squad_v2 and all(b["reason"] == "no answer" for b in rejected) else
               f"fix the record(s) and copy the file in again, or move it out of {folder}")
        raise DataError(
            f"{newest.path}: {len(rejected)} of {newest.records} records are malformed "
            f"({examples}). It is the newest file of the watched folder {folder}, so the run "
            f"stops before training on it. To go on, {fix}")


def checked(train: list, held: list, squad_v2: bool, sources: dict[str, list[Source]],
            max_bad: float) -> tuple[tuple[list, list], tuple[list, list]]:
    """Both splits validated, (good, bad) each: a bad record in a watched folder's newest file
    is refused first (the file a person just dropped in), then each split's share of bad ones."""
    results = validate(train, "train", squad_v2, None), validate(held, "eval", squad_v2, None)
    check_newest(sources["train"] + sources["eval"], results[0][1] + results[1][1], squad_v2)
    check_share(train, results[0][1], "train", squad_v2, max_bad)
    check_share(held, results[1][1], "eval", squad_v2, max_bad)
    return results


def let_through(bad: list[dict[str, Any]], max_bad: float) -> str | None:
    """A warning naming the bad records a run goes on without (under data.max_bad_fraction),
    per file; None when there are none."""
    if not bad:
        return None
    files = ", ".join(f"{name or 'hub'}: {count}" for name, count in bad_by_file(bad).items())
    plural = "s" if len(bad) > 1 else ""
    return (f"{len(bad)} malformed record{plural} left out, under data.max_bad_fraction="
            f"{max_bad} ({files}; e.g. {example(bad[0])})")
