"""The strategy policy, and the multi-device paths executed for real on logical CPU devices:
MirroredStrategy over 2 devices and OneDeviceStrategy run the whole pipeline; 2 replicas with
global batch B take the same step as 1 replica with batch B; the Keras work-arounds notice when
upstream moves."""

import importlib
import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from components import strategy
from tests.helpers import ROOT

PRELUDE = textwrap.dedent(f"""
    import json, sys
    sys.path.insert(0, {str(ROOT)!r})
    import numpy as np, tensorflow as tf, keras
    from pathlib import Path
    from components import data, strategy, trainer
    from components.model import build_model
    from pipeline.config import small_config
    from pipeline.run import Paths, train_pipeline
    from tests.helpers import make_digits
""")


def run_script(body: str, timeout: int = 300, env: dict[str, str] | None = None) -> Any:
    r = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_policy_what_each_strategy_allows():
    kw = dict(
        batch_size=32,
        steps_per_execution=100,
        jit_compile=True,
        mixed_precision="auto",
        dropout=0.0,
    )
    cpu = strategy.choose_strategy("auto", 0)
    e = strategy.effective_settings(cpu, 1, **kw)
    assert (e.steps_per_execution, e.jit_compile, e.mixed_precision) == (100, True, False)
    mirrored = strategy.choose_strategy("cpu", 0, cpu_devices=2)
    assert mirrored.kind == "mirrored"
    e = strategy.effective_settings(mirrored, 2, **kw)
    assert (e.steps_per_execution, e.jit_compile, e.per_replica_batch) == (1, False, 16)
    assert any("steps_per_execution 100 -> 1" in w for w in e.why)
    gpu = strategy.choose_strategy("auto", 1)
    assert strategy.effective_settings(gpu, 1, compute_capability=8.0, **kw).mixed_precision
    assert not strategy.effective_settings(gpu, 1, compute_capability=6.1, **kw).mixed_precision
    assert not strategy.effective_settings(cpu, 1, **{**kw, "dropout": 0.2}).jit_compile


def test_cpu_threads_policy():
    """Auto (0) is one thread for one replica on the CPU with a small step (the documented
    model up to batch 64); larger steps, unknown ones (a tuning study), several replicas, GPUs
    and a user's TF_NUM_*_THREADS keep TensorFlow's default; a number asked for is used."""
    cpu, none, documented = strategy.choose_strategy("auto", 0), {}, 32 * 128
    chosen = strategy.with_cpu_threads(cpu, 0, documented, none)
    assert chosen.cpu_threads == 1 and "cpu_threads auto -> 1" in chosen.threads_why
    assert strategy.with_cpu_threads(cpu, 0, strategy.SMALL_STEP, none).cpu_threads == 1
    assert strategy.SMALL_STEP == 64 * 128
    bigger = strategy.with_cpu_threads(cpu, 0, strategy.SMALL_STEP + 1, none)
    assert bigger.cpu_threads == 0 and "8,193 > 8,192" in bigger.threads_why
    assert strategy.with_cpu_threads(cpu, 0, 256 * 128, none).cpu_threads == 0
    assert strategy.with_cpu_threads(cpu, 0, 32 * 512, none).cpu_threads == 0
    assert strategy.with_cpu_threads(cpu, 0, None, none) == cpu  # unknown step: untouched
    for other in (
        strategy.choose_strategy("cpu", 0, cpu_devices=2),
        strategy.choose_strategy("auto", 1),
        strategy.choose_strategy("auto", 0, {"cluster": {"worker": ["a:1", "b:2"]}}),
    ):
        assert strategy.with_cpu_threads(other, 0, documented, none).cpu_threads == 0, other.kind
        assert strategy.with_cpu_threads(other, 3, documented, none).cpu_threads == 3, other.kind
    for name in strategy.THREAD_ENV:
        chosen = strategy.with_cpu_threads(cpu, 0, documented, {name: "2"})
        assert chosen.cpu_threads == 0 and name in chosen.threads_why
    assert (
        strategy.with_cpu_threads(cpu, 2, documented, {strategy.THREAD_ENV[0]: "4"}).cpu_threads
        == 2
    )
    e = strategy.effective_settings(
        strategy.with_cpu_threads(cpu, 0, documented, none),
        1,
        batch_size=32,
        steps_per_execution=100,
        jit_compile=True,
        mixed_precision="off",
        dropout=0.0,
    )
    assert e.cpu_threads == 1 and any(w.startswith("cpu_threads auto -> 1") for w in e.why)


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, [1, 1, 1]),  # the defaults: one thread
        ({"TF_NUM_INTEROP_THREADS": "2"}, [0, 0, 0]),  # the user's pools
        ({"CPU_THREADS": "3"}, [3, 3, 3]),
        ({"STEP": str(256 * 128)}, [0, 0, 0]),  # a larger step: TensorFlow's default
        # several replicas: the inter-op pool stays TensorFlow's (collectives block one each)
        ({"CPU_THREADS": "1", "DEVICES": "2"}, [1, 0, 1]),
        # TensorFlow already running on one thread: config.json must say 1, not "default"
        ({"ALREADY": "1", "STEP": str(256 * 128)}, [1, 1, 1]),
    ],
)
def test_setup_device_sets_tensorflows_thread_pools_in_a_fresh_process(env, expected):
    """What a run does, in a process of its own as `make train` is: the pools TensorFlow
    reports after `setup_device` (0: its default), and what the choice records."""
    result = run_script(
        """
        import os
        threading = tf.config.threading
        if os.environ.get("ALREADY"):
            threading.set_intra_op_parallelism_threads(int(os.environ["ALREADY"]))
            threading.set_inter_op_parallelism_threads(int(os.environ["ALREADY"]))
            tf.constant(1.0) + 1.0
        choice, _, _ = strategy.setup_device(
            "auto",
            deterministic=False,
            seed=0,
            cpu_devices=int(os.environ.get("DEVICES", "1")),
            cpu_threads=int(os.environ.get("CPU_THREADS", "0")),
            step_size=int(os.environ.get("STEP", 32 * 128)),
        )
        tf.constant(1.0) + 1.0  # TensorFlow runs: the pools are made
        print(json.dumps([threading.get_intra_op_parallelism_threads(),
                          threading.get_inter_op_parallelism_threads(), choice.cpu_threads]))
        """,
        env=env,
    )
    assert result == expected


