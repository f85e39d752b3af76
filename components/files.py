"""Small file helpers the components share."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256(path: Path | str) -> str:
    """The SHA-256 of a file's bytes, read in blocks (a backup, a manual-dir archive, a cached
    XLA program): what the checksum files and manifests record and verify."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tree_sha256(path: Path | str) -> str:
    """One SHA-256 for a file, or for a folder: over every file's relative path and SHA-256
    (a SavedModel, its variables and assets). What a stage record vouches for."""
    path = Path(path)
    if path.is_file():
        return sha256(path)
    lines = [
        f"{p.relative_to(path).as_posix()} {sha256(p)}\n"
        for p in sorted(path.rglob("*"))
        if p.is_file()
    ]
    return hashlib.sha256("".join(lines).encode()).hexdigest()
