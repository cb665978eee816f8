"""Storage every training worker reaches: a local folder, an NFS mount or an object store URI
(`s3://bucket/prefix`, or anything `pyarrow.fs` opens), through `pyarrow.fs`, which Ray Train
uses for its own checkpoints too.

A folder is complete once its marker (`.complete`, written last) exists: a reader never takes a
half-copied folder for a finished one.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

MARKER = ".complete"


def s3_options() -> dict[str, Any]:
    """The S3 client settings in this process's environment (endpoint, region, credentials).

    Given explicitly, they travel with the filesystem object to Ray's controller and workers,
    which may not share this environment; absent, each process uses its own credential chain
    (an IAM role on a cluster's nodes)."""
    env = os.environ
    options: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_override"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        options["access_key"] = env["AWS_ACCESS_KEY_ID"]
        options["secret_key"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            options["session_token"] = env["AWS_SESSION_TOKEN"]
    return options


class Storage:
    """Folders under one root URI, copied to and from local directories."""

    def __init__(self, uri: str, filesystem=None):
        import pyarrow.fs as pafs

        scheme = urlparse(uri).scheme
        if not scheme:  # a plain path: absolute, so every process means the same folder
            uri = str(Path(uri).expanduser().resolve())
        self.uri = uri.rstrip("/")
        if filesystem is not None:
            self.fs, self.root = filesystem, _strip(self.uri)
        elif not scheme:
            self.fs, self.root = pafs.LocalFileSystem(), self.uri
        elif scheme == "s3":
            self.fs = pafs.S3FileSystem(**s3_options())
            self.root = _strip(self.uri)
        else:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        self.root = self.root.rstrip("/")

    def __reduce__(self):  # the filesystem object pickles with its settings
        return (Storage, (self.uri, self.fs))

    def path(self, rel: str) -> str:
        """`rel` as a path on `self.fs`."""
        return posixpath.join(self.root, rel) if rel else self.root

    def url(self, rel: str) -> str:
        return f"{self.uri}/{rel}" if rel else self.uri

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def complete(self, rel: str) -> bool:
        return self.exists(posixpath.join(rel, MARKER))

    def put(self, local: Path, rel: str, *, skip: tuple[str, ...] = ()) -> None:
        """Copy the folder `local` to `rel`, then its marker; the names in `skip` stay behind."""
        import pyarrow.fs as pafs

        here = pafs.LocalFileSystem()
        local = Path(local)
        files = [p for p in sorted(local.rglob("*"))
                 if p.is_file() and p.relative_to(local).parts[0] not in skip]
        for folder in {"", *(p.parent.relative_to(local).as_posix() for p in files)}:
            # An object store has no folders; a local or mounted one needs them first.
            self.fs.create_dir(self.path(posixpath.join(rel, folder)), recursive=True)
        for path in files:
            target = self.path(posixpath.join(rel, path.relative_to(local).as_posix()))
            pafs.copy_files(str(path), target, source_filesystem=here,
                            destination_filesystem=self.fs)
        self.write_text(posixpath.join(rel, MARKER), "")

    def get(self, rel: str, local: Path) -> Path:
        """Copy the folder `rel` (without its marker) into `local`; returns `local`."""
        import pyarrow.fs as pafs

        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(rel), str(local), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        (local / MARKER).unlink(missing_ok=True)
        return local

    def write_text(self, rel: str, text: str) -> None:
        with self.fs.open_output_stream(self.path(rel)) as fh:
            fh.write(text.encode())

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self.path(rel)) as fh:
            return fh.read().decode()

    def delete(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_dir(self.path(rel))


def _strip(uri: str) -> str:
    """`s3://bucket/prefix` -> `bucket/prefix`: paths on a filesystem object carry no scheme."""
    parsed = urlparse(uri)
    return f"{parsed.netloc}{parsed.path}" if parsed.scheme else uri
