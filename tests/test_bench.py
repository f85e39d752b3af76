"""The bench's measuring harness (the figures themselves come from `make bench`, not tests)."""

from __future__ import annotations

import sys

import pytest

from benchmarks.bench import run_measured

ALLOCATE = (
    "import time; b = bytearray(300 * 2**20); b[:: 4096] = b'x' * len(b[:: 4096]); "
    "time.sleep(0.6); print('done')"
)


def test_timed_runs_are_not_sampled():
    """Sampling a TensorFlow process's memory costs CPU the timed run would lose."""
    r = run_measured([sys.executable, "-c", ALLOCATE], {})
    assert r["stdout"].strip() == "done" and r["wall_seconds"] >= 0.6
    assert r["peak_rss_mb"] is None and r["peak_pss_mb"] is None


def test_memory_runs_see_the_peak_of_the_process_tree():
    """A child of the measured process counts (our validating process is one)."""
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {ALLOCATE!r}])"
    r = run_measured([sys.executable, "-c", child], {}, memory=True)
    assert r["peak_rss_mb"] >= 300 and r["peak_pss_mb"] >= 300


def test_a_failing_command_is_an_error():
    with pytest.raises(RuntimeError, match="failed"):
        run_measured([sys.executable, "-c", "raise SystemExit(3)"], {})


def test_pairs_alternate_which_side_goes_first(capsys):
    from benchmarks.bench import _alternate

    order = []

    def side(name):
        def run():
            order.append(name)
            return {"n": len(order)}

        return run

    seed, ours = _alternate(3, side("seed"), side("ours"), lambda r: f"#{r['n']}", "pair")
    assert order == ["seed", "ours", "ours", "seed", "seed", "ours"]
    assert [r["n"] for r in seed] == [1, 4, 5] and [r["n"] for r in ours] == [2, 3, 6]
    assert capsys.readouterr().out.splitlines()[:2] == ["pair 1/3 seed: #1", "pair 1/3 ours: #2"]
