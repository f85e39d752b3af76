"""Where a training epoch's step time goes: the floor under Keras `fit` on this machine.

One epoch (one pass over the training split, batch 32) of the documented model, timed three ways
in one process, interleaved, median of `repeats` after a warm-up pass each:

- `in_graph`: Keras's own `train_step` (the same maths as `fit`: Adam, the loss and accuracy
  trackers), XLA-compiled, called from a TensorFlow while loop that gathers each batch from the
  split held in memory: no tf.data, no Python between steps. The floor for this model here.
- `tf_data`: the same loop, with each batch taken from our training pipeline
  (`data.make_train_dataset`) by the iterator, one `get_next` per step, as `fit` takes them.
- `fit_keras_loop`: Keras `fit` at our default `steps_per_execution`, no callbacks: Keras's own
  multi-step loop, one `get_next` per step.
- `fit_ours`: Keras `fit` as our trainer runs it on one replica: each element holds
  `steps_per_execution` batches, split into batches in the graph (`trainer.train_steps_in_graph`).

Each way is timed twice, in two fresh processes (TensorFlow's thread pools are fixed at start-up):
on TensorFlow's default pools (one thread per core, for ops and for ops at once) and on one thread
of each, what our trainer uses for one replica on the CPU (`--cpu-threads` auto,
components/strategy.py).

`python -m benchmarks.steps` prints them; `make bench` includes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
THREADS = {"default": 0, "one": 1}  # TensorFlow's default pools; one thread (our trainer's)


def per_thread_setting(module: str, repeats: int, manual_dir: str | None = None) -> dict[str, Any]:
    """`python -m <module> --threads N --repeats R --json` for each of `THREADS`, each in a fresh
    process (TensorFlow's pools are fixed at start-up): {setting name: its JSON answer}."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if manual_dir:
        env["MNIST_MANUAL_DIR"] = manual_dir
    answers = {}
    for name, threads in THREADS.items():
        cmd = [sys.executable, "-m", module, "--json", "--threads", str(threads)]
        proc = subprocess.run(
            [*cmd, "--repeats", str(repeats)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[1:])} failed:\n{proc.stderr[-2000:]}")
        answers[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return answers


def use_threads(threads: int) -> None:
    """TensorFlow's intra-op and inter-op pools, before any op runs (0: its default)."""
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def step_floors(manual_dir: str | None, repeats: int = 3) -> dict[str, Any]:
    """`step_floor` on each thread setting, each in a fresh process."""
    return per_thread_setting("benchmarks.steps", repeats, manual_dir)


def step_floor(manual_dir: str | None, repeats: int = 3, threads: int = 0) -> dict[str, Any]:
    """The four ways in this process; `threads` > 0 sets TensorFlow's pools first (before any op
    runs, as the trainer does), 0 keeps TensorFlow's default."""
    import keras
    import tensorflow as tf

    use_threads(threads)

    from components import data, trainer
    from components.model import build_model
    from pipeline.config import TrainConfig

    defaults = TrainConfig()
    batch = defaults.batch_size
    train = data.validate_split(
        data.load_split("train", manual_dir=Path(manual_dir) if manual_dir else None)
    )
    n, steps = len(train), data.steps_per_epoch(train, batch)
    images, labels = tf.constant(train.images), tf.constant(train.labels)
    pass_number = tf.Variable(0, dtype=tf.int64)
    dataset = data.make_train_dataset(train, batch, seed=0, epoch=pass_number)

    in_graph, from_iterator = _graph_loops(images, labels, n, steps, batch)
    spe = defaults.steps_per_execution
    keras_loop = build_model(steps_per_execution=spe, jit_compile=defaults.jit_compile)
    ours = build_model(steps_per_execution=spe, jit_compile=defaults.jit_compile)
    per_element = trainer.use_steps_in_graph(ours, tf.distribute.get_strategy(), batch)
    elements = data.make_train_dataset(
        train, batch, seed=0, epoch=pass_number, steps_per_element=per_element
    )
    ways = {
        "in_graph": lambda: int(in_graph()),
        "tf_data": lambda: int(from_iterator(iter(dataset))),
        "fit_keras_loop": lambda: keras_loop.fit(dataset, epochs=1, verbose=0, shuffle=False),
        "fit_ours": lambda: ours.fit(elements, epochs=1, verbose=0, shuffle=False),
    }
    seconds: dict[str, list[float]] = {k: [] for k in ways}
    for run in ways.values():
        run()  # warm-up: tracing and compilation
    for _ in range(repeats):
        for name, run in ways.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    keras.backend.clear_session()
    return {
        "steps_per_epoch": steps,
        "steps_per_execution": defaults.steps_per_execution,
        **{f"epoch_seconds_{k}": statistics.median(v) for k, v in seconds.items()},
        "runs": seconds,
    }


def _graph_loops(images: Any, labels: Any, n: int, steps: int, batch: int) -> tuple[Any, Any]:
    """One epoch of Keras's XLA-compiled train_step in a TensorFlow while loop: (batches
    gathered in the graph, batches from an iterator's `get_next`)."""
    import tensorflow as tf

    from components import data
    from components.model import build_model

    model = build_model(steps_per_execution=1, jit_compile=False)
    model.optimizer.build(model.trainable_variables)
    xla_step = tf.function(model.train_step, jit_compile=True)

    @tf.function
    def in_graph() -> tf.Tensor:
        order = data.epoch_order(n, 0, 0)

        def body(i: tf.Tensor) -> tf.Tensor:
            idx = order[i * batch : tf.minimum((i + 1) * batch, n)]
            xla_step((data.preprocess(tf.gather(images, idx)), tf.gather(labels, idx)))
            return i + 1

        return tf.while_loop(lambda i: i < steps, body, [tf.constant(0)])[0]

    @tf.function
    def from_iterator(iterator: Any) -> tf.Tensor:
        def body(i: tf.Tensor) -> tf.Tensor:
            xla_step(iterator.get_next())
            return i + 1

        return tf.while_loop(lambda i: i < steps, body, [tf.constant(0)])[0]

    return in_graph, from_iterator


def format_floor(floors: dict[str, Any]) -> str:
    default, one = floors["default"], floors["one"]
    spe = one["steps_per_execution"]
    labels = {
        "in_graph": "Keras train_step under XLA, batches gathered in the graph",
        "tf_data": "the same, batches from our tf.data pipeline (get_next per step)",
        "fit_keras_loop": f"Keras fit, its loop at steps_per_execution {spe}",
        "fit_ours": f"Keras fit, our trainer's ({spe} steps per element)",
    }
    lines = [
        f"one epoch ({one['steps_per_epoch']} steps of batch 32), median of "
        f"{len(one['runs']['fit_ours'])}, seconds (us/step) on TensorFlow's default threads | "
        "on one thread (our trainer's):"
    ]
    for key, label in labels.items():
        a, b = default[f"epoch_seconds_{key}"], one[f"epoch_seconds_{key}"]
        per = one["steps_per_epoch"] / 1e6
        lines.append(f"  {label}: {a:.3f} ({a / per:.0f}) | {b:.3f} ({b / per:.0f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.steps", description=__doc__)
    parser.add_argument("--threads", type=int, help="only this thread setting, in this process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    from components import console

    console.setup(verbose=False)
    manual_dir = os.environ.get("MNIST_MANUAL_DIR") or None
    if args.threads is not None:
        result = step_floor(manual_dir, args.repeats, args.threads)
        print(json.dumps(result) if args.json else result)
        return 0
    floors = step_floors(manual_dir, args.repeats)
    print(json.dumps(floors) if args.json else format_floor(floors))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
