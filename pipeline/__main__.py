"""`python -m pipeline ...`: see pipeline/cli.py."""

import atexit
import logging
import os
import sys

try:
    from pipeline.cli import main

    code = main()
except KeyboardInterrupt:  # Ctrl-C before main() catches it (during the first imports)
    print("error: interrupted", file=sys.stderr)
    code = 130
# Every file the run writes is closed by now; what is left is the interpreter tearing down
# TensorFlow's modules, about a second a person waits for. Run the exit handlers (the console
# filter drains there), flush, and leave.
logging.shutdown()
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
