"""`python -m benchmarks.ab REV`: this working tree against an earlier commit, whole runs in
alternating pairs on the same machine (its speed drifts too much for runs made at different
times to compare).

Each side trains in its own process and artifacts folder, as a user's `make train` at equal data:
`python -m pipeline train --validation-fraction 0 --min-accuracy 0 --max-regression 1` (plus
--args). REV is checked out into a temporary git worktree that uses this tree's `.venv`. One
warm-up run per side first (not counted): it leaves the XLA programs and a published version
behind, so every counted run has a baseline to re-score, as a user's later runs do. Prints each
run and the medians of the phases `metrics.json` records; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("wall", "import", "data", "fit", "epoch 1", "export", "validate", "report")


def run_once(tree: Path, artifacts: Path, extra: list[str]) -> dict[str, Any]:
    cmd = [
        str(ROOT / ".venv" / "bin" / "python"),
        "-m",
        "pipeline",
        "train",
        "--validation-fraction",
        "0",
        "--min-accuracy",
        "0",
        "--max-regression",
        "1",
        "--artifacts-dir",
        str(artifacts),
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} in {tree} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((artifacts / "runs" / "latest" / "metrics.json").read_text())
    t = metrics["timings"]
    history = json.loads((artifacts / "runs" / "latest" / "train" / "history.json").read_text())
    return {
        "wall": wall,
        "import": t["import_tensorflow_seconds"],
        "data": t["data_seconds"],
        "fit": t["fit_seconds"],
        "epoch 1": metrics["epoch_seconds"][0],
        "export": t["export_seconds"],
        "validate": t["validate_seconds"],
        "report": t["report_seconds"],
        "final loss": history["loss"][-1],
        "test accuracy": metrics["test_accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the commit to compare against (e.g. HEAD~1)")
    parser.add_argument("--pairs", type=int, default=6, help="alternating pairs (default 6)")
    parser.add_argument("--args", default="", help="extra flags for both sides' train")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    extra = shlex.split(args.args)
    rev = subprocess.run(
        ["git", "rev-parse", "--short", args.rev], cwd=ROOT, capture_output=True, text=True
    )
    if rev.returncode != 0:
        print(f"error: {args.rev} is not a commit here", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        before = Path(tmp) / "before"
        subprocess.run(
            ["git", "worktree", "add", "--quiet", "--detach", str(before), args.rev],
            cwd=ROOT,
            check=True,
        )
        try:
            (before / ".venv").symlink_to(ROOT / ".venv")
            trees = {f"before ({rev.stdout.strip()})": before, "after (this tree)": ROOT}
            results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
            # Outside both trees: each side's artifacts folder, named by its side.
            folders = {name: Path(tmp) / "artifacts" / name.split()[0] for name in trees}
            for name, tree in trees.items():  # warm-up: XLA programs, a baseline version
                run_once(tree, folders[name], extra)
            for i in range(args.pairs):
                order = list(trees) if i % 2 == 0 else list(trees)[::-1]
                for name in order:
                    r = run_once(trees[name], folders[name], extra)
                    results[name].append(r)
                    print(
                        f"pair {i + 1}/{args.pairs} {name}: "
                        + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k in FIELDS)
                        + f", final loss {r['final loss']!r}, test accuracy "
                        f"{r['test accuracy']:.4f}",
                        flush=True,
                    )
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False
            )
    print(f"\nmedians of {args.pairs} alternating pairs (seconds):")
    print("| | " + " | ".join(FIELDS) + " |")
    print("| --- " * (len(FIELDS) + 1) + "|")
    for name, runs in results.items():
        medians = [statistics.median(r[k] for r in runs) for k in FIELDS]
        print(f"| {name} | " + " | ".join(f"{m:.2f}" for m in medians) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
