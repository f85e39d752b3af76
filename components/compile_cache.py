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
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from components.files import sha256

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FLAG = "--tf_xla_persistent_cache_directory"
_private: Path | None = None  # TensorFlow reads its flags once per process: one folder per process


def device_key() -> str:
    """What a compiled program is only valid for: TensorFlow's build (version, CUDA, cuDNN),
    the CPU's instruction set, each GPU's model and compute capability, and how XLA was asked
    to compile (XLA_FLAGS, the other TF_XLA_FLAGS, op determinism: a deterministic run must
    not load a program compiled without it)."""
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config  # (determinism: not exported)

    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    gpus = [
        tf.config.experimental.get_device_details(gpu)
        for gpu in tf.config.list_physical_devices("GPU")
    ]
    build = tf.sysconfig.get_build_info()
    how = [
        os.environ.get("XLA_FLAGS", ""),
        without_flag(os.environ),
        getattr(tf_config, "is_op_determinism_enabled", lambda: None)(),
    ]
    what = [platform.machine(), flags, gpus, build.get("cuda_version"), build.get("cudnn_version")]
    digest = hashlib.sha256(repr([what, how]).encode()).hexdigest()[:12]
    return f"tf-{tf.__version__}-{digest}"


def _read_manifest(store: Path) -> dict[str, str]:
    try:
        value = json.loads((store / MANIFEST).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning(
            "compile cache manifest %s is unreadable: starting the cache afresh", store / MANIFEST
        )
        # Garbled (under the lock: the entries it vouched for are dropped now): removed, so
        # that this is said once, not at every later read. (A folder there, or a read error,
        # is left as it is.)
        if isinstance(e, ValueError):
            with contextlib.suppress(OSError):
                (store / MANIFEST).unlink()
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
        if expected is not None and sha256(path) == expected:
            good[path.name] = expected
        else:
            log.warning(
                "compile cache: dropping %s (its SHA-256 is not the manifest's): compiling it "
                "again",
                path.name,
            )
            path.unlink(missing_ok=True)
    return good


PREFIX = "mnist-xla-cache-"
MIN_FREE_BYTES = 512 * 2**20  # TensorFlow fails the compilation when it cannot write an entry


def prepare() -> None:
    """Give this process its private cache folder. TensorFlow reads TF_XLA_FLAGS when it first
    sets up its devices, so this runs first thing in `train` (pipeline/cli.py), before any of
    that; a process started from this one gets its own folder, or none (`without_flag`)."""
    global _private
    if _private is not None:
        return
    try:
        temp = Path(tempfile.gettempdir())
        _sweep(temp)
        if shutil.disk_usage(temp).free < MIN_FREE_BYTES:
            log.info("compile cache off: less than 512 MB free in %s", temp)
            return
        _private = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
    except OSError as e:
        log.warning("compile cache unavailable (%s): compiling from scratch", e)
        return
    atexit.register(shutil.rmtree, _private, True)
    os.environ["TF_XLA_FLAGS"] = " ".join([*without_flag(os.environ), f"{FLAG}={_private}"])


def without_flag(env: dict[str, str] | os._Environ[str]) -> list[str]:
    """TF_XLA_FLAGS without the cache folder: for processes this one starts (the validating
    process, a model server), which must not write into this process's folder."""
    return [f for f in env.get("TF_XLA_FLAGS", "").split() if not f.startswith(FLAG)]


def _sweep(temp: Path) -> None:
    """Private folders of processes that are gone (killed before their exit handler ran)."""
    for folder in temp.glob(f"{PREFIX}*"):
        try:
            pid = int(folder.name[len(PREFIX) :].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            pass


def enable(root: Path) -> Path | None:
    """Seed this process's private folder from the verified store under `root`; call before
    the first XLA compilation. Returns the store, or None when the cache is not available
    (then training compiles as usual)."""
    prepare()
    if _private is None:
        return None
    try:
        store = Path(root) / device_key()
        _prune_unused(Path(root), keep=store)
        if not store.is_dir():  # nothing kept yet: `promote` creates it when there is
            return store
        with _Lock(store):
            for name in _verified_entries(store):
                if not (_private / name).exists():
                    shutil.copyfile(store / name, _private / name)
                os.utime(store / name)  # recently used: kept when the store is trimmed
        return store
    except OSError as e:
        log.warning("compile cache unavailable (%s): compiling from scratch", e)
        return None


UNUSED_DAYS = 30  # a store of another TensorFlow, device or set of flags, unused this long


def _prune_unused(root: Path, keep: Path) -> None:
    """Stores no run has used for UNUSED_DAYS (an upgraded TensorFlow leaves its old one)."""
    if not root.is_dir():
        return
    for other in root.iterdir():
        if other == keep or not other.is_dir():
            continue
        used = max((p.stat().st_mtime for p in other.iterdir()), default=other.stat().st_mtime)
        if time.time() - used > UNUSED_DAYS * 86400:
            shutil.rmtree(other, ignore_errors=True)


MAX_ENTRIES = 64  # a few MB: the programs of a handful of configurations


def _least_recently_used(store: Path, manifest: dict[str, str]) -> list[str]:
    """The entries beyond MAX_ENTRIES, least recently used (seeded or added) first."""
    by_use = sorted(manifest, key=lambda name: (store / name).stat().st_mtime, reverse=True)
    return by_use[MAX_ENTRIES:]


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
                manifest[path.name] = sha256(store / path.name)
                added.append(path.name)
            trimmed = _least_recently_used(store, manifest)
            for name in trimmed:
                (store / name).unlink(missing_ok=True)
                del manifest[name]
            if added or trimmed:
                staged = store / f".{MANIFEST}.tmp"
                staged.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
                os.replace(staged, store / MANIFEST)
    except OSError as e:
        log.warning("compile cache not updated (%s)", e)
        return []
    return added
