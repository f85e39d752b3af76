"""Bad flags: one line on stderr, exit code 2, no traceback, nothing written."""

import subprocess

import pytest

from tests.helpers import ROOT


def run_cli(args, cwd, **kw):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          **kw)


@pytest.mark.parametrize("flags", [
    ["--epochs", "0"], ["--epochs", "-1"], ["--epochs", "abc"], ["--batch-size", "0"],
    ["--learning-rate", "0"], ["--learning-rate", "-0.1"], ["--seed", "1.5"],
    ["--device", "tpu"], ["--min-accuracy", "2"],
])
def test_bad_flags_exit_2_with_one_line(flags, python_cmd, tmp_path):
    r = run_cli(python_cmd + ["train", "--artifacts-dir", str(tmp_path / "a"), *flags], tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "a").exists()


def test_artifacts_path_that_is_a_file(python_cmd, tmp_path):
    (tmp_path / "f").write_text("x")
    r = run_cli(python_cmd + ["train", "--artifacts-dir", str(tmp_path / "f")], tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: --artifacts-dir {tmp_path / 'f'} exists and is not a folder"


def test_artifacts_path_not_writable(python_cmd, tmp_path):
    # /proc refuses new files even to root, unlike a chmod-ed folder.
    r = run_cli(python_cmd + ["train", "--artifacts-dir", "/proc/artifacts"], tmp_path)
    assert r.returncode == 2
    assert "not writable" in r.stderr and "Traceback" not in r.stderr


def test_bad_hparams_file(python_cmd, tmp_path):
    (tmp_path / "hp.json").write_text("{not json")
    r = run_cli(python_cmd + ["train", "--hparams", str(tmp_path / "hp.json"),
                              "--artifacts-dir", str(tmp_path / "a")], tmp_path)
    assert r.returncode == 2 and "cannot read JSON" in r.stderr


def test_help_lists_commands(python_cmd, tmp_path):
    r = run_cli(python_cmd + ["--help"], tmp_path)
    assert r.returncode == 0 and "train" in r.stdout and "report" in r.stdout
