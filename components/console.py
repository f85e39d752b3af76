"""What a command prints: library noise hidden (unless --verbose), real warnings and errors kept.

TensorFlow 2.21's C++ start-up lines (oneDNN, "Could not find cuda drivers", cuInit on a machine
with no GPU, XLA "Compiled cluster", per-step collective all-reduce logs) are written by absl
straight to file descriptor 2, before and regardless of TF_CPP_MIN_LOG_LEVEL, so they cannot be
configured away: fd 2 is routed through a filter thread that drops the known noise, while Python's
own `sys.stderr` (logging, warnings, tracebacks) keeps writing to the real stderr directly.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import re
import sys
import traceback
import warnings
from typing import Any

# Lines from TensorFlow's native code (absl format: I/W/E + MMDD or 0000) that say nothing a
# user can act on. A native warning or error that is not listed here still shows.
_NATIVE_NOISE = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\)"
    r"|^I\d{4} "  # native INFO lines (start-up banners, XLA, collectives): never a warning
    # A multi-worker job's end: the chief's coordination service polls the error of a worker
    # that left, the chief's collectives find that finished worker "unhealthy (stopped sending
    # heartbeats)", and a worker still heartbeating finds the finished chief gone. (The
    # launcher reports any worker that really failed, with its exit code.)
    r"|^W\d{4} .*coordination_service_agent.*Polled an error from coordination service"
    r"|^E\d{4} .*StartAbort UNAVAILABLE: Failed to send RPC to coordination service"
    r"|^E\d{4} .*StartAbort UNAVAILABLE: Error reported from /job:worker/task:\d+: "
    r"The following tasks are unhealthy \(stopped sending heartbeats\)"
    r"|^E\d{4} .*(failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation_placer|cuda_(platform|executor|dnn|fft|blas)"
    # Loading a kept XLA program (components/compile_cache.py): TensorFlow first tries the
    # entry as text, then reads it as the binary proto it is; and it compares the CPU features
    # recorded at compilation with the host's, where the tuning hints prefer-no-scatter/-gather
    # (not instruction sets) are never reported by the host. Any other mismatch still shows.
    r"|Error parsing text-format tensorflow\.XlaSerializedCacheEntry"
    r"|Loading XLA:CPU AOT result\. Target machine feature \+prefer-no-(scatter|gather) is not)"
    r"|^To enable the following instructions: .*rebuild TensorFlow"
    r"|^This TensorFlow binary is optimized to use available CPU instructions"
)

# Python loggers of libraries whose INFO lines are progress chatter (TFDS via absl, SavedModel's
# "Assets written to"); their warnings still show.
_CHATTY_LOGGERS = ("absl", "tensorflow", "tensorflow_datasets", "h5py")

_installed = False


def is_noise(line: str) -> bool:
    return bool(_NATIVE_NOISE.search(line))


def setup(verbose: bool = False) -> None:
    """Configure logging for a command; call before TensorFlow is imported.

    `verbose`: show everything (library INFO lines, native logs) as the libraries print it.
    """
    global _installed
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    _outlive_the_reader()
    if verbose:
        return
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # TFDS's download retries without network (a warning per file and try) before the error
    # that says what to do (components/data.py): that one line is enough.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    # Keras/TF deprecation chatter from inside the libraries (not our code) is not actionable.
    warnings.filterwarnings(
        "ignore",
        category=DeprecationWarning,
        module=r"(tensorflow|keras|"
        r"tensorflow_datasets|absl|h5py|google)(\.|$)",
    )
    if not _installed and _is_process_stderr(sys.stderr):
        _installed = _filter_native_stderr()
    if sys.unraisablehook is not _quiet_unraisable:  # once; what was there before is kept
        _previous_hooks.update(unraisable=sys.unraisablehook, exception=sys.excepthook)
        sys.unraisablehook = _quiet_unraisable
        sys.excepthook = _quiet_excepthook
    # absl installs its own handler on first import and would print TFDS's INFO lines twice.
    logging.getLogger("absl").propagate = True


class _PipeSafe:
    """A console stream that outlives its reader: once the pipe it writes to is closed (`make
    train | head -3`), its file descriptor is pointed at /dev/null and the command goes on
    (a run's results are its files, not its console) instead of failing on BrokenPipeError.
    A stream that cannot be written for another reason (a file on a full disk, `> /dev/full`)
    goes the same way, and the error is kept for `output_lost` to report at the end."""

    def __init__(self, stream: Any, name: str):
        self._stream = stream
        self._name = name

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            self._to_devnull(e)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            self._to_devnull(e)

    def _to_devnull(self, error: OSError) -> None:
        if not isinstance(error, BrokenPipeError):
            _lost.setdefault(self._name, error)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()  # what was buffered goes to /dev/null too

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


# The first write error of each console stream other than a closed pipe ("stdout", "stderr").
_lost: dict[str, OSError] = {}


def output_lost() -> str | None:
    """What a command says when its standard output could not be written (e.g. `> file` on a
    full disk): one line for stderr, or None when all of it was written. Flushes first, so
    that an error in what is still buffered is found."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    error = _lost.get("stdout")
    if error is None:
        return None
    why = error.strerror or str(error)
    return f"standard output could not be written ({why}): what the command printed was lost"


def _outlive_the_reader() -> None:
    """The process's own stdout and stderr (not a test's or a notebook's capture) as
    `_PipeSafe`, once; logging's handlers on stderr follow."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if isinstance(stream, _PipeSafe) or not _is_fd(stream, fd):
            continue
        safe = _PipeSafe(stream, name)
        setattr(sys, name, safe)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is stream:
                handler.setStream(safe)


def _secondary_write_failure(where: object, error: BaseException | None) -> bool:
    """h5py failing to close the handles of a file whose write already failed (a full disk
    while Keras saves a backup). The write itself raised, and that error is reported in one
    line with its exit code; each handle's `__dealloc__` then fails again, and Cython prints
    it twice (through sys.excepthook, then sys.unraisablehook) as tracebacks."""
    return (
        "h5py" in str(where)
        and isinstance(error, RuntimeError)
        and "file write failed" in str(error)
    )


_previous_hooks: dict[str, Any] = {}


def _quiet_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """sys.unraisablehook: any other unraisable exception goes to the hook installed before."""
    if not _secondary_write_failure(unraisable.object, unraisable.exc_value):
        _previous_hooks.get("unraisable", sys.__unraisablehook__)(unraisable)


def _quiet_excepthook(kind: type[BaseException], error: BaseException, tb: Any) -> None:
    """sys.excepthook: Cython's report from inside `__dealloc__` has h5py's frames alone; an
    exception that reached the top of a program passed through its frames and still shows
    (through the hook installed before)."""
    frames = traceback.extract_tb(tb)
    inside_h5py = bool(frames) and all("h5py" in frame.filename for frame in frames)
    if not (inside_h5py and _secondary_write_failure(frames[-1].filename, error)):
        _previous_hooks.get("exception", sys.__excepthook__)(kind, error, tb)


def _is_process_stderr(stream: object) -> bool:
    """False when stderr is already redirected in-process (pytest's capture, a notebook)."""
    return _is_fd(stream, 2)


def _is_fd(stream: object, fd: int) -> bool:
    try:
        return stream.fileno() == fd  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


# A dropped native record takes its continuation lines with it: a multi-line message (e.g. a
# multi-worker chief's "Polled an error from coordination service" warning when a finished
# worker leaves, then "/job:worker/replica:0/task:1" and "The tasks have crashed ...") comes in
# one write; lines without the absl prefix arriving within 50 ms of it are that message's rest.
_FILTER_PROCESS = """
import re, signal, sys, time
# Ctrl-C (or a SIGTERM) goes to the whole process group: the trainer says "interrupted"; the
# filter goes on until the trainer's end closes the pipe, printing no traceback of its own.
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
noise = re.compile(sys.argv[1])
record = re.compile(r"^[IWEF][0-9]{4} ")
out = sys.stdout.buffer
rest_of_dropped = 0.0
for raw in sys.stdin.buffer:
    line = raw.decode("utf-8", "replace")
    now = time.monotonic()
    if noise.search(line):
        rest_of_dropped = now + 0.05
        continue
    if now < rest_of_dropped and not record.match(line):
        continue
    rest_of_dropped = 0.0
    try:
        out.write(raw)
        out.flush()
    except OSError:  # the reader has gone (`2>&1 | head`), or a full disk: keep draining, quietly
        out = open("/dev/null", "wb")
"""


def _filter_native_stderr() -> bool:
    """Route fd 2 through a filter in a small child process (so that what native code writes
    just before an abort still reaches the terminal: the child drains the pipe after this
    process is gone); Python's sys.stderr keeps the real stderr, with faulthandler on it."""
    import faulthandler
    import subprocess

    try:
        sys.stderr.flush()
        real = os.dup(2)
        child = subprocess.Popen(
            [sys.executable, "-c", _FILTER_PROCESS, _NATIVE_NOISE.pattern],
            stdin=subprocess.PIPE,
            stdout=real,
            stderr=real,
            close_fds=True,
        )
        assert child.stdin is not None
        os.dup2(child.stdin.fileno(), 2)
        child.stdin.close()
    except (OSError, AssertionError):
        return False
    real_stream = io.TextIOWrapper(
        os.fdopen(os.dup(real), "wb", buffering=0),
        encoding="utf-8",
        errors="replace",
        line_buffering=True,
    )
    sys.stderr = real_stream = _PipeSafe(real_stream, "stderr")  # type: ignore[assignment]
    faulthandler.enable(file=real_stream)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(real_stream)

    def restore() -> None:
        # Closing the last write end lets the filter drain what is left and end.
        try:
            os.dup2(real, 2)
            child.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass

    atexit.register(restore)
    return True
