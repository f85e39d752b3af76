"""`python -m pipeline ...`: see pipeline/cli.py."""

import atexit
import logging
import os
import sys

from pipeline.cli import main

code = main()
# Every file the run writes is closed by now; what is left is the interpreter tearing down
# TensorFlow's modules, about a second a person waits for. Run the exit handlers (the console
# filter drains there), flush, and leave.
logging.shutdown()
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
