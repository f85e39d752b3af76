"""Small file helpers the components share."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
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


# What a version's manifest must list: a manifest that leaves out the SavedModel's graph or
# weights (`{}` included) would vouch for a version whose model nobody checked.
MANIFEST_COVERS = ("saved_model.pb", "variables")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def damaged_files(
    folder: Path | str, name: str = VERSION_MANIFEST, covers: tuple[str, ...] = MANIFEST_COVERS
) -> list[str] | None:
    """The files under `folder` that are missing or differ from its manifest; None when there
    is no manifest (published before manifests were written: nothing to check against). An
    unreadable or invalid manifest (not {relative path: SHA-256}, or not listing each of
    `covers`: a file, or every file under a folder) is itself damage; so is an entry naming
    anything but a regular file inside `folder` (a device would be read forever)."""
    folder = Path(folder)
    path = folder / name
    if not os.path.lexists(path):
        return None
    try:
        manifest = _manifest(read_regular(path))
        # (a folder gone that the manifest lists files under is checked file by file below:
        # its files are missing, not the manifest wrong)
        missing = [
            f
            for f in _covered(folder, covers)
            if f not in manifest and not any(k.startswith(f"{f}/") for k in manifest)
        ]
        if missing:
            raise ValueError(f"does not list {', '.join(missing)}")
    except (OSError, ValueError, RecursionError) as e:
        return [f"{name} (invalid: {e})"]
    damaged = []
    for relative, digest in sorted(manifest.items()):
        try:
            if regular_sha256(_inside(folder, relative)) != digest:
                damaged.append(relative)
        except OSError as e:
            damaged.append(f"{relative} ({e.strerror or 'missing or unreadable'})")
    return damaged


def _manifest(data: bytes) -> dict[str, str]:
    """{relative path: SHA-256} as `write_manifest` writes it, else ValueError saying why."""
    import json

    manifest = json.loads(data)
    if not isinstance(manifest, dict):
        raise ValueError("not a JSON object")
    for relative, digest in manifest.items():
        parts = PurePosixPath(relative).parts
        if (
            PurePosixPath(relative).as_posix() != relative  # "./a", "a//b", "a/"
            or not parts
            or parts[0] == "/"
            or ".." in parts
            or "\0" in relative
        ):
            raise ValueError(f"{relative!r} is not a path relative to the version folder")
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise ValueError(f"{relative!r}: {digest!r} is not a SHA-256")
    return manifest


def _covered(folder: Path, covers: tuple[str, ...]) -> list[str]:
    """The relative paths a manifest must list: each of `covers`, or for a folder (not a link
    to one) every file under it."""
    paths = []
    for cover in covers:
        path = folder / cover
        if path.is_dir() and not path.is_symlink():
            paths += [p.relative_to(folder).as_posix() for p in sorted(path.rglob("*"))]
        else:
            paths.append(cover)
    return [p for p in paths if not (folder / p).is_dir() or (folder / p).is_symlink()]


def _inside(folder: Path, relative: str) -> Path:
    """`folder/relative`, unless a link takes it out of `folder` (OSError)."""
    path = folder / relative
    try:
        outside = not path.resolve().is_relative_to(folder.resolve())
    except RuntimeError:  # a loop of links
        outside = True
    if outside:
        raise OSError(errno.EXDEV, "a link out of the version folder", str(path))
    return path


class NotARegularFile(OSError):
    """Something other than a regular file where one belongs (a device, a FIFO, a socket)."""


def _regular_fd(path: Path | str, flags: int, strerror: str = "not a regular file") -> int:
    """`path` opened with `flags` if it is a regular file (or missing, with O_CREAT), else
    NotARegularFile: checked before opening, so a device (/dev/zero never ends) is never
    opened, and again once open (O_NONBLOCK: a FIFO put there meanwhile does not block)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise NotARegularFile(errno.EINVAL, strerror, str(path))
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:  # (in its place since the check: a socket, a loop, a folder)
        if e.errno in (errno.EISDIR, errno.ENXIO, errno.ELOOP, errno.EOPNOTSUPP):
            raise NotARegularFile(e.errno, strerror, str(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotARegularFile(errno.EINVAL, strerror, str(path))
    return fd


def _open_regular(path: Path | str) -> io.BufferedReader:
    """`path` opened for reading if it is a regular file (`_regular_fd`), else OSError."""
    return os.fdopen(_regular_fd(path, os.O_RDONLY), "rb")


def read_regular(path: Path | str) -> bytes:
    """The bytes of `path`, a regular file (`_open_regular`): for files a person or a damaged
    disk may have replaced (a manifest, a model card)."""
    with _open_regular(path) as f:
        return f.read()


def regular_sha256(path: Path | str) -> str:
    """`sha256` of a regular file only (`_open_regular`)."""
    with _open_regular(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
        # What is in the way makes way: a folder is not replaced by a rename alone (a
        # SavedModel's previous copy, or a folder where this file belongs), nor is a file by
        # a folder. Only our own artifacts' paths come here.
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif tmp.is_dir() and (path.exists() or path.is_symlink()):
            path.unlink()
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


NOT_A_LOCK = "not a regular file (a lock file belongs there)"


def open_lock(path: Path | str, create: bool = True) -> IO[str]:
    """A lock file, opened (made if missing, unless not `create`: FileNotFoundError) for
    `fcntl.flock` (`_regular_fd`): never a wait on a named pipe (`open` would block until a
    writer came) nor a device opened; anything but a regular file is NotARegularFile naming
    it, a folder with its "Is a directory"."""
    if os.path.isdir(path):
        raise NotARegularFile(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    fd = _regular_fd(path, os.O_RDWR | (os.O_CREAT if create else 0), NOT_A_LOCK)
    return os.fdopen(fd, "r+")


def lock_refusal(e: OSError, what: str, path: Path | str) -> str:
    """Why `what` (the lock file at `path`, `open_lock`) cannot be taken, with what to do."""
    if not isinstance(e, NotARegularFile):
        return f"cannot take {what} {path}: {e.strerror or e}"
    problem = "it is a folder" if e.errno == errno.EISDIR else e.strerror
    return f"cannot take {what} {path}: {problem}: remove it"


@contextlib.contextmanager
def holding(handle: IO[str]) -> Iterator[None]:
    """An exclusive flock on an open lock file (`open_lock`) for the block, waiting for its
    holder first; the file closed after."""
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def folder(path: Path | str) -> Path:
    """One of our artifacts' folders, made if missing; a file in its place makes way, as a
    folder in a file's place does in `replaced`. A link is someone's choice: a link to a
    folder is used, any other link (dangling: a drive not mounted) is FileExistsError."""
    path = Path(path)
    if path.is_symlink() and not path.is_dir():
        raise FileExistsError(
            errno.EEXIST, "a link to something that is not a folder (move it away)", str(path)
        )
    if path.exists() and not path.is_dir():
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


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
