"""Test helpers shared by the test modules: generated data, the real-data skip, waits."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED_MNIST = ROOT.parent / "shared" / "datasets" / "mnist"


def train_cmd(artifacts: Path, *flags: str) -> list[str]:
    """`python -m pipeline train --artifacts-dir ARTIFACTS FLAGS...` in this interpreter, as a
    user runs it in a process of its own."""
    return [sys.executable, "-m", "pipeline", "train", "--artifacts-dir", str(artifacts), *flags]


def make_digits(n: int, seed: int = 0, name: str = "train"):
    """A learnable stand-in for MNIST: class c lights a bar at row 2 + 2c on a noisy background.

    Returns a components.data.Split with TFDS's layout (uint8 [N, 28, 28, 1], int64 labels).
    """
    from components.data import Split

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    images = rng.integers(0, 60, size=(n, 28, 28, 1), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 + 2 * c : 4 + 2 * c, 4:24, 0] = 255
    return Split(name, images, labels)


def wait_for_backup_epoch(run_dir: Path, proc, epoch: int = 1, timeout: float = 400) -> None:
    """Block until the run's backup is complete for `epoch` epochs (or `proc` ends): its
    checksums vouch for that epoch. (Keras's own metadata file says the epoch a moment
    earlier; a signal in between finds an unverifiable first save, and the run starts over.)"""
    from components.trainer import CHECKSUMS_FILE

    checksums = run_dir / "backup" / CHECKSUMS_FILE
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(checksums.read_text())["latest"]["epoch"] >= epoch:
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.05)


requires_mnist = pytest.mark.skipif(
    not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"real MNIST not found at {SHARED_MNIST}",
)
"""The one skip condition for tests that need the real MNIST (../shared/datasets/mnist)."""


def small_run_flags(train_examples: int) -> list[str]:
    """CLI flags of a smoke run on the real MNIST: a subset, an open gate, published anyway."""
    return [
        "--max-train-examples",
        str(train_examples),
        "--max-test-examples",
        "1000",
        "--device",
        "cpu",
        "--min-accuracy",
        "0",
        "--max-regression",
        "1",
        "--publish-partial-test",
        "--tfds-manual-dir",
        str(SHARED_MNIST),
    ]


@contextlib.contextmanager
def no_hang(seconds: int):
    """A call that would block (an `open` of a named pipe) fails the test with TimeoutError
    after `seconds` instead of stalling the suite."""

    def expired(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def as_a_terminals_job() -> None:
    """`preexec_fn` for a child that is sent Ctrl-C: SIGINT back to its default action, as in a
    terminal's foreground job. A job started in the background of a shell without job control
    (`.ci/run &`) ignores SIGINT, its children inherit that, and Python then never raises
    KeyboardInterrupt in them."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
