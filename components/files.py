"""Small file helpers the components share."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


def sha256(path: Path | str) -> str:
    """The SHA-256 of a file's bytes, read in blocks (a backup, a manual-dir archive, a cached
    XLA program): what the checksum files and manifests record and verify."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_digests(folder: Path | str, known: dict[str, str] | None = None) -> dict[str, str]:
    """{relative path: SHA-256} for every file under `folder`; `known` digests of files not
    changed since are taken as they are."""
    folder = Path(folder)
    digests = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            relative = p.relative_to(folder).as_posix()
            digests[relative] = (known or {}).get(relative) or sha256(p)
    return digests


def tree_sha256(path: Path | str) -> str:
    """One SHA-256 for a file, or for a folder: over every file's relative path and SHA-256
    (a SavedModel, its variables and assets). What a stage record vouches for."""
    path = Path(path)
    if path.is_file():
        return sha256(path)
    lines = "".join(f"{name} {digest}\n" for name, digest in file_digests(path).items())
    return hashlib.sha256(lines.encode()).hexdigest()


VERSION_MANIFEST = "assets.extra/files_sha256.json"  # in each published version


def write_manifest(
    folder: Path | str, name: str = VERSION_MANIFEST, known: dict[str, str] | None = None
) -> None:
    """Record the SHA-256 of every file under `folder` (but the manifest) in `folder/name`."""
    import json

    manifest = file_digests(folder, known)
    manifest.pop(name, None)
    (Path(folder) / name).write_text(json.dumps(manifest, indent=1) + "\n")


def damaged_files(folder: Path | str, name: str = VERSION_MANIFEST) -> list[str] | None:
    """The files under `folder` that are missing or differ from its manifest; None when there
    is no manifest (published before manifests were written: nothing to check against); an
    unreadable manifest is itself damage."""
    import json

    folder = Path(folder)
    path = folder / name
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        return [f"{name} (unreadable: {e})"]
    damaged = []
    for relative, digest in sorted(manifest.items()):
        try:
            if sha256(folder / relative) != digest:
                damaged.append(relative)
        except OSError:
            damaged.append(f"{relative} (missing or unreadable)")
    return damaged


def save_npz(path: Path | str, **arrays: Any) -> None:
    """`np.savez` whole or not at all: written under a temporary name, then renamed; a failed
    write (a full disk) leaves no partial file behind."""
    import numpy as np

    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
