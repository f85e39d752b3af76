"""TensorBoard as a user runs it: started (as `make tensorboard` starts it) before training and
left open. After the run it must show every point a freshly started TensorBoard shows, and the
Graphs tab must get a graph it can parse."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import tensorflow as tf

from pipeline.config import TrainConfig
from pipeline.run import Paths, train_pipeline
from tests.helpers import ROOT, make_digits

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorBoardServer:
    """`tensorboard --logdir_spec runs:...,tuning:...`, as `make tensorboard` starts it (through
    pipeline/tensorboard.py, which only hides TensorFlow's native start-up lines)."""

    def __init__(self, artifacts: Path):
        self.port = _free_port()
        self.log = artifacts.parent / f"tensorboard-{self.port}.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.tensorboard",
                "--logdir_spec",
                f"runs:{artifacts / 'tensorboard'},tuning:{artifacts / 'tuning'}",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--reload_interval",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "w"),
            cwd=ROOT,
        )
        deadline = time.time() + 60
        while True:
            try:
                self.get("/data/runs")
                return
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("TensorBoard did not start") from None
                time.sleep(0.3)

    def get(self, path: str, **params: str) -> bytes:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://127.0.0.1:{self.port}{path}{query}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read()

    def scalar_points(self) -> dict[tuple[str, str], int]:
        tags = json.loads(self.get("/data/plugin/scalars/tags"))
        return {
            (run, tag): len(json.loads(self.get("/data/plugin/scalars/scalars", run=run, tag=tag)))
            for run, run_tags in tags.items()
            for tag in run_tags
        }

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        from components.console import is_noise

        lines = self.log.read_text().splitlines()
        assert not [line for line in lines if is_noise(line)], lines  # a quiet console


def _seen_at_each_epoch_end(monkeypatch, server: TensorBoardServer) -> list[int]:
    """A user looking at TensorBoard at every epoch end, until it has loaded something new:
    the step points' writer flushes there, and TensorBoard (reloading every second) must pick
    the points up while the run goes on, not only once the writers close."""
    from components import monitoring

    seen: list[int] = []
    written = []
    write, flush = monitoring.BatchScalars._write, monitoring.BatchScalars.on_epoch_end

    def counted_write(self, step, logs):
        written.append(step)
        write(self, step, logs)

    def on_epoch_end(self, epoch, logs=None):
        flush(self, epoch, logs)
        deadline = time.time() + 15
        while True:  # until it shows every point written so far (or gives up)
            points = server.scalar_points()
            now = sum(n for (_run, tag), n in points.items() if tag == "step_loss")
            if now >= len(written) or time.time() > deadline:
                break
            time.sleep(0.3)
        seen.append(now)

    monkeypatch.setattr(monitoring.BatchScalars, "_write", counted_write)
    monkeypatch.setattr(monitoring.BatchScalars, "on_epoch_end", on_epoch_end)
    return seen


class _Watcher(threading.Thread):
    """A user looking at TensorBoard all through the run: it reloads every second, and this
    asks it for every scalar series twice a second."""

    def __init__(self, server: TensorBoardServer):
        super().__init__(daemon=True)
        self.server, self.seen, self.done = server, [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.seen.append(sum(self.server.scalar_points().values()))
            except OSError:
                pass
            time.sleep(0.5)


def test_tensorboard_left_open_keeps_every_point_and_renders_the_graph(tmp_path, monkeypatch):
    """A whole run at the defaults (100 steps per execution under XLA, a step point every
    100 steps, a validation split, images, histograms, text and HParams), on generated digits
    of 8,000 examples (7,600 train: 238 steps an epoch, the last element partial)."""
    artifacts = tmp_path / "artifacts"
    (artifacts / "tensorboard").mkdir(parents=True)
    watching = TensorBoardServer(artifacts)
    watcher = _Watcher(watching)
    seen_at_epoch_ends = _seen_at_each_epoch_end(monkeypatch, watching)
    try:
        splits = (make_digits(8000, seed=1), make_digits(500, seed=2, name="test"))
        config = TrainConfig(device="cpu", epochs=3, min_accuracy=0.0)
        assert (config.steps_per_execution, config.tensorboard_update_freq) == (100, 100)
        watcher.start()
        result = train_pipeline(config, Paths(artifacts), data=splits)
        watcher.done.set()
        watcher.join()
        assert len(watcher.seen) > 5 and watcher.seen == sorted(watcher.seen)
        # each epoch's 3 step points (100, 200, 238 steps in) shown live as that epoch ends
        assert seen_at_epoch_ends == [3, 6, 9]
        time.sleep(3)  # a few reload cycles after the writers closed
        live = watching.scalar_points()
    finally:
        watcher.done.set()
        watching.stop()
    fresh_server = TensorBoardServer(artifacts)
    try:
        fresh = fresh_server.scalar_points()
        graph_text = fresh_server.get(
            "/data/plugin/graphs/graph", run=f"runs/{result.run_id}/model", conceptual="false"
        )
    finally:
        fresh_server.stop()
    assert live == fresh
    run = f"runs/{result.run_id}"
    assert fresh[(f"{run}/steps", "step_loss")] == 3 * len([100, 200, 238])
    assert fresh[(f"{run}/train", "epoch_loss")] == 3
    assert fresh[(f"{run}/validation", "epoch_loss")] == 3
    assert (f"{run}", "hparams/test_accuracy") in fresh

    from google.protobuf import text_format

    graph = text_format.Parse(graph_text.decode(), tf.compat.v1.GraphDef())
    assert any("hidden" in node.name for node in graph.node)
