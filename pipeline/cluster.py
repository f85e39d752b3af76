"""A local multi-worker cluster for trying MultiWorkerMirroredStrategy on one machine: N
`pipeline train` processes on 127.0.0.1, each with its own generated TF_CONFIG, supervised like a
cluster manager would (a worker that dies is restarted with the others, and the run resumes from
its last completed epoch through BackupAndRestore)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tf_configs(ports: Sequence[int]) -> list[dict]:
    """One TF_CONFIG per worker; worker 0 is the chief (no separate chief task)."""
    workers = [f"127.0.0.1:{p}" for p in ports]
    return [
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        for i in range(len(workers))
    ]


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"[{prefix}] {line}")
        sys.stdout.flush()


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _watch(procs: list[subprocess.Popen]) -> tuple[list[int | None], int | None, int | None]:
    """Wait until a worker is killed, fails, or all end: (exit codes, killed, failed)."""
    while True:
        codes = [p.poll() for p in procs]
        killed = next((i for i, c in enumerate(codes) if c is not None and c < 0), None)
        failed = next((i for i, c in enumerate(codes) if c is not None and c > 0), None)
        if killed is not None or failed is not None or all(c is not None for c in codes):
            return codes, killed, failed
        time.sleep(0.2)


def run_cluster(workers: int, train_args: list[str], run_name: str, max_restarts: int = 2) -> int:
    """Start the workers, wait; on a worker killed by a signal, restart them all (up to
    `max_restarts` times). Returns the chief's exit code."""
    attempt = 0
    while True:
        ports = free_ports(workers)
        procs: list[subprocess.Popen] = []
        for i, config in enumerate(tf_configs(ports)):
            env = {**os.environ, "TF_CONFIG": json.dumps(config)}
            cmd = [sys.executable, "-m", "pipeline", "train", *train_args, "--run-name", run_name]
            p = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            procs.append(p)
            print(
                f"cluster: worker {i} pid {p.pid} on 127.0.0.1:{ports[i]}"
                f"{' (chief)' if i == 0 else ''}",
                flush=True,
            )
            threading.Thread(target=_pump, args=(p.stdout, f"worker {i}"), daemon=True).start()
        try:
            codes, killed, failed = _watch(procs)
        except BaseException:  # Ctrl-C, or a bug here: never leave workers running
            _stop(procs)
            raise
        if killed is None and failed is None:
            return procs[0].returncode
        _stop(procs)
        if killed is not None and attempt < max_restarts:
            attempt += 1
            signal_number = -(codes[killed] or 0)
            print(
                f"cluster: worker {killed} was killed (signal {signal_number}); restarting "
                f"all {workers} workers (attempt {attempt}/{max_restarts}), resuming run "
                f"{run_name}",
                flush=True,
            )
            continue
        bad = killed if killed is not None else (failed or 0)
        print(
            f"cluster: worker {bad} ended with code {procs[bad].returncode}; stopping",
            file=sys.stderr,
            flush=True,
        )
        return procs[0].returncode if procs[0].returncode not in (None, 0) else 1
