"""Small file helpers the components share."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


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


@contextlib.contextmanager
def replaced(path: Path | str) -> Iterator[Path]:
    """Whole or not at all: the caller writes the file or folder at the temporary path this
    yields (".tmp-NAME" beside `path`), which then replaces `path`; a failed write (a full
    disk) leaves no partial copy behind, and a killed writer's is removed by the next. An OSError
    that does not name its file (a write or close that fails: "[Errno 28] No space left on
    device") is raised again naming `path`."""
    import shutil

    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)  # a folder (a SavedModel) is not replaced by a rename alone
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def _remove(path: Path) -> None:
    """A file or a folder, if there."""
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: Path | str, mode: str = "wb", sync: bool = False) -> Iterator[IO[Any]]:
    """A file written whole or not at all through the handle this yields (`replaced`).
    `sync`: fsync before the rename (a file that must survive a power cut with what it
    vouches for)."""
    with replaced(path) as tmp, open(tmp, mode) as f:
        yield f
        if sync:
            f.flush()
            os.fsync(f.fileno())


def os_error_text(e: OSError) -> str:
    """`e` on one line: shutil.copytree's error (a list of (source, destination, reason)) as
    its first reason; a full disk as the OS words it, with its file (h5py, writing Keras's
    backups, words it as a multi-line HDF5 report with the file named inside)."""
    import errno
    import re
    import shutil

    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        first, more = e.args[0][0], len(e.args[0]) - 1
        return " ".join(str(first[-1]).split()) + (f" (and {more} more files)" if more else "")
    text = " ".join(str(e).split())
    if e.errno != errno.ENOSPC:
        return text
    named = re.search(r"filename = '([^']+)'", text)
    where = e.filename or (named.group(1) if named else None)
    if where is None:
        return text  # e.g. "could not write <file>: No space left on device"
    return f"[Errno {errno.ENOSPC}] No space left on device: {where}"


def disk_full(e: OSError) -> bool:
    """A full disk behind `e` (shutil.copytree's error carries it only as text)."""
    import errno

    return e.errno == errno.ENOSPC or "No space left on device" in str(e)


def save_npz(path: Path | str, **arrays: Any) -> None:
    """`np.savez` whole or not at all (`atomic_write`)."""
    import numpy as np

    with atomic_write(path) as f:
        np.savez(f, **arrays)


def write_text(path: Path | str, text: str, sync: bool = False) -> None:
    """`text` (UTF-8) whole or not at all (`atomic_write`)."""
    with atomic_write(path, sync=sync) as f:
        f.write(text.encode())
