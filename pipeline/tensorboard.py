"""`make tensorboard`: TensorBoard's own command line (`tensorboard --logdir_spec ...`), with
TensorFlow's native start-up lines, printed twice when TensorBoard imports it, hidden as for the
other commands (components/console.py; `--verbose` keeps them)."""

import sys

from components import console


def main() -> None:
    verbose = "--verbose" in sys.argv
    sys.argv = ["tensorboard", *(a for a in sys.argv[1:] if a != "--verbose")]
    console.setup(verbose)
    from tensorboard.main import run_main

    sys.exit(run_main())


if __name__ == "__main__":
    main()
