"""TensorBoard as a user runs it: started (as `make tensorboard` starts it) before training and
left open. After the run it must show every point a freshly started TensorBoard shows, and the
Graphs tab must get a graph it can parse."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import keras
import pytest
import tensorflow as tf

from components import data, monitoring, trainer
from components.model import build_model
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


class _Watcher(keras.callbacks.Callback):
    """A user looking at TensorBoard at every epoch end, until it has loaded something new."""

    def __init__(self, server: TensorBoardServer):
        super().__init__()
        self.server, self.seen = server, []

    def on_epoch_end(self, epoch, logs=None):
        before = sum(self.server.scalar_points().values()) if self.seen else 0
        deadline = time.time() + 15
        while time.time() < deadline:
            now = sum(self.server.scalar_points().values())
            if now > before:
                break
            time.sleep(0.3)
        self.seen.append(now)


def test_tensorboard_left_open_keeps_every_point_and_renders_the_graph(tmp_path):
    artifacts = tmp_path / "artifacts"
    log_dir = artifacts / "tensorboard" / "run-1"
    log_dir.mkdir(parents=True)
    watching = TensorBoardServer(artifacts)
    try:
        train = data.validate_split(make_digits(1600, seed=1))
        val = data.validate_split(make_digits(200, seed=2))
        watcher = _Watcher(watching)
        trainer.train(
            lambda: build_model(steps_per_execution=10, jit_compile=False),
            lambda epoch, k: data.make_train_dataset(
                train, 32, seed=0, epoch=epoch, steps_per_element=k
            ),
            data.make_dataset(val, 256),
            batch_size=32,
            epochs=4,
            strategy=tf.distribute.get_strategy(),
            tensorboard_dir=log_dir,
            backup_dir=None,
            update_freq=10,
            verbose=0,
            extra_callbacks=[watcher, monitoring.EpochImages(log_dir, val.images, val.labels)],
        )
        assert watcher.seen == sorted(watcher.seen) and watcher.seen[0] > 0
        time.sleep(3)  # a few reload cycles after the writers closed
        live = watching.scalar_points()
    finally:
        watching.stop()
    fresh_server = TensorBoardServer(artifacts)
    try:
        fresh = fresh_server.scalar_points()
        graph_text = fresh_server.get(
            "/data/plugin/graphs/graph", run="runs/run-1/model", conceptual="false"
        )
    finally:
        fresh_server.stop()
    assert live == fresh
    assert fresh[("runs/run-1/steps", "step_loss")] == 4 * 50 // 10
    assert fresh[("runs/run-1/train", "epoch_loss")] == 4
    assert fresh[("runs/run-1/validation", "epoch_loss")] == 4

    from google.protobuf import text_format

    graph = text_format.Parse(graph_text.decode(), tf.compat.v1.GraphDef())
    assert any("hidden" in node.name for node in graph.node)
