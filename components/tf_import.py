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
import sys
import time


def import_tensorflow() -> float:
    """Import TensorFlow (once per process); returns the seconds it took (0 if it was)."""
    if "tensorflow" in sys.modules:
        return 0.0
    started = time.perf_counter()
    enabled = gc.isenabled()
    gc.disable()
    try:
        import tensorflow  # noqa: F401
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
    return time.perf_counter() - started
