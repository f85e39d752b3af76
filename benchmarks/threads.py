"""Where one TensorFlow thread stops paying: `--cpu-threads` auto's threshold
(components/strategy.py, `SMALL_STEP`).

For each (batch, hidden units), one epoch of our trainer's `fit` on the training split (as
`benchmarks.steps`' last row: 100 batches per dataset element, split in the graph; XLA), on
TensorFlow's default pools and on one thread, each setting in a fresh process (the pools are
fixed at start-up); median of 3 epochs after a warm-up one. `python -m benchmarks.threads`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

SHAPES = ((32, 128), (64, 128), (128, 128), (256, 128), (32, 512), (32, 1024))


def epochs(threads: int, shapes: tuple[tuple[int, int], ...], repeats: int) -> dict[str, float]:
    """Median epoch seconds per "batch x units", in this process."""
    import tensorflow as tf

    from benchmarks.steps import use_threads

    use_threads(threads)
    from components import data, trainer
    from components.model import build_model

    manual_dir = os.environ.get("MNIST_MANUAL_DIR")
    train = data.validate_split(
        data.load_split("train", manual_dir=Path(manual_dir) if manual_dir else None)
    )
    pass_number = tf.Variable(0, dtype=tf.int64)
    out = {}
    for batch, units in shapes:
        model = build_model(units, steps_per_execution=100, jit_compile=True)
        per_element = trainer.use_steps_in_graph(model, tf.distribute.get_strategy(), batch)
        dataset = data.make_train_dataset(
            train, batch, seed=0, epoch=pass_number, steps_per_element=per_element
        )
        model.fit(dataset, epochs=1, verbose=0, shuffle=False)  # warm-up: tracing, compiling
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.fit(dataset, epochs=1, verbose=0, shuffle=False)
            seconds.append(time.perf_counter() - start)
        out[f"{batch} x {units}"] = statistics.median(seconds)
    return out


def sweep(repeats: int = 3) -> dict[str, dict[str, float]]:
    from benchmarks.steps import per_thread_setting

    return per_thread_setting("benchmarks.threads", repeats, os.environ.get("MNIST_MANUAL_DIR"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__)
    parser.add_argument("--threads", type=int, help="only this setting, in this process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from components import console

    console.setup(verbose=False)
    if args.threads is not None:
        print(json.dumps(epochs(args.threads, SHAPES, args.repeats)))
        return 0
    r = sweep(args.repeats)
    if args.json:
        print(json.dumps(r))
        return 0
    print("| batch x hidden units | one thread, s an epoch | TensorFlow's default, s an epoch |")
    print("| --- | --- | --- |")
    for shape in r["one"]:
        print(f"| {shape} | {r['one'][shape]:.3f} | {r['default'][shape]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
