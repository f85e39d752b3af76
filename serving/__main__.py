"""`python -m serving ...`: see serving/cli.py."""

import sys

from serving.cli import main

sys.exit(main())
