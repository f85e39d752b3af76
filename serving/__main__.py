"""`python -m serving ...`: see serving/cli.py."""

import sys

try:
    from serving.cli import main

    code = main()
except KeyboardInterrupt:  # Ctrl-C, e.g. during TensorFlow's import: one line, not a traceback
    print("error: interrupted", file=sys.stderr)
    code = 130
sys.exit(code)
