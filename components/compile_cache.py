"""XLA's compiled programs kept across runs, with the integrity checks TensorFlow does not make.

TensorFlow can keep what XLA compiled (`--tf_xla_persistent_cache_directory`): a later run of
the same model, batch and steps_per_execution loads the program instead of compiling it (about
0.25 s of the first epoch on a 2-core CPU). But TensorFlow trusts whatever file it finds there:
a truncated or corrupted entry fails training ("Can't parse ... as binary proto"), two runs can
write the same entry at once, and a program compiled for one CPU must never run on another
(artifacts on a shared volume). So:
- the store is split by TensorFlow version and device (CPU features, GPU names);
- TensorFlow only sees a private folder of this process, seeded with the store's entries whose
  sha256 matches the store's manifest (anything else in the store is deleted);
- after training, the entries TensorFlow wrote there (complete: their compilations returned)
  are copied into the store, each by an atomic rename, and listed in the manifest under a lock.
The cache is an optimisation: any failure to read or write it is a warning, never a failed run.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FLAG = "--tf_xla_persistent_cache_directory"
_private: Path | None = None  # TensorFlow reads its flags once per process: one folder per process


def device_key() -> str:
    """TensorFlow version and the device's instruction set: programs are only shared within."""
    import tensorflow as tf

    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    digest = hashlib.sha256(f"{platform.machine()} {flags} {gpus}".encode()).hexdigest()[:12]
    return f"tf-{tf.__version__}-{digest}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_manifest(store: Path) -> dict[str, str]:
    try:
        value = json.loads((store / MANIFEST).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("compile cache manifest %s is unreadable: starting the cache afresh", store)
        return {}
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


class _Lock:
    def __init__(self, store: Path):
        self.path = store / ".lock"

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the lock


def _verified_entries(store: Path) -> dict[str, str]:
    """The store's entries that match the manifest; deletes the others (under the lock)."""
    manifest = _read_manifest(store)
    for leftover in store.glob(".*.tmp"):  # a copy cut short (killed, disk full)
        leftover.unlink(missing_ok=True)
    good = {}
    for path in store.glob("*.pb"):
        expected = manifest.get(path.name)
        if expected is not None and _sha256(path) == expected:
            good[path.name] = expected
        else:
            log.warning("compile cache: dropping %s (not verified by the manifest)", path.name)
            path.unlink(missing_ok=True)
    return good


def prepare() -> None:
    """Give this process its private cache folder. TensorFlow reads TF_XLA_FLAGS when it first
    sets up its devices, so this runs at start-up (pipeline/__main__.py), before any of that;
    a process started from this one (a worker) gets its own folder, not this one's."""
    global _private
    if _private is not None:
        return
    try:
        _private = Path(tempfile.mkdtemp(prefix="mnist-xla-cache-"))
    except OSError as e:
        log.warning("compile cache unavailable (%s): compiling from scratch", e)
        return
    atexit.register(shutil.rmtree, _private, True)
    flags = [f for f in os.environ.get("TF_XLA_FLAGS", "").split() if not f.startswith(FLAG)]
    os.environ["TF_XLA_FLAGS"] = " ".join([*flags, f"{FLAG}={_private}"])


def enable(root: Path) -> Path | None:
    """Seed this process's private folder from the verified store under `root`; call before
    the first XLA compilation. Returns the store, or None when the cache is not available
    (then training compiles as usual)."""
    prepare()
    if _private is None:
        return None
    try:
        store = Path(root) / device_key()
        if not store.is_dir():  # nothing kept yet: `promote` creates it when there is
            return store
        with _Lock(store):
            for name in _verified_entries(store):
                if not (_private / name).exists():
                    shutil.copyfile(store / name, _private / name)
        return store
    except OSError as e:
        log.warning("compile cache unavailable (%s): compiling from scratch", e)
        return None


def promote(store: Path | None) -> list[str]:
    """Copy the programs TensorFlow compiled in this process into the store; returns their
    names. Call after training (every compilation has returned, so every entry is whole)."""
    if store is None or _private is None:
        return []
    added = []
    try:
        if not any(_private.glob("*.pb")):
            return []
        store.mkdir(parents=True, exist_ok=True)
        with _Lock(store):
            manifest = _verified_entries(store)
            for path in sorted(_private.glob("*.pb")):
                if path.name in manifest:
                    continue
                staged = store / f".{path.name}.tmp"
                shutil.copyfile(path, staged)
                os.replace(staged, store / path.name)
                manifest[path.name] = _sha256(store / path.name)
                added.append(path.name)
            if added:
                staged = store / f".{MANIFEST}.tmp"
                staged.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
                os.replace(staged, store / MANIFEST)
    except OSError as e:
        log.warning("compile cache not updated (%s)", e)
        return []
    return added
