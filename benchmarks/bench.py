"""`make bench`: the seed script vs our trainer, alternating, each in its own process (timed
pairs, then as many pairs whose memory is sampled); then the input pipeline alone, where a
train step's time goes (benchmarks/steps.py), and the exported model's serving latency and
throughput, in-process.

Writes artifacts/bench/<timestamp>.json and prints a table. Nothing here is asserted: the figures
are for people (and for the README).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.steps import format_floor, step_floors

ROOT = Path(__file__).resolve().parents[1]
IMAGES_PER_RUN = 60_000 * 5


def _tree_memory_mb(proc: Any) -> tuple[float, float]:
    """(RSS, PSS) of a process and all its descendants, MB (the validating process runs beside
    the trainer: both count). RSS summed over processes counts the shared libraries they both
    map (TensorFlow's, ~400 MB) twice; PSS, the kernel's proportional share, counts them once,
    as for a single process: it is the fair figure against the one-process seed script."""
    import psutil

    rss = pss = 0
    try:
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                with open(f"/proc/{p.pid}/smaps_rollup") as f:
                    fields = dict(
                        line.split()[:2] for line in f if line.startswith(("Rss:", "Pss:"))
                    )
                rss += int(fields["Rss:"])
                pss += int(fields["Pss:"])
            except (OSError, KeyError, ValueError):
                try:  # no smaps_rollup (not Linux, or the process just ended): RSS for both
                    rss += p.memory_info().rss >> 10
                    pss += p.memory_info().rss >> 10
                except psutil.Error:
                    pass
    except psutil.Error:
        pass
    return rss / 1024, pss / 1024


def run_measured(cmd: list[str], env: dict[str, str], memory: bool = False) -> dict[str, Any]:
    """Run `cmd` to its end: its wall time, or (`memory`) its process tree's peak memory.

    Not both from one run: reading a TensorFlow process's `smaps_rollup` walks ~1.7 GB of
    mappings, ~30 ms of CPU per sample here: it added 2.3 s to our whole run and 0.8 s to its
    fit (3 alternating pairs, 2026-11-27 08:00, on this 2-core machine), and not the same to the
    seed script's, so timed runs are not sampled."""
    start = time.perf_counter()
    peak_rss = peak_pss = None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        if memory:
            peak_rss = peak_pss = 0.0
            while proc.poll() is None:  # sampled every 50 ms: the whole process tree
                rss, pss = _tree_memory_mb(proc)
                peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
                time.sleep(0.05)
        proc.wait()
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {
        "stdout": stdout,
        "wall_seconds": wall,
        "peak_rss_mb": peak_rss,
        "peak_pss_mb": peak_pss,
    }


def run_seed(env: dict[str, str], memory: bool = False) -> dict[str, Any]:
    r = run_measured([sys.executable, "-m", "benchmarks.seed_baseline"], env, memory)
    result = json.loads(r["stdout"].strip().splitlines()[-1])
    return {
        "train_seconds": result["fit_seconds"],
        "test_accuracy": result["test_accuracy"],
        "process_seconds": r["wall_seconds"],
        "peak_rss_mb": r["peak_rss_mb"],
        "peak_pss_mb": r["peak_pss_mb"],
        "phases": result["phases"],
    }


def run_ours(
    env: dict[str, str], artifacts: Path, extra: list[str], memory: bool = False
) -> dict[str, Any]:
    """`make train` end to end, as a user types it (warm: built .venv, prepared data)."""
    args = shlex.join(["--min-accuracy", "0", "--max-regression", "1", *extra])
    cmd = [
        "make",
        "-s",
        "--no-print-directory",
        "train",
        f"ARTIFACTS_DIR={artifacts}",
        f"ARGS={args}",
    ]
    r = run_measured(cmd, env, memory)
    metrics = json.loads((artifacts / "runs" / "latest" / "metrics.json").read_text())
    timings = metrics["timings"]
    phases = {
        "import": timings["import_tensorflow_seconds"],
        "data": timings["data_seconds"],
        "model build (before fit)": timings["fit_phases"].get("model_build", 0.0),
        "fit set-up": timings["fit_phases"]["fit_setup"],
        "compile (estimate)": timings["fit_phases"]["compile_estimate"] or 0.0,
        **{
            f"epochs: {k}": sum(e[k] for e in timings["fit_phases"]["epochs"])
            for k in ("train_steps", "validation", "callbacks")
        },
        "export": timings["export_seconds"],
        "infra validation + evaluate": timings["validate_seconds"],
        "gate + publish": timings["gate_seconds"] + timings["publish_seconds"],
        "report": timings["report_seconds"],
        "other (python start, CLI, make)": r["wall_seconds"]
        - timings["pipeline_seconds"]
        - timings["import_tensorflow_seconds"],
    }
    return {
        "train_seconds": timings["fit_seconds"],
        "test_accuracy": metrics["test_accuracy"],
        "process_seconds": r["wall_seconds"],
        "peak_rss_mb": r["peak_rss_mb"],
        "peak_pss_mb": r["peak_pss_mb"],
        "phases": phases,
        "model_dir": metrics["published_path"],
    }


def input_pipeline_images_per_s(manual_dir: str | None) -> float:
    """What the tf.data pipeline delivers alone, consumed in-graph as training consumes it."""
    import tensorflow as tf

    from components import data

    train = data.validate_split(
        data.load_split("train", manual_dir=Path(manual_dir) if manual_dir else None)
    )
    ds = data.make_train_dataset(train, 32, seed=0, epoch=tf.Variable(0, dtype=tf.int64))

    @tf.function
    def consume(dataset: tf.data.Dataset) -> tf.Tensor:
        n = tf.constant(0, tf.int64)
        for _, y in dataset:
            n += tf.shape(y, out_type=tf.int64)[0]
        return n

    consume(ds)  # warm-up: tracing
    start = time.perf_counter()
    n = int(consume(ds))
    return n / (time.perf_counter() - start)


def serving_figures(model_dir: str) -> dict[str, float]:
    import numpy as np
    import tensorflow as tf

    model = tf.saved_model.load(model_dir)
    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    for name, signature, make in (
        (
            "serving",
            "serving_default",
            lambda n: {"images": tf.constant(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))},
        ),
        (
            "png",
            "predict_png",
            lambda n: {
                "image_bytes": tf.constant(
                    [tf.io.encode_png(rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)).numpy()]
                    * n
                )
            },
        ),
    ):
        fn = model.signatures[signature]
        one = make(1)
        for _ in range(50):
            fn(**one)
        samples = []
        for _ in range(1000):
            t = time.perf_counter()
            fn(**one)
            samples.append((time.perf_counter() - t) * 1000)
        samples.sort()
        out[f"{name}_b1_p50_ms"] = samples[len(samples) // 2]
        out[f"{name}_b1_p99_ms"] = samples[int(len(samples) * 0.99)]
        for batch in (256, 1024):
            inputs = make(batch)
            fn(**inputs)
            reps = 20
            t = time.perf_counter()
            for _ in range(reps):
                fn(**inputs)
            out[f"{name}_b{batch}_images_per_s"] = batch * reps / (time.perf_counter() - t)
    return out


def photo_figures(model_dir: str, manual_dir: str | None) -> dict[str, Any]:
    """The photo benchmark (benchmarks/photos.py) on the default run's published model: 300
    photo-like renderings of MNIST test digits through `predict_image`, the `uncertain` flag's
    rates, 60 phone-sized ballpoint photos, 60 photos of the page on a desk, 40 of a small
    digit in a large photo, and batch-1 latency on a 1000x1000 JPEG."""
    import tensorflow as tf

    from benchmarks import photos

    digits, labels = photos.load_test_digits(Path(manual_dir) if manual_dir else None)
    signature = tf.saved_model.load(model_dir).signatures["predict_image"]
    generated = photos.generate(300, 0, digits=digits, labels=labels)
    result = photos.evaluate(signature, generated)
    client = photos.through_client(Path(model_dir), generated)
    pens = photos.evaluate(
        signature, photos.generate(60, 0, digits=digits, labels=labels, ballpoint=True)
    )
    desks = photos.evaluate(
        signature, photos.generate(60, 0, digits=digits, labels=labels, desk=True)
    )
    smalls = photos.evaluate(
        signature, photos.generate(40, 0, digits=digits, labels=labels, small=True)
    )
    latency = photos.latency(signature, photos.latency_photo(digits, labels, 0))
    return {
        "desk_accuracy": desks["accuracy"],
        "desk_n": desks["photos"],
        "small_accuracy": smalls["accuracy"],
        "small_n": smalls["photos"],
        "small_refused": smalls["refused"],
        "ballpoint_accuracy": pens["accuracy"],
        "ballpoint_n": pens["photos"],
        "ballpoint_refused": pens["refused"],
        "photo_accuracy": result["accuracy"],
        "photo_n": result["photos"],
        "photo_mistakes_flagged": result["mistakes_flagged"],
        "photo_correct_flagged": result["correct_flagged"],
        "photo_accuracy_through_client": client["accuracy"],
        "predict_image_1000px_jpeg_p50_ms": latency["p50_ms"],
    }


def _alternate(
    pairs: int,
    seed: Callable[[], dict[str, Any]],
    ours: Callable[[], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
    label: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`pairs` runs of each, alternating which goes first (the machine's speed drifts)."""
    runs: dict[str, list[dict[str, Any]]] = {"seed": [], "ours": []}
    for i in range(pairs):
        for who in ("seed", "ours") if i % 2 == 0 else ("ours", "seed"):
            runs[who].append((seed if who == "seed" else ours)())
            print(f"{label} {i + 1}/{pairs} {who:>4}: {describe(runs[who][-1])}", flush=True)
    return runs["seed"], runs["ours"]


def _measure(
    env: dict[str, str], manual_dir: str | None, user_args: list[str], pairs: int
) -> tuple[
    list[dict[str, Any]],
    list[dict[str, Any]],
    dict[str, Any],
    float,
    dict[str, Any],
    dict[str, list[dict[str, Any]]],
]:
    """Our default run, then `pairs` alternating seed/ours pairs at equal data (timed), as
    many whose memory is sampled, then the input pipeline and the serving figures."""
    extra = user_args
    # Equal data: the seed trains on all 60,000 training examples, so ours does too.
    extra = ["--validation-fraction", "0", *extra]
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        # One artifacts folder for all our runs, as a user's: each later run has the previous
        # version as its baseline (re-evaluated in the validating process) and finds the XLA
        # programs an earlier run of the same shapes compiled (artifacts/cache/xla).
        ours = Path(tmp) / "ours"
        default_run = run_ours(env, ours, [])
        print(
            f"our default (5% held out for validation): train "
            f"{default_run['train_seconds']:.2f} s, process "
            f"{default_run['process_seconds']:.2f} s, accuracy "
            f"{default_run['test_accuracy']:.4f}",
            flush=True,
        )
        seed_runs, our_runs = _alternate(
            pairs,
            lambda: run_seed(env),
            lambda: run_ours(env, ours, extra),
            lambda r: (
                f"train {r['train_seconds']:.2f} s, process {r['process_seconds']:.2f} s, "
                f"accuracy {r['test_accuracy']:.4f}"
            ),
            "pair",
        )
        # Memory in runs of their own (sampling costs CPU, see run_measured), also alternating.
        seed_memory, our_memory = _alternate(
            pairs,
            lambda: run_seed(env, memory=True),
            lambda: run_ours(env, ours, extra, memory=True),
            lambda r: f"peak PSS {r['peak_pss_mb']:.0f} MB (RSS summed {r['peak_rss_mb']:.0f} MB)",
            "memory",
        )
        pipeline_rate = input_pipeline_images_per_s(manual_dir)
        serving: dict[str, Any] = {**serving_figures(default_run["model_dir"])}
        serving.update(photo_figures(default_run["model_dir"], manual_dir))
        serving["step_floor"] = step_floors(manual_dir)

    memory = {"seed": seed_memory, "ours": _without_model_dir(our_memory)}
    return seed_runs, our_runs, default_run, pipeline_rate, serving, memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__)
    parser.add_argument("--pairs", type=int, default=3, help="seed/ours pairs (default 3)")
    parser.add_argument("--ours-args", default="", help="extra flags for our trainer")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("ARTIFACTS_DIR") or "artifacts") / "bench"
    )
    args = parser.parse_args(argv)
    from components import console

    console.setup(verbose=False)  # the bench's own TensorFlow (pipeline, serving figures)

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    manual_dir = os.environ.get("MNIST_MANUAL_DIR") or None
    extra = shlex.split(args.ours_args)
    seed_runs, our_runs, default_run, pipeline_rate, serving, memory = _measure(
        env, manual_dir, shlex.split(args.ours_args), args.pairs
    )
    extra = ["--validation-fraction", "0", *shlex.split(args.ours_args)]
    result = _result(
        extra, args.pairs, seed_runs, our_runs, default_run, pipeline_rate, serving, memory
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"\nwritten {path}")
    return 0


def _result(
    extra: list[str],
    pairs: int,
    seed_runs: list[dict[str, Any]],
    our_runs: list[dict[str, Any]],
    default_run: dict[str, Any],
    pipeline_rate: float,
    serving: dict[str, Any],
    memory: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """What the bench writes: medians of the pairs, speed-ups, rates, the serving figures and
    every run."""

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    ratios = [s["train_seconds"] / o["train_seconds"] for s, o in zip(seed_runs, our_runs)]
    process_ratios = [
        s["process_seconds"] / o["process_seconds"] for s, o in zip(seed_runs, our_runs)
    ]
    train_rate = IMAGES_PER_RUN / med(our_runs, "train_seconds")
    return {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "device": "cpu",
        "ours_args": extra,
        "pairs": pairs,
        "seed_train_seconds_median": med(seed_runs, "train_seconds"),
        "ours_train_seconds_median": med(our_runs, "train_seconds"),
        "seed_process_seconds_median": med(seed_runs, "process_seconds"),
        "ours_process_seconds_median": med(our_runs, "process_seconds"),
        # From runs of their own (run_measured), as many, alternating too.
        "seed_peak_rss_mb_median": med(memory["seed"], "peak_rss_mb"),
        "ours_peak_rss_mb_median": med(memory["ours"], "peak_rss_mb"),
        "seed_peak_pss_mb_median": med(memory["seed"], "peak_pss_mb"),
        "ours_peak_pss_mb_median": med(memory["ours"], "peak_pss_mb"),
        "seed_test_accuracy": med(seed_runs, "test_accuracy"),
        "ours_test_accuracy": med(our_runs, "test_accuracy"),
        "train_speedup_per_pair": ratios,
        "train_speedup_median": statistics.median(ratios),
        "process_speedup_median": statistics.median(process_ratios),
        "train_images_per_s": train_rate,
        "input_pipeline_images_per_s": pipeline_rate,
        "input_pipeline_over_training": pipeline_rate / train_rate,
        **serving,
        "runs": {
            "seed": seed_runs,
            "ours": _without_model_dir(our_runs),
        },
        "memory_runs": memory,
        "ours_default": {k: v for k, v in default_run.items() if k != "model_dir"},
        "phases_seed_median": _median_phases(seed_runs),
        "phases_ours_median": _median_phases(our_runs),
    }


def _without_model_dir(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "model_dir"} for r in runs]


def _median_phases(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {k: statistics.median(r["phases"][k] for r in runs) for k in runs[0]["phases"]}


def _comparison_table(r: dict[str, Any]) -> list[str]:
    """The seed script against ours at equal data, and ours at the defaults, as table lines."""
    d = r["ours_default"]
    rows = [
        ("", "seed script", "ours, all 60,000 (--validation-fraction 0)", "seed/ours"),
        (
            "training seconds (median)",
            f"{r['seed_train_seconds_median']:.2f}",
            f"{r['ours_train_seconds_median']:.2f}",
            f"{r['train_speedup_median']:.2f}x",
        ),
        (
            "whole process seconds (median)",
            f"{r['seed_process_seconds_median']:.2f}",
            f"{r['ours_process_seconds_median']:.2f}",
            f"{r['process_speedup_median']:.2f}x",
        ),
        (
            "peak memory MB, PSS of the process tree (median of runs of their own)",
            f"{r['seed_peak_pss_mb_median']:.0f}",
            f"{r['ours_peak_pss_mb_median']:.0f}",
            f"{r['seed_peak_pss_mb_median'] / r['ours_peak_pss_mb_median']:.2f}x",
        ),
        (
            "peak RSS MB summed over the tree (median; shared libraries counted per process)",
            f"{r['seed_peak_rss_mb_median']:.0f}",
            f"{r['ours_peak_rss_mb_median']:.0f}",
            "",
        ),
        (
            "test accuracy (median)",
            f"{r['seed_test_accuracy']:.4f}",
            f"{r['ours_test_accuracy']:.4f}",
            "",
        ),
        (
            "ours at the defaults (57,000 + 3,000 validation): fit / process / accuracy",
            "",
            f"{d['train_seconds']:.2f} / {d['process_seconds']:.2f} / {d['test_accuracy']:.4f}",
            f"{r['seed_train_seconds_median'] / d['train_seconds']:.2f}x / "
            f"{r['seed_process_seconds_median'] / d['process_seconds']:.2f}x",
        ),
    ]
    lines = [f"| {' | '.join(row)} |" for row in rows]
    lines.insert(1, "| --- | --- | --- | --- |")
    return lines


def format_table(r: dict[str, Any]) -> str:
    lines = _comparison_table(r)
    per_pair = ", ".join(f"{x:.2f}x" for x in r["train_speedup_per_pair"])
    lines += [
        "",
        "where the seconds go (medians; ours = `make train` end to end):",
        "| phase | seconds |",
        "| --- | --- |",
    ]
    lines += [f"| seed: {k} | {v:.2f} |" for k, v in r["phases_seed_median"].items()]
    lines += [f"| ours: {k} | {v:.2f} |" for k, v in r["phases_ours_median"].items()]
    lines += [
        "",
        f"training speed-up per pair: {per_pair}",
        "",
        "where a train step's time goes (benchmarks/steps.py): " + format_floor(r["step_floor"]),
        f"training consumes {r['train_images_per_s']:,.0f} images/s; the input pipeline alone "
        f"delivers {r['input_pipeline_images_per_s']:,.0f} images/s "
        f"({r['input_pipeline_over_training']:.1f}x)",
        "",
        f"photos (benchmarks/photos.py, {r['photo_n']}, seed 0) through predict_image: "
        f"{r['photo_accuracy']:.1%} right; uncertain flags {r['photo_mistakes_flagged']:.0%} "
        f"of the wrong answers and {r['photo_correct_flagged']:.1%} of the right ones; batch-1 "
        f"latency on a 1000x1000 JPEG p50 {r['predict_image_1000px_jpeg_p50_ms']:.1f} ms; "
        f"the same photos as files through the client (what `make predict` runs): "
        f"{r['photo_accuracy_through_client']:.1%} right; "
        f"phone-sized ballpoint photos ({r['ballpoint_n']}): {r['ballpoint_accuracy']:.1%} right, "
        f"{r['ballpoint_refused']} refused"
        + (
            f"; the page on a desk ({r['desk_n']}): {r['desk_accuracy']:.1%} right"
            if "desk_n" in r
            else ""
        )
        + (
            f"; a small ballpoint digit in a large photo ({r['small_n']}): "
            f"{r['small_accuracy']:.1%} right, {r['small_refused']} refused"
            if "small_n" in r
            else ""
        ),
        "",
        "| serving (in-process SavedModel) | batch-1 p50 ms | batch-1 p99 ms | batch 256 img/s "
        "| batch 1024 img/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, label in (("serving", "serving_default (uint8)"), ("png", "predict_png")):
        lines.append(
            f"| {label} | {r[f'{name}_b1_p50_ms']:.3f} | {r[f'{name}_b1_p99_ms']:.3f} "
            f"| {r[f'{name}_b256_images_per_s']:,.0f} "
            f"| {r[f'{name}_b1024_images_per_s']:,.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
