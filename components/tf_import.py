"""Import TensorFlow without Python's cyclic garbage collector running through it.

Importing TensorFlow (and the Keras it loads) creates about 500,000 objects; the collector,
triggered every 700 allocations, walks the growing heap again and again and finds almost
nothing (about 3,800 unreachable objects, ~4 MB): 0.5 s of a 2.1 s import on this 2-core
machine (`python -c "import gc; gc.disable(); import tensorflow"`). So the collector is off
during the import; then the imported objects are frozen (`gc.freeze`: moved to a permanent
generation that later collections skip), so that each full collection of the run takes
milliseconds instead of 0.2 s. The few cycles the import left behind stay for the process's
life. Standard library only: the validating process uses it too.
"""

from __future__ import annotations

import gc
import signal
import sys
import threading
import time


def import_tensorflow() -> float:
    """Import TensorFlow (once per process); returns the seconds it took (0 if it was).

    A Ctrl-C during the import (where a user presses it: the slow part) is never lost: the
    KeyboardInterrupt can land inside one of the ~2,000 modules it imports, in code that
    swallows it (a bare `except:` around an optional import), and the command would then run
    to its end as if nothing had been pressed; it is raised again once the import is over."""
    if "tensorflow" in sys.modules:
        return 0.0
    started = time.perf_counter()
    enabled = gc.isenabled()
    gc.disable()
    pressed: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        pressed.append(signum)
        raise KeyboardInterrupt

    # Only in place of Python's own handler (a process that ignores SIGINT keeps ignoring it).
    ours = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if ours:
        signal.signal(signal.SIGINT, interrupt)
    try:
        import tensorflow  # noqa: F401
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        gc.freeze()
        if enabled:
            gc.enable()
    if pressed:
        raise KeyboardInterrupt
    return time.perf_counter() - started
