"""`make tensorboard`: TensorBoard's own command line (`tensorboard --logdir_spec ...`), with
TensorFlow's native start-up lines, printed twice when TensorBoard imports it, hidden as for the
other commands (components/console.py; `--verbose` keeps them)."""

import sys
from pathlib import Path

from components import console


def _value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def check(args: list[str]) -> str | None:
    """What would make TensorBoard fail with a traceback or a log line twice, as one line:
    a log folder that is a file (created here when missing), a port that is not one, or a
    port already in use on the host. None when TensorBoard can start."""
    import socket

    spec = _value(args, "--logdir_spec") or _value(args, "--logdir") or ""
    for entry in filter(None, spec.split(",")):
        folder = Path(entry.split(":", 1)[1] if ":" in entry else entry)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"log folder {folder}: {e.strerror or e} (a file in the way? move it)"
    port_text = _value(args, "--port")
    if port_text is None:
        return None
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        return f"PORT must be a TCP port, 0..65535 (0: any free one), got {port_text!r}"
    if int(port_text) == 0:
        return None
    host = _value(args, "--host") or "localhost"
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TensorBoard's server
        try:
            probe.bind((host, int(port_text)))
        except OSError as e:
            return f"port {port_text} on {host}: {e.strerror or e} (another TensorBoard? PORT=N)"
    return None


def main() -> None:
    verbose = "--verbose" in sys.argv
    sys.argv = ["tensorboard", *(a for a in sys.argv[1:] if a != "--verbose")]
    problem = check(sys.argv[1:])
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    console.setup(verbose)
    from tensorboard.main import run_main

    sys.exit(run_main())


if __name__ == "__main__":
    main()