def test_patched_keras_names_still_exist():
    """The multi-worker work-arounds patch these Keras internals: an upgrade that moves them
    must fail here, not in a cluster."""
    import keras

    for name in strategy.PATCHED_KERAS_NAMES:
        module_name, _, attr = name.rpartition(".")
        owner = (
            keras.Model if module_name == "keras.Model" else importlib.import_module(module_name)
        )
        assert hasattr(owner, attr), name


@pytest.mark.slow
def test_keras_multi_step_loop_still_fails_under_mirrored_strategy():
    """Why the policy runs 1 step per execution under MirroredStrategy: when this test fails,
    Keras fixed its multi-step loop and the policy can allow steps_per_execution > 1."""
    out = run_script("""
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        split = data.validate_split(make_digits(200, seed=1))
        with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
            model = build_model(steps_per_execution=4, jit_compile=False)
        try:
            model.fit(data.make_train_dataset(split, 32, seed=0,
                                              epoch=tf.Variable(0, dtype=tf.int64)),
                      epochs=1, verbose=0)
            print(json.dumps({"fails": False}))
        except Exception as e:
            print(json.dumps({"fails": True, "error": str(e)[:200]}))
    """)
    assert out["fails"] and "placeholder" in out["error"].lower()


def test_two_replicas_take_the_same_step_as_one():
    """One step of global batch 32 through our trainer (`trainer.train`, its Keras
    work-arounds and input path): on 2 replicas (16 each, gradients all-reduced; 1 step per
    execution, no XLA, as the strategy sets them) it equals one step of batch 32 on one device
    at the defaults (100 steps per execution from one dataset element, XLA), within float
    tolerance."""
    out = run_script("""
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        split = data.validate_split(make_digits(32, seed=1))
        keras.utils.set_random_seed(0)
        weights = [w.copy() for w in build_model().get_weights()]
        result = {}
        for name, strat, spe, xla in (
            ("one", tf.distribute.get_strategy(), 100, True),
            ("two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), 1, False),
        ):
            def build(spe=spe, xla=xla):
                model = build_model(steps_per_execution=spe, jit_compile=xla)
                model.set_weights(weights)
                return model
            trained = trainer.train(
                build,
                lambda epoch, steps: data.make_train_dataset(
                    split, 32, seed=0, epoch=epoch, steps_per_element=steps),
                None, batch_size=32, epochs=1, strategy=strat, tensorboard_dir=None,
                backup_dir=None, verbose=0,
            )
            result[name] = [w.tolist() for w in trained.model.get_weights()]
            result[name + "_steps"] = int(trained.model.optimizer.iterations.numpy())
            result[name + "_replicas"] = strat.num_replicas_in_sync
        diff = max(float(np.abs(np.array(a) - np.array(b)).max())
                   for a, b in zip(result["one"], result["two"]))
        moved = max(float(np.abs(np.array(a) - b).max()) for a, b in zip(result["one"], weights))
        print(json.dumps({"diff": diff, "moved": moved, "replicas": result["two_replicas"],
                          "steps": [result["one_steps"], result["two_steps"]]}))
    """)
    assert out["replicas"] == 2 and out["steps"] == [1, 1] and out["moved"] > 1e-4
    # float32: the all-reduce sums the two halves' gradients in another order, and Adam's
    # first step divides each by its own magnitude, so tiny gradients differ by ~1e-6 (1.15e-6
    # seen on CI) out of a step of ~1e-3: two orders of magnitude under any real difference.
    assert out["diff"] < 1e-5


