"""Content identities: canonical-JSON hashes for cache keys, sha256 of files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of `obj`, truncated: the building block of cache keys."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks: the identity of data files and stage outputs."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
