"""Small file helpers the components share."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256(path: Path | str) -> str:
    """The SHA-256 of a file's bytes, read in blocks (a backup, a manual-dir archive, a cached
    XLA program): what the checksum files and manifests record and verify."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