@pytest.mark.parametrize("kind", ["mirrored", "one_device"])
def test_the_pipeline_runs_under_each_strategy(tmp_path, kind):
    """The real pipeline (train, export, infra validation, gate, publish, report) under
    MirroredStrategy over 2 logical CPU devices, and under OneDeviceStrategy."""
    out = run_script(f"""
        kind = {kind!r}
        if kind == "one_device":
            strategy.choose_strategy = lambda *a, **k: strategy.StrategyChoice(
                "one_device", "cpu", 1, "OneDeviceStrategy (/cpu:0)")
        config = small_config(device="cpu", epochs=2, cpu_devices=2 if kind == "mirrored"
                              else 1, batch_size=32, steps_per_execution=100,
                              jit_compile=True)  # the defaults, as a GPU run asks for them
        d = (make_digits(512, seed=1), make_digits(128, seed=2, name="test"))
        result = train_pipeline(config, Paths(Path({str(tmp_path)!r})), data=d)
        effective = json.loads((result.run_dir / "config.json").read_text())["effective"]
        print(json.dumps({{"strategy": result.metrics["strategy"],
                          "replicas": result.metrics["replicas"],
                          "version": result.metrics["published_version"],
                          "accuracy": result.metrics["test_accuracy"],
                          "effective": effective}}))
    """)
    print(out)
    assert out["strategy"] == kind and out["version"] == 1
    assert out["replicas"] == (2 if kind == "mirrored" else 1)
    assert out["effective"]["steps_per_execution"] == (1 if kind == "mirrored" else 100)
    assert out["effective"]["jit_compile"] is (kind == "one_device")
    assert out["accuracy"] > 0.5


@pytest.mark.slow
def test_keras_build_still_fails_on_an_uneven_first_batch_under_mirrored_strategy():
    """Why the trainer builds the model from a local batch under several replicas: when this
    test fails, Keras's `_maybe_symbolic_build` handles uneven per-replica batches."""
    out = run_script("""
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        split = data.validate_split(make_digits(13, seed=1))
        with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
            model = build_model(steps_per_execution=1, jit_compile=False)
        try:
            model.evaluate(data.make_dataset(split, 1024), verbose=0)
            print(json.dumps({"fails": False}))
        except Exception as e:
            print(json.dumps({"fails": True, "error": str(e)[:300]}))
    """)
    assert out["fails"] and "must have the same size and shape" in out["error"]


@pytest.mark.slow
@pytest.mark.parametrize("patched", ["none", "build", "build and reduce"])
def test_keras_still_needs_both_multi_worker_work_arounds(patched):
    """Why both multi-worker work-arounds exist: two real workers (two processes, a
    MultiWorkerMirroredStrategy from TF_CONFIG) fit with none of them (Keras's first-batch
    build fails), with the build one only (reducing 0-d step logs fails), and with both (they
    train). When an unpatched case stops failing, Keras fixed it (keras-team/keras#20585) and
    that patch can go."""
    from pipeline.cluster import free_ports

    body = f"""
        import os
        if {patched!r} == "build and reduce":
            strategy.work_around_keras_multi_worker_reduce()
        multi = tf.distribute.MultiWorkerMirroredStrategy()
        split = data.validate_split(make_digits(64, seed=1))
        with multi.scope():
            model = build_model(steps_per_execution=1, jit_compile=False)
        if {patched!r} != "none":
            strategy.work_around_keras_distributed_build(model, multi, 16)
        try:
            model.fit(data.make_train_dataset(split, 32, seed=0,
                                              epoch=tf.Variable(0, dtype=tf.int64)),
                      epochs=1, verbose=0)
            print(json.dumps({{"fails": False}}), flush=True)
        except Exception as e:
            print(json.dumps({{"fails": True, "error": str(e)[:300]}}), flush=True)
        os._exit(0)  # (no collective shutdown handshake: the other worker may have failed)
    """
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={
                **os.environ,
                "TF_CPP_MIN_LOG_LEVEL": "3",
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": i}}
                ),
            },
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        stdout, _ = p.communicate(timeout=300)
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    expected = {"none": "PerReplica", "build": "Invalid reduction dimension"}.get(patched)
    if expected is None:
        assert not any(o["fails"] for o in outs), outs
    else:
        assert all(o["fails"] for o in outs), outs
        assert any(expected in o["error"] for o in outs), outs
