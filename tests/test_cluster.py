"""tf.distribute across processes: roles, generated TF_CONFIGs, and real 2-worker runs."""

import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from components import exporter, strategy
from pipeline.cluster import tf_configs
from tests.helpers import ROOT, requires_mnist, small_run_flags, train_cmd, wait_for_backup_epoch

SMALL = small_run_flags(4000)


@pytest.mark.parametrize(
    "tf_config,chief,task",
    [
        (None, True, "local"),
        (
            {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}},
            True,
            "worker-0",
        ),
        (
            {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}},
            False,
            "worker-1",
        ),
        (
            {
                "cluster": {"chief": ["c:1"], "worker": ["a:1"]},
                "task": {"type": "chief", "index": 0},
            },
            True,
            "chief-0",
        ),
        (
            {
                "cluster": {"chief": ["c:1"], "worker": ["a:1"]},
                "task": {"type": "worker", "index": 0},
            },
            False,
            "worker-0",
        ),
    ],
)
def test_cluster_role(tf_config, chief, task):
    assert strategy.cluster_role(tf_config) == strategy.ClusterRole(chief, task)


def test_generated_tf_configs_name_every_worker_and_one_task_each():
    configs = tf_configs([1111, 2222, 3333])
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert all(
        c["cluster"] == {"worker": ["127.0.0.1:1111", "127.0.0.1:2222", "127.0.0.1:3333"]}
        for c in configs
    )
    assert all(strategy.parse_tf_config(json.dumps(c)) == c for c in configs)
    assert [strategy.cluster_role(c).is_chief for c in configs] == [True, False, False]


def _cluster_cmd(artifacts, *flags, workers=2):
    return [
        sys.executable,
        "-m",
        "pipeline",
        "cluster",
        "--workers",
        str(workers),
        "--",
        "--artifacts-dir",
        str(artifacts),
        *SMALL,
        *flags,
    ]


def _runs(artifacts):
    return sorted(p for p in (artifacts / "runs").iterdir() if p.name != "latest")


def test_a_killed_workers_scratch_folder_is_removed_by_any_later_worker(tmp_path):
    """A worker killed mid-run (SIGKILL: no clean-up) leaves its scratch folder; the next worker
    of any run removes it, and never the folder of a worker that is still alive."""
    import fcntl

    from pipeline.run import worker_scratch

    workers = tmp_path / ".workers"
    killed = subprocess.run(
        [sys.executable, "-c",
         "import os, sys; from pathlib import Path; from pipeline.run import worker_scratch; "
         "worker_scratch(Path(sys.argv[1]), 'old-run-worker-1'); os._exit(9)", str(workers)],
        cwd=ROOT, check=False,
    )  # fmt: skip
    assert killed.returncode == 9 and (workers / "old-run-worker-1").is_dir()
    alive, held = worker_scratch(workers, "other-run-worker-1")  # a live worker (this process)
    assert not (workers / "old-run-worker-1").exists()
    mine, lock = worker_scratch(workers, "new-run-worker-2")
    assert (
        alive.is_dir()
        and mine.is_dir()
        and sorted(p.name for p in workers.iterdir())
        == [
            "new-run-worker-2",
            "other-run-worker-1",
        ]
    )
    with open(alive / ".lock", "r+") as probe, pytest.raises(OSError):
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held.close()
    lock.close()


@pytest.mark.slow
@requires_mnist
def test_two_workers_train_publish_once_and_report_once(tmp_path):
    artifacts = tmp_path / "cluster"
    r = subprocess.run(
        _cluster_cmd(artifacts, "--epochs", "1"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:]
    assert "2 replica(s), global batch 32, per-replica batch 16" in r.stdout
    assert exporter.published_versions(artifacts / "models" / "mnist") == [1]
    [run] = _runs(artifacts)
    assert (run / "report" / "index.html").is_file() and (run / "metrics.json").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["strategy"] == "multi_worker" and metrics["replicas"] == 2
    # the non-chief wrote nothing into the artifacts folder
    assert sorted(p.name for p in artifacts.iterdir()) == ["models", "runs", "tensorboard"]
    assert [p.name for p in (artifacts / "tensorboard").iterdir()] == [run.name]

    single = tmp_path / "single"
    r = subprocess.run(
        train_cmd(single, *SMALL, "--epochs", "1", "--steps-per-execution", "1"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    one = json.loads((_runs(single)[0] / "metrics.json").read_text())
    assert abs(metrics["test_accuracy"] - one["test_accuracy"]) < 0.03


@pytest.mark.slow
@requires_mnist
def test_a_killed_worker_is_restarted_and_the_job_completes(tmp_path):
    artifacts = tmp_path / "cluster"
    cmd = _cluster_cmd(artifacts, "--epochs", "3", "--run-name", "preempted")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True
    )
    reader.start()
    wait_for_backup_epoch(artifacts / "runs" / "preempted", proc)
    pid = next(
        int(m.group(1))
        for line in list(lines)
        if (m := re.match(r"cluster: worker 1 pid (\d+)", line))
    )
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, "".join(lines)[-3000:]
    reader.join(timeout=5)
    output = "".join(lines)
    assert "worker 1 was killed (signal 9); restarting all 2 workers" in output
    metrics = json.loads((artifacts / "runs" / "preempted" / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] >= 1 and metrics["epochs_trained"] == 3
    assert exporter.published_versions(artifacts / "models" / "mnist") == [1]
    # the killed worker's scratch folder was removed when it started again
    assert not (artifacts / ".workers").exists()
